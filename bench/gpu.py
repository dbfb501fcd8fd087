"""Every GPU figure in one command, within a time budget, on one GPU.

    python -m bench.gpu [--budget-s 540] [--parts fused,quality] [--peak-tflops 989]
                        [--quality-images a,b,...] [--pack-counts 1,4,8,16]

Writes ``bench/results/gpu.json`` (``gpu_smoke.json`` with ``--smoke``) and prints each figure as it
comes. The parts (``--parts``; by default ``fused`` and ``quality``):

1. **fused** (``bench.fused``): ``fast`` trained as bundles of K = 1 to 64 images, float32 and
   bfloat16: seconds and operators per image-iteration, kernel launches, GPU busy fraction,
   achieved TFLOP/s against the card's dense bf16 peak (``--peak-tflops``; by default looked up
   from the device name), memory per image and ``fast`` images per GPU-hour
   (``bench/results/fused_cuda.json``).
2. **quality**: ``fast`` on the eight benchmark images (``--quality-images``) trained as bundles
   (one per crop size, ``ingan.fit.fit_bundle``) and scored beside bicubic, centre crop and seam
   carving (``bench.quality --bundle``). The full schedule when the fused rate says it fits in
   what is left of the budget, else the same schedule shortened to fit (the results record the
   iterations); skipped, with the time it would need, when under a quarter of it fits.
3. **speed** per preset, fp32 and bf16 (``bench.train_speed``'s method, with FLOPs counted by
   ``FlopCounterMode``), **profile** (``bench.step_profile`` of one ``fast`` iteration) and
   **packing** (``fast`` trained k at a time as Ray tasks with fractional GPUs,
   ``--pack-counts``): the single-training figures, measured before bundles existed; on request.

``--device cpu --smoke`` runs every part asked for with a few iterations on the CPU: it checks the
script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import torch
from PIL import Image

from ingan.config import get_preset

from .common import RESULTS, machine, quality_label, save
from .step_profile import profile_step
from .train_speed import seconds_per_step, steady_trainer, time_training

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


# Each preset in float32 and bfloat16.
SPEED_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    (name, over) for name in ("tiny", "cpu", "fast", "paper") for over in ({}, {"bf16": True})
]


def speed(device: torch.device, iters: int, samples: int, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for name, overrides in SPEED_CONFIGS:
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
    return {"seconds": seconds_per_step(t, torch.device(device), iterations) * iterations, "iterations": iterations}


def packing(device: torch.device, iterations: int, counts: list[int]) -> list[dict[str, Any]]:
    import ray

    gpus = 1 if device.type == "cuda" else 0
    # One CPU per training: each one's host thread launches its kernels.
    ray.init(num_gpus=gpus, num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for k in counts:
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


# Set aside from the budget for what follows the trainings in each quality run: worker start-up,
# retargeting, the three baselines (seam carving compiles first) and the scoring, on the CPU
# (measured: over 130 s for four images, three runs at once, on a 16-core host).
QUALITY_TAIL_S = 200.0
# A quality run shorter than this fraction of fast's schedule says nothing of the preset: skipped.
MIN_QUALITY_FRACTION = 0.25


def quality_iterations(full: int, rate_each: float, seconds: float) -> int:
    """Iterations per training that fit in ``seconds`` at ``rate_each`` iterations/s: the preset's
    own schedule when it fits, else a shorter one (whole hundreds, at least 100), whose shape the
    schedule keeps, since its milestones are fractions of the run."""
    fits = int(rate_each * seconds) // 100 * 100
    return full if fits >= full else max(100, fits)


def quality_runs(quality_images: str, smoke: bool) -> list[dict[str, Any]]:
    """The quality run: ``fast`` on the benchmark images, trained as bundles on the one GPU."""
    run = {"image_set": "standard", "images": "coffee,china" if smoke else quality_images, "set": [], "bundle": True}
    run["trainings"] = len(run["images"].split(","))
    if smoke:  # its own file names: a smoke run must not overwrite a GPU's quality results
        run["label"] = "smoke"
    return [run]


def bundle_seconds_per_iteration(image_names: list[str], fused_rows: list[dict[str, Any]]) -> float | None:
    """Seconds per iteration of every bundle the images make (one per crop size, trained one
    after another), from the fused benchmark's seconds per image-iteration at the largest
    measured K up to each bundle's size (per image, a larger bundle is faster: this errs long);
    None without a measurement."""
    from ingan.images import working_resolution
    from ingan.train import training_crop

    from .common import IMAGES

    cfg = get_preset("fast").train
    groups: dict[tuple[int, int], int] = {}
    for name in image_names:
        w, h = Image.open(IMAGES / f"{name}.png").size
        crop = training_crop(working_resolution((h, w), cfg.max_side), cfg)
        groups[crop] = groups.get(crop, 0) + 1
    rows = sorted((r for r in fused_rows if "error" not in r), key=lambda r: r["k"])
    total = 0.0
    for k in groups.values():
        below = [r for r in rows if r["k"] <= k]
        if not below:
            return None
        total += below[-1]["s_per_image_iteration"] * k
    return total


def results_path(run: dict[str, Any]) -> str:
    """Where ``bench.quality`` writes a quality run's results."""
    name = f"fast+{run['label']}" if run.get("label") else "fast"
    return f"bench/results/quality_{quality_label([name], run['image_set'])}.json"


def _quality(device: torch.device, runs: list[dict[str, Any]], iterations: int | None, left: float) -> list[dict[str, Any]]:
    """``bench.quality`` for each run, all at once, each stopped at ``left`` s."""
    procs = []
    for r in runs:
        cmd = [sys.executable, "-m", "bench.quality", "--presets", "fast", "--device", device.type,
               "--jobs", str(r["trainings"]), "--image-set", r["image_set"], "--images", r["images"]]
        for kv in r["set"]:
            cmd += ["--set", kv]
        if r.get("label"):
            cmd += ["--label", r["label"]]
        if r.get("bundle"):
            cmd += ["--bundle"]
        if iterations is not None:
            cmd += ["--iterations", str(iterations)]
        print(f"quality: {' '.join(cmd[1:])} with {left:.0f} s left", flush=True)
        # The runs score on the CPU at the same time: each gets its share of the cores, not all of them.
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(runs)))}
        # A session of its own, so that a run stopped at the deadline takes its pool's workers along.
        procs.append((cmd, r, subprocess.Popen(cmd, env=env, start_new_session=True)))
    deadline = time.perf_counter() + max(1.0, left)
    out = []
    for cmd, r, proc in procs:
        row: dict[str, Any] = {"command": " ".join(cmd[1:]), "results": results_path(r)}
        try:
            row["returncode"] = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            row["timed_out_after_s"] = left
        out.append(row)
    return out


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers of trainings per GPU, 1 or more, e.g. 1,4,8,16")
    return counts


def _part(result: dict[str, Any], key: str, run: Any) -> None:
    """``result[key] = run()``; a part that cannot run here (a profiler, Ray) costs that part
    only, its error kept as ``<key>_error``."""
    try:
        result[key] = run()
        print(json.dumps(result[key]), flush=True)
    except Exception as exc:  # noqa: BLE001
        result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
        print(f"{key} failed: {result[f'{key}_error']}", flush=True)


def _fused(device: torch.device, smoke: bool, seconds: float) -> dict[str, Any]:
    """``bench.fused`` in a process of its own, stopped at ``seconds``; its results."""
    name = "fused_smoke" if smoke else f"fused_{device.type}"  # a smoke run keeps a GPU's figures
    cmd = [sys.executable, "-m", "bench.fused", "--device", device.type, "--preset", "fast", "--name", name]
    cmd += ["--ks", "1,2", "--iters", "1", "--bf16", "off"] if smoke else ["--iters", "5"]
    print(f"fused: {' '.join(cmd[1:])} with {seconds:.0f} s", flush=True)
    try:
        code = subprocess.run(cmd, timeout=max(1.0, seconds), check=False).returncode
    except subprocess.TimeoutExpired:
        code = None
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return {"command": " ".join(cmd[1:]), "returncode": code, "results": f"bench/results/{name}.json",
            "fp32_rows": data.get("fp32", {}).get("rows", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new parts past this")
    ap.add_argument("--parts", default="fused,quality", help="comma-separated, of: fused, quality, speed, profile, packing")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    ap.add_argument("--smoke", action="store_true", help="a few iterations of everything (checks the script)")
    ap.add_argument("--pack-iterations", type=int, default=100)
    ap.add_argument("--pack-counts", type=_counts,
                    help="trainings per GPU to measure, comma-separated (default 1,4,8,16; 1,2 with --smoke)")
    ap.add_argument("--quality-images", default="astronaut,brick,chelsea,china,coffee,flower,hubble_deep_field,rocket",
                    help="benchmark images for fast's quality, trained as bundles")
    ap.add_argument("--fused-share", type=float, default=0.4, help="of the budget, at most this for the fused part")
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    started = time.perf_counter()
    # A smoke run checks the script: it must not overwrite a GPU's figures.
    out_name = "gpu_smoke" if args.smoke else "gpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this benchmark is for a GPU machine (--device cpu --smoke checks the script)")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
                              "device_name": name, "bf16_peak_tflops": peak, "smoke": args.smoke, "parts": sorted(parts)}

    if "fused" in parts:
        result["fused"] = _fused(device, args.smoke, args.fused_share * args.budget_s)
        save(out_name, result)
    if "speed" in parts:
        result["speed"] = speed(device, iters=2 if args.smoke else 20, samples=1 if args.smoke else 2, peak=peak)
        save(out_name, result)
    if "profile" in parts:
        _part(result, "step_profile", lambda: profile_step("fast", device, steps=1 if args.smoke else 3))
        save(out_name, result)
    if "packing" in parts:
        # A smoke run on a CPU holds every packed training in host memory (fast: about 2 GB each),
        # so it packs two, which is enough to check the fractional-GPU path.
        counts = args.pack_counts or ([1, 2] if args.smoke else [1, 4, 8, 16])
        _part(result, "packing", lambda: packing(device, 2 if args.smoke else args.pack_iterations, counts))
        save(out_name, result)

    runs = quality_runs(args.quality_images, args.smoke) if "quality" in parts else []
    left = args.budget_s - (time.perf_counter() - started)
    full = get_preset("fast").train.iterations
    iterations: int | None = 4 if args.smoke else None
    if runs and not args.smoke:
        per_iteration = bundle_seconds_per_iteration(runs[0]["images"].split(","), result.get("fused", {}).get("fp32_rows", []))
        n = quality_iterations(full, 1 / per_iteration, left - QUALITY_TAIL_S) if per_iteration else 0
        plan = {"bundle_seconds_per_iteration": per_iteration, "iterations": n, "full_iterations": full,
                "seconds_left": left, "seconds_needed_at_full": full * per_iteration + QUALITY_TAIL_S if per_iteration else None}
        result["quality_plan"] = plan
        print(json.dumps(plan), flush=True)
        if n < MIN_QUALITY_FRACTION * full:
            plan["skipped"] = (f"{n} iterations fit, under {MIN_QUALITY_FRACTION:.0%} of fast's schedule: "
                               "too few to say anything of its quality")
            print(plan["skipped"], flush=True)
            runs = []
        iterations = None if n == full else n
    result["quality_runs"] = _quality(device, runs, iterations, left) if runs else []
    result["wall_s"] = time.perf_counter() - started
    save(out_name, result)
    print(f"wrote {RESULTS / (out_name + '.json')} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
