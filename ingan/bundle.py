"""The bundle: K images trained as one fused model, and everything that is kept per image.

Training is written for a bundle (``ingan.train``); one image is a bundle of one, not a case of
its own. The K models run side by side as one network of K times the channels
(``ingan.networks``): image k's tensors are the k-th block of the bundle's, on the channel
dimension of images and maps, on the first dimension of every state tensor (conv weights and
biases, BatchNorm's weights and statistics, spectral norm's vectors, Adam's moments). This module
holds that layout (side by side, each image's mean, each image's part of a state and a state
from parts) and each image's own random streams (``Streams``).

A zero-dimensional state tensor (a counter, Adam's step) and any other value is the same for every
model of a bundle, which trains them in step. So image k's part is its block of every tensor, in
the format of a model trained alone, and a bundle is built from such parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

_Draw = TypeVar("_Draw")


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is laid out NHWC (and not also NCHW, as a tensor of one channel or pixel is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def side_by_side(blocks: Sequence[Tensor]) -> Tensor:
    """Each image's (1, C, h, w) as the bundle's (1, K*C, h, w)."""
    return torch.cat(list(blocks), dim=1)


def per_image_mean(x: Tensor, n: int) -> Tensor:
    """(K,): the mean of each image's block of ``x`` (1, K*C, h, w), ``n`` = K images, in
    float32 at least."""
    return x.to(torch.promote_types(x.dtype, torch.float32)).reshape(n, -1).mean(1)


class Streams:
    """Each image's random streams, seeded by its own seed as its training alone would be: one on
    the CPU for crops, output shapes and shifts, one on the device for input noise."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.seeds = list(seeds)
        self.cpu = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        self.noise = [torch.Generator(device=device).manual_seed(seed + 1) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def each(self, draw: Callable[[int, torch.Generator], _Draw]) -> list[_Draw]:
        """``draw(k, stream)`` for every image, from its own CPU stream."""
        return [draw(k, rng) for k, rng in enumerate(self.cpu)]

    def uniform_noise(self, x: Tensor, amplitude: float) -> Tensor:
        """``x`` (1, K*C, h, w) plus uniform noise in +-``amplitude``, each image's from its own
        device stream."""
        shape = (1, x.shape[1] // len(self), *x.shape[2:])
        n = side_by_side([torch.rand(shape, generator=g, device=x.device, dtype=x.dtype) for g in self.noise])
        return x + (2 * n - 1) * amplitude

    def state(self, k: int) -> dict[str, Tensor]:
        return {"rng": self.cpu[k].get_state(), "noise_rng": self.noise[k].get_state()}

    def load(self, k: int, state: dict[str, Tensor]) -> None:
        self.cpu[k].set_state(state["rng"])
        self.noise[k].set_state(state["noise_rng"].to(self.noise[k].get_state().device))


def part(whole: Any, k: int, n: int) -> Any:
    """Block ``k`` of ``n`` of every tensor in ``whole`` (nested dicts, lists and tuples), copied in
    its memory format, so that saving it saves the block alone."""
    if isinstance(whole, Tensor):
        if whole.dim() == 0:
            return whole.clone()
        block = whole.reshape(n, whole.shape[0] // n, *whole.shape[1:])[k]
        return block.clone(memory_format=torch.channels_last if is_channels_last(whole) else torch.contiguous_format)
    if isinstance(whole, dict):
        return type(whole)((key, part(value, k, n)) for key, value in whole.items())
    if isinstance(whole, (list, tuple)):
        return type(whole)(part(value, k, n) for value in whole)
    return whole


def join(parts: list[Any]) -> Any:
    """The bundle of ``parts`` (as ``part`` makes them): tensors concatenated block after block,
    everything else taken from the first part. Parts that differ where a bundle cannot (a
    shared value, a structure) raise ``ValueError``."""
    first = parts[0]
    if isinstance(first, Tensor):
        if first.dim() == 0:
            if any(not torch.equal(p, first) for p in parts[1:]):
                raise ValueError(f"the parts differ in a value their bundle shares: {[p.item() for p in parts]}")
            return first.clone()
        joined = torch.cat(parts)
        return joined.contiguous(memory_format=torch.channels_last) if is_channels_last(first) else joined
    if isinstance(first, dict):
        if any(not isinstance(p, dict) or p.keys() != first.keys() for p in parts[1:]):
            raise ValueError("the parts hold different entries")
        return type(first)((key, join([p[key] for p in parts])) for key in first)
    if isinstance(first, (list, tuple)):
        if any(len(p) != len(first) for p in parts[1:]):
            raise ValueError("the parts hold lists of different lengths")
        return type(first)(join([p[i] for p in parts]) for i in range(len(first)))
    return first
