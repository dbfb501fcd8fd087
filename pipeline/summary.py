"""``summary.json``: what a run's records add up to (counts, latency percentiles, throughput,
verdicts), with the run's config and any secret in it masked. Gathered one record at a time
(``Tally``), so a driver streaming a manifest of any length keeps only the counts.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .layout import SUMMARY_NAME
from .records import STATUSES
from .storage import Folder

REDACTED = "***"

# Substrings of config keys whose values must never reach summary.json. Deliberately broad
# ("key" also hits e.g. "sort_key"): masking a harmless value costs little, leaking one a lot.
_SECRET_KEY_RE = re.compile(r"secret|key|token|passw|credential", re.IGNORECASE)


class Tally:
    """What ``summary.json`` and the report's header say about a run, gathered one record at a
    time: counts and the two duration columns, not the records, so a driver streaming a
    manifest of any length keeps only this."""

    def __init__(self) -> None:
        self.total = 0
        self.statuses: Counter[str] = Counter()
        self.error_kinds: Counter[str] = Counter()
        self.outputs_written = 0
        self.shaped_outputs = 0  # non-rectangular (top corners shifted)
        self.variant_outputs = 0  # augmentation draws
        self.verdicts = {"beats_resize": 0, "loses_to_resize": 0, "unscored": 0}
        # Outputs in the shards, and those made for a night's shards but left out (keep: verdict).
        self.in_shards = 0
        self.left_out_of_shards = 0
        self.total_seconds = array("d")
        self.train_seconds = array("d")
        self.stretches = array("d")  # each scored output's (ingan.metrics.stretch), where it has one

    def add(self, r: Mapping[str, Any]) -> None:
        self.total += 1
        self.statuses[r.get("status")] += 1
        if r.get("error_kind"):
            self.error_kinds[r["error_kind"]] += 1
        outputs = r.get("outputs") or []
        self.outputs_written += len(outputs)
        for o in outputs:
            self.shaped_outputs += bool(o.get("shift_left") or o.get("shift_right"))
            self.variant_outputs += o.get("variant") is not None
            if o.get("stretch") is not None:
                self.stretches.append(o["stretch"])
            self.in_shards += o.get("shard_key") is not None
            self.left_out_of_shards += o.get("shard_key") is None and o.get("shard_night") is not None
            verdict = o.get("beats_resize")
            self.verdicts["unscored" if verdict is None else "beats_resize" if verdict else "loses_to_resize"] += 1
        for name in ("total_seconds", "train_seconds"):
            if r.get(name) is not None:
                getattr(self, name).append(r[name])

    def status_counts(self) -> dict[str, int]:
        """Records per status; the three known statuses are always present, even at zero."""
        counts = Counter(self.statuses)
        known = {s: counts.pop(s, 0) for s in STATUSES}
        return {**known, **{str(s): n for s, n in counts.items()}}

    def summary(self, *, config: Mapping[str, Any], started: float, finished: float,
                versions: Mapping[str, str], runs: Sequence[Mapping[str, Any]] = (),
                shards: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``runs``: the runs whose rows these are (each its rows and their statuses), when the
        tally is a merged table's; ``shards``: what this run did to its night's shards."""
        counts = self.status_counts()
        wall = finished - started
        return {
            "total": self.total,
            "runs": [dict(r) for r in runs],
            "status_counts": counts,
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "outputs_written": self.outputs_written,
            "shaped_outputs": self.shaped_outputs,
            "variant_outputs": self.variant_outputs,
            "verdicts": dict(self.verdicts),
            "shards": None if shards is None else {"outputs_in_shards": self.in_shards,
                                                   "outputs_left_out": self.left_out_of_shards, **shards},
            # 0: objects kept at their own size, 1: stretched as a resize stretches them.
            "stretch": {"outputs": len(self.stretches),
                        "mean": sum(self.stretches) / len(self.stretches) if self.stretches else None,
                        **_percentiles(self.stretches)},
            "durations": {
                "total_seconds": _percentiles(self.total_seconds),
                "train_seconds": _percentiles(self.train_seconds),
            },
            "wall_seconds": wall,
            # Throughput of finished work: skipped rows were done by an earlier run and failed
            # rows produced nothing, so counting them would flatter the number.
            "images_per_hour": counts["ok"] * 3600.0 / wall if wall > 0 else None,
            "config": redact(config),
            "versions": dict(versions),
        }


def tally(records: Iterable[Mapping[str, Any]]) -> Tally:
    t = Tally()
    for r in records:
        t.add(r)
    return t


def _percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    present = sorted(v for v in values if v is not None)
    return {"p50": _quantile(present, 0.5), "p95": _quantile(present, 0.95)}


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None when empty."""
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def redact(value: Any) -> Any:
    """A copy of ``value`` with every secret-looking key, at any depth, masked."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY_RE.search(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def write_summary(folder: Folder, summary: Mapping[str, Any]) -> str:
    """Write ``summary.json`` and return its URI."""
    return folder.write_json(SUMMARY_NAME, summary)
