"""Where one training iteration's time goes: operator and kernel counts, host and device time.

    python -m bench.step_profile [--device cuda|cpu] [--presets fast,tiny] [--steps 3]

A preset's steady-state iteration (``bench.train_speed.steady_trainer``) is timed plainly, then
recorded by ``torch.profiler`` for ``--steps`` iterations. Per iteration it reports:

- ``ops``: operators called from Python or the autograd engine (``aten::`` calls not inside
  another one): the host-side work items;
- ``computing_ops``: those of them that are not views (by their schema: every overload returns
  an alias of an input), each of which launches one kernel or more on a GPU; a CPU's count of
  what a GPU would launch (ops that alias only when they can, like ``reshape``, count as views);
- on a GPU, ``launches`` (kernel launches from the host) and ``device_busy_ms`` (the kernels' own
  time, summed): when ``seconds_per_iter`` is far above ``device_busy_ms``, the GPU waits for the
  host to launch work, and packing several trainings on one GPU buys throughput;
- the operators that launch most and the kernels that take longest.

Writes ``bench/results/step_profile_<device>.json``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ingan.train import Trainer

from .common import machine, save
from .train_speed import _sync, seconds_per_step, steady_trainer


@functools.cache
def is_view(op: str) -> bool:
    """Whether every overload of ``op`` ("aten::permute") that returns tensors returns aliases of
    its inputs, never writing them: a view, which launches no kernel."""
    try:
        schemas = torch._C._jit_get_schemas_for_operator(op)
    except RuntimeError:
        return False
    tensor_returns = [s.returns for s in schemas if s.returns and all("Tensor" in str(r.type) for r in s.returns)]
    return bool(tensor_returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for returns in tensor_returns for r in returns)


def profile_step(preset_name: str, device: torch.device, steps: int = 3, top: int = 8) -> dict[str, Any]:
    """One preset's iteration, timed and profiled (see the module's docstring)."""
    t = steady_trainer(preset_name, device)
    for _ in range(3):  # warm-up: allocator, cuDNN/oneDNN primitive caches
        t.step()
    seconds = seconds_per_step(t, device, max(steps, 4))
    return {"preset": preset_name, **profile_trainer(t, device, seconds, steps, top)}


def profile_trainer(t: Trainer, device: torch.device, seconds: float, steps: int, top: int = 8) -> dict[str, Any]:
    """Counts of a warmed-up trainer's iteration (of its whole bundle), ``seconds`` long."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t.step()
        _sync(device)
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    row: dict[str, Any] = {"device": device.type, "steps_profiled": steps,
                           "seconds_per_iter": seconds, "ops": len(ops) / steps,
                           "computing_ops": sum(not is_view(e.name) for e in ops) / steps}
    by_op = collections.Counter(e.name for e in ops)
    row["top_ops"] = {k: v / steps for k, v in by_op.most_common(top)}
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = [e for e in events if "LaunchKernel" in e.name or "LaunchCooperativeKernel" in e.name]
        row["launches"] = len(launches) / steps
        busy_us = sum(e.device_time for e in kernels)
        row["device_busy_ms"] = busy_us / steps / 1e3
        row["device_busy_fraction"] = busy_us / 1e6 / steps / seconds
        by_kernel: collections.Counter[str] = collections.Counter()
        for e in kernels:
            by_kernel[e.name[:80]] += e.device_time
        row["top_kernels_ms"] = {k: v / steps / 1e3 for k, v in by_kernel.most_common(top)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="fast,tiny")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        rows.append(profile_step(name, device, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    save(f"step_profile_{device.type}", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
