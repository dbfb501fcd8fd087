"""The GPU benchmark's planning and the step profiler, checked on the CPU."""

from __future__ import annotations

import torch

from bench.gpu import quality_iterations
from bench.step_profile import profile_step


def test_quality_runs_the_full_schedule_when_it_fits_and_a_shorter_one_when_not() -> None:
    assert quality_iterations(10_000, rate_each=40.0, seconds=300.0) == 10_000
    assert quality_iterations(10_000, rate_each=3.0, seconds=300.0) == 900
    assert quality_iterations(10_000, rate_each=3.1, seconds=300.0) == 900  # whole hundreds, rounded down
    assert quality_iterations(10_000, rate_each=0.01, seconds=300.0) == 100


def test_step_profile_counts_operators_called_from_python_not_their_insides() -> None:
    row = profile_step("tiny", torch.device("cpu"), steps=1, top=200)
    assert row["seconds_per_iter"] > 0
    # A convolution is counted once, as the conv2d the network calls, not again as the
    # aten::convolution and aten::_convolution it dispatches to.
    assert row["top_ops"].get("aten::conv2d", 0) > 0
    assert "aten::convolution" not in row["top_ops"] and "aten::_convolution" not in row["top_ops"]
    assert row["ops"] >= sum(row["top_ops"].values()) - 1e-9
    assert "launches" not in row  # kernel launches are counted on a GPU only
