"""What a change to the training code must leave alone: sha256 of G's and D's weights and buffers
after a short training of each trained-on preset on a committed crop, and every preset's model tag.

A refactor of the trainer prints the same lines before and after on one CPU; a change that alters
what a preset learns prints others (and should then change the preset's tag). Weights are exact
only on one CPU and torch build: oneDNN picks kernels by instruction set, so compare runs on the
same machine (the test suite's cross-CPU check is tests/ingan/test_reference.py).

    python -m bench.fingerprint [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ingan.config import PRESETS, get_preset, model_tag
from ingan.images import to_model_input
from ingan.train import Trainer

from .common import IMAGES, machine

# (preset, iterations): enough steps for every part of an iteration to have run (the second G step
# starts at 40-50% of the schedule, so `iterations` is cut to these counts, not only run that far).
RUNS = (("cpu", 30), ("tiny", 30), ("fast", 2))
CROP = (0, 0, 160, 120)  # left, top, right, bottom of bench/images/brick.png


def crop() -> torch.Tensor:
    with Image.open(IMAGES / "brick.png") as img:
        region = img.convert("RGB").crop(CROP)
    return torch.frombuffer(bytearray(region.tobytes()), dtype=torch.uint8).view(region.height, region.width, 3).permute(2, 0, 1)


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint() -> dict[str, Any]:
    torch.set_num_threads(1)
    image = to_model_input(crop())
    out: dict[str, Any] = {"machine": machine(), "runs": {}, "tags": {}}
    for name, iterations in RUNS:
        preset = get_preset(name)
        cfg = dataclasses.replace(preset.train, iterations=iterations, seed=3)
        trainer = Trainer([image], preset.model, cfg, "cpu", seeds=[cfg.seed])
        trainer.run()
        out["runs"][f"{name}-{iterations}"] = {"g": digest(trainer.g.state_dict()), "d": digest(trainer.d.state_dict())}
    for name, preset in PRESETS.items():
        for seed in (0, 1):
            out["tags"][f"{name}-seed{seed}"] = model_tag(name, preset.model, preset.train, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the fingerprint as JSON here")
    args = parser.parse_args()
    result = fingerprint()
    for run, hashes in result["runs"].items():
        print(f"{run:10s} G {hashes['g'][:16]}  D {hashes['d'][:16]}")
    for key, tag in result["tags"].items():
        print(f"{key:16s} {tag}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
