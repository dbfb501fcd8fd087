"""Retargeting: one forward pass per output size from a trained generator.

The entry features of the input are computed once and shared by every requested size, so a batch
of sizes costs one entry conv plus one decode each. An output may be shaped: its two top corners
shifted (the homography of ``ingan.geometry``), with the pixels outside the warped frame masked.
The limits on sizes and shifts, and their one spelling in text and file names, live here too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import MAX_SHIFT, homography, valid_mask
from .images import encode, encode_mask, image_format, to_model_input, to_uint8, working_image
from .networks import Generator

MIN_SIDE = 8
MAX_SIDE = 16384
SHIFT_DECIMALS = 4  # a shift's one spelling in names and records
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")

Shifts = tuple[float, float]


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (width first, as image tools write it) -> (W, H), each side within MIN_SIDE..MAX_SIDE;
    anything else raises ``ValueError`` saying what a size looks like."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 256x128), got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"size {text!r} is too small: each side must be at least {MIN_SIDE} px")
    if max(w, h) > MAX_SIDE:
        raise ValueError(f"size {text!r} is too large: each side must be at most {MAX_SIDE} px")
    return w, h


def check_shifts(shifts: Sequence[float]) -> Shifts:
    """Two top-corner shifts (left, right), each finite and within +-MAX_SHIFT, rounded to four
    decimals so that a shape has one spelling in names and records; ``ValueError`` otherwise."""
    values = list(shifts)
    if len(values) != 2:
        raise ValueError(f"shifts are two numbers (left and right top corner), got {len(values)}")
    out = []
    for name, v in zip(("left", "right"), values, strict=True):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} shift must be a number, got {v!r}") from None
        if not math.isfinite(v) or abs(v) > MAX_SHIFT:
            raise ValueError(f"{name} shift {v} is out of range: each top-corner shift must be within "
                             f"-{MAX_SHIFT}..{MAX_SHIFT} (normalised units; 2 is the frame's width)")
        out.append(round(v, SHIFT_DECIMALS) + 0.0)  # + 0.0: no negative zero in names
    return out[0], out[1]


def parse_shape(text: str) -> tuple[str, Shifts | None]:
    """'BASE' or 'BASE@LEFT,RIGHT' -> (BASE, shifts or None): a size or ratio with optional
    top-corner shifts, e.g. '256x128@0.3,-0.3'. Zero shifts are a rectangle (None)."""
    base, sep, rest = str(text).partition("@")
    if not sep:
        return base.strip(), None
    parts = rest.split(",")
    if len(parts) != 2:
        raise ValueError(f"shape {text!r}: shifts look like @LEFT,RIGHT (e.g. 256x128@0.3,-0.3)")
    shifts = check_shifts(parts)
    return base.strip(), (None if shifts == (0.0, 0.0) else shifts)


def shape_name(base: str, shifts: Shifts | None) -> str:
    """The canonical spelling :func:`parse_shape` reads back."""
    return base if shifts is None else f"{base}@{shifts[0]:g},{shifts[1]:g}"


def output_stem(width: int, height: int, shifts: Shifts | None) -> str:
    """A file name (no extension) for an output: '256x128', or '256x128_tl+0.3_tr-0.3' when shaped."""
    base = f"{width}x{height}"
    return base if shifts is None else f"{base}_tl{shifts[0]:+g}_tr{shifts[1]:+g}"


def check_size(hw: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in hw)
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"output size {w}x{h} is too small: each side must be at least {MIN_SIDE} px")
    return h, w


@torch.no_grad()
def retarget(
    g: Generator,
    image: Tensor,
    sizes: Sequence[tuple[int, int]],
    shifts: Shifts | Sequence[Shifts | None] | None = None,
    *,
    masked: bool = True,
) -> list[Tensor]:
    """Outputs of exactly each (H, W) in ``sizes`` for ``image`` (3, H, W) in [-1, 1].

    Returns float tensors (3, H, W) in [-1, 1]. ``shifts`` (top-corner shifts, normalised units),
    one pair for every size or a list with one pair (or None) per size, makes an output
    non-rectangular: with ``masked`` the pixels outside the warped frame are set to -1 (black);
    ``retarget_mask`` gives the mask.
    """
    if g.training:
        raise RuntimeError("retarget needs the generator in eval mode (call .eval())")
    sizes = [check_size(s) for s in sizes]
    per_size = _per_size(shifts, len(sizes))
    param = next(g.parameters())
    x = image.to(device=param.device, dtype=param.dtype)[None]  # (1, 3, H, W)
    x = x.contiguous(memory_format=torch.channels_last)
    feats = g.features(x)  # (1, C, H, W), shared by every size
    outs = []
    for hw, sh in zip(sizes, per_size, strict=True):
        matrix = None if sh is None else homography(sh)
        y = g.decode(feats, hw, matrix, x)[0]  # (3, h, w)
        if matrix is not None and masked:
            y = torch.where(valid_mask(hw, matrix, y.device), y, y.new_full((), -1.0))
        outs.append(y.contiguous())
    return outs


def _per_size(shifts: Shifts | Sequence[Shifts | None] | None, n: int) -> list[Shifts | None]:
    if shifts is None:
        return [None] * n
    if len(shifts) == 2 and all(isinstance(v, (int, float)) for v in shifts):
        one = check_shifts(shifts)  # type: ignore[arg-type]
        return [None if one == (0.0, 0.0) else one] * n
    if len(shifts) != n:
        raise ValueError(f"{len(shifts)} shift pairs for {n} sizes")
    out: list[Shifts | None] = []
    for sh in shifts:
        pair = None if sh is None else check_shifts(sh)  # type: ignore[arg-type]
        out.append(None if pair == (0.0, 0.0) else pair)
    return out


def retarget_mask(hw: tuple[int, int], shifts: Shifts) -> Tensor:
    """(H, W) bool mask of the pixels inside the warped frame for a non-rectangular output."""
    return valid_mask(check_size(hw), homography(check_shifts(shifts)), torch.device("cpu"))


def retarget_image(
    g: Generator,
    source: Tensor,
    sizes: Sequence[tuple[int, int]],
    max_side: int | None,
    shifts: Shifts | Sequence[Shifts | None] | None = None,
) -> list[Tensor]:
    """Retarget a full-resolution uint8 source (3, H, W) to each exact (H, W) in ``sizes``, with
    optional top-corner ``shifts`` as :func:`retarget` takes them.

    The model works at the resolution it was trained at (``max_side``): each output is generated
    at its size scaled by working/source, then resized to the exact size asked, so the content of
    an output looks like the source would at that size. Returns uint8 tensors (3, H, W); a shaped
    output is black outside its frame (``retarget_mask`` of the exact size gives the frame).
    """
    work = working_image(to_model_input(source), max_side)  # (3, h, w) in [-1, 1]
    scale = work.shape[-1] / source.shape[-1]
    sizes = [check_size(s) for s in sizes]
    per_size = _per_size(shifts, len(sizes))
    gen_sizes = [(max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale))) for h, w in sizes]
    outs = []
    # Unmasked until the exact size: masking before the resize would bleed black into the edge.
    for (h, w), sh, y in zip(sizes, per_size, retarget(g, work, gen_sizes, per_size, masked=False), strict=True):
        if y.shape[-2:] != (h, w):
            y = torch.nn.functional.interpolate(y[None].float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        if sh is not None:
            y = torch.where(retarget_mask((h, w), sh).to(y.device), y, y.new_full((), -1.0))
        outs.append(to_uint8(y))
    return outs


@dataclass(frozen=True)
class EncodedOutput:
    """An output ready to store: ``stem.ext``, and for a shaped output in a format without alpha
    its frame as ``stem.mask.png`` (``images.MASK_EXT``)."""

    stem: str  # output_stem: size and shifts
    ext: str  # file extension of the format (``images.FORMATS``)
    data: bytes
    mask: bytes | None  # PNG of the frame (255 inside), only where the format has no alpha


def encode_output(image: Tensor, fmt: str, shifts: Shifts | None = None,
                  fill: tuple[int, int, int] = (255, 255, 255)) -> EncodedOutput:
    """A retargeted uint8 (3, H, W) output encoded as ``fmt`` (a name in ``images.FORMATS``). A
    shaped one is transparent outside its frame in a format with alpha; in one without, the
    outside is painted ``fill`` and the frame comes as a mask file of its own."""
    h, w = image.shape[-2:]
    f = image_format(fmt)
    mask = None if shifts is None else retarget_mask((h, w), shifts)
    data = encode(image, f.name, mask=mask, fill=fill)
    mask_png = encode_mask(mask) if mask is not None and not f.alpha else None
    return EncodedOutput(output_stem(w, h, shifts), f.ext, data, mask_png)
