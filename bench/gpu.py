"""Every GPU figure in one command, within a time budget, on one lent GPU.

    python -m bench.gpu [--budget-s 540] [--peak-tflops 989] [--quality-images a,b,c,d] [--pattern-images a,b]

Writes ``bench/results/gpu.json`` (and prints each figure as it comes):

1. **Speed per preset** (``tiny``, ``cpu``, ``fast``, ``paper``, fp32 and bf16): steady-state
   iterations/s and peak GPU memory (``bench.train_speed``'s method), training FLOPs per iteration
   counted with ``FlopCounterMode``, achieved TFLOP/s and its fraction of the GPU's dense bf16
   peak (``--peak-tflops``; by default looked up from the device name).
2. **Packing**: ``fast`` trained 1, 2 and 4 at a time on the one GPU as Ray tasks with fractional
   GPUs (``num_gpus`` 1, 0.5, 0.25), each for ``--pack-iterations`` steady-state iterations; the
   aggregate iterations/s gives images per GPU-hour at ``fast``'s full schedule.
3. **Quality**: ``fast`` trained on the benchmark images (``bench.quality``'s workers, 4 at a
   time on the GPU) and scored beside bicubic, centre crop and seam carving, in what is left of the
   budget; then, if a minute or more is left, the same on the patterns set (``--pattern-images``).

``--device cpu --smoke`` runs every part with a few iterations on the CPU: it checks the script,
not the GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch

from ingan.config import get_preset

from .common import RESULTS, machine, quality_label, save
from .train_speed import steady_trainer, time_training

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.0}


def peak_tflops(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def step_flops(preset_name: str, device: torch.device, samples: int, **overrides: Any) -> float:
    """Mean training FLOPs of one steady-state iteration at the preset's benchmark crop."""
    from torch.utils.flop_counter import FlopCounterMode

    t = steady_trainer(preset_name, device, **overrides)
    total = 0
    for _ in range(samples):
        with FlopCounterMode(display=False) as counter:
            t.step()
        total += counter.get_total_flops()
    return total / samples


def speed(device: torch.device, iters: int, samples: int, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for name in ("tiny", "cpu", "fast", "paper"):
        for overrides in ({}, {"bf16": True}):
            row = time_training(name, device, iters, **overrides)
            flops = step_flops(name, device, samples, **overrides)
            row["gflops_per_iteration"] = flops / 1e9
            row["achieved_tflops"] = flops * row["iters_per_s"] / 1e12
            if peak:
                row["fraction_of_bf16_peak"] = row["achieved_tflops"] / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _pack_task(iterations: int, device: str) -> dict[str, float]:
    t = steady_trainer("fast", torch.device(device))
    t.step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        t.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "iterations": iterations}


def packing(device: torch.device, iterations: int) -> list[dict[str, Any]]:
    import ray

    gpus = 1 if device.type == "cuda" else 0
    ray.init(num_gpus=gpus, num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for k in (1, 2, 4):
            task = ray.remote(num_gpus=gpus / k if gpus else 0, num_cpus=1)(_pack_task)
            start = time.perf_counter()
            results = ray.get([task.remote(iterations, device.type) for _ in range(k)])
            wall = time.perf_counter() - start
            # Steady-state rate of the k concurrent trainings (start-up excluded: each task times
            # its own loop, and the loops overlap).
            its_per_s = sum(r["iterations"] / r["seconds"] for r in results)
            full = get_preset("fast").train.iterations
            row = {"trainings_per_gpu": k, "num_gpus_per_task": gpus / k if gpus else 0,
                   "iterations_each": iterations, "wall_s": wall, "aggregate_iters_per_s": its_per_s,
                   "fast_iterations_per_image": full, "images_per_gpu_hour": its_per_s * 3600 / full}
            rows.append(row)
            print(json.dumps(row), flush=True)
        return rows
    finally:
        ray.shutdown()


def _quality(device: torch.device, image_set: str, images: str, smoke: bool, left: float) -> dict[str, Any]:
    """``fast`` on some images of a set through ``bench.quality``, 4 at a time, stopped at ``left`` s."""
    cmd = [sys.executable, "-m", "bench.quality", "--presets", "fast", "--device", device.type, "--jobs", "4",
           "--image-set", image_set, "--images", images]
    if smoke:
        cmd += ["--iterations", "4"]
    print(f"quality: {' '.join(cmd[1:])} with {left:.0f} s left", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=max(1.0, left), check=False)
        return {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                "results": f"bench/results/quality_{quality_label(['fast'], image_set)}.json"}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "timed_out_after_s": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new parts past this")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    ap.add_argument("--smoke", action="store_true", help="a few iterations of everything (checks the script)")
    ap.add_argument("--pack-iterations", type=int, default=200)
    ap.add_argument("--quality-images", default="china,coffee,hubble_deep_field,brick",
                    help="benchmark images for fast's quality (all trained at once, 4 per GPU)")
    ap.add_argument("--pattern-images", default="coins,gravel,grass,ihc",
                    help="patterns-set images for fast's quality, in the time left after the standard ones")
    args = ap.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this benchmark is for a GPU machine (--device cpu --smoke checks the script)")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    result: dict[str, Any] = {"machine": machine(), "device_name": name, "bf16_peak_tflops": peak, "smoke": args.smoke}

    result["speed"] = speed(device, iters=2 if args.smoke else 30, samples=1 if args.smoke else 3, peak=peak)
    save("gpu", result)
    result["packing"] = packing(device, 2 if args.smoke else args.pack_iterations)
    save("gpu", result)

    result["quality"] = _quality(device, "standard", "coffee,china" if args.smoke else args.quality_images,
                                 args.smoke, args.budget_s - (time.perf_counter() - started))
    save("gpu", result)
    # Then, in what is left, the patterns set: whether the full network draws more coins at
    # twice the width where the cpu preset draws wider ones.
    left = args.budget_s - (time.perf_counter() - started)
    if left > 60 or args.smoke:
        result["quality_patterns"] = _quality(device, "patterns", "coins" if args.smoke else args.pattern_images,
                                              args.smoke, left)
    result["wall_s"] = time.perf_counter() - started
    save("gpu", result)
    print(f"wrote {RESULTS / 'gpu.json'} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
