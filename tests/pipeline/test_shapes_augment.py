"""Shaped targets and augmentation mode through the pipeline: the draws, the checks before a run,
and nights of runs over one output folder (the later ones only retarget)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import run_main, run_refused, shrunk_photo

from ingan.retarget import retarget_mask
from pipeline.config import RunConfig
from pipeline.targets import targets_of
from pipeline.task import Item, Job, process

RANGES = {"augment_ratios": (0.5, 2.0), "augment_scales": (0.6, 1.2), "augment_shift": 0.4}


def _variants(item_id: str = "img-1", **settings: Any) -> list[Any]:
    cfg = RunConfig(ratios=[], augment=6, **{**RANGES, **settings})
    return targets_of(cfg, item_id)


# --------------------------------------------------------------------------- the draws


def test_the_same_seed_and_salt_draw_the_same_variants() -> None:
    a, b = _variants(augment_salt="2026-11-30"), _variants(augment_salt="2026-11-30")
    assert a == b and len(a) == 6
    assert [t.variant for t in a] == list(range(6))


def test_another_salt_another_image_or_another_seed_draws_others() -> None:
    base = _variants(augment_salt="2026-11-30")
    for other in (_variants(augment_salt="2026-12-01"), _variants("img-2", augment_salt="2026-11-30"),
                  _variants(augment_salt="2026-11-30", seed=1)):
        assert all((t.ratio, t.scale, t.shifts) != (o.ratio, o.scale, o.shifts) for t, o in zip(base, other, strict=True))
    # Names change with the salt (a marker never passes one night's variants off as another's),
    # not with the image (the image has its own folder).
    assert {t.name for t in base}.isdisjoint(t.name for t in _variants(augment_salt="2026-12-01"))
    assert [t.name for t in base] == [t.name for t in _variants("img-2", augment_salt="2026-11-30")]


def test_draws_stay_within_their_ranges() -> None:
    many = [t for i in range(40) for t in _variants(f"img-{i}", augment_salt="x")]
    assert all(0.5 <= t.ratio <= 2.0 and 0.6 <= t.scale <= 1.2 for t in many)
    assert all(t.shifts is not None and max(abs(s) for s in t.shifts) <= 0.4 for t in many)
    ratios = sorted(t.ratio for t in many)
    assert ratios[0] < 0.7 and ratios[-1] > 1.4  # the range is covered, not one corner of it
    assert all(t.shifts is None for t in _variants(augment_salt="x", augment_shift=0.0))


def test_a_variant_resolves_to_its_ratio_at_its_scale() -> None:
    t = _variants(augment_salt="s")[0]
    w, h = t.resolve(200, 100, "keep_height")
    assert (w, h) == (round(100 * t.ratio * t.scale), round(100 * t.scale))


# --------------------------------------------------------------------------- refused before running


@pytest.mark.parametrize(("yaml_text", "field_name"), [
    ("augment_ratios: [2.0, 0.5]\n", "augment_ratios"),
    ("augment_ratios: [0.01, 2.0]\n", "augment_ratios"),
    ("augment_scales: [0.5]\n", "augment_scales"),
    ("augment_scales: [0.0, 1.0]\n", "augment_scales"),
    ("augment_shift: 1.5\n", "augment_shift"),
    ("augment: -1\n", "augment"),
    ("shapes: ['2@0.95,0']\n", "shapes"),
    ("shapes: ['2@0.3']\n", "shapes"),
    ("shapes: ['wide@0.1,0.1']\n", "shapes"),
    ("max_shift: 1.0\n", "max_shift"),
    ("fill_color: [0, 0, 256]\n", "fill_color"),
])
def test_bad_shifts_and_ranges_are_refused_before_anything_runs(
    tmp_path: Path, no_ray: None, yaml_text: str, field_name: str
) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["a.png"]}), manifest)
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    run_refused([str(manifest), "--output", str(tmp_path / "out"), "--config", str(config)],
                [field_name, "invalid configuration"])


def test_bad_shape_flags_are_refused(tmp_path: Path, no_ray: None) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["a.png"]}), manifest)
    for flags in (["--shape", "2@0.3,-1.3"], ["--augment-shift", "0.91"], ["--max-shift", "-0.1"]):
        run_refused([str(manifest), "--output", str(tmp_path / "out"), *flags], ["shift"])


# --------------------------------------------------------------------------- one task, no Ray


def _alpha(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGBA"
        return torch.from_numpy(np.asarray(im.getchannel("A")).copy())


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    shrunk_photo("chelsea.png", path, 40)
    return path


def _job(out: Path, **settings: Any) -> Job:
    cfg = RunConfig(output=str(out), preset="tiny", iterations=2, **settings)
    return Job.of(cfg, "tiny")


def test_shaped_targets_are_written_transparent_with_exact_sizes(tmp_path: Path, photo: Path, single_thread: None) -> None:
    job = _job(tmp_path / "out", ratios=[1.0], sizes=["64x48"], shapes=["2@0.3,-0.3", "64x48@0,0.5"], image_format="webp")
    rec = process(Item(0, "cat", str(photo), {}), job)
    assert rec["status"] == "ok", rec
    src_h = rec["source_height"]
    by_target = {o["target"]: o for o in rec["outputs"]}
    assert set(by_target) == {"ratio:1.0", "size:64x48", "shape:2.0@0.3,-0.3", "shape:64x48@0,0.5"}
    shaped = by_target["shape:2.0@0.3,-0.3"]
    assert (shaped["width"], shaped["height"]) == (2 * src_h, src_h)
    assert (shaped["shift_left"], shaped["shift_right"]) == (0.3, -0.3)
    assert shaped["uri"].endswith(f"outputs/{2 * src_h}x{src_h}_tl+0.3_tr-0.3.webp")
    alpha = _alpha(Path(shaped["uri"]).read_bytes())
    assert alpha.shape == (src_h, 2 * src_h)
    assert torch.equal(alpha > 127, retarget_mask((src_h, 2 * src_h), (0.3, -0.3)))
    # Scored inside the frame, against a resize put through the same frame.
    assert shaped["swd"] is not None and shaped["resize_swd"] is not None and shaped["beats_resize"] in (True, False)
    rect = by_target["size:64x48"]
    assert (rect["shift_left"], rect["shift_right"], rect["mask_uri"]) == (0.0, 0.0, None)
    with Image.open(rect["uri"]) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
    assert by_target["shape:64x48@0,0.5"]["uri"] != rect["uri"]


def test_a_shaped_jpeg_gets_the_fill_colour_and_a_mask_file(tmp_path: Path, photo: Path, single_thread: None) -> None:
    job = _job(tmp_path / "out", ratios=[], shapes=["80x40@0.4,-0.4"], image_format="jpeg", fill_color=(0, 0, 0),
               metrics=False)
    rec = process(Item(0, "cat", str(photo), {}), job)
    assert rec["status"] == "ok", rec
    (out,) = rec["outputs"]
    assert out["uri"].endswith("80x40_tl+0.4_tr-0.4.jpg") and out["mask_uri"].endswith("80x40_tl+0.4_tr-0.4.mask.png")
    with Image.open(out["mask_uri"]) as m:
        mask = torch.from_numpy(np.asarray(m).copy()) == 255
    assert torch.equal(mask, retarget_mask((40, 80), (0.4, -0.4)))
    with Image.open(out["uri"]) as im:
        assert im.size == (80, 40)
        corner = np.asarray(im)[:3, :3]  # top-left corner: outside the frame
    assert corner.max() < 30


# --------------------------------------------------------------------------- nights, through Ray


def _night(manifest: Path, out: Path, salt: str) -> tuple[int, str, list[dict[str, Any]]]:
    code, log = run_main([str(manifest), "--output", str(out), "--preset", "tiny", "--iterations", "3",
                          "--ratios", "", "--shape", "2@0.3,-0.3", "--augment", "3", "--augment-salt", salt,
                          "--augment-shift", "0.3", "--no-metrics"])
    rows = pq.read_table(out / "results.parquet").to_pylist() if code == 0 else []
    return code, log, rows


def _files(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    return {o["uri"]: Path(o["uri"]).read_bytes() for r in rows for o in r["outputs"]}


@pytest.mark.slow
def test_each_night_new_variants_from_the_one_trained_model(
    tmp_path: Path, example_images: list[Path], local_ray: None, single_thread: None
) -> None:
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(p) for p in example_images[:2]]}), manifest)
    out = tmp_path / "out"

    code, log, night1 = _night(manifest, out, "2026-11-30")
    assert code == 0, log
    assert all(r["status"] == "ok" and r["train_seconds"] is not None for r in night1)
    for r in night1:
        variants = [o for o in r["outputs"] if o["variant"] is not None]
        assert [o["variant"] for o in variants] == [0, 1, 2]
        for o in r["outputs"]:
            shifts = (o["shift_left"], o["shift_right"])
            assert shifts != (0.0, 0.0)
            with Image.open(o["uri"]) as im:
                assert im.size == (o["width"], o["height"])
            assert torch.equal(_alpha(Path(o["uri"]).read_bytes()) == 255, retarget_mask((o["height"], o["width"]), shifts))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variant_outputs"] == 6 and summary["shaped_outputs"] == 8
    models = {p: p.read_bytes() for p in out.rglob("model.pt")}
    assert len(models) == 2
    first_files = _files(night1)

    code, log, night2 = _night(manifest, out, "2026-12-01")
    assert code == 0, log
    # Already trained: only retargeted, the models untouched.
    assert all(r["status"] == "ok" and r["train_seconds"] is None for r in night2)
    assert {p: p.read_bytes() for p in out.rglob("model.pt")} == models
    for r1, r2 in zip(night1, night2, strict=True):
        v1 = {(o["width"], o["height"], o["shift_left"], o["shift_right"]) for o in r1["outputs"] if o["variant"] is not None}
        v2 = {(o["width"], o["height"], o["shift_left"], o["shift_right"]) for o in r2["outputs"] if o["variant"] is not None}
        assert v1.isdisjoint(v2)

    # A rerun of the first night finds its outputs listed in the marker and skips.
    code, log, again = _night(manifest, out, "2026-11-30")
    assert code == 0, log
    assert all(r["status"] == "skipped" for r in again)
    assert [r["outputs"] for r in again] == [r["outputs"] for r in night1]
    assert _files(again) == first_files

    # The first night from scratch in another folder (trained again: the CPU trains
    # deterministically) gives the same variants, byte for byte.
    elsewhere = tmp_path / "elsewhere"
    code, log, fresh = _night(manifest, elsewhere, "2026-11-30")
    assert code == 0, log
    assert all(r["train_seconds"] is not None for r in fresh)
    assert list(_files(fresh).values()) == list(first_files.values())


def test_the_marker_keeps_earlier_outputs_of_the_same_model_only(tmp_path: Path, photo: Path, single_thread: None) -> None:
    out = tmp_path / "out"
    item = Item(0, "cat", str(photo), {})
    first = process(item, _job(out, ratios=[2.0], metrics=False))
    assert first["train_seconds"] is not None
    second = process(item, _job(out, ratios=[], shapes=["2@0.3,-0.3"], metrics=False))
    assert second["status"] == "ok" and second["train_seconds"] is None
    both = process(item, _job(out, ratios=[2.0], shapes=["2@0.3,-0.3"], metrics=False))
    assert both["status"] == "skipped"  # each target made by an earlier run of the same model
    assert [o["uri"] for o in both["outputs"]] == [first["outputs"][0]["uri"], second["outputs"][0]["uri"]]
    # Trained anew (its saved model gone): what earlier models made is no longer listed.
    (model,) = out.rglob("model.pt")
    model.unlink()
    third = process(item, _job(out, ratios=[], shapes=["1@0.2,-0.2"], metrics=False))
    assert third["train_seconds"] is not None
    marker = json.loads(next(out.rglob("done.json")).read_text())
    assert marker["targets"] == ["shape:1.0@0.2,-0.2"]


def test_a_shape_too_small_to_score_is_written_unscored(tmp_path: Path, photo: Path, single_thread: None) -> None:
    job = _job(tmp_path / "out", ratios=[], shapes=["8x8@0.6,-0.6", "64x40@0.3,0"])
    rec = process(Item(0, "cat", str(photo), {}), job)
    assert rec["status"] == "ok", rec
    small, large = rec["outputs"]
    assert small["beats_resize"] is None and small["swd"] is None and Path(small["uri"]).is_file()
    assert large["beats_resize"] is not None and large["swd"] is not None
