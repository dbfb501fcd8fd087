"""Retargeting: one forward pass per output size from a trained generator.

The entry features of the input are computed once and shared by every requested size, so a batch
of sizes costs one entry conv plus one decode each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from .geometry import homography, valid_mask
from .images import to_model_input, to_uint8, working_image
from .networks import Generator

MIN_SIDE = 8
MAX_SIDE = 16384
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


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
    shifts: tuple[float, float] | None = None,
) -> list[Tensor]:
    """Outputs of exactly each (H, W) in ``sizes`` for ``image`` (3, H, W) in [-1, 1].

    Returns float tensors (3, H, W) in [-1, 1]. With ``shifts`` (top-corner shifts, normalised
    units) the output is non-rectangular: pixels outside the warped frame are set to -1 (black);
    ``retarget_mask`` gives the mask.
    """
    if g.training:
        raise RuntimeError("retarget needs the generator in eval mode (call .eval())")
    sizes = [check_size(s) for s in sizes]
    param = next(g.parameters())
    x = image.to(device=param.device, dtype=param.dtype)[None]  # (1, 3, H, W)
    x = x.contiguous(memory_format=torch.channels_last)
    feats = g.features(x)  # (1, C, H, W), shared by every size
    matrix = None if shifts is None else homography(shifts)
    outs = []
    for hw in sizes:
        y = g.decode(feats, hw, matrix, x)[0]  # (3, h, w)
        if matrix is not None:
            y = torch.where(valid_mask(hw, matrix, y.device), y, y.new_full((), -1.0))
        outs.append(y.contiguous())
    return outs


def retarget_mask(hw: tuple[int, int], shifts: tuple[float, float]) -> Tensor:
    """(H, W) bool mask of the pixels inside the warped frame for a non-rectangular output."""
    return valid_mask(check_size(hw), homography(shifts), torch.device("cpu"))


def retarget_image(
    g: Generator,
    source: Tensor,
    sizes: Sequence[tuple[int, int]],
    max_side: int | None,
) -> list[Tensor]:
    """Retarget a full-resolution uint8 source (3, H, W) to each exact (H, W) in ``sizes``.

    The model works at the resolution it was trained at (``max_side``): each output is generated
    at its size scaled by working/source, then resized to the exact size asked, so the content of
    an output looks like the source would at that size. Returns uint8 tensors (3, H, W).
    """
    work = working_image(to_model_input(source), max_side)  # (3, h, w) in [-1, 1]
    scale = work.shape[-1] / source.shape[-1]
    sizes = [check_size(s) for s in sizes]
    gen_sizes = [(max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale))) for h, w in sizes]
    outs = []
    for (h, w), y in zip(sizes, retarget(g, work, gen_sizes), strict=True):
        if y.shape[-2:] != (h, w):
            y = torch.nn.functional.interpolate(y[None].float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        outs.append(to_uint8(y))
    return outs
