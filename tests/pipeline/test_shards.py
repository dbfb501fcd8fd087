"""Outputs as dataset shards (``pipeline.shards``): what a shard holds and how real readers (the
``webdataset`` library, Ray Data) read it back, the bounds, a night's index that never lists a
sample twice (two writers at once, reruns), dead runs' leftovers, which outputs go in; then whole
runs: a night, its rerun and the next night locally; two overlapping runs of one night on the S3
server (moto on loopback), with the summary and report of their merged table; and a driver
SIGKILLed half way through writing a shard, then the rerun."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from support import (
    REPO,
    parquet_bytes,
    photo_sources,
    run_main,
    s3_config,
    session_members,
    wait_for,
)

from pipeline import layout, shards
from pipeline.config import ConfigError, load_config
from pipeline.records import Item
from pipeline.storage import Folder, Storage

NIGHT = "2026-12-07"
# Ray Data warns of its own deprecated settings when it starts.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY = ["--preset", "tiny", "--iterations", "5", "--no-metrics", "--max-in-flight", "2"]
# One configured ratio and two augmentation variants per image: three outputs, three samples.
NIGHTLY = ["--ratios", "2", "--augment", "2", "--shards", "webdataset"]


def _sample(key: str, size: int = 100, mask: bool = False) -> shards.Sample:
    image = bytes([len(key) % 251]) * size
    record = {"key": key, "id": key.split("-")[0], "target": "ratio:2.0", "width": 20, "height": 10}
    return shards.Sample(key, "jpg" if mask else "png", image, b"frame" if mask else None, record)


def _writer(folder: Folder, run_id: str, form: str = "webdataset", **kw: Any) -> shards.ShardWriter:
    settings: dict[str, Any] = {"max_samples": 3, "max_bytes": 2**20, "lock_wait_s": 30, "stale_after_s": 600,
                                "carried": None, **kw}
    return shards.ShardWriter(folder, NIGHT, form, run_id, **settings)


def _night_files(folder: Folder, night: str = NIGHT) -> list[str]:
    return folder.list(layout.night_path(night))


@contextlib.contextmanager
def _opened(folder: Folder, night: str, name: str) -> Iterator[Any]:
    with folder.fs.open(folder.path(layout.night_path(night, name)), "rb") as f:
        yield f


def read_webdataset(folder: Folder, night: str) -> list[dict[str, Any]]:
    """Every sample of the night's indexed shards, in order, as the ``webdataset`` library reads
    them (its tar reader and its grouping by key), from streams of the folder's filesystem."""
    index = folder.read_json(layout.night_path(night, layout.SHARD_INDEX))
    out = []
    for entry in index["shardlist"]:
        with _opened(folder, night, entry["url"]) as f:
            got = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"stream": f, "url": entry["url"]}])))
        assert len(got) == entry["nsamples"], entry
        out += got
    return out


_RAY_READ = """
import json, sys
import ray, ray.data
from pyarrow import fs

paths, s3 = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
filesystem = None
if s3 is not None:
    filesystem = fs.S3FileSystem(access_key=s3["key"], secret_key=s3["secret"], region="us-east-1",
                                 endpoint_override=s3["client_kwargs"]["endpoint_url"].removeprefix("http://"),
                                 scheme="http")
rows = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None).take_all()
print(json.dumps([row["__key__"] for row in rows]))
"""


def read_ray(folder: Folder, night: str, s3: dict[str, Any] | None = None) -> list[str]:
    """The key of every sample of the night's indexed shards as Ray Data reads them
    (``read_webdataset``). In a process of its own with a Ray of its own: Ray Data schedules its
    read tasks on whatever Ray this process last joined, which earlier tests leave in any state."""
    index = folder.read_json(layout.night_path(night, layout.SHARD_INDEX))
    paths = [folder.path(layout.night_path(night, e['url'])) for e in index["shardlist"]]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", _RAY_READ, json.dumps([paths, s3])], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- shards alone


def test_a_shard_reads_back_with_webdataset_and_its_records_locate_each_image(tmp_path: Path) -> None:
    samples = [_sample("a-1"), _sample("b-2", 700, mask=True), _sample("c-3", 1)]
    objects = shards.encode(list(samples), "webdataset", None)
    (tmp_path / "s.tar").write_bytes(objects["tar"])
    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["a-1", "b-2", "c-3"]
    assert sorted(got[1]) == ["__key__", "__local_path__", "__url__", "jpg", "json", "mask.png"]
    for s, want in zip(got, samples, strict=True):
        assert s[want.ext] == want.image and json.loads(s["json"]) == want.record
    # The records beside the tar say where each image lies in it: one ranged read fetches it.
    rows = pq.read_table(io.BytesIO(objects[layout.SHARD_RECORDS_EXT])).to_pylist()
    assert [r["key"] for r in rows] == ["a-1", "b-2", "c-3"]
    for r, want in zip(rows, samples, strict=True):
        assert objects["tar"][r["offset"]:r["offset"] + r["size"]] == want.image
    # The Parquet form: one file, the records with the image bytes.
    table = pq.read_table(io.BytesIO(shards.encode(list(samples), "parquet", None)[layout.SHARD_RECORDS_EXT]))
    assert table.column("image").to_pylist() == [s.image for s in samples]
    assert table.column("mask").to_pylist() == [None, b"frame", None]


def test_shards_are_bounded_by_samples_and_bytes(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    writer = _writer(folder, "run-a", max_samples=3, max_bytes=1000)
    writer.add([_sample(f"s{i}-x") for i in range(7)])  # 100 bytes each: two whole shards as they come
    assert writer.stats.shards == 2
    writer.add([_sample("big-x", 5000), _sample("after-x")])  # a sample over the bound is a shard alone
    assert writer.flush()
    index = folder.read_json(layout.night_path(NIGHT, layout.SHARD_INDEX))
    assert [e["nsamples"] for e in index["shardlist"]] == [3, 3, 1, 1, 1]
    assert [e["url"] for e in index["shardlist"]] == [f"run-a-{n:05d}.tar" for n in range(5)]
    assert (index["format"], shards.index_samples(index)) == ("webdataset", 9)


def test_two_writers_of_one_night_never_index_a_sample_twice(folder: Folder) -> None:
    """Two runs of one night with samples in common, committing in turn: the second's samples the
    first committed are dropped, under the night's lock; a run starting after both finds every
    sample committed, and the night's shards hold each once."""
    a, b = _writer(folder, "run-a"), _writer(folder, "run-b")
    a.add([_sample(f"k{i}-x") for i in range(5)])  # a whole shard committed as it goes: k0..k2
    b.add([_sample(f"k{i}-x") for i in range(3, 9)])  # two: k3..k8
    assert a.flush() and b.flush()  # a's last, k3 and k4, are b's already: dropped
    keys = [s["__key__"] for s in read_webdataset(folder, NIGHT)]
    assert sorted(keys) == [f"k{i}-x" for i in range(9)]
    assert (a.stats.samples, a.stats.duplicates, b.stats.samples, a.stats.shards) == (3, 2, 6, 1)
    later = _writer(folder, "run-c")
    item = later.shard_done(Item(0, "img", "/img.png", {}), "tag", ["ratio:2.0", "variant:x:0"])
    assert item.shard_done == frozenset()  # none of its keys are in the night
    later.add([_sample("k0-x"), _sample("new-x")])
    assert later.flush() and later.stats.duplicates == 1 and later.stats.night_samples == 10


def test_a_dead_runs_unindexed_shard_is_removed_and_a_live_runs_kept(folder: Folder) -> None:
    writer = _writer(folder, "done-run")
    writer.add([_sample("a-x")])
    assert writer.flush()
    night = layout.night_path(NIGHT)
    for name in ("dead-run-00000.tar", "dead-run-00000.parquet", "live-run-00003.tar"):
        folder.write_bytes(f"{night}/{name}", b"a shard whose index entry was never written")
    folder.write_json(layout.heartbeat_path("live-run"), {"heartbeat": time.time()})
    again = _writer(folder, "new-run")
    assert sorted(again.removed) == [f"{night}/dead-run-00000.parquet", f"{night}/dead-run-00000.tar"]
    assert _night_files(folder) == ["done-run-00000.parquet", "done-run-00000.tar", "index.json",
                                    "live-run-00003.tar"]


def test_a_night_keeps_one_form(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    writer = _writer(folder, "run-a")
    writer.add([_sample("a-x")])
    assert writer.flush()
    with pytest.raises(shards.ShardError, match="holds webdataset shards"):
        _writer(folder, "run-b", form="parquet")


def test_which_outputs_go_in_and_which_are_made_again() -> None:
    """A new output goes in if kept (``keep: verdict``: if it beats the resize); one made on an
    earlier night, or without shards, keeps what it had; one of this night the index holds is not
    added again, one it does not hold is (a killed run's), and its image is then not skipped."""
    item = Item(0, "img", "/img.png", {}, frozenset({layout.sample_key("img", "t", "ratio:1.0")}))

    def out(target: str, verdict: bool | None = None) -> dict[str, Any]:
        return {"target": target, "beats_resize": verdict}

    outputs = [out("ratio:1.0", True), out("ratio:2.0", False), out("variant:n2:0", True), out("variant:n2:1", False)]
    earlier = {"ratio:2.0": {"target": "ratio:2.0", "shard_key": "old", "shard_night": "n1"}}
    added = shards.mark(outputs, earlier, item, "t", "n2", "verdict")
    assert added == [2]  # ratio:1.0 is in the night already; ratio:2.0 was made on n1; variant 1 loses
    assert [(o["shard_key"] is not None, o["shard_night"]) for o in outputs] == [
        (True, "n2"), (True, "n1"), (True, "n2"), (False, "n2")]
    assert shards.mark([out("ratio:1.0")], {}, item, "t", None, "all") == []  # shards off
    done = [dict(outputs[0]), dict(outputs[2])]
    assert shards.pending(done, {"ratio:1.0", "variant:n2:0"}, "n2", item.shard_done)
    assert not shards.pending(done, {"ratio:1.0"}, "n2", item.shard_done)
    assert not shards.pending(done, {"ratio:1.0", "variant:n2:0"}, "n3", item.shard_done)


def test_shard_settings_are_checked() -> None:
    cfg = load_config(None, {"shards": "webdataset", "files": False, "augment_salt": "2026-12-07"})
    assert cfg.resolve_night(0) == "2026-12-07"
    unsafe = load_config(None, {"night": "a night/../x"}).resolve_night(0)
    assert unsafe.startswith("a_night_") and "/" not in unsafe
    assert load_config(None, {}).resolve_night(86400 * 365) == "1971-01-01"
    with pytest.raises(ConfigError, match="files: false"):
        load_config(None, {"files": False})
    with pytest.raises(ConfigError, match="keep: verdict"):
        load_config(None, {"keep": "verdict", "shards": "webdataset", "metrics": False})


# --------------------------------------------------------------------------- whole runs


def _manifest(tmp_path: Path, names: tuple[str, ...], name: str = "manifest.parquet") -> Path:
    sources = photo_sources(tmp_path / "images", names, 40)
    path = tmp_path / name
    path.write_bytes(parquet_bytes(pa.table({"uri": [str(s.path) for s in sources], "id": [s.id for s in sources]})))
    return path


def _rows(folder: Folder) -> list[dict[str, Any]]:
    return pq.read_table(pa.BufferReader(folder.read_bytes(layout.RESULTS_NAME))).to_pylist()


def _expected(rows: list[dict[str, Any]], night: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each output of the table that is in ``night``'s shards, by its sample key, with its row."""
    return {o["shard_key"]: (r, o) for r in rows for o in r["outputs"] if o["shard_key"] and o["shard_night"] == night}


def _check_night(folder: Folder, night: str, rows: list[dict[str, Any]], s3: dict[str, Any] | None = None) -> None:
    """Every output the table puts in the night's shards is there once, with its record, read by
    both readers; nothing else is; and no shard object lies outside the index."""
    expected = _expected(rows, night)
    got = read_webdataset(folder, night)
    assert Counter(s["__key__"] for s in got) == Counter(list(expected))
    for s in got:
        row, o = expected[s["__key__"]]
        record = json.loads(s["json"])
        assert {k: record[k] for k in ("id", "target", "width", "height", "variant", "scale", "night")} == \
            {"id": row["id"], **{k: o[k] for k in ("target", "width", "height", "variant", "scale")}, "night": night}
        if o["uri"]:  # files on: the sample is the output file's bytes
            assert s[record["ext"]] == folder.read_bytes(folder.rel_of(o["uri"]))
    assert Counter(read_ray(folder, night, s3)) == Counter(list(expected))
    index = folder.read_json(layout.night_path(night, layout.SHARD_INDEX))
    listed = {n for e in index["shardlist"] for n in (e["url"], e["records"])}
    assert set(_night_files(folder, night)) == listed | {"index.json"}


@pytest.mark.slow
def test_a_night_its_rerun_and_the_next_night(local_ray: None, tmp_path: Path) -> None:
    """Three samples per image in shards of at most two; the same night again adds nothing and
    writes no shard; the next night (another salt: new variants) adds the new variants' samples
    only, not again the configured ratio's, made the night before."""
    manifest, out = _manifest(tmp_path, ("brick.png", "chelsea.png")), tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("shard_max_samples: 2\n")
    argv = [str(manifest), "--output", str(out), "--config", str(config), *TINY, *NIGHTLY]
    code, log = run_main([*argv, "--augment-salt", NIGHT])
    assert code == 0, log
    folder = Folder(str(out))
    rows = _rows(folder)
    assert len(_expected(rows, NIGHT)) == 6
    _check_night(folder, NIGHT, rows)
    index = folder.read_json(layout.night_path(NIGHT, layout.SHARD_INDEX))
    assert sorted(e["nsamples"] for e in index["shardlist"]) == [1, 1, 2, 2] or \
        sorted(e["nsamples"] for e in index["shardlist"]) == [2, 2, 2]
    summary = json.loads((out / layout.SUMMARY_NAME).read_text())
    assert summary["shards"]["outputs_in_shards"] == summary["shards"]["samples"] == 6

    code, log = run_main([*argv, "--augment-salt", NIGHT])
    assert code == 0, log
    assert {r["status"] for r in _rows(folder)} == {"skipped"}
    assert folder.read_json(layout.night_path(NIGHT, layout.SHARD_INDEX)) == index

    code, log = run_main([*argv, "--augment-salt", "2026-12-08"])
    assert code == 0, log
    rows = _rows(folder)
    assert {(r["status"], r["train_seconds"]) for r in rows} == {("ok", None)}  # retargeted, not trained
    assert sorted(o["target"].split(":")[0] for _, o in _expected(rows, "2026-12-08").values()) == ["variant"] * 4
    _check_night(folder, "2026-12-08", rows)
    assert folder.read_json(layout.night_path(NIGHT, layout.SHARD_INDEX)) == index


@pytest.mark.slow
def test_two_overlapping_runs_of_one_night_on_s3(local_ray: None, tmp_path: Path, s3_bucket: str, s3_endpoint: str,
                                                 s3_storage_options: dict[str, Any]) -> None:
    """Two runs of one night started at once into one S3 output, their manifests sharing two of
    their three images, outputs in the shards only: each sample is in the night once, whichever
    run made it, read back by both readers; the summary and report tell the merged table, every
    row, and which run wrote which."""
    a = _manifest(tmp_path, ("brick.png", "chelsea.png", "coffee.png"), "a.parquet")
    b = _manifest(tmp_path, ("chelsea.png", "coffee.png", "grass.png"), "b.parquet")
    config = s3_config(tmp_path / "run.yaml", "testing", "testing", s3_endpoint)
    config.write_text(config.read_text() + "shard_max_samples: 2\n")
    out = f"s3://{s3_bucket}/out"
    argv = ["--output", out, "--config", str(config), *TINY, *NIGHTLY, "--augment-salt", NIGHT, "--no-files"]
    procs = {}
    for name, manifest in (("a", a), ("b", b)):
        with (tmp_path / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen([sys.executable, str(REPO / "run.py"), str(manifest), *argv], cwd=tmp_path,
                                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": "local"})
    codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    assert codes == {"a": 0, "b": 0}, {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in procs}

    folder = Folder(out, Storage(s3_storage_options))
    rows = _rows(folder)
    assert sorted(r["id"] for r in rows) == ["brick", "chelsea", "coffee", "grass"]
    assert all(o["uri"] is None for r in rows for o in r["outputs"])
    _check_night(folder, NIGHT, rows, s3_storage_options)
    assert len(_expected(rows, NIGHT)) == 12
    summary = json.loads(folder.read_text(layout.SUMMARY_NAME))
    # Which run trained an image and which skipped it depends on which reached it first.
    counts = summary["status_counts"]
    assert summary["total"] == 4 and counts["failed"] == 0 and counts["ok"] + counts["skipped"] == 4, counts
    assert len(summary["runs"]) == 2 and sum(r["rows"] for r in summary["runs"]) == 4
    report = folder.read_text(layout.REPORT_NAME)
    assert all(r["run"] in report for r in summary["runs"])
    assert report.count('class="row ok"') == counts["ok"] and report.count('class="row skipped"') == counts["skipped"]
    # No output files: the sheet says where each output is.
    assert report.count("in the shards only") == sum(len(r["outputs"]) for r in rows) == 12


@pytest.mark.slow
def test_a_driver_killed_while_writing_a_shard_loses_no_sample_after_the_rerun(local_ray: None,
                                                                                tmp_path: Path) -> None:
    """The driver (``tests/shard_crash.py``) SIGKILLs itself half way through writing its second
    shard: the first is in the index, the torn bytes lie under a temporary name only, never under
    a shard's. The rerun of the night, once the killed run is dead, removes them, remakes the
    samples of both images that no shard holds (retargeting from the saved models, no training),
    and the night then holds every sample once."""
    manifest, out = _manifest(tmp_path, ("brick.png", "chelsea.png")), tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("shard_max_samples: 2\nheartbeat_s: 1\nstale_after_s: 2\n")
    argv = [str(manifest), "--output", str(out), "--config", str(config), *TINY, *NIGHTLY, "--augment-salt", NIGHT]
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "shard_crash.py"), *argv], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": "local"},
                                start_new_session=True)
    try:
        assert proc.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        _kill_session(proc.pid)
    folder = Folder(str(out))
    night = out / layout.night_path(NIGHT)
    index = folder.read_json(layout.night_path(NIGHT, layout.SHARD_INDEX))
    assert [e["nsamples"] for e in index["shardlist"]] == [2]
    torn = [p for p in night.iterdir() if ".tar.part-" in p.name]
    assert len(torn) == 1 and not list(night.glob("*-00001.tar"))
    (beat,) = (out / layout.RUNS_DIR).iterdir()  # the killed run's, left behind
    wait_for(lambda: time.time() - json.loads(beat.read_text())["heartbeat"] > 2.5, "the killed run's heartbeat stale")

    code, log = run_main(argv)
    assert code == 0, log
    rows = _rows(folder)
    assert {(r["status"], r["train_seconds"]) for r in rows} == {("ok", None)}
    _check_night(folder, NIGHT, rows)
    assert len(_expected(rows, NIGHT)) == 6
    assert not torn[0].exists()


def _kill_session(sid: int) -> None:
    """Every process left in the session (the killed driver's Ray), as a crash leaves them."""

    def gone() -> bool:
        for pid, _ in session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not session_members(sid)

    wait_for(gone, "the end of the killed driver's processes")
