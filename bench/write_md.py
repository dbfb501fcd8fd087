"""Assemble BENCHMARKS.md from the result files the benchmarks wrote under bench/results/.

    python -m bench.write_md
"""

from __future__ import annotations

import json
from typing import Any

from .common import RESULTS, ROOT

REFERENCE_S_PER_ITER = 4.4  # the reference implementation at a 216x256 crop on this 2-core CPU


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} (torch threads: {m['torch_threads']}){gpu}; {m['date']}, commit {m.get('commit', '?')}"


def _speed(data: dict[str, Any], device: str) -> list[str]:
    out = [f"### Training speed ({device})", "", f"Machine: {_machine(data['machine'])}.",
           f"Command: `python -m bench.train_speed --device {device} --compare`.", "",
           "Steady state (past the size curriculum: outputs 0.15x-2.25x the crop per axis, second G step on).", "",
           "| preset | crop | configuration | s / iteration | iterations / s | full schedule |",
           "|---|---|---|---|---|---|"]
    for r in data["training"]:
        conf = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "default (channels-last, fp32)"
        mem = f", peak GPU {r['peak_gpu_mem_gib']:.2f} GiB" if "peak_gpu_mem_gib" in r else ""
        out.append(f"| {r['preset']} | {r['crop']} | {conf}{mem} | {r['seconds_per_iter']:.3f} | {r['iters_per_s']:.2f} "
                   f"| {r['iterations']:,} it = {r['full_run_hours']:.2f} h |")
    paper = [r for r in data["training"] if r["preset"] == "paper" and not r["overrides"]]
    if paper and device == "cpu":
        s = paper[0]["seconds_per_iter"]
        out += ["", f"`paper` at the reference's 216x256 crop: **{s:.2f} s per iteration** against the reference's "
                    f"{REFERENCE_S_PER_ITER} s on this CPU ({REFERENCE_S_PER_ITER / s:.1f}x faster), same architecture and sizes."]
    out += ["", "Retargeting (one trained-size generator, source 600x400, five sizes from 128x128 to 800x400):", "",
            "| preset | s / output | outputs / s |", "|---|---|---|"]
    for r in data["retarget"]:
        out.append(f"| {r['preset']} | {r['seconds_per_output']:.3f} | {r['outputs_per_s']:.1f} |")
    return out + [""]


def _quality(data: dict[str, Any]) -> list[str]:
    out = [f"### Quality: `{data['preset']}` InGAN beside bicubic resize and centre crop", "",
           f"Machine: {_machine(data['machine'])}.",
           f"Command: `python -m bench.quality --preset {data['preset']}` ({data['iterations']:,} iterations per image).",
           f"Images: {', '.join(data['images'])} (`../shared/data/images`).", "",
           "Means over the images; lower is better for all three. Square = source height x source height "
           "(for square sources bicubic and centre crop return the source itself, scoring 0).", "",
           "| target | method | completeness | coherence | patch SWD |", "|---|---|---|---|---|"]
    for r in data["mean"]:
        out.append(f"| {r['target']} | {r['method']} | {r['completeness']:.5f} | {r['coherence']:.5f} | {r['swd']:.3f} |")
    return out + [""]


def _orchestration(runs: list[dict[str, Any]]) -> list[str]:
    out = ["### Orchestration overhead", "",
           f"Machine: {_machine(runs[0]['machine'])}.",
           "Command: `python -m bench.orchestration --rows N --iterations 1` (local Ray, `tiny` preset cut to one "
           "iteration, 48 px images, one output each, no metrics).", "",
           "| rows | ok | failed | wall s | images / s | driver RSS start | peak | end |", "|---|---|---|---|---|---|---|---|"]
    for d in sorted(runs, key=lambda r: r["rows"]):
        out.append(f"| {d['rows']:,} | {d['ok']:,} | {d['failed']} | {d['wall_seconds']:.1f} | {d['images_per_second']:.2f} "
                   f"| {d['driver_rss_start_mib']:.0f} MiB | {d['driver_rss_peak_mib']:.0f} MiB | {d['driver_rss_end_mib']:.0f} MiB |")
    return out + [""]


def main() -> None:
    lines = ["# Benchmarks", "",
             "Written by `python -m bench.write_md` from the JSON files that the benchmark commands below leave in "
             "`bench/results/`. Every figure names its command, machine and date.", ""]
    sections = [("train_speed_cpu", lambda d: _speed(d, "cpu")), ("train_speed_cuda", lambda d: _speed(d, "cuda"))]
    sections += [(p.stem, _quality) for p in sorted(RESULTS.glob("quality_*.json"))]
    for name, render in sections:
        data = _load(name)
        if data is not None:
            lines += render(data)
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("orchestration_*.json"))]
    if runs:
        lines += _orchestration(runs)
    extra = RESULTS / "notes.md"
    if extra.exists():
        lines += [extra.read_text().rstrip(), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
