"""The work for one image, or a bundle of them: fetch, decode, train (or reuse the saved model),
retarget to every target, score, write, and return a small record per image. Images that need
training train together as one bundle (``ingan.fit.fit_bundle``). Knows nothing of Ray: the
executor runs it.

Every failure becomes a record with a status of ``failed``, an ``error_kind`` and a readable
message; nothing raised here crashes the run. Outputs are written before the completion marker,
so a marker always describes files that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ingan import checkpoint, images
from ingan import metrics as quality
from ingan.config import ModelConfig, TrainConfig
from ingan.fit import DivergedError, Fit, fit_bundle
from ingan.progress import Progress
from ingan.retarget import EncodedOutput, Shifts, encode_output, retarget_image
from ingan.train import pick_device

from . import layout, records, shards
from .config import RunConfig
from .records import Item, Record
from .storage import Folder, StorageError, UnsupportedURIError, check_uri, read_uri
from .targets import Target, TargetError, targets_of, variants

MARKER_VERSION = 1
OutputKey = tuple[int, int, Shifts | None]  # an output's (W, H, top-corner shifts)


@dataclass(frozen=True)
class Job:
    """Everything a task needs besides its item; built once by the driver (``Job.of``)."""

    cfg: RunConfig
    preset: str
    tag: str  # names the models of these settings (ingan.config.model_tag)
    model: ModelConfig
    train: TrainConfig  # the run's settings; each image trains with its own seed
    targets: tuple[Target, ...]  # the configured targets, the same for every image
    night: str | None = None  # the night whose shards this run's outputs go to; None: shards off

    @classmethod
    def of(cls, cfg: RunConfig, preset: str, night: str | None = None) -> Job:
        model, train = cfg.model_settings(preset)
        return cls(cfg, preset, cfg.model_tag(preset), model, train, tuple(targets_of(cfg)), night)

    def targets_for(self, item_id: str) -> list[Target]:
        """The image's targets: the configured ones, then its augmentation variants."""
        return [*self.targets, *(variants(self.cfg, item_id) if self.cfg.augment else [])]


class ItemError(Exception):
    """A per-image failure of a known kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def bundle_limit_s(timeout_s: float | None, n: int) -> float | None:
    """The time limit of a task of ``n`` images: the per-image limit ``timeout_s`` once for each,
    since they train at once; None for none."""
    return None if timeout_s is None else timeout_s * n


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
    if isinstance(exc, DivergedError):
        return "diverged", str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom", f"out of memory: {exc}"
    return "internal", f"{type(exc).__name__}: {exc}"


def process(item: Item, job: Job) -> Record:
    """Run one image end to end and return its record (never raises for a per-image problem)."""
    return process_bundle([item], job)[0]


def process_bundle(items: list[Item], job: Job) -> list[Record]:
    """Run images end to end, training those that need it as one bundle (``ingan.fit.fit_bundle``),
    and return one record per item, in order. Each image's failure is its own: a broken image,
    a diverged training or a failed write fails that row alone."""
    started = time.perf_counter()
    deadline = Deadline(bundle_limit_s(job.cfg.timeout_s, len(items)))
    folder = Folder(job.cfg.output, job.cfg.storage())
    out: list[Record | None] = [None] * len(items)
    ready: list[tuple[int, _Prepared]] = []
    for i, item in enumerate(items):
        try:
            prep = _prepare(item, job, folder, started)
        except Exception as exc:  # noqa: BLE001 - every per-image failure becomes a failure row
            out[i] = records.failed(item, *classify(exc), started)
            continue
        if isinstance(prep, dict):  # done before: skipped
            out[i] = prep
        else:
            ready.append((i, prep))
    trained = _train([p for _, p in ready if p.ckpt is None], job, deadline)
    for i, prep in ready:
        try:
            result = trained.get(prep.item.id) if prep.ckpt is None else None
            if isinstance(result, Exception):
                raise result
            out[i] = _finish(prep, job, result, deadline, started)
        except Exception as exc:  # noqa: BLE001
            out[i] = records.failed(prep.item, *classify(exc), started)
    return out  # type: ignore[return-value]


@dataclass
class _Prepared:
    """An image read, decoded and resolved, with its saved model or training state if any."""

    item: Item
    folder: Folder
    source: torch.Tensor  # (3, H, W) uint8
    targets: list[Target]
    shapes: dict[str, OutputKey]  # each target's output
    done: dict[str, Any] | None  # the marker of an earlier run
    ckpt: checkpoint.Checkpoint | None  # the saved model to reuse
    state: bytes | None  # a lost task's training state


def _prepare(item: Item, job: Job, folder: Folder, started: float) -> _Prepared | Record:
    """The first stage: what the image needs from storage; a record where it was done before."""
    cfg = job.cfg
    targets = job.targets_for(item.id)
    names = {t.name for t in targets}
    marker_rel = layout.marker_path(item.id, job.tag)
    done = _read_marker(folder, marker_rel) if cfg.resume == "incremental" else None
    # Done before, unless a run of this night made samples of it that never reached a shard: the
    # image is retargeted again (its saved model reused) to make them.
    if done is not None and names <= set(done["targets"]) \
            and not shards.pending(done["outputs"], names, job.night, item.shard_done):
        return _skipped(item, folder, done, targets, started)

    data = read_uri(check_uri(item.uri, cfg.allowed_schemes), folder.storage, max_bytes=cfg.max_image_bytes)
    source = images.decode(data, cfg.max_image_pixels)  # (3, H, W) uint8
    src_h, src_w = source.shape[-2:]
    if min(src_h, src_w) < cfg.min_image_side:
        raise ItemError("too_small", f"image is {src_w}x{src_h}: at least {cfg.min_image_side} px per side is needed to train")
    # Each target's (W, H, shifts), known before any training; several may be the same output.
    shapes = {t.name: (*t.resolve(src_w, src_h, cfg.ratio_policy), t.shifts) for t in targets}
    model_rel, state_rel = layout.model_path(item.id, job.tag), layout.training_state_path(item.id, job.tag)
    # The saved model, when this run may reuse one (fan-out to new targets costs no training);
    # else the training state a lost task left, to continue from.
    saved = _read_if_there(folder, model_rel) if cfg.resume == "incremental" or cfg.retarget_only else None
    if saved is None and cfg.retarget_only:
        raise ItemError("no_model", "retarget-only run, but this image has no saved model")
    ckpt = None
    if saved is not None:
        with contextlib.suppress(checkpoint.CheckpointError):  # a damaged model is retrained, not trusted
            ckpt = checkpoint.load(saved)
    state = None if ckpt is not None else _read_if_there(folder, state_rel, missing_ok=True)
    return _Prepared(item, folder, source, targets, shapes, done, ckpt, state)


def _train(preps: list[_Prepared], job: Job, deadline: Deadline) -> dict[str, Fit | Exception]:
    """Train the images that need it as one bundle; each one's model is stored (and its
    training state removed) as soon as the bundle ends. Returns each image's fit or error."""
    if not preps:
        return {}
    cfg = job.cfg
    writers = [_state_writer(p.folder, layout.training_state_path(p.item.id, job.tag)) for p in preps]
    train_cfgs = [dataclasses.replace(job.train, seed=records.item_seed(cfg.seed, p.item.id)) for p in preps]
    try:
        fits = fit_bundle([p.source for p in preps], job.preset, job.model, train_cfgs, "auto", progress=deadline.check,
                          states=[p.state for p in preps], snapshot=lambda k, data: writers[k](data),
                          snapshot_every_s=cfg.checkpoint_every_s, metas=[{"id": p.item.id} for p in preps])
    except Exception as exc:  # noqa: BLE001 - the bundle's own failure (a time limit) is each image's
        return {p.item.id: exc for p in preps}
    out: dict[str, Fit | Exception] = {}
    for prep, result in zip(preps, fits, strict=True):
        out[prep.item.id] = result
        state_rel = layout.training_state_path(prep.item.id, job.tag)
        if isinstance(result, DivergedError):
            # Its last saved state may hold the divergence already: a rerun starts it over.
            with contextlib.suppress(StorageError):
                prep.folder.remove(state_rel)
        if isinstance(result, Exception):
            continue
        try:
            model_rel = layout.model_path(prep.item.id, job.tag)
            prep.folder.write_bytes(model_rel, checkpoint.save(result.checkpoint))  # before any output
            # The model supersedes the state; one left behind by a failed removal is never used.
            with contextlib.suppress(StorageError):
                prep.folder.remove(state_rel)
        except Exception as exc:  # noqa: BLE001
            out[prep.item.id] = exc
    return out


def _finish(prep: _Prepared, job: Job, fitted: Fit | None, deadline: Deadline, started: float) -> Record:
    """The last stages: the outputs made, then stored with the marker last."""
    item, folder, shapes, targets, done = prep.item, prep.folder, prep.shapes, prep.targets, prep.done
    ckpt = prep.ckpt if fitted is None else fitted.checkpoint
    assert ckpt is not None
    train_seconds = None if fitted is None else fitted.seconds
    src_h, src_w = prep.source.shape[-2:]
    model_rel, marker_rel = layout.model_path(item.id, job.tag), layout.marker_path(item.id, job.tag)
    unique = sorted(set(shapes.values()), key=lambda k: (k[0], k[1], k[2] or (0.0, 0.0)))
    made = _outputs(ckpt, prep.source, unique, job, deadline)
    written = {key: _write_output(folder, item, job, key, enc) for key, enc in made.encoded.items()}
    outputs = [{**written[shapes[t.name]], **made.scores.get(shapes[t.name], records.UNSCORED), "ratio": t.ratio,
                "target": t.name, "variant": t.variant, "scale": t.scale} for t in targets]
    # What earlier runs made with this same saved model (a model trained now makes it stale), by target.
    before = {o["target"]: o for o in (done or {}).get("outputs", []) if train_seconds is None and isinstance(o, dict)
              and isinstance(o.get("target"), str)}
    added = shards.mark(outputs, before, item, job.tag, job.night, job.cfg.keep)
    samples = [shards.sample(item, job.tag, outputs[k], made.encoded[shapes[targets[k].name]]) for k in added]
    preview_rel = layout.source_preview_path(item.id, job.tag)
    folder.write_bytes(preview_rel, made.preview)
    folder.write_json(layout.metrics_path(item.id, job.tag), {"id": item.id, "outputs": outputs})
    # Outputs that earlier runs made with this same saved model stay listed (their files are
    # still there), so a rerun of any earlier night's targets is skipped, not retargeted again.
    # A model trained now (none saved, or a damaged one) makes them stale: they are dropped.
    earlier = [o for target, o in before.items() if target not in shapes]
    marker = {"version": MARKER_VERSION, "id": item.id, "uri": item.uri,
              "targets": sorted({*shapes, *(o["target"] for o in earlier)}),
              "outputs": outputs + earlier, "source_width": src_w, "source_height": src_h,
              "model_rel": model_rel, "source_rel": preview_rel}
    folder.write_json(marker_rel, marker)  # last: its presence means everything above exists
    return records.ok(item, started, outputs=outputs, source_rel=preview_rel, source_width=src_w,
                      source_height=src_h, model_uri=folder.uri(model_rel), train_seconds=train_seconds,
                      samples=samples)


def _read_if_there(folder: Folder, rel: str, missing_ok: bool = False) -> bytes | None:
    """The object's bytes, or None where there is none. With ``missing_ok`` an object that cannot
    be read is as good as missing (a training state: without it, training starts over); without
    it, storage that cannot be read fails the image now, since it could not be written either."""
    try:
        return folder.read_if_there(rel)
    except StorageError:
        if missing_ok:
            return None
        raise


def _state_writer(folder: Folder, rel: str) -> Callable[[bytes], None]:
    """Saves the training state every ``checkpoint_every_s``, so a retried task (a lost worker or
    node, a killed driver's rerun) loses at most that much training. A resumed training ends
    with the same weights as an uninterrupted one, so resuming is right in every resume mode."""

    def write(data: bytes) -> None:
        # A missed save only means less to resume from: training goes on.
        with contextlib.suppress(StorageError):
            folder.write_bytes(rel, data)

    return write


@dataclass(frozen=True)
class _Made:
    encoded: dict[OutputKey, EncodedOutput]  # by (W, H, shifts)
    scores: dict[OutputKey, dict[str, float]]  # empty when metrics are off
    preview: bytes  # the source as a small JPEG, for the report


def _outputs(ckpt: checkpoint.Checkpoint, source: torch.Tensor, keys: list[OutputKey], job: Job,
             deadline: Deadline) -> _Made:
    """Every output of the image, encoded, with its scores: all the model work after training."""
    cfg = job.cfg
    g = ckpt.build_generator(pick_device("auto"))
    outs = retarget_image(g, source, [(h, w) for w, h, _ in keys], ckpt.train.max_side, [sh for _, _, sh in keys])
    # Each output beside a bicubic resize to the same size (and frame), scored the same way: the
    # verdict a nightly job filters on.
    scores = quality.score_against_resize(source, dict(zip(keys, outs, strict=True)), cfg.metrics_max_side) if cfg.metrics else {}
    encoded = {key: encode_output(out, cfg.image_format, key[2], tuple(cfg.fill_color)) for key, out in zip(keys, outs, strict=True)}
    made = _Made(encoded, scores, images.thumbnail_jpeg(images.to_pil(source), 256))
    deadline.check()  # nothing is written for an image past its limit
    return made


def _write_output(folder: Folder, item: Item, job: Job, key: OutputKey, enc: EncodedOutput) -> dict[str, Any]:
    """Store one encoded output (and a JPEG's frame mask) and return its record fields; with files
    off, only the fields (the output is in the shards alone)."""
    w, h, shifts = key
    fields: dict[str, Any] = {"width": w, "height": h, "rel": None, "uri": None,
                              "shift_left": 0.0 if shifts is None else shifts[0],
                              "shift_right": 0.0 if shifts is None else shifts[1],
                              "mask_uri": None, "mask_rel": None}
    if not job.cfg.files:
        return fields
    rel = layout.output_path(item.id, job.tag, w, h, enc.ext, shifts)
    fields.update(rel=rel, uri=folder.write_bytes(rel, enc.data))
    if enc.mask is not None:
        mask_rel = layout.mask_path(item.id, job.tag, w, h, shifts)  # type: ignore[arg-type]
        fields.update(mask_rel=mask_rel, mask_uri=folder.write_bytes(mask_rel, enc.mask))
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
