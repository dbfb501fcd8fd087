"""InGAN's objectives: LSGAN on the combined discriminator map and L1 cycle reconstruction."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """LSGAN discriminator loss: real maps pulled to 1, fake maps to 0."""
    return 0.5 * F.mse_loss(d_real, d_real.new_ones(()).expand_as(d_real)) + d_fake_loss(d_fake)


def d_fake_loss(d_fake: Tensor) -> Tensor:
    """The fake half of the LSGAN discriminator loss alone (an extra kind of fake: bench/lab.py)."""
    return 0.5 * F.mse_loss(d_fake, d_fake.new_zeros(()).expand_as(d_fake))


def g_adv_loss(d_fake: Tensor) -> Tensor:
    """LSGAN generator loss: the discriminator should call the fake real."""
    return F.mse_loss(d_fake, d_fake.new_ones(()).expand_as(d_fake))


def reconstruction_loss(reconstructed: Tensor, original: Tensor) -> Tensor:
    """Cycle consistency: G(G(x; T); T^-1) should give x back."""
    return F.l1_loss(reconstructed, original)

