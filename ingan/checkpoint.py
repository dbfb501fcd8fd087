"""Checkpoints: generator weights plus the configs that rebuild it, and nothing executable.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and loaded
with ``weights_only=True``: loading one never runs code from the file. Bytes in, bytes out, so the
caller decides where checkpoints live.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from .config import ModelConfig, TrainConfig
from .networks import Generator

FORMAT = "ingan-checkpoint"
VERSION = 1


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
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in g.state_dict().items()}
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


def load(data: bytes | BinaryIO, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint; anything malformed raises ``CheckpointError`` with the reason."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        payload = torch.load(stream, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"not a readable checkpoint ({type(exc).__name__}: {first_line})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError("not an InGAN checkpoint (missing format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"unsupported checkpoint version {payload.get('version')!r} (this build reads {VERSION})")
    try:
        model = ModelConfig(**payload["model_config"])
        train = TrainConfig(**payload["train_config"])
        state = payload["generator"]
        ckpt = Checkpoint(model, train, state, dict(payload.get("meta", {})))
        ckpt.build_generator()  # validates every tensor name and shape now, not at first use
    except (KeyError, TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or inconsistent: {exc}") from exc
    return ckpt
