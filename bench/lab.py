"""Experiments on the training, kept out of the library: options that were measured and not
shipped live on here, as extra loss terms (``ingan.losses.Term``) handed to the trainer, so they
can be run again.

    python -m bench.quality --presets cpu --set tone_weight=1 --label tone1
    python -m bench.curves --preset cpu --set stretch_negative=2 --label stretch2

``--set`` sends a name of ``LabConfig`` here, ``model.FIELD`` to the ModelConfig and any other
name to the TrainConfig (``bench.common.parse_overrides``). docs/experiments.md has what each
option did.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ingan import losses
from ingan.bundle import per_image_mean
from ingan.geometry import warp
from ingan.losses import Term, Views

# Outputs within this factor of the crop's size on both axes get no stretched fake: a resize
# that small is close to the real crop, and D would be taught to call nearly real patches fake.
STRETCH_FREE = 1.2


@dataclass(frozen=True)
class LabConfig:
    """The lab's options, each a weight that is off at 0.

    ``tone_weight``: an L1 loss between the per-channel mean and standard deviation of G's output
    and of its input crop: a retargeted crop keeps its colours.
    ``stretch_negative``: a second fake for D, the real crop put through the iteration's geometric
    transform (a plain resize), so D learns that a stretch is not a retargeting; skipped for
    unshifted outputs within STRETCH_FREE of the crop's size on both axes.
    ``patch_weight``: a bidirectional patch distance between G's output and its input crop, both
    brought down by ``patch_scale`` (where a 7x7 patch spans an object): each output patch to its
    nearest crop patch (coherence) and each crop patch to its nearest output patch
    (completeness). A stretch has patches the crop does not hold, so G is told so directly rather
    than through what D learns."""

    tone_weight: float = 0.0
    stretch_negative: float = 0.0
    patch_weight: float = 0.0
    patch_scale: float = 4.0  # a downscale factor, not a weight

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"{f.name} {value} must be a finite number >= 0")

    @property
    def is_plain(self) -> bool:
        return self == LabConfig()


def tone_loss(output: Tensor, source: Tensor, k: int = 1) -> Tensor:
    """(K,): per image, the L1 distance between the per-channel mean and standard deviation of
    ``output`` and of ``source`` (each (1, 3K, H, W), any sizes). The cycle loss lets tone drift:
    any invertible change of colour passes it."""
    o, s = output.float().flatten(2), source.float().flatten(2)  # (1, 3K, H*W)
    gap = (o.mean(-1) - s.mean(-1)).abs() + (o.std(-1) - s.std(-1)).abs()  # (1, 3K)
    return per_image_mean(gap[..., None, None], k)


def patch_distance(output: Tensor, source: Tensor, n: int, scale: float, patch: int = 7) -> Tensor:
    """(n,): per image, the mean squared difference per element from each patch of ``output`` to
    its nearest patch of ``source`` plus the same from each source patch to its nearest output
    patch, both images (1, 3n, H, W) brought down by ``scale`` first. Differentiable in
    ``output`` through each nearest pair."""
    values = []
    for k in range(n):
        pair = []
        for img in (output[:, 3 * k:3 * k + 3], source[:, 3 * k:3 * k + 3]):
            img = img.float()
            size = (max(patch, round(img.shape[-2] / scale)), max(patch, round(img.shape[-1] / scale)))
            pair.append(F.unfold(F.interpolate(img, size=size, mode="area"), patch)[0].T)  # (N, 3 * patch**2)
        q, p = pair
        d = torch.cdist(q, p).square() / q.shape[1]
        values.append(d.amin(1).mean() + d.amin(0).mean())
    return torch.stack(values)


def _near_the_crop(views: Views) -> bool:
    """An unshifted output within STRETCH_FREE of the crop's size on both axes."""
    near = all(abs(math.log(o / c)) < math.log(STRETCH_FREE) for o, c in zip(views.out_hw, views.real.shape[-2:], strict=True))
    return views.matrix is None and near


def lab_terms(lab: LabConfig | dict[str, Any] | None = None) -> list[Term]:
    """The extra loss terms of ``lab`` (none for the plain configuration): G's tone and patch
    terms and D's stretched fakes, each per image as ``ingan.losses.Term`` requires."""
    lab = LabConfig(**lab) if isinstance(lab, dict) else (lab or LabConfig())
    terms = []
    if lab.tone_weight > 0:
        terms.append(Term("tone", "g", lambda v: lab.tone_weight * tone_loss(v.fake, v.real, v.n)))
    if lab.stretch_negative > 0:
        def stretched(v: Views) -> Tensor:
            if _near_the_crop(v):
                return v.real.new_zeros(v.n, dtype=torch.float32)
            return lab.stretch_negative * losses.d_fake_half(v.discriminate(warp(v.real, v.out_hw, v.matrix)), v.n)
        terms.append(Term("stretch", "d", stretched))
    if lab.patch_weight > 0:
        terms.append(Term("patch", "g", lambda v: lab.patch_weight * patch_distance(v.fake, v.real, v.n, lab.patch_scale)))
    return terms
