"""Memory of one pipeline task that trains a bundle: the bytes of live tensors while its images'
outputs are made (after training), and the process's peak RSS.

    python -m bench.task_memory [--images 4] [--preset tiny] [--iterations 50] [--label task_memory]

A task that keeps its bundle's trainer (G, D, both Adam states, the images) until it returns
holds it through every image's retargeting and scoring; one that drops it after the models are
saved holds only the model being used. Runs in this process on the CPU, one torch thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import warnings
from typing import Any

import torch

from .common import IMAGES, machine, save


def live_tensor_mib() -> float:
    """MiB of distinct tensor storages reachable from Python objects now."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (ReferenceError, RuntimeError):
                continue
    return sum(seen.values()) / 2**20


def measure(n_images: int, preset: str, iterations: int) -> dict[str, Any]:
    import pipeline.task as task
    from pipeline.config import RunConfig
    from pipeline.task import Item, Job, process_bundle

    torch.set_num_threads(1)
    paths = sorted(IMAGES.glob("*.png"))[:n_images]
    during: list[float] = []
    finish = task._finish

    def watched(*args: Any, **kwargs: Any) -> Any:
        during.append(live_tensor_mib())
        return finish(*args, **kwargs)

    task._finish = watched  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(output=out, preset=preset, iterations=iterations, ratios=[0.5, 1.0, 2.0], bundle_size=n_images)
        records = process_bundle([Item(i, p.stem, str(p), {}) for i, p in enumerate(paths)], Job.of(cfg, preset))
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    return {"images": n_images, "preset": preset, "iterations": iterations,
            "live_tensor_mib_while_finishing": [round(m, 2) for m in during],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "machine": machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="the bundle's size: the first N benchmark images")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iterations", type=int, default=50, help="each image's training iterations")
    ap.add_argument("--label", default="task_memory", help="writes bench/results/LABEL.json")
    args = ap.parse_args()
    result = measure(args.images, args.preset, args.iterations)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    print(save(args.label, result))


if __name__ == "__main__":
    main()
