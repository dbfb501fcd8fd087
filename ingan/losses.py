"""InGAN's objectives, per image: LSGAN on the combined discriminator map and L1 cycle
reconstruction; and the form of any extra term.

Every loss takes the bundle's tensors (``ingan.bundle``: image k's channels are the k-th block)
and returns (K,), each image's own value: the trainer descends on their sum, whose gradient for
image k's weights is image k's loss's alone, and reports each image's value (one image's
non-finite loss fails that image only). A training of one image is a bundle of one.

Inputs are widened to float32 before anything is computed on them: a bfloat16 map from the
autocast region would otherwise be squared and averaged in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .bundle import per_image_mean


def _wide(x: Tensor) -> Tensor:
    # float32 at least: a float64 training (the tests') stays float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def g_adversarial(d_fake: Tensor, n: int) -> Tensor:
    """LSGAN generator loss: the discriminator should call the fake real (map pulled to 1)."""
    return per_image_mean((_wide(d_fake) - 1).square(), n)


def d_fake_half(d_fake: Tensor, n: int) -> Tensor:
    """The fake half of the LSGAN discriminator loss (map pulled to 0), also for an extra kind of
    fake."""
    return 0.5 * per_image_mean(_wide(d_fake).square(), n)


def d_adversarial(d_real: Tensor, d_fake: Tensor, n: int) -> Tensor:
    """LSGAN discriminator loss: real maps pulled to 1, fake maps to 0."""
    return 0.5 * per_image_mean((_wide(d_real) - 1).square(), n) + d_fake_half(d_fake, n)


def reconstruction(reconstructed: Tensor, original: Tensor, n: int) -> Tensor:
    """Cycle consistency: G(G(x; T); T^-1) should give x back (L1)."""
    return per_image_mean((_wide(reconstructed) - original).abs(), n)


@dataclass(frozen=True)
class Views:
    """What an extra term sees of one iteration of a bundle of ``n`` images."""

    real: Tensor  # (1, 3K, h, w): the crops, G's input and D's real example, in [-1, 1]
    fake: Tensor  # (1, 3K, *out_hw): G's output; carries G's graph in G's terms, detached in D's
    out_hw: tuple[int, int]
    matrix: Tensor | None  # the iteration's homography (None: a plain resize)
    n: int  # K, the bundle's number of images
    # D's combined map (1, K, h', w') of images laid out as ``real``, with D's input noise and
    # scale weights of this iteration, as D scores the real crop and the fake.
    discriminate: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Term:
    """A term added to G's or D's loss (``net``), reported under ``name``.

    ``value(views)`` returns (K,): each image's weighted value. The rules that keep a bundle K
    independent trainings:
    - image k's value depends on image k's blocks alone: reduce with ``bundle.per_image_mean``
      (or reshape to (K, ...) before any reduction); never mean over the whole bundle;
    - it is computed inside the step's autocast: widen (float32) before squaring or averaging;
    - ``name`` is new: not ``g_adv``, ``rec``, ``d`` or ``rec2``, nor another term's.
    A non-finite value then fails only its image, and the others' weights do not change."""

    name: str
    net: Literal["g", "d"]
    value: Callable[[Views], Tensor]
