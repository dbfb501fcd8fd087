"""Quality table: the presets' InGAN outputs beside bicubic resize, centre crop and seam carving.

    python -m bench.quality --presets cpu [--iterations N] [--image-set S] [--images a,b] [--jobs 2] [--reuse]
                            [--set FIELD=VALUE ... --label NAME] [--bundle]

For each benchmark image (``bench/images``, 256 px on the longer side) and each target (width x2,
width x0.5, square at the source height) every method's output is scored against its source with
the pipeline's own scoring (``ingan.metrics.score_outputs``: completeness, coherence, patch SWD;
lower is better). InGAN images are trained ``--jobs`` at a time, one torch thread each, as the
pipeline runs them on a CPU node, or with ``--bundle`` all of a preset's as bundles in this
process (``ingan.fit.fit_bundle``, as the pipeline runs them on a GPU); each one's training and
retargeting seconds are recorded.

Writes ``bench/results/quality_<presets>.json`` (per image and means; ``quality_<presets>_<set>``
for an image set other than the standard one), the outputs under
``bench/results/quality_outputs/<method>/`` (``--reuse`` scores those again without training),
and one contact sheet per target, ``bench/results/quality_<presets>_<target>.jpg``: each row is one
image, the source first, then each method's output at the same height.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ingan import images
from ingan.config import get_preset
from ingan.metrics import score_outputs

from .common import (
    RESULTS,
    add_image_args,
    bench_images,
    machine,
    parse_overrides,
    quality_label,
    save,
    train_bundle,
    train_one,
)

METRICS = ("completeness", "coherence", "swd", "stretch")
TARGETS = ("width x2", "width x0.5", "square")
BASELINES = ("bicubic", "centre crop", "seam carving")
OUTPUTS = RESULTS / "quality_outputs"


def targets(w: int, h: int) -> dict[str, tuple[int, int]]:
    """Target name -> (W, H) for a W x H source."""
    return {"width x2": (2 * w, h), "width x0.5": (max(8, w // 2), h), "square": (h, h)}


def bicubic(src: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, h, w) for ``size`` = (w, h): the pipeline's own resize."""
    w, h = size
    return images.resize(src, (h, w))


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


def seam_carve(src: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Seam carving (Avidan and Shamir; Rubinstein et al.'s forward energy) to ``size`` = (w, h)."""
    import seam_carving

    arr = src.permute(1, 2, 0).numpy()
    out = seam_carving.resize(arr, size, energy_mode="forward", order="width-first")
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


BASELINE_FNS = {"bicubic": bicubic, "centre crop": centre_crop, "seam carving": seam_carve}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(".", "")


def output_path(method: str, image: str, target: str) -> Path:
    return OUTPUTS / _slug(method) / f"{Path(image).stem}_{_slug(target)}.png"


def _train_one(job: tuple[str, str, int | None, str, list[str]]) -> tuple[str, str, dict[str, torch.Tensor], float, float]:
    """Worker: train ``preset`` (with ``--set`` overrides) on one image, retargeted to the fixed targets."""
    path, preset_name, iterations, device, overrides = job
    tg = targets(*Image.open(path).size)
    outs, train_s, retarget_s = train_one(path, preset_name, [(w, h, None) for w, h in tg.values()],
                                          iterations=iterations, overrides=overrides, device=device)
    return path, preset_name, dict(zip(tg, outs, strict=True)), train_s, retarget_s


def _train_bundles(presets: list[str], paths: list[Path], args: argparse.Namespace) -> list[tuple[str, str, dict[str, torch.Tensor], float, float]]:
    """``_train_one``'s results for every image of each preset, trained as bundles."""
    out = []
    for preset in presets:
        tgs = [targets(*Image.open(p).size) for p in paths]
        done = train_bundle([str(p) for p in paths], preset, [[(w, h, None) for w, h in tg.values()] for tg in tgs],
                            iterations=args.iterations, overrides=args.set, device=args.device)
        for p, tg, (outs, train_s, retarget_s) in zip(paths, tgs, done, strict=True):
            out.append((str(p), preset, dict(zip(tg, outs, strict=True)), train_s, retarget_s))
    return out


def _save_png(t: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(t.permute(1, 2, 0).numpy()).save(path)


def load_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def contact_sheet(rows: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]], path: Path, height: int = 128,
                  max_width: int = 3200, max_bytes: int = 250_000) -> Path:
    """One row per image: the source, then each method's output, all scaled to ``height``.

    Written as a JPEG (quality 85) at ``path.with_suffix('.jpg')``, which is returned: the sheets are
    committed, and a PNG of eight photographs runs to megabytes. A sheet wider than ``max_width`` is
    scaled down, and further until its file is at most ``max_bytes``."""
    pad, label_h = 6, 16
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cells = []
    for name, src, outs in rows:
        row = []
        for lb, t in [("source: " + Path(name).stem, src), *outs.items()]:
            im = Image.fromarray(t.permute(1, 2, 0).numpy()).resize(
                (max(1, round(t.shape[-1] * height / t.shape[-2])), height), Image.LANCZOS)
            # A cell is as wide as its label too: narrow strips (bench.strip) would overprint the next one.
            row.append((lb, im, max(im.width, math.ceil(measure.textlength(lb)))))
        cells.append(row)
    width = max(sum(w + pad for _, _, w in row) for row in cells) + pad
    sheet = Image.new("RGB", (width, len(cells) * (height + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row in cells:
        x = pad
        for label, im, w in row:
            draw.text((x, y), label, fill="black")
            sheet.paste(im, (x, y + label_h))
            x += w + pad
        y += height + label_h + pad
    import io

    out = path.with_suffix(".jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = min(1.0, max_width / sheet.width)
    while True:
        im = sheet if scale == 1 else sheet.resize((round(sheet.width * scale), round(sheet.height * scale)),
                                                   Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85, optimize=True)
        if buf.tell() <= max_bytes:
            break
        scale *= 0.85
    out.write_bytes(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cpu", help="comma-separated presets to train (e.g. cpu,tiny)")
    ap.add_argument("--iterations", type=int, help="override every preset's iterations")
    add_image_args(ap)
    ap.add_argument("--jobs", type=int, default=2, help="images trained at once, one torch thread each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse", action="store_true", help="score the saved InGAN outputs again, no training")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field (or model.FIELD) of every preset; needs --label")
    ap.add_argument("--label", help="name of this variant in the results (default: the presets' names)")
    ap.add_argument("--bundle", action="store_true", help="train each preset's images as bundles, in this process")
    args = ap.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        get_preset(p)  # unknown names fail before any training
    if args.set and not args.label:
        ap.error("--set needs --label, so the variant's outputs and results do not pass for the preset's")
    try:  # bad overrides fail before any training
        for p in presets:
            parse_overrides(args.set).apply(p)
    except (TypeError, ValueError) as exc:
        ap.error(f"--set: {exc}")
    # A variant is named "preset+label": its outputs and rows are kept apart from the preset's own.
    names = {p: f"{p}+{args.label}" if args.label else p for p in presets}
    paths = bench_images(args.images, args.image_set)
    methods = list(BASELINES) + [names[p] for p in presets]

    ran_on = machine()  # at the start: the commit recorded is the one that trained
    outputs: dict[str, dict[str, dict[str, torch.Tensor]]] = {p.name: {} for p in paths}
    timing: dict[str, dict[str, dict[str, float]]] = {names[p]: {} for p in presets}
    if args.reuse:
        for p in paths:
            for preset in presets:
                outputs[p.name][names[preset]] = {t: load_png(output_path(names[preset], p.name, t)) for t in TARGETS}
    else:
        jobs = [(str(p), preset, args.iterations, args.device, args.set) for preset in presets for p in paths]
        started = time.perf_counter()
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            done = _train_bundles(presets, paths, args) if args.bundle else pool.imap_unordered(_train_one, jobs)
            for path, preset, outs, train_s, retarget_s in done:
                name = Path(path).name
                preset = names[preset]
                outputs[name][preset] = outs
                timing[preset][name] = {"train_s": train_s, "retarget_s": retarget_s}
                for t, out in outs.items():
                    _save_png(out, output_path(preset, name, t))
                print(f"{preset} {name}: trained in {train_s:.0f} s, retargeted in {retarget_s:.2f} s", flush=True)
        at_once = "as bundles" if args.bundle else f"with {args.jobs} at once"
        print(f"all trainings: {time.perf_counter() - started:.0f} s wall {at_once}", flush=True)

    rows = []
    for p in paths:
        src = images.load(str(p))
        tg = targets(src.shape[-1], src.shape[-2])
        for method in BASELINES:
            outs = {t: BASELINE_FNS[method](src, tg[t]) for t in TARGETS}
            outputs[p.name][method] = outs
            for t, out in outs.items():
                _save_png(out, output_path(method, p.name, t))
        for method in methods:
            scored = score_outputs(src, {tg[t]: outputs[p.name][method][t] for t in TARGETS})
            for t in TARGETS:
                w, h = tg[t]
                rows.append({"image": p.name, "target": t, "size": f"{w}x{h}", "method": method, **scored[tg[t]]})
        print(f"scored {p.name}", flush=True)

    mean = []
    for t in TARGETS:
        for method in methods:
            sel = [r for r in rows if r["target"] == t and r["method"] == method]
            # Stretch is None where a target keeps the source's aspect (a square source's square).
            m = {k: statistics.mean(vals) if (vals := [r[k] for r in sel if r[k] is not None]) else None for k in METRICS}
            mean.append({"target": t, "method": method, **m, "bds": m["completeness"] + m["coherence"]})
    label = quality_label([names[p] for p in presets], args.image_set)
    for t in TARGETS:
        sheet_rows = [(p.name, images.load(str(p)), {m: outputs[p.name][m][t] for m in methods}) for p in paths]
        contact_sheet(sheet_rows, RESULTS / f"quality_{label}_{_slug(t)}.jpg")
    summary: dict[str, Any] = {"machine": ran_on, "presets": [names[p] for p in presets], "overrides": args.set,
                               "jobs": args.jobs, "bundle": args.bundle, "reused": args.reuse,
                               "iterations": {names[p]: get_preset(p).train.with_overrides(iterations=args.iterations).iterations
                                              for p in presets},
                               "image_set": args.image_set,
                               "images": [p.name for p in paths], "rows": rows, "mean": mean}
    if not args.reuse:
        summary["timing"] = timing
    else:
        # Keep the timings of the run that trained these outputs.
        import json

        old = RESULTS / f"quality_{label}.json"
        if old.exists():
            summary["timing"] = json.loads(old.read_text()).get("timing", {})
            summary["machine"] = json.loads(old.read_text()).get("machine", summary["machine"])
    save(f"quality_{label}", summary)
    for r in mean:
        stretch = "-" if r["stretch"] is None else f"{r['stretch']:.2f}"
        print(f"{r['target']:>10} {r['method']:>13}  C+C {r['bds'] * 1e3:6.2f}  SWD {r['swd']:.3f}  stretch {stretch}")


if __name__ == "__main__":
    main()
