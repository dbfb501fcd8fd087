"""Images to trained models: the one way the command line, the pipeline's tasks and the
benchmarks train, so a checkpoint says the same about itself whoever made it.

``fit`` trains one image. ``fit_bundle`` trains several images of one preset as bundles
(``ingan.train``): images that share a crop size and a point to continue from train as one fused
model, and each image comes back as its own plain checkpoint, or as its own error. The trainer is
dropped as soon as its images' checkpoints are taken: only they come back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checkpoint
from .config import ModelConfig, TrainConfig
from .images import to_model_input
from .losses import Term
from .train import ProgressFn, Trainer, pick_device, training_input, uses_bf16


class DivergedError(RuntimeError):
    """An image's training reached a non-finite loss or weight."""


@dataclass(frozen=True)
class Fit:
    checkpoint: checkpoint.Checkpoint  # the generator with its configs and metadata
    seconds: float  # training time in this call (a resumed training counts what was left)
    resumed_from: int  # the iteration a saved training state let it start at (0: the beginning)


@dataclass(frozen=True)
class _Job:
    """What every image of a ``fit_bundle`` call trains with."""

    preset: str
    model_cfg: ModelConfig
    device: torch.device
    progress: ProgressFn | None
    snapshot: Callable[[int, bytes], None] | None  # (the image's index in the call, its state)
    snapshot_every_s: float
    terms: Sequence[Term]


@dataclass(frozen=True)
class _Image:
    """One image of the call: its index, model input, settings, saved state and extra metadata."""

    index: int
    source: Tensor  # (3, H, W) in [-1, 1]
    cfg: TrainConfig
    state: bytes | None
    meta: dict[str, Any] | None


def fit(image: Tensor, preset: str, model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device | str = "auto",
        *, progress: ProgressFn | None = None, state: bytes | None = None,
        snapshot: Callable[[bytes], None] | None = None, snapshot_every_s: float = 0.0,
        meta: dict[str, Any] | None = None, terms: Sequence[Term] = ()) -> Fit:
    """Train on ``image`` ((3, H, W) uint8 or float in [0, 1]) and return its checkpoint.

    ``state``: a saved training state (``Trainer.saved_state``) to continue from; one of another
    image or other settings, or a damaged one, is ignored and training starts over (a resumed
    training ends with the same weights as an uninterrupted one). ``snapshot``: called with a new
    training state every ``snapshot_every_s`` seconds of training (0: never). ``meta``: entries
    the caller adds to the checkpoint's own (preset, sizes, device, precision, torch version). The
    metadata holds no timings, so training the same image again with the same settings on the
    same device writes the same bytes. ``terms``: extra loss terms (``losses.Term``). A training
    that diverges raises ``DivergedError``, an image too small to train ``ValueError``.

    Out of GPU memory, it tries once more at half the crop and working size: a large image on a
    shared (fractional) GPU is the usual cause, and a smaller model input fits where the full one
    did not. The checkpoint records the settings it was trained with."""
    [done] = fit_bundle([image], preset, model_cfg, [train_cfg], device, progress=progress, states=[state],
                        snapshot=None if snapshot is None else (lambda _k, data: snapshot(data)),
                        snapshot_every_s=snapshot_every_s, metas=[meta], terms=terms)
    if isinstance(done, Exception):
        raise done
    return done


def fit_bundle(images: Sequence[Tensor], preset: str, model_cfg: ModelConfig, train_cfgs: Sequence[TrainConfig],
               device: torch.device | str = "auto", *, progress: ProgressFn | None = None,
               states: Sequence[bytes | None] | None = None, snapshot: Callable[[int, bytes], None] | None = None,
               snapshot_every_s: float = 0.0, metas: Sequence[dict[str, Any] | None] | None = None,
               terms: Sequence[Term] = ()) -> list[Fit | Exception]:
    """Train ``images``, each with its own settings (``train_cfgs``: one preset's, differing in
    the seed alone), and return each image's ``Fit`` or the exception that ended its training,
    in order. A bundle's failure is its images' own: one image that diverges or is too small
    fails alone, and the others end exactly as in a bundle without its trouble. An exception of
    the whole call (one raised by ``progress``, a time limit) is raised.

    ``states``: each image's saved training state or None; ``snapshot(k, data)`` is called with
    image k's new state every ``snapshot_every_s`` seconds. Images train together where they
    share a crop size and the iteration their states continue from (usually all of them).
    ``metas``: each checkpoint's extra entries, as ``fit``'s ``meta``.

    Out of GPU memory, a bundle of several trains as two halves, one after the other, down to
    one image, which tries once more at half its crop and working size."""
    n = len(images)
    states = list(states or [None] * n)
    metas = list(metas or [None] * n)
    if not len(train_cfgs) == len(states) == len(metas) == n:
        raise ValueError("fit_bundle needs one settings, state and meta entry per image")
    if len({dataclasses.replace(cfg, seed=0) for cfg in train_cfgs}) > 1:
        raise ValueError("the images of a bundle train with one preset's settings (only their seeds may differ)")
    job = _Job(preset, model_cfg, pick_device(device), progress, snapshot, snapshot_every_s, terms)
    members = [_Image(k, to_model_input(im), cfg, state, meta)
               for k, (im, cfg, state, meta) in enumerate(zip(images, train_cfgs, states, metas, strict=True))]
    return _fit_within_memory(members, job)


def smaller(cfg: TrainConfig, image: Tensor) -> TrainConfig:
    """Half the crop and working size (within limits that still train)."""
    side = max(image.shape[-2:]) if cfg.max_side is None else cfg.max_side
    return dataclasses.replace(cfg, crop_size=max(32, cfg.crop_size // 2), max_side=max(64, side // 2))


def _fit_within_memory(members: list[_Image], job: _Job) -> list[Fit | Exception]:
    """Every image's result; out of GPU memory, the bundle as halves, one image at half size."""
    try:
        return _fit_groups(members, job)
    except torch.OutOfMemoryError:
        pass  # retried below, where the failed attempt's tensors are no longer held by its traceback
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(members) > 1:
        half = len(members) // 2
        return _fit_within_memory(members[:half], job) + _fit_within_memory(members[half:], job)
    [one] = members
    try:
        return _fit_groups([dataclasses.replace(one, cfg=smaller(one.cfg, one.source))], job)
    except torch.OutOfMemoryError as exc:  # once more, not again and again
        return [exc]


def _fit_groups(members: list[_Image], job: _Job) -> list[Fit | Exception]:
    """One attempt at every image: grouped into bundles by crop size and the iteration their
    states continue from, each bundle trained, each image's result in order."""
    bf16 = uses_bf16(members[0].cfg, job.device)
    results: dict[int, Fit | Exception] = {}
    groups: dict[tuple[tuple[int, int], int], list[tuple[_Image, dict[str, Any] | None]]] = {}
    for m in members:
        try:
            work, crop_hw = training_input(m.source, m.cfg)
        except ValueError as exc:  # too small: this image's result alone
            results[m.index] = exc
            continue
        saved = None
        if m.state is not None:  # another image's or settings' state, or a damaged one: start over
            with contextlib.suppress(checkpoint.CheckpointError):
                saved = checkpoint.read_training_state(m.state, job.model_cfg, m.cfg, work, bf16)
        groups.setdefault((crop_hw, saved["iteration"] if saved else 0), []).append((m, saved))
    for group in groups.values():
        results.update(_train(group, job))
    return [results[m.index] for m in members]


def _train(group: list[tuple[_Image, dict[str, Any] | None]], job: _Job) -> dict[int, Fit | Exception]:
    """One bundle trained to the end: each image's result by its index. The trainer is not kept."""
    members = [m for m, _ in group]
    trainer = Trainer([m.source for m in members], job.model_cfg, members[0].cfg, job.device,
                      seeds=[m.cfg.seed for m in members], terms=job.terms)
    resumed_from = 0
    if all(saved is not None for _, saved in group):
        with contextlib.suppress(checkpoint.CheckpointError):
            resumed_from = resume(trainer, [saved for _, saved in group])  # type: ignore[misc]
    save_states = None
    if job.snapshot is not None and job.snapshot_every_s > 0:
        snap = job.snapshot
        save_states = lambda t: [snap(m.index, saved_state(t, i)) for i, m in enumerate(members) if i not in t.failed]  # noqa: E731
    start = time.perf_counter()
    trainer.run(job.progress, save_states, job.snapshot_every_s or None)
    seconds = time.perf_counter() - start
    out: dict[int, Fit | Exception] = {}
    for i, m in enumerate(members):
        if i in trainer.failed:
            out[m.index] = DivergedError(trainer.failed[i])
            continue
        info = {"preset": job.preset, "source_hw": list(m.source.shape[-2:]), "working_hw": list(trainer.images[i].shape[-2:]),
                "device": str(trainer.device), "bf16": trainer.bf16, "torch": str(torch.__version__), **(m.meta or {})}
        ckpt = checkpoint.from_state(trainer.part_generator(i), job.model_cfg, trainer.part_cfg(i), info)
        out[m.index] = Fit(ckpt, seconds, resumed_from)
    return out


def saved_state(trainer: Trainer, k: int) -> bytes:
    """Image ``k``'s training state as bytes (``checkpoint.save_training_state``): what a trainer
    of the same image and settings, alone or in any bundle, continues from."""
    return checkpoint.save_training_state(trainer.part_state(k), trainer.model_cfg, trainer.part_cfg(k), trainer.bf16,
                                          trainer.images[k])


def resume(trainer: Trainer, states: list[dict[str, Any]]) -> int:
    """Load every image's checked state (``checkpoint.read_training_state``) into ``trainer`` and
    return the iteration it continues from. States that cannot be continued together raise
    ``CheckpointError`` and leave the trainer unchanged."""
    before = [copy.deepcopy(trainer.part_state(k)) for k in range(trainer.n_images)]  # live tensors
    try:
        trainer.load_parts(states)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        trainer.load_parts(before)  # partly loaded: back to the fresh start
        raise checkpoint.CheckpointError(f"training state is incomplete or inconsistent: {exc}") from exc
    return trainer.iteration


def resume_from_bytes(trainer: Trainer, data: bytes) -> int:
    """``resume`` a trainer of one image from a saved training state's bytes; a state of another
    image or configuration, or a damaged one, raises ``CheckpointError``."""
    state = checkpoint.read_training_state(data, trainer.model_cfg, trainer.part_cfg(0), trainer.images[0], trainer.bf16)
    return resume(trainer, [state])
