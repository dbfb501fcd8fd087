"""What each image becomes: configured ratios and sizes, resolved against the source's size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ingan.retarget import MAX_SIDE as MAX_OUTPUT_SIDE
from ingan.retarget import parse_size

from .config import RunConfig

MIN_OUTPUT_SIDE = 8


class TargetError(ValueError):
    """A target cannot be made for this image (e.g. it would exceed the size limit)."""


@dataclass(frozen=True)
class Target:
    name: str  # stable key in markers: "ratio:2.0" or "size:256x256"
    ratio: float | None = None  # output width / height
    size: tuple[int, int] | None = None  # explicit (W, H)

    def resolve(self, src_w: int, src_h: int, policy: str) -> tuple[int, int]:
        """Exact (W, H) of this target for a source of ``src_w`` x ``src_h``."""
        if self.size is not None:
            return self.size
        r = float(self.ratio)  # type: ignore[arg-type]
        if policy == "keep_height":
            w, h = round(src_h * r), src_h
        elif policy == "keep_width":
            w, h = src_w, round(src_w / r)
        else:  # keep_area
            area = src_w * src_h
            w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if max(w, h) > MAX_OUTPUT_SIDE:
            raise TargetError(f"ratio {r} with {policy} gives {w}x{h}, over the {MAX_OUTPUT_SIDE} px limit")
        return max(MIN_OUTPUT_SIDE, w), max(MIN_OUTPUT_SIDE, h)


def targets_of(cfg: RunConfig) -> list[Target]:
    out = [Target(f"ratio:{float(r)}", ratio=float(r)) for r in cfg.ratios]
    out += [Target(f"size:{s}", size=parse_size(s)) for s in cfg.sizes]
    return out
