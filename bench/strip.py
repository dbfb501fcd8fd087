"""A close look at saved benchmark outputs: the same columns of one image's output for several
methods, side by side at 1:1, after the matching columns of the source.

    python -m bench.strip IMAGE TARGET METHOD [METHOD ...] --columns A:B --out PATH

The outputs are those ``bench.quality`` saved (``bench/results/quality_outputs/``). Columns A:B
are output columns; the source strip is the part they were made from (divided by the target's
width ratio), so a stretch and a retargeting can be told apart by eye. The strip is written as a
JPEG, at PATH with the suffix ``.jpg`` (``bench.quality.contact_sheet``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_image_set_arg, bench_images
from .quality import TARGETS, contact_sheet, load_png, output_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="a name from the image set, with or without suffix")
    ap.add_argument("target", help="a bench.quality target, e.g. 'width x2'")
    ap.add_argument("methods", nargs="+", help="method folders, e.g. bicubic cpu+skip")
    ap.add_argument("--columns", required=True, help="A:B, output columns to show")
    ap.add_argument("--out", type=Path, required=True, help="where to write; the suffix becomes .jpg")
    add_image_set_arg(ap)
    args = ap.parse_args()
    path = bench_images(args.image, args.image_set)[0]
    src = load_png(path)
    a, b = (int(v) for v in args.columns.split(":"))
    missing = [str(p) for m in args.methods if not (p := output_path(m, path.name, args.target)).exists()]
    if missing:
        raise SystemExit(f"no saved output {', '.join(missing)}: bench.quality saves them "
                         f"(targets: {', '.join(TARGETS)})")
    outs = {m: load_png(output_path(m, path.name, args.target)) for m in args.methods}
    ratio = next(iter(outs.values())).shape[-1] / src.shape[-1]
    if not 0 <= a < b <= min(o.shape[-1] for o in outs.values()):
        raise SystemExit(f"--columns {args.columns} is outside the outputs")
    strips = {m: o[:, :, a:b] for m, o in outs.items()}
    out = contact_sheet([(path.stem, src[:, :, round(a / ratio):round(b / ratio)], strips)], args.out,
                        height=src.shape[-2])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
