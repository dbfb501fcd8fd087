"""Finished records on their way to ``results.parquet``, with the driver's memory flat in the
manifest's length, and beside the rows of other runs writing into the same output.

Records arrive in completion order. Each goes into a small buffer that is written as one Parquet
part under ``results.parts/{run_id}/`` every ``flush_rows`` records or ``flush_s`` seconds, so a
killed driver leaves its finished rows on storage (``pyarrow.parquet.read_table`` opens the folder
as one table). Beside the buffer only the run's ``Tally`` stays in memory. ``finish`` puts this
run's parts together in manifest order and, under ``results.lock``, writes them as
``results.parquet`` with the rows the current one holds of runs that overlapped this one (shards
of one batch, written into one output at once), hands that table to what describes it (summary,
report: ``describe`` reads it back a batch at a time), then removes this run's parts, and only
these.

Which run wrote which rows is in the table's key-value metadata (``RUNS_KEY``), not in a column:
a list of segments, one per run in row order, with its row count, start and finish. A run's own
rows are complete for its manifest (an image another run finished is ``skipped`` or ``ok``, never
missing), so where two runs share ids the rows of the one finishing last are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout, runs
from .records import records_of, results_table
from .storage import Folder, StorageError
from .summary import Tally

RUNS_KEY = b"ingan_batch.runs"  # key-value metadata of a results table: its runs' segments
_MERGE_ROWS = 1024  # rows per row group of the final table
_OPEN_PARTS = 16  # parts kept decoded while merging (completion order is nearly manifest order)
INDEX_COLUMN = "manifest_index"  # in the parts only: the final table is in manifest order


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of a results table written by one run, and when that run lived."""

    run: str
    rows: int
    started: float
    finished: float


@dataclass(frozen=True)
class Finished:
    """Where ``ResultStream.finish`` put the run's rows."""

    uri: str
    rows: int  # this run's rows in it
    kept: int  # rows of overlapping runs kept beside them
    missing: int  # rows this run recorded that its parts no longer hold (removed by a run that took it for dead)
    aside: str | None = None  # why the rows went to results.{run_id}.parquet instead of results.parquet


class MergeError(Exception):
    """The current results.parquet cannot take this run's rows (columns of clashing types)."""


class ResultStream:
    def __init__(self, folder: Folder, carried_schema: pa.Schema | None, *, run_id: str | None = None,
                 started: float | None = None, flush_rows: int = 256, flush_s: float = 10.0) -> None:
        self.folder, self.carried_schema = folder, carried_schema
        # Parts under the run's own id: another run in the same output never lists, merges or
        # removes them (a dead run's are removed by the next run to start: runs.remove_dead).
        self.run_id = run_id or runs.new_run_id()
        self.started = time.time() if started is None else started
        self.parts_dir = layout.run_parts_dir(self.run_id)
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.tally = Tally()
        self.failures: list[Mapping[str, Any]] = []  # the first few, for the log
        self._buffer: list[tuple[int, Mapping[str, Any]]] = []
        self._parts = 0
        self._last_flush = time.monotonic()

    def add(self, index: int, rec: Mapping[str, Any]) -> None:
        self.tally.add(rec)
        if rec.get("status") == "failed" and len(self.failures) < 20:
            self.failures.append(rec)
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
            self.folder.write_bytes(layout.part_path(self.run_id, self._parts), self._part_bytes())
            self._parts += 1
            self._buffer.clear()

    def finish(self, overlapped: Collection[str] = (), lock_wait_s: float = 60.0, stale_after_s: float = 600.0,
               beside: Callable[[pq.ParquetFile], object] | None = None) -> Finished:
        """Write this run's rows (manifest order) into ``results.parquet``, with the rows it holds
        of runs that overlapped this one (``overlapped``: the runs seen live; and any that
        finished after this one started), then call ``beside`` with that table (summary, report)
        under the same lock, so what describes the table is the table's, and remove this run's
        parts. Raises ``StorageError`` when storage fails, leaving
        the parts in place. Where the lock stays taken for ``lock_wait_s``, or the current table
        cannot take these rows, they go to ``results.{run_id}.parquet`` and the rest is left as
        it is (``Finished.aside`` says why)."""
        own, mine = self._own_table()
        missing = self.tally.total - mine.rows
        with runs.results_lock(self.folder, self.run_id, lock_wait_s, stale_after_s) as held:
            if not held:
                return self._aside(own, mine, missing, f"{layout.RESULTS_LOCK} was held by another run for {lock_wait_s:g} s")
            try:
                data, kept = _merge_current(self.folder, own, mine, set(overlapped))
            except MergeError as exc:
                return self._aside(own, mine, missing, f"{layout.RESULTS_NAME} cannot take them: {exc}")
            uri = self.folder.write_bytes(layout.RESULTS_NAME, data)
            if beside is not None:
                beside(pq.ParquetFile(pa.BufferReader(data)))
        self._remove_parts()
        return Finished(uri, mine.rows, kept, missing)

    def _aside(self, own: bytes, mine: Segment, missing: int, why: str) -> Finished:
        uri = self.folder.write_bytes(layout.side_results_path(self.run_id), own)
        self._remove_parts()
        return Finished(uri, mine.rows, 0, missing, why)

    def _remove_parts(self) -> None:
        with contextlib.suppress(StorageError):
            self.folder.remove(self.parts_dir, recursive=True)

    def _own_table(self) -> tuple[bytes, Segment]:
        """This run's parts as one table in manifest order, and its segment.

        Each part is sorted by manifest row when written, so the table is a k-way merge of the
        parts' row numbers, written ``_MERGE_ROWS`` rows at a time with at most ``_OPEN_PARTS``
        parts decoded at once: memory stays flat however many rows the run had."""
        self.flush()
        if self._buffer:
            raise StorageError(f"cannot write result parts under {self.folder.uri(self.parts_dir)}")
        names = self.folder.list(self.parts_dir)
        schema = pa.schema([*results_table([], self.carried_schema).schema])
        open_parts: OrderedDict[int, pa.Table] = OrderedDict()

        def part(k: int, columns: list[str] | None = None) -> pa.Table:
            if columns is not None:  # the row numbers only: not cached
                return pq.read_table(pa.BufferReader(self.folder.read_bytes(f"{self.parts_dir}/{names[k]}")), columns=columns)
            if k not in open_parts:
                if len(open_parts) >= _OPEN_PARTS:
                    open_parts.popitem(last=False)
                open_parts[k] = pq.read_table(pa.BufferReader(self.folder.read_bytes(f"{self.parts_dir}/{names[k]}")))
            open_parts.move_to_end(k)
            return open_parts[k]

        def run(k: int) -> list[tuple[int, int, int]]:
            return [(index, k, row) for row, index in enumerate(part(k, [INDEX_COLUMN]).column(0).to_pylist())]

        runs_ = [run(k) for k in range(len(names))]
        sink, rows = pa.BufferOutputStream(), 0
        with pq.ParquetWriter(sink, schema) as writer:
            chunk: list[tuple[int, int, int]] = []
            for entry in heapq.merge(*runs_):
                chunk.append(entry)
                if len(chunk) == _MERGE_ROWS:
                    writer.write_table(self._rows(chunk, part, schema))
                    rows, chunk = rows + len(chunk), []
            writer.write_table(self._rows(chunk, part, schema))
            mine = Segment(self.run_id, rows + len(chunk), self.started, time.time())
            writer.add_key_value_metadata({RUNS_KEY: _segments_json([mine])})
        return sink.getvalue().to_pybytes(), mine

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
        table = results_table([rec for _, rec in rows], self.carried_schema)
        table = table.append_column(INDEX_COLUMN, pa.array([i for i, _ in rows], pa.int64()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()


def _segments_json(segments: list[Segment]) -> bytes:
    return json.dumps([dataclasses.asdict(s) for s in segments]).encode()


def segments(f: pq.ParquetFile) -> list[Segment]:
    """The runs that wrote a results table, in row order; empty where the table does not say (a
    table of an earlier version, or one edited by hand) or says what does not add up."""
    try:
        found = [Segment(str(s["run"]), int(s["rows"]), float(s["started"]), float(s["finished"]))
                 for s in json.loads((f.metadata.metadata or {})[RUNS_KEY])]
    except (KeyError, TypeError, ValueError):
        return []
    ok = all(s.rows >= 0 for s in found) and sum(s.rows for s in found) == f.metadata.num_rows
    return found if ok else []


@dataclass(frozen=True)
class Described:
    """A results table as its summary and report tell it: every row's tally, each run's rows."""

    tally: Tally
    runs: list[dict[str, Any]]  # per run, in row order: its id, rows, start, finish and status counts
    first: list[dict[str, Any]]  # the first rows, as records (the report's contact sheet)


def describe(f: pq.ParquetFile, first: int) -> Described:
    """Tally every row of a results table, a batch at a time, and each of its runs' rows apart."""
    found = segments(f) or [Segment("unknown", f.metadata.num_rows, 0.0, 0.0)]
    tally, per_run, head = Tally(), [Tally() for _ in found], []
    ends = [sum(s.rows for s in found[:k + 1]) for k in range(len(found))]
    row, k = 0, 0
    for batch in f.iter_batches(batch_size=_MERGE_ROWS):
        for rec in records_of(batch):
            while k < len(ends) - 1 and row >= ends[k]:
                k += 1
            tally.add(rec)
            per_run[k].add(rec)
            if len(head) < first:
                head.append(rec)
            row += 1
    told = [{"run": s.run, "rows": s.rows, "started": s.started, "finished": s.finished,
             "started_utc": runs.utc_text(s.started) if s.started else None,
             "finished_utc": runs.utc_text(s.finished) if s.finished else None,
             "status_counts": t.status_counts()} for s, t in zip(found, per_run, strict=True)]
    return Described(tally, told, head)


def overlapping(found: list[Segment], mine: Segment, seen: Collection[str]) -> set[int]:
    """Which segments to keep beside this run's rows: those of runs it saw live or that finished
    after it started, and, link by link, of runs that overlapped those (shards started one after
    another are one batch, even where the last never met the first). A run that ended before
    this one started, and overlapped none that did, is an earlier batch: replaced."""
    keep = {i for i, s in enumerate(found) if s.run != mine.run and (s.run in seen or s.finished >= mine.started)}
    grew = True
    while grew:
        grew = False
        for i, s in enumerate(found):
            if i not in keep and s.run != mine.run and any(
                    s.started <= found[k].finished and found[k].started <= s.finished for k in keep):
                keep.add(i)
                grew = True
    return keep


def _merge_current(folder: Folder, own: bytes, mine: Segment, seen: set[str]) -> tuple[bytes, int]:
    """This run's table merged with the rows to keep of the current results.parquet, and how
    many rows were kept; this run's table alone where there is nothing to keep."""
    try:
        current = pq.ParquetFile(pa.BufferReader(folder.read_bytes(layout.RESULTS_NAME)))
    except FileNotFoundError:
        return own, 0
    except (pa.ArrowException, OSError):  # unreadable: it holds no row to keep
        return own, 0
    found = segments(current)
    keep = overlapping(found, mine, seen)
    if not keep:
        return own, 0
    own_file = pq.ParquetFile(pa.BufferReader(own))
    try:
        schema = pa.unify_schemas([own_file.schema_arrow.remove_metadata(), current.schema_arrow.remove_metadata()])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise MergeError(str(exc).splitlines()[0]) from None
    spans, start = [], 0
    for i, s in enumerate(found):
        if i in keep:
            spans.append((s, start, start + s.rows))
        start += s.rows
    # Segments in their runs' start order: this run's goes before the first kept run started after it.
    at = next((k for k, (s, _, _) in enumerate(spans) if (s.started, s.run) > (mine.started, mine.run)), len(spans))
    return _write_merged(own_file, current, [*spans[:at], None, *spans[at:]], mine, schema)


def _write_merged(own: pq.ParquetFile, current: pq.ParquetFile, plan: list[tuple[Segment, int, int] | None],
                  mine: Segment, schema: pa.Schema) -> tuple[bytes, int]:
    """``plan``'s segments of ``current`` (rows ``lo``..``hi``, less the ids this run has) and
    this run's rows (``None``), in that order, a batch at a time."""
    own_ids = own.read(columns=["id"]).column("id").combine_chunks()
    rows, written, kept = _Rows(current), [], 0
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema) as writer:
        for step in plan:
            if step is None:
                for batch in own.iter_batches(batch_size=_MERGE_ROWS):
                    writer.write_table(_conform(batch, schema))
                written.append(mine)
                continue
            seg, lo, hi = step
            n = 0
            for batch in rows.between(lo, hi):
                batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=own_ids)))
                writer.write_table(_conform(batch, schema))
                n += batch.num_rows
            if n:
                written.append(dataclasses.replace(seg, rows=n))
                kept += n
        writer.add_key_value_metadata({RUNS_KEY: _segments_json(written)})
    return sink.getvalue().to_pybytes(), kept


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """``batch`` with ``schema``'s columns in its order; a column it lacks (another manifest's
    carried column) is null."""
    names = set(batch.schema.names)
    columns = [batch.column(f.name).cast(f.type) if f.name in names else pa.nulls(batch.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


class _Rows:
    """A Parquet file's rows in order, a range at a time, with one batch decoded at once."""

    def __init__(self, f: pq.ParquetFile) -> None:
        self._batches = f.iter_batches(batch_size=_MERGE_ROWS)
        self._batch: pa.RecordBatch | None = None
        self._start = 0  # row number of the batch's first row

    def between(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Rows ``lo``..``hi - 1``; ``lo`` is never below an earlier call's ``hi``."""
        while lo < hi:
            if self._batch is None or lo >= self._start + self._batch.num_rows:
                if self._batch is not None:
                    self._start += self._batch.num_rows
                self._batch = next(self._batches, None)
                if self._batch is None:
                    return
                continue
            end = min(hi, self._start + self._batch.num_rows)
            yield self._batch.slice(lo - self._start, end - lo)
            lo = end
