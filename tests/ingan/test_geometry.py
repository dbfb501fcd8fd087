"""Tests for ingan.geometry: the homography, the single resize path and the validity mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ingan.geometry import homography, resize, sampling_grid, valid_mask, warp

pytestmark = pytest.mark.usefixtures("single_thread")


def _apply(matrix: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Map (..., 2) points (x, y) through a 3x3 homography."""
    h = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1) @ matrix.T
    return h[..., :2] / h[..., 2:3]


def _coordinate_ramp(hw: tuple[int, int]) -> torch.Tensor:
    """(1, 2, H, W) float64 image whose channels are each pixel centre's normalised (x, y)."""
    h, w = hw
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, dtype=torch.float64)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None]


def test_zero_shifts_give_the_identity() -> None:
    m = homography((0.0, 0.0))
    assert m.shape == (3, 3)
    torch.testing.assert_close(m, torch.eye(3, dtype=m.dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shifts", [(0.3, -0.3), (-0.2, 0.45), (0.1, 0.1)])
def test_homography_moves_only_the_top_corners(shifts: tuple[float, float]) -> None:
    m = homography(shifts)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor(
        [[-1.0 + shifts[0], -1.0], [1.0 + shifts[1], -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(_apply(m, corners), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [((5, 7), (13, 17)), ((8, 8), (31, 9)), ((6, 11), (12, 44)), ((3, 4), (64, 100))],
)
def test_warp_without_matrix_is_bilinear_interpolate(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    """The generator's single resize path equals interpolate(bilinear, align_corners=False)."""
    x = torch.randn(2, 4, *in_hw, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    got = warp(x, out_hw)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(resize(x, out_hw), got, atol=0, rtol=0)


def test_warp_to_the_same_size_is_the_identity() -> None:
    x = torch.randn(1, 3, 9, 14, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(warp(x, (9, 14)), x, atol=1e-5, rtol=0)


def test_warp_samples_where_the_inverse_homography_points() -> None:
    """Warping a coordinate ramp (exact under bilinear sampling) returns M^-1 applied to each
    output pixel centre: sampling walks from the output back to the source."""
    hw = (24, 32)
    m = homography((0.25, -0.15))
    ramp = _coordinate_ramp(hw)
    out = warp(ramp, hw, m)[0].permute(1, 2, 0)  # (H, W, 2): sampled (x, y)
    expected = _apply(torch.linalg.inv(m), _coordinate_ramp(hw)[0].permute(1, 2, 0))
    # Only where the source point lies within the pixel-centre hull (border padding clamps outside).
    h, w = hw
    inside = (expected[..., 0].abs() <= 1 - 1 / w) & (expected[..., 1].abs() <= 1 - 1 / h)
    assert inside.float().mean() > 0.7
    torch.testing.assert_close(out[inside], expected[inside], atol=1e-9, rtol=0)
    torch.testing.assert_close(sampling_grid(hw, m, torch.device("cpu")), expected, atol=1e-12, rtol=0)


def test_warp_with_homography_then_inverse_maps_points_back() -> None:
    hw = (64, 64)
    m = homography((0.3, -0.2))
    inv = torch.linalg.inv(m)
    ramp = _coordinate_ramp(hw)
    there = warp(ramp, hw, m)
    back = warp(there, hw, inv)
    # Pixels whose intermediate point stayed inside the frame on the way there and back.
    ok = valid_mask(hw, inv, torch.device("cpu"))
    ok &= warp(valid_mask(hw, m, torch.device("cpu")).double()[None, None], hw, inv)[0, 0] > 0.999
    assert ok.float().mean() > 0.6
    err = (back - ramp)[0].abs().amax(dim=0)  # (H, W)
    assert err[ok].max() < 0.02  # under a third of a pixel (2/64 normalised units per pixel)
    # The round trip is not trivially the identity: the intermediate image differs.
    assert (there - ramp).abs().max() > 0.1


def test_warp_keeps_batch_and_channels_and_dtype() -> None:
    x = torch.randn(3, 5, 10, 12)
    y = warp(x, (17, 9), homography((0.1, -0.1)))
    assert y.shape == (3, 5, 17, 9)
    assert y.dtype == x.dtype


def test_valid_mask_is_all_true_for_rectangular_outputs() -> None:
    for hw in [(8, 8), (13, 40), (64, 21)]:
        mask = valid_mask(hw, None, torch.device("cpu"))
        assert mask.shape == hw and mask.dtype == torch.bool and bool(mask.all())
        mask = valid_mask(hw, homography((0.0, 0.0)), torch.device("cpu"))
        assert bool(mask.all())


def test_valid_mask_cuts_the_top_corners_when_they_move_in() -> None:
    hw = (32, 48)
    mask = valid_mask(hw, homography((0.3, -0.3)), torch.device("cpu"))
    assert mask.shape == hw
    assert not mask[0, 0] and not mask[0, -1]  # top corners lie outside the narrowed frame
    assert bool(mask[-1].all())  # the bottom edge does not move
    assert bool(mask[:, hw[1] // 2].all())  # nor does the centre column
    assert (~mask).sum() > 10
    # Symmetric shifts give a left-right symmetric mask.
    assert torch.equal(mask, mask.flip(-1))
