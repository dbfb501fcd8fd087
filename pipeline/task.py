"""The work for one image: fetch, decode, train (or reuse the saved model), retarget to every
target, score, write, and return a small record. Knows nothing of Ray: the executor runs it.

Every failure becomes a record with a status of ``failed``, an ``error_kind`` and a readable
message; nothing raised here crashes the run. Outputs are written before the completion marker,
so a marker always describes files that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from ingan import checkpoint, images
from ingan import metrics as quality
from ingan.config import ModelConfig, TrainConfig
from ingan.images import to_model_input, working_resolution
from ingan.retarget import Shifts, retarget_image, retarget_mask
from ingan.train import Progress, Trainer, pick_device

from . import layout, records
from .config import RunConfig
from .records import Item, Record
from .storage import Folder, StorageError, UnsupportedURIError, check_uri, read_uri
from .targets import Target, TargetError, targets_of

MARKER_VERSION = 1
@dataclass(frozen=True)
class Job:
    """Everything a task needs besides its item; built once by the driver."""

    cfg: RunConfig
    preset: str
    tag: str


class ItemError(Exception):
    """A per-image failure of a known kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Deadline:
    """Raises inside the training loop once the per-image time limit has passed."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds
        self.seconds = seconds

    def check(self, _: Progress | None = None) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise ItemError("timeout", f"exceeded the per-image limit of {self.seconds:g} s")


def classify(exc: BaseException) -> tuple[str, str]:
    """(error_kind, message) for an exception raised while processing an image."""
    if isinstance(exc, ItemError):
        return exc.kind, str(exc)
    if isinstance(exc, UnsupportedURIError):
        return "uri", str(exc)
    if isinstance(exc, FileNotFoundError):
        return "not_found", f"object not found: {exc}"
    if isinstance(exc, PermissionError):
        return "access_denied", f"access denied: {exc}"
    if isinstance(exc, images.ImageDecodeError):
        return "decode", str(exc)
    if isinstance(exc, checkpoint.CheckpointError):
        return "checkpoint", str(exc)
    if isinstance(exc, TargetError):
        return "target", str(exc)
    if isinstance(exc, StorageError):
        return "storage", str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom", f"out of memory: {exc}"
    return "internal", f"{type(exc).__name__}: {exc}"


def process(item: Item, job: Job) -> Record:
    """Run one image end to end and return its record (never raises for a per-image problem)."""
    started = time.perf_counter()
    try:
        return _process(item, job, started)
    except Exception as exc:  # noqa: BLE001 - every per-image failure becomes a failure row
        kind, message = classify(exc)
        return records.failed(item, kind, message, started)


def _process(item: Item, job: Job, started: float) -> Record:
    cfg = job.cfg
    folder = Folder(cfg.output, cfg.storage())
    targets = targets_of(cfg, item.id)
    marker_rel = layout.marker_path(item.id, job.tag)

    done = None
    if cfg.resume == "incremental":
        done = _read_marker(folder, marker_rel)
        if done is not None and {t.name for t in targets} <= set(done["targets"]):
            return _skipped(item, folder, done, targets, started)

    uri = check_uri(item.uri, cfg.allowed_schemes)
    data = read_uri(uri, folder.storage, max_bytes=cfg.max_image_bytes)
    source = images.decode(data, cfg.max_image_pixels)  # (3, H, W) uint8
    src_h, src_w = source.shape[-2:]
    if min(src_h, src_w) < cfg.min_image_side:
        raise ItemError("too_small", f"image is {src_w}x{src_h}: at least {cfg.min_image_side} px per side is needed to train")
    # Each target's (W, H, shifts); several targets may resolve to the same output.
    shapes = {t.name: (*t.resolve(src_w, src_h, cfg.ratio_policy), t.shifts) for t in targets}

    deadline = Deadline(cfg.timeout_s)
    model_rel = layout.model_path(item.id, job.tag)
    ckpt, train_seconds = _model(folder, model_rel, source, item, job, deadline)
    device = pick_device("auto")
    g = ckpt.build_generator(device)

    unique = sorted(set(shapes.values()), key=lambda k: (k[0], k[1], k[2] or (0.0, 0.0)))
    outs = retarget_image(g, source, [(h, w) for w, h, _ in unique], ckpt.train.max_side, [sh for _, _, sh in unique])
    deadline.check()
    # Each output beside a bicubic resize to the same size (and frame), scored the same way: the
    # verdict a nightly job filters on.
    scored = quality.score_against_resize(source, dict(zip(unique, outs, strict=True)), cfg.metrics_max_side) if cfg.metrics else {}
    written = {key: _write_output(folder, item, job, key, out) for key, out in zip(unique, outs, strict=True)}
    outputs = []
    for t in targets:
        key = shapes[t.name]
        outputs.append({**written[key], **scored.get(key, records.UNSCORED), "ratio": t.ratio, "target": t.name,
                        "variant": t.variant, "scale": t.scale})
    preview_rel = layout.source_preview_path(item.id, job.tag)
    folder.write_bytes(preview_rel, images.thumbnail_jpeg(images.to_pil(source), 256))
    folder.write_json(layout.metrics_path(item.id, job.tag), {"id": item.id, "outputs": outputs})
    # Outputs that earlier runs made with this same saved model stay listed (their files are
    # still there), so a rerun of any earlier night's targets is skipped, not retargeted again.
    # A model trained now (none saved, or a damaged one) makes them stale: they are dropped.
    earlier = [o for o in (done or {}).get("outputs", []) if train_seconds is None and isinstance(o, dict)
               and isinstance(o.get("target"), str) and o["target"] not in shapes]
    marker = {"version": MARKER_VERSION, "id": item.id, "uri": item.uri,
              "targets": sorted({*shapes, *(o["target"] for o in earlier)}),
              "outputs": outputs + earlier, "source_width": src_w, "source_height": src_h,
              "model_rel": model_rel, "source_rel": preview_rel}
    folder.write_json(marker_rel, marker)  # last: its presence means everything above exists

    return records.ok(item, started, outputs=outputs, source_rel=preview_rel, source_width=src_w,
                      source_height=src_h, model_uri=folder.uri(model_rel), train_seconds=train_seconds)


def _write_output(folder: Folder, item: Item, job: Job, key: tuple[int, int, Shifts | None], out: torch.Tensor) -> dict[str, Any]:
    """Write one output (a shaped one transparent outside its frame, or for JPEG painted
    ``fill_color`` with its frame in a mask file) and return its record fields."""
    cfg = job.cfg
    w, h, shifts = key
    ext = {"jpeg": "jpg"}.get(cfg.image_format, cfg.image_format)
    rel = layout.output_path(item.id, job.tag, w, h, ext, shifts)
    mask = None if shifts is None else retarget_mask((h, w), shifts)
    data = images.encode(out, cfg.image_format, mask=mask, fill=tuple(cfg.fill_color))
    fields: dict[str, Any] = {"width": w, "height": h, "rel": rel, "uri": folder.write_bytes(rel, data),
                              "shift_left": 0.0 if shifts is None else shifts[0],
                              "shift_right": 0.0 if shifts is None else shifts[1],
                              "mask_uri": None, "mask_rel": None}
    if mask is not None and cfg.image_format == "jpeg":
        mask_rel = layout.mask_path(item.id, job.tag, w, h, shifts)  # type: ignore[arg-type]
        fields.update(mask_rel=mask_rel, mask_uri=folder.write_bytes(mask_rel, images.encode_mask(mask)))
    return fields


def _read_marker(folder: Folder, rel: str) -> dict[str, Any] | None:
    try:
        done = folder.read_json(rel)
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # unreadable marker: redo the image rather than trust it
    # A StorageError goes on up: storage that cannot be read after the retries cannot be
    # written either, and the image fails now instead of after a second bounded wait.
    if not isinstance(done, dict) or done.get("version") != MARKER_VERSION or not isinstance(done.get("targets"), list):
        return None
    return done


def _skipped(item: Item, folder: Folder, done: dict[str, Any], targets: list[Target], started: float) -> Record:
    by_target = {o["target"]: o for o in done["outputs"]}
    return records.skipped(item, started, outputs=[by_target[t.name] for t in targets if t.name in by_target],
                           source_rel=done.get("source_rel"), source_width=done.get("source_width"),
                           source_height=done.get("source_height"),
                           model_uri=folder.uri(done["model_rel"]) if done.get("model_rel") else None)


def _model(folder: Folder, rel: str, source: torch.Tensor, item: Item, job: Job, deadline: Deadline) -> tuple[checkpoint.Checkpoint, float | None]:
    """The image's generator: the saved one when it exists (fan-out to new targets costs no
    training), else trained now and saved before any output is written."""
    cfg = job.cfg
    if cfg.resume == "incremental" or cfg.retarget_only:
        try:
            return checkpoint.load(folder.read_bytes(rel)), None
        except FileNotFoundError:
            if cfg.retarget_only:
                raise ItemError("no_model", "retarget-only run, but this image has no saved model") from None
        except checkpoint.CheckpointError:
            pass  # a damaged model is retrained, not trusted
    model_cfg, train_cfg = cfg.model_settings(job.preset)
    train_cfg = dataclasses.replace(train_cfg, seed=records.item_seed(cfg.seed, item.id))
    t0 = time.perf_counter()
    state_rel = layout.training_state_path(item.id, job.tag)
    try:
        trainer = _train(folder, state_rel, source, model_cfg, train_cfg, cfg.checkpoint_every_s, deadline)
    except torch.OutOfMemoryError:
        # One retry at half the crop and working size: a large image on a shared (fractional)
        # GPU is the usual cause, and a smaller model input fits where the full one did not.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        train_cfg = _smaller(train_cfg, source)
        trainer = _train(folder, state_rel, source, model_cfg, train_cfg, cfg.checkpoint_every_s, deadline)
    seconds = time.perf_counter() - t0
    work_hw = working_resolution(tuple(source.shape[-2:]), train_cfg.max_side)
    # No timings here: a retried or overwritten task must write the same bytes (the seconds are
    # in the result record instead).
    meta = {"id": item.id, "preset": job.preset, "source_hw": list(source.shape[-2:]), "working_hw": list(work_hw),
            "device": str(trainer.device), "bf16": trainer.bf16, "torch": str(torch.__version__)}
    ckpt = checkpoint.from_generator(trainer.generator, model_cfg, train_cfg, meta)
    folder.write_bytes(rel, checkpoint.save(ckpt))
    # The model supersedes the state; one left behind by a failed removal is never used.
    with contextlib.suppress(StorageError):
        folder.remove(state_rel)
    return ckpt, seconds


def _train(folder: Folder, state_rel: str, source: torch.Tensor, model_cfg: ModelConfig, train_cfg: TrainConfig,
           every_s: float, deadline: Deadline) -> Trainer:
    """Train, continuing from the image's saved training state when there is one that matches,
    and saving the state every ``every_s`` seconds (0: never) so a retried task (a lost worker or
    node, a killed driver's rerun) loses at most that much training. A resumed training ends
    with the same weights as an uninterrupted one, so resuming is right in every resume mode."""
    trainer = Trainer(to_model_input(source), model_cfg, train_cfg, "auto")
    # None, damaged, or of other settings: training starts from the beginning.
    with contextlib.suppress(FileNotFoundError, checkpoint.CheckpointError, StorageError):
        checkpoint.resume_training(trainer, folder.read_bytes(state_rel))

    def snapshot(t: Trainer) -> None:
        # A missed save only means less to resume from: training goes on.
        with contextlib.suppress(StorageError):
            folder.write_bytes(state_rel, checkpoint.save_training_state(t))

    trainer.run(deadline.check, snapshot if every_s > 0 else None, every_s)
    return trainer


def _smaller(cfg: TrainConfig, source: torch.Tensor) -> TrainConfig:
    side = max(source.shape[-2:]) if cfg.max_side is None else cfg.max_side
    return dataclasses.replace(cfg, crop_size=max(32, cfg.crop_size // 2), max_side=max(64, side // 2))
