"""Runs that overlap in one output folder: the same command started twice, two shards at once, a
killed run and two reruns, locally and on the S3 server (moto on loopback); and the results lock
between separate processes.

Each run is ``run.py`` in a process of its own with a local Ray of its own (``RAY_ADDRESS=local``),
as two users or two cron jobs start them. Where two runs share images, which one trains which
image is arranged, so that every row's status is known: the first trains one image at a time
until it has finished one and is training the next; then its Ray workers are stopped (SIGSTOP;
its driver and heartbeat live on, so it stays a live run) and the second runs to its end; then
the first is let go and finishes last. The first trained the images it had finished and the one
it was training; the second every other one not finished before it started; each skips the
images the other had marked done when it came to them. The test checks, from the second's log,
that the first was live when it started. What must hold: every manifest row once in
``results.parquet`` with exactly that status (``ok`` with its training time, or ``skipped``),
every model it names loading and retargeting, every output there and whole and what that model
makes, both runs exiting 0, and nothing left of either run but its results (no parts, heartbeat
or lock). Then a run in this process that finds ``results.lock`` taken for longer than it may
wait: its rows go to a table of its own, and it exits 1. Last, processes racing for the lock,
locally and on S3: one holder at a time.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import (
    Source,
    parquet_bytes,
    photo_sources,
    released_together,
    run_main,
    session_members,
    wait_for,
)

from ingan import checkpoint
from ingan.retarget import retarget_image
from pipeline import layout
from pipeline.results import RUNS_KEY
from pipeline.storage import Folder, Storage

REPO = Path(__file__).resolve().parents[2]
NAMES = ("astronaut.png", "brick.png", "chelsea.png", "coffee.png", "grass.png", "gravel.png", "horse.png", "rocket.jpg")
SHORT_SIDE = 40
ITERATIONS = "30"
RUN = ["--preset", "tiny", "--iterations", ITERATIONS, "--ratios", "1,2", "--no-metrics", "--max-in-flight", "2"]
RUN_LINE = re.compile(r"^run (\S+); other live runs in this output: (.*)$", re.MULTILINE)
# The names of an item folder's files, as the layout has them.
DONE, MODEL, STATE = (path("x", "t").rsplit("/", 1)[1]
                      for path in (layout.marker_path, layout.model_path, layout.training_state_path))

pytestmark = pytest.mark.slow


def _sources(folder: Path, names: tuple[str, ...] = NAMES) -> list[Source]:
    return photo_sources(folder, names, SHORT_SIDE)


def _manifest(path: Path, sources: list[Source], uris: list[str] | None = None) -> Path:
    path.write_bytes(parquet_bytes(pa.table({"uri": uris or [str(s.path) for s in sources],
                                             "id": [s.id for s in sources]})))
    return path


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")
    except OSError:
        return True


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

    def until(self, ready: Callable[[], Any], what: str) -> None:
        """Wait for ``ready()``, failing at once if a run ends first."""

        def check() -> Any:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} ended before {what}:\n{self.log(name)[-3000:]}"
            return ready()

        wait_for(check, what)

    def finish(self, name: str) -> int:
        """The run's exit code, once it has ended."""
        return self.procs[name].wait(timeout=300)

    def hold(self, name: str) -> list[int]:
        """Stop the run's Ray worker processes (``ray::`` titles, not Ray's agents) with SIGSTOP,
        once each is stopped: its tasks make no progress, while its driver lives on."""
        pids = [pid for pid, cmd in session_members(self.procs[name].pid)
                if cmd.startswith("ray::") and not cmd.split()[0].endswith("Agent")]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: all(map(_stopped, pids)), f"{name}'s workers stopped")
        return pids

    @staticmethod
    def let_go(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill(self, name: str) -> None:
        """SIGKILL the driver and every Ray process it started, as a crash or ``kill -9`` would."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        def gone() -> bool:
            for pid, _ in session_members(proc.pid):  # ours: they are in the session we started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not session_members(proc.pid)

        wait_for(gone, f"the end of every process of {name}")

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


def _with_file(listing: list[str], name: str) -> set[str]:
    """The item keys whose folder (``items/{key}/{tag}/``) holds ``name``, in a listing of the
    output's files (paths relative to it)."""
    return {p.split("/")[1] for p in listing if p.startswith("items/") and p.endswith(f"/{name}")}


def _local_listing(out: Path) -> Callable[[], list[str]]:
    return lambda: [str(p.relative_to(out)) for p in out.glob("items/*/*/*")]


def _ids(sources: list[Source], keys: set[str]) -> set[str]:
    assert keys <= {layout.item_key(s.id) for s in sources}
    return {s.id for s in sources if layout.item_key(s.id) in keys}


def _retargeted(model: bytes, source: Path, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """What the model (checkpoint bytes) makes of the source image file at each (H, W)."""
    ckpt = checkpoint.load(model)
    with Image.open(source) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    return retarget_image(ckpt.build_generator(), pixels, sizes, ckpt.train.max_side)


def _check_rows(rows: list[dict[str, Any]], sources: list[Source], read: Callable[[str], bytes],
                trained: set[str]) -> None:
    """Every source once, in manifest order; the images ``trained`` (ids) ``ok`` with their
    training time, every other one ``skipped`` (another run had finished it). Each row's model
    loads and retargets the source to a size of its own; its outputs are there and whole at
    their sizes, and are what that model makes of the source."""
    assert [r["id"] for r in rows] == [s.id for s in sources]
    for row, src in zip(rows, sources, strict=True):
        assert row["error"] is None, row
        if src.id in trained:
            assert row["status"] == "ok" and row["train_seconds"] > 0, row
        else:
            assert row["status"] == "skipped" and row["train_seconds"] is None, row
        h = src.size[1]
        assert [(o["width"], o["height"]) for o in row["outputs"]] == [(h, h), (2 * h, h)]
        sizes = [(o["height"], o["width"]) for o in row["outputs"]]
        *made, other = _retargeted(read(row["model_uri"]), src.path, [*sizes, (h + 5, 3 * h // 2)])
        assert other.shape == (3, h + 5, 3 * h // 2) and other.dtype == torch.uint8
        for o, want in zip(row["outputs"], made, strict=True):
            with Image.open(io.BytesIO(read(o["uri"]))) as img:
                img.load()
                got = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
            assert got.shape == want.shape, o["uri"]
            # The same model on another thread count may round a few pixels the other way.
            assert (got.int() - want.int()).abs().max() <= 1, o["uri"]


def _local_leftovers(out: Path) -> list[str]:
    """What a run leaves while it lives (parts, heartbeat, lock, a table put aside), if still there."""
    found = [*out.glob(f"{layout.PARTS_DIR}/*"), *out.glob(f"{layout.RUNS_DIR}/*"), *out.glob("results.*.parquet")]
    if (out / layout.RESULTS_LOCK).exists():
        found.append(out / layout.RESULTS_LOCK)
    return [str(p.relative_to(out)) for p in found]


@dataclass(frozen=True)
class Overlap:
    """Two runs of one manifest, the second started and ended while the first was held."""

    codes: dict[str, int]
    first_id: str
    first_trained: set[str]  # item keys: what the first had finished, and the one it was training
    done_before_second: set[str]  # item keys marked done when the second started
    second_rows: list[dict[str, Any]]  # the results the second left at its end


def _overlap(drivers: Drivers, first: list[str], second: list[str], listing: Callable[[], list[str]],
             results: Callable[[], list[dict[str, Any]]]) -> Overlap:
    """``first`` on one image at a time, saving its training state every iteration, until it has
    finished an image of its own and is training another (a state without a model or marker);
    then its workers are held, ``second`` runs to its end, and ``first`` is let go to finish last.
    The second's log must show the first live at its start."""
    before = _with_file(listing(), DONE)
    drivers.start("first", [*first, "--max-in-flight", "1", "--checkpoint-every", "0.001"])
    while True:
        drivers.until(lambda: (done := _with_file(listing(), DONE)) - before and _with_file(listing(), STATE) - done,
                      "the first run training its second image")
        held = drivers.hold("first")
        listed = listing()
        done, models = _with_file(listed, DONE), _with_file(listed, MODEL)
        training = _with_file(listed, STATE) - done - models
        if done - before and len(training) == 1 and models <= done:
            break
        drivers.let_go(held)  # caught between two images: again
    drivers.start("second", second)
    second_code = drivers.finish("second")
    second_rows = results()
    drivers.let_go(held)
    codes = {"first": drivers.finish("first"), "second": second_code}
    first_id, _ = _run_line(drivers.log("first"))
    _, live = _run_line(drivers.log("second"))
    assert first_id in live, "the first run had ended before the second started: no overlap was tested"
    return Overlap(codes, first_id, (done - before) | training, done, second_rows)


def _check_overlap(ov: Overlap, sources: list[Source], final: bytes, read: Callable[[str], bytes]) -> None:
    """Both runs exited 0. The second trained every image not marked done when it started and
    skipped the others; the first, finishing last, trained what it had finished or was training
    when held and skipped what the second had finished meanwhile. The final table holds the
    first's rows alone, complete for the manifest."""
    assert ov.codes == {"first": 0, "second": 0}, ov.codes
    all_ids = {s.id for s in sources}
    _check_rows(ov.second_rows, sources, read, all_ids - _ids(sources, ov.done_before_second))
    _check_rows(pq.read_table(io.BytesIO(final)).to_pylist(), sources, read, _ids(sources, ov.first_trained))
    assert [(s["run"], s["rows"]) for s in _segments(final)] == [(ov.first_id, len(sources))]


def test_the_same_command_twice_at_once_lists_every_row_once(tmp_path: Path, drivers: Drivers) -> None:
    sources = _sources(tmp_path / "images")
    out = tmp_path / "out"
    argv = [str(_manifest(tmp_path / "manifest.parquet", sources)), "--output", str(out), *RUN]
    ov = _overlap(drivers, argv, argv, _local_listing(out), lambda: pq.read_table(out / "results.parquet").to_pylist())

    _check_overlap(ov, sources, (out / "results.parquet").read_bytes(), lambda uri: Path(uri).read_bytes())
    assert _local_leftovers(out) == []


def test_two_shards_at_once_end_in_one_table(tmp_path: Path, drivers: Drivers) -> None:
    sources = _sources(tmp_path / "images")
    shards = {"first": sources[:4], "second": sources[4:]}
    out = tmp_path / "out"
    argv = {name: [str(_manifest(tmp_path / f"{name}.parquet", shard)), "--output", str(out), *RUN]
            for name, shard in shards.items()}
    # The second once the first's heartbeat is written (its Ray is up, its tasks go out).
    drivers.start("first", argv["first"])
    drivers.until(lambda: any((out / layout.RUNS_DIR).glob("*.json")), "heartbeat of the first run")
    drivers.start("second", argv["second"])
    codes = {name: drivers.finish(name) for name in shards}
    assert _run_line(drivers.log("first"))[0] in _run_line(drivers.log("second"))[1], "no overlap was tested"

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
        # Disjoint shards: each run trained every image of its own.
        _check_rows([rows[i] for i in in_table], shards[name], lambda uri: Path(uri).read_bytes(),
                    {s.id for s in shards[name]})
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
    listing = _local_listing(out)
    # One image at a time, so that it is still mid-way when its first rows reach storage. Killed
    # then, at a moment it is held with no image between its model and its marker (a saved
    # model would be reused, not trained, by the reruns).
    drivers.start("killed", [*argv, "--max-in-flight", "1"])
    while True:
        drivers.until(lambda: any(out.glob(f"{layout.PARTS_DIR}/*/part-*.parquet")), "the killed run's first rows")
        held = drivers.hold("killed")
        if _with_file(listing(), MODEL) <= _with_file(listing(), DONE):
            break
        drivers.let_go(held)
    killed_id, _ = _run_line(drivers.log("killed"))
    drivers.kill("killed")
    finished = _with_file(listing(), DONE)
    assert 1 <= len(finished) < len(sources)
    assert not (out / "results.parquet").exists()
    beat = out / layout.heartbeat_path(killed_id)
    assert beat.exists()  # a crash leaves its heartbeat: it goes stale
    last_beat = json.loads(beat.read_text())["heartbeat"]
    wait_for(lambda: time.time() - last_beat > 6.5, "the killed run's heartbeat going stale")

    # The first rerun removes the killed run's heartbeat as soon as it has written its own.
    ov = _overlap(drivers, argv, argv, listing, lambda: pq.read_table(out / "results.parquet").to_pylist())
    _check_overlap(ov, sources, (out / "results.parquet").read_bytes(), lambda uri: Path(uri).read_bytes())
    logs = drivers.log("first") + drivers.log("second")
    assert killed_id not in _run_line(drivers.log("first"))[1]  # dead, not live
    removed = re.search(r"^removed what dead runs left \(.*\): (.*)$", logs, re.MULTILINE)
    assert removed, logs[-3000:]
    assert set(removed.group(1).split(", ")) == {layout.run_parts_dir(killed_id), layout.heartbeat_path(killed_id)}
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
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()

    results = f"s3://{s3_bucket}/out/results.parquet"
    ov = _overlap(drivers, argv, argv, lambda: [k.removeprefix("out/") for k in keys("out/items/")],
                  lambda: pq.read_table(io.BytesIO(read(results))).to_pylist())
    _check_overlap(ov, sources, read(results), read)
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
    _check_rows(pq.read_table(aside).to_pylist(), sources, lambda uri: Path(uri).read_bytes(), {sources[0].id})
    assert not (out / "results.parquet").exists()
    assert (out / layout.RESULTS_LOCK).read_text() == '{"run_id": "a run still writing"}'
    assert not any(out.glob(f"{layout.PARTS_DIR}/*")) and not any(out.glob(f"{layout.RUNS_DIR}/*"))


CONTENDERS, ROUNDS = 6, 4


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lock_admits_one_process_at_a_time(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Six processes (``tests/lock_contender.py``), released at once, each take ``results.lock``
    four times and log ``enter`` and ``exit`` while they hold it: every enter is followed by its
    own exit, never by another holder's line, while others were waiting for the lock."""
    if where == "s3":
        base, options = f"s3://{request.getfixturevalue('s3_bucket')}/out", request.getfixturevalue("s3_storage_options")
    else:
        base, options = str(tmp_path / "out"), {}
    log, ready, go = tmp_path / "holders.log", tmp_path / "ready", tmp_path / "go"
    log.touch()
    ready.mkdir()
    names = [f"p{i}" for i in range(CONTENDERS)]
    procs = released_together([[str(REPO / "tests" / "lock_contender.py"), base, json.dumps(options), str(log),
                                 str(ready), str(go), name, str(ROUNDS)] for name in names], ready, go,
                              "every contender ready")
    assert [p.returncode for p in procs] == [0] * CONTENDERS, [p.stderr.read() for p in procs]

    lines = log.read_text().splitlines()
    held = [line for line in lines if not line.startswith("wait ")]
    assert sorted(held[::2]) == sorted(f"enter {n} {k}" for n in names for k in range(ROUNDS))
    for enter, leave in zip(held[::2], held[1::2], strict=True):
        assert leave == "exit " + enter.removeprefix("enter "), (enter, leave)
    # A race, not a queue: most times the lock was taken, other contenders were waiting for it.
    waiting: set[str] = set()
    contended = 0
    for line in lines:
        what, name, _ = line.split()
        if what == "wait":
            waiting.add(name)
        elif what == "enter":
            waiting.discard(name)
            contended += bool(waiting)
    assert contended >= CONTENDERS * ROUNDS // 2, lines
    assert not Folder(base, Storage(options)).exists(layout.RESULTS_LOCK)
