"""Which Ray the driver uses: a stale address file never blocks a local run, and a cluster that
does not answer stops the run quickly with exit code 2 and a message naming the address.

Each case runs ``run.py`` in a process of its own, as a user would, so the exit code and the time
to it include the interpreter's shutdown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import free_port

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "images" / "brick.png"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR of its own: Ray keeps its address file and sockets under it (socket paths
    must stay under about 100 characters, which pytest's tmp_path can exceed)."""
    path = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _manifest(tmp: Path) -> Path:
    path = tmp / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(IMAGE)], "id": ["brick"]}), path)
    return path


def _run(tmp: Path, env: dict[str, str], timeout: float, *flags: str) -> tuple[int, str, float]:
    cmd = [sys.executable, str(REPO / "run.py"), str(_manifest(tmp)), "--output", str(tmp / "out"),
           "--preset", "tiny", "--iterations", "2", "--ratios", "2", "--no-metrics", *flags]
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env={**base, **env}, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _assert_refused(code: int, log: str, address: str, tmp: Path) -> None:
    assert code == 2, log[-3000:]
    assert f"the Ray cluster at {address} (RAY_ADDRESS) does not answer" in log
    assert "unset it to run on a local Ray" in log
    assert not (tmp / "out" / "results.parquet").exists()


@pytest.mark.slow
def test_stale_cluster_file_does_not_stop_a_local_run(short_tmp: Path) -> None:
    # What a head killed without `ray stop` leaves: its address, nothing listening there.
    (short_tmp / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (short_tmp / "ray" / "ray_current_cluster").write_text(dead)
    code, log, _ = _run(short_tmp, {"TMPDIR": str(short_tmp)}, timeout=300)
    assert code == 0, log[-3000:]
    assert dead not in log  # never tried
    assert (short_tmp / "out" / "results.parquet").exists()
    assert pq.read_table(short_tmp / "out" / "results.parquet").column("status").to_pylist() == ["ok"]


@pytest.mark.slow
def test_closed_ray_address_fails_fast_with_the_address(short_tmp: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, log, seconds = _run(short_tmp, {"TMPDIR": str(short_tmp), "RAY_ADDRESS": address}, timeout=120)
    _assert_refused(code, log, address, short_tmp)
    assert seconds < 45, seconds


@pytest.mark.slow
def test_silent_ray_address_fails_within_the_bound(short_tmp: Path) -> None:
    """A port that accepts connections and never answers: Ray alone would wait forever. The
    bound is the config's (30 s by default; 8 s here, to keep the suite short)."""
    config = short_tmp / "run.yaml"
    config.write_text("connect_timeout_s: 8\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        code, log, seconds = _run(short_tmp, {"TMPDIR": str(short_tmp), "RAY_ADDRESS": address}, 120,
                                  "--config", str(config))
    _assert_refused(code, log, address, short_tmp)
    assert "no answer within 8 s" in log
    assert seconds < 30, seconds


@pytest.mark.slow
def test_another_process_s_local_ray_is_not_joined(short_tmp: Path) -> None:
    """A local Ray some other program started for itself (no `ray start`, so no address file) is
    not this run's cluster: the run starts its own instead of failing to join it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(include_dashboard=False); print('up', flush=True); time.sleep(600)"],
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(short_tmp)},
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        code, log, _ = _run(short_tmp, {"TMPDIR": str(short_tmp)}, timeout=300)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert code == 0, log[-3000:]
    assert "does not answer" not in log
    assert pq.read_table(short_tmp / "out" / "results.parquet").column("status").to_pylist() == ["ok"]
