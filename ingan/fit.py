"""Images to trained models: the one way the command line, the pipeline's tasks and the
benchmarks train, so a checkpoint says the same about itself whoever made it.

``fit`` trains one image. ``fit_bundle`` trains several images of one preset as bundles
(``ingan.train``): images that share a crop size and a point to continue from train as one fused
model, and each image comes back as its own plain checkpoint, or as its own error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checkpoint
from .config import ModelConfig, TrainConfig
from .images import to_model_input, working_image
from .train import ProgressFn, Trainer, bf16_by_default, pick_device, training_crop


class DivergedError(RuntimeError):
    """An image's training reached a non-finite loss or weight."""


@dataclass(frozen=True)
class Fit:
    checkpoint: checkpoint.Checkpoint  # the generator with its configs and metadata
    trainer: Trainer  # finished, in eval mode (a bundle's trainer holds every image of it)
    seconds: float  # training time in this call (a resumed training counts what was left)
    resumed_from: int  # the iteration a saved training state let it start at (0: the beginning)
    part: int = 0  # the image's block in ``trainer``


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
    (the benchmarks' lab variants). A training that diverges raises ``DivergedError``.

    Out of GPU memory, it tries once more at half the crop and working size: a large image on a
    shared (fractional) GPU is the usual cause, and a smaller model input fits where the full one
    did not. The checkpoint records the settings it was trained with."""
    each = None if snapshot is None else (lambda _k, data: snapshot(data))
    args = (preset, model_cfg, device, progress, [state], each, snapshot_every_s, [meta], trainer_cls)
    try:
        done = _fit([image], [train_cfg], *args)[0]
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        done = _fit([image], [smaller(train_cfg, image)], *args)[0]
    if isinstance(done, Exception):
        raise done
    return done


def fit_bundle(images: Sequence[Tensor], preset: str, model_cfg: ModelConfig, train_cfgs: Sequence[TrainConfig],
               device: torch.device | str = "auto", *, progress: ProgressFn | None = None,
               states: Sequence[bytes | None] | None = None, snapshot: Callable[[int, bytes], None] | None = None,
               snapshot_every_s: float = 0.0, metas: Sequence[dict[str, Any] | None] | None = None) -> list[Fit | Exception]:
    """Train ``images``, each with its own settings (``train_cfgs``: one preset's, differing in
    the seed alone), and return each image's ``Fit`` or the exception that ended its training,
    in order. A bundle's failure is its images' own: one image that diverges or is too small
    fails alone, and the others end exactly as in a bundle without its trouble.

    ``states``: each image's saved training state or None; ``snapshot(k, data)`` is called with
    image k's new state every ``snapshot_every_s`` seconds. Images train together where they
    share a crop size and the iteration their states continue from (usually all of them).
    ``metas``: each checkpoint's extra entries, as ``fit``'s ``meta``.

    Out of GPU memory, a bundle of several trains as two halves, one after the other (down to
    one image, which ``fit`` retries at half size)."""
    n = len(images)
    states = list(states or [None] * n)
    metas = list(metas or [None] * n)
    if not len(train_cfgs) == len(states) == len(metas) == n:
        raise ValueError("fit_bundle needs one settings, state and meta entry per image")
    if n == 1:  # fit, with its own retry at half size
        own = None if snapshot is None else (lambda data: snapshot(0, data))
        try:
            return [fit(images[0], preset, model_cfg, train_cfgs[0], device, progress=progress, state=states[0],
                        snapshot=own, snapshot_every_s=snapshot_every_s, meta=metas[0])]
        except Exception as exc:  # noqa: BLE001 - the image's failure is its result
            return [exc]
    args = (preset, model_cfg, device, progress, states, snapshot, snapshot_every_s, metas, Trainer)
    try:
        return _fit(images, train_cfgs, *args)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    half = n // 2
    return [*fit_bundle(images[:half], preset, model_cfg, train_cfgs[:half], device, progress=progress,
                        states=states[:half], snapshot=snapshot, snapshot_every_s=snapshot_every_s, metas=metas[:half]),
            *fit_bundle(images[half:], preset, model_cfg, train_cfgs[half:], device, progress=progress,
                        states=states[half:], snapshot=None if snapshot is None else (lambda k, data: snapshot(k + half, data)),
                        snapshot_every_s=snapshot_every_s, metas=metas[half:])]


def smaller(cfg: TrainConfig, image: Tensor) -> TrainConfig:
    """Half the crop and working size (within limits that still train)."""
    side = max(image.shape[-2:]) if cfg.max_side is None else cfg.max_side
    return dataclasses.replace(cfg, crop_size=max(32, cfg.crop_size // 2), max_side=max(64, side // 2))


def _fit(images: Sequence[Tensor], train_cfgs: Sequence[TrainConfig], preset: str, model_cfg: ModelConfig,
         device: torch.device | str, progress: ProgressFn | None, states: list[bytes | None],
         snapshot: Callable[[int, bytes], None] | None, snapshot_every_s: float, metas: list[dict[str, Any] | None],
         trainer_cls: type[Trainer]) -> list[Fit | Exception]:
    """One attempt at every image: grouped into bundles, each trained, each image's result."""
    dev = pick_device(device) if isinstance(device, str) else device
    shared = {dataclasses.replace(cfg, seed=0) for cfg in train_cfgs}
    if len(shared) != 1:
        raise ValueError("the images of a bundle train with one preset's settings (only their seeds may differ)")
    cfg0 = train_cfgs[0]
    bf16 = bf16_by_default(dev) if cfg0.bf16 is None else cfg0.bf16
    inputs = [to_model_input(im) for im in images]
    results: list[Fit | Exception | None] = [None] * len(images)
    groups: dict[tuple[tuple[int, int], int], list[tuple[int, dict[str, Any] | None]]] = {}
    for k, (x, cfg) in enumerate(zip(inputs, train_cfgs, strict=True)):
        work = working_image(x, cfg.max_side)
        try:
            crop_hw = training_crop(tuple(work.shape[-2:]), cfg)
        except ValueError as exc:  # too small: this image's result alone
            results[k] = exc
            continue
        saved = None
        if states[k] is not None:  # another image's or settings' state, or a damaged one: start over
            with contextlib.suppress(checkpoint.CheckpointError):
                saved = checkpoint.read_training_state(states[k], model_cfg, cfg, work, bf16)
        groups.setdefault((crop_hw, saved["iteration"] if saved else 0), []).append((k, saved))
    for members in groups.values():
        ks = [k for k, _ in members]
        for k, result in zip(ks, _train(members, inputs, train_cfgs, preset, model_cfg, dev, progress, snapshot,
                                        snapshot_every_s, metas, trainer_cls), strict=True):
            results[k] = result
    return results  # type: ignore[return-value]


def _train(members: list[tuple[int, dict[str, Any] | None]], inputs: list[Tensor], train_cfgs: Sequence[TrainConfig],
           preset: str, model_cfg: ModelConfig, device: torch.device, progress: ProgressFn | None,
           snapshot: Callable[[int, bytes], None] | None, snapshot_every_s: float, metas: list[dict[str, Any] | None],
           trainer_cls: type[Trainer]) -> list[Fit | Exception]:
    """One bundle (one image or more) trained to the end, and each image's result."""
    ks = [k for k, _ in members]
    cfg = train_cfgs[ks[0]]
    trainer = trainer_cls([inputs[k] for k in ks], model_cfg, cfg, device, seeds=[train_cfgs[k].seed for k in ks])
    resumed_from = 0
    if all(saved is not None for _, saved in members):
        with contextlib.suppress(checkpoint.CheckpointError):
            resumed_from = checkpoint.resume_parts(trainer, [saved for _, saved in members])  # type: ignore[misc]
    save_states = None if snapshot is None or snapshot_every_s <= 0 else (
        lambda t: [snapshot(k, checkpoint.save_training_state(t, i)) for i, k in enumerate(ks) if i not in t.failed])
    start = time.perf_counter()
    trainer.run(progress, save_states, snapshot_every_s or None)
    seconds = time.perf_counter() - start
    out: list[Fit | Exception] = []
    for i, k in enumerate(ks):
        if i in trainer.failed:
            out.append(DivergedError(trainer.failed[i]))
            continue
        info = {"preset": preset, "source_hw": list(inputs[k].shape[-2:]), "working_hw": list(trainer.images[i].shape[-2:]),
                "device": str(trainer.device), "bf16": trainer.bf16, "torch": str(torch.__version__), **(metas[k] or {})}
        ckpt = checkpoint.from_state(trainer.part_generator(i), model_cfg, trainer.part_cfg(i), info)
        out.append(Fit(ckpt, trainer, seconds, resumed_from, i))
    return out
