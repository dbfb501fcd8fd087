"""Typed configuration for the network and the training schedule, and the named presets.

Schedule milestones are fractions of the total iteration count, so one preset's schedule can be
stretched or shrunk with ``--iterations`` and keep its shape. The ``paper`` preset reproduces the
reference schedule exactly: at 75,000 iterations the fractions land on 10k, 20k and 25k.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .geometry import MAX_SHIFT

MAX_G_WIDTH = 2048  # the paper's network is 512 wide at its deepest


@dataclass(frozen=True)
class ModelConfig:
    g_channels: int = 64  # width after the 7x7 entry conv; each encoder stage doubles it
    g_downsamples: int = 3  # encoder stages (2x2 max-pool each): 64 -> 128 -> 256 -> 512
    g_res_blocks: int = 6  # residual bottleneck blocks at the deepest width
    g_res_squeeze: int = 4  # residual blocks go 512 -> 128 -> 128 -> 512
    d_channels: int = 64  # first conv width of each discriminator net
    d_scale_factor: float = 1.4  # scale k sees the image downscaled by d_scale_factor ** -k
    d_min_side: int = 16  # n_nets = ceil(log(crop / d_min_side) / log(d_scale_factor))
    d_min_map_side: int = 13  # a scale is weighted only if the fake's smaller side allows it
    spectral_norm: bool = True  # on every conv but G's last; off only for ablations
    # G's output is the input image put through the same geometric transform plus what the
    # network adds (clamped to [-1, 1]), instead of the network's tanh alone.
    image_skip: bool = False
    # With image_skip, the clamp of that sum to [-1, 1] passes gradients straight through. A hard
    # clamp gives none to pixels past either end, so a dark region pushed below -1 (a night sky
    # one step from black) gets nothing from the cycle loss to bring it back: training can leave it
    # black. The forward pass, and every output, is the same either way.
    skip_clamp_grad: bool = True
    # BatchNorm in each discriminator net, as in the reference; D sees the real crop and the fake
    # in separate passes of batch size 1, so each is normalised by its own statistics.
    d_batch_norm: bool = True

    def __post_init__(self) -> None:
        # Bounds that keep a network buildable in memory: a config read from a file (a checkpoint
        # from anywhere) must not be able to ask for a billion-parameter generator.
        ints = {"g_channels": (1, 512), "g_downsamples": (1, 6), "g_res_blocks": (0, 64), "g_res_squeeze": (1, 64),
                "d_channels": (1, 512), "d_min_side": (1, 4096), "d_min_map_side": (1, 4096)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"model.{name} must be an integer in {lo}..{hi}, got {v!r}")
        if self.g_channels << self.g_downsamples > MAX_G_WIDTH:
            raise ValueError(f"model.g_channels * 2**g_downsamples is {self.g_channels << self.g_downsamples}: "
                             f"the deepest generator width is at most {MAX_G_WIDTH}")
        f = self.d_scale_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 1.05 <= f <= 4:
            raise ValueError(f"model.d_scale_factor must be a number in 1.05..4, got {f!r}")

    def n_d_nets(self, crop_size: int) -> int:
        return max(1, math.ceil(math.log(crop_size / self.d_min_side) / math.log(self.d_scale_factor)))


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 75_000
    crop_size: int = 256  # training crop side (clipped to the image minus one pixel)
    crops_per_step: int = 1  # random crops per iteration, as one batch (all mapped to the same shape)
    max_side: int | None = None  # downscale the image so its longer side is at most this
    lr: float = 5e-5
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay_start: float = 20 / 75  # constant lr until here, then linear to zero at the end
    curriculum_end: float = 10 / 75  # output-shape range grows linearly until here
    min_scale: float = 0.15  # output side / crop side at the end of the curriculum
    max_scale: float = 2.25
    max_shift: float = 0.0  # top-corner shift range (normalised units); 0 = rectangular only
    rec_weight: float = 0.1  # cycle reconstruction weight in the main G step
    second_g_step: bool = True  # extra G step on the inverse mapping alone
    second_g_step_start: float = 10 / 75
    second_rec_weight: float = 1.0
    # Weight of an L1 loss between the per-channel mean and standard deviation of G's output and
    # of its input crop: a retargeted crop keeps its colours (0 = off).
    tone_weight: float = 0.0
    # Weight of a second fake for D: the real crop put through the iteration's geometric transform
    # (a plain resize), so D learns that a stretch is not a retargeting (0 = off). Skipped for
    # unshifted outputs within 20% of the crop's size on both axes (ingan.train.STRETCH_FREE),
    # where a resize is close to the real crop.
    stretch_negative: float = 0.0
    d_scale_pivot: float = 25 / 75  # coarse D scales weigh most before this, fine ones after
    noise: float = 1 / 255  # uniform input noise amplitude for G and D
    min_out_side: int = 16  # smallest sampled output side (D's finest net needs >= 9 px)
    seed: int = 0
    deterministic: bool = True  # same seed + same device -> bit-identical weights
    channels_last: bool = True  # NHWC tensors: faster convolutions on oneDNN and cuDNN
    # bfloat16 autocast for convolutions (losses and weights stay float32). None: on for a CPU
    # that computes bfloat16 natively (AVX512-BF16 or AMX), off on GPUs, where it measured slower
    # (ingan.train.bf16_by_default).
    bf16: bool | None = False
    norm_calibration: int = 0  # forward passes that re-estimate the final G's BatchNorm statistics (0 = off)
    ema: float = 0.0  # decay of an exponential moving average of G's weights (0 = off); the
    # average, not the last iterate, is then the trained generator
    log_every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift <= MAX_SHIFT:
            raise ValueError(f"max_shift {self.max_shift} must be within 0..{MAX_SHIFT} (normalised units)")
        if not 0.0 <= self.tone_weight < math.inf:  # also refuses NaN
            raise ValueError(f"tone_weight {self.tone_weight} must be a finite number >= 0")
        if not 0.0 <= self.stretch_negative < math.inf:
            raise ValueError(f"stretch_negative {self.stretch_negative} must be a finite number >= 0")

    def with_overrides(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "The reference schedule: full network, crop 256, 75,000 iterations, lr 5e-5.",
    ),
    "fast": Preset(
        "fast",
        "Full network; crop 192 and 10,000 iterations at lr 1e-4 (a tenth of paper's training "
        "FLOPs), the reference's schedule compressed in proportion (curriculum to 13%, decay from "
        "27%), normalisation statistics calibrated at the end. Working image capped at 512 px on "
        "the longer side so whole-image inference stays one cheap pass.",
        train=TrainConfig(iterations=10_000, crop_size=192, lr=1e-4, max_side=512, norm_calibration=64),
    ),
    "cpu": Preset(
        "cpu",
        "The CPU default: a narrow network (16 base channels, 2 residual blocks) trained at the "
        "source's own resolution up to 256 px on the longer side, on 128 px crops, 1,200 "
        "iterations at lr 2e-4, normalisation statistics calibrated at the end; G adds its output "
        "to the warped input image (image skip); bfloat16 where the CPU computes it natively: "
        "about 5.5 minutes per image on one such core (6.5 in float32), two images at once on "
        "two cores.",
        model=ModelConfig(g_channels=16, g_res_blocks=2, d_channels=16, image_skip=True),
        train=TrainConfig(iterations=1200, crop_size=128, max_side=256, lr=2e-4, norm_calibration=64, log_every=100,
                          bf16=None),
    ),
    "tiny": Preset(
        "tiny",
        "A quarter-width network (16 base channels, 2 residual blocks) on a 96 px working "
        "image with 64 px crops: a CPU demo and test preset, a couple of minutes per image.",
        model=ModelConfig(g_channels=16, g_res_blocks=2, d_channels=16),
        train=TrainConfig(iterations=1000, crop_size=64, max_side=96, lr=2e-4, log_every=50),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
