"""Decoding image bytes into the RGB tensors the model trains on, and encoding outputs.

Every odd input is normalised here, once, for the CLI and the pipeline alike: EXIF orientation is
applied, multi-frame files (GIF, TIFF) give their first frame, alpha is composited over white,
16-bit and float images are scaled to 8 bits, palette/CMYK/grayscale become RGB.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .geometry import homography, valid_mask, warp

DEFAULT_MAX_PIXELS = 64_000_000  # a 8000x8000 photo; beyond that a declared size is a bomb
# The shortest side a working image keeps when a long-side cap shrinks it: the trainer's crops
# need at least min_out_side + 1 = 17 px (a 2000x30 strip capped at 96 px would be 1 px high).
MIN_WORKING_SIDE = 17

# Pillow's own bomb guard is process-wide and fixed (~179 MP); ``decode`` checks the declared size
# against the caller's ``max_pixels`` before any pixel is decoded, so that limit is the one in force.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Bytes of any Pillow-readable image -> uint8 tensor (3, H, W)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"declared size {w}x{h} ({w * h:,} pixels) exceeds the {max_pixels:,}-pixel limit (decompression bomb?)")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        head = data[:16].lstrip().lower()
        hint = " (looks like text/HTML)" if head.startswith((b"<", b"{")) or data[:64].isascii() else ""
        raise ImageDecodeError(f"not a recognised image format{hint}") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    return from_pil(im)


def from_pil(im: Image.Image) -> Tensor:
    """Any Pillow image -> uint8 (3, H, W) RGB, normalised as :func:`decode` describes."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode.startswith("I;16") or arr.max() > 255:
            top = 65535.0
        elif im.mode == "F" and arr.max() <= 1.0:
            top = 1.0  # float data in [0, 1] (float32 TIFF from most tools), not 0-255
        else:
            top = 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    rgb = im.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8).copy()  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


def load(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode a local image file (used by the CLI)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode(data, max_pixels)


def to_uint8(x: Tensor) -> Tensor:
    """Model output (3, H, W) in [-1, 1] -> uint8 (3, H, W)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True)
class ImageFormat:
    """An output format: how its files are named and written."""

    name: str  # as a user gives it (config, command line)
    ext: str  # file extension
    pillow: str  # Pillow's encoder
    alpha: bool  # keeps a shaped output's frame as alpha; without, the frame is a mask file beside it
    options: Mapping[str, Any] = field(default_factory=dict)  # Pillow encoder options
    quality: int | None = None  # default quality of a lossy format; None: the encoder takes none
    alpha_options: Mapping[str, Any] = field(default_factory=dict)  # further options when alpha is written
    aliases: tuple[str, ...] = ()

    @property
    def mime(self) -> str:
        return f"image/{self.name}"


FORMATS: dict[str, ImageFormat] = {f.name: f for f in (
    ImageFormat("png", "png", "PNG", alpha=True, options={"optimize": False}),
    ImageFormat("jpeg", "jpg", "JPEG", alpha=False, quality=92, aliases=("jpg",)),
    # Transparent pixels' colours are not kept: smaller files.
    ImageFormat("webp", "webp", "WEBP", alpha=True, quality=92, alpha_options={"exact": False}),
)}
FORMAT_NAMES = tuple(FORMATS)
DEFAULT_FORMAT = "png"
MASK_EXT = "mask.png"  # a frame's file (encode_mask) beside an output without alpha
_BY_NAME = {n: f for f in FORMATS.values() for n in (f.name, *f.aliases)}


def image_format(name: str) -> ImageFormat:
    """The format called ``name`` or one of its aliases, in any case; ``ValueError`` otherwise."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown image format {name!r}; choose one of: {', '.join(FORMAT_NAMES)}") from None


def encode(image: Tensor, fmt: str = DEFAULT_FORMAT, quality: int | None = None, mask: Tensor | None = None,
           fill: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    """uint8 (3, H, W) -> encoded bytes in ``fmt`` (a name in ``FORMATS``); ``quality`` overrides
    a lossy format's own.

    ``mask`` (H, W) bool marks the pixels that belong to the image (a shaped output's frame): a
    format with alpha gets it as its alpha channel, transparent outside; one without has the
    pixels outside painted ``fill`` (the mask goes in a file of its own: :func:`encode_mask`).
    """
    f = image_format(fmt)
    opts = dict(f.options)
    if f.quality is not None:
        opts["quality"] = f.quality if quality is None else quality
    im = to_pil(image)
    if mask is not None:
        alpha = Image.fromarray(mask.to(torch.uint8).mul(255).cpu().numpy(), "L")
        if f.alpha:
            im.putalpha(alpha)
            opts.update(f.alpha_options)
        else:
            im = Image.composite(im, Image.new("RGB", im.size, fill), alpha)
    buf = io.BytesIO()
    im.save(buf, format=f.pillow, **opts)
    return buf.getvalue()


def encode_mask(mask: Tensor) -> bytes:
    """(H, W) bool -> a one-channel PNG, 255 inside the frame and 0 outside."""
    buf = io.BytesIO()
    Image.fromarray(mask.to(torch.uint8).mul(255).cpu().numpy(), "L").save(buf, format="PNG")
    return buf.getvalue()


def to_pil(image: Tensor) -> Image.Image:
    """uint8 (3, H, W) -> an RGB Pillow image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def thumbnail(im: Image.Image, max_side: int, quality: int = 85) -> tuple[bytes, str]:
    """(bytes, MIME type) of ``im`` shrunk to fit ``max_side`` x ``max_side``: a JPEG, or a PNG
    when ``im`` has transparency, so a shaped output keeps its frame in a preview."""
    if not has_alpha(im):
        return thumbnail_jpeg(im, max_side, quality), "image/jpeg"
    im = im.convert("RGBA")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), "image/png"


def thumbnail_jpeg(im: Image.Image, max_side: int, quality: int = 85) -> bytes:
    """A JPEG of ``im`` shrunk to fit ``max_side`` x ``max_side`` (never enlarged): previews and
    the report's contact-sheet thumbnails. A JPEG opened for this decodes at reduced scale."""
    im.draft("RGB", (max_side, max_side))
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, h, w) for ``size`` = (h, w): antialiased bicubic, the plain
    resize that a retargeted output is judged against."""
    y = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


def shaped_resize(image: Tensor, size: tuple[int, int], shifts: tuple[float, float] | None) -> Tensor:
    """:func:`resize`, then put through the top-corner homography of ``shifts`` at that size,
    black outside the frame: the plain warp a shaped output is judged against. None: a resize."""
    y = resize(image, size)
    if shifts is None:
        return y
    matrix = homography(shifts)
    warped = warp(y[None].float(), size, matrix)[0]
    warped = torch.where(valid_mask(size, matrix, warped.device), warped, warped.new_zeros(()))
    return warped.round().clamp(0, 255).to(torch.uint8)


# -- the model's view of an image ------------------------------------------------------------------


def to_model_input(image: Tensor) -> Tensor:
    """uint8 or [0, 1] float (3, H, W) -> float in [-1, 1]."""
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image * 2 - 1


def working_resolution(hw: tuple[int, int], max_side: int | None, min_side: int = MIN_WORKING_SIDE) -> tuple[int, int]:
    """The (H, W) the model trains and retargets at for a source of size ``hw``: the longer side
    capped at ``max_side``, but never so far that the shorter side drops under ``min_side`` (the
    cap is raised for long, narrow images), and never upscaled."""
    h, w = hw
    if max_side is None or max(h, w) <= max_side:
        return h, w
    need = min(min_side, h, w)
    cap = max(max_side, math.ceil(max(h, w) * need / min(h, w)))
    if cap >= max(h, w):
        return h, w
    s = cap / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def working_image(image: Tensor, max_side: int | None) -> Tensor:
    """Downscale (3, H, W) to ``working_resolution`` (never upscale)."""
    size = working_resolution((image.shape[-2], image.shape[-1]), max_side)
    if size == tuple(image.shape[-2:]):
        return image
    # Antialiased area-like downscale for the model's input; the generator's own resize path
    # (geometry.warp) is for feature maps, not for preparing input images.
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
