"""Spectral normalisation that computes many weights in one batched pass.

Each spectral-normalised conv divides its weight by an estimate of the weight's largest singular
value, kept up to date by one power iteration per training forward. PyTorch's parametrization does
that conv by conv: about twenty small operators per weight, forward and backward, which on a GPU are
as many kernel launches. InGAN has over a hundred such normalisations per iteration, and the
discriminator's nets, one per scale, have identical layers: a step is bound by launching them, not by
computing them.

Here every weight is registered like PyTorch's (same buffers, names and initialisation, so
checkpoints are interchangeable, and the same result outside ``cached()``), and
``group_spectral_norms`` then groups a network's weights of equal shape. Inside ``cached()``, the
first weight of a group to be read computes the whole group: its power iterations and its division
as batched matrix products over a stack of the weights. The others take their share of that result.

A weight may also hold the blocks of several independent models (a bundle trained as one, see
``ingan.train``): a grouped conv's weight ``(K*out, in, kh, kw)`` is K weights, each normalised by
its own singular value with its own vectors. The vectors are kept as the K models' vectors end to
end, so block k of ``_u`` and ``_v`` is model k's, in the layout of a weight of its own.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .bundle import is_channels_last

_EPS = 1e-12
_numbers = itertools.count(1)  # one number per outermost cached() context, across all threads
_state = threading.local()  # this thread's open context, if any


class _Context:
    def __init__(self) -> None:
        self.number = next(_numbers)
        self.groups: list[_Group] = []  # groups holding results of this context


@contextmanager
def cached() -> Iterator[None]:
    """``parametrize.cached()`` (each parametrized weight computed once in the context), with every
    group of spectral norms computed in one batched pass. Backward passes belong after the
    context, as with ``parametrize.cached()``: a backward inside it frees the graph that the
    group's results not yet read depend on. Leaving the outermost context drops those."""
    outer = getattr(_state, "context", None)
    context = outer or _Context()
    _state.context = context
    try:
        with parametrize.cached():
            yield
    finally:
        if outer is None:
            _state.context = None
            for group in context.groups:
                group.release()


class SpectralNorm(nn.Module):
    """The parametrization of one weight: PyTorch's spectral norm (dim 0, one power iteration per
    training forward), with a slot for the group it is computed with. With ``blocks`` > 1 the
    weight's rows are that many models' weights, each normalised on its own."""

    def __init__(self, weight: Tensor, blocks: int = 1) -> None:
        super().__init__()
        mat = weight.flatten(1)
        self.blocks = blocks
        if mat.shape[0] % blocks:
            raise ValueError(f"a weight of {mat.shape[0]} rows cannot hold {blocks} blocks")
        # Plain attributes (not submodules): the group refers back to this module.
        self.__dict__["group"] = None
        self.__dict__["index"] = 0
        if blocks == 1:
            self.register_buffer("_u", F.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=_EPS))
            self.register_buffer("_v", F.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=_EPS))
            self._power_iteration(mat, 15)  # start from a good estimate, as PyTorch does
            return
        u = mat.new_empty(blocks, mat.shape[0] // blocks).normal_(0, 1)
        v = mat.new_empty(blocks, mat.shape[1]).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=1, eps=_EPS).flatten())
        self.register_buffer("_v", F.normalize(v, dim=1, eps=_EPS).flatten())
        with torch.no_grad():
            for _ in range(15):
                _normalise([self], [weight])

    @torch.no_grad()
    def _power_iteration(self, mat: Tensor, n: int) -> None:
        for _ in range(n):
            F.normalize(torch.mv(mat, self._v), dim=0, eps=_EPS, out=self._u)
            F.normalize(torch.mv(mat.t(), self._u), dim=0, eps=_EPS, out=self._v)

    def forward(self, weight: Tensor) -> Tensor:
        context = getattr(_state, "context", None)
        if self.group is not None and context is not None and self.group.trains_as(self.training):
            return self.group.weight(self.index, context)
        if self.blocks > 1:
            return _normalise([self], [weight])[0]
        # A lone weight of one model keeps PyTorch's own arithmetic (matrix-vector products), so
        # it computes PyTorch's spectral norm bit for bit, and the models trained so far go on
        # training to the same weights: the batched products round differently.
        mat = weight.flatten(1)
        if self.training:
            self._power_iteration(mat, 1)
        # Cloned: the next forward updates the buffers in place, and this one's backward needs them.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return weight / torch.vdot(u, torch.mv(mat, v))

    def right_inverse(self, value: Tensor) -> Tensor:
        return value  # assigning a weight sets the unnormalised one, as PyTorch's does


def spectral_norm(module: nn.Module, blocks: int = 1) -> nn.Module:
    """Spectral-normalise ``module.weight`` (a conv's, ``blocks`` models' weights stacked on its
    output channels); computed alone until grouped."""
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight, blocks))
    return module


class _Group:
    """Weights of one shape in one network, normalised together inside ``cached()``. A training
    read advances the estimate of every weight in the group, read or not (the discriminator's
    coarse nets are skipped for small outputs); those of weights not read are not used."""

    def __init__(self, owners: list[nn.Module]) -> None:
        self.owners = owners  # the parametrized modules, in network order
        self._key: tuple[int, bool] | None = None  # (context number, grad mode) of the results
        self._pending: dict[int, Tensor] = {}  # results not yet read in that context

    def __deepcopy__(self, memo: dict) -> _Group:
        # A copied network gets its own group of its own modules; pending results (non-leaf
        # tensors, which cannot be deep-copied) belong to the original's context.
        copy = _Group([])
        memo[id(self)] = copy  # before the owners, which lead back here
        copy.owners = deepcopy(self.owners, memo)
        return copy

    def trains_as(self, training: bool) -> bool:
        """Whether every weight of the group is in this mode; a mixed group computes one by one."""
        return all(m.parametrizations.weight[0].training == training for m in self.owners)

    def weight(self, index: int, context: _Context) -> Tensor:
        key = (context.number, torch.is_grad_enabled())
        if self._key == key and index in self._pending:
            return self._pending.pop(index)
        weights = self._compute()
        if self._key is None or self._key[0] != context.number:
            context.groups.append(self)
        self._key = key
        self._pending = dict(enumerate(weights))
        return self._pending.pop(index)

    def release(self) -> None:
        self._key = None
        self._pending = {}

    def _compute(self) -> list[Tensor]:
        plists = [m.parametrizations.weight for m in self.owners]
        return _normalise([p[0] for p in plists], [p.original for p in plists])


def _normalise(norms: list[SpectralNorm], originals: list[Tensor]) -> list[Tensor]:
    """The normalised weights of ``norms`` (one shape, one mode, ``blocks`` each), in one batched
    pass: a power iteration per block when training, then each block divided by its estimate."""
    # Stack in the weights' own memory order (channels-last weights as (out, kh, kw, in)), so the
    # stack is one copy and each result is a view in the layout the conv expects. The columns are
    # then permuted against PyTorch's (in, kh, kw) order; v is permuted alike, and the singular
    # values do not change.
    first = originals[0]
    n, blocks = len(norms), norms[0].blocks
    rows = n * blocks  # one matrix per block of every weight
    nhwc = is_channels_last(first)
    perm = (0, 2, 3, 1) if nhwc else tuple(range(first.dim()))
    stacked = torch.stack([o.permute(perm) for o in originals])  # (n, blocks * out, ...)
    mats = stacked.view(rows, stacked.shape[1] // blocks, -1)  # (n * blocks, out, k)
    with torch.no_grad(), torch.autocast(first.device.type, enabled=False):
        u = torch.stack([s._u for s in norms]).view(rows, -1)  # (n * blocks, out)
        v = torch.stack([s._v for s in norms]).view(rows, -1)  # (n * blocks, k), PyTorch's column order
        if nhwc:
            cin, kh, kw = first.shape[1:]
            v = v.view(-1, cin, kh, kw).permute(0, 2, 3, 1).reshape(rows, -1)
        if norms[0].training:
            u = F.normalize(torch.bmm(mats, v.unsqueeze(2)).squeeze(2), dim=1, eps=_EPS)
            v = F.normalize(torch.bmm(mats.transpose(1, 2), u.unsqueeze(2)).squeeze(2), dim=1, eps=_EPS)
            v_saved = v.view(-1, kh, kw, cin).permute(0, 3, 1, 2).reshape(rows, -1) if nhwc else v
            torch._foreach_copy_([s._u for s in norms], list(u.view(n, -1).unbind(0)))
            torch._foreach_copy_([s._v for s in norms], list(v_saved.reshape(n, -1).unbind(0)))
    with torch.autocast(first.device.type, enabled=False):
        sigma = torch.bmm(u.unsqueeze(1), torch.bmm(mats, v.unsqueeze(2))).flatten()  # (n * blocks,)
        by_block = stacked.view(n, blocks, -1, *stacked.shape[2:])  # (n, blocks, out, ...)
        out = (by_block / sigma.view(n, blocks, *([1] * (by_block.dim() - 2)))).view(stacked.shape)
    inverse = tuple(perm.index(d) for d in range(len(perm)))
    return [w.permute(inverse) for w in out.unbind(0)]


def group_spectral_norms(network: nn.Module) -> None:
    """Group ``network``'s spectral-normalised weights by shape, so that each group is computed in
    one pass inside ``cached()``; a weight alone in its group stays as it is. A network's weights
    move between devices and memory formats together, so the groups hold."""
    groups: dict[tuple[int, ...], list[nn.Module]] = {}
    for m in network.modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], SpectralNorm):
            groups.setdefault(tuple(m.parametrizations.weight.original.shape), []).append(m)
    for owners in groups.values():
        # A lone weight of several blocks computes them batched anyway (``SpectralNorm.forward``).
        group = _Group(owners) if len(owners) > 1 else None
        for i, m in enumerate(owners):
            norm = m.parametrizations.weight[0]
            norm.__dict__["group"] = group
            norm.__dict__["index"] = i
