"""bench.lab: the measured options kept out of the library, as extra loss terms handed to the trainer."""

from __future__ import annotations

import pytest
import torch
from support import tiny_train_config

from bench.lab import LabConfig, lab_terms, tone_loss
from ingan.config import get_preset
from ingan.fit import fit
from ingan.geometry import homography, warp
from ingan.images import to_model_input
from ingan.losses import Views
from ingan.progress import Progress
from ingan.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = get_preset("tiny")


def _trainer(lab: dict[str, float], image: torch.Tensor, **train: object) -> Trainer:
    t = Trainer([to_model_input(image)], TINY.model, tiny_train_config(20, **train), "cpu", terms=lab_terms(lab))
    t.g.train()
    t.d.train()
    return t


def test_the_plain_configuration_adds_no_term() -> None:
    assert lab_terms({}) == [] and lab_terms(None) == [] and lab_terms(LabConfig()) == []
    assert [(t.name, t.net) for t in lab_terms({"tone_weight": 1.0, "stretch_negative": 2.0})] == [("tone", "g"), ("stretch", "d")]
    with pytest.raises(TypeError):
        lab_terms({"bogus": 1.0})


@pytest.mark.parametrize("name", ["tone_weight", "stretch_negative"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_weights_must_be_finite_non_negative_numbers(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        LabConfig(**{name: bad})


def test_tone_loss_measures_mean_and_spread_per_channel() -> None:
    x = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert tone_loss(x, x).item() == 0
    # Per image: two images side by side, each compared with its own source.
    y = x.flip(-1) * 0.5
    both = tone_loss(torch.cat([x, y], 1), torch.cat([x, x], 1), 2)
    assert both.shape == (2,) and both[0].item() == 0 and both[1].item() == pytest.approx(tone_loss(y, x).item(), rel=1e-6)
    # Any sizes: a copy tiled twice has the same mean and (nearly) the same spread.
    assert tone_loss(x.repeat(1, 1, 1, 2), x).item() < 1e-3
    assert tone_loss(x - 0.3, x).item() == pytest.approx(0.3, abs=1e-5)
    # Halving the contrast around 0 halves each channel's mean and spread.
    m, sd = x.flatten(2).mean(-1), x.flatten(2).std(-1)
    expected = 0.5 * (m.abs().mean() + sd.mean()).item()
    assert tone_loss(0.5 * x, x).item() == pytest.approx(expected, rel=1e-4)


def test_the_tone_term_is_weighted_and_reported_through_fit(brick40: torch.Tensor) -> None:
    one, three = _trainer({"tone_weight": 1.0}, brick40), _trainer({"tone_weight": 3.0}, brick40)
    a, b = one.step()["tone"].item(), three.step()["tone"].item()
    assert a > 0 and b == pytest.approx(3 * a, rel=1e-5)  # the same first step, weighted
    reports: list[Progress] = []
    fit(brick40, "tiny", TINY.model, tiny_train_config(2, log_every=1), "cpu", progress=reports.append,
        terms=lab_terms({"tone_weight": 1.0}))
    assert [("tone" in p.losses, "stretch" in p.losses) for p in reports] == [(True, False)] * 2


def test_the_stretched_fake_is_the_crop_resized_to_shapes_far_from_its_own(brick40: torch.Tensor) -> None:
    t = _trainer({"stretch_negative": 1.0}, brick40)
    [term] = t.terms
    real = t.random_crop()
    h, w = real.shape[-2:]
    weights = t.d.scale_weights(0.5, t.cfg.d_scale_pivot, t.d.n_scales_for((h, 2 * w)))
    seen: list[torch.Tensor] = []

    def value(out_hw: tuple[int, int], matrix: torch.Tensor | None = None) -> float:
        views = Views(real, real, out_hw, matrix, 1, lambda x: seen.append(x) or t.d(x, weights))
        return term.value(views).item()

    assert value((h, w)) == 0 and value((h, round(w * 1.15))) == 0  # within 20%: close to real
    assert not seen  # D was not asked
    assert value((h, 2 * w)) > 0
    # A shifted output is a distortion even at the crop's own size.
    assert value((h, w), homography((0.2, -0.2))) > 0
    # What D sees is the plain warp of the crop.
    assert torch.equal(seen[0], warp(real, (h, 2 * w)))


def test_a_step_to_a_shape_far_from_the_crop_reports_the_stretch(brick40: torch.Tensor) -> None:
    """The first iteration's shape is the crop's own (the curriculum starts there): no stretched
    fake. Past it, shapes are drawn from the whole range at once, and one soon lands far away."""
    t = _trainer({"stretch_negative": 1.0}, brick40, curriculum_end=1e-6)
    assert t.step()["stretch"].item() == 0
    seen = [t.step() for _ in range(8)]
    assert any(out["stretch"].item() > 0 for out in seen)
