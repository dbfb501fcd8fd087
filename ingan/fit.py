"""An image to a trained model: the one way the command line, the pipeline's tasks and the
benchmarks train, so a checkpoint says the same about itself whoever made it."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checkpoint
from .config import ModelConfig, TrainConfig
from .images import to_model_input
from .train import ProgressFn, Trainer


@dataclass(frozen=True)
class Fit:
    checkpoint: checkpoint.Checkpoint  # the generator with its configs and metadata
    trainer: Trainer  # finished, in eval mode
    seconds: float  # training time in this call (a resumed training counts what was left)
    resumed_from: int  # the iteration a saved training state let it start at (0: the beginning)


def fit(image: Tensor, preset: str, model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device | str = "auto",
        *, progress: ProgressFn | None = None, state: bytes | None = None,
        snapshot: Callable[[bytes], None] | None = None, snapshot_every_s: float = 0.0,
        meta: dict[str, Any] | None = None, trainer_cls: type[Trainer] = Trainer) -> Fit:
    """Train on ``image`` ((3, H, W) uint8 or float in [0, 1]) and return its checkpoint.

    ``state``: a saved training state (``checkpoint.save_training_state``) to continue from; one of
    another image or other settings, or a damaged one, is ignored and training starts over (a
    resumed training ends with the same weights as an uninterrupted one). ``snapshot``: called
    with a new training state every ``snapshot_every_s`` seconds of training (0: never).
    ``meta``: entries the caller adds to the checkpoint's own (preset, sizes, device, precision,
    torch version). The metadata holds no timings, so training the same image again with the
    same settings on the same device writes the same bytes. ``trainer_cls``: a Trainer subclass
    (the benchmarks' lab variants).

    Out of GPU memory, it tries once more at half the crop and working size: a large image on a
    shared (fractional) GPU is the usual cause, and a smaller model input fits where the full one
    did not. The checkpoint records the settings it was trained with."""
    args = (image, preset, model_cfg, device, progress, state, snapshot, snapshot_every_s, meta, trainer_cls)
    try:
        return _fit(train_cfg, *args)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _fit(smaller(train_cfg, image), *args)


def smaller(cfg: TrainConfig, image: Tensor) -> TrainConfig:
    """Half the crop and working size (within limits that still train)."""
    side = max(image.shape[-2:]) if cfg.max_side is None else cfg.max_side
    return dataclasses.replace(cfg, crop_size=max(32, cfg.crop_size // 2), max_side=max(64, side // 2))


def _fit(train_cfg: TrainConfig, image: Tensor, preset: str, model_cfg: ModelConfig, device: torch.device | str,
         progress: ProgressFn | None, state: bytes | None, snapshot: Callable[[bytes], None] | None,
         snapshot_every_s: float, meta: dict[str, Any] | None, trainer_cls: type[Trainer]) -> Fit:
    """One training at ``train_cfg``: what ``fit`` tries, and tries again smaller."""
    trainer = trainer_cls(to_model_input(image), model_cfg, train_cfg, device)
    resumed_from = 0
    if state is not None:
        with contextlib.suppress(checkpoint.CheckpointError):
            resumed_from = checkpoint.resume_training(trainer, state)
    save_state = None if snapshot is None or snapshot_every_s <= 0 else \
        (lambda t: snapshot(checkpoint.save_training_state(t)))
    start = time.perf_counter()
    trainer.run(progress, save_state, snapshot_every_s or None)
    seconds = time.perf_counter() - start
    info = {"preset": preset, "source_hw": list(image.shape[-2:]), "working_hw": list(trainer.image.shape[-2:]),
            "device": str(trainer.device), "bf16": trainer.bf16, "torch": str(torch.__version__), **(meta or {})}
    return Fit(checkpoint.from_generator(trainer.g, model_cfg, train_cfg, info), trainer, seconds, resumed_from)
