"""Where everything lives under the output URI. The one place that names paths.

    {output}/config.json                     resolved config of the latest run (no secrets)
    {output}/results.parquet                 one row per manifest row, in manifest order (the rows of
                                             runs that overlapped the last one to finish beside its own)
    {output}/results.{run_id}.parquet        a run's rows, where it could not take results.lock
    {output}/results.lock                    held by the run merging its rows into results.parquet
    {output}/results.parts/{run_id}/part-*.parquet   a run's rows as they finish; removed at its end
    {output}/runs/{run_id}.json              a live run's heartbeat; removed at its end
    {output}/summary.json                    counts, durations, error kinds, versions
    {output}/report.html                     contact sheet, self-contained
    {output}/items/{key}/{tag}/model.pt      generator checkpoint (weights + config only)
    {output}/items/{key}/{tag}/training.pt   training state while training; removed once model.pt exists
    {output}/items/{key}/{tag}/source.jpg    preview of the decoded source
    {output}/items/{key}/{tag}/outputs/{W}x{H}.{ext}
    {output}/items/{key}/{tag}/outputs/{W}x{H}_tl{L}_tr{R}.{ext}   a shaped output (top-corner shifts)
    {output}/items/{key}/{tag}/outputs/{W}x{H}_tl{L}_tr{R}.mask.png   its frame, for JPEG outputs
    {output}/items/{key}/{tag}/metrics.json  per-output metrics
    {output}/items/{key}/{tag}/done.json     completion marker, written last
    {output}/shards/{night}/index.json       the night's shards and their sample counts: what is in the night
    {output}/shards/{night}/index.lock       held by the run adding a shard to the index
    {output}/shards/{night}/{run_id}-{n:05d}.tar      WebDataset shard n of a run ({sample}.png|jpg|webp, .json)
    {output}/shards/{night}/{run_id}-{n:05d}.parquet  its samples' records (with the image bytes: the Parquet form)

``key`` comes from the image id but is safe whatever the id holds (``../``, ``/``, control
characters, any length): a readable slug plus a hash of the exact id, so distinct ids never share
a folder. ``tag`` names the settings that change the model (preset, iterations, seed, config hash).
A sample's key (its WebDataset ``__key__``) names the image, the model and the target, without a dot
(WebDataset splits a member's name at its first dot).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from ingan.images import MASK_EXT
from ingan.retarget import Shifts, output_stem

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_MAX = 48

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.parquet"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.html"
PARTS_DIR = "results.parts"
RUNS_DIR = "runs"
RESULTS_LOCK = "results.lock"
_HEARTBEAT_EXT = ".json"
SHARDS_DIR = "shards"
SHARD_FORMATS = {"webdataset": "tar", "parquet": "parquet"}  # a shard's data object, by form
SHARD_RECORDS_EXT = "parquet"  # every shard's records (and, in the Parquet form, its images)
SHARD_INDEX, SHARD_LOCK = "index.json", "index.lock"  # in a night's folder
_NIGHT_MAX = 64


def run_parts_dir(run_id: str) -> str:
    return f"{PARTS_DIR}/{run_id}"


def part_path(run_id: str, number: int) -> str:
    return f"{run_parts_dir(run_id)}/part-{number:06d}.parquet"


def heartbeat_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}{_HEARTBEAT_EXT}"


def heartbeat_run_id(name: str) -> str:
    """The run whose heartbeat is ``name``, as listed in ``RUNS_DIR``."""
    return name.removesuffix(_HEARTBEAT_EXT)


def side_results_path(run_id: str) -> str:
    return f"results.{run_id}.parquet"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def item_key(item_id: str) -> str:
    slug = _UNSAFE.sub("_", item_id).strip("._-")[:_SLUG_MAX] or "item"
    return f"{slug}-{_digest(item_id)[:12]}"


def sample_key(item_id: str, tag: str, target: str) -> str:
    """The key of an output's sample in the shards: the same image, model and target give the same
    key in every run, which is what keeps a sample out of a night's index twice."""
    return f"{item_key(item_id).replace('.', '_')}-{_digest(tag, target)[:12]}"


def night_name(text: str) -> str:
    """A night as one safe path segment: the text itself where it is one (``2026-12-07``), else a
    slug plus a hash of the exact text, so two nights never share a folder."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) and len(text) <= _NIGHT_MAX:
        return text
    slug = _UNSAFE.sub("_", text).strip("._-")[:_SLUG_MAX - 13] or "night"
    return f"{slug}-{_digest(text)[:12]}"


def night_path(night: str, name: str = "") -> str:
    """The night's folder, or ``name`` in it (``SHARD_INDEX``, ``SHARD_LOCK``, ``shard_name``)."""
    return "/".join(p for p in (SHARDS_DIR, night, name) if p)


def shard_name(run_id: str, number: int) -> str:
    """Shard ``number`` of run ``run_id``, without extension: with its night's folder, the night,
    the run (its UTC start) and the shard's number read off its path."""
    return f"{run_id}-{number:05d}"


def shard_run_id(name: str) -> str | None:
    """The run that wrote the shard object ``name`` as listed in a night's folder (or a local
    write of one cut short, under its temporary name), or None for the night's own files."""
    found = re.fullmatch(r"(.+)-\d{5}\.[a-z]+(?:\.part-[0-9a-f-]+)?", name)
    return found.group(1) if found else None


def item_dir(item_id: str, tag: str) -> str:
    return f"items/{item_key(item_id)}/{tag}"


def _item_file(name: str) -> Callable[[str, str], str]:
    """The path function of one file in an item's folder: ``(item_id, tag) -> .../{name}``."""

    def path(item_id: str, tag: str) -> str:
        return f"{item_dir(item_id, tag)}/{name}"

    return path


_SOURCE_PREVIEW = "source.jpg"
model_path = _item_file("model.pt")
training_state_path = _item_file("training.pt")
source_preview_path = _item_file(_SOURCE_PREVIEW)
metrics_path = _item_file("metrics.json")
marker_path = _item_file("done.json")


def source_preview_beside(model_rel: str) -> str:
    """The source preview in the folder of the model at ``model_rel`` (a results row names its model)."""
    return f"{model_rel.rsplit('/', 1)[0]}/{_SOURCE_PREVIEW}"


def output_path(item_id: str, tag: str, width: int, height: int, ext: str, shifts: Shifts | None = None) -> str:
    return f"{item_dir(item_id, tag)}/outputs/{output_stem(width, height, shifts)}.{ext}"


def mask_path(item_id: str, tag: str, width: int, height: int, shifts: Shifts) -> str:
    """The frame of a shaped output in a format without alpha, beside it."""
    return output_path(item_id, tag, width, height, MASK_EXT, shifts)
