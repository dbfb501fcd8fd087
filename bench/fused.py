"""Fused training: K images trained as one bundle, against one at a time.

    python -m bench.fused [--device cpu|cuda] [--preset cpu] [--ks 1,2,4,8,16] [--iters 3]
                          [--bf16 both|on|off]

For each K, a bundle of K trainings of the preset at its benchmark crop, half-way through its
schedule (``bench.train_speed``'s steady state; each image its own seed), in a process of its own
so that its peak memory is its own. Per image and iteration:

- ``ops_per_image_iteration``: computing operators (``bench.step_profile``'s count: operators
  called from Python or autograd that are not views, each one kernel launch or more on a GPU)
  of one bundle iteration, divided by K (``all_ops_per_image_iteration``: views included, each
  of which costs the host as much);
- ``s_per_image_iteration``: a bundle iteration's wall seconds divided by K;
- ``peak_mib_per_image``: on a CPU the process's peak resident memory above what it held before
  the trainer, on a GPU the peak allocated memory, divided by K.

On a GPU also: kernel launches and the GPU's busy fraction, training FLOPs per iteration, achieved
TFLOP/s and its fraction of the card's bf16 peak, and ``fast`` images per GPU-hour at its full
schedule; in float32 and bfloat16 (``--bf16 both``, the default there). K defaults to 1..16 on a
CPU and 1..64 on a GPU.

Writes ``bench/results/fused_<device>.json`` (``fused_<device>_<preset>.json`` for a preset other
than the device's default): the machine, the command and, per precision, list
fields ``k``, ``ops_per_image_iteration``, ``s_per_image_iteration``, ``peak_mib_per_image`` (and
the GPU's fields) in the order of ``k``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch

from ingan.config import get_preset

from .common import machine, rss_mib, save
from .step_profile import profile_trainer
from .train_speed import _sync, steady_trainer, warm_seconds_per_step

FIELDS = ("k", "ops_per_image_iteration", "s_per_image_iteration", "peak_mib_per_image")
GPU_FIELDS = ("launches_per_image_iteration", "device_busy_fraction", "achieved_tflops", "fraction_of_bf16_peak",
              "images_per_gpu_hour")


def measure(preset: str, device: torch.device, k: int, iters: int, bf16: bool) -> dict[str, Any]:
    """One bundle of ``k``, in this process: its row (see the module's docstring)."""
    from .gpu import peak_tflops  # the GPU's peak table

    before = rss_mib()
    t = steady_trainer(preset, device, bundle=k, bf16=bf16)
    seconds = warm_seconds_per_step(t, device, iters)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss: KiB on Linux; the trainer and its steps are all that grew since `before`
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    counts = profile_trainer(t, device, seconds, steps=1)
    row: dict[str, Any] = {"k": k, "bf16": bf16, "ops_per_image_iteration": counts["computing_ops"] / k,
                           "all_ops_per_image_iteration": counts["ops"] / k,
                           "s_per_image_iteration": seconds / k, "peak_mib_per_image": peak_mib / k,
                           "bundle_seconds_per_iter": seconds, "iters_timed": iters}
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            t.step()
        _sync(device)
        flops = counter.get_total_flops()
        peak = peak_tflops(torch.cuda.get_device_name(0))
        full = get_preset(preset).train.iterations
        row.update(launches_per_image_iteration=counts["launches"] / k, device_busy_fraction=counts["device_busy_fraction"],
                   achieved_tflops=flops / seconds / 1e12,
                   fraction_of_bf16_peak=flops / seconds / 1e12 / peak if peak else None,
                   images_per_gpu_hour=3600 / (seconds / k * full), iterations_per_image=full)
    return row


def _one(preset: str, device: str, k: int, iters: int, bf16: bool) -> dict[str, Any]:
    """``measure`` in a fresh process (its own peak memory); a failure is the row's error."""
    cmd = [sys.executable, "-m", "bench.fused", "--one", str(k), "--preset", preset, "--device", device,
           "--iters", str(iters), "--bf16", "on" if bf16 else "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"k": k, "bf16": bf16, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def columns(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, list[Any]]:
    """The rows as list fields, in the order of ``k`` (None where a row has no value)."""
    rows = sorted(rows, key=lambda r: r["k"])
    return {f: [r.get(f) for r in rows] for f in fields}


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", help="default: fast on a GPU, cpu on a CPU")
    ap.add_argument("--ks", type=_ints, help="bundle sizes (default 1,2,4,8,16, and 32,64 on a GPU)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per bundle")
    ap.add_argument("--bf16", choices=["both", "on", "off"], help="default: both on a GPU, off on a CPU")
    ap.add_argument("--name", help="the results file's name (default: fused_<device>[_<preset>])")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single K, in this process
    args = ap.parse_args()
    device = torch.device(args.device)
    preset = args.preset or ("fast" if device.type == "cuda" else "cpu")
    if args.one is not None:
        print(json.dumps(measure(preset, device, args.one, args.iters, args.bf16 == "on")), flush=True)
        return
    ks = args.ks or ([1, 2, 4, 8, 16, 32, 64] if device.type == "cuda" else [1, 2, 4, 8, 16])
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.bf16 or ("both" if device.type == "cuda" else "off")]
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench.fused", *sys.argv[1:]]),
                              "preset": preset, "device": device.type}
    fields = FIELDS + (GPU_FIELDS if device.type == "cuda" else ())
    for bf16 in modes:
        rows = []
        for k in ks:
            rows.append(_one(preset, args.device, k, args.iters, bf16))
            print(json.dumps(rows[-1]), flush=True)
            if "error" in rows[-1]:  # out of memory: larger bundles would be too
                break
        name = "bf16" if bf16 else "fp32"
        result[name] = {"rows": rows, **columns([r for r in rows if "error" not in r], fields)}
        if not bf16 or len(modes) == 1:  # the first precision's lists at the top level, as the README names them
            result.update(columns([r for r in rows if "error" not in r], fields))
        default = "fast" if device.type == "cuda" else "cpu"
        save(args.name or f"fused_{device.type}" + ("" if preset == default else f"_{preset}"), result)


if __name__ == "__main__":
    main()
