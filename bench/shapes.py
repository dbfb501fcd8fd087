"""Shaped outputs: what training with top-corner shifts buys on shaped targets, and what it costs
on rectangular ones, the same images trained both ways.

    python -m bench.shapes [--preset cpu] [--max-shift 0.3] [--images a,b] [--jobs 2] [--iterations N]

Each image is trained twice with the preset, once as it is and once with ``max_shift`` set (the
same seed, so the runs differ only in the shifts), ``--jobs`` at a time with one torch thread each.
Both models are retargeted to two rectangles (width x2, width x0.5) and two shapes (width x1.5 with
the top edge narrowed by 0.3 at each corner, and the source's size with the top-left corner moved
right by 0.4), and every output is scored with the pipeline's own scoring
(``ingan.metrics.score_against_resize``: a shape inside its frame, against a bicubic resize put
through the same frame).

Writes ``bench/results/shapes_<preset>.json`` (per image and means) and a contact sheet
``bench/results/shapes_<preset>.jpg``: per image, the source, then for each shape in turn
(trapezoid x1.5, slant) the resize in the frame and both models' outputs, over a checkerboard
where they are transparent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ingan import images
from ingan.config import get_preset
from ingan.metrics import score_against_resize
from ingan.retarget import retarget_mask

from .common import RESULTS, Shape, bench_images, machine, save, train_one


def targets(w: int, h: int) -> dict[str, Shape]:
    return {
        "width x2": (2 * w, h, None),
        "width x0.5": (max(8, w // 2), h, None),
        "trapezoid x1.5": (round(1.5 * w), h, (0.3, -0.3)),
        "slant": (w, h, (0.4, 0.0)),
    }


SHAPED = ("trapezoid x1.5", "slant")


def _train_one(job: tuple[str, str, float, int | None]) -> tuple[str, float, dict[str, torch.Tensor], float]:
    path, preset_name, max_shift, iterations = job
    tg = targets(*Image.open(path).size)
    outs, seconds, _ = train_one(path, preset_name, list(tg.values()), iterations=iterations, max_shift=max_shift)
    return path, max_shift, dict(zip(tg, outs, strict=True)), seconds


def _rgba(t: torch.Tensor, shifts: tuple[float, float] | None, height: int) -> Image.Image:
    im = images.to_pil(t).convert("RGBA")
    if shifts is not None:
        im.putalpha(Image.fromarray(retarget_mask(tuple(t.shape[-2:]), shifts).to(torch.uint8).mul(255).numpy(), "L"))
    return im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS)


def _checker(size: tuple[int, int], cell: int = 8) -> Image.Image:
    board = Image.new("RGBA", size, (255, 255, 255, 255))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range(0, size[0], cell):
            if (x // cell + y // cell) % 2:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(200, 204, 208, 255))
    return board


def contact_sheet(rows: list[tuple[str, list[tuple[str, Image.Image]]]], path: Path) -> None:
    pad, label_h = 6, 14
    width = max(sum(im.width + pad for _, im in cells) for _, cells in rows) + pad
    height = sum(max(im.height for _, im in cells) + label_h + pad for _, cells in rows) + pad
    sheet = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for _, cells in rows:
        x = pad
        for label, im in cells:
            draw.text((x, y), label, fill=(0, 0, 0, 255))
            tile = _checker(im.size)
            tile.alpha_composite(im)
            sheet.paste(tile, (x, y + label_h))
            x += im.width + pad
        y += max(im.height for _, im in cells) + label_h + pad
    # JPEG: a sheet of photographs is several MB as PNG (committed pictures stay under 300 KB).
    sheet.convert("RGB").save(path, quality=85, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-shift", type=float, default=0.3)
    ap.add_argument("--images", default="china,brick,flower,chelsea")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--iterations", type=int)
    args = ap.parse_args()
    get_preset(args.preset)
    paths = bench_images(args.images)
    base_shift = get_preset(args.preset).train.max_shift
    variants = {f"{args.preset} (max_shift {base_shift:g})": base_shift,
                f"{args.preset} + max_shift {args.max_shift:g}": args.max_shift}
    name_of = {v: k for k, v in variants.items()}
    ran_on = machine()  # at the start: the commit recorded is the one that trained
    jobs = [(str(p), args.preset, shift, args.iterations) for shift in variants.values() for p in paths]
    outs: dict[str, dict[str, dict[str, torch.Tensor]]] = {p.name: {} for p in paths}
    seconds: dict[str, dict[str, float]] = {k: {} for k in variants}
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for path, shift, o, s in pool.imap_unordered(_train_one, jobs):
            outs[Path(path).name][name_of[shift]] = o
            seconds[name_of[shift]][Path(path).name] = s
            print(f"{name_of[shift]} {Path(path).name}: trained in {s:.0f} s", flush=True)

    rows, sheet_rows = [], []
    for p in paths:
        src = images.load(str(p))
        tg = targets(src.shape[-1], src.shape[-2])
        cells = [("source", _rgba(src, None, 96))]
        for variant in variants:
            scored = score_against_resize(src, {tg[t]: outs[p.name][variant][t] for t in tg})
            for t, shape in tg.items():
                rows.append({"image": p.name, "target": t, "variant": variant, **scored[shape]})
        for t in SHAPED:
            w, h, sh = tg[t]
            cells.append(("resize", _rgba(images.shaped_resize(src, (h, w), sh), sh, 96)))
            cells += [(short, _rgba(outs[p.name][v][t], sh, 96))
                      for short, v in zip(("no shifts", f"shifts {args.max_shift:g}"), variants, strict=True)]
        sheet_rows.append((p.name, cells))
        print(f"scored {p.name}", flush=True)

    mean = []
    for t in targets(8, 8):
        for variant in variants:
            sel = [r for r in rows if r["target"] == t and r["variant"] == variant]
            m = {k: statistics.mean(r[k] for r in sel) for k in ("completeness", "coherence", "swd", "resize_completeness",
                                                                  "resize_coherence", "resize_swd")}
            mean.append({"target": t, "variant": variant, "bds": m["completeness"] + m["coherence"], "swd": m["swd"],
                         "resize_bds": m["resize_completeness"] + m["resize_coherence"], "resize_swd": m["resize_swd"],
                         "beats_resize": sum(bool(r["beats_resize"]) for r in sel), "images": len(sel)})
    summary: dict[str, Any] = {"machine": ran_on, "preset": args.preset, "max_shift": args.max_shift, "jobs": args.jobs,
                               "images": [p.name for p in paths], "train_seconds": seconds, "rows": rows, "mean": mean}
    save(f"shapes_{args.preset}", summary)
    contact_sheet(sheet_rows, RESULTS / f"shapes_{args.preset}.jpg")
    for r in mean:
        print(f"{r['target']:>15} {r['variant']:>26}  C+C {r['bds'] * 1e3:6.2f} (resize {r['resize_bds'] * 1e3:6.2f})  "
              f"SWD {r['swd']:.3f} (resize {r['resize_swd']:.3f})  beats {r['beats_resize']}/{r['images']}")


if __name__ == "__main__":
    main()
