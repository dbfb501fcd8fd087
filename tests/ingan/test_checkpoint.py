"""Tests for ingan.checkpoint: bit-identical round trips and refusing anything else."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from ingan import checkpoint
from ingan.checkpoint import CheckpointError
from ingan.config import get_preset
from ingan.retarget import retarget, retarget_image
from ingan.train import Trainer, build_models, to_model_input

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = get_preset("tiny")
SIZES = [(16, 40), (33, 21), (40, 40)]


@pytest.fixture(scope="module")
def trained() -> Trainer:
    """A tiny generator trained for a few iterations (so every BN and SN buffer has moved)."""
    image = torch.rand(3, 36, 44, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(TINY.train, iterations=4, seed=3)
    t = Trainer(to_model_input(image), TINY.model, cfg, "cpu")
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
    original, loaded = trained.g.state_dict(), g.state_dict()
    assert original.keys() == loaded.keys()
    for k in original:
        assert torch.equal(original[k], loaded[k]), k

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
