"""The benchmark image sets: what each holds, and that each image carries its licence."""

from __future__ import annotations

import pytest
from PIL import Image

from bench.common import IMAGE_SETS, bench_images, quality_label


@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_every_image_is_licensed_and_at_benchmark_scale(image_set: str) -> None:
    paths = bench_images(image_set=image_set)
    assert len(paths) >= 4
    licences = (IMAGE_SETS[image_set] / "LICENSES.md").read_text()
    for path in paths:
        assert f"| {path.name} |" in licences, f"{path.name} has no row in {image_set}'s LICENSES.md"
        with Image.open(path) as im:
            assert im.mode == "RGB"
            assert max(im.size) == 256, f"{path.name} is {im.size}, not 256 px on the longer side"


def test_sets_are_apart() -> None:
    standard = {p.name for p in bench_images()}
    patterns = {p.name for p in bench_images(image_set="patterns")}
    assert len(standard) == 8  # every headline mean in BENCHMARKS.md is over these eight
    assert not standard & patterns


def test_names_are_looked_up_in_the_chosen_set() -> None:
    assert [p.name for p in bench_images("gravel,coins", "patterns")] == ["gravel.png", "coins.png"]
    with pytest.raises(SystemExit, match="no benchmark image named gravel"):
        bench_images("gravel")
    with pytest.raises(SystemExit, match="choose one of: standard, patterns"):
        bench_images(image_set="textures")


def test_results_of_another_set_are_named_apart() -> None:
    assert quality_label(["cpu", "tiny"]) == "cpu_tiny"
    assert quality_label(["cpu+noskip"]) == "cpu_noskip"
    assert quality_label(["cpu"], "patterns") == "cpu_patterns"
    assert quality_label([], "patterns") == "baselines_patterns"
