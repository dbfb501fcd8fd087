"""Finished records on their way to ``results.parquet``, with the driver's memory flat in the
manifest's length.

Records arrive in completion order. Each goes into a small buffer that is written as one Parquet
part under ``results.parts/`` every ``flush_rows`` records or ``flush_s`` seconds, so a killed
driver leaves its finished rows on storage (``pyarrow.parquet.read_table`` opens the folder as
one table). Beside the buffer only the run's ``Tally`` and the first ``keep`` records in manifest
order (the report's contact sheet) stay in memory. ``finish`` puts the parts together into one
``results.parquet`` in manifest order and removes them.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import report
from .storage import Folder, StorageError

PARTS_DIR = "results.parts"
_MERGE_ROWS = 1024  # rows per row group of the final table
_OPEN_PARTS = 16  # parts kept decoded while merging (completion order is nearly manifest order)
INDEX_COLUMN = "manifest_index"  # in the parts only: the final table is in manifest order


class ResultStream:
    def __init__(self, folder: Folder, carried_schema: pa.Schema | None, keep: int = 200,
                 flush_rows: int = 256, flush_s: float = 10.0) -> None:
        self.folder, self.carried_schema = folder, carried_schema
        self.keep, self.flush_rows, self.flush_s = keep, flush_rows, flush_s
        self.tally = report.Tally()
        self.failures: list[Mapping[str, Any]] = []  # the first few, for the log
        self._buffer: list[tuple[int, Mapping[str, Any]]] = []
        self._first: list[tuple[int, int, Mapping[str, Any]]] = []  # heap of (-index, seq, record)
        self._parts = 0
        self._last_flush = time.monotonic()
        # A part left by an earlier, killed run would mix its rows into this one's table.
        folder.remove(PARTS_DIR, recursive=True)

    def add(self, index: int, rec: Mapping[str, Any]) -> None:
        self.tally.add(rec)
        if rec.get("status") == "failed" and len(self.failures) < 20:
            self.failures.append(rec)
        if self.keep > 0:
            entry = (-index, self.tally.total, rec)
            if len(self._first) < self.keep:
                heapq.heappush(self._first, entry)
            elif index < -self._first[0][0]:
                heapq.heapreplace(self._first, entry)
        self._buffer.append((index, rec))
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one part. A part that cannot be written stays in the
        buffer for the next flush: storage trouble never loses a row the driver still holds."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        with contextlib.suppress(StorageError):
            self.folder.write_bytes(f"{PARTS_DIR}/part-{self._parts:06d}.parquet", self._part_bytes())
            self._parts += 1
            self._buffer.clear()

    def first_records(self) -> list[Mapping[str, Any]]:
        """The first ``keep`` records in manifest order."""
        return [rec for _, _, rec in sorted(self._first, key=lambda e: -e[0])]

    def finish(self) -> str:
        """Write ``results.parquet`` (manifest order) from the parts and return its URI; raises
        ``StorageError`` when storage fails, leaving the parts in place.

        Each part is sorted by manifest row when written, so the table is a k-way merge of the
        parts' row numbers, written ``_MERGE_ROWS`` rows at a time with at most ``_OPEN_PARTS``
        parts decoded at once: memory stays flat however many rows the run had."""
        self.flush()
        if self._buffer:
            raise StorageError(f"cannot write result parts under {self.folder.uri(PARTS_DIR)}")
        names = self.folder.list(PARTS_DIR)
        schema = pa.schema([*report.results_table([], self.carried_schema).schema])
        open_parts: OrderedDict[int, pa.Table] = OrderedDict()

        def part(k: int, columns: list[str] | None = None) -> pa.Table:
            if columns is not None:  # the row numbers only: not cached
                return pq.read_table(pa.BufferReader(self.folder.read_bytes(f"{PARTS_DIR}/{names[k]}")), columns=columns)
            if k not in open_parts:
                if len(open_parts) >= _OPEN_PARTS:
                    open_parts.popitem(last=False)
                open_parts[k] = pq.read_table(pa.BufferReader(self.folder.read_bytes(f"{PARTS_DIR}/{names[k]}")))
            open_parts.move_to_end(k)
            return open_parts[k]

        def run(k: int) -> list[tuple[int, int, int]]:
            return [(index, k, row) for row, index in enumerate(part(k, [INDEX_COLUMN]).column(0).to_pylist())]

        runs = [run(k) for k in range(len(names))]
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, schema) as writer:
            chunk: list[tuple[int, int, int]] = []
            for entry in heapq.merge(*runs):
                chunk.append(entry)
                if len(chunk) == _MERGE_ROWS:
                    writer.write_table(self._rows(chunk, part, schema))
                    chunk = []
            writer.write_table(self._rows(chunk, part, schema))
        uri = self.folder.write_bytes(report.RESULTS_NAME, sink.getvalue().to_pybytes())
        with contextlib.suppress(StorageError):
            self.folder.remove(PARTS_DIR, recursive=True)
        return uri

    @staticmethod
    def _rows(chunk: list[tuple[int, int, int]], part: Any, schema: pa.Schema) -> pa.Table:
        """The rows named by (index, part, row), in that order, as one table."""
        if not chunk:
            return schema.empty_table()
        parts = list(dict.fromkeys(k for _, k, _ in chunk))
        pieces = [part(k).take([row for _, kk, row in chunk if kk == k]).drop_columns([INDEX_COLUMN]) for k in parts]
        # The pieces come part by part: put the rows back in the chunk's (manifest) order.
        concat_order = [i for k in parts for i, (_, kk, _) in enumerate(chunk) if kk == k]
        where = [0] * len(chunk)
        for row, i in enumerate(concat_order):
            where[i] = row
        return pa.concat_tables(pieces).take(where)

    def unwritten_bytes(self) -> bytes:
        """The records no part holds yet, as a Parquet table (for a local copy when storage fails)."""
        return self._part_bytes()

    def _part_bytes(self) -> bytes:
        rows = sorted(self._buffer, key=lambda e: e[0])  # sorted parts: finish merges them
        table = report.results_table([rec for _, rec in rows], self.carried_schema)
        table = table.append_column(INDEX_COLUMN, pa.array([i for i, _ in rows], pa.int64()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
