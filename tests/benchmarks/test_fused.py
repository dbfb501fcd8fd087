"""The fused benchmark's rows and file, measured small on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from bench.common import ROOT
from bench.fused import FIELDS, columns, measure


def test_a_bundle_row_counts_per_image_and_a_bundle_calls_fewer_operators_per_image() -> None:
    one, two = (measure("tiny", torch.device("cpu"), k, iters=1, bf16=False) for k in (1, 2))
    for row in (one, two):
        assert row["s_per_image_iteration"] > 0 and row["peak_mib_per_image"] > 0
        assert row["ops_per_image_iteration"] <= row["all_ops_per_image_iteration"]
    assert two["k"] == 2 and two["s_per_image_iteration"] == two["bundle_seconds_per_iter"] / 2
    # The network's operators are called once for both images: close to half per image.
    assert two["ops_per_image_iteration"] < 0.6 * one["ops_per_image_iteration"]


def test_the_results_are_list_fields_in_the_order_of_k() -> None:
    rows = [{"k": 4, "ops_per_image_iteration": 3.0}, {"k": 1, "ops_per_image_iteration": 9.0}]
    assert columns(rows, ("k", "ops_per_image_iteration")) == {"k": [1, 4], "ops_per_image_iteration": [9.0, 3.0]}


def test_the_committed_cpu_results_meet_the_operator_target() -> None:
    """``python -m bench.fused --device cpu``'s file: every K measured, and at K=16 a tenth or
    less of K=1's operators per image-iteration."""
    data = json.loads((ROOT / "bench" / "results" / "fused_cpu.json").read_text())
    assert data["k"] == [1, 2, 4, 8, 16]
    assert all(len(data[f]) == 5 and all(v is not None for v in data[f]) for f in FIELDS)
    ops = dict(zip(data["k"], data["ops_per_image_iteration"], strict=True))
    assert ops[16] <= ops[1] / 10


def test_the_command_line_writes_its_file(tmp_path: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.fused", "--one", "1", "--preset", "tiny", "--iters", "1",
                           "--bf16", "off", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["k"] == 1 and row["ops_per_image_iteration"] > 100
