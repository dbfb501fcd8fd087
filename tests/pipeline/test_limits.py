"""Limits, in process (no Ray): bad manifests and configs stop the run before anything runs,
and the per-image guards (time limit, out-of-memory retry, byte/pixel/side limits, target size)
turn into specific failure records from ``pipeline.task.process``.

See docs/reliability_inputs.md for the table of every input tried and where it is tested.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import parquet_bytes as _parquet
from support import run_refused

import ingan.fit as fit_module
from ingan import checkpoint
from pipeline import driver, layout
from pipeline.config import RunConfig
from pipeline.task import Item, Job, process

# --------------------------------------------------------------------------- helpers




def _noise(path: Path, size: tuple[int, int] = (48, 48), seed: int = 0) -> Path:
    w, h = size
    arr = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


def _job(out: Path, **settings: Any) -> Job:
    """A Job as ``driver.run`` builds it: absolute output, resolved preset, the config's tag."""
    settings = {"preset": "tiny", "iterations": 2, "metrics": False, "ratios": [1.0], **settings}
    cfg = driver.absolute_output(RunConfig(output=str(out), **settings))
    return Job.of(cfg, "tiny")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def good_manifest(tmp_path: Path) -> Path:
    images = tmp_path / "in"
    images.mkdir()
    _noise(images / "a.png")
    path = images / "manifest.parquet"
    pq.write_table(pa.table({"uri": ["a.png"]}), path)
    return path


# --------------------------------------------------------------------------- 3. nothing runs


BAD_MANIFESTS: dict[str, tuple[Callable[[], bytes], list[str]]] = {
    "no_uri_column": (
        lambda: _parquet(pa.table({"path": ["a.png"], "id": ["a"]})),
        ["has no 'uri' column", "columns: path, id"],
    ),
    "uri_of_int_type": (
        lambda: _parquet(pa.table({"uri": [1, 2]})),
        ["column 'uri' must be string, got int64"],
    ),
    "empty": (lambda: _parquet(pa.table({"uri": pa.array([], pa.string())})), ["has no rows"]),
    "corrupt_bytes": (
        lambda: b"PAR1 this is not parquet at all PAR1",
        ["is not a readable Parquet file"],
    ),
    "truncated_parquet": (
        lambda: _parquet(pa.table({"uri": ["a.png"] * 50}))[:-40],
        ["is not a readable Parquet file"],
    ),
    "duplicate_ids": (
        lambda: _parquet(pa.table({"uri": ["a.png", "b.png", "c.png"], "id": ["x", "y", "x"]})),
        ["duplicate ids", "'x' at rows 0, 2"],
    ),
    "duplicate_derived_ids": (
        lambda: _parquet(pa.table({"uri": ["a.png", "b.png", "a.png"]})),
        ["duplicate ids (derived from 'uri')", "at rows 0, 2"],
    ),
    "null_id": (
        lambda: _parquet(pa.table({"uri": ["a.png", "b.png"], "id": ["x", None]})),
        ["column 'id' is null at rows 1"],
    ),
    "id_of_int_type": (
        lambda: _parquet(pa.table({"uri": ["a.png", "b.png"], "id": [1, 2]})),
        ["column 'id' must be string, got int64"],
    ),
    "repeated_column": (
        lambda: _parquet(
            pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["b.png"])], names=["uri", "uri"])
        ),
        ["more than one column named uri"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_stops_before_anything_runs(tmp_path: Path, no_ray: None, case: str) -> None:
    make, phrases = BAD_MANIFESTS[case]
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(make())
    log = run_refused([str(manifest), "--output", str(tmp_path / "out"), "--preset", "tiny"], phrases)
    assert "error: " in log and str(manifest) in log, log  # names the file


BAD_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "ratio_0": (["--ratios", "0"], ["ratios: ", "ratio 0.0 must be a positive number"]),
    "ratio_-1": (["--ratios=-1"], ["ratios: ", "ratio -1.0 must be a positive number"]),
    "ratio_1000": (["--ratios", "1000"], ["ratios: ", "ratio 1000.0 is absurd"]),
    "ratio_nan": (["--ratios", "nan"], ["ratios: ", "ratio nan must be a positive number"]),
    "ratio_inf": (["--ratios", "inf"], ["ratios: ", "must be a positive number"]),
    "ratio_text": (["--ratios", "wide"], ["cannot parse 'wide'"]),
    "size_0x10": (["--sizes", "0x10"], ["sizes: ", "'0x10'", "too small: each side must be at least 8 px"]),
    "size_99999x10": (["--sizes", "99999x10"], ["sizes: ", "'99999x10'", "too large: each side must be at most 16384 px"]),
    "size_text": (["--sizes", "huge"], ["sizes: ", "WIDTHxHEIGHT", "'huge'"]),
    "unknown_preset": (["--preset", "enormous"], ["preset: ", "unknown preset 'enormous'"]),
    "iterations_0": (["--iterations", "0"], ["iterations: "]),
    "timeout_negative": (["--timeout", "-5"], ["timeout_s: "]),
    "num_cpus_0": (["--num-cpus", "0"], ["num_cpus: "]),
    "nothing_to_produce": (["--ratios", ","], ["nothing to produce"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_stops_before_anything_runs(tmp_path: Path, good_manifest: Path, no_ray: None, case: str) -> None:
    flags, phrases = BAD_FLAGS[case]
    run_refused([str(good_manifest), "--output", str(tmp_path / "out"), *flags], phrases)


BAD_YAML: dict[str, tuple[str, list[str]]] = {
    "unknown_key": ("preset: tiny\ncolour: red\n", ["colour: Extra inputs are not permitted"]),
    "list_not_mapping": ("- preset\n- tiny\n", ["must be a mapping of field: value"]),
    "scalar_not_mapping": ("just some text\n", ["must be a mapping of field: value"]),
    "invalid_yaml": ("ratios: [1, 2\n", ["is not valid YAML"]),
    "ratio_wrong_type": ("ratios: wide\n", ["ratios: "]),
    "allowed_schemes_wrong_type": ("allowed_schemes: 3\n", ["allowed_schemes: "]),
    "max_image_pixels_0": ("max_image_pixels: 0\n", ["max_image_pixels: "]),
    "min_image_side_8": ("min_image_side: 8\n", ["min_image_side: ", "17"]),
    "storage_options_not_mapping": ("storage_options: [a, b]\n", ["storage_options: "]),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml_config_stops_before_anything_runs(tmp_path: Path, good_manifest: Path, no_ray: None, case: str) -> None:
    text, phrases = BAD_YAML[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    run_refused([str(good_manifest), "--output", str(tmp_path / "out"), "--config", str(config)], phrases)


def test_missing_config_file_stops_before_anything_runs(tmp_path: Path, good_manifest: Path, no_ray: None) -> None:
    missing = tmp_path / "nope.yaml"
    argv = [str(good_manifest), "--output", str(tmp_path / "out"), "--config", str(missing)]
    run_refused(argv, [f"cannot read config {missing}"])


# --------------------------------------------------------------------------- 5. time and memory


def test_timeout_gives_a_timeout_record_quickly(tmp_path: Path, single_thread: None) -> None:
    # Small, so the 50 iterations between two deadline checks are quick.
    src = _noise(tmp_path / "a.png", (32, 32))
    out = tmp_path / "out"
    job = _job(out, iterations=5000, timeout_s=0.5)
    t0 = time.monotonic()
    rec = process(Item(0, "slow", str(src), {}), job)
    elapsed = time.monotonic() - t0
    assert rec["status"] == "failed", rec
    assert rec["error_kind"] == "timeout", rec
    assert rec["error"] == "exceeded the per-image limit of 0.5 s", rec
    assert elapsed < 10, f"the 0.5 s limit took {elapsed:.1f} s to act"
    assert rec["outputs"] == [] and rec["model_uri"] is None
    assert not (out / layout.marker_path("slow", job.tag)).exists()
    assert not (out / layout.model_path("slow", job.tag)).exists()


def _fake_train(monkeypatch: pytest.MonkeyPatch, failures: int, exc: BaseException) -> list[Any]:
    """Patch the training under ``ingan.fit.fit`` to raise ``exc`` on its first ``failures`` calls
    and train for real after that; returns the list of train configs it was called with."""
    real = fit_module._fit_groups
    calls: list[Any] = []

    def fake(members: Any, job: Any) -> Any:
        calls.extend(m.cfg for m in members)
        if len(calls) <= failures:
            raise exc
        return real(members, job)

    monkeypatch.setattr(fit_module, "_fit_groups", fake)
    return calls


FakeTrain = Callable[[int, BaseException], list[Any]]


def _cuda_oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory (test)")


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> FakeTrain:
    """``_fake_train`` for this test: ``fake_train(failures, exc)`` -> the train configs used."""
    return functools.partial(_fake_train, monkeypatch)


def test_oom_once_retries_smaller_and_succeeds(tmp_path: Path, fake_train: FakeTrain, single_thread: None) -> None:
    calls = fake_train(1, _cuda_oom())
    src = _noise(tmp_path / "a.png", (120, 100))  # larger than tiny's 96 px working side
    out = tmp_path / "out"
    job = _job(out, sizes=["40x30"])
    rec = process(Item(0, "big", str(src), {}), job)
    assert rec["status"] == "ok", rec
    assert len(calls) == 2
    first, second = calls
    assert second.crop_size < first.crop_size, (first, second)
    assert second.max_side < first.max_side, (first, second)
    assert second.seed == first.seed  # the same image seed: a retried task stays reproducible
    # The saved model records the settings it was actually trained with.
    saved = checkpoint.load((out / layout.model_path("big", job.tag)).read_bytes())
    assert (saved.train.crop_size, saved.train.max_side) == (second.crop_size, second.max_side)
    sizes = [(o["width"], o["height"]) for o in rec["outputs"]]
    assert sizes == [(100, 100), (40, 30)]
    for o in rec["outputs"]:
        with Image.open(o["uri"]) as im:
            assert im.size == (o["width"], o["height"])
    assert (out / layout.marker_path("big", job.tag)).is_file()


def test_oom_twice_is_an_oom_failure(tmp_path: Path, fake_train: FakeTrain, single_thread: None) -> None:
    calls = fake_train(2, _cuda_oom())
    src = _noise(tmp_path / "a.png")
    out = tmp_path / "out"
    job = _job(out)
    rec = process(Item(0, "huge", str(src), {}), job)
    assert len(calls) == 2
    assert rec["status"] == "failed" and rec["error_kind"] == "oom", rec
    assert (
        rec["error"].startswith("out of memory: ") and "CUDA out of memory (test)" in rec["error"]
    )
    assert not out.exists() or _files(out) == []  # no model, no marker


def test_host_memory_error_is_oom_without_retry(tmp_path: Path, fake_train: FakeTrain) -> None:
    calls = fake_train(5, MemoryError())
    src = _noise(tmp_path / "a.png")
    rec = process(Item(0, "ram", str(src), {}), _job(tmp_path / "out"))
    assert len(calls) == 1  # only a device OOM is retried smaller
    assert rec["status"] == "failed" and rec["error_kind"] == "oom", rec


# --------------------------------------------------------------------------- access denied

REPO = Path(__file__).resolve().parents[2]
_PROCESS_ONE = """
import json, sys
from pipeline.config import RunConfig
from pipeline.task import Item, Job, process
cfg = RunConfig(output=sys.argv[2], preset="tiny", iterations=2, metrics=False, ratios=[1.0])
print(json.dumps(process(Item(0, "locked", sys.argv[1], {}), Job.of(cfg, "tiny"))))
"""


def test_unreadable_local_file_is_access_denied(tmp_path: Path) -> None:
    """A mode-000 file. Root reads it anyway (CAP_DAC_OVERRIDE), so as root the task runs in a
    child process stripped of the two capabilities that bypass file permissions."""
    src = _noise(tmp_path / "locked.png")
    src.chmod(0)
    out = tmp_path / "out"
    try:
        if os.geteuid() != 0:
            rec = process(Item(0, "locked", str(src), {}), _job(out))
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip(
                    "running as root and setpriv (util-linux) is missing: cannot drop CAP_DAC_OVERRIDE"
                )
            caps = "-dac_override,-dac_read_search"
            proc = subprocess.run(
                [
                    setpriv,
                    f"--inh-caps={caps}",
                    f"--bounding-set={caps}",
                    sys.executable,
                    "-c",
                    _PROCESS_ONE,
                    str(src),
                    str(out),
                ],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        src.chmod(0o644)
    assert rec["status"] == "failed", rec
    assert rec["error_kind"] == "access_denied", rec
    assert rec["error"].startswith("access denied: ") and "Permission denied" in rec["error"]
    assert str(src) in rec["error"]
    assert not out.exists()


# --------------------------------------------------------------------------- configured limits


# limit -> (source size, settings, error_kind, error: {size} is the file's bytes, {src} its path)
LIMITS: dict[str, tuple[tuple[int, int], dict[str, Any], str, str]] = {
    "max_image_bytes": ((48, 48), {"max_image_bytes": 100}, "storage",
                        "object is {size} bytes, over the 100-byte limit: {src}"),
    "max_image_pixels": ((48, 48), {"max_image_pixels": 1000}, "decode",
                         "declared size 48x48 (2,304 pixels) exceeds the 1,000-pixel limit (decompression bomb?)"),
    "min_image_side": ((48, 48), {"min_image_side": 64}, "too_small",
                       "image is 48x48: at least 64 px per side is needed to train"),
    "output_side": ((24, 600), {"ratios": [32.0]}, "target",
                    "ratio 32.0 with keep_height gives 19200x600, over the 16384 px limit"),
}  # fmt: skip


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_a_configured_limit_refuses_the_image_before_training(tmp_path: Path, limit: str) -> None:
    size, settings, kind, message = LIMITS[limit]
    src = _noise(tmp_path / "a.png", size)
    out = tmp_path / "out"
    rec = process(Item(0, "lim", str(src), {}), _job(out, **settings))
    assert rec["status"] == "failed" and rec["error_kind"] == kind, rec
    assert rec["error"] == message.format(size=src.stat().st_size, src=src)
    assert rec["outputs"] == [] and rec["train_seconds"] is None
    assert not out.exists()  # refused before anything was trained or written
