"""The run, start to finish: config and manifest in, Ray tasks out, results table, summary and
report written at the end. ``run.py`` is a thin wrapper over ``main``.

Resuming is rerunning: each image's completion marker is checked first by its task, so the same
command after a crash or a kill skips what finished and redoes only the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ingan.config import BF16_DEFAULT_TEXT
from ingan.images import FORMAT_NAMES
from ingan.progress import hms

from . import cluster, executor, layout, report, runs, shards
from .config import (
    AUTO_BUNDLE_TEXT,
    AUTO_NUM_GPUS_TEXT,
    AUTO_PRESET_TEXT,
    ConfigError,
    RunConfig,
    load_config,
)
from .manifest import ManifestError, load_manifest
from .records import RESULT_SCHEMA_BASE, Item, Record
from .results import Finished, ResultStream, describe
from .storage import Folder, StorageError, scheme_of
from .summary import write_summary
from .task import Job

_BASE_COLUMNS = set(RESULT_SCHEMA_BASE.names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="Train one InGAN per manifest image and retarget each to the configured ratios and sizes.",
    )
    p.add_argument("manifest", help="Parquet manifest URI (local path, s3://...) with a 'uri' column")
    p.add_argument("--output", help="output folder URI (default: ./output)")
    p.add_argument("--config", help="YAML file of run settings; flags override it")
    p.add_argument("--preset", help=f"paper, fast, cpu, tiny or auto (default: {AUTO_PRESET_TEXT})")
    p.add_argument("--ratios", help="comma-separated output width/height ratios, e.g. 0.5,1,2")
    p.add_argument("--sizes", help="comma-separated explicit sizes WxH, e.g. 256x256,128x64")
    p.add_argument("--shape", dest="shapes", action="append", metavar="RATIO_OR_WxH@LEFT,RIGHT",
                   help="a shaped output, repeatable: top corners shifted by LEFT and RIGHT (normalised units, "
                        "-0.9..0.9), transparent outside its frame; e.g. --shape 2@0.3,-0.3 --shape 256x256@0,0.2")
    p.add_argument("--ratio-policy", choices=["keep_height", "keep_width", "keep_area"])
    p.add_argument("--max-shift", type=float, metavar="M",
                   help="train for shaped outputs: top-corner shifts up to +-M during training (0..0.9)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help=f"bfloat16 training on or off (default: {BF16_DEFAULT_TEXT})")
    p.add_argument("--augment", type=int, metavar="N",
                   help="N random variants per image (ratio, scale and, with --augment-shift, shape), "
                        "all from the image's one model: a trained image is only retargeted")
    p.add_argument("--augment-salt", metavar="TEXT",
                   help="mixed into the variants' seeds, e.g. a date: each night new variants, a rerun the same")
    p.add_argument("--augment-shift", type=float, metavar="M", help="variants' top-corner shifts up to +-M (0: rectangles)")
    p.add_argument("--iterations", type=int, help="override the preset's training iterations")
    p.add_argument("--seed", type=int)
    p.add_argument("--format", dest="image_format", choices=list(FORMAT_NAMES))
    p.add_argument("--shards", choices=["none", "webdataset", "parquet"],
                   help="write the outputs as dataset shards too, a night at a time (default none)")
    p.add_argument("--no-files", dest="files", action="store_false", default=None,
                   help="outputs in the shards only, not as files under items/")
    p.add_argument("--keep", choices=["all", "verdict"],
                   help="outputs put in the shards: all, or those that beat the resize (default all)")
    p.add_argument("--night", help="the shards' night (default: --augment-salt, else the UTC date)")
    p.add_argument("--num-gpus", type=float,
                   help=f"GPUs per task; fractions pack several trainings per GPU (default: {AUTO_NUM_GPUS_TEXT})")
    p.add_argument("--num-cpus", type=float, help="CPUs per task")
    p.add_argument("--max-in-flight", type=int, help="images submitted at once")
    p.add_argument("--bundle-size", type=_bundle_size, metavar="K|auto",
                   help=f"images a task trains as one fused model (default auto: {AUTO_BUNDLE_TEXT}; docs/cluster.md)")
    p.add_argument("--timeout", dest="timeout_s", type=float, help="per-image limit in seconds")
    p.add_argument("--retries", type=int, help="resubmissions after a lost worker or node")
    p.add_argument("--checkpoint-every", dest="checkpoint_every_s", type=float, metavar="SECONDS",
                   help="save the training state this often, so a retried task resumes its training (0: never; default 300)")
    p.add_argument("--resume", choices=["incremental", "overwrite"])
    p.add_argument("--retarget-only", action="store_true", default=None, help="reuse saved models, never train")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=None, help="skip quality metrics")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint URL (MinIO, moto, ...)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    return p


def _bundle_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or auto, got {text!r}") from None


def _split(text: str | None, cast: Any) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [cast(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"cannot parse {text!r} as a comma-separated list") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {k: getattr(args, k) for k in (
        "output", "preset", "ratio_policy", "iterations", "seed", "image_format", "num_gpus", "num_cpus",
        "max_in_flight", "bundle_size", "timeout_s", "retries", "checkpoint_every_s", "resume", "retarget_only", "metrics", "endpoint_url",
        "shapes", "max_shift", "bf16", "augment", "augment_salt", "augment_shift", "shards", "files", "keep",
        "night")}
    overrides["ratios"] = _split(args.ratios, float)
    overrides["sizes"] = _split(args.sizes, str)
    return load_config(args.config, overrides)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ProgressLine:
    """done / failed / skipped counts with rate and ETA, at most every few seconds."""

    def __init__(self, total: int, every_s: float = 5.0) -> None:
        self.total, self.every = total, every_s
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.start = self.last = time.monotonic()

    def update(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        now = time.monotonic()
        done = sum(self.counts.values())
        if now - self.last >= self.every or done == self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            _log(f"[{done}/{self.total}] ok={self.counts['ok']} failed={self.counts['failed']} "
                 f"skipped={self.counts['skipped']} | {rate * 60:.1f} img/min | eta {hms(eta)}")


def _carried_fields(table: pa.Table) -> list[tuple[str, str, pa.Field]]:
    """(manifest column, results column, field) for the columns carried through; a manifest
    column that clashes with a results column is renamed ``manifest_<name>``."""
    out = []
    for f in table.schema:
        if f.name in ("uri", "id"):
            continue
        name = f.name if f.name not in _BASE_COLUMNS else f"manifest_{f.name}"
        out.append((f.name, name, f.with_name(name)))
    return out


def resolve_relative(uri: str | None, manifest_uri: str) -> str | None:
    """A plain relative path in a manifest is relative to the manifest itself (like a link), so a
    folder of images and its manifest can move together."""
    if not isinstance(uri, str) or not uri or "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in manifest_uri:
        return f"{manifest_uri.rsplit('/', 1)[0]}/{uri}"
    return os.path.join(os.path.dirname(os.path.abspath(manifest_uri)), uri)


def _items(table: pa.Table, carried: list[tuple[str, str, pa.Field]], manifest_uri: str) -> Iterator[Item]:
    index = 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            uri = resolve_relative(row["uri"], manifest_uri)
            yield Item(index, row["id"], uri, {dst: row[src] for src, dst, _ in carried})
            index += 1


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    from ingan import __version__ as ingan_version

    return {"ingan": ingan_version, "python": platform.python_version(), "torch": str(torch.__version__),
            "ray": ray.__version__, "pyarrow": pyarrow.__version__}


def absolute_output(cfg: RunConfig) -> RunConfig:
    """A relative local output made absolute here, on the driver: Ray workers run in the
    directory their raylet was started from (``ray start``), not in the driver's, so a relative
    path would send the images to one folder and the results table to another."""
    if scheme_of(cfg.output) != "file" or "://" in cfg.output or os.path.isabs(cfg.output):
        return cfg
    return cfg.model_copy(update={"output": os.path.abspath(cfg.output)})


def run(cfg: RunConfig, manifest_uri: str, dry_run: bool = False) -> int:
    cfg = absolute_output(cfg)
    storage = cfg.storage()
    table = load_manifest(manifest_uri, storage)
    carried = _carried_fields(table)
    out = Folder(cfg.output, storage)
    if dry_run:
        return _dry_run(cfg, manifest_uri, out, table.num_rows, carried)

    started = time.time()
    run_id = runs.new_run_id(started)
    # Other runs may write into this output at once: the heartbeat tells them this one lives
    # (from its start, before Ray is up), and which runs it saw live decides whose rows its
    # results keep.
    heartbeat = runs.Heartbeat(out, run_id, manifest_uri, cfg.heartbeat_s, cfg.stale_after_s, started)
    live = heartbeat.start()
    try:
        night = cfg.resolve_night(started) if cfg.shards != "none" else None
        job, res, resolved = _plan(cfg, manifest_uri, run_id, out, table.num_rows, night)
        out.write_json(layout.CONFIG_NAME, resolved)
        _tidy(out, run_id, cfg.stale_after_s, live)
        carried_schema = pa.schema([f for _, _, f in carried])
        writer = _shard_writer(cfg, out, night, run_id, carried_schema)
        stream = ResultStream(out, carried_schema, run_id=run_id, started=started)
        progress = ProgressLine(table.num_rows)

        def on_record(item: Item, rec: Record) -> None:
            samples = rec.pop("samples", None) or []
            if writer is not None:
                writer.add(samples)
            stream.add(item.index, rec)
            progress.update(rec["status"])

        items = _items(table, carried, manifest_uri)
        if writer is not None:
            items = (writer.shard_done(i, job.tag, [t.name for t in job.targets_for(i.id)]) for i in items)
        executor.run_items(items, job, res, on_record)
        return _finish(cfg, out, stream, heartbeat.overlapped(), resolved, manifest_uri, writer)
    finally:
        heartbeat.stop()


def _shard_writer(cfg: RunConfig, out: Folder, night: str | None, run_id: str,
                  carried: pa.Schema) -> shards.ShardWriter | None:
    """This run's way into its night's shards (None with shards off); what dead runs of the night
    left outside its index is removed first."""
    if night is None:
        return None
    writer = shards.ShardWriter(out, night, cfg.shards, run_id, max_samples=cfg.shard_max_samples,
                                max_bytes=cfg.shard_max_bytes, lock_wait_s=cfg.lock_wait_s,
                                stale_after_s=cfg.stale_after_s, carried=carried)
    _log(f"shards: night {night} ({cfg.shards}, keep {cfg.keep}; files {'on' if cfg.files else 'off'}): "
         f"{writer.stats.night_samples} samples in {writer.stats.night_shards} shards so far, index {writer.stats.index}")
    if writer.removed:
        _log(f"removed shards dead runs left outside the night's index: {', '.join(writer.removed)}")
    return writer


def _dry_run(cfg: RunConfig, manifest_uri: str, out: Folder, n: int, carried: list[tuple[str, str, pa.Field]]) -> int:
    preset = cfg.preset if cfg.preset != "auto" else f"auto ({AUTO_PRESET_TEXT})"
    _log(f"dry run: {n} images from {manifest_uri} -> {out.uri('')}")
    _log(f"preset {preset}; ratios {cfg.ratios} ({cfg.ratio_policy}); sizes {cfg.sizes}; shapes {cfg.shapes}; "
         f"format {cfg.image_format}")
    if cfg.augment:
        _log(f"augment: {cfg.augment} variants per image, salt {cfg.augment_salt!r}, ratios {list(cfg.augment_ratios)}, "
             f"scales {list(cfg.augment_scales)}, shifts up to +-{cfg.augment_shift:g}")
    _log(f"resume {cfg.resume}; retries {cfg.retries}; timeout {cfg.timeout_s} s; carried columns {[c[1] for c in carried]}")
    _log(json.dumps(cfg.public_dict(), indent=2, default=str))
    return 0


def _plan(cfg: RunConfig, manifest_uri: str, run_id: str, out: Folder, n: int,
          night: str | None) -> tuple[Job, executor.Resources, dict[str, Any]]:
    """Join or start Ray, and size the run to it: the job, its resources and the resolved config."""
    _log(f"connecting to Ray: {cluster.connect(timeout_s=cfg.connect_timeout_s)}")
    gpus_now = cluster.cluster_gpus()
    # GPU workers may scale from zero: tasks are submitted for the GPUs the autoscaler may bring
    # up, since the pending ones are what make it bring them up.
    gpus_planned = max(gpus_now, cluster.autoscaler_max_gpus())
    gpus_expected = gpus_planned > 0
    preset = cfg.resolve_preset(gpus_expected)
    bundle = cfg.resolve_bundle_size(gpus_expected)
    num_gpus = cfg.resolve_num_gpus(gpus_expected, preset, bundle)
    slots = gpus_planned / num_gpus if num_gpus else cluster.cluster_cpus() / cfg.num_cpus
    in_flight = cfg.max_in_flight or max(4, int(2 * slots)) * bundle  # images: two bundles per slot
    res = executor.Resources(cfg.num_cpus, num_gpus, in_flight, cfg.retries, cfg.timeout_s, bundle)
    job = Job.of(cfg, preset, night)
    resolved = {**cfg.public_dict(), "preset_resolved": preset, "model_tag": job.tag, "num_gpus_resolved": num_gpus,
                "max_in_flight_resolved": in_flight, "bundle_size_resolved": bundle, "manifest": manifest_uri,
                "run_id": run_id, "night_resolved": night}
    _log(f"{n} images -> {out.uri('')} | preset {preset} | {num_gpus:g} GPU + {cfg.num_cpus:g} CPU per task "
         f"of {bundle} image{'s' if bundle > 1 else ''} | {in_flight} images in flight "
         f"| cluster GPUs now: {gpus_now:g}, at most: {gpus_planned:g}")
    return job, res, resolved


def _tidy(out: Folder, run_id: str, stale_after_s: float, live: set[str]) -> None:
    _log(f"run {run_id}; other live runs in this output: {', '.join(sorted(live)) or 'none'}")
    try:
        removed = runs.remove_dead(out, run_id, stale_after_s)
    except (StorageError, OSError) as exc:
        # A dead run's leftovers are in folders of their own: harmless to this run, which goes on.
        _log(f"warning: cannot remove what dead runs left in {out.uri('')}: {exc}")
        return
    if removed:
        _log(f"removed what dead runs left (no heartbeat for {stale_after_s:g} s): {', '.join(removed)}")


def _finish(cfg: RunConfig, out: Folder, stream: ResultStream, overlapped: frozenset[str], resolved: dict[str, Any],
            manifest_uri: str, writer: shards.ShardWriter | None) -> int:
    """Commit the last shard, write the results, summary and report; log what happened; the exit code."""
    shard_stats = None
    if writer is not None:
        writer.flush()
        shard_stats = writer.stats.as_dict()
    unwritten: list[str] = []

    def beside(table: pq.ParquetFile) -> None:
        # The summary and report describe the table written with them, every run's rows in it.
        told = describe(table, cfg.report_max_items)
        begun = min([stream.started, *(r["started"] for r in told.runs if r["started"])])
        summary = told.tally.summary(config=resolved, started=begun, finished=time.time(), versions=_versions(),
                                     runs=told.runs, shards=shard_stats)
        try:
            write_summary(out, summary)
            out.write_text(layout.REPORT_NAME, report.render_report(
                out, report.stored_records(out, told.first), title=f"InGAN retargeting: {manifest_uri}",
                max_items=cfg.report_max_items, counts=told.tally, runs=told.runs))
        except StorageError as exc:
            unwritten.append(str(exc))

    try:
        done = stream.finish(overlapped, cfg.lock_wait_s, cfg.stale_after_s, beside)
    except StorageError as exc:
        # The per-image outputs are safe under their markers; keep the rows not yet written too.
        results_uri = Folder(os.path.abspath(".")).write_bytes(f"ingan-results-{int(time.time())}.parquet",
                                                                stream.unwritten_bytes())
        _log(f"error: cannot write results to {out.uri('')}: {exc}\nrows written so far: "
             f"{out.uri(stream.parts_dir)}; the others kept locally: {results_uri}")
        return 1
    counts = stream.tally.status_counts()
    _log(f"done in {hms(time.time() - stream.started)}: ok={counts['ok']} skipped={counts['skipped']} "
         f"failed={counts['failed']}")
    _log_results(done, stream, cfg, out)
    if writer is not None:
        _log_shards(writer.stats)
    for problem in unwritten:
        _log(f"error: cannot write the summary or report: {problem}")
    for rec in stream.failures:
        _log(f"  failed {rec['id']}: [{rec['error_kind']}] {rec['error']}")
    if counts["failed"] > len(stream.failures):
        _log(f"  ... and {counts['failed'] - len(stream.failures)} more failures in {layout.RESULTS_NAME}")
    troubles = done.aside or done.missing or unwritten or (writer is not None and writer.stats.errors)
    return 0 if counts["failed"] == 0 and not troubles else 1


def _log_shards(stats: shards.ShardStats) -> None:
    _log(f"shards: {stats.samples} samples in {stats.shards} new shards of night {stats.night} "
         f"({stats.duplicates} the night held already); the night: {stats.night_samples} samples in "
         f"{stats.night_shards} shards, index {stats.index}")
    for problem in stats.errors:
        _log(f"error: shards not committed: {problem}; rerun the same night to add their samples")


def _log_results(done: Finished, stream: ResultStream, cfg: RunConfig, out: Folder) -> None:
    if done.aside:
        _log(f"error: {done.aside}: this run's {done.rows} rows are in {done.uri}; {layout.RESULTS_NAME}, "
             f"{layout.SUMMARY_NAME} and {layout.REPORT_NAME} are left as they were")
    else:
        others = f", and {done.kept} rows of runs that overlapped it" if done.kept else ""
        _log(f"results: {done.uri} ({done.rows} rows of run {stream.run_id}{others})\n"
             f"summary: {out.uri(layout.SUMMARY_NAME)}\nreport:  {out.uri(layout.REPORT_NAME)}")
    if done.missing:
        _log(f"error: {done.missing} rows of this run are missing from its table: another run removed its parts, "
             f"taking it for dead (no heartbeat for {cfg.stale_after_s:g} s); rerun the same command to list them "
             "(the images that finished are skipped)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        return run(cfg, args.manifest, args.dry_run)
    except (ConfigError, ManifestError, shards.ShardError) as exc:
        _log(f"error: {exc}")
        return 2
    except (StorageError, FileNotFoundError, PermissionError) as exc:
        _log(f"error: cannot read the manifest or write the output: {exc}")
        return 2
    except cluster.ClusterUnreachable as exc:
        _log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted: rerun the same command to resume; finished images are kept")
        return 130
