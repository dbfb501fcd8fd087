"""Tests for training a bundle of images as one fused model (ingan.train, ingan.fit.fit_bundle):
K images are K single trainings (a bundle of one, which tests/ingan/test_reference.py holds to a
committed reference), an image's trouble stays its own, parts export as plain checkpoints and
resume from their own states."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import assert_same_state, texture, tiny_train_config

from ingan import checkpoint
from ingan.config import get_preset
from ingan.fit import DivergedError, fit_bundle, resume_from_bytes
from ingan.images import to_model_input, to_uint8
from ingan.retarget import retarget_image
from ingan.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = get_preset("tiny")
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def textures() -> list[torch.Tensor]:
    """Three real textures of one size (one crop size, so one bundle)."""
    return [texture(name, 40) for name in ("brick.png", "grass.png", "gravel.png")]


def _cfg(iterations: int = 3, **kw: object) -> object:
    # The second G step from the start and shifted outputs: every part of an iteration runs.
    return tiny_train_config(iterations, second_g_step_start=0.0, max_shift=0.3, **kw)


def _forced_shapes(t: Trainer, shapes: list[tuple]) -> None:
    """Make a single training take the bundle's output shapes while drawing its own as usual."""
    own = t.sample_target
    queue = iter(shapes)
    t.sample_target = lambda: (own(), next(queue))[1]  # type: ignore[method-assign]


def test_three_images_train_as_three_single_trainings(textures: list[torch.Tensor]) -> None:
    """In float64, so that what is compared is the computation, not float32 rounding: from the
    first rounding difference on, Adam's first steps (of the size of the weights) and the
    biases BatchNorm cancels (whose gradient is rounding noise) make two float32 trainings of
    one image drift apart, as they do between two CPUs."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sources = [to_model_input(t.double() / 255) for t in textures]
        cfg = _cfg()
        bundle = Trainer(sources, TINY.model, cfg, "cpu", seeds=SEEDS)
        shapes: list[tuple] = []
        draw = bundle.sample_target
        bundle.sample_target = lambda: shapes.append(draw()) or shapes[-1]  # type: ignore[method-assign]
        for _ in range(3):
            bundle.step()
        for k, seed in enumerate(SEEDS):
            alone = Trainer([sources[k]], TINY.model, dataclasses.replace(cfg, seed=seed), "cpu")
            _forced_shapes(alone, shapes)
            for _ in range(3):
                alone.step()
            mine, ref = bundle.part_state(k), alone.part_state(0)
            compared = 0
            for net in ("g", "d"):
                assert mine[net].keys() == ref[net].keys()
                for name, want in ref[net].items():
                    got = mine[net][name]
                    assert got.shape == want.shape, name
                    compared += 1
                    if not want.is_floating_point():  # BatchNorm's counters
                        assert torch.equal(got, want), name
                        continue
                    # Relative to the tensor; the floor is far below any weight (~1e-3) and
                    # covers the BatchNorm-cancelled biases, which stay at rounding noise.
                    assert (got - want).norm() <= 1e-4 * want.norm() + 1e-9, (k, net, name)
            assert compared == len(ref["g"]) + len(ref["d"])
            assert any("running_var" in n for n in ref["g"]) and any("_v" in n for n in ref["d"])
    finally:
        torch.set_default_dtype(before)


def test_a_nan_in_one_image_fails_it_alone_and_leaves_the_others_bit_identical(textures: list[torch.Tensor]) -> None:
    cfg = _cfg(4, log_every=2)
    sources = [to_model_input(t) for t in textures]
    poisoned = list(sources)
    poisoned[1] = poisoned[1].clone()
    poisoned[1][:, 5:9, 5:9] = float("nan")
    clean, hurt = (Trainer(images, TINY.model, cfg, "cpu", seeds=SEEDS) for images in (sources, poisoned))
    clean.run()
    hurt.run()
    assert list(hurt.failed) == [1] and "non-finite" in hurt.failed[1] and not clean.failed
    for k in (0, 2):
        for net in ("g", "d"):
            assert_same_state(clean.part_state(k)[net], hurt.part_state(k)[net])
    # fit_bundle: the failed image's result is its error, the others' their models.
    # (to_model_input of a float image in [0, 1] is 2x - 1: hand over its inverse.)
    done = fit_bundle([(p + 1) / 2 for p in poisoned], "tiny", TINY.model,
                      [dataclasses.replace(cfg, seed=s) for s in SEEDS], "cpu")
    assert isinstance(done[1], DivergedError) and "non-finite" in str(done[1])
    for k in (0, 2):
        assert_same_state(clean.part_generator(k), done[k].checkpoint.generator)


def test_an_exported_part_retargets_as_its_block_of_the_bundle(textures: list[torch.Tensor]) -> None:
    cfg = dataclasses.replace(_cfg(3), norm_calibration=4)
    fits = fit_bundle(textures, "tiny", TINY.model, [dataclasses.replace(cfg, seed=s) for s in SEEDS], "cpu")
    trainer = Trainer([to_model_input(t) for t in textures], TINY.model, cfg, "cpu", seeds=SEEDS)
    trainer.run()  # the same training as fit_bundle's, whose trainer is not kept
    assert not trainer.g.training and trainer.n_images == 3
    inputs = torch.cat([to_model_input(t)[None] for t in textures], 1)  # (1, 9, 40, 40)
    with torch.no_grad():
        fused = trainer.g(inputs, (40, 70))  # (1, 9, 40, 70)
    for k, done in enumerate(fits):
        # A plain checkpoint: saved, loaded and rebuilt like any other.
        g = checkpoint.load(checkpoint.save(done.checkpoint)).build_generator("cpu")
        with torch.no_grad():
            alone = g(to_model_input(textures[k])[None], (40, 70))
        # The same network: only the spectral norms' estimate is computed by one matrix-vector
        # product alone and by a batched product in the bundle (differences in the last bits).
        torch.testing.assert_close(alone, fused[:, 3 * k:3 * k + 3], rtol=0, atol=1e-5)
        # As 8-bit pixels, the written image: identical on this project's CPUs; a rounding
        # boundary crossed by those last bits could move a pixel by one level elsewhere.
        a, b = to_uint8(alone[0]).int(), to_uint8(fused[0, 3 * k:3 * k + 3]).int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() <= 1e-3
        assert retarget_image(g, textures[k], [(40, 70)], cfg.max_side)[0].shape == (3, 40, 70)
        assert done.checkpoint.train.seed == SEEDS[k]


def test_each_image_resumes_from_its_own_state(textures: list[torch.Tensor]) -> None:
    cfgs = [dataclasses.replace(_cfg(4), seed=s) for s in SEEDS]
    states: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    whole = fit_bundle(textures, "tiny", TINY.model, cfgs, "cpu", snapshot=lambda k, data: states[k].append(data),
                       snapshot_every_s=1e-9)
    assert [len(states[k]) for k in range(3)] == [3, 3, 3]  # after iterations 1, 2 and 3
    # Each state is the image's own, in the single-training format: alone it continues too.
    alone = Trainer([to_model_input(textures[2])], TINY.model, cfgs[2], "cpu")
    assert resume_from_bytes(alone, states[2][1]) == 2
    # A retried bundle: every image from its own state at iteration 2.
    again = fit_bundle(textures, "tiny", TINY.model, cfgs, "cpu", states=[states[k][1] for k in range(3)])
    for k in range(3):
        assert again[k].resumed_from == 2
        assert_same_state(whole[k].checkpoint.generator, again[k].checkpoint.generator)


def test_images_of_other_crop_sizes_or_too_small_are_their_own_results(textures: list[torch.Tensor],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import ingan.fit as fit_module

    bundles: list[list[int]] = []

    class Seen(Trainer):
        def __init__(self, images: list[torch.Tensor], *args: object, seeds: list[int], **kw: object) -> None:
            bundles.append(list(seeds))
            super().__init__(images, *args, seeds=seeds, **kw)

    monkeypatch.setattr(fit_module, "Trainer", Seen)
    wide = texture("chelsea.png", 40)[:, :30, :]  # 40x30: another crop size
    tiny_img = texture("brick.png", 12)  # below the smallest output side
    cfgs = [dataclasses.replace(_cfg(2), seed=s) for s in (1, 2, 3, 4)]
    done = fit_bundle([textures[0], wide, tiny_img, textures[1]], "tiny", TINY.model, cfgs, "cpu")
    assert isinstance(done[2], ValueError) and "too small" in str(done[2])
    assert sorted(bundles) == [[1, 4], [2]]  # by seed: the two 40x40 images together, the 40x30 alone
    assert done[1].checkpoint.meta["working_hw"] == [30, 40]
    assert [d.checkpoint.train.seed for d in (done[0], done[1], done[3])] == [1, 2, 4]


def test_out_of_gpu_memory_a_bundle_trains_as_halves(textures: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    import ingan.fit as fit_module

    real, sizes = fit_module._fit_groups, []

    def tight(members: list, job: object) -> object:
        sizes.append(len(members))
        if len(members) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(members, job)

    monkeypatch.setattr(fit_module, "_fit_groups", tight)
    four = [*textures, texture("astronaut.png", 40)]
    states: list[int] = []
    done = fit_bundle(four, "tiny", TINY.model, [dataclasses.replace(_cfg(2), seed=s) for s in (1, 2, 3, 4)], "cpu",
                      snapshot=lambda k, data: states.append(k), snapshot_every_s=1e-9)
    assert sizes == [4, 2, 2]
    assert [d.checkpoint.train.seed for d in done] == [1, 2, 3, 4]  # in order, each its own
    assert sorted(set(states)) == [0, 1, 2, 3]  # each image's states under its own index
