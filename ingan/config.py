"""Typed configuration for the network and the training schedule, and the named presets.

Schedule milestones are fractions of the total iteration count, so one preset's schedule can be
stretched or shrunk with ``--iterations`` and keep its shape. The ``paper`` preset reproduces the
reference schedule exactly: at 75,000 iterations the fractions land on 10k, 20k and 25k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    # G's output is the input image put through the same geometric transform plus what the
    # network adds, instead of the network's tanh alone. The sum is clamped to [-1, 1] with the
    # gradient passed straight through: a hard clamp gives none to pixels past either end, so a
    # dark region pushed below -1 (a night sky one step from black) could never be trained back.
    image_skip: bool = False

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
    second_g_step_start: float = 10 / 75  # from here on, an extra G step on the inverse mapping alone
    second_rec_weight: float = 1.0
    d_scale_pivot: float = 25 / 75  # coarse D scales weigh most before this, fine ones after
    noise: float = 1 / 255  # uniform input noise amplitude for G and D
    min_out_side: int = 16  # smallest sampled output side (D's finest net needs >= 9 px)
    seed: int = 0
    # bfloat16 autocast for convolutions (losses and weights stay float32). None: on for a CPU
    # that computes bfloat16 natively (AVX512-BF16 or AMX), off on GPUs, where it measured slower
    # (ingan.train.bf16_by_default).
    bf16: bool | None = False
    norm_calibration: int = 0  # forward passes that re-estimate the final G's BatchNorm statistics (0 = off)
    log_every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift <= MAX_SHIFT:
            raise ValueError(f"max_shift {self.max_shift} must be within 0..{MAX_SHIFT} (normalised units)")

    def with_overrides(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


# TrainConfig.bf16's default in words, for every command line that sets it.
BF16_DEFAULT_TEXT = ("the preset's; cpu turns it on for CPUs that compute it natively, AVX512-BF16 or AMX, "
                     "and never on GPUs, where it is slower")


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


# Options that were tried and removed, each with the one value every model of this version is
# trained with (the experiment log, docs/experiments.md, has what the others did).
REMOVED_OPTIONS: dict[str, dict[str, object]] = {
    "ModelConfig": {"spectral_norm": True, "d_batch_norm": True, "skip_clamp_grad": True, "skip_base": "warp"},
    "TrainConfig": {"crops_per_step": 1, "second_g_step": True, "tone_weight": 0.0, "stretch_negative": 0.0, "ema": 0.0,
                    # Implementation choices, no longer switches: a seed always gives the same
                    # weights on one device, and tensors are always NHWC (faster on oneDNN and cuDNN).
                    "deterministic": True, "channels_last": True},
}
_Config = TypeVar("_Config", ModelConfig, TrainConfig)


def config_from_dict(cls: type[_Config], data: dict[str, Any], *, strict: bool) -> _Config:
    """A config saved by any version. A removed option is dropped; with ``strict`` (a training to
    continue) one saved at another value than this version trains with raises ``ValueError``,
    since going on would train something else. A generator does not need it: what it computes
    is in its weights (a missing spectral norm shows as missing tensors when they are loaded)."""
    fields = dict(data)
    for name, value in REMOVED_OPTIONS[cls.__name__].items():
        if name in fields and fields.pop(name) != value and strict:
            raise ValueError(f"saved with {name}={data[name]!r}, an option this version no longer has")
    return cls(**fields)


def model_tag(preset: str, model: ModelConfig, train: TrainConfig, run_seed: int) -> str:
    """Names the settings that change what a model learns, so outputs of different settings never
    overwrite each other and a rerun with the same ones finds its models.

    The fingerprint is spelled as tags were first written, so saved models keep their tags across
    versions: removed options stand at the value they were trained with where the first tags
    had them (spectral norm, the second G step, no weight average, deterministic NHWC training;
    the clamp passing gradients, which names image-skip generators only), and options added after the first tags that were
    then removed (crops per step, tone, stretched fakes, D's BatchNorm switch) are left out."""
    net = dataclasses.asdict(model) | {"spectral_norm": True}
    if model.image_skip:
        net["skip_clamp_grad"] = True
    learn = {k: v for k, v in dataclasses.asdict(train).items() if k not in ("log_every", "seed")}
    learn |= {"second_g_step": True, "ema": 0.0, "deterministic": True, "channels_last": True}
    # bfloat16 is how a model is computed, not what it learns (the same scores, measured): a
    # model trained either way is found by a run set the other way, on any machine. Spelled as
    # the float32 that every tag was first written with.
    learn["bf16"] = False
    blob = json.dumps([net, learn, run_seed], sort_keys=True)
    return f"{preset}-{train.iterations}it-seed{run_seed}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
