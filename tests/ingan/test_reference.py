"""Single-image training held to a committed reference, not to another run of the same code.

A few float64 iterations of the ``tiny`` preset on a committed texture, with every part of an
iteration on (the second G step from the start, shifted outputs, statistics calibration), were
recorded in ``tests/data/reference_tiny_float64.json``: each step's losses, the norm of every
weight, and the trained generator's output at twice the width, pooled to 8 x 8. A change to what
single-image training computes (a loss, its weight, a crop, the schedule, the networks) moves
these far beyond the tolerance; a CPU with other vector instructions moves them by rounding
alone, which float64 keeps near 1e-12 (measured with ATen held to AVX2 and to no vector
instructions: see ``TOLERANCE``).

Conv biases followed by BatchNorm are left out: BatchNorm cancels them, so their gradient is
rounding noise, and Adam's first steps (the size of the learning rate, whatever the gradient's
size) give them a sign that differs between CPUs. Nothing the model computes depends on them.

Rewrite the reference (only for a change meant to alter training, with a new model tag):
``python tests/ingan/test_reference.py --write``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/support.py, run as a script
from support import texture  # noqa: E402

from ingan.config import get_preset  # noqa: E402
from ingan.images import to_model_input  # noqa: E402
from ingan.train import Trainer  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "data" / "reference_tiny_float64.json"
ITERATIONS = 4
# Relative to each value's scale (a loss, a tensor's norm, the output's range); measured across
# instruction sets on one machine: differences below 1e-11. A real change to training moves
# these by 1e-3 or more (see test_a_changed_training_misses_the_reference).
TOLERANCE = 1e-8


def _cancelled_biases(trainer: Trainer) -> set[str]:
    """Names of conv biases that a BatchNorm right after the conv cancels."""
    names = set()
    for net_name, net in (("g", trainer.g), ("d", trainer.d)):
        for name, module in net.named_modules():
            children = list(module.named_children())
            for (conv_name, conv), (_, after) in zip(children, children[1:], strict=False):
                inner = conv[-1] if isinstance(conv, torch.nn.Sequential) and len(conv) else conv
                if isinstance(inner, torch.nn.Conv2d) and isinstance(after, torch.nn.BatchNorm2d):
                    prefix = f"{name}.{conv_name}" if name else conv_name
                    suffix = ".1.bias" if inner is not conv else ".bias"
                    names.add(f"{net_name}.{prefix}{suffix}")
    return names


def record(**train_overrides: Any) -> dict[str, Any]:
    """The reference's figures for a training with the recorded settings (and any overrides)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        preset = get_preset("tiny")
        cfg = dataclasses.replace(preset.train, iterations=ITERATIONS, seed=5, second_g_step_start=0.0,
                                  max_shift=0.3, norm_calibration=4, **train_overrides)
        image = to_model_input(texture("brick.png", 40).double() / 255)
        t = Trainer([image], preset.model, cfg, "cpu")
        t.g.train()
        t.d.train()
        steps = [{name: float(value[0]) for name, value in t.step().items()} for _ in range(ITERATIONS)]
        t.run()  # nothing left to train: the end of a run (checks, calibration, eval mode)
        skip = _cancelled_biases(t)
        norms = {f"{net}.{name}": float(value.norm()) for net, module in (("g", t.g), ("d", t.d))
                 for name, value in module.state_dict().items()
                 if value.is_floating_point() and f"{net}.{name}" not in skip}
        with torch.no_grad():
            out = t.g(t.images[0][None], (40, 80))  # (1, 3, 40, 80)
        pooled = torch.nn.functional.adaptive_avg_pool2d(out, 8).flatten().tolist()
        return {"steps": steps, "norms": norms, "output_8x8": pooled, "skipped": sorted(skip)}
    finally:
        torch.set_default_dtype(before)


def _worst_gap(got: dict[str, Any], want: dict[str, Any]) -> tuple[float, str]:
    """The largest difference relative to its scale, and where."""
    gaps = []
    for i, (a, b) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        assert a.keys() == b.keys()
        gaps += [(abs(a[k] - b[k]) / max(abs(b[k]), 1e-3), f"step {i} {k}") for k in b]
    assert got["norms"].keys() == want["norms"].keys()
    gaps += [(abs(got["norms"][k] - v) / max(abs(v), 1e-3), k) for k, v in want["norms"].items()]
    # The output is in [-1, 1]: differences relative to that range.
    gaps += [(abs(a - b), f"output {i}") for i, (a, b) in enumerate(zip(got["output_8x8"], want["output_8x8"], strict=True))]
    return max(gaps)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


@pytest.mark.usefixtures("single_thread")
def test_single_image_training_matches_the_committed_reference(reference: dict[str, Any]) -> None:
    got = record()
    assert got["skipped"] == reference["skipped"]
    gap, where = _worst_gap(got, reference)
    assert gap <= TOLERANCE, f"{where} is {gap:.2e} away from the reference"


@pytest.mark.usefixtures("single_thread")
def test_a_changed_training_misses_the_reference(reference: dict[str, Any]) -> None:
    """The tolerance is tight enough to see a small change: a cycle weight 1% off."""
    cfg = get_preset("tiny").train
    gap, _ = _worst_gap(record(rec_weight=cfg.rec_weight * 1.01), reference)
    assert gap > 1000 * TOLERANCE


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/ingan/test_reference.py --write")
    torch.set_num_threads(1)
    REFERENCE.write_text(json.dumps(record(), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
