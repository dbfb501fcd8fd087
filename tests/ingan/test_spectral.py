"""Grouped spectral normalisation: PyTorch's results, with a group computed in one pass."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from ingan import spectral
from ingan.config import ModelConfig
from ingan.networks import Generator, MultiScaleDiscriminator

CFG = ModelConfig(g_channels=8, g_res_blocks=3, d_channels=8)


def _norms(net: nn.Module) -> list[spectral.SpectralNorm]:
    return [m for m in net.modules() if isinstance(m, spectral.SpectralNorm)]


def _ungrouped(net: nn.Module) -> nn.Module:
    """A copy computing every weight alone, the way PyTorch's parametrization does."""
    other = copy.deepcopy(net)
    for norm in _norms(other):
        norm.__dict__["group"] = None
    return other


def test_registers_the_same_state_and_weight_as_pytorch() -> None:
    """Same buffers, names and initial estimate: checkpoints of either load into the other."""
    torch.manual_seed(3)
    ours = spectral.spectral_norm(nn.Conv2d(4, 6, 3))
    torch.manual_seed(3)
    theirs = torch_spectral_norm(nn.Conv2d(4, 6, 3))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(1, 4, 9, 9)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        for _ in range(3):  # training forwards advance the estimate alike
            assert torch.equal(ours(x), theirs(x)), mode
    assert torch.equal(ours.parametrizations.weight[0]._v, theirs.parametrizations.weight[0]._v)


def test_networks_group_layers_of_equal_shape() -> None:
    d = MultiScaleDiscriminator(CFG, 64)
    groups = {id(n.group) for n in _norms(d)}
    assert len(d.nets) > 1 and len(groups) == 4  # layer k of every scale's net, four layers
    g = Generator(CFG)
    grouped = [n for n in _norms(g) if n.group is not None]
    assert len(grouped) == 3 * CFG.g_res_blocks  # the residual blocks' three layers
    assert len({id(n.group) for n in grouped}) == 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_group_computes_pytorchs_weights_and_gradients(channels_last: bool) -> None:
    torch.manual_seed(0)
    grouped = MultiScaleDiscriminator(CFG, 64).train()
    alone = _ungrouped(grouped)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for net in (grouped, alone):
        net.to(memory_format=fmt)
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=fmt)
    weights = grouped.scale_weights(0.5, 0.3, len(grouped.nets))
    # Plain SGD: Adam would blow up the rounding noise of gradients that are zero in exact
    # arithmetic (biases ahead of a BatchNorm) into steps of a full learning rate.
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in (grouped, alone)]
    for _ in range(3):  # with steps between, so stale results would show
        outs = []
        for net, opt in zip((grouped, alone), opts, strict=True):
            opt.zero_grad()
            with spectral.cached():
                y = net(x, weights)
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(grouped.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(_norms(grouped), _norms(alone), strict=True):
        torch.testing.assert_close(a._u, b._u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a._v, b._v, rtol=1e-4, atol=1e-5)
    with spectral.cached():
        w = grouped.nets[1].body[2].weight
        assert w.is_contiguous(memory_format=fmt)  # the conv gets the layout it was given


def test_one_batched_pass_per_group_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    d = MultiScaleDiscriminator(CFG, 64).train()
    passes = []
    compute = spectral._Group._compute

    def counted(self: spectral._Group) -> list[torch.Tensor]:
        passes.append(self)
        return compute(self)

    monkeypatch.setattr(spectral._Group, "_compute", counted)
    x = torch.rand(1, 3, 64, 64)
    weights = d.scale_weights(0.5, 0.3, len(d.nets))
    with spectral.cached():
        d(x, weights)
        d(x, weights)  # the weights are PyTorch's cached ones now
    assert len(passes) == 4 and len(set(map(id, passes))) == 4
    with spectral.cached():
        d(x, weights)
    assert len(passes) == 8
    passes.clear()
    d(x, weights)  # outside the context every weight is computed alone, as PyTorch does
    assert passes == []


def test_a_copy_has_groups_of_its_own() -> None:
    """The weight average (a deep copy of G) must not read or advance the live G's weights."""
    g = Generator(CFG).train()
    x = torch.rand(1, 3, 32, 32)
    with spectral.cached():
        g(x)  # leaves results pending in the groups
    avg = copy.deepcopy(g)
    own = {id(m) for m in avg.modules()}
    for norm in _norms(avg):
        if norm.group is not None:
            assert all(id(m) in own for m in norm.group.owners)
    before = [n._u.clone() for n in _norms(g)]
    with torch.no_grad():
        for p in avg.parameters():
            p.mul_(2)
        with spectral.cached():
            avg(x)
    assert all(torch.equal(b, n._u) for b, n in zip(before, _norms(g), strict=True))


def test_a_checkpoint_of_pytorchs_parametrization_loads() -> None:
    """Models saved before grouping (PyTorch's spectral norm) load, and compute the same."""
    torch.manual_seed(1)
    ours = Generator(CFG).eval()
    theirs = copy.deepcopy(ours)
    for m in theirs.modules():
        if parametrize.is_parametrized(m, "weight"):
            w = m.parametrizations.weight.original.detach().clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight = nn.Parameter(w)
            torch_spectral_norm(m)
    theirs.load_state_dict(ours.state_dict())
    fresh = Generator(CFG).eval()
    fresh.load_state_dict(theirs.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x), rtol=0, atol=1e-6)



def _read(conv: nn.Module) -> torch.Tensor:
    with spectral.cached(), torch.no_grad():
        return conv.weight.detach().clone()


def test_results_are_only_read_in_the_context_and_grad_mode_that_made_them() -> None:
    d = MultiScaleDiscriminator(CFG, 64).train()
    first, second = d.nets[0].body[2], d.nets[1].body[2]
    with spectral.cached():
        with torch.no_grad():
            first.weight  # computes the group without a graph  # noqa: B018
        assert second.weight.grad_fn is not None  # read with grad on: computed again, with one
    assert all(not n.group._pending for n in _norms(d) if n.group is not None)  # dropped on leaving

    # A context in another thread never takes this one's results.
    seen = {}
    with spectral.cached():
        first.weight  # leaves second's result pending here  # noqa: B018
        with torch.no_grad():
            second.parametrizations.weight.original.mul_(2)  # a step, seen by the next reader
        thread = threading.Thread(target=lambda: seen.setdefault("w", _read(second)))
        thread.start()
        thread.join()
    torch.testing.assert_close(seen["w"], _read(_ungrouped(d).nets[1].body[2].eval()), rtol=1e-4, atol=1e-6)


def test_a_group_in_mixed_modes_computes_each_weight_in_its_own() -> None:
    d = MultiScaleDiscriminator(CFG, 64).train()
    d.nets[0].eval()
    with torch.no_grad():  # new weights, so that a power iteration moves every estimate
        for p in d.parameters():
            p.add_(torch.randn_like(p))
    evals, trains = _norms(d.nets[0]), _norms(d.nets[1])
    before = [n._v.clone() for n in evals + trains]
    with spectral.cached():
        d(torch.rand(1, 3, 64, 64), d.scale_weights(0.5, 0.3, len(d.nets)))
    moved = [not torch.equal(b, n._v) for b, n in zip(before, evals + trains, strict=True)]
    assert moved == [False] * len(evals) + [True] * len(trains)  # no power iteration in eval mode
