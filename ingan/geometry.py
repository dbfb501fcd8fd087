"""The geometric transform: the only place the output shape enters the generator.

One sampling path serves training and inference alike: ``grid_sample`` (bilinear, border padding,
``align_corners=False``) onto a grid of the output size. With no homography that grid is exactly a
bilinear resize, so the shapes seen in training and asked for at test time go through the same
arithmetic (the reference used ``align_corners=True`` in training and ``interpolate`` at test time).

Coordinates are normalised to [-1, 1] per axis, ``(x, y)`` order as ``grid_sample`` expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Top-corner shifts are in normalised units (2 = the frame's width). Past 0.9 a corner pair can
# leave a top edge a tenth of the width or less, where no patch of the source fits.
MAX_SHIFT = 0.9

_SQUARE = ((-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0))  # TL, TR, BL, BR


def homography(shifts: tuple[float, float] | Tensor) -> Tensor:
    """The 3x3 map from the source frame to the output frame whose top corners move right by
    ``shifts[0]`` (left corner) and ``shifts[1]`` (right corner); zero shifts give the identity."""
    s0, s1 = (float(s) for s in shifts)
    dst = ((-1.0 + s0, -1.0), (1.0 + s1, -1.0), (-1.0, 1.0), (1.0, 1.0))
    rows, rhs = [], []
    # Direct linear transform with h33 = 1: two equations per corner correspondence.
    for (x, y), (u, v) in zip(_SQUARE, dst, strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs += [u, v]
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(rhs, dtype=torch.float64)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, h.new_ones(1)]).reshape(3, 3)


def _base_grid(out_hw: tuple[int, int], device: torch.device) -> Tensor:
    """Pixel-centre coordinates of an (H, W) output in normalised units, (H, W, 2) as (x, y)."""
    h, w = out_hw
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device, dtype=torch.float64)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)  # (H, W, 2)


def sampling_grid(out_hw: tuple[int, int], matrix: Tensor | None, device: torch.device) -> Tensor:
    """Where each output pixel samples the source: (H, W, 2). ``matrix`` maps source to output
    coordinates; we invert it because sampling walks from output pixels back to the source."""
    grid = _base_grid(out_hw, device)
    if matrix is None:
        return grid
    inv = torch.linalg.inv(matrix.to(device=device, dtype=torch.float64))
    pts = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1) @ inv.T  # (H, W, 3)
    return pts[..., :2] / pts[..., 2:3]


def warp(x: Tensor, out_hw: tuple[int, int], matrix: Tensor | None = None) -> Tensor:
    """Resample feature maps ``x`` (B, C, H, W) onto an ``out_hw`` grid, optionally through a
    homography. This is the single resize path of the generator."""
    grid = sampling_grid(out_hw, matrix, x.device).to(x.dtype)
    grid = grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def valid_mask(out_hw: tuple[int, int], matrix: Tensor | None, device: torch.device) -> Tensor:
    """(H, W) bool: output pixels whose source point lies inside the source frame. All true for
    rectangular outputs; for shifted corners the area outside the warped frame is False."""
    grid = sampling_grid(out_hw, matrix, device)
    return (grid.abs() <= 1.0).all(dim=-1)


def resize(x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Bilinear resize through the same path as the generator's transform."""
    return warp(x, out_hw, None)
