"""The repository stays light to clone: no committed picture over 300 KB, and the benchmark results
(JSON, notes, contact sheets, plots) at most 5 MB together. Sheets are JPEGs for this
(``bench.quality.contact_sheet``); a PNG of eight photographs ran to 2.3 MB."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}
MAX_IMAGE_BYTES = 300_000
MAX_RESULTS_BYTES = 5_000_000


def tracked_files() -> dict[str, int]:
    """Path (relative to the repository root) -> size in bytes, for every file git tracks that is
    in the working tree. Fails, rather than skips, without git or a checkout: a skipped check
    would let a heavy file in unnoticed."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.fail("git is not installed: this test lists the tracked files with `git ls-files`")
    if done.returncode != 0:
        pytest.fail(f"`git ls-files` failed in {ROOT} (not a git checkout?): {done.stderr.strip()}")
    files = {}
    for name in filter(None, done.stdout.split("\0")):
        path = ROOT / name
        if path.is_file():  # a tracked file deleted in the working tree weighs nothing
            files[name] = path.stat().st_size
    if not files:
        pytest.fail(f"`git ls-files` lists no files in {ROOT}: not a checkout of this repository?")
    return files


def test_no_tracked_image_is_over_300_kb() -> None:
    heavy = {name: size for name, size in tracked_files().items()
             if Path(name).suffix.lower() in IMAGE_SUFFIXES and size > MAX_IMAGE_BYTES}
    assert not heavy, "tracked images over 300 KB: " + ", ".join(
        f"{name} ({size / 1000:.0f} KB)" for name, size in sorted(heavy.items(), key=lambda kv: -kv[1]))


def test_benchmark_results_total_at_most_5_mb() -> None:
    results = {name: size for name, size in tracked_files().items() if name.startswith("bench/results/")}
    total = sum(results.values())
    largest = sorted(results.items(), key=lambda kv: -kv[1])[:5]
    assert total <= MAX_RESULTS_BYTES, (
        f"tracked files under bench/results/ total {total / 1e6:.2f} MB, over 5 MB; the largest: "
        + ", ".join(f"{name} ({size / 1000:.0f} KB)" for name, size in largest))
