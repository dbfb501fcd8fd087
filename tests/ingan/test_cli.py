"""Tests for ``python -m ingan``: train, retarget and score through real subprocesses."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from support import IMAGES_DIR, image_mode_and_size, run_ingan


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def image(workdir: Path) -> Path:
    """A small RGB texture (40 x 32)."""
    path = workdir / "gravel.png"
    with Image.open(IMAGES_DIR / "gravel.png") as im:
        im.convert("RGB").resize((40, 32), Image.Resampling.BOX).save(path)
    return path


@pytest.fixture(scope="module")
def trained(workdir: Path, image: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = workdir / "m.pt"
    proc = run_ingan("train", str(image), "--preset", "tiny", "--iterations", "3", "--out", str(out))
    return out, proc


def test_train_writes_a_checkpoint_and_reports_progress(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.stat().st_size > 10_000
    assert not Path(str(out) + ".tmp").exists()
    lines = proc.stderr.splitlines()
    assert any(line.startswith("training preset=tiny iterations=3") for line in lines), proc.stderr
    progress = [line for line in lines if line.startswith("[3/3]")]
    assert len(progress) == 1 and "it/s" in progress[0] and "rec=" in progress[0], proc.stderr
    assert any(line.startswith(f"saved {out}") for line in lines), proc.stderr

    from ingan import checkpoint

    ckpt = checkpoint.load(out.read_bytes())
    assert ckpt.train.iterations == 3
    assert ckpt.meta["source_hw"] == [32, 40] and ckpt.meta["preset"] == "tiny"
    assert ckpt.meta["bf16"] is False  # the precision it was trained in, resolved
    assert "train_seconds" not in ckpt.meta  # no timings: the same training writes the same bytes


def test_retarget_writes_exact_sizes(trained: tuple[Path, subprocess.CompletedProcess[str]], image: Path, workdir: Path) -> None:
    model, _ = trained
    out_dir = workdir / "out"
    proc = run_ingan("retarget", str(model), str(image), "--size", "37x21", "--size", "64x64", "--out-dir", str(out_dir),
                     ok=True)
    assert image_mode_and_size(out_dir / "37x21.png") == ("RGB", (37, 21))  # 37 wide, 21 high
    assert image_mode_and_size(out_dir / "64x64.png") == ("RGB", (64, 64))
    assert proc.stdout.split() == [str(out_dir / "37x21.png"), str(out_dir / "64x64.png")]


def test_score_prints_json(image: Path, workdir: Path) -> None:
    other = workdir / "other.png"
    with Image.open(IMAGES_DIR / "brick.png") as im:
        im.convert("RGB").resize((48, 32), Image.Resampling.BOX).save(other)
    proc = run_ingan("score", str(image), str(other), "--max-patches", "512", ok=True)
    result = json.loads(proc.stdout)
    assert set(result) >= {"completeness", "coherence", "swd"}
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in result.values())


def test_unreadable_image(workdir: Path) -> None:
    text = workdir / "page.png"
    text.write_text("<html><body>not an image</body></html>")
    proc = run_ingan("train", str(text), "--iterations", "1", "--out", str(workdir / "never.pt"))
    _assert_one_line_error(proc, "error: not a recognised image format")
    assert not (workdir / "never.pt").exists()
    proc = run_ingan("train", str(workdir / "missing.png"), "--iterations", "1", "--out", str(workdir / "never.pt"))
    _assert_one_line_error(proc, "error: cannot read")


@pytest.mark.parametrize("size", ["3x3", "abc"])
def test_bad_size(trained: tuple[Path, subprocess.CompletedProcess[str]], image: Path, workdir: Path, size: str) -> None:
    model, _ = trained
    out_dir = workdir / f"bad-{size}"
    proc = run_ingan("retarget", str(model), str(image), "--size", size, "--out-dir", str(out_dir))
    line = _assert_one_line_error(proc, "--size")
    assert ("too small" in line) if size == "3x3" else ("WIDTHxHEIGHT" in line)
    assert not out_dir.exists()


def test_corrupt_checkpoint(image: Path, workdir: Path) -> None:
    bad = workdir / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    out_dir = workdir / "from-bad"
    proc = run_ingan("retarget", str(bad), str(image), "--size", "32x32", "--out-dir", str(out_dir))
    _assert_one_line_error(proc, f"error: {bad}: not a readable checkpoint")
    assert not out_dir.exists()


def test_parse_size_in_process() -> None:
    """The same parser, without a subprocess: width first, both bounds checked, optional shifts
    within +-0.9 (zero shifts are a rectangle)."""
    import argparse

    from ingan.cli import parse_size

    assert parse_size("37x21") == (21, 37, None)
    assert parse_size(" 8X8 ") == (8, 8, None)
    assert parse_size("64x32@0.3,-0.25") == (32, 64, (0.3, -0.25))
    assert parse_size("64x32@0,0") == (32, 64, None)
    for bad in ("3x3", "7x64", "64x7", "0x64", "64x", "x64", "abc", "-8x8", "16x16x16", "20000x64",
                "64x32@0.3", "64x32@1.2,0", "64x32@0,-0.95", "64x32@nan,0", "64x32@a,b", "64x32@0.1,0.2,0.3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_a_long_narrow_image_trains_and_retargets(workdir: Path) -> None:
    """2000x30 under tiny's 96 px cap: the working image keeps a 17 px short side (the cap is
    raised for it) instead of shrinking to 1 px, as the pipeline does it."""
    strip = workdir / "strip.png"
    with Image.open(IMAGES_DIR / "gravel.png") as im:
        im.convert("RGB").resize((2000, 30), Image.Resampling.BOX).save(strip)
    model = workdir / "strip.pt"
    proc = run_ingan("train", str(strip), "--preset", "tiny", "--iterations", "2", "--out", str(model), ok=True)
    assert "working=1134x17" in proc.stderr, proc.stderr
    out_dir = workdir / "strip-out"
    run_ingan("retarget", str(model), str(strip), "--size", "1000x30", "--out-dir", str(out_dir), ok=True)
    assert image_mode_and_size(out_dir / "1000x30.png") == ("RGB", (1000, 30))


@pytest.mark.parametrize(("hw", "cap", "expected"), [
    ((30, 2000), 96, (17, 1134)), ((2000, 30), 96, (1134, 17)), ((100, 200), 96, (48, 96)),
    ((10, 500), 96, (10, 500)), ((50, 60), 96, (50, 60)), ((50, 60), None, (50, 60)),
])
def test_working_resolution_keeps_the_short_side_trainable(hw: tuple[int, int], cap: int | None,
                                                           expected: tuple[int, int]) -> None:
    from ingan.images import working_resolution

    assert working_resolution(hw, cap) == expected
