"""The driver's final results write, alone: RSS before and after ``ResultStream.finish`` for N
synthetic records (one output each), to see whether the write grows with the run.

    python -m bench.results_memory --rows 2000 20000

Each N runs in a fresh process, so one measurement's allocations never pad another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from .common import machine, rss_mib, save


def one(rows: int) -> dict[str, float]:
    from pipeline.results import ResultStream
    from pipeline.storage import Folder

    out = {"width": 96, "height": 48, "ratio": 2.0, "uri": "/out/x.png", "rel": "x.png", "target": "ratio:2.0"}
    with tempfile.TemporaryDirectory() as tmp:
        stream = ResultStream(Folder(tmp), None)
        for i in range(rows):
            stream.add(i, {"id": f"img-{i:06d}", "uri": f"/in/{i}.png", "status": "ok", "error": None, "error_kind": None,
                           "outputs": [out], "source_rel": None, "source_width": 48, "source_height": 48,
                           "model_uri": None, "train_seconds": 0.5, "total_seconds": 1.0, "attempts": 1, "carried": {}})
        before = rss_mib()
        stream.finish()
        return {"rows": rows, "rss_before_finish_mib": before, "rss_after_finish_mib": rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    runs = []
    for n in args.rows:
        text = subprocess.run([sys.executable, "-m", "bench.results_memory", "--one", str(n)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs.append(json.loads(text))
        print(runs[-1])
    save("results_memory", {"machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
