"""The run's configuration: one pydantic model, from a YAML file and command-line flags over it.

This is the boundary where user input is checked; everything past it (the driver, the tasks, the
``ingan`` dataclasses built from it) can trust what it is handed. Storage options may hold
credentials: they are excluded from every dump that is logged or written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ingan.config import PRESETS, ModelConfig, TrainConfig, get_preset, model_tag
from ingan.geometry import MAX_SHIFT
from ingan.images import DEFAULT_FORMAT, FORMAT_NAMES
from ingan.retarget import parse_shape, parse_size, shape_name

from .layout import night_name
from .storage import RetryPolicy, Storage

# GPU defaults: what preset auto, bundle_size auto and num_gpus None come to on a cluster with
# GPUs (or an autoscaler that may bring some up) and on one without. The driver resolves them
# once it has joined the cluster (``RunConfig.resolve_*``); the *_TEXT lines say them in the
# fields' descriptions, the flags' help and the dry run.
AUTO_PRESET_GPU, AUTO_PRESET_CPU = "fast", "cpu"
AUTO_PRESET_TEXT = f"{AUTO_PRESET_GPU} with GPUs, {AUTO_PRESET_CPU} without"

# Images per bundle on a GPU when ``bundle_size`` is auto. One training leaves an H200 idle 90% of
# the time, its kernels launched one by one; a bundle of K launches each kernel once for K
# images. The projection from the measured launch and kernel times has the GPU's kernels, not
# the launches, set the pace from K = 8 (BENCHMARKS.md, "Fused training"), and 8 trainings of
# `fast` (2.3 GiB each at most, measured alone) fit the 24 GB GPU of cluster.yaml's g5.xlarge.
# docs/cluster.md sizes K to other GPUs. Without GPUs, two trainings at once, a thread each, beat
# a bundle of two on a 2-core CPU (BENCHMARKS.md, "Fused training").
AUTO_BUNDLE_GPU = 8
AUTO_BUNDLE_TEXT = f"1 without GPUs, {AUTO_BUNDLE_GPU} with"

# A training iteration launches thousands of small kernels, one at a time from its host thread,
# and leaves the GPU idle most of the time: on an H200, fast's iteration is 246 ms of wall time
# for 25 ms of kernels, and four trainings per GPU train 3.7 times as many images per GPU-hour as
# one (BENCHMARKS.md, "GPU"). Four at once fit a 16 GB GPU (fast peaks at 2.3 GiB each). A bundle
# of several images, or paper (no cap on the working image: its memory grows with the source),
# takes a whole GPU.
AUTO_GPU_SHARE = 0.25
AUTO_NUM_GPUS_TEXT = f"with GPUs {AUTO_GPU_SHARE:g} for a task of one image, 1 for a bundle or paper; 0 without"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output: str = Field("output", description="URI of the output folder (local path, s3://...)")
    preset: str = Field("auto", description=f"paper, fast, cpu, tiny, or auto: {AUTO_PRESET_TEXT}")
    iterations: int | None = Field(None, ge=1, le=10_000_000, description="override the preset's iterations")
    seed: int = Field(0, ge=0, description="run seed; each image's seed derives from it and the image id")
    ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], description="output width/height ratios")
    ratio_policy: Literal["keep_height", "keep_width", "keep_area"] = "keep_height"
    sizes: list[str] = Field(default_factory=list, description="explicit output sizes, WxH")
    shapes: list[str] = Field(
        default_factory=list,
        description="shaped outputs: a ratio or WxH with top-corner shifts, e.g. 2@0.3,-0.3 or 256x256@0.2,0.2")
    max_shift: float | None = Field(
        None, ge=0, le=MAX_SHIFT, description="train with top-corner shifts up to this (0..0.9); None: the preset's")
    bf16: bool | None = Field(
        None, description="bfloat16 training: true, false, or None for the preset's (cpu: on CPUs that have it natively)")
    fill_color: tuple[int, int, int] = Field(
        (255, 255, 255), description="JPEG only: colour outside a shaped output's frame (its mask is a file beside it)")
    augment: int = Field(0, ge=0, le=1000, description="random variants per image per run, from its one model")
    augment_salt: str = Field("", max_length=200, description="per-run text mixed into the variants' seeds (a date)")
    augment_ratios: tuple[float, float] = Field((0.5, 2.0), description="variants' width/height range (log-uniform)")
    augment_scales: tuple[float, float] = Field((0.75, 1.25), description="variants' size range against the ratio's size")
    augment_shift: float = Field(0.0, ge=0, le=MAX_SHIFT, description="variants' top-corner shift range, +-; 0: rectangles")
    image_format: Literal[FORMAT_NAMES] = DEFAULT_FORMAT  # type: ignore[valid-type]
    # Outputs as dataset shards a training job reads (pipeline.shards), beside the per-output files
    # or instead of them. Files stay the default: the report, `ingan retarget` users and anyone
    # browsing one image's outputs read them, and a run without shards writes what it always did.
    shards: Literal["none", "webdataset", "parquet"] = Field(
        "none", description="write the outputs as shards too: WebDataset tars, or Parquet with the image bytes")
    files: bool = Field(True, description="each output as its own file under items/; false: in the shards only")
    keep: Literal["all", "verdict"] = Field(
        "all", description="outputs put in the shards: all, or only those whose verdict (beats_resize) is true")
    night: str | None = Field(
        None, min_length=1, max_length=200,
        description="the shards' night (their folder and index); default: the augment salt, else the run's UTC date")
    shard_max_samples: int = Field(1000, ge=1, le=1_000_000, description="samples per shard at most")
    shard_max_bytes: int = Field(256 * 2**20, ge=2**16, le=4 * 2**30,
                                 description="bytes per shard at most (one sample larger than this is a shard alone)")
    metrics: bool = Field(True, description="score every output against its source")
    metrics_max_side: int = Field(192, ge=16, description="images are scored at most this large")
    num_gpus: float | None = Field(None, ge=0, le=8, description=f"GPUs per task; fractions pack trainings; None: {AUTO_NUM_GPUS_TEXT}")
    num_cpus: float = Field(1, gt=0, le=256, description="CPUs per task (also its torch threads)")
    max_in_flight: int | None = Field(None, ge=1, le=100_000, description="images submitted at once; None: auto")
    bundle_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = Field(
        "auto", description=f"images a task trains as one fused model (a bundle); auto: {AUTO_BUNDLE_TEXT} (docs/cluster.md)")
    timeout_s: float | None = Field(6 * 3600, gt=0, description="per-image limit, seconds")
    retries: int = Field(2, ge=0, le=20, description="resubmissions after a lost worker or node")
    connect_timeout_s: float = Field(30.0, gt=0, le=3600, description="give up on a Ray cluster that does not answer after this long")
    checkpoint_every_s: float = Field(
        300, ge=0, description="save the training state this often (seconds; 0: never), so a retried task resumes")
    resume: Literal["incremental", "overwrite"] = "incremental"
    # Runs sharing an output folder (pipeline.runs): each renews its heartbeat while it lives, and
    # one silent for stale_after_s is dead, its leftovers removed by the next run to start.
    heartbeat_s: float = Field(
        30.0, gt=0, le=3600, description="how often a live run renews its heartbeat, runs/{run id}.json in the output")
    stale_after_s: float = Field(
        600.0, gt=0, description="a run whose heartbeat is older than this is dead: its leftover parts are removed, "
                                 "a results lock it left may be broken")
    lock_wait_s: float = Field(
        60.0, ge=0, le=3600, description="how long a finishing run waits for results.lock before it writes its "
                                         "rows as results.{run id}.parquet instead (exit code 1)")
    retarget_only: bool = Field(False, description="never train: images without a saved model fail")
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file", "s3"], description="URI schemes inputs may use")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger declared images are refused")
    max_image_bytes: int = Field(200_000_000, ge=1, description="larger input objects are refused")
    min_image_side: int = Field(24, ge=17, description="smaller images are refused as too small to train on")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...)")
    # One retry loop for every storage call (botocore and s3fs make one attempt each): a dead
    # endpoint costs at most storage_attempts x (connect + read time-out) plus backoff per call.
    storage_attempts: int = Field(5, ge=1, le=20, description="tries per storage call")
    storage_connect_timeout_s: float = Field(5.0, gt=0, le=600, description="S3 connect time-out, seconds")
    storage_read_timeout_s: float = Field(20.0, gt=0, le=3600, description="S3 read time-out, seconds")
    # repr=False: a logged or printed config (or a Job holding it) must not show credentials.
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, description="fsspec options; never logged")
    report_max_items: int = Field(200, ge=0)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v != "auto" and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: auto, {', '.join(PRESETS)}")
        return v

    @field_validator("ratios", "sizes", "shapes")
    @classmethod
    def _distinct_targets(cls, v: list[Any], info: ValidationInfo) -> list[Any]:
        """Each target checked and spelled one way, so two spellings of one target are caught."""
        out = [_CANONICAL[info.field_name](t) for t in v]
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate {info.field_name} in {v}")
        return out

    @field_validator("fill_color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"fill_color {list(v)} must be three values 0..255 (R, G, B)")
        return v

    @field_validator("augment_ratios", "augment_scales")
    @classmethod
    def _draw_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        """A (low, high) range the variants are drawn from, each end a sane ratio or scale."""
        if info.field_name == "augment_ratios":
            for r in v:
                check_ratio(r)
        elif any(not math.isfinite(x) or not 1 / 16 <= x <= 16 for x in v):
            raise ValueError(f"augment_scales {list(v)}: each scale must be within 1/16..16")
        if v[0] > v[1]:
            raise ValueError(f"{info.field_name} {list(v)}: the low end comes first")
        return v

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        return [s.lower() for s in v]

    @model_validator(mode="after")
    def _some_target(self) -> RunConfig:
        if not self.ratios and not self.sizes and not self.shapes and not self.augment:
            raise ValueError("nothing to produce: give at least one ratio, size or shape, or augment")
        return self

    @model_validator(mode="after")
    def _shard_options(self) -> RunConfig:
        wrong = [why for why, bad in (
            ("files: false writes the outputs nowhere without shards: set shards too",
             not self.files and self.shards == "none"),
            ("keep: verdict chooses the outputs put in shards by their verdict: it needs shards and metrics",
             self.keep == "verdict" and (self.shards == "none" or not self.metrics))) if bad]
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> RunConfig:
        # A live run whose beats are further apart than this would look dead between two of them.
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s:g}) must be at least twice heartbeat_s ({self.heartbeat_s:g})")
        return self

    # -- derived ---------------------------------------------------------------------------------
    def storage(self) -> Storage:
        """How every read and write reaches storage (its options hold credentials: never log them)."""
        policy = RetryPolicy(self.storage_attempts, self.storage_connect_timeout_s, self.storage_read_timeout_s)
        return Storage.of(self.storage_options, self.endpoint_url, policy)

    def resolve_night(self, started: float) -> str:
        """The night this run's shards belong to: ``night``, else the augment salt (which already
        makes a night's variants its own), else the UTC date the run started."""
        text = self.night or self.augment_salt or time.strftime("%Y-%m-%d", time.gmtime(started))
        return night_name(text)

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as saved beside the results: no storage options."""
        d = self.model_dump(exclude={"storage_options"})
        d["storage_options"] = sorted(self.storage_options)  # which keys were set, never values
        return d

    def model_settings(self, preset: str) -> tuple[ModelConfig, TrainConfig]:
        p = get_preset(preset)
        return p.model, p.train.with_overrides(iterations=self.iterations, max_shift=self.max_shift, bf16=self.bf16)

    def model_tag(self, preset: str) -> str:
        """The name of this run's models of ``preset``: ``ingan.config.model_tag``."""
        model, train = self.model_settings(preset)
        return model_tag(preset, model, train, self.seed)

    # -- GPU defaults (AUTO_*), resolved for a cluster with or without GPUs ----------------------
    def resolve_preset(self, gpus_expected: bool) -> str:
        if self.preset != "auto":
            return self.preset
        return AUTO_PRESET_GPU if gpus_expected else AUTO_PRESET_CPU

    def resolve_bundle_size(self, gpus_expected: bool) -> int:
        if self.bundle_size != "auto":
            return int(self.bundle_size)
        return AUTO_BUNDLE_GPU if gpus_expected else 1

    def resolve_num_gpus(self, gpus_expected: bool, preset: str, bundle_size: int = 1) -> float:
        """GPUs per task of ``bundle_size`` images of ``preset``."""
        if self.num_gpus is not None:
            return self.num_gpus
        if not gpus_expected:
            return 0.0
        return AUTO_GPU_SHARE if get_preset(preset).train.max_side is not None and bundle_size == 1 else 1.0


def check_ratio(r: float) -> float:
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"ratio {r} must be a positive number")
    if not 1 / 32 <= r <= 32:
        raise ValueError(f"ratio {r} is absurd: keep width/height between 1/32 and 32")
    return r


def canonical_size(text: str) -> str:
    """A size ('WxH') checked and spelled one way."""
    w, h = parse_size(text)
    return f"{w}x{h}"


def canonical_shape(text: str) -> str:
    """A shape as given ('2@0.3,-0.3', '256x128@0,0.2') checked and spelled one way."""
    base, shifts = parse_shape(text)
    if "x" in base.lower():
        base = canonical_size(base)
    else:
        try:
            ratio = float(base)
        except ValueError:
            raise ValueError(f"shape {text!r} must start with a ratio or WxH, e.g. 2@0.3,-0.3") from None
        try:
            base = repr(check_ratio(ratio))
        except ValueError as exc:
            raise ValueError(f"shape {text!r}: {exc}") from None
    return shape_name(base, shifts)


_CANONICAL: dict[str, Callable[[Any], Any]] = {"ratios": check_ratio, "sizes": canonical_size, "shapes": canonical_shape}


def load_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """YAML file (optional) with flags over it; ``None`` values in ``overrides`` mean 'not given'."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of field: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**data)
    except Exception as exc:  # pydantic.ValidationError: reword as one readable message
        errors = getattr(exc, "errors", None)
        if callable(errors):
            lines = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errors()]
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
        raise ConfigError(str(exc)) from None
