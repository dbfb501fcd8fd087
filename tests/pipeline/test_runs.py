"""Tests for pipeline.runs and the storage seam under it: run ids, heartbeats, what dead runs
leave, and the results lock, on local folders and on the S3 server (moto on loopback)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from support import REPO, released_together, wait_for

from pipeline import layout, runs
from pipeline.config import ConfigError, load_config
from pipeline.storage import Folder


def _beat(folder: Folder, run_id: str, age_s: float) -> None:
    """Another run's heartbeat, last renewed ``age_s`` ago."""
    folder.write_json(layout.heartbeat_path(run_id), {"run_id": run_id, "heartbeat": time.time() - age_s})


# --------------------------------------------------------------------------- run ids


def test_run_ids_are_unique_ordered_by_start_and_safe_as_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs.socket, "gethostname", lambda: "../evil host/x\n")
    ids = [runs.new_run_id(1_700_000_000.0 + k) for k in (0, 0, 3600)]
    assert len(set(ids)) == 3
    assert ids[0][:16] == ids[1][:16] == "20231114T221320Z"
    assert sorted(ids[1:]) == ids[1:]  # a later start sorts later
    for run_id in ids:
        assert "/" not in run_id and ".." not in run_id and "\n" not in run_id and " " not in run_id
        assert "evil_host_x" in run_id


# --------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_lives_while_the_run_does_and_notes_who_else_lives(folder: Folder) -> None:
    _beat(folder, "other-live", 1)
    _beat(folder, "other-dead", 1000)
    hb = runs.Heartbeat(folder, "me", "s3://bucket/manifest.parquet", every_s=0.1, stale_after_s=600,
                        started=time.time())
    assert hb.start() == {"other-live"}
    first = folder.read_json(layout.heartbeat_path("me"))
    assert {k: first[k] for k in ("run_id", "manifest")} == {"run_id": "me", "manifest": "s3://bucket/manifest.parquet"}
    assert {"host", "pid", "started", "heartbeat"} <= set(first)
    _beat(folder, "later", 0)  # a run that starts while this one lives
    deadline = time.monotonic() + 10
    while "later" not in hb.overlapped() or folder.read_json(layout.heartbeat_path("me"))["heartbeat"] == first["heartbeat"]:
        assert time.monotonic() < deadline, "the heartbeat was not renewed"
        time.sleep(0.05)
    folder.remove(layout.heartbeat_path("later"))  # it ends: it still overlapped this run
    hb.stop()
    assert hb.overlapped() == {"other-live", "later"}
    assert not folder.exists(layout.heartbeat_path("me"))
    assert set(runs.live_runs(folder, 600)) == {"other-live"}


def test_only_dead_runs_leftovers_are_removed(folder: Folder) -> None:
    for run_id in ("live", "dead", "me"):
        folder.write_bytes(f"{layout.run_parts_dir(run_id)}/part-000000.parquet", b"rows")
    folder.write_bytes(f"{layout.PARTS_DIR}/part-000000.parquet", b"rows of a version with one parts folder")
    folder.write_bytes(f"{layout.run_parts_dir('no-heartbeat')}/part-000000.parquet", b"rows")
    _beat(folder, "live", 5)
    _beat(folder, "dead", 50)
    removed = runs.remove_dead(folder, "me", stale_after_s=30)
    assert sorted(removed) == sorted([f"{layout.PARTS_DIR}/dead", f"{layout.PARTS_DIR}/no-heartbeat",
                                      f"{layout.PARTS_DIR}/part-000000.parquet", layout.heartbeat_path("dead")])
    assert folder.list(layout.PARTS_DIR) == ["live", "me"]
    assert folder.list(layout.RUNS_DIR) == ["live.json"]


def test_heartbeat_settings_are_checked() -> None:
    cfg = load_config(None, {"heartbeat_s": 1, "stale_after_s": 4})
    assert (cfg.heartbeat_s, cfg.stale_after_s, cfg.lock_wait_s) == (1, 4, 60)
    assert load_config(None, {}).stale_after_s == 600
    with pytest.raises(ConfigError, match="stale_after_s"):
        load_config(None, {"heartbeat_s": 30, "stale_after_s": 40})


# --------------------------------------------------------------------------- the lock


def test_an_exclusive_create_happens_once(folder: Folder) -> None:
    assert folder.create_exclusive("results.lock", b"first")
    assert not folder.create_exclusive("results.lock", b"second")
    assert folder.read_bytes("results.lock") == b"first"
    # A retried create whose first answer was lost finds its own bytes: it holds the lock.
    assert folder.create_exclusive("results.lock", b"first")
    modified = folder.modified("results.lock")
    assert modified is not None and abs(time.time() - modified) < 120
    folder.remove("results.lock")
    assert folder.modified("results.lock") is None
    assert folder.create_exclusive("results.lock", b"second")


def test_the_s3_server_refuses_a_second_conditional_create(s3_client: Any, s3_bucket: str) -> None:
    """What the lock stands on: a put with ``If-None-Match: *`` fails with 412 once the key exists."""
    s3_client.put_object(Bucket=s3_bucket, Key="lock", Body=b"a", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3_client.put_object(Bucket=s3_bucket, Key="lock", Body=b"b", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3_client.get_object(Bucket=s3_bucket, Key="lock")["Body"].read() == b"a"


def test_the_lock_admits_one_run_at_a_time(folder: Folder) -> None:
    inside, most, entries = [0], [0], []
    guard = threading.Lock()

    def finish(k: int) -> None:
        with runs.results_lock(Folder(folder.base, folder.storage), f"run-{k}", wait_s=60, stale_after_s=600,
                               poll_s=0.01) as held:
            assert held
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            entries.append(json.loads(folder.read_bytes(layout.RESULTS_LOCK))["run_id"])
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=finish, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert most[0] == 1
    assert sorted(entries) == [f"run-{k}" for k in range(4)]  # each held it, under its own name
    assert not folder.exists(layout.RESULTS_LOCK)


def test_a_lock_held_too_long_is_given_up_on(folder: Folder) -> None:
    folder.write_bytes(layout.RESULTS_LOCK, b'{"run_id": "holder"}')
    t0 = time.monotonic()
    with runs.results_lock(folder, "me", wait_s=0.5, stale_after_s=600, poll_s=0.1) as held:
        assert not held
    assert 0.5 <= time.monotonic() - t0 < 10
    assert folder.read_bytes(layout.RESULTS_LOCK) == b'{"run_id": "holder"}'


def test_a_stale_lock_is_broken(folder: Folder) -> None:
    folder.write_bytes(layout.RESULTS_LOCK, b'{"run_id": "crashed"}')
    time.sleep(1.5)  # S3's LastModified counts whole seconds
    with runs.results_lock(folder, "me", wait_s=0, stale_after_s=1, poll_s=0.1) as held:
        assert held
        assert json.loads(folder.read_bytes(layout.RESULTS_LOCK))["run_id"] == "me"
    assert not folder.exists(layout.RESULTS_LOCK)


def test_a_lock_taken_from_this_run_is_not_removed_by_it(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    with runs.results_lock(folder, "me", wait_s=0, stale_after_s=600) as held:
        assert held
        folder.remove(layout.RESULTS_LOCK)  # broken as stale by another run, which took it
        assert folder.create_exclusive(layout.RESULTS_LOCK, b"theirs")
    assert folder.read_bytes(layout.RESULTS_LOCK) == b"theirs"



def test_two_processes_breaking_one_stale_lock_leave_one_holder(folder: Folder, tmp_path: Path) -> None:
    """Two processes (``tests/stale_lock_breaker.py``) find the same crashed holder's lock stale and
    break it at the same instant: each, having judged it stale and about to break it, waits until
    both are. One takes the lock and holds it a second; the other is refused. (Breaking by a read
    and a remove, as before, let two runs that had both read the stale lock both remove it, the
    second removing the lock the first had taken meanwhile.)"""
    from stale_lock_breaker import STALE_AFTER_S

    folder.write_bytes(layout.RESULTS_LOCK, b'{"run_id": "crashed"}')
    if folder.is_local:
        past = time.time() - 60
        os.utime(folder.path(layout.RESULTS_LOCK), (past, past))
    wait_for(lambda: time.time() - folder.modified(layout.RESULTS_LOCK) > STALE_AFTER_S + 0.5, "a stale lock")
    log, ready, go = tmp_path / "holders.log", tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    procs = released_together([[str(REPO / "tests" / "stale_lock_breaker.py"), folder.base,
                                 json.dumps(folder.storage.options), str(log),
                                 str(ready), str(go), name] for name in ("a", "b")], ready, go,
                              "both processes about to break the stale lock", timeout=120)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    lines = log.read_text().splitlines()
    (winner,) = [line.split()[1] for line in lines if line.startswith("enter ")]
    loser = "b" if winner == "a" else "a"
    assert sorted(lines) == sorted([f"enter {winner}", f"exit {winner}", f"refused {loser}"]), lines
    assert not folder.exists(layout.RESULTS_LOCK)
