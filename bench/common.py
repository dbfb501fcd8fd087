"""Shared helpers for the benchmarks: machine description, result files, bundled images."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ingan import images
from ingan.config import ModelConfig, TrainConfig, get_preset
from ingan.fit import fit, fit_bundle
from ingan.losses import Term
from ingan.retarget import retarget_image
from ingan.train import native_bf16

from .lab import LabConfig, lab_terms

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The benchmark set: eight photographs and textures at 256 px on the longer side (LICENSES.md).
IMAGES = ROOT / "bench" / "images"
# Named image sets. "standard" and "patterns" are the tuning sets: every preset and option was
# chosen on them. "patterns" holds repeated structures and textures (coins, grass, gravel, cells),
# the images InGAN was made for, scored apart so they never flatter the standard set's means.
# "heldout" holds photographs no choice was made on: the headline tables are measured there too,
# so a win that only fits the tuning images shows.
IMAGE_SETS = {"standard": IMAGES, "patterns": IMAGES / "patterns", "heldout": IMAGES / "heldout"}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "python": platform.python_version(),
            # What a preset's bf16=None (cpu's) resolves to on this CPU.
            "cpu_native_bf16": native_bf16(torch.device("cpu"))}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=False).stdout.strip()
    info["date"] = dt.date.today().isoformat()
    return info


def rss_mib() -> float:
    """This process's resident memory (VmRSS, from Linux's /proc) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def bench_images(names: str | None = None, image_set: str = "standard") -> list[Path]:
    """The images of a benchmark set, or those named in a comma-separated list (with or without
    suffix)."""
    folder = IMAGE_SETS.get(image_set)
    if folder is None:
        raise SystemExit(f"no benchmark image set {image_set!r}; choose one of: {', '.join(IMAGE_SETS)}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not names:
        return paths
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    by_name = {p.name: p for p in paths} | {p.stem: p for p in paths}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise SystemExit(f"no benchmark image named {', '.join(missing)} in {folder}")
    return [by_name[n] for n in wanted]


def add_image_set_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--image-set", default="standard", choices=list(IMAGE_SETS),
                    help="which bench/images set (default: standard; patterns: bench/images/patterns)")


def add_image_args(ap: argparse.ArgumentParser) -> None:
    """``--images`` and ``--image-set``, the same for every benchmark that trains on the set."""
    add_image_set_arg(ap)
    ap.add_argument("--images", help="comma-separated names from the image set (default: all of them)")


def quality_label(methods: list[str], image_set: str = "standard") -> str:
    """What ``bench.quality`` names a run's files after: ``quality_<label>.json`` and its sheets."""
    label = "_".join(methods).replace("+", "_") or "baselines"
    # The same presets on another set must not replace the standard set's results.
    return label if image_set == "standard" else f"{label}_{image_set}"


@dataclass(frozen=True)
class Overrides:
    """``--set FIELD=VALUE`` of a benchmark: ModelConfig fields (``model.FIELD``), the lab's options
    (``bench.lab.LabConfig``) and TrainConfig fields (any other name)."""

    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    lab: dict[str, Any] = field(default_factory=dict)

    def apply(self, preset_name: str, iterations: int | None = None) -> tuple[ModelConfig, TrainConfig, list[Term]]:
        """The preset's configs with these overrides, and the lab's extra loss terms; an
        unknown field or a bad value raises (TypeError, ValueError) before anything trains."""
        preset = get_preset(preset_name)
        model = dataclasses.replace(preset.model, **self.model)
        train = dataclasses.replace(preset.train, **self.train).with_overrides(iterations=iterations)
        return model, train, lab_terms(self.lab)


def parse_overrides(items: list[str] | tuple[str, ...]) -> Overrides:
    """``FIELD=VALUE`` strings -> Overrides. Values are Python literals (``4e-4``, ``True``,
    ``None``) or YAML scalars (``true``, ``null``)."""
    import ast

    import yaml

    lab_fields = {f.name for f in dataclasses.fields(LabConfig)}
    out = Overrides()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants FIELD=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = yaml.safe_load(value)
        if key.startswith("model."):
            out.model[key.removeprefix("model.")] = parsed
        elif key in lab_fields:
            out.lab[key] = parsed
        else:
            out.train[key] = parsed
    return out


Shape = tuple[int, int, "tuple[float, float] | None"]  # (W, H, top-corner shifts)


def train_one(path: str, preset_name: str, shapes: list[Shape], *, iterations: int | None = None,
              overrides: list[str] | tuple[str, ...] = (), max_shift: float | None = None,
              device: str = "cpu") -> tuple[list[torch.Tensor], float, float]:
    """Train ``preset_name`` (with ``--set`` overrides) on one benchmark image as the pipeline
    does (``ingan.fit``) and retarget it to ``shapes``: (outputs, training s, retargeting s).
    Meant for a worker process of its own: one torch thread, as a CPU node runs each image."""
    torch.set_num_threads(1)
    model, train, terms = parse_overrides(overrides).apply(preset_name, iterations)
    train = train.with_overrides(max_shift=max_shift)
    src = images.load(path)
    done = fit(src, preset_name, model, train, device, terms=terms)
    t0 = time.perf_counter()
    outs = retarget_image(done.checkpoint.build_generator(device), src, [(h, w) for w, h, _ in shapes], train.max_side, [sh for _, _, sh in shapes])
    return outs, done.seconds, time.perf_counter() - t0


def train_bundle(paths: list[str], preset_name: str, shapes: list[list[Shape]], *, iterations: int | None = None,
                 overrides: list[str] | tuple[str, ...] = (), device: str = "cpu") -> list[tuple[list[torch.Tensor], float, float]]:
    """``train_one`` for several images trained as bundles (``ingan.fit.fit_bundle``: one bundle
    per crop size, one after another), each image with the seed it would have alone: per image
    (outputs, its bundle's training s, retargeting s)."""
    model, train, terms = parse_overrides(overrides).apply(preset_name, iterations)
    sources = [images.load(p) for p in paths]
    fits = fit_bundle(sources, preset_name, model, [train] * len(paths), device, terms=terms)
    out = []
    for src, done, own in zip(sources, fits, shapes, strict=True):
        if isinstance(done, Exception):
            raise done
        t0 = time.perf_counter()
        g = done.checkpoint.build_generator(device)
        outs = retarget_image(g, src, [(h, w) for w, h, _ in own], train.max_side, [sh for _, _, sh in own])
        out.append((outs, done.seconds, time.perf_counter() - t0))
    return out
