"""Tests for pipeline.results: rows stream to storage as they finish and end as one table in
manifest order, while the driver keeps only counts and the report's first records."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import record as _record

from pipeline.records import RESULT_SCHEMA_BASE
from pipeline.results import PARTS_DIR, ResultStream
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


def test_rows_reach_storage_while_the_run_goes_on_and_end_in_manifest_order(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path / "out"))
    stream = ResultStream(folder, CARRIED, keep=5, flush_rows=10, flush_s=3600)
    order = _shuffled(95)
    for k, i in enumerate(order[:40]):
        stream.add(i, _rec(i))
        if k == 39:
            # What a killed driver would leave: every flushed row, readable as one table.
            partial = pq.read_table(tmp_path / "out" / PARTS_DIR)
            assert sorted(partial.column("id").to_pylist()) == sorted(f"img-{i:04d}" for i in order[:40])
    for i in order[40:]:
        stream.add(i, _rec(i))
    uri = stream.finish()

    table = pq.read_table(uri)
    assert table.column("id").to_pylist() == [f"img-{i:04d}" for i in range(95)]
    assert table.column("label").to_pylist() == [f"L{i}" for i in range(95)]
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *CARRIED]))
    assert not (tmp_path / "out" / PARTS_DIR).exists()
    # Only the first records in manifest order are kept for the report, and the counts of all.
    assert [r["id"] for r in stream.first_records()] == [f"img-{i:04d}" for i in range(5)]
    counts = stream.tally.status_counts()
    assert counts["failed"] == sum(1 for i in range(95) if i % 7 == 3)
    assert counts["ok"] + counts["failed"] == stream.tally.total == 95
    assert len(stream.tally.total_seconds) == 95


def test_an_empty_run_writes_an_empty_table_with_the_schema(tmp_path: Path) -> None:
    stream = ResultStream(Folder(str(tmp_path)), CARRIED)
    table = pq.read_table(stream.finish())
    assert table.num_rows == 0
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *CARRIED]))


def test_parts_of_an_earlier_killed_run_do_not_leak_into_this_one(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    old = ResultStream(folder, CARRIED, flush_rows=1)
    old.add(0, _rec(500))  # flushed, then the driver dies
    assert (tmp_path / PARTS_DIR).exists()
    new = ResultStream(folder, CARRIED)
    new.add(0, _rec(0))
    assert pq.read_table(new.finish()).column("id").to_pylist() == ["img-0000"]


class _FlakyFolder(Folder):
    """Writes under results.parts fail while ``down`` is set."""

    down = False

    def write_bytes(self, rel: str, data: bytes) -> str:
        if self.down and rel.startswith(PARTS_DIR):
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
    assert pq.read_table(stream.finish()).column("id").to_pylist() == [f"img-{i:04d}" for i in range(9)]


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
    table = pq.read_table(stream.finish())
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
        "completeness: double", "coherence: double", "swd: double", "resize_completeness: double",
        "resize_coherence: double", "resize_swd: double", "beats_resize: bool"]  # fmt: skip
    assert RESULT_SCHEMA_BASE.names[5] == "outputs"
