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

``key`` comes from the image id but is safe whatever the id holds (``../``, ``/``, control
characters, any length): a readable slug plus a hash of the exact id, so distinct ids never share
a folder. ``tag`` names the settings that change the model (preset, iterations, seed, config hash).
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


def item_key(item_id: str) -> str:
    slug = _UNSAFE.sub("_", item_id).strip("._-")[:_SLUG_MAX] or "item"
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}-{digest}"


def item_dir(item_id: str, tag: str) -> str:
    return f"items/{item_key(item_id)}/{tag}"


def _item_file(name: str) -> Callable[[str, str], str]:
    """The path function of one file in an item's folder: ``(item_id, tag) -> .../{name}``."""

    def path(item_id: str, tag: str) -> str:
        return f"{item_dir(item_id, tag)}/{name}"

    return path


model_path = _item_file("model.pt")
training_state_path = _item_file("training.pt")
source_preview_path = _item_file("source.jpg")
metrics_path = _item_file("metrics.json")
marker_path = _item_file("done.json")


def output_path(item_id: str, tag: str, width: int, height: int, ext: str, shifts: Shifts | None = None) -> str:
    return f"{item_dir(item_id, tag)}/outputs/{output_stem(width, height, shifts)}.{ext}"


def mask_path(item_id: str, tag: str, width: int, height: int, shifts: Shifts) -> str:
    """The frame of a shaped output in a format without alpha, beside it."""
    return output_path(item_id, tag, width, height, MASK_EXT, shifts)
