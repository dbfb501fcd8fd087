"""How a training reports its progress, and the one way durations are spelled in those reports
(the CLI's progress lines, the pipeline's progress bar)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    iteration: int  # iterations completed
    total: int
    losses: dict[str, float]
    seconds: float  # wall time since training started
    rate: float  # iterations per second so far

    @property
    def eta(self) -> float:
        return (self.total - self.iteration) / self.rate if self.rate > 0 else math.inf


def hms(seconds: float) -> str:
    """A duration as H:MM:SS ("?" when unknown: an infinite ETA)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
