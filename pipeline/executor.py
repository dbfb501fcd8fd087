"""Where the work runs: Ray Core tasks, a bounded number of images in flight.

The manifest's rows are turned into items lazily, ``bundle_size`` consecutive items to a task
(the images it trains as one bundle), and at most ``max_in_flight`` images are in submitted tasks
at once, so a 100k-row manifest never sits in the scheduler; each image's record goes to
``on_record`` as its task returns (the driver streams them to storage, ``pipeline.results``). A
task whose worker or node dies is resubmitted (``retries`` times) with the same seeds, so it
writes the same bytes, each image resuming from its own training state (the last retry one image
per task, so that an image that kills its worker fails alone); a task past its time
limit (its images' limits together) is cancelled and its images recorded as timeouts. Everything
else that can go wrong with an image is already a failure record returned by the task itself.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayError, TaskCancelledError

from .records import Item, Record, failed
from .task import Job, bundle_limit_s, process_bundle

# How long past its own per-image limit a task may run before the driver cancels it: the task
# checks its deadline between training iterations, so a cancel is only a backstop.
_GRACE_S = 120.0


@ray.remote
def _run(items: list[Item], job: Job) -> list[Record]:
    # Torch sizes its thread pool from OMP_NUM_THREADS, which Ray sets to the task's CPUs.
    return process_bundle(items, job)


@dataclass
class _Pending:
    items: list[Item]
    attempt: int
    submitted: float


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float
    max_in_flight: int
    retries: int
    timeout_s: float | None  # per image
    bundle_size: int = 1


def run_items(
    items: Iterable[Item],
    job: Job,
    res: Resources,
    on_record: Callable[[Item, Record], None],
) -> None:
    """Process every item, calling ``on_record`` once per item, in completion order."""
    source: Iterator[Item] = iter(items)
    pending: dict[ray.ObjectRef, _Pending] = {}
    job_ref = ray.put(job)  # shipped once, not once per task
    remote = _run.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0)

    def submit(bundle: list[Item], attempt: int) -> None:
        pending[remote.remote(bundle, job_ref)] = _Pending(bundle, attempt, time.monotonic())

    exhausted = False
    while True:
        # At least one task, however small max_in_flight is against the bundle size.
        while not exhausted and (not pending or sum(len(p.items) for p in pending.values()) < res.max_in_flight):
            nxt = list(itertools.islice(source, res.bundle_size))
            if not nxt:
                exhausted = True
            else:
                submit(nxt, 1)
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            p = pending.pop(ref)
            try:
                _hand_on(p, ray.get(ref), on_record)
            except (TaskCancelledError, GetTimeoutError) as exc:
                _hand_on(p, [failed(i, "timeout", f"cancelled past the time limit: {exc}") for i in p.items], on_record)
            except RayError as exc:
                # Lost worker or node (spot reclaim, OOM kill, crash): the task is retried, each
                # image resuming from its own training state. The last retry runs a bundle's
                # images one per task, so an image that kills its worker (a crashing decoder)
                # fails alone instead of taking its neighbours along.
                if p.attempt <= res.retries:
                    last = p.attempt == res.retries
                    for bundle in ([[i] for i in p.items] if last else [p.items]):
                        submit(bundle, p.attempt + 1)
                    continue
                message = f"{type(exc).__name__} after {p.attempt} attempts: {_first_line(exc)}"
                _hand_on(p, [failed(i, _ray_error_kind(exc), message) for i in p.items], on_record)
        _cancel_overdue(pending, res, on_record)


def _hand_on(p: _Pending, recs: list[Record], on_record: Callable[[Item, Record], None]) -> None:
    """Every item's one record, with the attempts its task took, to the driver."""
    for item, rec in zip(p.items, recs, strict=True):
        rec["attempts"] = p.attempt
        on_record(item, rec)


def _cancel_overdue(pending: dict[ray.ObjectRef, _Pending], res: Resources, on_record: Callable[[Item, Record], None]) -> None:
    now = time.monotonic()
    for ref, p in list(pending.items()):
        limit = bundle_limit_s(res.timeout_s, len(p.items))
        if limit is not None and now - p.submitted > limit + _GRACE_S:
            ray.cancel(ref, force=True)
            del pending[ref]
            message = f"no result within {limit:.0f} s (+{_GRACE_S:.0f} s grace); cancelled"
            _hand_on(p, [failed(i, "timeout", message) for i in p.items], on_record)


def _ray_error_kind(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "oom"
    if "NodeDied" in name or "WorkerCrashed" in name or "ObjectLost" in name:
        return "worker_lost"
    return "ray"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
