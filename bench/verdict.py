"""The verdict (``ingan.metrics.beats``) on the outputs of quality runs: which ones a nightly job
filtering on ``beats_resize`` keeps and which it drops, as a table and a contact sheet.

    python -m bench.verdict quality_cpu_heldout [quality_cpu_patterns ...] [--target "width x2"] [--label NAME]

Reads each run's JSON (``bench/results/quality_*.json``) and the outputs it saved
(``bench/results/quality_outputs/``, so run it where the quality runs ran); every output of every
method is judged against the bicubic resize of its image and target, as the pipeline judges it.
The sheet frames each output green (kept) or red (dropped) and says why.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ingan import images
from ingan.metrics import BROKEN_CC, BROKEN_SWD, STRETCH_KEPT, beats

from .common import IMAGE_SETS, RESULTS, save
from .quality import TARGETS, contact_sheet, load_png, output_path

KEPT, DROPPED = (26, 127, 55), (207, 34, 46)


def why(row: dict[str, Any], resize: dict[str, Any]) -> str:
    """The verdict in words: kept, or the first reason it is dropped."""
    if beats(row, resize):
        return "kept"
    if row.get("stretch") is not None and row["stretch"] > STRETCH_KEPT:
        return f"dropped: stretch {row['stretch']:.2f}"
    cc, resize_cc = row["completeness"] + row["coherence"], resize["completeness"] + resize["coherence"]
    if cc > BROKEN_CC * resize_cc:
        return f"dropped: C+C {cc / resize_cc:.2f}x the resize's"
    return f"dropped: SWD {row['swd'] / resize['swd']:.2f}x the resize's"


def framed(image: torch.Tensor, color: tuple[int, int, int], width: int = 6) -> torch.Tensor:
    """uint8 (3, H, W) inside a ``width``-px frame of ``color``."""
    h, w = image.shape[-2:]
    out = torch.tensor(color, dtype=torch.uint8)[:, None, None].expand(3, h + 2 * width, w + 2 * width).clone()
    out[:, width:width + h, width:width + w] = image
    return out


def judge(runs: list[str]) -> list[dict[str, Any]]:
    """Every output of every method in ``runs`` with its verdict against its image's resize."""
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # the baselines recur in every run of a set
    for run in runs:
        data = json.loads((RESULTS / f"{run}.json").read_text())
        rows = {(r["image"], r["target"], r["method"]): r for r in data["rows"]}
        for (image, target, method), row in rows.items():
            if method == "bicubic":
                continue
            resize = rows[(image, target, "bicubic")]
            image_set = data.get("image_set", "standard")
            out[(image_set, image, target, method)] = {
                "run": run, "image_set": image_set, "image": image, "target": target, "method": method,
                "stretch": row.get("stretch"), "kept": beats(row, resize), "why": why(row, resize)}
    return list(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="quality result names, e.g. quality_cpu_heldout")
    ap.add_argument("--target", action="append", choices=TARGETS, help="targets on the sheet (default: all)")
    ap.add_argument("--label", default="verdict", help="writes bench/results/LABEL.json and LABEL_{target}.jpg")
    args = ap.parse_args()
    judged = judge(args.runs)
    for j in judged:
        print(f"{j['image']:>12} {j['target']:>10} {j['method']:>24}  {j['why']}")
    save(args.label, {"runs": args.runs, "thresholds": {"stretch_kept": STRETCH_KEPT, "broken_cc": BROKEN_CC,
                                                        "broken_swd": BROKEN_SWD}, "outputs": judged})
    for target in args.target or TARGETS:
        sheet = []
        for image in dict.fromkeys(j["image"] for j in judged):
            mine = [j for j in judged if j["image"] == image and j["target"] == target]
            src = images.load(str(IMAGE_SETS[mine[0]["image_set"]] / image))
            outs = {f"{j['method']}: {j['why']}": framed(load_png(output_path(j["method"], image, target)),
                                                        KEPT if j["kept"] else DROPPED) for j in mine}
            sheet.append((image, src, outs))
        print(contact_sheet(sheet, RESULTS / f"{args.label}_{target.replace(' ', '_').replace('.', '')}.jpg"))


if __name__ == "__main__":
    main()
