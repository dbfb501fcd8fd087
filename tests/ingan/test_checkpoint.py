"""Tests for ingan.checkpoint: bit-identical round trips and refusing anything else."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from support import assert_same_state

from ingan import checkpoint
from ingan.checkpoint import CheckpointError
from ingan.config import get_preset
from ingan.fit import resume_from_bytes, saved_state
from ingan.images import to_model_input
from ingan.retarget import retarget, retarget_image
from ingan.train import Trainer, build_models

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = get_preset("tiny")
SIZES = [(16, 40), (33, 21), (40, 40)]


@pytest.fixture(scope="module")
def trained() -> Trainer:
    """A tiny generator trained for a few iterations (so every BN and SN buffer has moved)."""
    image = torch.rand(3, 36, 44, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(TINY.train, iterations=4, seed=3)
    t = Trainer([to_model_input(image)], TINY.model, cfg, "cpu")
    t.run()
    return t


@pytest.fixture(scope="module")
def saved(trained: Trainer) -> bytes:
    ckpt = checkpoint.from_generator(trained.g, TINY.model, trained.cfg, {"note": "test", "hw": [36, 44]})
    return checkpoint.save(ckpt)


def _source() -> torch.Tensor:
    return torch.randint(0, 256, (3, 36, 44), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_round_trip_is_bit_identical(trained: Trainer, saved: bytes) -> None:
    ckpt = checkpoint.load(saved)
    assert ckpt.model == TINY.model
    assert ckpt.train == trained.cfg
    assert ckpt.meta == {"note": "test", "hw": [36, 44]}

    g = ckpt.build_generator()
    assert not g.training
    assert_same_state(trained.g, g)

    image = to_model_input(_source())
    assert not trained.g.training
    for a, b in zip(retarget(trained.g, image, SIZES), retarget(g, image, SIZES), strict=True):
        assert torch.equal(a, b)
    src = _source()
    for a, b in zip(retarget_image(trained.g, src, SIZES, 30), retarget_image(g, src, SIZES, 30), strict=True):
        assert torch.equal(a, b)


def test_save_to_a_file_and_load_from_a_stream(trained: Trainer, saved: bytes, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    ckpt = checkpoint.from_generator(trained.g, TINY.model, trained.cfg, {"note": "test", "hw": [36, 44]})
    with path.open("wb") as f:
        data = checkpoint.save(ckpt, f)
    assert path.read_bytes() == data
    with path.open("rb") as f:
        again = checkpoint.load(f)
    for k, v in ckpt.generator.items():
        assert torch.equal(again.generator[k], v)


def test_from_generator_copies_the_weights() -> None:
    g, _ = build_models(TINY.model, 32, seed=0, device=torch.device("cpu"))
    g = g.to(memory_format=torch.channels_last)
    ckpt = checkpoint.from_generator(g, TINY.model, TINY.train)
    snapshot = {k: v.clone() for k, v in ckpt.generator.items()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    for k, v in ckpt.generator.items():
        assert torch.equal(v, snapshot[k]), k
        assert v.device.type == "cpu" and v.is_contiguous()


def test_garbage_bytes_raise() -> None:
    for data in (b"", b"not a checkpoint at all", os.urandom(4096), b"PK\x03\x04" + b"\x00" * 100):
        with pytest.raises(CheckpointError):
            checkpoint.load(data)


def test_truncated_checkpoint_raises(saved: bytes) -> None:
    for cut in (len(saved) // 2, len(saved) - 100, 64):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            checkpoint.load(saved[:cut])


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_dict_without_the_format_marker_raises(saved: bytes) -> None:
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    assert payload["format"] == checkpoint.FORMAT  # the marker the loader looks for
    for bad in ({k: v for k, v in payload.items() if k != "format"}, {**payload, "format": "other"},
                {"generator": {}}, [1, 2, 3], torch.zeros(3)):
        with pytest.raises(CheckpointError, match="format marker"):
            checkpoint.load(_torch_bytes(bad))


def test_wrong_version_and_inconsistent_contents_raise(saved: bytes) -> None:
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    with pytest.raises(CheckpointError, match="version"):
        checkpoint.load(_torch_bytes({**payload, "version": 99}))
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        checkpoint.load(_torch_bytes({k: v for k, v in payload.items() if k != "generator"}))
    # Weights of a tiny model under the paper model's config: shapes do not match.
    paper = dataclasses.asdict(get_preset("paper").model)
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        checkpoint.load(_torch_bytes({**payload, "model_config": paper}))
    # An unknown config field.
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        checkpoint.load(_torch_bytes({**payload, "train_config": {**payload["train_config"], "bogus": 1}}))
    # A missing tensor.
    gen = dict(payload["generator"])
    gen.pop(next(iter(gen)))
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        checkpoint.load(_torch_bytes({**payload, "generator": gen}))


@pytest.mark.parametrize(
    "change",
    [{"model_config": {"g_res_squeeze": 0}}, {"model_config": {"g_channels": 0}},
     {"model_config": {"g_channels": -4}}, {"model_config": {"g_downsamples": 2.5}},
     {"meta": "ab"}, {"meta": 5}, {"model_config": None}, {"generator": [1, 2]}],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_malformed_fields_raise_checkpoint_error_only(saved: bytes, change: dict[str, object]) -> None:
    """Every malformed payload surfaces as CheckpointError (callers such as the pipeline catch
    exactly that to retrain a damaged model), never as a stray ZeroDivisionError or ValueError."""
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    (key, value), = change.items()
    if isinstance(value, dict):
        value = {**payload[key], **value}
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        checkpoint.load(_torch_bytes({**payload, key: value}))


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_payload_that_would_execute_code_is_refused(tmp_path: Path, saved: bytes) -> None:
    # The payload really is live: plain pickle runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    attempts = [
        pickle.dumps(_Exploit(marker)),  # a bare pickle
        _torch_bytes(_Exploit(marker)),  # torch's zip format around it
        _torch_bytes({**payload, "meta": {"x": _Exploit(marker)}}),  # hidden in a valid checkpoint
    ]
    for data in attempts:
        with pytest.raises(CheckpointError):
            checkpoint.load(data)
        assert not marker.exists()


# --------------------------------------------------------------------------- configs from files


@pytest.mark.parametrize(
    "change",
    [{"g_channels": 10**6}, {"g_downsamples": 40}, {"g_res_blocks": 10**5}, {"d_channels": 10**6},
     {"g_channels": 512, "g_downsamples": 3}, {"d_scale_factor": 1.0}, {"g_channels": True}],
)
def test_oversized_model_config_is_refused_before_anything_is_built(saved: bytes, change: dict[str, object]) -> None:
    """A config from a file cannot ask for a network that would not fit in memory."""
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    with pytest.raises(CheckpointError, match="incomplete or inconsistent: model"):
        checkpoint.load(_torch_bytes({**payload, "model_config": {**payload["model_config"], **change}}))


# --------------------------------------------------------------------------- older versions

# The options earlier versions saved in every config, at the one value this version trains with.
OLD_MODEL_OPTIONS = {"spectral_norm": True, "d_batch_norm": True, "skip_clamp_grad": True}
OLD_TRAIN_OPTIONS = {"second_g_step": True, "ema": 0.0, "crops_per_step": 1, "tone_weight": 0.0,
                     "stretch_negative": 0.0, "deterministic": True, "channels_last": True}


def _as_older_versions_saved(payload: dict, **train: object) -> dict:
    """``payload`` with the removed options in its configs (``train`` overriding their values)."""
    return {**payload, "model_config": {**payload["model_config"], **OLD_MODEL_OPTIONS},
            "train_config": {**payload["train_config"], **OLD_TRAIN_OPTIONS, **train}}


@pytest.mark.parametrize("train", [{}, {"tone_weight": 1.0, "ema": 0.99}], ids=["as-trained-now", "other-values"])
def test_a_checkpoint_of_an_older_version_still_loads(trained: Trainer, saved: bytes, train: dict) -> None:
    """A generator does not need the removed options, whatever their values: what it computes is
    in its weights."""
    payload = torch.load(io.BytesIO(saved), weights_only=True)
    ckpt = checkpoint.load(_torch_bytes(_as_older_versions_saved(payload, **train)))
    assert ckpt.model == TINY.model and ckpt.train == trained.cfg
    assert_same_state(ckpt.build_generator(), trained.g)


# --------------------------------------------------------------------------- training states


def _state_trainer(seed: int = 3, iterations: int = 12) -> Trainer:
    image = torch.rand(3, 36, 44, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(TINY.train, iterations=iterations, seed=seed, norm_calibration=4)
    return Trainer([to_model_input(image)], TINY.model, cfg, "cpu")


class _Stop(Exception):
    pass


def _interrupted_state(at: int) -> bytes:
    """The training state a run saved just before it stopped at iteration ``at``."""
    t, saved = _state_trainer(), []

    def snapshot(tr: Trainer) -> None:
        saved.append(saved_state(tr, 0))
        if tr.iteration == at:
            raise _Stop

    with pytest.raises(_Stop):
        t.run(snapshot=snapshot, snapshot_every_s=0)
    return saved[-1]


def test_resumed_training_ends_bit_identical_to_an_uninterrupted_one() -> None:
    whole = _state_trainer()
    whole.run()
    resumed = _state_trainer()
    assert resume_from_bytes(resumed, _interrupted_state(at=8)) == 8
    resumed.run()
    assert_same_state(whole.g, resumed.g)
    assert_same_state(whole.d, resumed.d)
    assert whole.opt_g.param_groups[0]["lr"] == resumed.opt_g.param_groups[0]["lr"]


def test_snapshots_follow_the_interval_and_skip_the_last_iteration() -> None:
    seen: list[int] = []
    _state_trainer(iterations=5).run(snapshot=lambda t: seen.append(t.iteration), snapshot_every_s=0)
    assert seen == [1, 2, 3, 4]  # never after the last: the model is written then
    seen.clear()
    _state_trainer(iterations=5).run(snapshot=lambda t: seen.append(t.iteration), snapshot_every_s=3600)
    assert seen == []


def _fresh_state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.g.state_dict().items()}


@pytest.mark.parametrize("other", ["seed", "image", "garbage", "truncated", "model", "iteration", "precision",
                                   "removed-option"])
def test_a_state_of_other_settings_or_damaged_is_refused_and_changes_nothing(other: str) -> None:
    state = _interrupted_state(at=6)
    t = _state_trainer()
    if other == "seed":
        t = _state_trainer(seed=4)
    elif other == "image":
        image = torch.rand(3, 36, 44, generator=torch.Generator().manual_seed(1))
        t = Trainer([to_model_input(image)], TINY.model, t.cfg, "cpu")
    elif other == "garbage":
        state = b"\x00not a state" * 10
    elif other == "truncated":
        state = state[: len(state) // 2]
    elif other == "model":  # D's weights cut to the wrong shapes, configs intact: G loads first
        payload = torch.load(io.BytesIO(state), weights_only=True)
        payload["state"]["d"] = {k: v[..., :1] if v.dim() else v for k, v in payload["state"]["d"].items()}
        state = _torch_bytes(payload)
    elif other == "iteration":
        payload = torch.load(io.BytesIO(state), weights_only=True)
        payload["state"]["iteration"] = 10**9
        state = _torch_bytes(payload)
    elif other == "precision":  # the same settings (bf16=None) resolved otherwise on another machine
        payload = torch.load(io.BytesIO(state), weights_only=True)
        assert payload["bf16"] is t.bf16
        payload["bf16"] = not t.bf16
        state = _torch_bytes(payload)
    elif other == "removed-option":  # an older version's training with the tone loss on
        payload = torch.load(io.BytesIO(state), weights_only=True)
        state = _torch_bytes(_as_older_versions_saved(payload, tone_weight=1.0))
    before = _fresh_state(t)
    with pytest.raises(CheckpointError):
        resume_from_bytes(t, state)
    assert t.iteration == 0
    assert_same_state(before, t.g)
    assert resume_from_bytes(_state_trainer(), _interrupted_state(at=6)) == 6  # the state itself is good


def test_an_older_versions_state_at_todays_values_continues() -> None:
    payload = torch.load(io.BytesIO(_interrupted_state(at=6)), weights_only=True)
    assert resume_from_bytes(_state_trainer(), _torch_bytes(_as_older_versions_saved(payload))) == 6


def test_a_model_checkpoint_is_not_a_training_state(saved: bytes) -> None:
    with pytest.raises(CheckpointError, match="training-state"):
        resume_from_bytes(_state_trainer(), saved)
