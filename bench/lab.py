"""Experiments on the training, kept out of the library: options that were measured and not
shipped live on here, as a Trainer subclass that fills InGAN's hooks, so they can be run again.

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

import torch.nn.functional as F
from torch import Tensor

from ingan import losses
from ingan.geometry import warp
from ingan.train import Trainer

# Outputs within this factor of the crop's size on both axes get no stretched fake: a resize
# that small is close to the real crop, and D would be taught to call nearly real patches fake.
STRETCH_FREE = 1.2


@dataclass(frozen=True)
class LabConfig:
    # Weight of an L1 loss between the per-channel mean and standard deviation of G's output and
    # of its input crop: a retargeted crop keeps its colours (0 = off).
    tone_weight: float = 0.0
    # Weight of a second fake for D: the real crop put through the iteration's geometric transform
    # (a plain resize), so D learns that a stretch is not a retargeting (0 = off). Skipped for
    # unshifted outputs within STRETCH_FREE of the crop's size on both axes.
    stretch_negative: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"{f.name} {value} must be a finite number >= 0")

    @property
    def is_plain(self) -> bool:
        return self == LabConfig()


def tone_loss(output: Tensor, source: Tensor) -> Tensor:
    """L1 distance between the per-channel mean and standard deviation of ``output`` and of
    ``source`` (each (B, 3, H, W), any sizes). The cycle loss lets tone drift: any invertible
    change of colour passes it."""
    o, s = output.flatten(2), source.flatten(2)  # (B, 3, H*W)
    return F.l1_loss(o.mean(-1), s.mean(-1)) + F.l1_loss(o.std(-1), s.std(-1))


class LabTrainer(Trainer):
    lab = LabConfig()

    def extra_g_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        if self.lab.tone_weight <= 0:
            return {}
        return {"tone": self.lab.tone_weight * tone_loss(fake.float(), real)}

    def extra_d_losses(self, real: Tensor, out_hw: tuple[int, int], matrix: Tensor | None,
                       weights: list[float]) -> dict[str, Tensor]:
        if self.lab.stretch_negative <= 0:
            return {}
        near = all(abs(math.log(o / c)) < math.log(STRETCH_FREE) for o, c in zip(out_hw, real.shape[-2:], strict=True))
        if matrix is None and near:
            return {}
        stretched = warp(real, out_hw, matrix)
        d_stretched = self.d(self._noisy(stretched), weights).float()
        return {"stretch": self.lab.stretch_negative * losses.d_fake_loss(d_stretched)}


def trainer_class(lab: LabConfig | dict[str, Any] | None = None) -> type[Trainer]:
    """InGAN's own Trainer for the plain configuration, else a LabTrainer set to ``lab``."""
    lab = LabConfig(**lab) if isinstance(lab, dict) else (lab or LabConfig())
    if lab.is_plain:
        return Trainer
    return type("LabTrainer", (LabTrainer,), {"lab": lab})
