"""Tests for ingan.networks and ingan.retarget: exact output sizes, model sizes, eval-mode inference."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils import parametrize

from ingan.config import ModelConfig, get_preset
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


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_retarget_is_pure_in_eval_mode(image: torch.Tensor) -> None:
    """No BatchNorm statistics update and no spectral-norm iteration: the state is untouched and
    repeated calls give identical outputs."""
    g, _ = build_models(get_preset("tiny").model, 64, seed=3, device=CPU)
    # Move BatchNorm stats and spectral-norm vectors off their initial values first.
    with torch.no_grad():
        g.train()
        g(image[None], (20, 28))
        g.eval()
    before = _state(g)
    sizes = [(16, 40), (33, 17)]
    first = retarget(g, image, sizes)
    second = retarget(g, image, sizes)
    _assert_same_state(before, _state(g))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)

    # The check can fail: a forward pass in train mode does change the state.
    with torch.no_grad():
        g.train()
        g(image[None], (20, 28))
        g.eval()
    changed = _state(g)
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_spectral_norm_can_be_turned_off() -> None:
    on = Generator(ModelConfig(g_channels=8, g_res_blocks=1))
    off = Generator(ModelConfig(g_channels=8, g_res_blocks=1, spectral_norm=False))
    assert any(parametrize.is_parametrized(m) for m in on.modules())
    assert not any(parametrize.is_parametrized(m) for m in off.modules())
    d_off = MultiScaleDiscriminator(ModelConfig(d_channels=8, spectral_norm=False), 32)
    assert not any(parametrize.is_parametrized(m) for m in d_off.modules())
    # Same trainable parameter count either way (spectral norm adds buffers, not parameters).
    assert _n_params(on) == _n_params(off)
    with torch.no_grad():
        y = off.eval()(torch.zeros(1, 3, 16, 16), (19, 23))
    assert y.shape == (1, 3, 19, 23)


def test_untrained_generator_outputs_are_near_grey(tiny_g: Generator, image: torch.Tensor) -> None:
    """Reference init (xavier-normal, gain 0.01): early outputs are close to zero in [-1, 1]."""
    y = retarget(tiny_g, image, [(24, 48)])[0]
    assert y.abs().max() < 0.1


def test_discriminator_batch_norm_can_be_turned_off() -> None:
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for bn in (True, False):
        d = MultiScaleDiscriminator(ModelConfig(d_channels=8, d_batch_norm=bn), 32).train()
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == bn
        y = d(x, d.scale_weights(0.5, 0.3, d.n_scales_for((40, 40))))
        assert y.shape == (1, 1, 16, 16) and bool(((y > 0) & (y < 1)).all())
    # The same trainable convolutions: BatchNorm's affine parameters are all that go.
    on = MultiScaleDiscriminator(ModelConfig(d_channels=8), 32)
    off = MultiScaleDiscriminator(ModelConfig(d_channels=8, d_batch_norm=False), 32)
    bn_params = sum(p.numel() for m in on.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert _n_params(off) == _n_params(on) - bn_params > 0


def test_the_image_skip_clamp_passes_gradients_to_pixels_past_black() -> None:
    """A dark region pushed below -1 is clamped to black; with a hard clamp nothing trains it back
    (no gradient reaches the pixels), with the default clamp the losses still reach them. Both
    clamp the values alike."""
    image = torch.full((1, 3, 32, 32), -0.95)  # a night sky, just above black
    outs, grads = [], []
    for passes in (True, False):
        torch.manual_seed(0)
        g = Generator(ModelConfig(g_channels=8, g_res_blocks=1, image_skip=True, skip_clamp_grad=passes)).train()
        exit_conv = g.exit[-1]  # G's last conv (reflection pad, conv)
        with torch.no_grad():
            exit_conv.bias.fill_(-0.2)  # the network's output pushes every pixel past -1
        out = g(image)
        assert out.min() == -1 and out.max() == -1
        (out - image).abs().mean().backward()  # the cycle loss's kind of pull back to the source
        outs.append(out.detach())
        grads.append(exit_conv.bias.grad.clone())
    assert torch.equal(outs[0], outs[1])
    assert (grads[0] < 0).all()  # gradient descent raises the bias: back towards the source
    assert torch.equal(grads[1], torch.zeros(3))
