"""Tests for ingan.networks and ingan.retarget: exact output sizes, model sizes, eval-mode inference."""

from __future__ import annotations

import itertools

import pytest
import torch
from support import assert_same_state
from torch.nn.utils import parametrize

from ingan.config import ModelConfig, get_preset
from ingan.geometry import warp
from ingan.networks import Generator, MultiScaleDiscriminator
from ingan.retarget import retarget, retarget_image, retarget_mask
from ingan.train import build_models

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
SIDES = (8, 9, 13, 31, 64, 100, 257)
EXTREME = [(8, 48), (48, 8), (20, 120), (120, 20)]  # 1:6 and 6:1 (H, W)


@pytest.fixture(scope="module")
def tiny_g() -> Generator:
    """An untrained tiny generator in eval mode."""
    g, _ = build_models(get_preset("tiny").model, 64, seed=0, device=CPU)
    return g.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """(3, 24, 32) in [-1, 1]: small, so every decode is cheap."""
    return torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_retarget_returns_exactly_every_size_on_the_grid(tiny_g: Generator, image: torch.Tensor) -> None:
    sizes = list(itertools.product(SIDES, SIDES))
    outs = retarget(tiny_g, image, sizes)
    assert len(outs) == len(sizes)
    for (h, w), y in zip(sizes, outs, strict=True):
        assert tuple(y.shape) == (3, h, w), (h, w)
        assert y.dtype == torch.float32
        assert bool(torch.isfinite(y).all())
        assert y.min() >= -1 and y.max() <= 1


def test_retarget_extreme_aspects_and_four_times_the_input(tiny_g: Generator, image: torch.Tensor) -> None:
    h0, w0 = image.shape[-2:]
    sizes = [*EXTREME, (4 * h0, 4 * w0), (4 * h0, 8), (8, 4 * w0), (h0, w0), (h0 - 1, w0 + 1)]
    for (h, w), y in zip(sizes, retarget(tiny_g, image, sizes), strict=True):
        assert tuple(y.shape) == (3, h, w)


def test_retarget_does_not_depend_on_the_other_sizes_requested(tiny_g: Generator, image: torch.Tensor) -> None:
    together = retarget(tiny_g, image, [(13, 31), (40, 20), (9, 100)])
    alone = retarget(tiny_g, image, [(40, 20)])[0]
    assert torch.equal(together[1], alone)


@pytest.mark.parametrize("bad", [(7, 20), (20, 7), (0, 0), (1, 64), (-8, 16)])
def test_sizes_below_eight_raise_value_error(tiny_g: Generator, image: torch.Tensor, bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="at least 8"):
        retarget(tiny_g, image, [(16, 16), bad])
    source = ((image + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(ValueError, match="at least 8"):
        retarget_image(tiny_g, source, [bad], max_side=None)


def test_retarget_image_returns_exact_uint8_sizes(tiny_g: Generator) -> None:
    # A source larger than the working resolution, so outputs are generated smaller and resized.
    source = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    sizes = [*itertools.product((8, 9, 13, 31, 64, 257), (8, 9, 13, 100)), *EXTREME, (160, 240), (40, 60)]
    for max_side in (30, None):
        outs = retarget_image(tiny_g, source, sizes, max_side=max_side)
        assert len(outs) == len(sizes)
        for (h, w), y in zip(sizes, outs, strict=True):
            assert tuple(y.shape) == (3, h, w), (max_side, h, w)
            assert y.dtype == torch.uint8


def test_retarget_with_shifts_masks_the_outside_black(tiny_g: Generator, image: torch.Tensor) -> None:
    hw = (24, 40)
    y = retarget(tiny_g, image, [hw], shifts=(0.3, -0.3))[0]
    assert tuple(y.shape) == (3, *hw)
    mask = retarget_mask(hw, (0.3, -0.3))
    assert not mask[0, 0] and bool(mask[-1].all())
    assert bool((y[:, ~mask] == -1).all())
    assert bool((y[:, mask] > -1).any())


def test_paper_generator_has_about_4_8m_parameters() -> None:
    g = Generator(ModelConfig())
    n = _n_params(g)
    assert 4_700_000 <= n <= 4_900_000, n


def test_discriminator_has_nine_nets_for_crop_256() -> None:
    cfg = ModelConfig()
    d = MultiScaleDiscriminator(cfg, 256)
    assert len(d.nets) == 9 == cfg.n_d_nets(256)
    # Fewer nets for smaller crops, never none.
    assert len(MultiScaleDiscriminator(cfg, 64).nets) < 9
    assert cfg.n_d_nets(16) >= 1


def test_discriminator_scale_weights_are_normalised_and_scheduled() -> None:
    d = MultiScaleDiscriminator(ModelConfig(), 256)
    pivot = 1 / 3
    early, mid, late = (d.scale_weights(p, pivot, 5) for p in (0.0, pivot, 1.0))
    for w in (early, mid, late):
        assert sum(w) == pytest.approx(1.0)
    assert early[-1] > early[0]  # coarse scales (high k) first
    assert mid == pytest.approx([0.2] * 5)  # uniform at the pivot
    assert late[0] > late[-1]  # fine scales after


def test_discriminator_map_is_finite_and_in_range() -> None:
    d = MultiScaleDiscriminator(get_preset("tiny").model, 64).eval()
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    weights = d.scale_weights(0.5, 1 / 3, d.n_scales_for((40, 56)))
    with torch.no_grad():
        m = d(x, weights)
    assert m.shape[:2] == (1, 1)
    assert bool(((m >= 0) & (m <= 1)).all())


def test_retarget_refuses_a_generator_in_train_mode(image: torch.Tensor) -> None:
    g, _ = build_models(get_preset("tiny").model, 64, seed=0, device=CPU)
    g.train()
    with pytest.raises(RuntimeError, match="eval"):
        retarget(g, image, [(16, 16)])
    source = ((image + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(RuntimeError, match="eval"):
        retarget_image(g, source, [(16, 16)], max_side=None)


def _state(g: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in g.state_dict().items()}


@torch.no_grad()
def _train_mode_pass(g: Generator, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass in train mode (BatchNorm statistics and spectral-norm vectors move), back
    in eval mode after; returns the state it left."""
    g.train()
    g(image[None], (20, 28))
    g.eval()
    return _state(g)


def test_retarget_is_pure_in_eval_mode(image: torch.Tensor) -> None:
    """No BatchNorm statistics update and no spectral-norm iteration: the state is untouched and
    repeated calls give identical outputs."""
    g, _ = build_models(get_preset("tiny").model, 64, seed=3, device=CPU)
    before = _train_mode_pass(g, image)  # stats and vectors off their initial values first
    sizes = [(16, 40), (33, 17)]
    first = retarget(g, image, sizes)
    second = retarget(g, image, sizes)
    assert_same_state(before, g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)

    # The check can fail: a forward pass in train mode does change the state.
    changed = _train_mode_pass(g, image)
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_every_conv_but_the_generators_last_is_spectral_normalised() -> None:
    g = Generator(ModelConfig(g_channels=8, g_res_blocks=1))
    d = MultiScaleDiscriminator(ModelConfig(d_channels=8), 32)
    convs = [m for net in (g, d) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    plain = [m for m in convs if not parametrize.is_parametrized(m)]
    assert plain == [g.exit[-1]] and len(convs) > 10
    # D's nets keep the reference's BatchNorm: two per scale.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 2 * len(d.nets)


def test_untrained_generator_outputs_are_near_grey(tiny_g: Generator, image: torch.Tensor) -> None:
    """Reference init (xavier-normal, gain 0.01): early outputs are close to zero in [-1, 1]."""
    y = retarget(tiny_g, image, [(24, 48)])[0]
    assert y.abs().max() < 0.1


def test_the_image_skip_clamp_passes_gradients_to_pixels_past_black() -> None:
    """A dark region pushed below -1 is clamped to black, and the losses still reach it: a hard
    clamp would give those pixels no gradient, so nothing could train them back."""
    image = torch.full((1, 3, 32, 32), -0.95)  # a night sky, just above black
    torch.manual_seed(0)
    g = Generator(ModelConfig(g_channels=8, g_res_blocks=1, image_skip=True)).train()
    exit_conv = g.exit[-1]  # G's last conv (reflection pad, conv)
    with torch.no_grad():
        exit_conv.bias.fill_(-0.2)  # the network's output pushes every pixel past -1
    added: list[torch.Tensor] = []
    hook = exit_conv.register_forward_hook(lambda m, i, o: added.append(o.detach()))
    out = g(image)
    hook.remove()
    unclamped = warp(image, (32, 32)) + added[0][..., :32, :32]  # what G adds to the warped input
    assert (unclamped < -1).all()  # past black everywhere: a hard clamp would pass no gradient
    assert torch.equal(out.detach(), unclamped.clamp(-1, 1))
    (out - image).abs().mean().backward()  # the cycle loss's kind of pull back to the source
    assert (exit_conv.bias.grad < 0).all()  # gradient descent raises the bias: back towards the source
