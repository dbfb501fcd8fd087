"""Training InGAN.

Each iteration: a random crop is G's input and D's real example; G maps it to a random output
shape (the range grows with a curriculum) and back; one G step on adversarial + cycle loss, one D
step, and past a point of the schedule a second G step on the inverse mapping alone.

The trainer trains a bundle of K images of one preset and crop size (``ingan.bundle``); one image
is a bundle of one. Each image has its own weights, statistics, optimiser moments, crops and
noise; each loss is per image (``ingan.losses``), and the step descends on their sum. What the
images share is each iteration's output shape and transform, the first image's draw; every image
still draws its own from its own stream, so its crops and noise are those of its training alone.

All randomness comes from generators seeded per image (``TrainConfig.seed``, or ``seeds``); the
global RNG is touched only inside a forked scope, so the same seed on the same device gives
bit-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import bundle, losses, spectral
from .config import ModelConfig, TrainConfig
from .geometry import homography
from .images import working_image
from .networks import Generator, MultiScaleDiscriminator
from .progress import Progress

ProgressFn = Callable[[Progress], None]
SnapshotFn = Callable[["Trainer"], None]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively: a CPU with AVX512-BF16 or AMX
    tiles, a CUDA GPU of compute capability 8.0 (Ampere) or later. Elsewhere bfloat16 is emulated
    and slower. Whether a training uses it by default is ``bf16_by_default``'s call."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type != "cpu":
        return False
    # torch exposes these probes only privately; without them, float32 is the safe answer.
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def bf16_by_default(device: torch.device) -> bool:
    """What ``bf16=None`` means on ``device``: on for a CPU that computes bfloat16 natively, off on
    a GPU. A training iteration on a GPU is paced by its thousands of kernel launches, not by
    arithmetic, and autocast adds cast kernels: on an H200 every preset trained slower in bfloat16
    (cpu 1.6 iterations/s against 5.7 in float32, fast 2.6 against 3.8; BENCHMARKS.md, "GPU")."""
    return device.type == "cpu" and native_bf16(device)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a training with ``cfg`` computes in bfloat16 on ``device`` (``bf16=None``: the
    device's default)."""
    return bf16_by_default(device) if cfg.bf16 is None else cfg.bf16


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU where there is one, else the CPU; any other name or device as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (which module init uses) without disturbing the caller's stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_models(model_cfg: ModelConfig, crop_size: int, seed: int, device: torch.device) -> tuple[Generator, MultiScaleDiscriminator]:
    """One image's G and D, initialised from its seed."""
    with _seeded(seed, device):
        g = Generator(model_cfg)
        d = MultiScaleDiscriminator(model_cfg, crop_size)
    return g.to(device), d.to(device)


def build_bundle(model_cfg: ModelConfig, crop_size: int, seeds: Sequence[int],
                 device: torch.device) -> tuple[Generator, MultiScaleDiscriminator]:
    """The bundle's G and D, each image's block initialised from its own seed as if it trained
    alone (the bundle's own initialisation is replaced)."""
    singles = [build_models(model_cfg, crop_size, seed, device) for seed in seeds]
    with _seeded(seeds[0], device):
        g = Generator(model_cfg, bundle=len(seeds)).to(device)
        d = MultiScaleDiscriminator(model_cfg, crop_size, bundle=len(seeds)).to(device)
    g.load_state_dict(bundle.join([s[0].state_dict() for s in singles]))
    d.load_state_dict(bundle.join([s[1].state_dict() for s in singles]))
    return g, d


def training_crop(working_hw: tuple[int, int], cfg: TrainConfig) -> tuple[int, int]:
    """The (h, w) of the crops a working image of ``working_hw`` trains on: the configured side,
    clipped to the image minus one pixel. Raises ``ValueError`` for an image too small to train."""
    h, w = working_hw
    crop = (min(cfg.crop_size, h - 1), min(cfg.crop_size, w - 1))
    if min(crop) < cfg.min_out_side:
        raise ValueError(f"image {w}x{h} is too small to train on: need at least {cfg.min_out_side + 1} px per side")
    return crop


def training_input(image: Tensor, cfg: TrainConfig) -> tuple[Tensor, tuple[int, int]]:
    """A model input's (3, H, W) working image (``images.working_image``) and its crop size
    (``training_crop``); ``ValueError`` for an image that is not RGB or too small to train."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image tensor (3, H, W), got {tuple(image.shape)}")
    work = working_image(image, cfg.max_side)
    return work, training_crop((work.shape[-2], work.shape[-1]), cfg)


def draw_target(rng: torch.Generator, cfg: TrainConfig, crop_hw: tuple[int, int],
                iteration: int) -> tuple[tuple[int, int], Tensor | None]:
    """An iteration's output shape around the crop's, and a homography when shifts are enabled:
    the range grows from the crop's own shape to the full one by ``curriculum_end``."""
    t = min(1.0, iteration / max(1.0, cfg.curriculum_end * cfg.iterations))
    lo, hi = 1 - (1 - cfg.min_scale) * t, 1 + (cfg.max_scale - 1) * t
    ch, cw = crop_hw

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=rng).item()

    out_hw = (max(cfg.min_out_side, round(ch * uniform(lo, hi))), max(cfg.min_out_side, round(cw * uniform(lo, hi))))
    matrix = None
    if cfg.max_shift > 0:
        m = cfg.max_shift * t
        matrix = homography((uniform(-m, m), uniform(-m, m)))
    return out_hw, matrix


def random_crop(image: Tensor, crop_hw: tuple[int, int], rng: torch.Generator) -> Tensor:
    """(1, 3, ch, cw): a crop of ``image`` (3, H, W) at a random place."""
    h, w = image.shape[-2:]
    ch, cw = crop_hw
    top = int(torch.randint(0, h - ch + 1, (), generator=rng))
    left = int(torch.randint(0, w - cw + 1, (), generator=rng))
    return image[None, :, top:top + ch, left:left + cw]


def _descend(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on ``loss``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Trainer:
    """The models, optimisers and random streams of a bundle of images; ``step()`` runs one
    iteration, ``run()`` the whole schedule.

    ``images``: K model inputs (3, H, W) in [-1, 1] that share a crop size (group them by
    ``training_input``); ``seeds``: each one's (default: ``train_cfg.seed`` for all), image k
    trains as ``part_cfg(k)``. ``terms``: extra loss terms (``losses.Term``); InGAN adds none."""

    def __init__(self, images: Sequence[Tensor], model_cfg: ModelConfig, train_cfg: TrainConfig,
                 device: str | torch.device = "auto", *, seeds: Sequence[int] | None = None,
                 terms: Sequence[losses.Term] = ()) -> None:
        self.device = pick_device(device)
        self.model_cfg, self.cfg, self.terms = model_cfg, train_cfg, list(terms)
        seeds = [train_cfg.seed] * len(images) if seeds is None else list(seeds)
        if not images or len(seeds) != len(images):
            raise ValueError(f"a bundle needs one seed per image: {len(images)} images, {len(seeds)} seeds")
        self.n_images = len(images)
        prepared = [training_input(im, train_cfg) for im in images]
        self.images = [work.to(self.device) for work, _ in prepared]  # (3, H, W) in [-1, 1]
        crops = {crop for _, crop in prepared}
        if len(crops) > 1:
            raise ValueError(f"the images of a bundle train on one crop size; these need {sorted(crops)}")
        self.crop_hw = crops.pop()
        if self.device.type == "cuda":  # the same seed gives the same weights on a GPU too
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.g, self.d = build_bundle(model_cfg, max(self.crop_hw), seeds, self.device)
        # oneDNN (CPU) and cuDNN (tensor cores) both run NHWC convolutions without reorders.
        self.g.to(memory_format=torch.channels_last)
        self.d.to(memory_format=torch.channels_last)
        betas = (train_cfg.beta1, train_cfg.beta2)
        # Fused Adam: one kernel per parameter group instead of a dozen small ops per tensor.
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=train_cfg.lr, betas=betas, fused=True)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=train_cfg.lr, betas=betas, fused=True)
        self.bf16 = uses_bf16(train_cfg, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self._lr_factor)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, self._lr_factor)
        self.streams = bundle.Streams(seeds, self.device)
        self.iteration = 0
        self.failed: dict[int, str] = {}  # image -> why its training cannot be trusted

    def part_cfg(self, k: int) -> TrainConfig:
        """The settings image ``k`` trains with: the bundle's, with its own seed."""
        return dataclasses.replace(self.cfg, seed=self.streams.seeds[k])

    # -- schedule -------------------------------------------------------------------------------
    def _lr_factor(self, i: int) -> float:
        start = self.cfg.lr_decay_start * self.cfg.iterations
        if i < start:
            return 1.0
        return max(0.0, (self.cfg.iterations - i) / max(1.0, self.cfg.iterations - start))

    def sample_target(self) -> tuple[tuple[int, int], Tensor | None]:
        """An output shape around the crop's, and a homography when shifts are enabled: the first
        image's draw, for the whole bundle (every image draws one, as it would alone)."""
        return self.streams.each(lambda _k, rng: draw_target(rng, self.cfg, self.crop_hw, self.iteration))[0]

    def random_crop(self, streams: bundle.Streams | None = None) -> Tensor:
        """(1, 3K, ch, cw): each image's crop at a random place of its working image, drawn from
        its stream in ``streams`` (default: the training's)."""
        return bundle.side_by_side((streams or self.streams).each(lambda k, rng: random_crop(self.images[k], self.crop_hw, rng)))

    def _noisy(self, x: Tensor) -> Tensor:
        return self.streams.uniform_noise(x, self.cfg.noise)

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> dict[str, Tensor]:
        """One iteration of InGAN: a random crop is G's input and D's real example; G maps it to a
        random output shape and back (one G step), D learns the crop from the fake (one D step),
        and past ``second_g_step_start`` a second G step trains the inverse mapping alone. Returns
        each loss per image, (K,), on the device."""
        cfg, d = self.cfg, self.d
        real = self.random_crop()
        out_hw, matrix = self.sample_target()
        inverse = None if matrix is None else torch.linalg.inv(matrix)
        weights = d.scale_weights(self.iteration / cfg.iterations, cfg.d_scale_pivot, d.n_scales_for(out_hw))

        def views(fake: Tensor) -> losses.Views:
            return losses.Views(real, fake, out_hw, matrix, self.n_images, lambda x: d(self._noisy(x), weights))

        fake, report = self._g_step(real, out_hw, matrix, inverse, views)
        report |= self._d_step(real, views(fake.detach()))
        if self.iteration >= cfg.second_g_step_start * cfg.iterations:
            report["rec2"] = self._inverse_g_step(real, fake.detach(), inverse)
        self.sched_g.step()
        self.sched_d.step()
        self.iteration += 1
        return {name: value.detach() for name, value in report.items()}

    def _extra(self, net: str, views: losses.Views) -> dict[str, Tensor]:
        return {term.name: term.value(views) for term in self.terms if term.net == net}

    def _g_step(self, real: Tensor, out_hw: tuple[int, int], matrix: Tensor | None, inverse: Tensor | None,
                views: Callable[[Tensor], losses.Views]) -> tuple[Tensor, dict[str, Tensor]]:
        """Fool D at the new shape, and come back to the crop through the inverse map."""
        g, d = self.g, self.d
        d.requires_grad_(False)
        # spectral.cached(): spectral-normalised weights are computed once per step, not once per
        # call (G runs twice, D once here), each group of equal shapes in one batched pass.
        with spectral.cached(), self.autocast:
            fake = g(self._noisy(real), out_hw, matrix)  # (1, 3K, *out_hw)
            rec = g(fake, real.shape[-2:], inverse)
            report = {"g_adv": losses.g_adversarial(views(fake).discriminate(fake), self.n_images),
                      "rec": losses.reconstruction(rec, real, self.n_images)}
            report |= self._extra("g", views(fake))
        total = report["g_adv"] + self.cfg.rec_weight * report["rec"]
        extra = [value for name, value in report.items() if name not in ("g_adv", "rec")]
        _descend(self.opt_g, sum(extra, total).sum())
        return fake, report

    def _d_step(self, real: Tensor, views: losses.Views) -> dict[str, Tensor]:
        """D on the same real crop and the (detached) fake."""
        self.d.requires_grad_(True)
        with spectral.cached(), self.autocast:
            loss = losses.d_adversarial(views.discriminate(real), views.discriminate(views.fake), self.n_images)
            extra = self._extra("d", views)
        _descend(self.opt_d, sum(extra.values(), loss).sum())
        return {"d": loss, **extra}

    def _inverse_g_step(self, real: Tensor, fake: Tensor, inverse: Tensor | None) -> Tensor:
        """The inverse mapping alone, from the fake as a fixed input."""
        with self.autocast:
            rec = self.g(fake, real.shape[-2:], inverse)
        loss = losses.reconstruction(rec, real, self.n_images)
        _descend(self.opt_g, (self.cfg.second_rec_weight * loss).sum())
        return loss

    # -- the whole schedule ---------------------------------------------------------------------
    def run(self, progress: ProgressFn | None = None, snapshot: SnapshotFn | None = None,
            snapshot_every_s: float | None = None) -> None:
        """Train until ``cfg.iterations``; report every ``log_every`` iterations and at the end.
        Losses are read back (a device sync) only at report points, where an image whose loss is
        no longer finite is marked ``failed`` (the others are not touched by it and go on; the
        loop ends early once every image has failed). At the end an image with a non-finite
        weight is marked too. With ``snapshot``, it is called with the trainer every
        ``snapshot_every_s`` seconds of training (between two iterations, never after the last),
        for the caller to save each image's ``part_state()``."""
        self.g.train()
        self.d.train()
        start, first = time.perf_counter(), self.iteration
        last_snapshot = start
        while self.iteration < self.cfg.iterations and len(self.failed) < self.n_images:
            out = self.step()
            done = self.iteration
            due = snapshot_every_s is not None and time.perf_counter() - last_snapshot >= snapshot_every_s
            if snapshot is not None and due and done < self.cfg.iterations:
                snapshot(self)
                last_snapshot = time.perf_counter()  # saving time does not eat the interval
            if done % self.cfg.log_every == 0 or done == self.cfg.iterations:
                self._mark_failed(torch.stack(list(out.values())).isfinite().all(0), "loss")
                if progress:
                    elapsed = time.perf_counter() - start
                    live = [k for k in range(self.n_images) if k not in self.failed] or list(range(self.n_images))
                    progress(Progress(done, self.cfg.iterations, {key: float(v[live].mean()) for key, v in out.items()},
                                      elapsed, (done - first) / elapsed if elapsed > 0 else 0.0))
        finite = torch.stack([t.detach().reshape(self.n_images, -1).isfinite().all(1)
                              for net in (self.g, self.d) for t in net.state_dict().values() if t.dim()])
        self._mark_failed(finite.all(0), "weight")
        if self.cfg.norm_calibration > 0:
            calibrate_norm_stats(self, self.g, self.cfg.norm_calibration)
        self.g.eval()
        self.d.eval()

    def _mark_failed(self, finite: Tensor, what: str) -> None:
        """Mark each image whose entry of ``finite`` (K,) is false, with the first reason seen."""
        for k, ok in enumerate(finite.tolist()):
            if not ok and k not in self.failed:
                self.failed[k] = f"training diverged: a non-finite {what} by iteration {self.iteration}"

    # -- each image's state, to continue an interrupted training ---------------------------------
    def part_state(self, k: int) -> dict[str, Any]:
        """Everything image ``k``'s remaining iterations depend on: weights and buffers of its G
        and D, optimiser and schedule states, both its random streams and the iteration, in the
        format of a bundle of one. Loaded into a trainer built with the same image and settings,
        alone or in any bundle, training goes on exactly as if it had never stopped
        (bit-identical on the CPU for the same bundle)."""
        own = bundle.part({"g": self.g.state_dict(), "d": self.d.state_dict(),
                           "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}, k, self.n_images)
        return {"iteration": self.iteration, **own, "sched_g": self.sched_g.state_dict(),
                "sched_d": self.sched_d.state_dict(), **self.streams.state(k)}

    def part_generator(self, k: int) -> dict[str, Tensor]:
        """Image ``k``'s generator weights and buffers alone (``part_state(k)["g"]``)."""
        return bundle.part(self.g.state_dict(), k, self.n_images)

    def load_parts(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue every image from its ``part_state()``, all saved at the same iteration;
        raises ``ValueError`` (or torch's ``RuntimeError`` for mismatched tensors) when they
        cannot belong to this trainer."""
        iteration = _common_iteration(states, self.n_images, self.cfg.iterations)
        whole = bundle.join([{key: state[key] for key in ("g", "d", "opt_g", "opt_d")} for state in states])
        for target, key in ((self.g, "g"), (self.d, "d"), (self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            target.load_state_dict(whole[key])
        self.sched_g.load_state_dict(states[0]["sched_g"])
        self.sched_d.load_state_dict(states[0]["sched_d"])
        for k, state in enumerate(states):
            self.streams.load(k, state)
        self.iteration = iteration


@torch.no_grad()
def calibrate_norm_stats(trainer: Trainer, g: Generator, passes: int) -> None:
    """Re-estimate ``g``'s BatchNorm running statistics (the trainer's G, or a copy of it) as an
    equal-weight average over ``passes`` forward passes drawn like training (random crop, random
    output shape at the curriculum's full range). Training leaves them as a momentum-0.1 average
    of the last dozen or so random crops and shapes, so eval-mode outputs would shift from one
    iteration to the next."""
    norms = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    was_training = g.training
    g.eval()  # spectral norm's power iteration stays put: only the statistics change
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    # Streams of their own: the training's are left exactly where they were. As in training, the
    # bundle takes the first image's shape; each image draws its own too.
    streams = bundle.Streams([seed + 2 for seed in trainer.streams.seeds], trainer.device)
    (ch, cw), cfg = trainer.crop_hw, trainer.cfg
    for _ in range(passes):
        crop = trainer.random_crop(streams)
        s = streams.each(lambda _k, rng: cfg.min_scale + (cfg.max_scale - cfg.min_scale) * torch.rand(2, generator=rng))[0]
        out_hw = (max(cfg.min_out_side, round(ch * float(s[0]))), max(cfg.min_out_side, round(cw * float(s[1]))))
        with trainer.autocast:
            g(crop, out_hw)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    g.train(was_training)


def _common_iteration(states: Sequence[dict[str, Any]], n_images: int, iterations: int) -> int:
    """The iteration every one of ``states`` was saved at; ``ValueError`` for states that cannot
    continue a bundle of ``n_images`` of ``iterations``."""
    if len(states) != n_images:
        raise ValueError(f"{len(states)} saved states for a bundle of {n_images}")
    saved_at = {state["iteration"] for state in states}
    iteration = saved_at.pop()
    if saved_at:
        raise ValueError("the images' states were saved at different iterations")
    if not isinstance(iteration, int) or not 0 <= iteration <= iterations:
        raise ValueError(f"iteration {iteration!r} is outside this training's 0..{iterations}")
    if any(state.get("g_ema") is not None for state in states):  # saved by a version that could average G's weights
        raise ValueError("the saved state holds a weight average, which this version does not train")
    return iteration
