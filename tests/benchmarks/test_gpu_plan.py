"""The GPU benchmark's planning and the step profiler, checked on the CPU."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench.common import RESULTS
from bench.gpu import (
    _counts,
    bundle_seconds_per_iteration,
    quality_iterations,
    quality_runs,
    results_path,
)
from bench.step_profile import is_view, profile_step
from bench.write_md import _gpu


def test_quality_runs_the_full_schedule_when_it_fits_and_a_shorter_one_when_not() -> None:
    assert quality_iterations(10_000, rate_each=40.0, seconds=300.0) == 10_000
    assert quality_iterations(10_000, rate_each=3.0, seconds=300.0) == 900
    assert quality_iterations(10_000, rate_each=3.1, seconds=300.0) == 900  # whole hundreds, rounded down
    assert quality_iterations(10_000, rate_each=0.01, seconds=300.0) == 100


def test_a_smoke_run_writes_its_quality_results_apart_from_a_gpus() -> None:
    real = {results_path(r) for r in quality_runs("china,coffee", smoke=False)}
    smoke = {results_path(r) for r in quality_runs("china,coffee", smoke=True)}
    assert len(real) == len(smoke) == 1
    assert not real & smoke
    assert all(r["bundle"] for r in quality_runs("china,coffee", smoke=False))


def test_the_quality_plan_times_one_bundle_per_crop_size() -> None:
    """The eight images make three bundles at fast's crop: 256x256 and 256x223 (192x192 crops),
    256x171 (170x192) and 256x170 (169x192); each bundle is timed at the largest measured K up
    to its size."""
    eight = ["astronaut", "brick", "chelsea", "china", "coffee", "flower", "hubble_deep_field", "rocket"]
    rows = [{"k": 1, "s_per_image_iteration": 0.25}, {"k": 2, "s_per_image_iteration": 0.15},
            {"k": 4, "s_per_image_iteration": 0.05}, {"k": 8, "error": "out of memory"}]
    # Bundles of 3 (at K=2's rate), 4 (K=4's) and 1 (K=1's).
    assert bundle_seconds_per_iteration(eight, rows) == pytest.approx(3 * 0.15 + 4 * 0.05 + 1 * 0.25)
    assert bundle_seconds_per_iteration(eight, []) is None


def test_step_profile_counts_operators_called_from_python_not_their_insides() -> None:
    row = profile_step("tiny", torch.device("cpu"), steps=1, top=200)
    assert row["seconds_per_iter"] > 0
    # A convolution is counted once, as the conv2d the network calls, not again as the
    # aten::convolution and aten::_convolution it dispatches to.
    assert row["top_ops"].get("aten::conv2d", 0) > 0
    assert "aten::convolution" not in row["top_ops"] and "aten::_convolution" not in row["top_ops"]
    assert row["ops"] >= sum(row["top_ops"].values()) - 1e-9
    assert "launches" not in row  # kernel launches are counted on a GPU only
    views = sum(n for op, n in row["top_ops"].items() if is_view(op))
    assert views > 0 and row["computing_ops"] == pytest.approx(row["ops"] - views)


def test_views_are_told_from_operators_that_compute() -> None:
    assert all(map(is_view, ["aten::permute", "aten::detach", "aten::unbind", "aten::expand_as"]))
    assert not any(map(is_view, ["aten::add_", "aten::mv", "aten::stack", "aten::copy_", "aten::no_such_op"]))


def test_the_gpu_section_renders_a_step_profile_measured_without_a_gpu() -> None:
    data = json.loads((RESULTS / "gpu.json").read_text())
    lines = "\n".join(_gpu(data))
    assert "kernel launches from the host" in lines
    data["step_profile"] = profile_step("tiny", torch.device("cpu"), steps=1)
    lines = "\n".join(_gpu(data))
    assert "operators called (" in lines and "computing, not views)." in lines and "kernel launches" not in lines


def test_pack_counts_must_be_whole_numbers_of_one_or_more() -> None:
    assert _counts("16, 1,4,4") == [1, 4, 16]
    for bad in ("", "0,4", "two", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _counts(bad)
