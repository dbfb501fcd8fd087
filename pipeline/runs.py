"""Runs that share an output folder: run ids, heartbeats, dead runs' leftovers and locks.

Two runs may write into one output at once (shards of a manifest, or the same command started
twice). Each has an id and keeps its rows under ``results.parts/{run_id}/``; while it lives it
renews ``runs/{run_id}.json`` every ``heartbeat_s``, so another run can tell its files from a
dead run's. A heartbeat older than ``stale_after_s`` is a dead run's (a killed driver leaves
its own behind): the next run to start removes that run's parts and heartbeat, and never a live
run's. ``results.lock``, taken by an atomic create, keeps two finishing runs from reading and
replacing ``results.parquet`` at the same moment. Everything goes through ``Folder``, so local
folders and S3 behave alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from . import layout
from .storage import Folder, StorageError

_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


def new_run_id(started: float | None = None) -> str:
    """The UTC start time, host, pid and a random suffix: unique, in start order when sorted,
    and safe as one path segment whatever the host is called."""
    started = time.time() if started is None else started
    host = _HOST_UNSAFE.sub("_", socket.gethostname()).strip("_-")[:40] or "host"
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def utc_text(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def live_runs(folder: Folder, stale_after_s: float) -> dict[str, dict[str, Any]]:
    """The runs whose heartbeat is fresher than ``stale_after_s``: run id -> heartbeat."""
    now, live = time.time(), {}
    for name in folder.list(layout.RUNS_DIR):
        run_id = layout.heartbeat_run_id(name)
        try:
            beat = folder.read_json(layout.heartbeat_path(run_id))
        except (FileNotFoundError, ValueError):  # ended since the listing, or not a heartbeat
            continue
        when = beat.get("heartbeat") if isinstance(beat, dict) else None
        if isinstance(when, (int, float)) and now - when <= stale_after_s:
            live[run_id] = beat
    return live


def remove_dead(folder: Folder, own: str, stale_after_s: float) -> list[str]:
    """Remove the parts and heartbeats of dead runs (and the parts of a version that kept them
    all in one folder); returns what was removed. The parts are listed before the heartbeats are
    read: a run writes its heartbeat before its first part, so a live run whose parts are listed
    has its heartbeat seen too."""
    parts = folder.list(layout.PARTS_DIR)
    beats = [layout.heartbeat_run_id(name) for name in folder.list(layout.RUNS_DIR)]
    live = {own, *live_runs(folder, stale_after_s)}
    removed = []
    for name in parts:
        if name not in live:
            folder.remove(layout.run_parts_dir(name), recursive=True)
            removed.append(layout.run_parts_dir(name))
    for run_id in beats:
        if run_id not in live:
            folder.remove(layout.heartbeat_path(run_id))
            removed.append(layout.heartbeat_path(run_id))
    return removed


class Heartbeat:
    """This run's ``runs/{run_id}.json`` (host, pid, start, manifest, last beat), written by
    ``start`` and renewed every ``every_s`` by a daemon thread until ``stop`` removes it. Each
    beat also notes the other runs found live (``overlapped``): the runs whose rows this run's
    results keep beside its own."""

    def __init__(self, folder: Folder, run_id: str, manifest: str, every_s: float, stale_after_s: float,
                 started: float) -> None:
        self.folder, self.run_id, self.every_s, self.stale_after_s = folder, run_id, every_s, stale_after_s
        self._fields = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
                        "started_utc": utc_text(started), "manifest": manifest}
        self._seen: set[str] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"heartbeat {run_id}", daemon=True)

    def start(self) -> set[str]:
        """The first beat (a ``StorageError`` when storage refuses it: the run could not write
        its output either), then the renewals; returns the other runs live now."""
        self._beat()
        live = self._look()
        self._thread.start()
        return live

    def overlapped(self) -> frozenset[str]:
        with self._guard:
            return frozenset(self._seen)

    def stop(self) -> None:
        """End the renewals (waiting for one in flight, so it cannot rewrite the file after)
        and remove the heartbeat."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(StorageError, OSError):
            self.folder.remove(layout.heartbeat_path(self.run_id))

    def _beat(self) -> None:
        now = time.time()
        self.folder.write_json(layout.heartbeat_path(self.run_id),
                               {**self._fields, "heartbeat": now, "heartbeat_utc": utc_text(now)})

    def _look(self) -> set[str]:
        live = set(live_runs(self.folder, self.stale_after_s)) - {self.run_id}
        with self._guard:
            self._seen |= live
        return live

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            # A missed beat is made up by the next; only stale_after_s of them make this run look
            # dead, and its finish then says which of its rows were removed.
            with contextlib.suppress(StorageError, OSError):
                self._beat()
                self._look()


@contextlib.contextmanager
def held(folder: Folder, rel: str, run_id: str, wait_s: float, stale_after_s: float,
         poll_s: float = 0.5) -> Iterator[bool]:
    """Hold the lock object ``rel`` while the body runs: yields True, or False (holding nothing)
    when another run held it for all of ``wait_s``. A lock older than ``stale_after_s`` is a
    crashed holder's and is broken: replaced by this run's only if it is still the version judged
    stale (``Folder.replace_if``), so of two runs breaking it at once one takes it. The lock's age
    is the storage's own modification time: a local lock can be caught between its create and its
    write, with nothing to read in it yet."""
    mine = _take(folder, rel, run_id, wait_s, stale_after_s, poll_s)
    try:
        yield mine is not None
    finally:
        # Only while it is still this run's: one held past stale_after_s may have been broken
        # and taken by another run since.
        if mine is not None and folder.read_if_there(rel) == mine:
            with contextlib.suppress(StorageError, OSError):
                folder.remove(rel)


def results_lock(folder: Folder, run_id: str, wait_s: float, stale_after_s: float,
                 poll_s: float = 0.5) -> contextlib.AbstractContextManager[bool]:
    """``results.lock``: one finishing run at a time reads and replaces ``results.parquet``."""
    return held(folder, layout.RESULTS_LOCK, run_id, wait_s, stale_after_s, poll_s)


def _take(folder: Folder, rel: str, run_id: str, wait_s: float, stale_after_s: float,
          poll_s: float) -> bytes | None:
    deadline = time.monotonic() + wait_s
    while True:
        now = time.time()
        mine = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "taken": now,
                           "taken_utc": utc_text(now)}).encode()
        if folder.create_exclusive(rel, mine):
            return mine
        seen = folder.stamp(rel)
        if seen is None:
            continue  # released meanwhile: try again at once
        if time.time() - seen.modified > stale_after_s:
            if folder.replace_if(rel, mine, seen):
                return mine
            continue  # another run broke it first, or it changed since: look again
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)
