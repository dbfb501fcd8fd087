"""Assemble BENCHMARKS.md and docs/experiments.md from the result files under bench/results/.

    python -m bench.write_md

BENCHMARKS.md leads with the shipped presets, each beside bicubic resize, centre crop and seam
carving (held-out images first where they have been scored), then speed, FLOPs, GPU and
orchestration. docs/experiments.md holds everything tried on the way: an index, the notes and every
quality run's full table. Hand-written text comes from ``bench/results/summary.md`` (the top of the
`cpu` section) and ``bench/results/notes/<section>.md``; every figure in a table comes from a JSON
file, with the machine, date, commit and command that made it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingan.config import REMOVED_OPTIONS, get_preset
from ingan.metrics import beats

from .common import IMAGE_SETS, RESULTS, ROOT, bench_images, quality_label

TARGETS = ("width x2", "width x0.5", "square")
BASELINES = ("bicubic", "centre crop", "seam carving")
SUMMARY = RESULTS / "summary.md"
NOTES = RESULTS / "notes"
EXPERIMENTS = ROOT / "docs" / "experiments.md"

# The quality-against-compute runs, in the order they were made (bench/results/curves/).
CURVE_RUNS = ["c128", "c128_ema", "c64", "c96", "c128_cal_ema", "c128_cal_ema_fastsched", "c128_skip",
              "cpu_base", "cpu_no2g", "cpu_2g_late", "cpu_dmin32", "cpu_res4", "cpu_w24", "cpu_crops2",
              "cpu_tone", "cpu_no2g_tone", "hubble_seed4018602180_hardclamp", "hubble_seed4018602180_clampgrad"]

REFERENCE_S_PER_ITER = 4.4  # the reference implementation at a 216x256 crop on this 2-core CPU


@dataclass(frozen=True)
class PresetRun:
    """A quality run that stands for a shipped preset in BENCHMARKS.md."""

    file: str  # bench/results/<file>.json
    method: str  # the method in it that is the preset
    title: str
    about: str = ""  # how the run relates to the preset as it ships
    label: str = ""  # the preset's column heading (default: its name)
    sheet: str = ""  # the picture shown for it (default: the run's width x2 contact sheet)
    missing: str = ""  # said in place of the table while the run has not been made (else: left out)


PRESETS: dict[str, list[PresetRun]] = {
    # Held-out first: the tuning sets chose the preset, so only the held-out set tests it.
    "cpu": [
        PresetRun("quality_cpu_heldout", "cpu", "Held-out set: four photographs no choice was made on",
                  "Trained at commit 0c88ff6 (the preset as it ships) one image at a time beside other trainings and "
                  "the test suite on the same 2 cores, so its minutes are not the preset's own; scored with stretch, "
                  "and judged by today's verdict.",
                  missing="The held-out run has not been made yet: `python -m bench.quality --presets cpu "
                          "--image-set heldout --jobs 1` writes `bench/results/quality_cpu_heldout.json`."),
        PresetRun("quality_cpu_clampgrad", "cpu+clampgrad", "Tuning set: the eight standard images",
                  "This run is the shipped `cpu` preset: it was made with `--label clampgrad` at commit 1885b50, "
                  "the commit that made the image skip's clamp pass gradients, and the preset has not changed since."),
        PresetRun("quality_cpu_patterns", "cpu", "Tuning set: four patterns and textures",
                  "Trained at commit 0c88ff6 as the held-out run above, and judged the same way."),
    ],
    "tiny": [
        PresetRun("quality_cpu_tiny", "tiny", "The eight standard images",
                  "Made at commit 45d7dce; `tiny`'s settings are the same today. The run also trained the `cpu` "
                  "preset of that day (no image skip), whose column is in [docs/experiments.md](docs/experiments.md)."),
    ],
    "fast": [
        PresetRun("quality_fast_fast2000_patterns", "fast+fast2000", "The coins, at a fifth of the schedule",
                  "The full network on one CPU core for 2,000 of `fast`'s 10,000 iterations (its milestones at the "
                  "same fractions of the run), in bfloat16.",
                  label="`fast` at 2,000 iterations", sheet="quality_coins_x2_fast2000.jpg"),
    ],
}
SHEET_CAPTIONS = {
    "quality_coins_x2_fast2000.jpg": "coins, width x2, whole outputs at 1:1: source, bicubic, `fast` at 2,000 iterations",
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _notes(path_or_name: Any) -> list[str]:
    """A hand-written notes file's lines (``bench/results/notes/<name>.md`` for a name), with a blank
    line after; nothing if it does not exist."""
    path = NOTES / f"{path_or_name}.md" if isinstance(path_or_name, str) else path_or_name
    return [path.read_text().rstrip(), ""] if path.exists() else []


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    # Recorded since the cpu preset's precision follows the CPU; older results do not say.
    bf16 = {True: ", native bfloat16", False: ", no native bfloat16"}.get(m.get("cpu_native_bf16"), "")
    return (f"{m['cpu']}{bf16}, {m['cores']} cores, torch {m['torch']} (torch threads: {m['torch_threads']}){gpu}; "
            f"{m['date']}, commit {m.get('commit', '?')}")


def _speed(data: dict[str, Any], device: str) -> list[str]:
    out = [f"### Training speed ({device})", "", f"Machine: {_machine(data['machine'])}.",
           f"Command: `python -m bench.train_speed --device {device} --compare`.", "",
           "Steady state (past the size curriculum: outputs 0.15x-2.25x the crop per axis, second G step on).", ""]
    rows = []
    # Rows of switches since removed (the experiment log keeps what they measured).
    removed = set(REMOVED_OPTIONS["TrainConfig"]) | set(REMOVED_OPTIONS["ModelConfig"])
    for r in (r for r in data["training"] if not removed & set(r["overrides"])):
        conf = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "default (channels-last, fp32)"
        mem = f", peak GPU {r['peak_gpu_mem_gib']:.2f} GiB" if "peak_gpu_mem_gib" in r else ""
        rows.append([r["preset"], r["crop"], conf + mem, f"{r['seconds_per_iter']:.3f}", f"{r['iters_per_s']:.2f}",
                     f"{r['iterations']:,} it = {r['full_run_hours']:.2f} h"])
    out += _table(["preset", "crop", "configuration", "s / iteration", "iterations / s", "full schedule"], rows)
    paper = [r for r in data["training"] if r["preset"] == "paper" and not r["overrides"]]
    if paper and device == "cpu":
        s = paper[0]["seconds_per_iter"]
        out += ["", f"`paper` at the reference's 216x256 crop: **{s:.2f} s per iteration** against the reference's "
                    f"{REFERENCE_S_PER_ITER} s on this CPU ({REFERENCE_S_PER_ITER / s:.1f}x faster), same architecture and sizes."]
    out += ["", "Retargeting (one trained-size generator, source 600x400, five sizes from 128x128 to 800x400):", ""]
    out += _table(["preset", "s / output", "outputs / s"],
                  [[r["preset"], f"{r['seconds_per_output']:.3f}", f"{r['outputs_per_s']:.1f}"] for r in data["retarget"]])
    return out + [""]


def _judged(data: dict[str, Any]) -> bool:
    """Whether a run was scored with stretch, so its outputs are judged by today's verdict."""
    return any("stretch" in r for r in data["rows"])


def _winners(data: dict[str, Any], method: str, target: str) -> tuple[list[str], int]:
    """Of ``method``'s outputs for ``target``, the images whose output the verdict keeps against
    the bicubic resize of the same image (``ingan.metrics.beats``; for runs scored before stretch
    was measured, the verdict of then: better on both C+C and patch SWD); and how many images
    there are."""
    rows = [r for r in data["rows"] if r["target"] == target]
    ours = {r["image"]: r for r in rows if r["method"] == method}
    base = {r["image"]: r for r in rows if r["method"] == "bicubic"}

    def kept(o: dict[str, Any], b: dict[str, Any]) -> bool:
        if "stretch" in o:
            return beats(o, b)
        return o["completeness"] + o["coherence"] < b["completeness"] + b["coherence"] and o["swd"] < b["swd"]

    won = [i.rsplit(".", 1)[0] for i in ours if kept(ours[i], base[i])]
    return won, len(ours)


def _wins(data: dict[str, Any], method: str, target: str) -> str:
    won, n = _winners(data, method, target)
    return f"{len(won)}/{n}"


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


def _provenance(data: dict[str, Any]) -> list[str]:
    """Machine, command and images of a quality run."""
    presets = data["presets"]
    its = ", ".join(f"`{p}` {n:,} iterations" for p, n in data["iterations"].items())
    image_set = data.get("image_set", "standard")
    names = ",".join(p.split("+")[0] for p in presets)  # a "+label" is the --label flag's, not a preset's
    label = f" --label {presets[0].split('+')[1]}" if "+" in presets[0] else ""
    sets = "".join(" --set " + o for o in data.get("overrides") or [])
    return [f"Machine: {_machine(data['machine'])}.",
            f"Command: `python -m bench.quality --presets {names} {_images_flag(data)}{_iterations_flag(data)}"
            f"--jobs {data['jobs']}{sets}{label}` ({its}).",
            f"Images: the {len(data['images'])} of `{IMAGE_SETS[image_set].relative_to(ROOT)}/` "
            f"(256 px on the longer side): {', '.join(data['images'])}."
            + (f" The {data['note']}." if data.get("note") else "")]


def _timing(data: dict[str, Any], method: str, name: str) -> list[str]:
    timing = data.get("timing", {}).get(method)
    if not timing:
        return []
    tr = [v["train_s"] for v in timing.values()]
    rt = [v["retarget_s"] for v in timing.values()]
    jobs = min(data["jobs"], len(data["images"]))
    return [f"Training {name}, {f'{jobs} images at once' if jobs > 1 else 'one image at a time'}, one torch thread each: "
            + (f"{tr[0] / 60:.1f} min; " if len(tr) == 1 else
               f"{min(tr) / 60:.1f}-{max(tr) / 60:.1f} min per image (mean {sum(tr) / len(tr) / 60:.1f}); ")
            + f"retargeting the three outputs {max(rt):.2f} s at most."]


def _sheets(data: dict[str, Any]) -> list[str]:
    """The run's contact sheets that exist, as image lines."""
    label = quality_label(data["presets"], data.get("image_set", "standard"))
    names = (f"quality_{label}_{t.replace(' ', '_').replace('.', '')}.jpg" for t in TARGETS)
    return [line for n in names if (RESULTS / n).exists() for line in ("", f"![{n[:-4]}](bench/results/{n})")]


def _quality(data: dict[str, Any]) -> list[str]:
    """A quality run in full: every method's completeness and coherence apart, per target."""
    presets = data["presets"]
    on = "" if data.get("image_set", "standard") == "standard" else f", {data['image_set']} image set"
    out = [f"### Quality: {', '.join(f'`{p}`' for p in presets)} beside bicubic resize, centre crop and seam carving{on}",
           "", *_provenance(data), "",
           "Means over the images; lower is better for every column. C+C = completeness + coherence (x1000). "
           "Square = source height x source height (for square sources bicubic and crop return the source itself).", ""]
    stretched = any("stretch" in r for r in data["mean"])  # runs scored since stretch was measured
    out += _table(["target", "method", "completeness x1000", "coherence x1000", "C+C x1000", "patch SWD",
                   *(["stretch"] if stretched else [])],
                  [[r["target"], f"**InGAN `{r['method']}`**" if r["method"] in presets else r["method"],
                    f"{r['completeness'] * 1e3:.2f}", f"{r['coherence'] * 1e3:.2f}", f"{r['bds'] * 1e3:.2f}",
                    f"{r['swd']:.3f}", *([_stretch(r.get("stretch"))] if stretched else [])] for r in data["mean"]])
    if stretched:
        out += ["", "Stretch per image (0: objects at their own size, 1: stretched as the resize; "
                "- where the target keeps the source's aspect):", ""]
        methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
        cells = {(r["image"], r["target"], r["method"]): r.get("stretch") for r in data["rows"]}
        out += _table(["image", "target", *methods],
                      [[image, t, *(_stretch(cells.get((image, t, m))) for m in methods)]
                       for image in data["images"] for t in TARGETS])
    for preset in presets:
        wins = [f"{t} {_wins(data, preset, t)}" for t in TARGETS]
        kept = ("the verdict keeps" if _judged(data) else "that beat the bicubic resize on both C+C and SWD")
        out += ["", f"`{preset}` outputs {kept}, per image: {'; '.join(wins)}."]
        out += _timing(data, preset, f"`{preset}`")
    return out + _sheets(data) + [""]


def _stretch(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pair(r: dict[str, Any], best: dict[str, float]) -> str:
    """'C+C / SWD' of a mean row, each in bold where it is the best of its row; then its stretch where
    the run measured it."""
    bds, swd = f"{r['bds'] * 1e3:.2f}", f"{r['swd']:.3f}"
    pair = (f"**{bds}**" if r["bds"] == best["bds"] else bds) + " / " + (f"**{swd}**" if r["swd"] == best["swd"] else swd)
    return pair + (f" / {_stretch(r['stretch'])}" if "stretch" in r else "")


def _preset_run(run: PresetRun, name: str, with_sheet: bool) -> tuple[list[str], bool]:
    """One run of a shipped preset: the preset beside the baselines, one row per target, and its
    per-image wins; its picture too when ``with_sheet`` and the picture exists. Returns the lines
    and whether the picture was shown."""
    data = _load(run.file)
    if data is None:
        return ([f"### {run.title}", "", run.missing, ""] if run.missing else []), False
    label = run.label or f"`{name}`"
    out = [f"### {run.title}", ""] + ([run.about] if run.about else []) + _provenance(data) + [""]
    rows = []
    for t in TARGETS:
        means = {r["method"]: r for r in data["mean"] if r["target"] == t}
        cells = [means[m] for m in (*BASELINES, run.method)]
        best = {k: min(c[k] for c in cells) for k in ("bds", "swd")}
        won, n = _winners(data, run.method, t)
        rows.append([t, *(_pair(c, best) for c in cells), f"{len(won)}/{n}" + (f": {', '.join(won)}" if won else "")])
    verdict = "kept by the verdict" if _judged(data) else "beats bicubic on both"
    out += _table(["target", *BASELINES, label, verdict], rows)
    out += ["", *_timing(data, run.method, label)]
    sheet = run.sheet or f"{run.file}_width_x2.jpg"
    shown = with_sheet and (RESULTS / sheet).exists()
    if shown:
        caption = SHEET_CAPTIONS.get(sheet, f"width x2, one image a row: source, {', '.join(BASELINES)}, {name}")
        out += ["", f"![{caption}](bench/results/{sheet})"]
    return out + [""], shown


def _preset_section(name: str) -> list[str]:
    out = (_notes(SUMMARY) if name == "cpu" else []) + _notes(name)
    shown = False
    for run in PRESETS.get(name, []):
        lines, now = _preset_run(run, name, with_sheet=not shown)
        out += lines
        shown = shown or now
    return out


def _flops(data: dict[str, Any]) -> list[str]:
    out = [f"Machine: {_machine(data['machine'])}. Command: `python -m bench.flops` ({data['samples']} steps counted "
           "with `FlopCounterMode` per preset, spread over the schedule; forward and backward of every G and D pass).", ""]
    out += _table(["preset", "source", "working", "crop", "D nets", "G params", "GFLOPs / iteration", "iterations",
                   "training TFLOPs / image", "retarget GFLOPs (3 outputs)"],
                  [[r["preset"], r["source"], r["working"], r["crop"], str(r["d_nets"]), f"{r['g_params'] / 1e6:.2f}M",
                    f"{r['gflops_per_iteration']:.1f}", f"{r['iterations']:,}", f"{r['tflops_training']:.1f}",
                    f"{r['gflops_retarget_3_outputs']:.1f}"] for r in data["rows"] if r["source"] == "600x400"])
    return out + [""]


def _curves(labels: list[str]) -> list[str]:
    """Each curve run: its configuration and, at every evaluation point, the mean over its images
    of each metric as a ratio to bicubic resize's (below 1: InGAN better)."""
    out = ["## Quality against compute", "",
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
        out += [f"**{label}**: `{command}` ({ran}); images: {', '.join(d['images'])}.", ""]
        rows = [[f"{r['iteration']:,}", f"{r['flops'] / 1e9:,.0f}", f"{r['seconds']:.0f}",
                 *(f"{r[t]['bds_vs_bicubic']:.2f} / {r[t]['swd_vs_bicubic']:.2f}" for t in TARGETS)] for r in d["mean"]]
        out += _table(["iteration", "GFLOPs", "train s", *TARGETS], rows) + [""]
    return out


def _gpu(data: dict[str, Any]) -> list[str]:
    out = [f"Device: {data['device_name']}. Machine: {_machine(data['machine'])}. "
           f"Command: `{data.get('command', 'python -m bench.gpu')}`.", ""]
    rows = []
    for r in data.get("speed", []):
        conf = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "fp32"
        frac = f"{r['fraction_of_bf16_peak']:.3%}" if "fraction_of_bf16_peak" in r else "-"
        rows.append([r["preset"], conf, f"{r['iters_per_s']:.1f}", f"{r.get('peak_gpu_mem_gib', 0):.2f} GiB",
                     f"{r['gflops_per_iteration']:.1f}", f"{r['achieved_tflops']:.3f}", frac])
    out += _table(["preset", "configuration", "iterations / s", "peak GPU memory", "GFLOPs / iteration",
                   "achieved TFLOP/s", "of bf16 peak"], rows)
    prof = data.get("step_profile")
    if prof:
        # Computing operators are counted since the spectral norms were batched; launches only on a GPU.
        out += ["", "".join([
            f"One `fast` iteration (`bench.step_profile`): {prof['seconds_per_iter'] * 1e3:.0f} ms of wall time, "
            f"{prof['ops']:,.0f} operators called",
            f" ({prof['computing_ops']:,.0f} of them computing, not views)" if "computing_ops" in prof else "",
            f", {prof['launches']:,.0f} kernel launches from the host, {prof['device_busy_ms']:.1f} ms of kernel time "
            f"on the GPU ({prof['device_busy_fraction']:.0%} busy)" if "launches" in prof else "", "."])]
    if data.get("step_profile_error"):
        out += ["", f"The step profile did not run: {data['step_profile_error']}."]
    packs = [(r, "Ray tasks") for r in data.get("packing", [])] + [(r, "processes") for r in data.get("packing_processes", [])]
    if packs:
        out += [""] + _table(["`fast` trainings per GPU", "as", "aggregate iterations / s", "images per GPU-hour"],
                             [[str(r["trainings_per_gpu"]), how, f"{r['aggregate_iters_per_s']:.1f}",
                               f"{r['images_per_gpu_hour']:.1f}"]
                              for r, how in sorted(packs, key=lambda x: x[0]["trainings_per_gpu"])])
    if data.get("packing_error"):
        out += ["", f"Packing did not run: {data['packing_error']}."]
    plan = data.get("quality_plan")
    if plan:
        need = plan.get("seconds_needed_at_full")
        how = f"{plan['trainings_at_once']} trainings at once" if "trainings_at_once" in plan else "the images as bundles"
        out += ["", f"Quality: {how}, {plan['iterations']:,} iterations each "
                f"(`fast`'s schedule is {plan['full_iterations']:,}), chosen to fit the {plan['seconds_left']:.0f} s left."
                + (f" The full schedule would need {need / 60:.0f} minutes." if need else "")
                + (f" Skipped: {plan['skipped']}." if plan.get("skipped") else "")]
    runs = data.get("quality_runs", [])
    kept = [q for q in runs if "timed_out_after_s" not in q and (ROOT / q["results"]).exists()]
    if runs and not kept:  # nothing measured: one line says so
        out.append(f"None of its {len(runs)} quality runs finished with results kept.")
        runs = []
    for q in runs:
        if "timed_out_after_s" in q:
            done = f"stopped by the time budget after {q['timed_out_after_s']:.0f} s"
        elif (ROOT / q["results"]).exists():
            done = f"exit code {q['returncode']}, scores in `{q['results']}`"
        else:
            done = f"exit code {q['returncode']}; its results are not kept"
        out.append(f"`python {q['command']}`: {done}.")
    return out + [""]


# What a `fast` iteration cost on the H200 (bench/results/gpu.json's step profile): host time per
# operator called, and kernel time, the two things a bundle's iteration is projected from.
def _h200_costs(gpu: dict[str, Any]) -> tuple[float, float]:
    prof = gpu["step_profile"]
    return prof["seconds_per_iter"] / prof["ops"], prof["device_busy_ms"] / 1e3


def per_image_fit(ops: dict[int, float]) -> tuple[float, float]:
    """(a, b) of ops(K) = a / K + b, least squares over the counts given: what a bundle calls once
    (a) and what each of its images adds (b)."""
    xs, ys = [1 / k for k in ops], list(ops.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return a, my - a * mx


def project(ops_per_image: float, k: int, host_s_per_op: float, kernel_s_per_image: float,
            iterations: int) -> dict[str, float]:
    """A bundle of ``k`` on the GPU whose costs are given: its host issues ``ops_per_image * k``
    operators at ``host_s_per_op`` each while the GPU runs ``k`` images' kernels (as long per
    image as one training's: larger kernels may run faster, which this leaves out), the two
    overlapping, so the slower sets the pace. Seconds per image-iteration and images per
    GPU-hour at ``iterations`` per image."""
    host, kernels = host_s_per_op * ops_per_image * k, kernel_s_per_image * k
    per_image = max(host, kernels) / k
    return {"host_ms": host / k * 1e3, "kernel_ms": kernels / k * 1e3, "s_per_image_iteration": per_image,
            "images_per_gpu_hour": 3600 / (per_image * iterations), "bound": "host" if host >= kernels else "kernels"}


def _fused(cpu: dict[str, Any] | None, fast_cpu: dict[str, Any] | None, gpu: dict[str, Any] | None,
           cuda: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    if cpu:
        ops = dict(zip(cpu["k"], cpu["ops_per_image_iteration"], strict=True))
        out += [f"`{cpu['preset']}` as bundles of K images on the CPU. Machine: {_machine(cpu['machine'])}. "
                f"Command: `{cpu['command']}`.", ""]
        out += _table(["K", "computing operators / image-iteration", "of K=1's", "s / image-iteration",
                       "peak memory / image"],
                      [[str(k), f"{o:,.0f}", f"{o / ops[1]:.3f}", f"{sec:.3f}", f"{mib:,.0f} MiB"]
                       for k, o, sec, mib in zip(cpu["k"], cpu["ops_per_image_iteration"], cpu["s_per_image_iteration"],
                                                 cpu["peak_mib_per_image"], strict=True)]) + [""]
    if fast_cpu and gpu and gpu.get("step_profile", {}).get("launches"):
        host, kernel = _h200_costs(gpu)
        full = get_preset("fast").train.iterations
        counted = {r["k"]: r["all_ops_per_image_iteration"] for r in fast_cpu["fp32"]["rows"] if "error" not in r}
        a, b = per_image_fit({k: o for k, o in counted.items() if k >= 2})
        rows = []
        for k in sorted({*counted, 16, 32, 64}):
            o = counted.get(k, a / k + b)
            p = project(o, k, host, kernel, full)
            rows.append([str(k), f"{o:,.0f}" + ("" if k in counted else " (extrapolated)"), f"{p['host_ms']:.1f}",
                         f"{p['kernel_ms']:.1f}", p["bound"], f"{p['images_per_gpu_hour']:.1f}"])
        out += [f"**Projection, not a measurement:** `fast` as bundles on the H200. Operators per image-iteration "
                f"counted on the CPU (`{fast_cpu['command']}`, views included: each costs the host as much), "
                f"at the H200's measured {host * 1e6:.1f} µs of host time per operator and {kernel * 1e3:.1f} ms of "
                f"kernels per `fast` iteration (`bench.step_profile` there, commit {gpu['machine'].get('commit', '?')}; "
                "GPU section). Images per GPU-hour at `fast`'s 10,000 iterations.", ""]
        out += _table(["K", "operators / image-iteration", "host ms / image-iteration", "kernel ms / image-iteration",
                       "paced by", "projected images / GPU-hour"], rows) + [""]
    if cuda:
        out += [f"Measured on {cuda['machine'].get('gpu', 'the GPU')}: `{cuda['command']}`.", ""]
        for name in ("fp32", "bf16"):
            part = cuda.get(name)
            if not part or not part.get("k"):
                continue
            out += _table(["K", "precision", "launches / image-iteration", "s / image-iteration", "GPU busy",
                           "TFLOP/s", "of bf16 peak", "memory / image", "`fast` images / GPU-hour"],
                          [[str(r["k"]), name, f"{r['launches_per_image_iteration']:,.0f}", f"{r['s_per_image_iteration']:.4f}",
                            f"{r['device_busy_fraction']:.0%}", f"{r['achieved_tflops']:.2f}",
                            f"{r['fraction_of_bf16_peak']:.2%}" if r.get("fraction_of_bf16_peak") else "-",
                            f"{r['peak_mib_per_image']:,.0f} MiB", f"{r['images_per_gpu_hour']:.1f}"]
                           for r in part["rows"] if "error" not in r]) + [""]
    return out


def _versus(title: str, before: tuple[str, str], after: tuple[str, str]) -> list[str]:
    """Two InGAN variants from two quality runs, side by side on the same images and targets,
    with the bicubic resize for scale: (result file, method) each."""
    a, b = _load(before[0]), _load(after[0])
    if a is None or b is None:
        return []
    out = [f"### {title}", "", f"`{before[1]}` (`{before[0]}.json`) against `{after[1]}` (`{after[0]}.json`), "
           "means over the same images; lower is better. Per image: outputs that beat the bicubic resize on both counts.", ""]
    rows = []
    for t in TARGETS:
        bic, x, y = (next(r for r in d["mean"] if r["target"] == t and r["method"] == m)
                     for d, m in ((a, "bicubic"), (a, before[1]), (b, after[1])))
        rows.append([t, *(f"{r['bds'] * 1e3:.2f} / {r['swd']:.3f}" for r in (bic, x, y)),
                     f"{_wins(a, before[1], t)} -> {_wins(b, after[1], t)}"])
    out += _table(["target", "bicubic C+C x1000 / SWD", f"`{before[1]}` C+C / SWD", f"`{after[1]}` C+C / SWD",
                   "beats resize, before -> after"], rows)
    return out + [""]


def _shapes(data: dict[str, Any]) -> list[str]:
    out = ["### Shaped outputs: training with top-corner shifts", "",
           f"Machine: {_machine(data['machine'])}. Command: `python -m bench.shapes --preset {data['preset']} "
           f"--max-shift {data['max_shift']:g} --images {','.join(p.rsplit('.', 1)[0] for p in data['images'])} "
           f"--jobs {data['jobs']}`.",
           "Each image trained twice with the same seed, without and with shifts; both models retargeted to two "
           "rectangles and two shapes (trapezoid x1.5: width x1.5 with the top corners moved in by 0.3 each; slant: the "
           "source's size with the top-left corner moved right by 0.4). A shape is scored inside its frame against a "
           "bicubic resize put through the same frame. Means over the images (C+C x1000); lower is better.", ""]
    out += _table(["target", "model", "C+C", "resize C+C", "patch SWD", "resize SWD", "beat the resize on both"],
                  [[r["target"], f"`{r['variant']}`", f"{r['bds'] * 1e3:.2f}", f"{r['resize_bds'] * 1e3:.2f}",
                    f"{r['swd']:.3f}", f"{r['resize_swd']:.3f}", f"{r['beats_resize']}/{r['images']}"]
                   for r in data["mean"]])
    secs = data.get("train_seconds", {})
    if secs:
        out += ["", "Training minutes per image, two at once: " + "; ".join(
            f"`{v}` {min(t.values()) / 60:.1f}-{max(t.values()) / 60:.1f}" for v, t in secs.items() if t) + "."]
    sheet = RESULTS / f"shapes_{data['preset']}.jpg"
    if sheet.exists():
        out += ["", "Per image: the source, then for the trapezoid and then the slant: the resize in the frame, the model "
                    "trained without shifts, the model trained with them (checkerboard: transparent).", "",
                f"![shapes](bench/results/{sheet.name})"]
    return out + [""]


def _orchestration(runs: list[dict[str, Any]]) -> list[str]:
    out = [f"Machine: {_machine(runs[0]['machine'])}.",
           "Command: `python -m bench.orchestration --rows N --iterations 1` (local Ray, `tiny` preset cut to one "
           "iteration, 48 px images, one output each, no metrics).", ""]
    out += _table(["rows", "commit", "ok", "failed", "wall s", "images / s", "driver RSS start", "peak", "end"],
                  [[f"{d['rows']:,}", d["machine"].get("commit", "?"), f"{d['ok']:,}", str(d["failed"]),
                    f"{d['wall_seconds']:.1f}", f"{d['images_per_second']:.2f}", f"{d['driver_rss_start_mib']:.0f} MiB",
                    f"{d['driver_rss_peak_mib']:.1f} MiB", f"{d['driver_rss_end_mib']:.0f} MiB"]
                   for d in sorted(runs, key=lambda r: r["rows"])])
    return out + [""]


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body]


def benchmarks() -> list[str]:
    sections = [(f"The `{p}` preset", _preset_section(p)) for p in ("cpu", "tiny", "fast", "paper")]
    speed = _notes("speed")
    for device in ("cpu", "cuda"):
        data = _load(f"train_speed_{device}")
        speed += _speed(data, device) if data else []
    flops, gpu = _load("flops"), _load("gpu")
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("orchestration_*.json"))]
    fused = _fused(_load("fused_cpu"), _load("fused_cpu_fast"), gpu, _load("fused_cuda")) + _notes("fused")
    sections += [("Speed", speed), ("FLOPs", (_flops(flops) if flops else []) + _notes("flops")),
                 ("Fused training", fused), ("GPU", (_gpu(gpu) if gpu else []) + _notes("gpu")),
                 ("Orchestration", (_orchestration(runs) if runs else []) + _notes("orchestration"))]
    lines = ["# Benchmarks", "",
             "How the shipped presets retarget images, beside a plain bicubic resize, centre crop and seam carving, and "
             "what they cost. Quality tables: completeness + coherence (C+C, x1000) / patch SWD / stretch where measured, "
             "means over the images, lower is better for each, the best C+C and SWD of each row in bold; the last column "
             "names the images whose output the verdict keeps (in runs made before stretch: beats the bicubic resize on "
             "both C+C and SWD). Written by `python -m bench.write_md` from the JSON files the benchmark commands "
             "leave in `bench/results/`; every table names its command, machine, date and commit. Everything tried on "
             "the way, kept or not: [docs/experiments.md](docs/experiments.md).", "",
             "Contents:", ""]
    lines += [f"- [{title}](#{_anchor(title)})" for title, _ in sections] + [""]
    for title, body in sections:
        lines += _section(title, body)
    return lines


def experiments() -> list[str]:
    lines = ["# Experiments", "",
             "What was tried on the way to the shipped presets, kept or not: the record behind "
             "[BENCHMARKS.md](BENCHMARKS.md). Written by `python -m bench.write_md` from the hand-kept notes in "
             "`bench/results/notes/experiments.md` and, under \"Result tables\", every quality run in full.", ""]
    lines += _notes("experiments")
    lines += ["## Result tables", "",
              "Every quality run, completeness and coherence apart, in the order of their file names.", ""]
    # Smoke runs (bench.gpu --smoke) check scripts and are not committed: never in the record.
    for path in sorted(p for p in RESULTS.glob("quality_*.json") if "smoke" not in p.name):
        lines += _quality(json.loads(path.read_text()))
    lines += _versus("What training with top-corner shifts costs on rectangles",
                     ("quality_cpu_skip", "cpu+skip"), ("quality_cpu_shift03", "cpu+shift03"))
    shapes = _load("shapes_cpu")
    lines += _shapes(shapes) if shapes else []
    lines += _curves(CURVE_RUNS)
    # The notes link from the repository root; this file sits one folder down.
    text = "\n".join(lines)
    for a, b in (("](bench/", "](../bench/"), ("](BENCHMARKS.md", "](../BENCHMARKS.md"), ("](docs/", "](")):
        text = text.replace(a, b)
    return text.split("\n")


def render() -> dict[Path, str]:
    """Each file this writes, with its text."""
    return {path: "\n".join(lines).rstrip() + "\n"
            for path, lines in ((ROOT / "BENCHMARKS.md", benchmarks()), (EXPERIMENTS, experiments()))}


def main() -> None:
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)} ({text.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
