"""What each image becomes: configured ratios, sizes and shapes, and in augmentation mode random
variants, resolved against the source's size."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

from ingan.retarget import MAX_SIDE as MAX_OUTPUT_SIDE
from ingan.retarget import SHIFT_DECIMALS, Shifts, parse_shape, parse_size

from .config import RunConfig
from .records import item_seed

MIN_OUTPUT_SIDE = 8


class TargetError(ValueError):
    """A target cannot be made for this image (e.g. it would exceed the size limit)."""


@dataclass(frozen=True)
class Target:
    name: str  # stable key in markers: "ratio:2.0", "size:256x256", "shape:2.0@0.3,-0.3", "variant:..."
    ratio: float | None = None  # output width / height
    size: tuple[int, int] | None = None  # explicit (W, H)
    shifts: Shifts | None = None  # top-corner shifts of a shaped output; None: a rectangle
    scale: float | None = None  # a variant's size against its ratio's size
    variant: int | None = None  # a variant's index within the run

    def resolve(self, src_w: int, src_h: int, policy: str) -> tuple[int, int]:
        """Exact (W, H) of this target for a source of ``src_w`` x ``src_h``."""
        if self.size is not None:
            return self.size
        r = float(self.ratio)  # type: ignore[arg-type]
        if policy == "keep_height":
            w, h = src_h * r, src_h
        elif policy == "keep_width":
            w, h = src_w, src_w / r
        else:  # keep_area
            area = src_w * src_h
            w, h = math.sqrt(area * r), math.sqrt(area / r)
        s = 1.0 if self.scale is None else self.scale
        w, h = round(w * s), round(h * s)
        if max(w, h) > MAX_OUTPUT_SIDE:
            what = f"ratio {r}" + (f" at scale {s}" if self.scale is not None else "")
            raise TargetError(f"{what} with {policy} gives {w}x{h}, over the {MAX_OUTPUT_SIDE} px limit")
        return max(MIN_OUTPUT_SIDE, w), max(MIN_OUTPUT_SIDE, h)


def targets_of(cfg: RunConfig, item_id: str | None = None) -> list[Target]:
    """The configured targets, then (with ``item_id`` and ``cfg.augment``) the image's variants."""
    out = [Target(f"ratio:{float(r)}", ratio=float(r)) for r in cfg.ratios]
    out += [Target(f"size:{s}", size=parse_size(s)) for s in cfg.sizes]
    for text in cfg.shapes:  # already canonical: the config checked them
        base, shifts = parse_shape(text)
        if "x" in base:
            out.append(Target(f"shape:{text}", size=parse_size(base), shifts=shifts))
        else:
            out.append(Target(f"shape:{text}", ratio=float(base), shifts=shifts))
    if item_id is not None and cfg.augment:
        out += variants(cfg, item_id)
    return out


def variants(cfg: RunConfig, item_id: str) -> list[Target]:
    """``cfg.augment`` random targets for one image: a ratio drawn log-uniformly from
    ``augment_ratios``, a scale from ``augment_scales`` and, with ``augment_shift``, two top-corner
    shifts. Variant i's draws come from a seed of the run seed, the image id, i and the salt: the
    same night gives the same variants, another salt others, and each image its own."""
    lo, hi = cfg.augment_ratios
    # The name changes with anything that changes the draws, so a marker never passes off one
    # night's (or one range's) variants as another's.
    spec = json.dumps([cfg.augment_salt, cfg.augment_ratios, cfg.augment_scales, cfg.augment_shift, cfg.seed])
    digest = hashlib.sha256(spec.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    out = []
    for i in range(cfg.augment):
        rng = random.Random(item_seed(cfg.seed, item_id, "variant", i, cfg.augment_salt))
        ratio = round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 4)
        scale = round(rng.uniform(*cfg.augment_scales), 4)
        shifts = None
        if cfg.augment_shift > 0:
            m = cfg.augment_shift
            # Within range by the config's bound on augment_shift; rounded as every shift is spelled.
            shifts = (round(rng.uniform(-m, m), SHIFT_DECIMALS) + 0.0, round(rng.uniform(-m, m), SHIFT_DECIMALS) + 0.0)
        out.append(Target(f"variant:{digest}:{i}", ratio=ratio, shifts=shifts, scale=scale, variant=i))
    return out
