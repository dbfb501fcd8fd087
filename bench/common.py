"""Shared helpers for the benchmarks: machine description, result files, bundled images."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ingan.train import native_bf16

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The benchmark set: eight photographs and textures at 256 px on the longer side (LICENSES.md).
IMAGES = ROOT / "bench" / "images"
# Named image sets. "standard" is the one every headline figure is measured on; "patterns" holds
# repeated structures and textures (coins, grass, gravel, cells), the images InGAN was made for,
# scored apart so they never flatter the standard set's means.
IMAGE_SETS = {"standard": IMAGES, "patterns": IMAGES / "patterns"}


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


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``FIELD=VALUE`` strings -> (ModelConfig overrides, TrainConfig overrides); ``model.FIELD``
    goes to the model. Values are Python literals (``4e-4``, ``True``, ``None``) or YAML scalars
    (``true``, ``null``)."""
    import ast

    import yaml

    model, train = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants FIELD=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = yaml.safe_load(value)
        if key.startswith("model."):
            model[key.removeprefix("model.")] = parsed
        else:
            train[key] = parsed
    return model, train
