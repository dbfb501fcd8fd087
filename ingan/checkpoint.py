"""Checkpoints: generator weights plus the configs that rebuild it, and nothing executable; and
training states, what an interrupted training needs to go on.

Both are plain dicts of tensors, numbers and strings saved with ``torch.save`` and loaded with
``weights_only=True``: loading one never runs code from the file. Bytes in, bytes out, so the
caller decides where they live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from .config import ModelConfig, TrainConfig, config_from_dict
from .networks import Generator

FORMAT = "ingan-checkpoint"
VERSION = 1
STATE_FORMAT = "ingan-training-state"
STATE_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of this format."""


@dataclass
class Checkpoint:
    model: ModelConfig
    train: TrainConfig
    generator: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. working size, iterations, seconds

    def build_generator(self, device: torch.device | str = "cpu") -> Generator:
        """The generator in eval mode: BatchNorm uses its running statistics and spectral norm
        stops iterating, so every call with the same input gives the same output."""
        g = Generator(self.model)
        g.load_state_dict(self.generator)
        # Same memory format as in training, so a reloaded model computes exactly what the
        # trained one did (NHWC and NCHW convolutions round differently).
        return g.to(device, memory_format=torch.channels_last).eval()


def from_generator(g: Generator, model: ModelConfig, train: TrainConfig, meta: dict[str, Any] | None = None) -> Checkpoint:
    return from_state(g.state_dict(), model, train, meta)


def from_state(generator: dict[str, torch.Tensor], model: ModelConfig, train: TrainConfig,
               meta: dict[str, Any] | None = None) -> Checkpoint:
    """A checkpoint of a generator's ``state_dict()`` (or a bundle image's part of one)."""
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in generator.items()}
    return Checkpoint(model, train, state, dict(meta or {}))


def save(ckpt: Checkpoint, f: BinaryIO | None = None) -> bytes:
    """Serialise ``ckpt`` (to ``f`` if given) and return the bytes."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(ckpt.model),
        "train_config": dataclasses.asdict(ckpt.train),
        "generator": ckpt.generator,
        "meta": ckpt.meta,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if f is not None:
        f.write(data)
    return data


def _read_payload(data: bytes | BinaryIO, map_location: str | torch.device, fmt: str, version: int, what: str) -> dict[str, Any]:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        payload = torch.load(stream, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"not a readable {what} ({type(exc).__name__}: {first_line})") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"not an InGAN {what} (missing format marker {fmt!r})")
    if payload.get("version") != version:
        raise CheckpointError(f"unsupported {what} version {payload.get('version')!r} (this build reads {version})")
    return payload


def load(data: bytes | BinaryIO, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint; anything malformed raises ``CheckpointError`` with the reason."""
    payload = _read_payload(data, map_location, FORMAT, VERSION, "checkpoint")
    try:
        model = config_from_dict(ModelConfig, payload["model_config"], strict=False)
        train = config_from_dict(TrainConfig, payload["train_config"], strict=False)
        state = payload["generator"]
        ckpt = Checkpoint(model, train, state, dict(payload.get("meta", {})))
        ckpt.build_generator()  # validates every tensor name and shape now, not at first use
    except (KeyError, TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or inconsistent: {exc}") from exc
    return ckpt


def image_digest(image: torch.Tensor) -> str:
    """A fingerprint of the training image, so a state is never continued on another image."""
    return hashlib.sha256(image.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def save_training_state(state: dict[str, Any], model: ModelConfig, train: TrainConfig, bf16: bool,
                        working_image: torch.Tensor) -> bytes:
    """An image's training state (``Trainer.part_state``) with what it belongs to: both configs,
    the precision and the working image's fingerprint. A few times G's checkpoint in size (D and
    both optimisers' moments). The same format whether the image trains alone or in a bundle:
    either can continue from it."""
    payload = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model_config": dataclasses.asdict(model),
        "train_config": dataclasses.asdict(train),
        "bf16": bf16,  # resolved: bf16=None means something else on another machine
        "image_digest": image_digest(working_image),
        "state": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def read_training_state(data: bytes | BinaryIO, model_cfg: ModelConfig, train_cfg: TrainConfig, working_image: torch.Tensor,
                        bf16: bool) -> dict[str, Any]:
    """The ``part_state()`` saved in ``data``, checked to belong to a training of ``working_image``
    with these settings; anything else raises ``CheckpointError``."""
    payload = _read_payload(data, "cpu", STATE_FORMAT, STATE_VERSION, "training state")
    try:
        same = config_from_dict(ModelConfig, payload["model_config"], strict=True) == model_cfg and \
            config_from_dict(TrainConfig, payload["train_config"], strict=True) == train_cfg
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the training state's settings cannot be continued here: {exc}") from exc
    if not same:
        raise CheckpointError("the training state was saved with other settings")
    if payload.get("image_digest") != image_digest(working_image):
        raise CheckpointError("the training state belongs to another image")
    if payload.get("bf16", bf16) != bf16:
        # Continuing in the other precision would end with other weights than an uninterrupted run.
        raise CheckpointError("the training state was computed in another precision")
    state = payload.get("state")
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise CheckpointError("training state is incomplete: no iteration")
    return state
