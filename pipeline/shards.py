"""Outputs as dataset shards a training job reads, a night at a time: WebDataset tars (each sample
its image as ``{key}.png|jpg|webp``, a shaped JPEG's frame as ``{key}.mask.png``, its record as
``{key}.json``) or Parquet with the image bytes, listed with their sample counts in the night's
``index.json`` (``shardlist`` of ``url`` and ``nsamples``, the shape of WebDataset's ``wids`` index).

A task turns each output it puts in the shards into a ``Sample`` and hands it back beside the
image's record; the driver's ``ShardWriter`` packs the run's samples into shards of at most
``shard_max_samples`` samples and ``shard_max_bytes`` bytes. A shard is committed under the
night's lock (``index.lock``): the index is read, the samples it already holds are dropped (a
sample's key names its image, model and target, so a sample another run added, or an earlier run
of the night, is never added twice), the shard is written whole (one put on S3; locally a temporary
name renamed), and then the index listing it. The index is the commit point: a shard object it does
not list is in no night; a crash between the two leaves one, and the next run of the night removes
it once its run is dead.

What a killed run held but never committed is not lost: each output's record says which night it
was made for and its sample's key (the marker keeps them), and a rerun of the night remakes the
samples of that night that its index does not hold (``pending``). Outputs made on an earlier night,
or by a run without shards, are not put in again.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ingan.retarget import EncodedOutput

from . import layout, runs
from .records import OUTPUT_TYPE, Item, Output
from .storage import Folder, StorageError

# A sample's record holds its output's record fields but where the output's own files are.
_NOT_IN_SAMPLES = {"uri", "mask_uri", "shard_key", "shard_night"}
SAMPLE_FIELDS = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("source_uri", pa.string()), ("model_tag", pa.string()),
    ("night", pa.string()), ("run", pa.string()), ("ext", pa.string()),
    *[f for f in OUTPUT_TYPE if f.name not in _NOT_IN_SAMPLES]])
# Where a sample's image lies in its tar (WebDataset form): a reader can fetch one by range.
_TAR_FIELDS = [pa.field("offset", pa.int64()), pa.field("size", pa.int64())]
_IMAGE_FIELDS = [pa.field("image", pa.binary()), pa.field("mask", pa.binary())]
_ROW_GROUP = 64  # samples per Parquet row group
INDEX_KIND = "wids-shard-index-v1"


class ShardError(Exception):
    """The night's shards cannot take this run's (another form than this run's)."""


@dataclass(frozen=True)
class Sample:
    """One output as the shards hold it: its key, encoded image, a shaped JPEG's frame, record."""

    key: str
    ext: str
    image: bytes
    mask: bytes | None
    record: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.image) + len(self.mask or b"")


def sample(item: Item, tag: str, output: Mapping[str, Any], enc: EncodedOutput) -> Sample:
    """``output`` (a record's output, its ``shard_key`` set) as a sample of the night."""
    record = {"key": output["shard_key"], "id": item.id, "source_uri": item.uri, "model_tag": tag,
              "night": output["shard_night"], "ext": enc.ext,
              **{f.name: output.get(f.name) for f in SAMPLE_FIELDS if f.name in OUTPUT_TYPE.names}}
    if item.carried:
        record["manifest"] = item.carried
    return Sample(output["shard_key"], enc.ext, enc.data, enc.mask, record)


def mark(outputs: list[Output], earlier: Mapping[str, Mapping[str, Any]], item: Item, tag: str,
         night: str | None, keep: str) -> list[int]:
    """Set each output's ``shard_night`` and ``shard_key``; return the positions of the outputs
    whose samples this run adds. An output made before (``earlier``, by target: the marker's, where
    its model was reused) on another night, or without shards, keeps what it had and is not put
    in again; one of this night whose sample the night's index holds (``item.shard_done``) is not
    put in twice. ``night`` None: shards off."""
    added = []
    for k, o in enumerate(outputs):
        prev = earlier.get(o["target"])
        if prev is not None and prev.get("shard_night") != night:
            o["shard_key"], o["shard_night"] = prev.get("shard_key"), prev.get("shard_night")
            continue
        kept = night is not None and (keep == "all" or o.get("beats_resize") is True)
        o["shard_night"] = night
        o["shard_key"] = layout.sample_key(item.id, tag, o["target"]) if kept else None
        if kept and o["shard_key"] not in item.shard_done:
            added.append(k)
    return added


def pending(done: Iterable[Mapping[str, Any]], targets: set[str], night: str | None, shard_done: frozenset[str]) -> bool:
    """Whether outputs a marker lists (``done``) for ``targets`` were made for this night with a
    sample its index does not hold: the run that made them ended before its shard was committed."""
    return night is not None and any(
        o.get("target") in targets and o.get("shard_night") == night and o.get("shard_key")
        and o["shard_key"] not in shard_done for o in done)


# --------------------------------------------------------------------------- encoding


def _tar(samples: list[Sample], rows: list[dict[str, Any]]) -> bytes:
    """The samples as one tar, each sample's files together (WebDataset groups by key); each row
    gets its image's offset and size. Samples are dropped from the list as they go in, so a shard
    is held once, not twice, while it is built."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def member(name: str, data: bytes) -> int:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # where the data starts

        samples.reverse()  # popped from the end, in their order
        while samples:
            s = samples.pop()
            offset = member(f"{s.key}.{s.ext}", s.image)
            if s.mask is not None:
                member(f"{s.key}.mask.png", s.mask)
            member(f"{s.key}.json", json.dumps(s.record, sort_keys=True, default=str).encode())
            rows.append({**s.record, "offset": offset, "size": len(s.image)})
    return buf.getvalue()


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _parquet(samples: list[Sample], schema: pa.Schema, with_images: bool) -> bytes:
    """The samples' records (and, ``with_images``, their bytes) as one Parquet table, a row group
    at a time; samples are dropped from the list as they go in."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema) as writer:
        while samples:
            group, samples[:_ROW_GROUP] = samples[:_ROW_GROUP], []
            rows = [{**s.record, "image": s.image, "mask": s.mask} if with_images else s.record for s in group]
            writer.write_table(_table(rows, schema))
    return sink.getvalue().to_pybytes()


def _schema(form: str, carried: pa.Schema | None) -> pa.Schema:
    fields = [*SAMPLE_FIELDS, *(_IMAGE_FIELDS if form == "parquet" else _TAR_FIELDS)]
    if carried is not None and len(carried):
        fields.append(pa.field("manifest", pa.struct(list(carried))))
    return pa.schema(fields)


def encode(samples: list[Sample], form: str, carried: pa.Schema | None) -> dict[str, bytes]:
    """A shard's objects by extension: the tar and its records (WebDataset), or one Parquet file."""
    schema = _schema(form, carried)
    if form == "parquet":
        return {layout.SHARD_RECORDS_EXT: _parquet(samples, schema, with_images=True)}
    rows: list[dict[str, Any]] = []
    tar = _tar(samples, rows)
    return {"tar": tar, layout.SHARD_RECORDS_EXT: _parquet_rows(rows, schema)}


def _parquet_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(_table(rows, schema), sink, row_group_size=max(1, len(rows)))
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------- the night's index


def read_index(folder: Folder, night: str) -> dict[str, Any]:
    """The night's index; an empty one where the night has none yet."""
    try:
        index = folder.read_json(layout.night_path(night, layout.SHARD_INDEX))
    except FileNotFoundError:
        index = None
    if not isinstance(index, dict) or not isinstance(index.get("shardlist"), list):
        return {"__kind__": INDEX_KIND, "wids_version": 1, "name": night, "night": night, "format": None,
                "shardlist": []}
    return index


def index_samples(index: Mapping[str, Any]) -> int:
    return sum(int(s.get("nsamples", 0)) for s in index["shardlist"])


@dataclass
class ShardStats:
    """What a run did to its night's shards, for the summary and the log."""

    night: str
    form: str
    index: str  # the index's URI
    samples: int = 0  # samples this run put in the night
    shards: int = 0  # shards this run added
    duplicates: int = 0  # samples dropped: the night held them already
    night_shards: int = 0  # the night's index after this run's last commit
    night_samples: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "errors"} | {"errors": list(self.errors)}


class ShardWriter:
    """This run's samples on their way into its night's shards (see the module's docstring)."""

    def __init__(self, folder: Folder, night: str, form: str, run_id: str, *, max_samples: int, max_bytes: int,
                 lock_wait_s: float, stale_after_s: float, carried: pa.Schema | None) -> None:
        self.folder, self.night, self.form, self.run_id = folder, night, form, run_id
        self.max_samples, self.max_bytes, self.carried = max_samples, max_bytes, carried
        self.lock_wait_s, self.stale_after_s = lock_wait_s, stale_after_s
        self.index_rel, self.lock_rel = layout.night_path(night, layout.SHARD_INDEX), layout.night_path(night, layout.SHARD_LOCK)
        self.stats = ShardStats(night, form, folder.uri(self.index_rel))
        self.committed: set[str] = set()  # keys the night's index holds, as last read
        self._loaded: set[str] = set()  # the index entries whose keys are in ``committed``
        self._pending: list[Sample] = []
        self._pending_keys: set[str] = set()
        self._pending_bytes = 0
        self._number = 0
        self._retry_at = 0.0  # after a failed commit, the next try waits until then
        with self._locked():
            self.removed = self._tidy(self._refresh())

    def shard_done(self, item: Item, tag: str, targets: Iterable[str]) -> Item:
        """``item`` with the keys of its samples the night already holds."""
        done = frozenset(k for k in (layout.sample_key(item.id, tag, t) for t in targets) if k in self.committed)
        return Item(item.index, item.id, item.uri, item.carried, done) if done else item

    def add(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            if s.key in self.committed or s.key in self._pending_keys:
                self.stats.duplicates += 1
                continue
            s.record["run"] = self.run_id
            self._pending.append(s)
            self._pending_keys.add(s.key)
            self._pending_bytes += s.size
        if time.monotonic() >= self._retry_at:
            self.flush(whole_only=True)

    def _full(self) -> bool:
        return len(self._pending) >= self.max_samples or self._pending_bytes >= self.max_bytes

    def flush(self, whole_only: bool = False) -> bool:
        """Commit the samples held as shards (``whole_only``: only full ones, as a run goes). False
        where the night's lock stayed taken (they are kept for the next try) or storage failed (the
        samples of that shard are left to a rerun of the night, which remakes them: their images'
        markers name them)."""
        try:
            while self._pending and (self._full() or not whole_only):
                self._commit_next()
        except (StorageError, ShardError) as exc:
            self.stats.errors.append(str(exc))
            self._retry_at = time.monotonic() + max(self.lock_wait_s, 10.0)
            return False
        return True

    def _cut(self) -> int:
        """How many of the samples held go in the next shard: the bounds, and at least one."""
        total = 0
        for n, s in enumerate(self._pending[:self.max_samples]):
            total += s.size
            if total > self.max_bytes and n > 0:
                return n
        return min(len(self._pending), self.max_samples)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The night's lock, held while the body runs; ``_Busy`` where another run held it for all
        of ``lock_wait_s``."""
        with runs.held(self.folder, self.lock_rel, self.run_id, self.lock_wait_s, self.stale_after_s) as held:
            if not held:
                raise _Busy(f"{self.folder.uri(self.lock_rel)} stayed held by another run for {self.lock_wait_s:g} s")
            yield

    def _commit_next(self) -> None:
        """The next shard's samples, less those the night holds by now, written whole and then
        listed in the index, under the night's lock."""
        with self._locked():
            index = self._refresh()
            cut = self._cut()
            # Taken out of the list first: encoding drops each sample as it goes in, so a shard is
            # held once (as samples or as bytes), not twice.
            batch = [s for s in self._pending[:cut] if s.key not in self.committed]
            self.stats.duplicates += cut - len(batch)
            del self._pending[:cut]
            self._pending_bytes = sum(s.size for s in self._pending)
            keys = [s.key for s in batch]
            self._pending_keys.difference_update(keys)
            if batch:
                self._write(index, batch, keys)

    def _write(self, index: dict[str, Any], batch: list[Sample], keys: list[str]) -> None:
        name = layout.shard_name(self.run_id, self._number)
        stem = layout.night_path(self.night, name)
        objects = encode(batch, self.form, self.carried)  # empties ``batch``
        for ext, data in objects.items():
            self.folder.write_bytes(f"{stem}.{ext}", data)
        data_ext = layout.SHARD_FORMATS[self.form]
        index["format"] = self.form
        index["shardlist"].append({"url": f"{name}.{data_ext}", "nsamples": len(keys),
                                   "filesize": len(objects[data_ext]), "records": f"{name}.{layout.SHARD_RECORDS_EXT}",
                                   "run": self.run_id, "added": time.time()})
        self.folder.write_json(self.index_rel, index)  # the commit
        self.committed.update(keys)
        self._loaded.add(index["shardlist"][-1]["records"])
        self._number += 1
        self.stats.samples += len(keys)
        self.stats.shards += 1
        self.stats.night_shards, self.stats.night_samples = len(index["shardlist"]), index_samples(index)

    def _refresh(self) -> dict[str, Any]:
        """The night's index now, with the keys of the shards added since the last look."""
        index = read_index(self.folder, self.night)
        if index["format"] not in (None, self.form):
            raise ShardError(f"night {self.night!r} holds {index['format']} shards, not {self.form}: "
                             "write this run's into another night")
        for entry in index["shardlist"]:
            records = entry.get("records")
            if records and records not in self._loaded:
                keys = self.folder.read_columns(layout.night_path(self.night, records), ["key"])
                self.committed.update(keys.column("key").to_pylist())
                self._loaded.add(records)
        self.stats.night_shards, self.stats.night_samples = len(index["shardlist"]), index_samples(index)
        return index

    def _tidy(self, index: Mapping[str, Any]) -> list[str]:
        """Remove the shard objects of dead runs that the index does not list (a crash between a
        shard and the index); a live run's are its own business. Under the night's lock."""
        listed = {name for e in index["shardlist"] for name in (e.get("url"), e.get("records"))}
        live = {self.run_id, *runs.live_runs(self.folder, self.stale_after_s)}
        removed = []
        for name in self.folder.list(layout.night_path(self.night)):
            run = layout.shard_run_id(name)
            if run is not None and run not in live and name not in listed:
                self.folder.remove(layout.night_path(self.night, name))
                removed.append(layout.night_path(self.night, name))
        return removed


class _Busy(StorageError):
    """The night's lock stayed taken."""
