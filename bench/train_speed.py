"""Seconds per training iteration for each preset, and retarget latency per output.

    python -m bench.train_speed [--device cpu|cuda] [--iters N] [--presets paper,fast,tiny]

Iterations are timed at steady state: past the size curriculum (outputs 0.15x-2.25x the crop per
axis) and with the second G step on, i.e. the most expensive phase of the schedule. The same seed
draws the same sequence of crops and shapes for every configuration compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ingan import images
from ingan.config import get_preset
from ingan.images import to_model_input
from ingan.retarget import retarget_image
from ingan.train import Trainer, pick_device

from .common import IMAGES, machine, save


def photo_600x400() -> torch.Tensor:
    """A 600x400 photo (the benchmark coffee, enlarged): timings depend on sizes, not content."""
    return images.resize(images.load(str(IMAGES / "coffee.png")), (400, 600))

# Crop sizes stated per preset: paper at the reference's measured 216x256 crop.
CROPS = {"paper": (216, 256), "fast": (192, 192), "cpu": (128, 128), "tiny": (64, 64)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steady_trainer(preset_name: str, device: torch.device, bundle: int = 1, **overrides: object) -> Trainer:
    """A trainer of the preset at its benchmark crop, half-way through its schedule (steady state:
    full shape range, two G steps); with ``bundle`` K, K trainings of the photo (seeds 0..K-1)
    as one fused model."""
    preset = get_preset(preset_name)
    ch, cw = CROPS[preset_name]
    source = photo_600x400()[:, : ch + 1, : cw + 1]  # crop = image minus one pixel
    # float32 unless asked: the preset's own setting may depend on the machine.
    cfg = dataclasses.replace(preset.train, crop_size=max(ch, cw), max_side=None, **({"bf16": False} | overrides))
    t = Trainer([to_model_input(source)] * bundle, preset.model, cfg, device, seeds=range(bundle))
    t.iteration = int(0.5 * cfg.iterations)
    return t


def seconds_per_step(trainer: Trainer, device: torch.device, iters: int) -> float:
    """Wall seconds per training iteration over ``iters`` of them, the device's queue drained at
    both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        trainer.step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def warm_seconds_per_step(trainer: Trainer, device: torch.device, iters: int) -> float:
    """``seconds_per_step`` after two warm-up iterations (allocator, oneDNN/cuDNN primitive
    caches), a GPU's peak-memory count restarted for the timed ones."""
    for _ in range(2):
        trainer.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return seconds_per_step(trainer, device, iters)


def time_training(preset_name: str, device: torch.device, iters: int, **overrides: object) -> dict[str, object]:
    t = steady_trainer(preset_name, device, **overrides)
    cfg = t.cfg
    ch, cw = CROPS[preset_name]
    sec = warm_seconds_per_step(t, device, iters)
    out = {"preset": preset_name, "crop": f"{cw}x{ch}", "seconds_per_iter": sec, "iters_per_s": 1 / sec,
           "iters_timed": iters, "overrides": {k: str(v) for k, v in overrides.items()},
           "full_run_hours": sec * cfg.iterations / 3600, "iterations": cfg.iterations}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def time_retarget(preset_name: str, device: torch.device, reps: int = 3) -> dict[str, object]:
    """Latency per output from a trained-size generator (weights untrained: cost is the same)."""
    preset = get_preset(preset_name)
    source = photo_600x400()
    t = Trainer([to_model_input(source)], preset.model, dataclasses.replace(preset.train, iterations=1), device)
    g = t.g.eval()
    sizes = [(400, 800), (400, 200), (400, 400), (256, 256), (128, 128)]
    retarget_image(g, source, sizes[:1], preset.train.max_side)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        retarget_image(g, source, sizes, preset.train.max_side)
    _sync(device)
    per_output = (time.perf_counter() - start) / (reps * len(sizes))
    return {"preset": preset_name, "source": "600x400", "sizes": [f"{w}x{h}" for h, w in sizes],
            "seconds_per_output": per_output, "outputs_per_s": 1 / per_output}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations (default: per preset)")
    ap.add_argument("--presets", default="paper,fast,tiny")
    ap.add_argument("--compare", action="store_true", help="also time the previous configurations side by side")
    args = ap.parse_args()
    device = pick_device(args.device)
    default_iters = ({"paper": 5, "fast": 5, "cpu": 20, "tiny": 50} if device.type == "cpu"
                     else {"paper": 50, "fast": 50, "cpu": 100, "tiny": 200})
    rows, retarget_rows = [], []
    for name in args.presets.split(","):
        n = args.iters or default_iters[name]
        rows.append(time_training(name, device, n))
        print(rows[-1], flush=True)
        if args.compare:
            for ov in ({"bf16": True},):
                rows.append(time_training(name, device, n, **ov))
                print(rows[-1], flush=True)
        retarget_rows.append(time_retarget(name, device))
        print(retarget_rows[-1], flush=True)
    save(f"train_speed_{device.type}", {"machine": machine(), "device": str(device), "training": rows, "retarget": retarget_rows})


if __name__ == "__main__":
    main()
