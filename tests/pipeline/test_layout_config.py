"""Pure units: output paths made from hostile ids, per-image seeds, target sizes, the model tag and
the config's handling of storage options."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pipeline import layout, records
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.storage import Folder, RetryPolicy
from pipeline.targets import MIN_OUTPUT_SIDE, Target, TargetError, targets_of

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "",
    "/abs/path",
    "a/b",
    "a_b",
    "a\\b",
    "a b",
    "ctrl\x00\x01\x1f\x7fchars",
    "new\nline",
    "x" * 5000,
    "x" * 5000 + "y",
    "фото/снимок",
    "emoji-😀",
    "surrogate-\udcff",
    "-starts-with-dash",
    "....hidden",
]
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]+$")


def test_item_keys_are_safe_short_and_distinct() -> None:
    keys = [layout.item_key(i) for i in HOSTILE_IDS]
    for item_id, key in zip(HOSTILE_IDS, keys, strict=True):
        assert _SAFE_KEY.match(key), (item_id, key)
        assert "/" not in key and "\\" not in key
        assert key not in ("", ".", "..") and not key.startswith((".", "-"))
        assert len(key) <= 70, (item_id, len(key))
        assert layout.item_key(item_id) == key  # stable
    assert len(set(keys)) == len(keys), "two ids share an output folder"


def test_ids_differing_only_in_unsafe_characters_get_distinct_keys() -> None:
    assert layout.item_key("a/b") != layout.item_key("a_b")
    assert layout.item_key("a/b") != layout.item_key("a\\b")
    assert layout.item_key("x" * 5000) != layout.item_key("x" * 5000 + "y")  # same slug prefix


def test_keys_stay_readable() -> None:
    assert layout.item_key("cat photo.jpg").startswith("cat_photo.jpg-")
    assert layout.item_key("../../etc/passwd").startswith("etc_passwd-")


@pytest.mark.parametrize("item_id", HOSTILE_IDS)
def test_every_path_stays_inside_the_output(item_id: str) -> None:
    folder = Folder("memory://layout-test/out")
    tag = "tiny-2it-seed0-abcdef12"
    key = layout.item_key(item_id)
    for rel in (
        layout.model_path(item_id, tag),
        layout.source_preview_path(item_id, tag),
        layout.output_path(item_id, tag, 64, 32, "png"),
        layout.metrics_path(item_id, tag),
        layout.marker_path(item_id, tag),
    ):
        assert rel.startswith(f"items/{key}/{tag}/")
        parts = rel.split("/")
        assert ".." not in parts and "" not in parts and "." not in parts
        assert folder.path(rel).startswith("/layout-test/out/items/")  # Folder accepts it


def test_item_seed_is_stable_and_depends_on_id_and_run_seed() -> None:
    # Pinned: a changed derivation would silently retrain every image of a resumed run.
    assert records.item_seed(0, "a") == 1595580616
    assert records.item_seed(7, "astronaut") == 1948450066
    assert records.item_seed(0, "a") == records.item_seed(0, "a")
    assert records.item_seed(0, "a") != records.item_seed(0, "b")
    assert records.item_seed(0, "a") != records.item_seed(1, "a")
    assert records.item_seed(0, "a/b") != records.item_seed(0, "a_b")
    seeds = [records.item_seed(0, i) for i in HOSTILE_IDS]
    assert all(0 <= s < 2**32 for s in seeds)
    assert len(set(seeds)) == len(seeds)


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("policy", "ratio", "src", "expected"),
    [
        ("keep_height", 2.0, (72, 48), (96, 48)),
        ("keep_height", 0.5, (72, 48), (24, 48)),
        ("keep_height", 1.0, (72, 48), (48, 48)),
        ("keep_height", 1.5, (33, 33), (50, 33)),  # round(49.5) == 50: round half to even
        ("keep_width", 2.0, (72, 48), (72, 36)),
        ("keep_width", 0.5, (72, 48), (72, 144)),
        (
            "keep_area",
            2.0,
            (72, 48),
            (round(math.sqrt(72 * 48 * 2)), round(math.sqrt(72 * 48 / 2))),
        ),
        ("keep_area", 1.0, (100, 25), (50, 50)),
        ("keep_height", 1 / 32, (100, 64), (MIN_OUTPUT_SIDE, 64)),  # 2 px wide -> clamped to 8
    ],
)
def test_ratio_targets_resolve(
    policy: str, ratio: float, src: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert Target(f"ratio:{ratio}", ratio=ratio).resolve(*src, policy) == expected


def test_keep_area_keeps_the_area_and_the_ratio() -> None:
    w, h = Target("ratio:3.0", ratio=3.0).resolve(640, 480, "keep_area")
    assert abs(w * h - 640 * 480) / (640 * 480) < 0.01
    assert abs(w / h - 3.0) < 0.01


def test_explicit_size_ignores_source_and_policy() -> None:
    t = Target("size:40x30", size=(40, 30))
    for policy in ("keep_height", "keep_width", "keep_area"):
        assert t.resolve(1000, 10, policy) == (40, 30)


def test_oversized_target_is_an_error() -> None:
    with pytest.raises(TargetError, match="16384"):
        Target("ratio:32.0", ratio=32.0).resolve(2000, 1000, "keep_height")


def test_targets_of_config() -> None:
    cfg = RunConfig(ratios=[0.5, 2], sizes=["256X128", " 64x64 "])
    targets = targets_of(cfg)
    assert [t.name for t in targets] == ["ratio:0.5", "ratio:2.0", "size:256x128", "size:64x64"]
    assert targets[2].size == (256, 128)


# --------------------------------------------------------------------------- model tag


def _tag(**settings: object) -> str:
    cfg = RunConfig(**settings)
    return cfg.model_tag(str(settings.get("preset", "tiny")))


def test_model_tag_names_the_learning_settings() -> None:
    tag = _tag(preset="tiny", iterations=2, seed=7)
    assert re.fullmatch(r"tiny-2it-seed7-[0-9a-f]{8}", tag), tag
    assert _tag(preset="tiny").startswith("tiny-1000it-seed0-")  # the preset's own count


def test_model_tag_changes_with_what_the_model_learns() -> None:
    base = _tag(preset="tiny", iterations=2, seed=0)
    assert _tag(preset="fast", iterations=2, seed=0) != base
    assert _tag(preset="tiny", iterations=3, seed=0) != base
    assert _tag(preset="tiny", iterations=2, seed=1) != base


def test_model_tag_ignores_everything_else() -> None:
    base = _tag(preset="tiny", iterations=2, seed=0)
    for other in (
        {"image_format": "webp"},
        {"image_format": "jpeg"},
        {"ratios": [3.0]},
        {"sizes": ["64x64"]},
        {"ratio_policy": "keep_area"},
        {"metrics": False},
        {"output": "s3://elsewhere/out"},
        {"num_cpus": 4, "num_gpus": 0.5, "max_in_flight": 9, "retries": 0, "timeout_s": 10},
        {"resume": "overwrite"},
        {"storage_options": {"key": "k", "secret": "s"}, "endpoint_url": "http://127.0.0.1:9"},
        {"bf16": True},  # how the model is computed, not what it learns
        {"bf16": False},
    ):
        assert _tag(preset="tiny", iterations=2, seed=0, **other) == base, other
    assert _tag(preset="cpu", bf16=False) == _tag(preset="cpu", bf16=True) == _tag(preset="cpu")


def test_bf16_is_the_presets_unless_set() -> None:
    from pipeline.driver import build_parser, config_from_args

    assert RunConfig().model_settings("cpu")[1].bf16 is None  # where the CPU has it natively
    assert RunConfig().model_settings("fast")[1].bf16 is False
    assert RunConfig(bf16=True).model_settings("fast")[1].bf16 is True
    assert RunConfig(bf16=False).model_settings("cpu")[1].bf16 is False
    parser = build_parser()
    for flags, want in (([], None), (["--bf16"], True), (["--no-bf16"], False)):
        assert config_from_args(parser.parse_args(["m.parquet", *flags])).bf16 is want, flags


# --------------------------------------------------------------------------- config


def test_storage_carries_credentials_endpoint_and_policy() -> None:
    cfg = RunConfig(storage_options={"key": "K", "secret": "S"}, endpoint_url="http://127.0.0.1:9",
                    storage_attempts=3, storage_connect_timeout_s=2, storage_read_timeout_s=7)
    storage = cfg.storage()
    assert storage.options == {"key": "K", "secret": "S", "endpoint_url": "http://127.0.0.1:9"}
    assert storage.policy == RetryPolicy(attempts=3, connect_timeout_s=2, read_timeout_s=7)
    # S3 calls get the policy's time-outs and one botocore attempt; other schemes the options as they are.
    assert storage.fs_options("s3://b/k")["config_kwargs"] == {
        "connect_timeout": 2, "read_timeout": 7, "retries": {"mode": "standard", "total_max_attempts": 1}}
    assert storage.fs_options("/tmp/x") == storage.options
    # An endpoint inside storage_options wins over the flag.
    cfg = RunConfig(storage_options={"endpoint_url": "http://a"}, endpoint_url="http://b")
    assert cfg.storage().options["endpoint_url"] == "http://a"


def test_public_dict_holds_no_secret_values() -> None:
    cfg = RunConfig(storage_options={"key": "AKIAXYZ", "secret": "hunter2", "token": "tok"})
    public = cfg.public_dict()
    assert public["storage_options"] == ["key", "secret", "token"]
    text = repr(public)
    for value in ("AKIAXYZ", "hunter2", "tok'"):
        assert value not in text


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"preset": "huge"}, "preset"),
        ({"ratios": [0.0]}, "ratios"),
        ({"ratios": [-1.0]}, "ratios"),
        ({"ratios": [float("nan")]}, "ratios"),
        ({"ratios": [64.0]}, "ratios"),
        ({"sizes": ["3x3"]}, "sizes"),
        ({"sizes": ["64x99999"]}, "sizes"),
        ({"sizes": ["wide"]}, "sizes"),
        ({"iterations": 0}, "iterations"),
        ({"resume": "sometimes"}, "resume"),
    ],
)
def test_invalid_settings_name_the_field(overrides: dict[str, object], field_name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert re.search(rf"^\s*{field_name}(\.\d+)?: ", str(info.value), re.MULTILINE), str(info.value)


def test_nothing_to_produce_is_refused() -> None:
    with pytest.raises(ConfigError, match="nothing to produce"):
        load_config(None, {"ratios": [], "sizes": []})


def test_unknown_yaml_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("presett: tiny\n")
    with pytest.raises(ConfigError, match="presett"):
        load_config(str(path), {})


def test_flags_override_the_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("preset: fast\nseed: 3\nratios: [1, 2]\n")
    cfg = load_config(str(path), {"preset": "tiny", "seed": None})
    assert (cfg.preset, cfg.seed, cfg.ratios) == ("tiny", 3, [1.0, 2.0])


def test_auto_preset_is_cpu_without_gpus_and_fast_with_them() -> None:
    auto = RunConfig(output="/tmp/out")
    assert auto.resolve_preset(False) == "cpu"
    assert auto.resolve_preset(True) == "fast"
    assert RunConfig(output="/tmp/out", preset="tiny").resolve_preset(True) == "tiny"


def test_auto_gpu_share_packs_four_capped_trainings_per_gpu_and_an_explicit_share_wins() -> None:
    auto = RunConfig(output="/tmp/out")
    assert auto.resolve_num_gpus(True, "fast") == 0.25
    assert auto.resolve_num_gpus(True, "cpu") == 0.25
    assert auto.resolve_num_gpus(True, "paper") == 1.0  # uncapped working image: a GPU of its own
    assert auto.resolve_num_gpus(False, "cpu") == 0.0
    assert RunConfig(output="/tmp/out", num_gpus=1).resolve_num_gpus(True, "fast") == 1.0
    assert RunConfig(output="/tmp/out", num_gpus=0.5).resolve_num_gpus(False, "paper") == 0.5


def test_auto_bundles_are_one_image_on_cpus_and_eight_on_gpus_each_bundle_a_whole_gpu() -> None:
    import pydantic

    from pipeline.driver import _bundle_size

    auto = RunConfig(output="/tmp/out")
    assert auto.resolve_bundle_size(gpus_expected=False) == 1
    assert auto.resolve_bundle_size(gpus_expected=True) == 8
    assert RunConfig(output="/tmp/out", bundle_size=3).resolve_bundle_size(gpus_expected=True) == 3
    assert auto.resolve_num_gpus(True, "fast", bundle_size=8) == 1.0  # a bundle takes the GPU
    assert auto.resolve_num_gpus(True, "fast", bundle_size=1) == 0.25
    assert RunConfig(output="/tmp/out", num_gpus=0.5).resolve_num_gpus(True, "fast", bundle_size=4) == 0.5
    assert _bundle_size("auto") == "auto" and _bundle_size("16") == 16
    for bad in (0, 257, "many"):
        with pytest.raises(pydantic.ValidationError):
            RunConfig(output="/tmp/out", bundle_size=bad)


def test_model_tags_do_not_change_when_a_setting_is_added_or_removed() -> None:
    """Saved models are found by their tag: a release that adds a training setting at its
    default, or removes one that every preset trained at one value, must still find the models
    an earlier one trained."""
    from pipeline.config import RunConfig

    assert RunConfig().model_tag("cpu") == "cpu-1200it-seed0-800d960b"
    assert RunConfig().model_tag("paper") == "paper-75000it-seed0-cc2c8ab2"
    assert RunConfig().model_tag("fast") == "fast-10000it-seed0-32c2f483"
    assert RunConfig().model_tag("tiny") == "tiny-1000it-seed0-ba3ed34d"
    assert RunConfig(seed=3, iterations=50).model_tag("tiny").startswith("tiny-50it-seed3-")
