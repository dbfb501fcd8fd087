"""Shaped outputs (top corners shifted): exact sizes, the frame as a mask and as alpha, scoring
inside the frame only, and the limits on shifts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import image_mode_and_size, run_ingan, shrunk_photo

from ingan import images, metrics
from ingan.config import ModelConfig, TrainConfig
from ingan.geometry import homography, valid_mask
from ingan.networks import Generator
from ingan.retarget import (
    check_shifts,
    encode_output,
    output_stem,
    parse_shape,
    retarget_image,
    retarget_mask,
)

SHIFTS = (0.3, -0.45)


@pytest.fixture(scope="module")
def g() -> Generator:
    torch.manual_seed(0)
    return Generator(ModelConfig(g_channels=8, g_downsamples=2, g_res_blocks=1)).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    path = tmp_path_factory.mktemp("shapes") / "chelsea.png"
    shrunk_photo("chelsea.png", path, 40)
    return images.load(str(path))


def test_shaped_outputs_have_exact_sizes_and_are_black_outside_the_frame(g: Generator, source: torch.Tensor) -> None:
    sizes = [(40, 112), (23, 57), (40, 56)]
    shifts = [SHIFTS, (0.2, -0.1), None]
    outs = retarget_image(g, source, sizes, None, shifts)
    for (h, w), sh, out in zip(sizes, shifts, outs, strict=True):
        assert out.shape == (3, h, w) and out.dtype == torch.uint8
        if sh is None:
            continue
        mask = retarget_mask((h, w), sh)
        assert 0 < mask.sum() < h * w  # a real frame: some pixels in, some out
        assert (out[:, ~mask] == 0).all()
        assert out[:, mask].float().mean() > 20  # the inside holds the image, not the fill


def test_one_pair_of_shifts_serves_every_size(g: Generator, source: torch.Tensor) -> None:
    one = retarget_image(g, source, [(40, 80), (30, 30)], None, SHIFTS)
    each = retarget_image(g, source, [(40, 80), (30, 30)], None, [SHIFTS, SHIFTS])
    assert all(torch.equal(a, b) for a, b in zip(one, each, strict=True))


def test_the_mask_is_the_warped_frame() -> None:
    """The top edge of the frame runs from the shifted left corner to the shifted right one; the
    bottom row is whole."""
    h, w = 40, 100
    mask = retarget_mask((h, w), SHIFTS)
    assert mask[-1].all()
    top = mask[0].nonzero().flatten()
    # Corner x in normalised units -> pixel column: (x + 1) / 2 * w.
    left = (-1 + SHIFTS[0] + 1) / 2 * w
    right = (1 + SHIFTS[1] + 1) / 2 * w
    assert abs(top.min().item() - left) <= 1.5 and abs(top.max().item() + 1 - right) <= 1.5
    assert torch.equal(mask, valid_mask((h, w), homography(SHIFTS), torch.device("cpu")))


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_png_and_webp_carry_the_frame_as_alpha(fmt: str, g: Generator, source: torch.Tensor) -> None:
    out = retarget_image(g, source, [(40, 90)], None, SHIFTS)[0]
    enc = encode_output(out, fmt, SHIFTS)
    assert (enc.stem, enc.ext, enc.mask) == ("90x40_tl+0.3_tr-0.45", fmt, None)  # the alpha is the frame
    with Image.open(io.BytesIO(enc.data)) as im:
        assert im.mode == "RGBA" and im.size == (90, 40)
        alpha = torch.from_numpy(np.asarray(im.getchannel("A")).copy())
    mask = retarget_mask((40, 90), SHIFTS)
    assert torch.equal(alpha > 127, mask)
    assert set(alpha.unique().tolist()) <= {0, 255} and (alpha[~mask] == 0).all()


def test_jpeg_paints_the_fill_and_the_mask_file_holds_the_frame(g: Generator, source: torch.Tensor) -> None:
    out = retarget_image(g, source, [(40, 90)], None, SHIFTS)[0]
    mask = retarget_mask((40, 90), SHIFTS)
    enc = encode_output(out, "jpeg", SHIFTS, fill=(0, 255, 0))
    assert (enc.stem, enc.ext) == ("90x40_tl+0.3_tr-0.45", "jpg")
    with Image.open(io.BytesIO(enc.data)) as im:
        assert im.mode == "RGB"
        rgb = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()
    # Far from the edge (JPEG blurs it), the outside is the fill colour.
    far = ~torch.nn.functional.max_pool2d(mask[None, None].float(), 9, 1, 4)[0, 0].bool()
    assert far.any()
    assert (rgb[1, far] > 230).all() and (rgb[0, far] < 25).all() and (rgb[2, far] < 25).all()
    assert enc.mask is not None
    with Image.open(io.BytesIO(enc.mask)) as m:
        assert m.format == "PNG" and m.mode == "L"
        assert torch.equal(torch.from_numpy(np.asarray(m).copy()) == 255, mask)


@pytest.mark.parametrize(("fmt", "ext"), [("png", "png"), ("jpeg", "jpg"), ("jpg", "jpg"), ("WEBP", "webp")])
def test_a_rectangle_is_encoded_whole_without_a_mask(fmt: str, ext: str, g: Generator, source: torch.Tensor) -> None:
    out = retarget_image(g, source, [(40, 60)], None)[0]
    enc = encode_output(out, fmt)
    assert (enc.stem, enc.ext, enc.mask) == ("60x40", ext, None)
    with Image.open(io.BytesIO(enc.data)) as im:
        assert (im.mode, im.size) == ("RGB", (60, 40))
    assert torch.equal(images.decode(encode_output(out, "png").data), out)  # lossless: the output itself


def test_a_shaped_output_is_scored_inside_its_frame_only(source: torch.Tensor) -> None:
    """The fill outside the frame changes nothing; the inside does."""
    h, w = 40, 90
    mask = retarget_mask((h, w), SHIFTS)
    base = images.shaped_resize(source, (h, w), SHIFTS)
    white = base.clone()
    white[:, ~mask] = 255
    key = (w, h, SHIFTS)
    a = metrics.score_outputs(source, {key: base})[key]
    b = metrics.score_outputs(source, {key: white})[key]
    assert a == b
    noisy = base.clone()
    noisy[:, mask] = (torch.rand(3, int(mask.sum())) * 255).to(torch.uint8)
    c = metrics.score_outputs(source, {key: noisy})[key]
    assert c["coherence"] > 2 * a["coherence"] and c["swd"] > a["swd"]
    # Without the frame the black outside would count against the output.
    rect = metrics.score_outputs(source, {(w, h): base})[(w, h)]
    assert rect != a


def test_a_shaped_output_is_judged_against_a_resize_in_the_same_frame(source: torch.Tensor) -> None:
    h, w = 40, 90
    plain = images.shaped_resize(source, (h, w), SHIFTS)
    mask = retarget_mask((h, w), SHIFTS)
    assert (plain[:, ~mask] == 0).all() and plain[:, mask].float().mean() > 20
    key = (w, h, SHIFTS)
    # The plain warp itself ties with its baseline: it cannot beat it.
    scored = metrics.score_against_resize(source, {key: plain})[key]
    assert scored["completeness"] == scored["resize_completeness"] and scored["beats_resize"] is False


@pytest.mark.parametrize("bad", [(0.95, 0.0), (0.0, -1.0), (float("nan"), 0.0), (0.1,), (0.1, 0.2, 0.3), ("a", 0)])
def test_bad_shifts_are_refused(bad: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="shift"):
        check_shifts(bad)


def test_shapes_have_one_spelling() -> None:
    assert parse_shape("256x128@0.30000001,-0.3") == ("256x128", (0.3, -0.3))
    assert parse_shape("2@0,-0.0") == ("2", None)
    assert parse_shape("2") == ("2", None)
    assert output_stem(256, 128, (0.3, -0.3)) == "256x128_tl+0.3_tr-0.3"
    assert output_stem(256, 128, None) == "256x128"


def test_training_shift_range_is_bounded() -> None:
    assert TrainConfig(max_shift=0.9).max_shift == 0.9
    for bad in (-0.1, 0.95):
        with pytest.raises(ValueError, match="max_shift"):
            TrainConfig(max_shift=bad)


def test_training_with_shifts_samples_homographies() -> None:
    from ingan.train import Trainer

    image = torch.rand(3, 40, 48) * 2 - 1
    cfg = TrainConfig(iterations=100, crop_size=32, max_shift=0.4, curriculum_end=0.0)
    t = Trainer([image], ModelConfig(g_channels=8, g_downsamples=2, g_res_blocks=1, d_channels=8), cfg, "cpu")
    t.iteration = 50  # past the curriculum: the full shift range
    matrices = [t.sample_target()[1] for _ in range(20)]
    assert all(m is not None for m in matrices)
    shifts = torch.stack([m[0, 0] for m in matrices])  # varies with the shifts
    assert shifts.std() > 0


def test_cli_writes_a_transparent_png_and_a_jpeg_with_its_mask(tmp_path: Path, source: torch.Tensor) -> None:
    image = tmp_path / "src.png"
    images.to_pil(source).save(image)
    model = tmp_path / "m.pt"
    run_ingan("train", str(image), "--preset", "tiny", "--iterations", "2", "--max-shift", "0.3", "--quiet", "--out", str(model),
              ok=True)
    out = tmp_path / "out"
    shaped = "90x40_tl+0.3_tr-0.45"
    proc = run_ingan("retarget", str(model), str(image), "--size", "90x40@0.3,-0.45", "--size", "60x40", "--out-dir", str(out),
                     ok=True)
    assert proc.stdout.split() == [str(out / f"{shaped}.png"), str(out / "60x40.png")]
    with Image.open(out / f"{shaped}.png") as im:
        alpha = torch.from_numpy(np.asarray(im.getchannel("A")).copy())
    assert torch.equal(alpha == 255, retarget_mask((40, 90), SHIFTS))
    assert image_mode_and_size(out / "60x40.png") == ("RGB", (60, 40))
    proc = run_ingan("retarget", str(model), str(image), "--size", "90x40@0.3,-0.45", "--format", "jpeg", "--out-dir", str(out),
                     ok=True)
    assert proc.stdout.split() == [str(out / f"{shaped}.jpg"), str(out / f"{shaped}.mask.png")]
    assert image_mode_and_size(out / f"{shaped}.mask.png") == ("L", (90, 40))
    proc = run_ingan("retarget", str(model), str(image), "--size", "90x40@0.3,-1.2", "--out-dir", str(tmp_path / "none"))
    assert proc.returncode == 2 and "shift" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_a_frame_too_small_to_hold_a_patch_is_left_unscored(source: torch.Tensor) -> None:
    """An 8x8 output with its top edge pulled in holds no whole 7x7 patch: it is left out of the
    scores (the pipeline records it unscored) instead of failing its image."""
    tiny = (8, 8, (0.6, -0.6))
    big = (90, 40, SHIFTS)
    outs = {tiny: images.shaped_resize(source, (8, 8), tiny[2]), big: images.shaped_resize(source, (40, 90), SHIFTS)}
    scored = metrics.score_against_resize(source, outs)
    assert tiny not in scored and big in scored
    with pytest.raises(metrics.FrameTooSmall):
        metrics.score(outs[tiny].float() / 255, outs[tiny].float() / 255, mask=retarget_mask((8, 8), tiny[2]))
