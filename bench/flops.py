"""Training FLOPs per iteration and per image for every preset, counted.

    python -m bench.flops [--presets cpu,fast,paper,tiny] [--samples 16] [--size 256x171]

For each preset a trainer is built on a random image of ``--size`` (what matters is the crop and
working size the preset derives from it) and ``--samples`` steps are run under
``torch.utils.flop_counter.FlopCounterMode`` at iterations spread evenly over the schedule (the
size curriculum, the second G step and the scale weights all depend on the iteration), so their
mean is the schedule's mean FLOPs per iteration. Per image = that mean x the preset's iterations,
plus the retargeting of three outputs (width x2, width x0.5, square). Writes
``bench/results/flops.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from ingan.config import get_preset
from ingan.images import to_model_input
from ingan.retarget import retarget_image
from ingan.train import Trainer

from .common import machine, save


def preset_flops(name: str, size: tuple[int, int], samples: int) -> dict[str, float | int | str]:
    preset = get_preset(name)
    w, h = size
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    trainer = Trainer([to_model_input(src)], preset.model, preset.train, "cpu")
    total = preset.train.iterations
    per_step = []
    for k in range(samples):
        trainer.iteration = int((k + 0.5) * total / samples)
        with FlopCounterMode(display=False) as counter:
            trainer.step()
        per_step.append(counter.get_total_flops())
    g = trainer.g.eval()
    hh, wh = trainer.images[0].shape[-2:]
    with FlopCounterMode(display=False) as counter:
        retarget_image(g, src, [(h, 2 * w), (h, max(8, w // 2)), (h, h)], preset.train.max_side)
    per_iter = statistics.mean(per_step)
    return {"preset": name, "source": f"{w}x{h}", "working": f"{wh}x{hh}",
            "crop": f"{trainer.crop_hw[1]}x{trainer.crop_hw[0]}", "iterations": total, "d_nets": len(trainer.d.nets),
            "g_params": sum(p.numel() for p in trainer.g.parameters()),
            "gflops_per_iteration": per_iter / 1e9, "tflops_training": per_iter * total / 1e12,
            "gflops_retarget_3_outputs": counter.get_total_flops() / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,cpu,fast,paper")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--size", action="append", help="source WxH (repeatable; default 256x171 and 600x400)")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.size or ["256x171", "600x400"])]
    rows = []
    for size in sizes:
        for name in args.presets.split(","):
            row = preset_flops(name.strip(), size, args.samples)
            rows.append(row)
            print(row, flush=True)
    save("flops", {"machine": machine(), "samples": args.samples, "rows": rows})


if __name__ == "__main__":
    main()
