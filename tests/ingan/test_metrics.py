"""Tests for ingan.metrics: completeness / coherence and the sliced Wasserstein distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ingan.metrics import (
    bidirectional_similarity,
    extract_patches,
    nearest_sq_distances,
    score,
    score_against_resize,
    sliced_wasserstein,
    stretch,
)

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
KEYS = ("completeness", "coherence", "swd")


def _load(name: str, size: tuple[int, int], mode: str = "RGB") -> torch.Tensor:
    """A small (C, H, W) float image in [0, 1]; ``size`` is (width, height) as PIL wants it."""
    img = Image.open(IMAGES / name).convert(mode).resize(size, Image.Resampling.BOX)
    arr = np.array(img, dtype=np.float32) / 255.0
    # (1, H, W) for grayscale, (3, H, W) for RGB
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


@pytest.fixture(scope="module")
def cat() -> torch.Tensor:
    return _load("chelsea.png", (96, 64))  # (3, 64, 96)


@pytest.fixture(scope="module")
def brick() -> torch.Tensor:
    return _load("brick.png", (64, 64), mode="RGB")  # (3, 64, 64), a regular natural texture


# ---------------------------------------------------------------------------------------------
# Identity, noise, determinism
# ---------------------------------------------------------------------------------------------


def test_identical_images_score_zero(cat: torch.Tensor) -> None:
    result = score(cat, cat.clone())
    assert set(result) == {*KEYS, "stretch"}
    assert result["stretch"] is None  # the same aspect: no stretch to tell
    for key in KEYS:
        assert isinstance(result[key], float)
        assert abs(result[key]) < 1e-6, (key, result[key])


def test_identical_grayscale_scores_zero_and_matches_rgb() -> None:
    gray = _load("brick.png", (48, 48), mode="L")  # (1, 48, 48)
    result = score(gray, gray)
    for key in KEYS:
        assert abs(result[key]) < 1e-6, (key, result[key])
    # Grayscale is repeated to 3 channels, so it must score exactly like its RGB replica.
    gen = torch.Generator().manual_seed(3)
    noisy = (gray + 0.1 * torch.rand(gray.shape, generator=gen)).clamp(0, 1)
    assert score(gray, noisy) == score(gray.expand(3, -1, -1), noisy.expand(3, -1, -1))


def test_subsampled_queries_still_find_exact_matches(cat: torch.Tensor) -> None:
    # Only the queries are subsampled; the searched set stays complete, so identity is still 0.
    result = bidirectional_similarity(cat, cat, max_patches=64)
    assert result["completeness"] < 1e-6
    assert result["coherence"] < 1e-6


def test_noise_scores_worse_than_identity_and_grows_with_amplitude(cat: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(cat.shape, generator=gen) - 0.5  # uniform in [-0.5, 0.5)
    mild = score(cat, (cat + 0.1 * noise).clamp(0, 1))
    strong = score(cat, (cat + 0.5 * noise).clamp(0, 1))
    for key in KEYS:
        assert mild[key] > 1e-4, (key, mild[key])
        assert strong[key] > mild[key], (key, mild[key], strong[key])


def test_deterministic(cat: torch.Tensor, brick: torch.Tensor) -> None:
    out = F.interpolate(brick[None], size=(64, 80), mode="bilinear", align_corners=False)[0]
    # max_patches small enough that every scale and level subsamples.
    first = score(brick, out, seed=5, max_patches=300)
    second = score(brick.clone(), out.clone(), seed=5, max_patches=300)
    assert first == second
    # The seed really drives the sampling and the SWD directions.
    assert score(brick, out, seed=6, max_patches=300)["swd"] != first["swd"]


def test_exhaustive_matches_large_budget(brick: torch.Tensor) -> None:
    out = brick.flip(-1)
    # max_patches above the patch count samples nothing away, so it equals the exact search.
    assert bidirectional_similarity(brick, out, max_patches=None) == pytest.approx(
        bidirectional_similarity(brick, out, max_patches=10**6), rel=1e-6
    )


# ---------------------------------------------------------------------------------------------
# The metrics measure what they claim to
# ---------------------------------------------------------------------------------------------


def test_horizontal_stretch_hurts_coherence(brick: torch.Tensor) -> None:
    src = brick[None]  # (1, 3, 64, 64)
    stretched = F.interpolate(src, size=(64, 128), mode="bilinear", align_corners=False)
    # A same-size copy with the content moved around: its patches exist in the source except
    # along the wrap-around seams.
    shifted = torch.roll(src, shifts=(17, 23), dims=(-2, -1))
    coh_self = bidirectional_similarity(src, src)["coherence"]
    coh_stretch = bidirectional_similarity(src, stretched)["coherence"]
    coh_shifted = bidirectional_similarity(src, shifted)["coherence"]
    assert coh_self < 1e-6
    assert coh_stretch > coh_self + 1e-4
    assert coh_stretch > coh_shifted


def test_half_crop_is_incomplete_but_coherent(cat: torch.Tensor) -> None:
    crop = cat[:, :, :48]  # left half: every patch exists in the source, half the content is gone
    full = bidirectional_similarity(cat, cat)
    half = bidirectional_similarity(cat, crop)
    assert half["completeness"] > full["completeness"] + 1e-4
    assert half["completeness"] > 10 * half["coherence"]
    # Crop aligned with the downscale grid: its patches are exact source patches at every scale.
    assert half["coherence"] < 1e-6


def test_swd_prefers_tiling_to_stretching(brick: torch.Tensor) -> None:
    src = brick[None]
    tiled = torch.cat([src, src], dim=-1)  # (1, 3, 64, 128): same patch distribution
    stretched = F.interpolate(src, size=(64, 128), mode="bilinear", align_corners=False)
    swd_tiled = sliced_wasserstein(src, tiled)
    swd_stretched = sliced_wasserstein(src, stretched)
    assert swd_stretched > 2 * swd_tiled
    assert swd_stretched > 0.05


def test_different_sizes_and_batch_dim(cat: torch.Tensor, brick: torch.Tensor) -> None:
    out = F.interpolate(
        cat[None], size=(40, 120), mode="bilinear", align_corners=False
    )  # (1, 3, 40, 120)
    result = score(cat, out)
    for key in KEYS:
        assert np.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # (1, 3, H, W) and (3, H, W) are the same input; inputs that require grad are fine too.
    assert score(cat[None], out) == score(cat, out[0])
    assert score(cat.clone().requires_grad_(), out.clone().requires_grad_()) == result
    # Small images (below the multi-scale and pyramid thresholds) still work: one scale, one level.
    small = brick[:, :10, :12]
    assert all(np.isfinite(v) for v in score(small, brick[:, 20:31, 5:14]).values())


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def test_extract_patches_layout() -> None:
    img = torch.arange(2 * 9 * 10, dtype=torch.float32).reshape(1, 2, 9, 10)
    patches = extract_patches(img, 3)
    assert patches.shape == (7 * 8, 2 * 9)
    # Row r*8 + c is the patch whose top-left corner is (r, c), flattened channel-major.
    assert torch.equal(patches[2 * 8 + 5], img[0, :, 2:5, 5:8].reshape(-1))


@pytest.mark.parametrize("chunk_floats", [50, 7, 1000, 1 << 21])
def test_tiled_nearest_matches_brute_force(chunk_floats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    queries = torch.rand(300, 27, generator=gen, dtype=torch.float64)  # (N, D)
    keys = torch.rand(500, 27, generator=gen, dtype=torch.float64)  # (M, D)
    queries[:5] = keys[100:105]  # some exact matches, which must come out as (almost) 0
    got = nearest_sq_distances(queries, keys, chunk_floats=chunk_floats)
    want = torch.cdist(queries, keys).pow(2).amin(dim=1)  # the full (N, M) matrix
    assert got.shape == (300,)
    assert not nearest_sq_distances(queries.requires_grad_(), keys).requires_grad  # no_grad
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(got[:5] < 1e-12)


def test_tiled_nearest_float32_many_tiles() -> None:
    gen = torch.Generator().manual_seed(2)
    queries = torch.rand(300, 147, generator=gen)
    keys = torch.rand(500, 147, generator=gen)
    got = nearest_sq_distances(queries, keys, chunk_floats=64 * 50)  # 64 x 50 tiles
    want = torch.cdist(queries.double(), keys.double()).pow(2).amin(dim=1).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(32, 32),  # no channel axis
        torch.rand(2, 3, 32, 32),  # a batch of two
        torch.rand(1, 1, 1, 3, 32, 32),  # rank 6
        torch.rand(2, 32, 32),  # two channels
        torch.rand(4, 32, 32),  # RGBA
        torch.rand(3, 5, 32),  # shorter than a patch
        torch.rand(3, 32, 6),  # narrower than a patch
        torch.zeros(3, 32, 32, dtype=torch.uint8),  # not float
        np.zeros((3, 32, 32), dtype=np.float32),  # not a tensor
    ],
)
def test_bad_inputs_raise(bad: object) -> None:
    good = torch.rand(3, 32, 32)
    with pytest.raises(ValueError):
        score(good, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        score(bad, good)  # type: ignore[arg-type]


def test_bad_parameters_raise() -> None:
    img = torch.rand(3, 32, 32)
    with pytest.raises(ValueError):
        score(img, img, max_patches=0)
    with pytest.raises(ValueError):
        sliced_wasserstein(img, img, n_directions=0)
    with pytest.raises(ValueError):
        nearest_sq_distances(torch.rand(4, 3), torch.rand(5, 2))
    with pytest.raises(ValueError):
        nearest_sq_distances(torch.rand(4, 3), torch.rand(5, 3), chunk_floats=0)


# ---------------------------------------------------------------------------------------------
# Verdict against a bicubic resize
# ---------------------------------------------------------------------------------------------


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def test_a_continued_texture_beats_its_stretch(brick: torch.Tensor) -> None:
    """Width x2 of a texture by continuing it (the source beside its mirror image: every patch
    is a source patch at its own size) must beat the resize, which stretches every brick."""
    src = _uint8(brick)  # (3, 64, 64)
    continued = torch.cat([src, src.flip(-1)], dim=-1)  # (3, 64, 128)
    result = score_against_resize(src, {(128, 64): continued})[(128, 64)]
    assert result["beats_resize"] is True
    assert result["completeness"] + result["coherence"] < result["resize_completeness"] + result["resize_coherence"]
    assert result["swd"] < result["resize_swd"]


def test_blurred_and_flat_outputs_lose_to_the_resize(cat: torch.Tensor) -> None:
    src = _uint8(cat)  # (3, 64, 96)
    stretched = F.interpolate(cat[None], size=(64, 192), mode="bilinear", align_corners=False)[0]
    blurred = _uint8(F.avg_pool2d(stretched[None], 5, stride=1, padding=2, count_include_pad=False)[0])
    flat = torch.full((3, 64, 192), 128, dtype=torch.uint8)
    result = score_against_resize(src, {(192, 64): blurred, (190, 64): flat})
    for size in ((192, 64), (190, 64)):
        assert result[size]["beats_resize"] is False, size
        assert result[size]["swd"] > result[size]["resize_swd"], size


def test_the_resize_itself_does_not_beat_the_resize(cat: torch.Tensor) -> None:
    from ingan.images import resize

    src = _uint8(cat)
    result = score_against_resize(src, {(150, 64): resize(src, (64, 150))})[(150, 64)]
    assert result["beats_resize"] is False  # equal scores: not better
    for key in ("completeness", "coherence", "swd"):
        assert result[key] == pytest.approx(result["resize_" + key])


# ---------------------------------------------------------------------------------------------
# Stretch: a resize is 1, objects at their own size 0
# ---------------------------------------------------------------------------------------------

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")


def _photo(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A committed photo as float (3, H, W) in [0, 1], at its own size or resized by PIL's
    bicubic filter to ``size`` (width, height): a resize from another library than the metric's."""
    with Image.open(IMAGES / name) as img:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255).permute(2, 0, 1)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_resize_stretches_fully_and_copies_or_a_crop_not_at_all(name: str) -> None:
    src = _photo(name)
    h, w = src.shape[-2:]
    assert stretch(src, _photo(name, (2 * w, h))) >= 0.95  # width x2: the resize
    assert stretch(src, _photo(name, (w // 2, h))) >= 0.95  # width x0.5
    assert stretch(src, _photo(name, (w, 2 * h))) >= 0.95  # twice the height
    assert stretch(src, torch.cat([src, src], -1)) <= 0.1  # width x2: the source twice, side by side
    assert stretch(src, src[..., w // 4: w // 4 + w // 2]) <= 0.1  # width x0.5: a centre crop


def test_half_the_way_is_half_a_stretch() -> None:
    """Width x4 as two copies, each resized to twice the width: every object is stretched by 2,
    which is 4 ** (1/2), the middle of the way from its own size to the resize's."""
    src = _photo("chelsea.png")
    h, w = src.shape[-2:]
    half = _photo("chelsea.png", (2 * w, h))
    assert stretch(src, torch.cat([half, half], -1)) == pytest.approx(0.5, abs=0.1)
    assert stretch(src, _photo("chelsea.png", (4 * w, h))) >= 0.95


def test_stretch_needs_an_aspect_change_and_reads_only_inside_a_frame(cat: torch.Tensor) -> None:
    assert stretch(cat, cat) is None
    assert stretch(cat, _uint8(cat).float().div(255)[..., :-2]) is None  # within 5% of the aspect
    flat = torch.full((3, 64, 96), 0.5)
    assert stretch(flat, cat.repeat(1, 1, 2)) is None  # a flat source: nothing tells the stretches apart
    # A frame holding only the left copy of two: still the source at its own size.
    twice = torch.cat([cat, F.interpolate(cat[None], size=(64, 96), mode="nearest")[0].flip(-2)], -1)
    mask = torch.zeros(64, 192, dtype=torch.bool)
    mask[:, :96] = True
    assert stretch(cat, twice, mask=mask) <= 0.1
    with pytest.raises(ValueError, match="steps"):
        stretch(cat, twice, steps=1)


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg"])
def test_the_verdict_keeps_objects_at_their_own_size_and_drops_stretches_and_breakage(name: str) -> None:
    """Width x2 of a committed photo: two copies side by side keep every object at its own size
    (kept); the same with strong noise or a blur (broken) and PIL's bicubic resize (a stretch,
    however sharp) are dropped."""
    src = (_photo(name) * 255).round().to(torch.uint8)
    h, w = src.shape[-2:]
    twice = torch.cat([src, src], -1)
    noisy = (twice.float() + 60 * torch.randn(twice.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    blurred = F.avg_pool2d(twice[None].float(), 9, 1, 4, count_include_pad=False)[0]
    resized = (_photo(name, (2 * w, h)) * 255).round()
    outs = {(2 * w, h): twice, (2 * w + 2, h): noisy.to(torch.uint8), (2 * w + 4, h): blurred.to(torch.uint8),
            (2 * w + 6, h): resized.to(torch.uint8)}
    verdicts = {size[0] - 2 * w: r["beats_resize"] for size, r in score_against_resize(src, outs).items()}
    assert verdicts == {0: True, 2: False, 4: False, 6: False}
