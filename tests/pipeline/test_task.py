"""``pipeline.task.process`` called directly (no Ray) on inputs that must fail before any
training, and the mapping from exceptions to ``error_kind``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from ingan import checkpoint, images
from ingan.fit import DivergedError
from pipeline.config import RunConfig
from pipeline.storage import StorageError, UnsupportedURIError
from pipeline.targets import TargetError
from pipeline.task import Item, ItemError, Job, bundle_limit_s, classify, process


def _job(out: Path, **settings: Any) -> Job:
    cfg = RunConfig(
        output=str(out), preset="tiny", iterations=2, metrics=False, ratios=[1.0], **settings
    )
    return Job.of(cfg, "tiny")


def _process(tmp_path: Path, uri: str | None, **settings: Any) -> dict[str, Any]:
    return process(Item(0, "the-id", uri, {"note": "kept"}), _job(tmp_path / "out", **settings))


def _assert_failed(rec: dict[str, Any], kind: str) -> None:
    assert rec["status"] == "failed", rec
    assert rec["error_kind"] == kind, rec
    assert isinstance(rec["error"], str) and rec["error"].strip()
    assert rec["outputs"] == [] and rec["model_uri"] is None and rec["train_seconds"] is None
    assert rec["total_seconds"] is not None and rec["total_seconds"] >= 0
    assert rec["id"] == "the-id" and rec["carried"] == {"note": "kept"}


def test_zero_byte_file_is_a_decode_failure(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    rec = _process(tmp_path, str(path))
    _assert_failed(rec, "decode")
    assert "0 bytes" in rec["error"]
    assert not (tmp_path / "out").exists()  # nothing written for a failed image


def test_text_named_png_is_a_decode_failure(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    path.write_text("<html><body>404 not found</body></html>\n")
    rec = _process(tmp_path, str(path))
    _assert_failed(rec, "decode")
    assert "not a recognised image" in rec["error"]
    assert not (tmp_path / "out").exists()


def test_tiny_image_is_too_small(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (10, 10), (200, 30, 30)).save(path)
    rec = _process(tmp_path, str(path))
    _assert_failed(rec, "too_small")
    assert "10x10" in rec["error"] and "24" in rec["error"]
    assert not (tmp_path / "out").exists()


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    rec = _process(tmp_path, str(tmp_path / "gone.png"))
    _assert_failed(rec, "not_found")
    assert "gone.png" in rec["error"]


@pytest.mark.parametrize("uri", [None, "", "ftp://host/a.png", "s3:///no-bucket.png", "a\nb.png"])
def test_unusable_uris(tmp_path: Path, uri: str | None) -> None:
    _assert_failed(_process(tmp_path, uri), "uri")


def test_retarget_only_without_a_model_fails_without_training(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (32, 32), (10, 120, 200)).save(path)
    rec = _process(tmp_path, str(path), retarget_only=True)
    _assert_failed(rec, "no_model")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError(2, "No such file or directory", "bucket/a.png"), "not_found"),
        (PermissionError(13, "Access Denied", "bucket/a.png"), "access_denied"),
        (UnsupportedURIError("URI is null"), "uri"),  # a StorageError, but more specific
        (StorageError("read s3://b/a.png: ClientError: boom"), "storage"),
        (images.ImageDecodeError("not a recognised image format"), "decode"),
        (checkpoint.CheckpointError("not a readable checkpoint"), "checkpoint"),
        (TargetError("too large"), "target"),
        (ItemError("timeout", "exceeded the per-image limit"), "timeout"),
        (DivergedError("training diverged: a non-finite loss by iteration 100"), "diverged"),
        (MemoryError(), "oom"),
        (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
        (RuntimeError("something odd"), "internal"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    got_kind, message = classify(exc)
    assert got_kind == kind
    assert isinstance(message, str) and message


def test_classify_messages_name_the_object() -> None:
    kind, message = classify(FileNotFoundError(2, "No such file or directory", "bucket/a.png"))
    assert (
        kind == "not_found" and "bucket/a.png" in message and message.startswith("object not found")
    )
    kind, message = classify(PermissionError(13, "Access Denied", "bucket/a.png"))
    assert (
        kind == "access_denied"
        and "bucket/a.png" in message
        and message.startswith("access denied")
    )
    kind, message = classify(RuntimeError("something odd"))
    assert message == "RuntimeError: something odd"


@pytest.mark.parametrize("state", [b"", b"garbage" * 100, "other-image"])
def test_a_damaged_or_foreign_training_state_is_retrained_from_scratch(tmp_path: Path, state: bytes | str) -> None:
    """A training state that cannot be trusted is ignored: the image trains from the start, ends
    with the model an untouched run gives, and the state is gone afterwards."""
    from pipeline import layout, records

    src = tmp_path / "a.png"
    Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()).save(src)
    clean = process(Item(0, "img", str(src), {}), _job(tmp_path / "clean"))
    job = _job(tmp_path / "out")
    state_path = tmp_path / "out" / layout.training_state_path("img", job.tag)
    state_path.parent.mkdir(parents=True)
    if state == "other-image":  # a real state, of another picture under the same settings
        from ingan.fit import saved_state
        from ingan.images import to_model_input
        from ingan.train import Trainer

        model_cfg, train_cfg = job.cfg.model_settings("tiny")
        train_cfg = dataclasses.replace(train_cfg, seed=records.item_seed(job.cfg.seed, "img"))  # as the task seeds it
        other = Trainer([to_model_input(torch.rand(3, 40, 48))], model_cfg, train_cfg, "cpu")
        other.step()
        state_path.write_bytes(saved_state(other, 0))
    else:
        state_path.write_bytes(state)
    rec = process(Item(0, "img", str(src), {}), job)
    assert rec["status"] == "ok", rec
    assert not state_path.exists()
    models = [checkpoint.load(Path(r["model_uri"]).read_bytes()).generator for r in (clean, rec)]
    for k, v in models[0].items():
        assert torch.equal(v, models[1][k]), k


def test_a_diverged_training_is_its_rows_failure_and_its_saved_state_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training that diverges leaves no model, and no state a rerun would diverge from again."""
    import pipeline.task
    from pipeline import layout

    src = tmp_path / "a.png"
    Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()).save(src)
    job = _job(tmp_path / "out")
    state_path = tmp_path / "out" / layout.training_state_path("the-id", job.tag)
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(b"a state saved before the loss went non-finite")
    diverged = DivergedError("training diverged: a non-finite loss by iteration 2")
    monkeypatch.setattr(pipeline.task, "fit_bundle", lambda images, *a, **kw: [diverged for _ in images])
    rec = process(Item(0, "the-id", str(src), {"note": "kept"}), job)
    _assert_failed(rec, "diverged")
    assert "non-finite loss" in rec["error"]
    assert not state_path.exists()
    assert not (tmp_path / "out" / layout.model_path("the-id", job.tag)).exists()


def test_a_bundle_is_cancelled_past_the_limit_its_own_deadline_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import executor

    assert bundle_limit_s(None, 3) is None
    assert bundle_limit_s(10.0, 3) == 30.0  # its images train at once
    cancelled, recs = [], []
    monkeypatch.setattr(executor.ray, "cancel", lambda ref, force: cancelled.append(ref))
    items = [Item(i, f"id{i}", None, {}) for i in range(3)]
    overdue = time.monotonic() - 30.0 - executor._GRACE_S
    pending = {"late": executor._Pending(items, 1, overdue - 5), "in time": executor._Pending(items, 1, overdue + 60)}
    res = executor.Resources(num_cpus=1, num_gpus=0, max_in_flight=6, retries=0, timeout_s=10.0, bundle_size=3)
    executor._cancel_overdue(pending, res, lambda item, rec: recs.append(rec))
    assert cancelled == ["late"] and list(pending) == ["in time"]
    assert [r["error_kind"] for r in recs] == ["timeout"] * 3 and "no result within 30 s" in recs[0]["error"]
