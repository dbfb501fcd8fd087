"""Runs that overlap in one output folder: the same command started twice, two shards at once, a
killed run and two reruns, locally and on the S3 server (moto on loopback).

Each run is ``run.py`` in a process of its own with a local Ray of its own (``RAY_ADDRESS=local``),
as two users or two cron jobs start them; the second starts once the first's heartbeat is
written (its Ray is up and its tasks go out) and the test checks, from the second's log, that the
first was live then. What must hold: every manifest row once in the final ``results.parquet``,
with a status its files bear out, both runs exiting 0, and nothing left of either run but its
results (no parts, heartbeat or lock). Last, a run in this process that finds ``results.lock``
taken for longer than it may wait: its rows go to a table of its own, and it exits 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import Source, parquet_bytes, photo_sources, run_main, session_members

from pipeline import layout
from pipeline.results import RUNS_KEY

REPO = Path(__file__).resolve().parents[2]
NAMES = ("astronaut.png", "brick.png", "chelsea.png", "coffee.png", "grass.png", "gravel.png", "horse.png", "rocket.jpg")
SHORT_SIDE = 40
ITERATIONS = "30"  # enough that the first run still trains when the second's Ray is up
RUN = ["--preset", "tiny", "--iterations", ITERATIONS, "--ratios", "1,2", "--no-metrics", "--max-in-flight", "2"]
RUN_LINE = re.compile(r"^run (\S+); other live runs in this output: (.*)$", re.MULTILINE)

pytestmark = pytest.mark.slow


def _sources(folder: Path, names: tuple[str, ...] = NAMES) -> list[Source]:
    return photo_sources(folder, names, SHORT_SIDE)


def _manifest(path: Path, sources: list[Source], uris: list[str] | None = None) -> Path:
    path.write_bytes(parquet_bytes(pa.table({"uri": uris or [str(s.path) for s in sources],
                                             "id": [s.id for s in sources]})))
    return path


@dataclass
class Drivers:
    """``run.py`` processes, each in a session of its own with its own local Ray; every process
    of every session is killed when the test ends, whatever happened."""

    cwd: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> None:
        with (self.cwd / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(REPO / "run.py"), *argv], cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_ADDRESS": "local"}, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.cwd / f"{name}.log").read_text(errors="replace")

    def until(self, ready: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} ended before {what}:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        return {name: proc.wait(timeout=max(1.0, deadline - time.monotonic())) for name, proc in self.procs.items()}

    def kill(self, name: str) -> None:
        """SIGKILL the driver and every Ray process it started, as a crash or ``kill -9`` would."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, _ in session_members(proc.pid):  # ours: they are in the session we started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.kill(name)


@pytest.fixture
def drivers(tmp_path: Path) -> Iterator[Drivers]:
    d = Drivers(tmp_path)
    try:
        yield d
    finally:
        d.close()


def _run_line(log: str) -> tuple[str, set[str]]:
    """The run's id and the other runs it found live at its start, from its log."""
    found = RUN_LINE.search(log)
    assert found, log[-3000:]
    others = found.group(2)
    return found.group(1), set() if others == "none" else set(others.split(", "))


def _segments(table_bytes: bytes) -> list[dict[str, Any]]:
    return json.loads(pq.ParquetFile(io.BytesIO(table_bytes)).metadata.metadata[RUNS_KEY])


def _check_rows(rows: list[dict[str, Any]], sources: list[Source], read: Callable[[str], bytes]) -> None:
    """Every source once, in manifest order, ``ok`` or ``skipped``, its model and both outputs
    there and whole at their sizes."""
    assert [r["id"] for r in rows] == [s.id for s in sources]
    for row, src in zip(rows, sources, strict=True):
        assert row["status"] in ("ok", "skipped"), row
        assert row["error"] is None
        assert read(row["model_uri"])
        h = src.size[1]
        assert [(o["width"], o["height"]) for o in row["outputs"]] == [(h, h), (2 * h, h)]
        for o in row["outputs"]:
            with Image.open(io.BytesIO(read(o["uri"]))) as img:
                img.load()
                assert img.size == (o["width"], o["height"]), o["uri"]


def _local_leftovers(out: Path) -> list[str]:
    """What a run leaves while it lives (parts, heartbeat, lock, a table put aside), if still there."""
    found = [*out.glob(f"{layout.PARTS_DIR}/*"), *out.glob(f"{layout.RUNS_DIR}/*"), *out.glob("results.*.parquet")]
    if (out / layout.RESULTS_LOCK).exists():
        found.append(out / layout.RESULTS_LOCK)
    return [str(p.relative_to(out)) for p in found]


def _overlapping_pair(drivers: Drivers, first: list[str], second: list[str], started: Callable[[], bool]) -> dict[str, int]:
    """``first``, then ``second`` once ``started()`` says the first's heartbeat is written; both
    to their end. The second's log must show the first live at its start."""
    drivers.start("first", first)
    drivers.until(started, "heartbeat of the first run")
    drivers.start("second", second)
    codes = drivers.wait()
    first_id, _ = _run_line(drivers.log("first"))
    _, live = _run_line(drivers.log("second"))
    assert first_id in live, "the first run had ended before the second started: no overlap was tested"
    return codes


def test_the_same_command_twice_at_once_lists_every_row_once(tmp_path: Path, drivers: Drivers) -> None:
    sources = _sources(tmp_path / "images")
    out = tmp_path / "out"
    argv = [str(_manifest(tmp_path / "manifest.parquet", sources)), "--output", str(out), *RUN]
    codes = _overlapping_pair(drivers, argv, argv, lambda: any((out / layout.RUNS_DIR).glob("*.json")))

    assert codes == {"first": 0, "second": 0}, drivers.log("first")[-2000:] + drivers.log("second")[-2000:]
    data = (out / "results.parquet").read_bytes()
    _check_rows(pq.read_table(io.BytesIO(data)).to_pylist(), sources, lambda uri: Path(uri).read_bytes())
    assert [s["rows"] for s in _segments(data)] == [len(sources)]  # one run's rows: complete for the manifest
    assert _local_leftovers(out) == []


def test_two_shards_at_once_end_in_one_table(tmp_path: Path, drivers: Drivers) -> None:
    sources = _sources(tmp_path / "images")
    shards = {"first": sources[:4], "second": sources[4:]}
    out = tmp_path / "out"
    argv = {name: [str(_manifest(tmp_path / f"{name}.parquet", shard)), "--output", str(out), *RUN]
            for name, shard in shards.items()}
    codes = _overlapping_pair(drivers, argv["first"], argv["second"],
                              lambda: any((out / layout.RUNS_DIR).glob("*.json")))

    assert codes == {"first": 0, "second": 0}
    data = (out / "results.parquet").read_bytes()
    rows = {r["id"]: r for r in pq.read_table(io.BytesIO(data)).to_pylist()}
    assert len(rows) == pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == len(sources)  # each row once
    offset = 0
    ids = {_run_line(drivers.log(name))[0]: name for name in shards}
    for seg in _segments(data):  # each run's rows together, in its manifest's order
        name = ids[seg["run"]]
        in_table = list(rows)[offset:offset + seg["rows"]]
        offset += seg["rows"]
        assert in_table == [s.id for s in shards[name]]
        _check_rows([rows[i] for i in in_table], shards[name], lambda uri: Path(uri).read_bytes())
        # Each run's log names its own rows.
        assert f"({len(shards[name])} rows of run {seg['run']}" in drivers.log(name)
    assert offset == len(sources) and set(ids.values()) == set(shards)
    assert _local_leftovers(out) == []


def test_a_killed_run_then_two_overlapping_reruns(tmp_path: Path, drivers: Drivers) -> None:
    sources = _sources(tmp_path / "images")
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("heartbeat_s: 1\nstale_after_s: 6\n")  # a killed run is dead within seconds
    argv = [str(_manifest(tmp_path / "manifest.parquet", sources)), "--output", str(out), "--config", str(config), *RUN]
    # One image at a time (the same models: in flight is not a model setting), so that it is
    # still mid-way when its first rows reach storage, about 10 s in.
    drivers.start("killed", [*argv, "--max-in-flight", "1"])
    drivers.until(lambda: any(out.glob(f"{layout.PARTS_DIR}/*/part-*.parquet")), "the killed run's first rows")
    killed_id, _ = _run_line(drivers.log("killed"))
    drivers.kill("killed")
    finished = {p.parent.parent.name for p in out.glob("items/*/*/done.json")}
    assert 1 <= len(finished) < len(sources)
    assert not (out / "results.parquet").exists()
    beat = out / layout.heartbeat_path(killed_id)
    assert beat.exists()  # a crash leaves its heartbeat: it goes stale
    time.sleep(max(0.0, json.loads(beat.read_text())["heartbeat"] + 6.5 - time.time()))

    # The first rerun removes the killed run's heartbeat as soon as it has written its own.
    codes = _overlapping_pair(drivers, argv, argv,
                              lambda: any(p.stem != killed_id for p in (out / layout.RUNS_DIR).glob("*.json")))
    assert codes == {"first": 0, "second": 0}
    logs = drivers.log("first") + drivers.log("second")
    assert killed_id not in _run_line(drivers.log("first"))[1]  # dead, not live
    removed = re.search(r"^removed what dead runs left \(.*\): (.*)$", logs, re.MULTILINE)
    assert removed, logs[-3000:]
    assert set(removed.group(1).split(", ")) == {layout.run_parts_dir(killed_id), layout.heartbeat_path(killed_id)}
    rows = pq.read_table(out / "results.parquet").to_pylist()
    _check_rows(rows, sources, lambda uri: Path(uri).read_bytes())
    for row in rows:  # the images the killed run finished are not redone
        if layout.item_key(row["id"]) in finished:
            assert row["status"] == "skipped", row
    assert _local_leftovers(out) == []


def test_the_same_command_twice_at_once_on_s3(tmp_path: Path, drivers: Drivers, s3_client: Any, s3_bucket: str,
                                              s3_endpoint: str) -> None:
    sources = _sources(tmp_path / "images", NAMES[:6])
    for s in sources:
        s3_client.put_object(Bucket=s3_bucket, Key=f"images/{s.path.name}", Body=s.path.read_bytes())
    s3_client.put_object(Bucket=s3_bucket, Key="manifest.parquet", Body=_manifest(
        tmp_path / "manifest.parquet", sources, [f"s3://{s3_bucket}/images/{s.path.name}" for s in sources]).read_bytes())
    config = tmp_path / "run.yaml"
    config.write_text("storage_options:\n  key: testing\n  secret: testing\n")
    argv = [f"s3://{s3_bucket}/manifest.parquet", "--output", f"s3://{s3_bucket}/out", "--config", str(config),
            "--endpoint-url", s3_endpoint, *RUN]

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])]

    def read(uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()

    codes = _overlapping_pair(drivers, argv, argv, lambda: bool(keys(f"out/{layout.RUNS_DIR}/")))
    assert codes == {"first": 0, "second": 0}, drivers.log("first")[-2000:] + drivers.log("second")[-2000:]
    data = read(f"s3://{s3_bucket}/out/results.parquet")
    _check_rows(pq.read_table(io.BytesIO(data)).to_pylist(), sources, read)
    assert [s["rows"] for s in _segments(data)] == [len(sources)]
    leftovers = [k for k in keys("out/") if k.startswith(("out/results.parts/", "out/runs/", "out/results.lock"))
                 or re.fullmatch(r"out/results\..+\.parquet", k)]
    assert leftovers == []


def test_a_run_that_cannot_take_the_lock_puts_its_rows_aside(tmp_path: Path, local_ray: None) -> None:
    """results.lock held by a live run for longer than lock_wait_s: the rows are kept in a
    table of the run's own, the log names it and the exit code is 1."""
    sources = _sources(tmp_path / "images", NAMES[:1])
    out = tmp_path / "out"
    out.mkdir()
    (out / layout.RESULTS_LOCK).write_text('{"run_id": "a run still writing"}')
    config = tmp_path / "run.yaml"
    config.write_text("lock_wait_s: 1\n")
    code, log = run_main([str(_manifest(tmp_path / "manifest.parquet", sources)), "--output", str(out),
                          "--config", str(config), "--preset", "tiny", "--iterations", "2", "--ratios", "1,2",
                          "--no-metrics"])
    assert code == 1, log
    run_id, _ = _run_line(log)
    aside = out / layout.side_results_path(run_id)
    assert f"this run's 1 rows are in {aside}" in log
    _check_rows(pq.read_table(aside).to_pylist(), sources, lambda uri: Path(uri).read_bytes())
    assert not (out / "results.parquet").exists()
    assert (out / layout.RESULTS_LOCK).read_text() == '{"run_id": "a run still writing"}'
    assert not any(out.glob(f"{layout.PARTS_DIR}/*")) and not any(out.glob(f"{layout.RUNS_DIR}/*"))
