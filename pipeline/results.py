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
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import report
from .storage import Folder, StorageError

PARTS_DIR = "results.parts"
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
        ``StorageError`` when storage fails, leaving the parts in place."""
        self.flush()
        if self._buffer:
            raise StorageError(f"cannot write result parts under {self.folder.uri(PARTS_DIR)}")
        tables = [pq.read_table(pa.BufferReader(self.folder.read_bytes(f"{PARTS_DIR}/{name}")))
                  for name in self.folder.list(PARTS_DIR)]
        if tables:
            table = pa.concat_tables(tables)
            table = table.take(pc.sort_indices(table.column(INDEX_COLUMN))).drop_columns([INDEX_COLUMN])
        else:
            table = report.results_table([], self.carried_schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        uri = self.folder.write_bytes(report.RESULTS_NAME, sink.getvalue().to_pybytes())
        with contextlib.suppress(StorageError):
            self.folder.remove(PARTS_DIR, recursive=True)
        return uri

    def unwritten_bytes(self) -> bytes:
        """The records no part holds yet, as a Parquet table (for a local copy when storage fails)."""
        return self._part_bytes()

    def _part_bytes(self) -> bytes:
        table = report.results_table([rec for _, rec in self._buffer], self.carried_schema)
        table = table.append_column(INDEX_COLUMN, pa.array([i for i, _ in self._buffer], pa.int64()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
