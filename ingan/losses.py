"""InGAN's objectives: LSGAN on the combined discriminator map, L1 cycle reconstruction, and an
optional tone term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """LSGAN discriminator loss: real maps pulled to 1, fake maps to 0."""
    return 0.5 * F.mse_loss(d_real, d_real.new_ones(()).expand_as(d_real)) + d_fake_loss(d_fake)


def d_fake_loss(d_fake: Tensor) -> Tensor:
    """The fake half of the LSGAN discriminator loss alone, for an extra kind of fake."""
    return 0.5 * F.mse_loss(d_fake, d_fake.new_zeros(()).expand_as(d_fake))


def g_adv_loss(d_fake: Tensor) -> Tensor:
    """LSGAN generator loss: the discriminator should call the fake real."""
    return F.mse_loss(d_fake, d_fake.new_ones(()).expand_as(d_fake))


def reconstruction_loss(reconstructed: Tensor, original: Tensor) -> Tensor:
    """Cycle consistency: G(G(x; T); T^-1) should give x back."""
    return F.l1_loss(reconstructed, original)


def tone_loss(output: Tensor, source: Tensor) -> Tensor:
    """L1 distance between the per-channel mean and standard deviation of ``output`` and of
    ``source`` (each (B, 3, H, W), any sizes): a retargeted image keeps its source's colours, which
    the cycle loss lets drift (any invertible change of tone passes it)."""
    o, s = output.flatten(2), source.flatten(2)  # (B, 3, H*W)
    return F.l1_loss(o.mean(-1), s.mean(-1)) + F.l1_loss(o.std(-1), s.std(-1))
