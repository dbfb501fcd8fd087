"""A bundle's state from its images' states and back.

A bundle of K models trained as one (``ingan.networks``, ``ingan.train``) keeps every tensor of
its models with the K blocks stacked on the first dimension: conv weights and biases, BatchNorm's
weights and statistics, spectral norm's vectors, Adam's moments. A zero-dimensional tensor (a
counter, Adam's step) and any other value is the same for every model of a bundle, which trains
them in step. So image k's part is its block of every tensor, in the format of a model trained
alone, and a bundle is built from such parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _is_nhwc(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def part(whole: Any, k: int, n: int) -> Any:
    """Block ``k`` of ``n`` of every tensor in ``whole`` (nested dicts, lists and tuples), copied in
    its memory format, so that saving it saves the block alone."""
    if isinstance(whole, Tensor):
        if whole.dim() == 0:
            return whole.clone()
        block = whole.reshape(n, whole.shape[0] // n, *whole.shape[1:])[k]
        return block.clone(memory_format=torch.channels_last if _is_nhwc(whole) else torch.contiguous_format)
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
        return joined.contiguous(memory_format=torch.channels_last) if _is_nhwc(first) else joined
    if isinstance(first, dict):
        if any(not isinstance(p, dict) or p.keys() != first.keys() for p in parts[1:]):
            raise ValueError("the parts hold different entries")
        return type(first)((key, join([p[key] for p in parts])) for key in first)
    if isinstance(first, (list, tuple)):
        if any(len(p) != len(first) for p in parts[1:]):
            raise ValueError("the parts hold lists of different lengths")
        return type(first)(join([p[i] for p in parts]) for i in range(len(first)))
    return first
