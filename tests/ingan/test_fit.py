"""Tests for ingan.fit: what a checkpoint says about itself, byte-identical reruns, continuing
from a saved training state, and the retry at half size out of GPU memory."""

from __future__ import annotations

import pytest
import torch
from support import assert_same_state, tiny_train_config

from ingan import checkpoint
from ingan.config import TrainConfig, get_preset
from ingan.fit import Fit, fit
from ingan.images import working_resolution
from ingan.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = get_preset("tiny")
# Larger than the tiny preset's 96 px working size: trained smaller than the source.
WIDE = torch.randint(0, 256, (3, 50, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _fit(image: torch.Tensor, iterations: int = 4, seed: int = 0, **kw: object) -> Fit:
    return fit(image, "tiny", TINY.model, tiny_train_config(iterations, seed), "cpu", **kw)


@pytest.fixture(scope="module")
def whole(brick40: torch.Tensor) -> tuple[Fit, list[bytes]]:
    """An uninterrupted fit of 4 iterations and the training states it saved on the way."""
    states: list[bytes] = []
    return _fit(brick40, snapshot=states.append, snapshot_every_s=1e-9), states


def test_the_checkpoint_says_what_it_was_trained_from_and_nothing_of_time() -> None:
    done = _fit(WIDE, 2, meta={"id": "photo-7"})
    assert done.checkpoint.meta == {
        "preset": "tiny", "source_hw": [50, 120], "working_hw": list(working_resolution((50, 120), 96)),
        "device": "cpu", "bf16": False, "torch": str(torch.__version__), "id": "photo-7",
    }
    assert done.checkpoint.meta["working_hw"] != done.checkpoint.meta["source_hw"]
    assert done.checkpoint.model == TINY.model and done.checkpoint.train == tiny_train_config(2)
    assert done.resumed_from == 0 and done.seconds > 0
    assert set(vars(done)) == {"checkpoint", "seconds", "resumed_from"}  # no trainer kept alive
    assert not done.checkpoint.build_generator().training  # ready to retarget


def test_the_same_seed_writes_the_same_bytes(brick40: torch.Tensor, whole: tuple[Fit, list[bytes]]) -> None:
    data = checkpoint.save(whole[0].checkpoint)
    assert checkpoint.save(_fit(brick40).checkpoint) == data
    assert checkpoint.save(_fit(brick40, seed=1).checkpoint) != data


def test_a_fit_resumed_from_a_snapshot_ends_where_an_uninterrupted_one_does(
        brick40: torch.Tensor, whole: tuple[Fit, list[bytes]]) -> None:
    done, states = whole
    assert len(states) == 3  # after iterations 1 to 3: never after the last
    resumed = _fit(brick40, state=states[1])
    assert resumed.resumed_from == 2
    assert_same_state(done.checkpoint.generator, resumed.checkpoint.generator)
    assert checkpoint.save(resumed.checkpoint) == checkpoint.save(done.checkpoint)


def test_a_damaged_state_is_ignored_and_training_starts_over(brick40: torch.Tensor,
                                                             whole: tuple[Fit, list[bytes]]) -> None:
    again = _fit(brick40, state=b"nonsense")
    assert again.resumed_from == 0
    assert_same_state(whole[0].checkpoint.generator, again.checkpoint.generator)


def _tight(monkeypatch: pytest.MonkeyPatch, limit: int | None, tried: list[TrainConfig]) -> None:
    """fit's trainers run out of GPU memory for crops above ``limit`` (None: always)."""
    import ingan.fit as fit_module

    class Tight(Trainer):
        def __init__(self, images: list[torch.Tensor], model_cfg: object, train_cfg: TrainConfig, device: object,
                     **kw: object) -> None:
            tried.append(train_cfg)
            if limit is None or train_cfg.crop_size > limit:
                raise torch.OutOfMemoryError("CUDA out of memory")
            super().__init__(images, model_cfg, train_cfg, device, **kw)

    monkeypatch.setattr(fit_module, "Trainer", Tight)


def test_out_of_memory_it_tries_once_more_at_half_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[TrainConfig] = []
    _tight(monkeypatch, 32, tried)
    done = _fit(WIDE, 1)
    assert [(c.crop_size, c.max_side) for c in tried] == [(64, 96), (32, 64)]
    assert done.checkpoint.train == tried[-1]  # it records what it was trained with
    assert done.checkpoint.meta["working_hw"] == list(working_resolution((50, 120), 64))
    tried.clear()
    _tight(monkeypatch, None, tried)
    with pytest.raises(torch.OutOfMemoryError):
        _fit(WIDE, 1)
    assert len(tried) == 2  # once more, not again and again
