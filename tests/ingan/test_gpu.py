"""CUDA code paths: run only where a GPU is present, and say so when skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ingan.config import get_preset
from ingan.fit import fit
from ingan.images import to_model_input
from ingan.retarget import retarget_image
from ingan.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: GPU paths not exercised"),
]


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(3, 48, 64, generator=g) * 255).to(torch.uint8)


def test_cuda_training_runs_and_inference_is_deterministic() -> None:
    # Training on CUDA is seeded but not bit-identical: the backward passes of reflection padding,
    # grid_sample and bilinear upsampling accumulate with atomics there. Inference is exact.
    preset = get_preset("tiny")
    cfg = dataclasses.replace(preset.train, iterations=4)
    g = fit(_image(), preset.name, preset.model, cfg, "cuda").checkpoint.build_generator("cuda")
    assert not g.training
    assert next(g.parameters()).is_cuda
    assert all(torch.isfinite(p).all() for p in g.parameters())
    outs = retarget_image(g, _image(), [(37, 91), (8, 48)], cfg.max_side)
    again = retarget_image(g, _image(), [(37, 91), (8, 48)], cfg.max_side)
    assert [tuple(o.shape[-2:]) for o in outs] == [(37, 91), (8, 48)]
    assert all(torch.equal(x, y) for x, y in zip(outs, again, strict=True))


def test_cuda_bf16_autocast_trains() -> None:
    preset = get_preset("tiny")
    cfg = dataclasses.replace(preset.train, iterations=3, bf16=True)
    t = Trainer([to_model_input(_image())], preset.model, cfg, "cuda")
    t.run()
    assert t.bf16 and all(torch.isfinite(p).all() for p in t.g.parameters())
    assert next(t.g.parameters()).dtype == torch.float32  # weights stay float32 under autocast
