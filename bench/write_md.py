"""Assemble BENCHMARKS.md from the result files the benchmarks wrote under bench/results/.

    python -m bench.write_md
"""

from __future__ import annotations

import json
from typing import Any

from ingan.config import get_preset

from .common import IMAGE_SETS, RESULTS, ROOT, bench_images, quality_label

# The quality-against-compute runs, in the order they were made (bench/results/curves/).
CURVE_RUNS = ["c128", "c128_ema", "c64", "c96", "c128_cal_ema", "c128_cal_ema_fastsched", "c128_skip",
              "cpu_base", "cpu_no2g", "cpu_2g_late", "cpu_dmin32", "cpu_res4", "cpu_w24", "cpu_crops2",
              "cpu_tone", "cpu_no2g_tone", "hubble_seed4018602180_hardclamp", "hubble_seed4018602180_clampgrad"]

REFERENCE_S_PER_ITER = 4.4  # the reference implementation at a 216x256 crop on this 2-core CPU


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    # Recorded since the cpu preset's precision follows the CPU; older results do not say.
    bf16 = {True: ", native bfloat16", False: ", no native bfloat16"}.get(m.get("cpu_native_bf16"), "")
    return (f"{m['cpu']}{bf16}, {m['cores']} cores, torch {m['torch']} (torch threads: {m['torch_threads']}){gpu}; "
            f"{m['date']}, commit {m.get('commit', '?')}")


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


def _wins(data: dict[str, Any], method: str, target: str) -> str:
    """'n/N': of ``method``'s outputs for ``target``, those beating the bicubic resize of the same
    image on both C+C and patch SWD."""
    rows = [r for r in data["rows"] if r["target"] == target]
    ours = {r["image"]: r for r in rows if r["method"] == method}
    base = {r["image"]: r for r in rows if r["method"] == "bicubic"}
    n = sum(1 for i in ours if ours[i]["completeness"] + ours[i]["coherence"]
            < base[i]["completeness"] + base[i]["coherence"] and ours[i]["swd"] < base[i]["swd"])
    return f"{n}/{len(ours)}"


def _images_flag(data: dict[str, Any]) -> str:
    """The ``--image-set`` and ``--images`` parts of a benchmark command: empty for the whole
    standard set (older results do not name their set: they ran on the standard one)."""
    image_set = data.get("image_set", "standard")
    flag = "" if image_set == "standard" else f"--image-set {image_set} "
    names = data["images"]
    if len(names) == len(bench_images(image_set=image_set)):
        return flag
    return flag + f"--images {','.join(n.rsplit('.', 1)[0] for n in names)} "


def _iterations_flag(data: dict[str, Any]) -> str:
    """The ``--iterations`` part of a quality command: empty when every preset ran its own count."""
    counts = {n for name, n in data["iterations"].items() if n != get_preset(name.split("+")[0]).train.iterations}
    return f"--iterations {counts.pop()} " if counts else ""


def _quality(data: dict[str, Any]) -> list[str]:
    presets = data["presets"]
    its = ", ".join(f"`{p}` {n:,} iterations" for p, n in data["iterations"].items())
    image_set = data.get("image_set", "standard")
    on = "" if image_set == "standard" else f", {image_set} image set"
    out = [f"### Quality: {', '.join(f'`{p}`' for p in presets)} beside bicubic resize, centre crop and seam carving{on}", "",
           f"Machine: {_machine(data['machine'])}.",
           f"Command: `python -m bench.quality --presets {','.join(p.split('+')[0] for p in presets) if data.get('overrides') else ','.join(presets)} "
           f"{_images_flag(data)}{_iterations_flag(data)}--jobs {data['jobs']}{''.join(' --set ' + o for o in data.get('overrides') or [])}"
           f"{' --label ' + presets[0].split('+')[1] if '+' in presets[0] else ''}` ({its}).",
           f"Images: the {len(data['images'])} of `{IMAGE_SETS[image_set].relative_to(ROOT)}/` "
           f"(256 px on the longer side): {', '.join(data['images'])}."
           + (f" The {data['note']}." if data.get("note") else ""), "",
           "Means over the images; lower is better for every column. C+C = completeness + coherence (x1000). "
           "Square = source height x source height (for the two square sources bicubic and crop return the source itself).", "",
           "| target | method | completeness x1000 | coherence x1000 | C+C x1000 | patch SWD |", "|---|---|---|---|---|---|"]
    for r in data["mean"]:
        name = f"**InGAN `{r['method']}`**" if r["method"] in presets else r["method"]
        out.append(f"| {r['target']} | {name} | {r['completeness'] * 1e3:.2f} | {r['coherence'] * 1e3:.2f} "
                   f"| {r['bds'] * 1e3:.2f} | {r['swd']:.3f} |")
    for preset in presets:
        wins = [f"{t} {_wins(data, preset, t)}" for t in ("width x2", "width x0.5", "square")]
        out += ["", f"`{preset}` outputs that beat the bicubic resize on both C+C and SWD, per image: {'; '.join(wins)}."]
        timing = data.get("timing", {}).get(preset)
        if timing:
            tr = [v["train_s"] for v in timing.values()]
            rt = [v["retarget_s"] for v in timing.values()]
            out.append(f"`{preset}` training, {data['jobs']} image{'s' if data['jobs'] != 1 else ''} at once, "
                       "one torch thread each: "
                       + (f"{tr[0] / 60:.1f} min; " if len(tr) == 1 else
                          f"{min(tr) / 60:.1f}-{max(tr) / 60:.1f} min per image (mean {sum(tr) / len(tr) / 60:.1f}); ")
                       + f"retargeting the three outputs {max(rt):.2f} s at most.")
    for t in ("width_x2", "width_x05", "square"):
        sheet = f"quality_{quality_label(presets, image_set)}_{t}.png"
        if (RESULTS / sheet).exists():
            out += ["", f"![{t}](bench/results/{sheet})"]
    return out + [""]


def _flops(data: dict[str, Any]) -> list[str]:
    out = ["### FLOPs per iteration and per image", "",
           f"Machine: {_machine(data['machine'])}. Command: `python -m bench.flops` ({data['samples']} steps counted "
           "with `FlopCounterMode` per preset, spread over the schedule; forward and backward of every G and D pass).", "",
           "| preset | source | working | crop | D nets | G params | GFLOPs / iteration | iterations | training TFLOPs / image | retarget GFLOPs (3 outputs) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['preset']} | {r['source']} | {r['working']} | {r['crop']} | {r['d_nets']} | {r['g_params'] / 1e6:.2f}M "
                   f"| {r['gflops_per_iteration']:.1f} | {r['iterations']:,} | {r['tflops_training']:.1f} "
                   f"| {r['gflops_retarget_3_outputs']:.1f} |")
    return out + [""]


def _curves(labels: list[str], notes: dict[str, str]) -> list[str]:
    """Each curve run: its configuration and, at every evaluation point, the mean over its images
    of each metric as a ratio to bicubic resize's (below 1: InGAN better)."""
    out = ["### Quality against compute", "",
           "Command: `python -m bench.curves --preset P --set FIELD=VALUE ... --label NAME` (one torch thread; "
           "training seconds exclude evaluation; two runs at a time on the two cores, so seconds are "
           "comparable only between runs made together). Plots: `python -m bench.curves --plot NAME ...`. "
           "Each cell: completeness + coherence / bicubic's, then patch SWD / bicubic's.", ""]
    for label in labels:
        path = RESULTS / "curves" / f"{label}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        sets = " ".join(f"--set {o}" for o in d["overrides"])
        tr, mo = d["train"], d["model"]
        # The preset named was the one of the day; the configuration recorded is what ran.
        ran = (f"{tr['iterations']:,} iterations, crop {tr['crop_size']}, lr {tr['lr']:g}, g_channels {mo['g_channels']}, "
               f"calibration {tr.get('norm_calibration', 0)}, ema {tr.get('ema', 0):g}, image_skip {mo.get('image_skip', False)}")
        command = f"--preset {d['preset']}" + (f" {sets}" if sets else "")
        out += [f"**{label}**: `{command}` ({ran}); images: {', '.join(d['images'])}."
                + (f" {notes[label]}" if label in notes else ""), "",
                "| iteration | GFLOPs | train s | width x2 | width x0.5 | square |", "|---|---|---|---|---|---|"]
        for r in d["mean"]:
            cells = [f"{r[t]['bds_vs_bicubic']:.2f} / {r[t]['swd_vs_bicubic']:.2f}" for t in ("width x2", "width x0.5", "square")]
            out.append(f"| {r['iteration']:,} | {r['flops'] / 1e9:,.0f} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _gpu(data: dict[str, Any]) -> list[str]:
    out = [f"### GPU: {data['device_name']}", "", f"Machine: {_machine(data['machine'])}. Command: `{data.get('command', 'python -m bench.gpu')}`.", "",
           "| preset | configuration | iterations / s | peak GPU memory | GFLOPs / iteration | achieved TFLOP/s | of bf16 peak |",
           "|---|---|---|---|---|---|---|"]
    for r in data.get("speed", []):
        conf = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "fp32"
        frac = f"{r['fraction_of_bf16_peak']:.3%}" if "fraction_of_bf16_peak" in r else "-"
        out.append(f"| {r['preset']} | {conf} | {r['iters_per_s']:.1f} | {r.get('peak_gpu_mem_gib', 0):.2f} GiB "
                   f"| {r['gflops_per_iteration']:.1f} | {r['achieved_tflops']:.3f} | {frac} |")
    prof = data.get("step_profile")
    if prof:
        out += ["", f"One `fast` iteration (`bench.step_profile`): {prof['seconds_per_iter'] * 1e3:.0f} ms of wall time, "
                f"{prof['ops']:,.0f} operators called"]
        if "computing_ops" in prof:  # counted since the spectral norms were batched
            out[-1] += f" ({prof['computing_ops']:,.0f} of them computing, not views)"
        if "launches" in prof:  # measured on a GPU
            out[-1] += (f", {prof['launches']:,.0f} kernel launches from the host, {prof['device_busy_ms']:.1f} ms of "
                        f"kernel time on the GPU ({prof['device_busy_fraction']:.0%} busy)")
        out[-1] += "."
    if data.get("step_profile_error"):
        out += ["", f"The step profile did not run: {data['step_profile_error']}."]
    packs = [(r, "Ray tasks") for r in data.get("packing", [])] + [(r, "processes") for r in data.get("packing_processes", [])]
    if packs:
        out += ["", "| `fast` trainings per GPU | as | aggregate iterations / s | images per GPU-hour |", "|---|---|---|---|"]
        for r, how in sorted(packs, key=lambda x: x[0]["trainings_per_gpu"]):
            out.append(f"| {r['trainings_per_gpu']} | {how} | {r['aggregate_iters_per_s']:.1f} | {r['images_per_gpu_hour']:.1f} |")
    if data.get("packing_processes_method"):
        out += ["", data["packing_processes_method"]]
    if data.get("packing_error"):
        out += ["", f"Packing did not run: {data['packing_error']}."]
    plan = data.get("quality_plan")
    if plan:
        out += ["", f"Quality: {plan['trainings_at_once']} trainings at once, {plan['iterations']:,} iterations each "
                f"(`fast`'s schedule is {plan['full_iterations']:,}), chosen to fit the {plan['seconds_left']:.0f} s left."]
        if plan.get("seconds_needed_at_full"):
            out[-1] += f" The full schedule would need {plan['seconds_needed_at_full'] / 60:.0f} minutes."
        if plan.get("skipped"):
            out[-1] += f" Skipped: {plan['skipped']}."
    for q in data.get("quality_runs", []):
        if "timed_out_after_s" in q:
            done = f"stopped by the time budget after {q['timed_out_after_s']:.0f} s"
        elif (ROOT / q["results"]).exists():
            done = f"exit code {q['returncode']}, scores in `{q['results']}` (its table above)"
        else:
            done = f"exit code {q['returncode']}; its results are not kept"
        out += ["", f"`python {q['command']}`: {done}."]
    return out + [""]


def _versus(title: str, before: tuple[str, str], after: tuple[str, str]) -> list[str]:
    """Two InGAN variants from two quality runs, side by side on the same images and targets,
    with the bicubic resize for scale: (result file, method) each."""
    a, b = _load(before[0]), _load(after[0])
    if a is None or b is None:
        return []
    out = [f"### {title}", "", f"`{before[1]}` (`{before[0]}.json`) against `{after[1]}` (`{after[0]}.json`), "
           "means over the same images; lower is better. Per image: outputs that beat the bicubic resize on both counts.", "",
           f"| target | bicubic C+C x1000 / SWD | `{before[1]}` C+C / SWD | `{after[1]}` C+C / SWD | beats resize, before -> after |",
           "|---|---|---|---|---|"]
    for t in ("width x2", "width x0.5", "square"):
        bic, x, y = (next(r for r in d["mean"] if r["target"] == t and r["method"] == m)
                     for d, m in ((a, "bicubic"), (a, before[1]), (b, after[1])))
        out.append(f"| {t} | {bic['bds'] * 1e3:.2f} / {bic['swd']:.3f} | {x['bds'] * 1e3:.2f} / {x['swd']:.3f} "
                   f"| {y['bds'] * 1e3:.2f} / {y['swd']:.3f} | {_wins(a, before[1], t)} -> {_wins(b, after[1], t)} |")
    return out + [""]


def _shapes(data: dict[str, Any]) -> list[str]:
    out = ["### Shaped outputs: training with top-corner shifts", "",
           f"Machine: {_machine(data['machine'])}. Command: `python -m bench.shapes --preset {data['preset']} "
           f"--max-shift {data['max_shift']:g} --images {','.join(p.rsplit('.', 1)[0] for p in data['images'])} "
           f"--jobs {data['jobs']}`.",
           "Each image trained twice with the same seed, without and with shifts; both models retargeted to two "
           "rectangles and two shapes (trapezoid x1.5: width x1.5 with the top corners moved in by 0.3 each; slant: the "
           "source's size with the top-left corner moved right by 0.4). A shape is scored inside its frame against a "
           "bicubic resize put through the same frame. Means over the images (C+C x1000); lower is better.", "",
           "| target | model | C+C | resize C+C | patch SWD | resize SWD | beat the resize on both |",
           "|---|---|---|---|---|---|---|"]
    for r in data["mean"]:
        out.append(f"| {r['target']} | `{r['variant']}` | {r['bds'] * 1e3:.2f} | {r['resize_bds'] * 1e3:.2f} | {r['swd']:.3f} "
                   f"| {r['resize_swd']:.3f} | {r['beats_resize']}/{r['images']} |")
    secs = data.get("train_seconds", {})
    if secs:
        out += ["", "Training minutes per image, two at once: " + "; ".join(
            f"`{v}` {min(t.values()) / 60:.1f}-{max(t.values()) / 60:.1f}" for v, t in secs.items() if t) + "."]
    sheet = RESULTS / f"shapes_{data['preset']}.png"
    if sheet.exists():
        out += ["", "Per image: the source, then for the trapezoid and then the slant: the resize in the frame, the model "
                    "trained without shifts, the model trained with them (checkerboard: transparent).", "",
                f"![shapes](bench/results/{sheet.name})"]
    return out + [""]


def _orchestration(runs: list[dict[str, Any]]) -> list[str]:
    out = ["### Orchestration overhead", "",
           f"Machine: {_machine(runs[0]['machine'])}.",
           "Command: `python -m bench.orchestration --rows N --iterations 1` (local Ray, `tiny` preset cut to one "
           "iteration, 48 px images, one output each, no metrics).", "",
           "| rows | commit | ok | failed | wall s | images / s | driver RSS start | peak | end |",
           "|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(runs, key=lambda r: r["rows"]):
        out.append(f"| {d['rows']:,} | {d['machine'].get('commit', '?')} | {d['ok']:,} | {d['failed']} | {d['wall_seconds']:.1f} "
                   f"| {d['images_per_second']:.2f} | {d['driver_rss_start_mib']:.0f} MiB | {d['driver_rss_peak_mib']:.1f} MiB "
                   f"| {d['driver_rss_end_mib']:.0f} MiB |")
    return out + [""]


def main() -> None:
    lines = ["# Benchmarks", "",
             "Written by `python -m bench.write_md` from the JSON files that the benchmark commands below leave in "
             "`bench/results/`. Every figure names its command, machine and date.", ""]
    sections = [(p.stem, _quality) for p in sorted(RESULTS.glob("quality_*.json"))]
    sections += [("flops", _flops)]
    sections += [("train_speed_cpu", lambda d: _speed(d, "cpu")), ("train_speed_cuda", lambda d: _speed(d, "cuda")),
                 ("gpu", _gpu)]
    for name, render in sections:
        data = _load(name)
        if data is not None:
            lines += render(data)
    lines += _versus("What training with top-corner shifts costs on rectangles",
                     ("quality_cpu_skip", "cpu+skip"), ("quality_cpu_shift03", "cpu+shift03"))
    shapes = _load("shapes_cpu")
    if shapes is not None:
        lines += _shapes(shapes)
    lines += _curves(CURVE_RUNS, {})
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
