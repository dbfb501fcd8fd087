"""Quality against compute: the generator's metrics every N iterations, against iterations,
training FLOPs and wall seconds, beside a bicubic resize to the same sizes.

    python -m bench.curves --preset cpu [--set crop_size=96 --set model.g_channels=24 ...]
                           [--iterations N] [--eval-every N] [--image-set S] [--images a.png,b.png] --label NAME
    python -m bench.curves --plot NAME [NAME ...] --out bench/results/curves_x.jpg

Each image of the set is trained in turn with the same configuration. At every evaluation point
the generator (the weight average when ``ema`` is on), in eval mode, retargets the image to the
fixed targets (width x2, width x0.5, square at the source height) and each output is scored
against its source exactly as the pipeline scores it (``ingan.metrics.score_outputs``).

FLOPs are counted, not estimated: every ``--flop-every``-th training step runs under
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward, every G and D pass) and counts
for the steps around it, so the total is an unbiased estimate of the whole run's training FLOPs.
Wall seconds are training seconds only (evaluation excluded), on however many threads were given.

Results: ``bench/results/curves/NAME.json`` (one row per evaluation point, per image and as
means) and, with ``--plot``, one PNG comparing runs, each metric as a ratio to bicubic resize
(below 1: the InGAN output scores better than the resize).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ingan import images
from ingan.config import ModelConfig, TrainConfig
from ingan.images import to_model_input
from ingan.losses import Term
from ingan.metrics import score_outputs
from ingan.retarget import retarget_image
from ingan.train import Trainer, calibrate_norm_stats, pick_device

from .common import RESULTS, add_image_args, bench_images, machine, parse_overrides
from .quality import TARGETS, bicubic, targets

CURVES = RESULTS / "curves"
METRICS = ("completeness", "coherence", "swd")


def counted_step(trainer: Trainer) -> int:
    """One training step under the FLOP counter; returns its FLOPs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        trainer.step()
    return int(counter.get_total_flops())


def evaluate(trainer: Trainer, src: torch.Tensor, max_side: int | None) -> dict[str, dict[str, float]]:
    """Metrics of the current generator's outputs for the fixed targets of ``src``."""
    # A copy, finished as training finishes it (statistics calibrated when the config says so),
    # so evaluating never disturbs the training that goes on.
    g = copy.deepcopy(trainer.g)
    if trainer.cfg.norm_calibration > 0:
        calibrate_norm_stats(trainer, g, trainer.cfg.norm_calibration)
    g.eval()
    tg = targets(src.shape[-1], src.shape[-2])
    sizes = list(tg.values())
    outs = retarget_image(g, src, [(h, w) for w, h in sizes], max_side)
    scored = score_outputs(src, dict(zip(sizes, outs, strict=True)))
    return {name: scored[size] for name, size in tg.items()}


def baseline(src: torch.Tensor) -> dict[str, dict[str, float]]:
    tg = targets(src.shape[-1], src.shape[-2])
    scored = score_outputs(src, {s: bicubic(src, s) for s in tg.values()})
    return {name: scored[size] for name, size in tg.items()}


def run_image(src: torch.Tensor, model: ModelConfig, train: TrainConfig, eval_every: int, flop_every: int,
              device: torch.device, terms: list[Term] | None = None) -> list[dict[str, Any]]:
    trainer = Trainer([to_model_input(src)], model, train, device, terms=terms or ())
    trainer.g.train()
    trainer.d.train()
    points, flops, seconds = [], 0, 0.0
    while trainer.iteration < train.iterations:
        t0 = time.perf_counter()
        if trainer.iteration % flop_every == 0:
            flops += counted_step(trainer) * min(flop_every, train.iterations - trainer.iteration)
        else:
            trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        i = trainer.iteration
        if i % eval_every == 0 or i == train.iterations:
            points.append({"iteration": i, "flops": flops, "seconds": seconds,
                           "metrics": evaluate(trainer, src, train.max_side)})
            m = points[-1]["metrics"]
            print(f"  {i}: {seconds:.0f} s, " + ", ".join(
                f"{t} C+C {(v['completeness'] + v['coherence']) * 1e3:.2f} SWD {v['swd']:.3f}" for t, v in m.items()), flush=True)
    return points


def summarise(per_image: dict[str, list[dict[str, Any]]], base: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Mean over images at each evaluation point, and each metric's ratio to bicubic's mean."""
    names = list(per_image)
    rows = []
    for k, first in enumerate(per_image[names[0]]):
        row: dict[str, Any] = {"iteration": first["iteration"],
                               "flops": statistics.mean(per_image[n][k]["flops"] for n in names),
                               "seconds": statistics.mean(per_image[n][k]["seconds"] for n in names)}
        for target in TARGETS:
            mean = {m: statistics.mean(per_image[n][k]["metrics"][target][m] for n in names) for m in METRICS}
            bmean = {m: statistics.mean(base[n][target][m] for n in names) for m in METRICS}
            bds = mean["completeness"] + mean["coherence"]
            bbds = bmean["completeness"] + bmean["coherence"]
            row[target] = {**mean, "bds": bds, "bds_vs_bicubic": _ratio(bds, bbds), "swd_vs_bicubic": _ratio(mean["swd"], bmean["swd"])}
        rows.append(row)
    return rows


def _ratio(value: float, baseline: float) -> float:
    # A zero baseline: the target is the source's own shape (a square image's square target),
    # where the resize is the image itself and no ratio means anything.
    return value / baseline if baseline > 0 else math.nan


def table(label: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{label}", "| iteration | GFLOPs | train s | " + " | ".join(
        f"{t}: C+C / bicubic | {t}: SWD / bicubic" for t in TARGETS) + " |"]
    lines.append("|---" * (3 + 2 * len(TARGETS)) + "|")
    for r in rows:
        cells = [f"{r['iteration']}", f"{r['flops'] / 1e9:,.0f}", f"{r['seconds']:.0f}"]
        cells += [f"{r[t]['bds_vs_bicubic']:.3f} | {r[t]['swd_vs_bicubic']:.3f}" for t in TARGETS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def restrict(data: dict[str, Any], image: str | None) -> list[dict[str, Any]]:
    """The run's mean rows, or rows for one of its images alone (runs compared on the same image)."""
    if image is None:
        return data["mean"]
    return summarise({image: data["per_image"][image]}, {image: data["baseline"][image]})


def plot(labels: list[str], out: Path, image: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {lb: restrict(json.loads((CURVES / f"{lb}.json").read_text()), image) for lb in labels}
    axes_x = (("iteration", "iterations", 1.0), ("flops", "training TFLOPs", 1e12), ("seconds", "training seconds", 1.0))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharey="row")
    for col, (key, xlabel, div) in enumerate(axes_x):
        for row, (metric, ylabel) in enumerate((("bds_vs_bicubic", "completeness + coherence / bicubic's"),
                                                ("swd_vs_bicubic", "patch SWD / bicubic's"))):
            ax = axes[row][col]
            for lb, data in runs.items():
                xs = [r[key] / div for r in data]
                # The two width targets, where retargeting matters most, averaged.
                ys = [statistics.mean(r[t][metric] for t in ("width x2", "width x0.5")) for r in data]
                ax.plot(xs, ys, marker="o", ms=3, label=lb)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"InGAN quality against compute on {image or 'each run’s images'} (mean of width x2 and width x0.5; "
                 "below the dashed line beats bicubic resize)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field, or a ModelConfig field as model.FIELD")
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--flop-every", type=int, default=10)
    add_image_args(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--label")
    ap.add_argument("--plot", nargs="+", metavar="LABEL", help="plot these saved runs instead of training")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--image", help="with --plot: compare the runs on this one image (e.g. china.png)")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.out or RESULTS / f"curves_{'_'.join(args.plot)}.jpg", args.image)
        for lb in args.plot:
            print(table(lb, restrict(json.loads((CURVES / f"{lb}.json").read_text()), args.image)))
        return
    if not args.label:
        ap.error("--label is required to train")
    device = pick_device(args.device)
    model, train, terms = parse_overrides(args.set).apply(args.preset, args.iterations)
    paths = bench_images(args.images, args.image_set)
    per_image, base = {}, {}
    for path in paths:
        src = images.load(str(path))
        base[path.name] = baseline(src)
        per_image[path.name] = run_image(src, model, train, args.eval_every, args.flop_every, device, terms)
        last = per_image[path.name][-1]
        print(f"{path.name}: {last['seconds']:.0f} s, {last['flops'] / 1e12:.2f} TFLOPs", flush=True)
        rows = summarise(per_image, base)
        CURVES.mkdir(parents=True, exist_ok=True)
        # Written after every image, so a long run can be read (and plotted) while it goes on.
        (CURVES / f"{args.label}.json").write_text(json.dumps({
            "label": args.label, "preset": args.preset, "overrides": args.set, "machine": machine(),
            "model": dataclasses.asdict(model), "train": dataclasses.asdict(train),
            "image_set": args.image_set, "images": list(per_image), "baseline": base, "per_image": per_image, "mean": rows}, indent=1) + "\n")
    print(table(args.label, rows))


if __name__ == "__main__":
    main()
