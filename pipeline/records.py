"""One result record per manifest row: the item it is for, its fields, its constructors and the
Arrow schema it is stored with (derived from the fields), so a field is added in one place.

A record is a plain dict (typed here as a ``TypedDict``): it crosses Ray, is filled in by the
task, gets its ``attempts`` from the executor, and is read by the results stream, the summary and
the report; ``results_table`` turns records into the stored table. ``rel`` and ``source_rel`` are layout details of the output folder for the report;
they are not stored in the table.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Any, TypedDict, get_args, get_type_hints

import pyarrow as pa

STATUSES = ("ok", "skipped", "failed")

# An output's quality fields when metrics are off.
UNSCORED: dict[str, None] = dict.fromkeys(("completeness", "coherence", "swd", "stretch", "resize_completeness",
                                           "resize_coherence", "resize_swd", "beats_resize"))


@dataclass(frozen=True)
class Item:
    index: int  # manifest row
    id: str
    uri: str | None
    carried: dict[str, Any]
    # The keys of this image's samples already in the night's shard index (pipeline.shards): a
    # rerun of the night remakes the samples a killed run made but never got into a shard.
    shard_done: frozenset[str] = frozenset()


def item_seed(run_seed: int, item_id: str, *more: object) -> int:
    """Each image's training seed: fixed by the run seed and the id, so a retried or resumed task
    trains the same weights. ``more`` (a variant's index and salt) derives further seeds."""
    text = "\0".join([str(run_seed), item_id, *(str(m) for m in more)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:4], "big")


class Output(TypedDict, total=False):
    width: int
    height: int
    ratio: float | None
    uri: str
    rel: str  # not stored
    # What was asked for: "ratio:2.0", "size:256x256", "shape:2.0@0.3,-0.3" or
    # "variant:{digest}:{index}" (an augmentation draw; the digest names the salt and ranges).
    target: str
    # Top-corner shifts of a shaped output (normalised units); 0 and 0 for a rectangle.
    shift_left: float
    shift_right: float
    # A shaped JPEG's frame (JPEG has no alpha); null otherwise.
    mask_uri: str | None
    mask_rel: str | None  # not stored
    # Augmentation variants: the draw's index and its scale against the source; null otherwise.
    variant: int | None
    scale: float | None
    completeness: float | None
    coherence: float | None
    swd: float | None
    # 0: the source's objects kept at their own size; 1: pulled as a resize to this shape pulls
    # them (a resize's own stretch is 1 by construction, so it has no column); null where the
    # aspect barely changes or the output was not scored (ingan.metrics.stretch).
    stretch: float | None
    # The same metrics for a bicubic resize of the source to the same size, and whether the
    # output beats it on both completeness + coherence and patch SWD (null: not scored).
    resize_completeness: float | None
    resize_coherence: float | None
    resize_swd: float | None
    beats_resize: bool | None
    # The output's sample in the shards (its WebDataset key) and the night whose shards it went
    # to: null where it is in none (shards off, or left out by keep: verdict; the night is still
    # set then, for the night the output was made in).
    shard_key: str | None
    shard_night: str | None


class Record(TypedDict):
    id: str
    uri: str | None
    status: str  # one of STATUSES
    error: str | None
    error_kind: str | None
    outputs: list[Output]
    train_seconds: float | None
    total_seconds: float | None
    attempts: int
    model_uri: str | None
    source_width: int | None
    source_height: int | None
    source_rel: str | None  # not stored
    carried: dict[str, Any]  # stored as the manifest's own columns, beside these
    samples: list[Any]  # not stored: the outputs as shard samples (pipeline.shards.Sample), for the driver


_ARROW_TYPES: dict[Any, pa.DataType] = {int: pa.int32(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _stored_fields(typed: type, unstored: set[str], nested: dict[Any, pa.DataType] | None = None) -> list[tuple[str, pa.DataType]]:
    """The Arrow fields of a record ``TypedDict``'s stored keys, in its order (all nullable);
    ``nested`` gives the types of its fields that hold other records."""
    types = {**_ARROW_TYPES, **(nested or {})}
    fields = []
    for name, hint in get_type_hints(typed).items():
        if name not in unstored:
            (value,) = [a for a in get_args(hint) if a is not type(None)] if isinstance(hint, UnionType) else [hint]
            fields.append((name, types[value]))
    return fields


# The table's schema follows the TypedDicts above: a stored field is declared there alone.
OUTPUT_TYPE = pa.struct(_stored_fields(Output, {"rel", "mask_rel"}))
RESULT_SCHEMA_BASE = pa.schema(_stored_fields(Record, {"source_rel", "carried", "samples"},
                                              {list[Output]: pa.list_(OUTPUT_TYPE)}))


def _record(item: Item, status: str, started: float | None, **fields: Any) -> Record:
    rec: Record = {
        "id": item.id, "uri": item.uri, "status": status, "error": None, "error_kind": None,
        "outputs": [], "source_rel": None, "source_width": None, "source_height": None,
        "model_uri": None, "train_seconds": None, "total_seconds": None, "attempts": 1,
        "carried": item.carried, "samples": [],
    }
    rec.update(fields)  # type: ignore[typeddict-item]
    if started is not None:
        rec["total_seconds"] = time.perf_counter() - started
    return rec


def ok(item: Item, started: float, *, outputs: list[Output], source_rel: str, source_width: int,
       source_height: int, model_uri: str, train_seconds: float | None, samples: list[Any]) -> Record:
    """The image is done in this run (``train_seconds`` None: its saved model was reused)."""
    return _record(item, "ok", started, outputs=outputs, source_rel=source_rel, source_width=source_width,
                   source_height=source_height, model_uri=model_uri, train_seconds=train_seconds, samples=samples)


def skipped(item: Item, started: float, *, outputs: list[Output], source_rel: str | None,
            source_width: int | None, source_height: int | None, model_uri: str | None) -> Record:
    """An earlier run finished the image; the record repeats what its marker says."""
    return _record(item, "skipped", started, outputs=outputs, source_rel=source_rel, source_width=source_width,
                   source_height=source_height, model_uri=model_uri)


def failed(item: Item, kind: str, message: str, started: float | None = None) -> Record:
    """The image failed: ``kind`` is the machine-readable ``error_kind``, ``message`` for people."""
    return _record(item, "failed", started, error_kind=kind, error=message)


def results_table(
    records: Sequence[Mapping[str, Any]], carried_schema: pa.Schema | None
) -> pa.Table:
    """One row per record, in order: the fixed columns, then the carried manifest columns.

    ``rel`` and ``source_rel`` are layout details of the output folder and are not stored.
    """
    carried_fields = list(carried_schema) if carried_schema is not None else []
    clash = {f.name for f in carried_fields} & set(RESULT_SCHEMA_BASE.names)
    if clash:
        # Two columns with one name would make the table ambiguous to every reader.
        raise ValueError(f"carried columns clash with result columns: {sorted(clash)}")
    schema = pa.schema([*RESULT_SCHEMA_BASE, *carried_fields])
    arrays = [_base_column(records, field) for field in RESULT_SCHEMA_BASE]
    arrays += [_carried_column(records, field) for field in carried_fields]
    return pa.Table.from_arrays(arrays, schema=schema)


def _base_column(records: Sequence[Mapping[str, Any]], field: pa.Field) -> pa.Array:
    if field.name == "outputs":
        values = [[_output_row(o) for o in r.get("outputs") or []] for r in records]
    else:
        values = [r.get(field.name) for r in records]
    return pa.array(values, type=field.type)


def _output_row(output: Mapping[str, Any]) -> dict[str, Any]:
    # Only the struct's fields: "rel" and anything else in the dict stay out of the table.
    return {name: output.get(name) for name in OUTPUT_TYPE.names}


def records_of(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """The rows of a stored results table as records again (the manifest's columns under
    ``carried``), for what describes a table: the summary's tally and the report."""
    base = set(RESULT_SCHEMA_BASE.names)
    out = []
    for row in table.to_pylist():
        rec = {k: v for k, v in row.items() if k in base}
        rec["carried"] = {k: v for k, v in row.items() if k not in base}
        out.append(rec)
    return out


def _carried_column(records: Sequence[Mapping[str, Any]], field: pa.Field) -> pa.Array:
    values = [(r.get("carried") or {}).get(field.name) for r in records]
    return pa.array(values, type=field.type)
