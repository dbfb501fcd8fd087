"""Quality table: InGAN beside bicubic resize and centre crop on the bundled images.

    python -m bench.quality [--preset tiny] [--iterations N] [--images a.png,b.png]

For each image and each target (width x2, width x0.5, square at the source height) every method's
output is scored against its source with the pipeline's own scoring (both scaled by the same
factor to at most 192 px): completeness, coherence, patch SWD; lower is better.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ingan import images
from ingan.config import get_preset
from ingan.retarget import retarget_image
from ingan.train import pick_device, train
from pipeline.task import score_outputs

from .common import bench_images, machine, save

METRICS = ("completeness", "coherence", "swd")


def targets(w: int, h: int) -> dict[str, tuple[int, int]]:
    return {"width x2": (2 * w, h), "width x0.5": (max(8, w // 2), h), "square": (h, h)}


def bicubic(src: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    w, h = size
    y = F.interpolate(src[None].float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


def centre_crop(src: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The largest centred region of the target's aspect, resized to the target size."""
    w, h = size
    sh, sw = src.shape[-2:]
    if sw / sh > w / h:
        cw, ch = round(sh * w / h), sh
    else:
        cw, ch = sw, round(sw * h / w)
    top, left = (sh - ch) // 2, (sw - cw) // 2
    return bicubic(src[:, top:top + ch, left:left + cw], size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--images", help="comma-separated file names (default: all bundled)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    preset = get_preset(args.preset)
    train_cfg = preset.train.with_overrides(iterations=args.iterations)
    paths = bench_images()
    if args.images:
        wanted = set(args.images.split(","))
        paths = [p for p in paths if p.name in wanted]
    rows = []
    for path in paths:
        src = images.load(str(path))
        sh, sw = src.shape[-2:]
        tg = targets(sw, sh)
        t0 = time.perf_counter()
        trainer = train(src, preset.model, train_cfg, device)
        train_s = time.perf_counter() - t0
        sizes = list(tg.values())
        outs = {"ingan": retarget_image(trainer.g, src, [(h, w) for w, h in sizes], train_cfg.max_side),
                "bicubic": [bicubic(src, s) for s in sizes], "centre crop": [centre_crop(src, s) for s in sizes]}
        for method, method_outs in outs.items():
            scored = score_outputs(src, dict(zip(sizes, method_outs, strict=True)), 192)
            for name, size in tg.items():
                rows.append({"image": path.name, "target": name, "size": f"{size[0]}x{size[1]}", "method": method,
                             **scored[size]})
        print(f"{path.name}: trained {train_s:.1f} s", flush=True)
    summary = []
    for target in ("width x2", "width x0.5", "square"):
        for method in ("ingan", "bicubic", "centre crop"):
            sel = [r for r in rows if r["target"] == target and r["method"] == method]
            summary.append({"target": target, "method": method,
                            **{m: statistics.mean(r[m] for r in sel) for m in METRICS}})
    for s in summary:
        print(s)
    save(f"quality_{args.preset}_{device.type}", {"machine": machine(), "preset": args.preset,
                                                   "iterations": train_cfg.iterations, "images": [p.name for p in paths],
                                                   "rows": rows, "mean": summary})


if __name__ == "__main__":
    main()
