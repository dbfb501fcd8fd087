"""Fault injection: the pipeline under a lost node, a killed driver, crashing workers and an object
store that errs, resets, truncates, stalls or goes away.

Every fault is real, not mocked: a ``ray.cluster_utils.Cluster`` loses a worker node's processes,
``run.py`` is SIGKILLed with its whole process group, a Ray worker process ``os._exit``\\ s while
it holds a task or SIGKILLs itself half way through writing a training state (a worker setup
hook patches the task function, a training step or fsspec's local file opening in the workers
only: nothing in the pipeline knows about tests), and storage faults come from a small HTTP
proxy in front of the moto S3 server that s3fs, botocore and the Ray workers talk to as if it
were the endpoint.

What must hold after each fault: every image ends ``ok`` (or, for a fault that never clears, a
``failed`` row with the right ``error_kind`` and exit code 1, never a crash), retries are counted,
and no output is ever left that claims to be complete but is not: a folder with ``done.json``
holds exactly the files it lists, each one whole (it decodes to its exact size, the model loads).
The table of faults and how each is handled is in docs/reliability_faults.md. Waits are on
events (a file, a marker, a process's end), polled with ``support.wait_for``, never on time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from fault_proxy import FaultProxy, Request
from PIL import Image
from support import Source, assert_same_state, photo_sources, wait_for
from support import free_port as _free_port
from support import parquet_bytes as _parquet_bytes
from support import processes as _processes
from support import run_main as _run_main
from support import session_members as _session_members

from ingan import checkpoint
from pipeline import executor, layout
from pipeline.config import RunConfig
from pipeline.storage import Folder, Storage, StorageError
from pipeline.task import Item, Job

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = Path(__file__).resolve().parents[1] / "data" / "images"
# Distinct photos, so no two items train in lockstep and finish at the same instant.
NAMES = ("astronaut.png", "brick.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg")
SHORT_SIDE = 48
RATIOS = (1.0, 2.0)
ITEM_FILES = {"model.pt", "source.jpg", "metrics.json", "done.json"}
STATE_NAME = layout.training_state_path("x", "t").rsplit("/", 1)[1]  # an image's training state
TINY = ["--preset", "tiny", "--ratios", ",".join(map(str, RATIOS)), "--no-metrics"]


# --------------------------------------------------------------------------- helpers


def _sources(out_dir: Path, n: int) -> list[Source]:
    """``n`` example photos shrunk to SHORT_SIDE px on the short side."""
    return photo_sources(out_dir, NAMES[:n], SHORT_SIDE)


def _local_manifest(path: Path, sources: list[Source]) -> Path:
    pq.write_table(
        pa.table({"uri": [str(s.path) for s in sources], "id": [s.id for s in sources]}), path
    )
    return path


def _expected_outputs(size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """rel path under the item folder -> (W, H), for RATIOS with the default keep_height."""
    h = size[1]
    return {f"outputs/{round(r * h)}x{h}.png": (round(r * h), h) for r in RATIOS}


def _decoded_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # the whole image, not just the header: a truncated file fails here
        return img.size


def _check_complete_item(
    files: dict[str, bytes], done: dict[str, Any], size: tuple[int, int], prefix: str
) -> None:
    """An item folder (rel path -> bytes) that has a marker holds exactly what the marker lists,
    and every one of those files is whole."""
    expected = _expected_outputs(size)
    assert set(files) == ITEM_FILES | set(expected), f"{prefix}: {sorted(files)}"
    listed = {
        o["uri"].removeprefix(prefix + "/"): (o["width"], o["height"]) for o in done["outputs"]
    }
    assert listed == expected, f"{prefix}: marker lists {listed}, expected {expected}"
    for rel, wh in expected.items():
        assert _decoded_size(files[rel]) == wh, f"{prefix}/{rel}"
    assert _decoded_size(files["source.jpg"])
    checkpoint.load(files["model.pt"])  # a partial checkpoint would not load


def _local_item_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _check_local_items(out: Path, sources: list[Source], tag: str) -> None:
    """Every source has exactly one, complete item folder under ``out``."""
    keys = {layout.item_key(s.id): s for s in sources}
    assert {p.name for p in (out / "items").iterdir()} == set(keys)
    for key, src in keys.items():
        assert [p.name for p in (out / "items" / key).iterdir()] == [tag]  # no other settings
        folder = out / layout.item_dir(src.id, tag)
        done = json.loads((folder / "done.json").read_text())
        _check_complete_item(_local_item_files(folder), done, src.size, str(folder))








# --------------------------------------------------------------------------- 1. a lost node


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[Any]]]:
    """A head that runs no tasks and two one-CPU worker nodes, in processes of this test.

    Node death is noticed within about two seconds (health checks every 500 ms, three misses).
    The cluster's address is not advertised in /tmp/ray (``Cluster`` would write it for
    ``ray.init()`` without an address), so no other Ray user on the machine can join it.
    """
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("this process is already connected to Ray; the cluster test needs its own")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": _free_port(),
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    try:
        workers = [c.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=c.address, logging_level="WARNING")
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.slow
def test_node_loss_mid_training_is_retried(cluster: tuple[Any, list[Any]], tmp_path: Path) -> None:
    c, workers = cluster
    sources = _sources(tmp_path / "images", 6)
    manifest = _local_manifest(tmp_path / "manifest.parquet", sources)
    out = tmp_path / "out"
    result: dict[str, Any] = {}

    def drive() -> None:  # the driver in a thread: Ray nodes can only be started from the main one
        try:
            result["code"], result["log"] = _run_main(
                [str(manifest), "--output", str(out), *TINY, "--iterations", "40", "--retries", "2",
                 "--checkpoint-every", "0.001"]
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    def both_nodes_training() -> bool:
        """Two images' training states at once (saved every iteration, removed once the model
        is): two trainings under way, one on each one-CPU node."""
        assert thread.is_alive(), result or "the run ended before its tasks trained"
        return len(list(out.glob(f"items/*/*/{STATE_NAME}"))) >= 2

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    wait_for(both_nodes_training, "two images training at once")
    done_before = len(list(out.glob("items/*/*/done.json")))
    c.remove_node(workers[0])  # kills its raylet and its workers: a reclaimed spot node
    c.add_node(num_cpus=1)  # and its replacement joins
    thread.join(timeout=240)
    assert not thread.is_alive(), "the run did not finish"
    assert "error" not in result, result.get("error")
    assert done_before < len(sources), "every image finished before the node was lost"
    code, log = result["code"], result["log"]

    assert code == 0, log
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in rows] == [s.id for s in sources]
    assert [r["status"] for r in rows] == ["ok"] * len(sources), log
    assert max(r["attempts"] for r in rows) >= 2, [r["attempts"] for r in rows]
    assert min(r["attempts"] for r in rows) >= 1
    tag = json.loads((out / "config.json").read_text())["model_tag"]
    _check_local_items(out, sources, tag)


# --------------------------------------------------------------------------- 3. a killed driver


@pytest.mark.slow
def test_killed_driver_resumes_without_retraining(tmp_path: Path) -> None:
    sources = _sources(tmp_path / "images", 4)
    manifest = _local_manifest(tmp_path / "manifest.parquet", sources)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "run.py"), str(manifest), "--output", str(out), *TINY,
        "--iterations", "25", "--max-in-flight", "2",
    ]  # fmt: skip
    # Its own Ray, whatever else runs on the machine: "local" never joins another instance.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    log = tmp_path / "first.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def first_done() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return any(out.glob("items/*/*/done.json"))

    try:
        wait_for(first_done, "a first done.json")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait(timeout=10)
        # Every process of the session ends with it (a straggler fails the test here).
        wait_for(lambda: not _session_members(proc.pid), "the end of every process of the killed driver", every=0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, _ in _session_members(proc.pid):  # ours: they are in the session we started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Nor did any Ray process of that instance escape the session (raylet, workers and agents
    # all name their GCS on their command line).
    connected = re.search(r"^connecting to Ray: .* at (\S+)$", log.read_text(), re.MULTILINE)
    assert connected, log.read_text()[-3000:]
    gcs = connected.group(1)
    assert not [(pid, cmd) for pid, _, cmd in _processes() if gcs in cmd]

    finished = {p.parent for p in out.glob("items/*/*/done.json")}
    assert 1 <= len(finished) < len(sources)
    assert not (out / "results.parquet").exists()  # the run really died before its end
    models = {
        d: ((d / "model.pt").read_bytes(), (d / "model.pt").stat().st_mtime_ns) for d in finished
    }
    done_markers = {d: (d / "done.json").read_bytes() for d in finished}

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-4000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in rows] == [s.id for s in sources]
    tag = json.loads((out / "config.json").read_text())["model_tag"]
    finished_ids = {s.id for s in sources if out / layout.item_dir(s.id, tag) in finished}
    assert len(finished_ids) == len(finished)
    for row in rows:
        if row["id"] in finished_ids:
            assert row["status"] == "skipped", row
            assert row["train_seconds"] is None
        else:
            assert row["status"] == "ok", row
    for d, (data, mtime) in models.items():  # not retrained, not rewritten
        assert (d / "model.pt").read_bytes() == data
        assert (d / "model.pt").stat().st_mtime_ns == mtime
        assert (d / "done.json").read_bytes() == done_markers[d]
    # A worker killed inside a local write can leave its temporary file (never the final name).
    for p in out.rglob("*.part-*"):
        p.unlink()
    _check_local_items(out, sources, tag)


# --------------------------------------------------------------------------- shared local Ray


def _crash_hook(marker_dir: str) -> Callable[[], None]:
    """A Ray worker setup hook: in the workers only, items whose id starts with ``crash-once``
    kill their worker process on the first attempt (a marker file remembers it), and items
    whose id starts with ``crash-always`` on every attempt. Items whose id starts with
    ``crash-at70`` or ``crash-midstate`` count every training iteration they run (``<id>.steps``,
    one line each); a ``crash-at70`` item kills its worker once 70% of the training is done, the
    first time only. A ``crash-midstate`` item logs each write of its training state
    (``<id>.states``: ``whole ITERATION PATH`` or ``torn ITERATION WRITTEN TOTAL PATH``; the
    first attempt also keeps the last whole state's bytes, ``<id>.whole``), and on its first
    attempt SIGKILLs its worker in the middle of its 10th: half the bytes are on disk (flushed
    and synced), then the kill. Its retry copies the state it finds on storage to ``<id>.found``
    before it starts. Writes are caught where every local write of fsspec goes
    (``LocalFileSystem._open``), whatever the pipeline calls. Pickled by value with the closure."""

    def hook() -> None:
        import os
        import shutil
        import signal

        from fsspec.implementations.local import LocalFileSystem

        import ingan.train
        import pipeline.executor
        import pipeline.layout
        import pipeline.task

        real = pipeline.task.process_bundle
        real_step = ingan.train.Trainer.step
        real_open = LocalFileSystem._open
        state_name = pipeline.layout.training_state_path("x", "t").rsplit("/", 1)[1]  # the module's STATE_NAME
        torn_at = 10  # the state write that is cut in two
        current: dict[str, Any] = {}

        def first_time(item_id: str) -> bool:
            """True unless it was asked for ``item_id`` before, in any worker (a marker file says)."""
            try:
                fd = os.open(os.path.join(marker_dir, item_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.close(fd)
            return True

        def note(item_id: str, suffix: str, line: str) -> None:
            with open(os.path.join(marker_dir, item_id + suffix), "a", encoding="utf-8") as f:
                f.write(line + "\n")

        def step(self: Any) -> Any:
            out = real_step(self)
            item_id, current["iteration"] = current.get("id", ""), self.iteration
            if item_id.startswith(("crash-at70", "crash-midstate")):
                note(item_id, ".steps", str(self.iteration))
            if item_id.startswith("crash-at70") and self.iteration == int(0.7 * self.cfg.iterations) \
                    and first_time(item_id):
                os._exit(1)
            return out

        def state_writer(f: Any, path: str, item_id: str, n: int) -> Callable[[bytes], int]:
            write = f.write
            first_attempt = not os.path.exists(os.path.join(marker_dir, item_id))

            def write_state(data: bytes) -> int:
                it = current["iteration"]
                if first_attempt and n == torn_at and first_time(item_id):
                    written = write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    note(item_id, ".states", f"torn {it} {written} {len(data)} {path}")
                    os.kill(os.getpid(), signal.SIGKILL)
                if first_attempt:
                    with open(os.path.join(marker_dir, item_id + ".whole"), "wb") as copy:
                        copy.write(data)
                note(item_id, ".states", f"whole {it} {path}")
                return write(data)

            return write_state

        def open_(self: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            f = real_open(self, path, mode, *args, **kwargs)
            item_id = current.get("id", "")
            if "w" in mode and item_id.startswith("crash-midstate") and os.path.basename(path).startswith(state_name):
                current["writes"] += 1
                f.write = state_writer(f, path, item_id, current["writes"])
            return f

        def process_bundle(items: list[Any], job: Any) -> Any:
            # A bundle's iterations count for its crash-at70 image, if it has one.
            watched = ("crash-at70", "crash-midstate")
            current.update(id=next((i.id for i in items if i.id.startswith(watched)), items[-1].id), writes=0)
            for item in items:
                if item.id.startswith("crash-always"):
                    os._exit(1)
                if item.id.startswith("crash-once") and first_time(item.id):
                    os._exit(1)
                state = os.path.join(job.cfg.output, pipeline.layout.training_state_path(item.id, job.tag))
                found = os.path.join(marker_dir, item.id + ".found")
                retry = os.path.exists(os.path.join(marker_dir, item.id))
                if item.id.startswith("crash-midstate") and retry and os.path.exists(state) and not os.path.exists(found):
                    shutil.copyfile(state, found)
            return real(items, job)

        pipeline.task.process_bundle = process_bundle
        pipeline.executor.process_bundle = process_bundle
        ingan.train.Trainer.step = step
        LocalFileSystem._open = open_

    return hook


@pytest.fixture(scope="module")
def local_ray(
    fake_aws_credentials: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """One local Ray for the storage and retry tests; yields the crash hook's marker folder."""
    if ray.is_initialized():
        pytest.fail("this process is already connected to Ray")
    markers = tmp_path_factory.mktemp("crash-markers")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": _crash_hook(str(markers))},
    )
    yield markers
    ray.shutdown()


# --------------------------------------------------------------------------- 2. storage faults


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_endpoint)
    yield p
    p.close()


@dataclass
class S3Setup:
    client: Any
    bucket: str
    sources: list[Source]
    manifest_uri: str
    config: Path

    @property
    def out_uri(self) -> str:
        return f"s3://{self.bucket}/out"

    def run(self, proxy: FaultProxy, rule: Callable[[Request], str], output: str | None = None) -> tuple[int, str]:
        """The pipeline over this manifest through ``proxy`` faulting by ``rule``, as a user runs
        it: (exit code, log)."""
        proxy.rule = rule
        return _run_main(
            [self.manifest_uri, "--output", output or self.out_uri, "--config", str(self.config),
             "--endpoint-url", proxy.url, *TINY, "--iterations", "2"]
        )  # fmt: skip


# One botocore attempt per call (the pipeline's own default, spelled out): only its loop retries.
ONE_BOTOCORE_ATTEMPT = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def _s3_setup(
    client: Any, bucket: str, tmp_path: Path, n: int, storage_options: dict[str, Any] | None = None
) -> S3Setup:
    """``n`` images and their manifest in ``bucket``; a run config with the credentials (and any
    other storage options) in YAML, as a user would give them."""
    sources = _sources(tmp_path / "images", n)
    for s in sources:
        client.put_object(Bucket=bucket, Key=f"images/{s.path.name}", Body=s.path.read_bytes())
    table = pa.table(
        {
            "uri": [f"s3://{bucket}/images/{s.path.name}" for s in sources],
            "id": [s.id for s in sources],
        }
    )
    client.put_object(Bucket=bucket, Key="manifest.parquet", Body=_parquet_bytes(table))
    config = tmp_path / "run.yaml"
    opts = {"key": "testing", "secret": "testing", **(storage_options or {})}
    config.write_text(json.dumps({"storage_options": opts}))  # JSON is YAML
    return S3Setup(client, bucket, sources, f"s3://{bucket}/manifest.parquet", config)


MakeSetup = Callable[..., S3Setup]


@pytest.fixture
def s3_setup(s3_client: Any, s3_bucket: str, tmp_path: Path) -> MakeSetup:
    """``_s3_setup`` in the test's fresh bucket: called with the image count and storage options."""
    return functools.partial(_s3_setup, s3_client, s3_bucket, tmp_path)


def _s3_item_folders(setup: S3Setup) -> dict[str, dict[str, bytes]]:
    """item folder key prefix -> {rel path: bytes} of every object under out/items/."""
    client, bucket = setup.client, setup.bucket
    folders: dict[str, dict[str, bytes]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="out/items/"
    ):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            prefix = "/".join(key.split("/")[:4])  # out/items/{key}/{tag}
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            folders.setdefault(prefix, {})[key[len(prefix) + 1 :]] = body
    return folders


def _check_s3_claims(setup: S3Setup) -> set[str]:
    """Every S3 item folder that has a marker is complete and whole; returns their ids."""
    by_key = {layout.item_key(s.id): s for s in setup.sources}
    complete = set()
    for prefix, files in _s3_item_folders(setup).items():
        if "done.json" not in files:
            continue
        src = by_key[prefix.split("/")[2]]
        done = json.loads(files["done.json"])
        _check_complete_item(files, done, src.size, f"s3://{setup.bucket}/{prefix}")
        complete.add(src.id)
    return complete


def _results(setup: S3Setup) -> list[dict[str, Any]]:
    data = setup.client.get_object(Bucket=setup.bucket, Key="out/results.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(data)).to_pylist()


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("InternalError", 500, True),
        ("ServiceUnavailable", 503, True),
        ("SlowDown", 503, True),
        ("503", 503, True),  # a HEAD answer has no body, hence no code but the status
        ("InvalidArgument", 400, False),
        ("NoSuchBucket", 404, False),
        ("AccessDenied", 403, False),
    ],
)
def test_s3fs_translated_errors_are_classified(code: str, status: int, transient: bool) -> None:
    """s3fs hands the pipeline ``OSError(EREMOTEIO, "We encountered an internal error...")``
    for a 500: only the botocore error it keeps as the cause says what it was."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from pipeline import storage

    err = ClientError(
        {
            "Error": {
                "Code": code,
                "Message": "We encountered an internal error. Please try again.",
            },
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )
    assert storage._is_transient(translate_boto_error(err)) is transient


@pytest.mark.slow
def test_transient_storage_faults_are_survived(local_ray: Path, proxy: FaultProxy, s3_setup: MakeSetup) -> None:
    # botocore makes at most three attempts here (by default five, with backoff of up to 8 s
    # between them) and gives up on a stalled answer after 2 s: the same paths, in less time.
    retries = {"mode": "standard", "total_max_attempts": 3}
    setup = s3_setup(3, {"config_kwargs": {"read_timeout": 2, "retries": retries}})
    rotation = ["503", "500", "reset", "truncate", "drop_ack", "delay:0.3"]
    state = {"burst_path": None, "burst": 0, "stalled": False, "faults": 0}

    def rule(req: Request) -> str:
        # One model upload meets four 503s in a row: more than botocore's three attempts, so
        # only the pipeline's own retry loop (storage.with_retries) gets it through.
        model_put = req.method == "PUT" and req.path.endswith("/model.pt")
        if model_put and state["burst_path"] in (None, req.path) and state["burst"] < 4:
            state["burst_path"] = req.path
            state["burst"] += 1
            return "503"
        if req.method == "GET" and "/images/" in req.path and not state["stalled"]:
            state["stalled"] = True
            return "stall:4"
        if req.n % 3 == 0:  # every third request, whatever it is: reads, writes, listings
            state["faults"] += 1
            return rotation[state["faults"] % len(rotation)]
        return "pass"

    code, log = setup.run(proxy, rule)
    assert code == 0, log
    rows = _results(setup)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    # Storage faults are absorbed inside the task: none cost a resubmission.
    assert [r["attempts"] for r in rows] == [1, 1, 1]
    assert _check_s3_claims(setup) == {s.id for s in setup.sources}

    injected = {a for _, a in proxy.faults()}
    assert set(rotation) | {"stall:4"} <= injected, injected
    assert proxy.faults("PUT") and proxy.faults("GET"), "faults hit both reads and writes"
    assert state["burst"] == 4


def test_dead_endpoint_fails_rows_not_the_run(
    local_ray: Path, proxy: FaultProxy, s3_setup: MakeSetup, tmp_path: Path
) -> None:
    # One botocore attempt per call: each storage call then fails after the pipeline's own five
    # tries (about 3 s) instead of five botocore attempts per try (about 45 s, see the notes).
    setup = s3_setup(2, ONE_BOTOCORE_ATTEMPT)
    down = {"since": None}

    def rule(req: Request) -> str:
        if "/images/" in req.path and down["since"] is None:
            down["since"] = req.n  # the manifest has been read: the endpoint goes away for good
        if down["since"] is None:
            return "pass"
        return "reset" if req.n % 2 else "503"

    out = tmp_path / "out"  # a local output, so the results can still be written
    code, log = setup.run(proxy, rule, str(out))
    assert code == 1, log
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in rows] == [s.id for s in setup.sources]
    for row in rows:
        assert row["status"] == "failed", row
        assert row["error_kind"] == "storage", row
        assert f"s3://{setup.bucket}/images/" in row["error"]
        assert row["attempts"] == 1  # a storage failure is the task's verdict, not a lost worker
    assert not list(out.glob("items/**/done.json"))
    assert "[storage]" in log
    assert len(proxy.faults()) >= 2 * 5  # each source read was tried again before giving up


@pytest.mark.slow
def test_failing_writes_leave_no_false_completion(local_ray: Path, proxy: FaultProxy, s3_setup: MakeSetup) -> None:
    setup = s3_setup(3, ONE_BOTOCORE_ATTEMPT)
    a, b, c = setup.sources
    key_a, key_b = layout.item_key(a.id), layout.item_key(b.id)

    def rule(req: Request) -> str:
        if req.method == "PUT" and f"/items/{key_a}/" in req.path:
            return "500"  # every write of A fails, from its model on
        if req.method == "PUT" and f"/items/{key_b}/" in req.path and "/outputs/" in req.path:
            return "reset"  # B's model is saved, then its output writes fail for good
        return "pass"

    code, log = setup.run(proxy, rule)
    assert code == 1, log
    rows = {r["id"]: r for r in _results(setup)}
    for failed in (a, b):
        assert rows[failed.id]["status"] == "failed", rows[failed.id]
        assert rows[failed.id]["error_kind"] == "storage"
        assert rows[failed.id]["outputs"] == []
    assert rows[c.id]["status"] == "ok"

    # Only C claims completion, and its claim holds; A left nothing at all (no partial object
    # under any key), B only its saved model, which a rerun reuses rather than retrains.
    assert _check_s3_claims(setup) == {c.id}
    folders = _s3_item_folders(setup)
    assert not [p for p in folders if f"/{key_a}/" in f"{p}/"]
    [b_files] = [f for p, f in folders.items() if f"/{key_b}/" in f"{p}/"]
    assert set(b_files) == {"model.pt"}
    checkpoint.load(b_files["model.pt"])

    # The endpoint recovers: the same command finishes the job, reusing B's model.
    code, log = setup.run(proxy, lambda req: "pass")
    assert code == 0, log
    rows = {r["id"]: r for r in _results(setup)}
    assert rows[a.id]["status"] == "ok" and rows[a.id]["train_seconds"] is not None
    assert rows[b.id]["status"] == "ok" and rows[b.id]["train_seconds"] is None
    assert rows[c.id]["status"] == "skipped"
    assert _check_s3_claims(setup) == {a.id, b.id, c.id}


def test_failed_upload_leaves_no_object(
    proxy: FaultProxy, s3_client: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = {"key": "testing", "secret": "testing", "endpoint_url": proxy.url, **ONE_BOTOCORE_ATTEMPT}
    body = os.urandom(300_000)

    # The pitfall Folder.write_bytes avoids: a file opened for writing on S3 is committed when
    # its `with` block exits, even when the block exits with an exception, so the key now holds
    # the first part of the data as if it were the whole object.
    fs = Folder(f"s3://{s3_bucket}", Storage(opts)).fs
    with pytest.raises(RuntimeError), fs.open(f"{s3_bucket}/pitfall.bin", "wb") as f:
        f.write(body[:1000])
        raise RuntimeError("the producer failed half way")
    assert s3_client.get_object(Bucket=s3_bucket, Key="pitfall.bin")["Body"].read() == body[:1000]

    # Folder.write_bytes sends the whole buffer in one PUT. Here the upload dies mid-body (the
    # server got half of it) and then keeps failing: nothing at all appears under the key ...
    sleeps: list[float] = []
    monkeypatch.setattr("pipeline.storage.time.sleep", sleeps.append)  # the backoff, not s3fs's
    folder = Folder(f"s3://{s3_bucket}", Storage(opts))
    puts = []

    def cut_then_fail(req: Request) -> str:
        if req.method != "PUT":
            return "pass"
        puts.append(req)
        return "cut_body" if len(puts) <= 2 else "500"

    proxy.rule = cut_then_fail
    with pytest.raises(StorageError, match="new.bin"):
        folder.write_bytes("new.bin", body)
    assert [a for _, a in proxy.faults("PUT")][:2] == ["cut_body", "cut_body"]
    assert len(sleeps) == 4  # five tries of the pipeline's own, then it gave up
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="new").get("Contents", [])
    assert listed == []

    # ... and a failed replacement leaves the previous object whole.
    proxy.rule = lambda req: "pass"
    folder.write_bytes("kept.bin", b"previous")
    puts.clear()
    proxy.rule = cut_then_fail
    with pytest.raises(StorageError, match="kept.bin"):
        folder.write_bytes("kept.bin", body)
    assert s3_client.get_object(Bucket=s3_bucket, Key="kept.bin")["Body"].read() == b"previous"


# --------------------------------------------------------------------------- 4. crashing workers


def _crash_items(sources: list[Source], ids: list[str]) -> list[Item]:
    return [Item(i, item_id, str(sources[i].path), {}) for i, item_id in enumerate(ids)]


def _run_items(
    items: list[Item], out: Path, retries: int, iterations: int = 2, checkpoint_every_s: float = 300,
    bundle_size: int = 1,
) -> dict[str, dict[str, Any]]:
    """The executor as driver.run drives it, on the module's Ray instance."""
    cfg = RunConfig(
        output=str(out), preset="tiny", iterations=iterations, ratios=list(RATIOS), metrics=False,
        checkpoint_every_s=checkpoint_every_s, bundle_size=bundle_size,
    )
    job = Job.of(cfg, "tiny")
    res = executor.Resources(
        num_cpus=1, num_gpus=0, max_in_flight=4, retries=retries, timeout_s=None, bundle_size=bundle_size
    )
    records: dict[str, dict[str, Any]] = {}
    executor.run_items(items, job, res, lambda item, rec: records.__setitem__(item.id, rec))
    return records


def test_crashed_worker_is_resubmitted(local_ray: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path / "images", 2)
    items = _crash_items(sources, ["crash-once-a", "crash-always-a"])
    records = _run_items(items, tmp_path / "out", retries=1)

    once = records["crash-once-a"]
    assert (local_ray / "crash-once-a").exists()  # the first attempt really died
    assert once["status"] == "ok", once
    assert once["attempts"] == 2
    always = records["crash-always-a"]
    assert always["status"] == "failed"
    assert always["error_kind"] == "worker_lost", always
    assert always["attempts"] == 2  # the first try and one resubmission, then it stops
    assert "after 2 attempts" in always["error"]


def test_an_image_that_kills_its_worker_fails_alone_on_the_last_retry(local_ray: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path / "images", 3)
    ids = ["crash-always-bundle", "next-to-it-b", "next-to-it-c"]
    records = _run_items(_crash_items(sources, ids), tmp_path / "out", retries=1, bundle_size=3)
    assert records["crash-always-bundle"]["status"] == "failed"
    assert records["crash-always-bundle"]["error_kind"] == "worker_lost"
    for item_id in ids[1:]:
        assert records[item_id]["status"] == "ok", records[item_id]
    assert all(r["attempts"] == 2 for r in records.values())


def test_crashed_worker_without_retries_fails(local_ray: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path / "images", 1)
    records = _run_items(_crash_items(sources, ["crash-once-b"]), tmp_path / "out", retries=0)
    rec = records["crash-once-b"]
    assert (local_ray / "crash-once-b").exists()
    assert rec["status"] == "failed", rec
    assert rec["error_kind"] == "worker_lost"
    assert rec["attempts"] == 1
    assert not list((tmp_path / "out").glob("items/**/done.json"))


def _check_same_as_uninterrupted(items: list[Item], tmp_path: Path, n: int, steps: Path, bundle_size: int = 1) -> None:
    """The same images and settings run again into ``tmp_path / "uninterrupted"``, never
    interrupted (the hook kills a first attempt only; ``steps``, emptied first, must then count
    1 to ``n`` once): each image's model there is the one ``tmp_path / "interrupted"`` holds, byte
    for byte and tensor for tensor, and neither output keeps a training state once the model is
    written."""
    steps.unlink()
    uninterrupted = _run_items(items, tmp_path / "uninterrupted", retries=0, iterations=n, checkpoint_every_s=0.001,
                               bundle_size=bundle_size)
    assert [int(line) for line in steps.read_text().split()] == list(range(1, n + 1))
    tag = RunConfig(output="x", preset="tiny", iterations=n).model_tag("tiny")
    for item in items:
        assert uninterrupted[item.id]["status"] == "ok", uninterrupted[item.id]
        data = [(tmp_path / run / layout.model_path(item.id, tag)).read_bytes() for run in ("interrupted", "uninterrupted")]
        assert_same_state(checkpoint.load(data[0]).generator, checkpoint.load(data[1]).generator)
        assert data[0] == data[1], item.id
        for run in ("interrupted", "uninterrupted"):
            assert not (tmp_path / run / layout.training_state_path(item.id, tag)).exists()


@pytest.mark.slow
def test_worker_killed_mid_training_resumes_from_its_training_state(local_ray: Path, tmp_path: Path) -> None:
    """A worker killed at 70% of an image's training: the retried task continues from the last
    saved training state, and ends with the model an uninterrupted training gives."""
    sources = _sources(tmp_path / "images", 1)
    items = _crash_items(sources, ["crash-at70-a"])
    n = 40
    steps = local_ray / "crash-at70-a.steps"

    interrupted = _run_items(items, tmp_path / "interrupted", retries=1, iterations=n, checkpoint_every_s=0.001)
    rec = interrupted["crash-at70-a"]
    assert (local_ray / "crash-at70-a").exists()  # the first attempt really died at 70%
    assert rec["status"] == "ok", rec
    assert rec["attempts"] == 2
    ran = [int(line) for line in steps.read_text().split()]
    assert ran[:28] == list(range(1, 29))  # the first attempt, up to the kill
    assert ran[28] > 1, "the second attempt started its training from scratch"
    assert ran[-1] == n
    assert len(ran) <= 1.1 * n, f"{len(ran)} iterations run for a {n}-iteration training"
    _check_same_as_uninterrupted(items, tmp_path, n, steps)


@pytest.mark.slow
def test_worker_killed_mid_bundle_resumes_each_image_from_its_own_state(local_ray: Path, tmp_path: Path) -> None:
    """A bundle of three whose worker is killed at 70%: the retried task continues each image from
    its own saved state, and every image ends with the model of an uninterrupted bundle."""
    # Square photos: one crop size, so one bundle.
    square = photo_sources(tmp_path / "images", ["brick.png", "grass.png", "gravel.png"], SHORT_SIDE)
    ids = ["crash-at70-bundle", "bundle-b", "bundle-c"]
    items = _crash_items(square, ids)
    n = 40
    steps = local_ray / "crash-at70-bundle.steps"

    # Two retries: the first retries the bundle whole (the last would run its images one per task).
    interrupted = _run_items(items, tmp_path / "interrupted", retries=2, iterations=n, checkpoint_every_s=0.001,
                             bundle_size=3)
    assert (local_ray / "crash-at70-bundle").exists()  # the first attempt really died at 70%
    assert [interrupted[i]["status"] for i in ids] == ["ok"] * 3, interrupted
    assert [interrupted[i]["attempts"] for i in ids] == [2, 2, 2]
    ran = [int(line) for line in steps.read_text().split()]
    assert ran[:28] == list(range(1, 29))
    assert ran[28] > 1, "the second attempt started its training from scratch"
    assert ran[-1] == n and len(ran) <= 1.1 * n
    _check_same_as_uninterrupted(items, tmp_path, n, steps, bundle_size=3)


@pytest.mark.slow
def test_worker_killed_while_writing_a_training_state_resumes_from_the_last_whole_one(
    local_ray: Path, tmp_path: Path
) -> None:
    """A worker SIGKILLed in the middle of writing an image's 10th training state, half its bytes
    on disk: the retried task finds the 9th state, whole, under the state's name (the torn bytes
    never are), continues from its iteration, and ends with the model of an uninterrupted
    training, byte for byte."""
    sources = _sources(tmp_path / "images", 1)
    item_id = "crash-midstate-a"
    items = _crash_items(sources, [item_id])
    n = 20
    steps = local_ray / f"{item_id}.steps"

    interrupted = _run_items(items, tmp_path / "interrupted", retries=1, iterations=n, checkpoint_every_s=0.001)
    rec = interrupted[item_id]
    assert (local_ray / item_id).exists()  # the first attempt really died in a write
    assert rec["status"] == "ok", rec
    assert rec["attempts"] == 2
    writes = (local_ray / f"{item_id}.states").read_text().splitlines()
    assert [w.split()[0] for w in writes[:10]] == ["whole"] * 9 + ["torn"], writes[:10]
    _, torn_at, written, total, torn_path = writes[9].split(" ", 4)
    whole_at = int(writes[8].split()[1])  # the iteration of the last whole state before the kill
    assert 0 < int(written) < int(total)
    assert 1 <= whole_at < int(torn_at)
    # What the retried task found under the state's name is that last whole state, not the torn one ...
    assert (local_ray / f"{item_id}.found").read_bytes() == (local_ray / f"{item_id}.whole").read_bytes()
    # ... and it went on from there: the first attempt ran up to the torn write, the retry from
    # the iteration after the last whole state to the end.
    ran = [int(line) for line in steps.read_text().split()]
    assert ran == [*range(1, int(torn_at) + 1), *range(whole_at + 1, n + 1)]
    # The torn bytes are still on disk beside the final name, listed nowhere: the folder is
    # otherwise exactly complete.
    torn = Path(torn_path)
    assert torn.name != STATE_NAME
    tag = RunConfig(output="x", preset="tiny", iterations=n).model_tag("tiny")
    folder = tmp_path / "interrupted" / layout.item_dir(item_id, tag)
    files = _local_item_files(folder)
    assert len(files.pop(str(torn.relative_to(folder)))) == int(written)
    _check_complete_item(files, json.loads(files["done.json"]), sources[0].size, str(folder))
    _check_same_as_uninterrupted(items, tmp_path, n, steps)


def test_a_broken_image_in_a_bundle_fails_alone(local_ray: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    items = [Item(0, "a", str(sources[0].path), {}), Item(1, "broken", str(broken), {}),
             Item(2, "b", str(sources[1].path), {}), Item(3, "c", str(sources[2].path), {})]
    records = _run_items(items, tmp_path / "out", retries=0, bundle_size=4)
    assert {k: r["status"] for k, r in records.items()} == {"a": "ok", "broken": "failed", "b": "ok", "c": "ok"}
    assert records["broken"]["error_kind"] == "decode", records["broken"]
    assert all(r["attempts"] == 1 for r in records.values())
    tag = RunConfig(output="x", preset="tiny", iterations=2).model_tag("tiny")
    for item_id in ("a", "b", "c"):
        assert (tmp_path / "out" / layout.marker_path(item_id, tag)).exists()
        assert records[item_id]["train_seconds"] > 0


# --------------------------------------------------------------------------- 5. a silent endpoint


@pytest.mark.slow
def test_silent_endpoint_fails_each_image_after_the_policys_tries(local_ray: Path, tmp_path: Path) -> None:
    """An S3 endpoint that accepts connections and never answers: each image fails as
    ``storage``, naming the endpoint, after exactly the policy's tries (each waited out to its
    read time-out), not botocore's, s3fs's and the pipeline's retries multiplied."""
    # A proxy whose every answer is a stall longer than the run: it reads each request (and logs
    # it), and never answers. It has nothing upstream to forward to.
    silent = FaultProxy("http://127.0.0.1:9")
    silent.rule = lambda req: "stall:60"
    try:
        manifest = tmp_path / "manifest.parquet"
        ids = ["a", "b", "c"]
        pq.write_table(pa.table({"uri": [f"s3://bucket/{i}.png" for i in ids], "id": ids}), manifest)
        config = tmp_path / "run.yaml"
        config.write_text("storage_attempts: 2\nstorage_connect_timeout_s: 1\nstorage_read_timeout_s: 1\n")
        code, log = _run_main([str(manifest), "--output", str(tmp_path / "out"), "--config", str(config),
                               "--endpoint-url", silent.url, *TINY, "--max-in-flight", "2"])
    finally:
        silent.close()
    assert code == 1, log
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["failed"] * 3
    for r in rows:
        assert r["error_kind"] == "storage", r
        assert silent.url in r["error"] and f"s3://bucket/{r['id']}.png" in r["error"], r["error"]
        assert "after 2 tries" in r["error"], r["error"]
        assert "Read timeout" in r["error"], r["error"]  # ended by the read time-out, not at once
    # What reached the endpoint: each object asked for exactly twice, once per try of the policy.
    asked = [req.path.removeprefix("/bucket/").split("?")[0] for req, _ in silent.log]
    assert sorted(asked) == sorted(f"{i}.png" for i in ids for _ in range(2)), silent.log
