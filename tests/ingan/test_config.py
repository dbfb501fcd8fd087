"""Tests for ingan.config: the model tags saved models are found by, and configs saved by older
versions."""

from __future__ import annotations

import dataclasses

import pytest

from ingan.config import (
    PRESETS,
    REMOVED_OPTIONS,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    model_tag,
)

# Saved models are found by these names: a change to any of them orphans every model trained
# with that preset. Written by the version that still had the removed options.
PRESET_TAGS = {
    "paper": "paper-75000it-seed0-cc2c8ab2",
    "fast": "fast-10000it-seed0-32c2f483",
    "cpu": "cpu-1200it-seed0-800d960b",
    "tiny": "tiny-1000it-seed0-ba3ed34d",
}


@pytest.mark.parametrize("name", sorted(PRESET_TAGS))
def test_the_presets_model_tags_do_not_move(name: str) -> None:
    preset = PRESETS[name]
    assert model_tag(name, preset.model, preset.train, 0) == PRESET_TAGS[name]


def test_a_tag_names_what_a_model_learns_and_nothing_else() -> None:
    tiny = PRESETS["tiny"]
    tag = model_tag("tiny", tiny.model, tiny.train, 0)
    same = [dataclasses.replace(tiny.train, log_every=7), dataclasses.replace(tiny.train, seed=9),
            dataclasses.replace(tiny.train, bf16=True), dataclasses.replace(tiny.train, bf16=None)]
    assert {model_tag("tiny", tiny.model, t, 0) for t in same} == {tag}
    other = [model_tag("tiny", tiny.model, dataclasses.replace(tiny.train, lr=1e-4), 0),
             model_tag("tiny", dataclasses.replace(tiny.model, image_skip=True), tiny.train, 0),
             model_tag("tiny", tiny.model, tiny.train, 1)]
    assert len({tag, *other}) == 4
    assert other[-1].startswith("tiny-1000it-seed1-")


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_a_removed_option_at_todays_value_is_dropped(cls: type) -> None:
    saved = dataclasses.asdict(cls()) | REMOVED_OPTIONS[cls.__name__]
    for strict in (False, True):
        assert config_from_dict(cls, saved, strict=strict) == cls()


@pytest.mark.parametrize(("cls", "name", "value"), [
    (ModelConfig, "spectral_norm", False), (ModelConfig, "d_batch_norm", False), (ModelConfig, "skip_clamp_grad", False),
    (TrainConfig, "second_g_step", False), (TrainConfig, "tone_weight", 1.0), (TrainConfig, "ema", 0.999),
    (TrainConfig, "crops_per_step", 4), (TrainConfig, "stretch_negative", 2.0), (TrainConfig, "deterministic", False),
    (TrainConfig, "channels_last", False),
])
def test_a_removed_option_at_another_value_is_refused_only_when_strict(cls: type, name: str, value: object) -> None:
    saved = dataclasses.asdict(cls()) | {name: value}
    assert config_from_dict(cls, saved, strict=False) == cls()
    with pytest.raises(ValueError, match=name):
        config_from_dict(cls, saved, strict=True)


def test_an_unknown_option_is_not_taken_for_a_removed_one() -> None:
    with pytest.raises(TypeError):
        config_from_dict(TrainConfig, dataclasses.asdict(TrainConfig()) | {"bogus": 1}, strict=False)
    assert config_from_dict(TrainConfig, {"iterations": 5}, strict=True) == TrainConfig(iterations=5)
