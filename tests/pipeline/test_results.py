"""Tests for pipeline.results: rows stream to storage as they finish and end as one table in
manifest order, while the driver keeps only counts and the report's first records; two runs
writing into one folder keep each other's parts and rows."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import record as _record

from pipeline import layout
from pipeline.records import RESULT_SCHEMA_BASE
from pipeline.results import RUNS_KEY, ResultStream
from pipeline.storage import Folder, StorageError


def _shuffled(n: int, seed: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _rec(i: int) -> dict:
    status = "failed" if i % 7 == 3 else "ok"
    return _record(f"img-{i:04d}", status, error_kind="decode" if status == "failed" else None,
                   total_seconds=float(i), carried={"label": f"L{i}"})


CARRIED = pa.schema([("label", pa.string())])


def _segments(uri: str) -> list[tuple[str, int]]:
    """(run id, rows) of each run's rows in a results table, in row order."""
    return [(s["run"], s["rows"]) for s in json.loads(pq.ParquetFile(uri).metadata.metadata[RUNS_KEY])]


def _ids(uri: str) -> list[str]:
    return pq.read_table(uri).column("id").to_pylist()


def test_rows_reach_storage_while_the_run_goes_on_and_end_in_manifest_order(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path / "out"))
    stream = ResultStream(folder, CARRIED, flush_rows=10, flush_s=3600)
    order = _shuffled(95)
    for k, i in enumerate(order[:40]):
        stream.add(i, _rec(i))
        if k == 39:
            # What a killed driver would leave: every flushed row, readable as one table.
            partial = pq.read_table(tmp_path / "out" / stream.parts_dir)
            assert sorted(partial.column("id").to_pylist()) == sorted(f"img-{i:04d}" for i in order[:40])
    for i in order[40:]:
        stream.add(i, _rec(i))
    done = stream.finish()

    table = pq.read_table(done.uri)
    assert (done.rows, done.kept, done.missing, done.aside) == (95, 0, 0, None)
    assert table.column("id").to_pylist() == [f"img-{i:04d}" for i in range(95)]
    assert table.column("label").to_pylist() == [f"L{i}" for i in range(95)]
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *CARRIED]))
    assert not (tmp_path / "out" / stream.parts_dir).exists()
    assert stream.parts_dir == f"{layout.PARTS_DIR}/{stream.run_id}"
    assert _segments(done.uri) == [(stream.run_id, 95)]
    # The driver keeps the counts of all, not the records.
    counts = stream.tally.status_counts()
    assert counts["failed"] == sum(1 for i in range(95) if i % 7 == 3)
    assert counts["ok"] + counts["failed"] == stream.tally.total == 95
    assert len(stream.tally.total_seconds) == 95


def test_an_empty_run_writes_an_empty_table_with_the_schema(tmp_path: Path) -> None:
    stream = ResultStream(Folder(str(tmp_path)), CARRIED)
    table = pq.read_table(stream.finish().uri)
    assert table.num_rows == 0
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *CARRIED]))


def test_parts_of_an_earlier_killed_run_do_not_leak_into_this_one(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    old = ResultStream(folder, CARRIED, flush_rows=1)
    old.add(0, _rec(500))  # flushed, then the driver dies
    assert (tmp_path / old.parts_dir).exists()
    new = ResultStream(folder, CARRIED)
    new.add(0, _rec(0))
    assert pq.read_table(new.finish().uri).column("id").to_pylist() == ["img-0000"]
    # Another run's parts are never this stream's to remove: a dead run's go at the next start
    # (runs.remove_dead), a live run's stay.
    assert pq.read_table(tmp_path / old.parts_dir).column("id").to_pylist() == ["img-0500"]


class _FlakyFolder(Folder):
    """Writes under results.parts fail while ``down`` is set."""

    down = False

    def write_bytes(self, rel: str, data: bytes) -> str:
        if self.down and rel.startswith(layout.PARTS_DIR):
            raise StorageError(f"write {rel}: injected")
        return super().write_bytes(rel, data)


def test_a_failed_part_write_keeps_its_rows_for_the_next(tmp_path: Path) -> None:
    folder = _FlakyFolder(str(tmp_path))
    stream = ResultStream(folder, CARRIED, flush_rows=4)
    folder.down = True
    for i in range(6):
        stream.add(i, _rec(i))  # the flush at 4 fails: nothing is lost
    with pytest.raises(StorageError):
        stream.finish()
    assert pq.read_table(pa.BufferReader(stream.unwritten_bytes())).num_rows == 6
    folder.down = False
    for i in range(6, 9):
        stream.add(i, _rec(i))
    assert pq.read_table(stream.finish().uri).column("id").to_pylist() == [f"img-{i:04d}" for i in range(9)]


def test_the_merge_keeps_manifest_order_across_chunks_and_evicted_parts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Small merge chunks and only two decoded parts at a time: rows finishing far out of order
    still end in manifest order."""
    from pipeline import results

    monkeypatch.setattr(results, "_MERGE_ROWS", 7)
    monkeypatch.setattr(results, "_OPEN_PARTS", 2)
    stream = ResultStream(Folder(str(tmp_path)), CARRIED, flush_rows=5, flush_s=3600)
    for i in _shuffled(83, seed=3):
        stream.add(i, _rec(i))
    table = pq.read_table(stream.finish().uri)
    assert table.column("id").to_pylist() == [f"img-{i:04d}" for i in range(83)]
    assert table.column("label").to_pylist() == [f"L{i}" for i in range(83)]


def test_the_stored_schema_is_pinned() -> None:
    # The table's schema is derived from the record TypedDicts: readers of results.parquet rely
    # on these names, types and this order, whatever the derivation does.
    assert [f"{f.name}: {f.type}" for f in RESULT_SCHEMA_BASE.remove(5)] == [
        "id: string", "uri: string", "status: string", "error: string", "error_kind: string",
        "train_seconds: double", "total_seconds: double", "attempts: int32", "model_uri: string",
        "source_width: int32", "source_height: int32"]  # fmt: skip
    outputs = RESULT_SCHEMA_BASE.field("outputs").type.value_type
    assert [f"{f.name}: {f.type}" for f in outputs] == [
        "width: int32", "height: int32", "ratio: double", "uri: string", "target: string",
        "shift_left: double", "shift_right: double", "mask_uri: string", "variant: int32", "scale: double",
        "completeness: double", "coherence: double", "swd: double", "stretch: double", "resize_completeness: double",
        "resize_coherence: double", "resize_swd: double", "beats_resize: bool", "shard_key: string",
        "shard_night: string"]  # fmt: skip
    assert RESULT_SCHEMA_BASE.names[5] == "outputs"


# --------------------------------------------------------------------------- two runs, one folder


def _stream(folder: Folder, run: str, started: float, **kw: object) -> ResultStream:
    return ResultStream(folder, CARRIED, run_id=run, started=started, flush_rows=1, flush_s=3600, **kw)


def test_two_streams_in_one_folder_keep_each_others_parts_and_rows(tmp_path: Path) -> None:
    """Two shards into one output at once, their flushes interleaved: neither touches the other's
    parts, and the second to finish keeps the first's rows beside its own."""
    folder = Folder(str(tmp_path))
    now = time.time()
    a, b = _stream(folder, "run-a", now - 10), _stream(folder, "run-b", now - 5)
    for i in range(6):  # one part per record, the two runs taking turns
        a.add(i, _rec(i))
        b.add(i, _rec(100 + i))
    assert len(list((tmp_path / a.parts_dir).glob("part-*.parquet"))) == 6
    assert len(list((tmp_path / b.parts_dir).glob("part-*.parquet"))) == 6

    first = a.finish(overlapped={"run-b"})
    assert _ids(first.uri) == [f"img-{i:04d}" for i in range(6)]
    assert not (tmp_path / a.parts_dir).exists()
    # b's parts are whole after a's finish: every row it flushed is still there.
    assert sorted(pq.read_table(tmp_path / b.parts_dir).column("id").to_pylist()) == [f"img-{100 + i:04d}" for i in range(6)]

    second = b.finish(overlapped={"run-a"})
    assert (second.rows, second.kept, second.missing, second.aside) == (6, 6, 0, None)
    table = pq.read_table(second.uri)
    # In the runs' start order, each run's rows in its manifest order.
    assert table.column("id").to_pylist() == [f"img-{i:04d}" for i in [*range(6), *range(100, 106)]]
    assert table.column("label").to_pylist() == [f"L{i}" for i in [*range(6), *range(100, 106)]]
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *CARRIED]))  # no column of our own
    assert _segments(second.uri) == [("run-a", 6), ("run-b", 6)]
    assert not (tmp_path / layout.PARTS_DIR).exists() or not any((tmp_path / layout.PARTS_DIR).iterdir())


def test_the_same_manifest_twice_lists_every_row_once(tmp_path: Path) -> None:
    """The same command twice at once: the rows of the run finishing last stand for each id (it
    saw the other's finished images as skipped), never two rows of one image."""
    folder = Folder(str(tmp_path))
    now = time.time()
    a, b = _stream(folder, "run-a", now - 10), _stream(folder, "run-b", now - 5)
    for i in range(8):
        a.add(i, _rec(i))
        b.add(i, _record(f"img-{i:04d}", "skipped", carried={"label": f"L{i}"}) if i < 5 else _rec(i))
    a.finish(overlapped={"run-b"})
    done = b.finish(overlapped={"run-a"})
    assert done.kept == 0
    rows = pq.read_table(done.uri).to_pylist()
    assert [r["id"] for r in rows] == [f"img-{i:04d}" for i in range(8)]
    assert [r["status"] for r in rows][:5] == ["skipped"] * 5
    assert _segments(done.uri) == [("run-b", 8)]


def test_the_rows_of_an_earlier_batch_are_replaced(tmp_path: Path) -> None:
    """A run that ended before this one started, and that it never saw live, is an earlier
    night's: its rows are replaced, as by a rerun."""
    folder = Folder(str(tmp_path))
    earlier = _stream(folder, "run-a", time.time() - 100)
    earlier.add(0, _rec(0))
    earlier.finish()
    later = _stream(folder, "run-b", time.time() + 1)
    later.add(0, _rec(1))
    done = later.finish()
    assert (_ids(done.uri), done.kept) == (["img-0001"], 0)


def test_shards_started_one_after_another_are_one_batch(tmp_path: Path) -> None:
    """a, b and c each overlap the next, c never met a: c keeps a's rows too, through b."""
    folder = Folder(str(tmp_path))
    now = time.time()
    a = _stream(folder, "run-a", now - 30)
    a.add(0, _rec(0))
    a.finish()  # finishes at `now`
    b = _stream(folder, "run-b", now - 20)
    b.add(0, _rec(1))
    b.finish(overlapped={"run-a"})
    c = _stream(folder, "run-c", now + 1)  # started after a ended, while b lived
    c.add(0, _rec(2))
    done = c.finish(overlapped={"run-b"})
    assert _ids(done.uri) == ["img-0000", "img-0001", "img-0002"]
    assert _segments(done.uri) == [("run-a", 1), ("run-b", 1), ("run-c", 1)]


def test_a_held_lock_sends_the_rows_aside_not_away(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    first = _stream(folder, "run-a", time.time() - 10)
    first.add(0, _rec(0))
    before = first.finish().uri
    held = b'{"run_id": "someone else"}'
    assert folder.create_exclusive(layout.RESULTS_LOCK, held)
    stream = _stream(folder, "run-b", time.time() - 5)
    for i in range(3):
        stream.add(i, _rec(10 + i))
    t0 = time.monotonic()
    done = stream.finish(overlapped={"run-a"}, lock_wait_s=0.3)
    assert time.monotonic() - t0 < 5
    assert done.aside and "held by another run" in done.aside
    assert done.uri == str(tmp_path / layout.side_results_path("run-b"))
    assert _ids(done.uri) == ["img-0010", "img-0011", "img-0012"]
    assert _ids(before) == ["img-0000"]  # left as it was
    assert (tmp_path / layout.RESULTS_LOCK).read_bytes() == held  # the holder's lock is not ours to remove
    assert not (tmp_path / stream.parts_dir).exists()


def test_a_crashed_holder_s_lock_is_broken(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    assert folder.create_exclusive(layout.RESULTS_LOCK, b"")  # a holder killed before it wrote a byte
    old = time.time() - 120
    os.utime(tmp_path / layout.RESULTS_LOCK, (old, old))
    stream = _stream(folder, "run-a", time.time())
    stream.add(0, _rec(0))
    done = stream.finish(lock_wait_s=0, stale_after_s=60)
    assert done.aside is None and _ids(done.uri) == ["img-0000"]
    assert not (tmp_path / layout.RESULTS_LOCK).exists()  # released


def test_rows_whose_parts_were_removed_are_counted_missing(tmp_path: Path) -> None:
    """A run taken for dead (no heartbeat for stale_after_s) loses its parts to the next run's
    tidying: its finish says how many rows are not in its table."""
    folder = Folder(str(tmp_path))
    stream = _stream(folder, "run-a", time.time())
    for i in range(5):
        stream.add(i, _rec(i))
    for part in sorted((tmp_path / stream.parts_dir).iterdir())[:2]:
        part.unlink()
    done = stream.finish()
    assert (done.rows, done.missing) == (3, 2)


def test_clashing_columns_send_the_rows_aside(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    other = ResultStream(folder, pa.schema([("label", pa.int64())]), run_id="run-a", started=time.time() - 10)
    other.add(0, _record("x", carried={"label": 7}))
    other.finish()
    stream = _stream(folder, "run-b", time.time() - 5)
    stream.add(0, _rec(0))
    done = stream.finish(overlapped={"run-a"})
    assert done.aside and "cannot take them" in done.aside
    assert _ids(str(tmp_path / "results.parquet")) == ["x"]
    assert _ids(done.uri) == ["img-0000"]


def test_a_table_that_names_no_runs_is_replaced(tmp_path: Path) -> None:
    """results.parquet of an earlier version (no run metadata): no run to keep rows of."""
    pq.write_table(pa.table({"id": ["old"]}), tmp_path / "results.parquet")
    stream = _stream(Folder(str(tmp_path)), "run-a", time.time())
    stream.add(0, _rec(0))
    assert _ids(stream.finish(overlapped={"whoever"}).uri) == ["img-0000"]
