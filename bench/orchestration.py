"""Orchestration overhead: images per second and driver memory with training cut to one
iteration, on a synthetic manifest of N rows (small images, one output each).

    python -m bench.orchestration [--rows 1000] [--iterations 1]

The driver runs in this process; a sampling thread records its resident memory (VmRSS) every
50 ms, so the peak and the growth from start to end show whether memory stays flat.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import driver

from .common import bench_images, machine, rss_mib, save


class RSSSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = self.start_rss = rss_mib()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.05)


def make_manifest(root: Path, rows: int) -> Path:
    """``rows`` rows over a handful of 48 px images (distinct ids, repeating files)."""
    files = []
    for p in bench_images()[:4]:
        im = Image.open(p).convert("RGB")
        im.thumbnail((48, 48))
        out = root / f"{p.stem}.png"
        im.save(out)
        files.append(str(out))
    uris = [files[i % len(files)] for i in range(rows)]
    ids = [f"img-{i:06d}" for i in range(rows)]
    path = root / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris, "id": ids}), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_manifest(root, args.rows)
        sampler = RSSSampler()
        sampler.start()
        t0 = time.perf_counter()
        code = driver.main([str(manifest), "--output", str(root / "out"), "--preset", "tiny", "--iterations",
                            str(args.iterations), "--ratios", "2", "--no-metrics"])
        wall = time.perf_counter() - t0
        end_rss = rss_mib()
        sampler.stop.set()
        table = pq.read_table(root / "out" / "results.parquet")
        statuses = table.column("status").to_pylist()
    result = {"machine": machine(), "rows": args.rows, "iterations": args.iterations, "exit_code": code,
              "ok": statuses.count("ok"), "failed": statuses.count("failed"), "wall_seconds": wall,
              "images_per_second": args.rows / wall, "driver_rss_start_mib": sampler.start_rss,
              "driver_rss_peak_mib": sampler.peak, "driver_rss_end_mib": end_rss}
    print(result)
    save(f"orchestration_{args.rows}", result)


if __name__ == "__main__":
    main()
