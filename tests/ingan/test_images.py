"""Tests for ingan.images: every odd input decodes to uint8 RGB (3, H, W) or fails with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from support import image_bytes

from ingan.images import FORMATS, ImageDecodeError, decode, encode, image_format, load, to_uint8

pytestmark = pytest.mark.usefixtures("single_thread")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _assert_rgb(t: torch.Tensor, h: int, w: int) -> None:
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (3, h, w)
    assert t.is_contiguous()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed)."""
    data = bytearray(image_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# -- failures ------------------------------------------------------------------------------------


def test_zero_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode(b"")


@pytest.mark.parametrize(
    "data",
    [b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
     b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
     b'{"error": "not an image"}',
     b"just some plain text, definitely not an image\n" * 3],
)
def test_text_and_html(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match=r"not a recognised image format \(looks like text/HTML\)"):
        decode(data)


def test_binary_junk() -> None:
    junk = bytes(range(128, 256)) * 8
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode(junk)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = image_bytes(_noise(64, 48), fmt)
    decode(data)  # the whole file is fine
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            decode(data[:cut])


def test_header_only_png_is_an_error() -> None:
    data = image_bytes(_noise(16, 16), "PNG")
    with pytest.raises(ImageDecodeError):
        decode(data[:40])  # signature + IHDR, no pixel data


@pytest.mark.parametrize("wh", [(100_000, 100_000), (20_000, 20_000)])
def test_png_declaring_a_huge_size_is_a_bomb(wh: tuple[int, int]) -> None:
    data = _png_declaring(*wh)
    with Image.open(io.BytesIO(_png_declaring(5, 7))) as im:  # the patching itself is sound
        assert im.size == (5, 7)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode(data)


def test_declared_size_over_our_own_limit() -> None:
    # Below Pillow's own bomb threshold (about 179M pixels), above our default (64M).
    with pytest.raises(ImageDecodeError, match=r"declared size 9000x9000 .* exceeds the 64,000,000-pixel limit"):
        decode(_png_declaring(9000, 9000))


def test_small_max_pixels_rejects_a_large_flat_image() -> None:
    data = image_bytes(Image.new("L", (1200, 1000), 77), "PNG")  # mostly constant: a few KB
    assert len(data) < 20_000
    with pytest.raises(ImageDecodeError, match="exceeds the 100,000-pixel limit"):
        decode(data, max_pixels=100_000)
    _assert_rgb(decode(data, max_pixels=1_200_000), 1000, 1200)


def test_load_of_a_missing_file(tmp_path: object) -> None:
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load(str(tmp_path) + "/does-not-exist.png")


# -- odd but valid inputs --------------------------------------------------------------------------


def test_rgb_png_decodes_exactly() -> None:
    im = _noise(23, 17)
    t = decode(image_bytes(im, "PNG"))
    _assert_rgb(t, 17, 23)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(im))


def test_grayscale() -> None:
    arr = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    t = decode(image_bytes(Image.fromarray(arr, "L"), "PNG"))
    _assert_rgb(t, 12, 20)
    for c in range(3):
        assert np.array_equal(t[c].numpy(), arr)


@pytest.mark.parametrize(("mode", "opaque", "clear"), [
    ("LA", (40, 255), [(40, 0)]),
    ("RGBA", (10, 20, 30, 255), [(0, 0, 0, 0), (200, 0, 0, 0)]),  # transparent black and red
])
def test_alpha_is_composited_over_white(mode: str, opaque: tuple[int, ...], clear: list[tuple[int, ...]]) -> None:
    """Fully transparent pixels turn white whatever their colour, half-transparent black turns
    mid grey, opaque ones keep theirs."""
    half_black = (0,) * (len(opaque) - 1) + (128,)
    im = Image.new(mode, (6, 4), opaque)
    for x, value in enumerate([*clear, half_black]):
        im.putpixel((x, 0), value)
    t = decode(image_bytes(im, "PNG"))
    _assert_rgb(t, 4, 6)
    for x in range(len(clear)):
        assert t[:, 0, x].tolist() == [255, 255, 255], x
    assert all(abs(v - 127) <= 1 for v in t[:, 0, len(clear)].tolist())
    colour = list(opaque[:-1]) * (3 if mode == "LA" else 1)
    assert t[:, 3, 5].tolist() == colour


def test_palette_and_palette_transparency() -> None:
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putpixel((1, 0), 1)
    im.putpixel((2, 0), 2)
    t = decode(image_bytes(im, "PNG"))
    _assert_rgb(t, 2, 4)
    assert t[:, 0, 0].tolist() == [255, 0, 0]
    assert t[:, 0, 1].tolist() == [0, 255, 0]
    assert t[:, 0, 2].tolist() == [0, 0, 255]
    # Index 2 marked transparent: its pixels become white.
    t = decode(image_bytes(im, "PNG", transparency=2))
    assert t[:, 0, 2].tolist() == [255, 255, 255]
    assert t[:, 0, 0].tolist() == [255, 0, 0]


def test_cmyk_jpeg() -> None:
    im = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    im.paste((0, 0, 0, 255), (8, 0, 16, 8))  # full black ink on the right
    t = decode(image_bytes(im, "JPEG", quality=95))
    _assert_rgb(t, 8, 16)
    assert t[:, :, :6].min() > 240
    assert t[:, :, 10:].max() < 15


def test_16_bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)  # (3, 4)
    data = image_bytes(Image.fromarray(arr), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    t = decode(data)
    _assert_rgb(t, 3, 4)
    row = t[0, 0].tolist()
    assert row[0] == 0
    assert row[1] in (3, 4)  # 1000 / 65535 * 255 = 3.9: scaled, not clipped to 255
    assert abs(row[2] - 128) <= 1
    assert row[3] == 255
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_dark_16_bit_png_stays_dark() -> None:
    arr = np.full((4, 4), 200, dtype=np.uint16)  # 200 of 65535: nearly black
    t = decode(image_bytes(Image.fromarray(arr), "PNG"))
    assert t.max() <= 1


def test_exif_rotated_jpeg_is_transposed() -> None:
    im = Image.new("RGB", (40, 20), (230, 10, 10))  # stored left half red
    im.paste((10, 10, 230), (20, 0, 40, 20))  # stored right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    t = decode(image_bytes(im, "JPEG", exif=exif.tobytes(), quality=95))
    _assert_rgb(t, 40, 20)  # width and height swap
    top, bottom = t[:, :15].float().mean(dim=(1, 2)), t[:, -15:].float().mean(dim=(1, 2))
    assert top[0] > 180 and top[2] < 60  # the stored left (red) is the displayed top
    assert bottom[2] > 180 and bottom[0] < 60


def _decode_frames(frames: list[Image.Image], fmt: str, **opts: object) -> torch.Tensor:
    """``frames`` saved as one file of format ``fmt`` (checked to hold them all), decoded."""
    data = image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **opts)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == len(frames)
    return decode(data)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    t = _decode_frames(frames, "GIF", duration=50, loop=0)
    _assert_rgb(t, 12, 16)
    assert t[0].min() > 240 and t[1].max() < 15 and t[2].max() < 15


def test_multi_page_tiff_gives_its_first_page() -> None:
    t = _decode_frames([Image.new("RGB", (20, 10), (0, 200, 0)), Image.new("RGB", (30, 30), (200, 0, 0))], "TIFF")
    _assert_rgb(t, 10, 20)
    assert t[:, 0, 0].tolist() == [0, 200, 0]


def test_float_tiff_in_8_bit_range() -> None:
    arr = np.linspace(0.0, 255.0, 16, dtype=np.float32).reshape(4, 4)
    t = decode(image_bytes(Image.fromarray(arr, "F"), "TIFF"))
    _assert_rgb(t, 4, 4)
    expected = torch.from_numpy(np.floor(arr + 0.5).astype(np.uint8))
    assert (t[0].int() - expected.int()).abs().max() <= 1
    assert torch.equal(t[0], t[1])


def test_float_tiff_in_unit_range_keeps_its_tones() -> None:
    """Float images from most tools hold [0, 1]: mid-grey 0.5 must decode as 128, not black."""
    arr = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    arr[0, 0] = np.nan  # a missing sample is black, not an error
    t = decode(image_bytes(Image.fromarray(arr, "F"), "TIFF"))
    _assert_rgb(t, 4, 4)
    expected = np.floor(np.nan_to_num(arr) * 255 + 0.5).astype(np.uint8)
    assert (t[0].int() - torch.from_numpy(expected).int()).abs().max() <= 1
    assert int(t[0, 3, 3]) == 255 and int(t[0, 0, 0]) == 0
    assert torch.equal(t[0], t[2])


# -- encoding ------------------------------------------------------------------------------------


def test_png_encode_round_trips_exactly() -> None:
    x = torch.randint(0, 256, (3, 17, 29), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = encode(x, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(decode(data), x)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (29, 17) and im.mode == "RGB"


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "webp"])
def test_lossy_encode_keeps_size_and_content(fmt: str) -> None:
    # A smooth image, so lossy coding stays close.
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(40), indexing="ij")
    x = torch.stack([xx * 6, yy * 10, 255 - xx * 6]).clamp(0, 255).to(torch.uint8)
    y = decode(encode(x, fmt))
    _assert_rgb(y, 24, 40)
    assert (y.float() - x.float()).abs().mean() < 6


def test_a_format_is_found_by_its_name_or_an_alias_in_any_case() -> None:
    for f in FORMATS.values():
        for name in (f.name, *f.aliases):
            assert image_format(name) is image_format(name.upper()) is f
    assert image_format("jpg").ext == "jpg" and not image_format("jpg").alpha
    with pytest.raises(ValueError, match="unknown image format 'gif'; choose one of: png, jpeg, webp"):
        encode(torch.zeros(3, 4, 4, dtype=torch.uint8), "gif")


def test_to_uint8_maps_the_model_range() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5).expand(3, 1, 5)
    y = to_uint8(x)
    assert y.dtype == torch.uint8
    assert y[0, 0].tolist() == [0, 0, 128, 255, 255]
