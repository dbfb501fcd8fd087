"""Training InGAN: one image, or a bundle of K images trained as one fused model.

Each iteration: a random crop is G's input and D's real example; G maps it to a random output
shape (the range grows with a curriculum) and back; one G step on adversarial + cycle loss, one D
step, and past a point of the schedule a second G step on the inverse mapping alone.

A bundle trains K independent InGANs of one preset and crop size in the same iteration: each
image has its own weights, BatchNorm statistics, spectral vectors, optimiser moments, crops and
noise (``ingan.networks`` lays the K models side by side as channel blocks of grouped convs), so
each of its kernels is launched once for K images. What the images share is each iteration's
output shape and transform, drawn from the first image's stream. Every image still draws its own
from its own stream too, unused: its crops and noise are then exactly those of its training alone,
and the shapes it trains on are drawn from the same distribution as they would be alone. Each
loss is K times the mean over the bundle, whose gradient for image k's weights is that of image
k's own loss: nothing flows between images, and a non-finite image leaves the others unchanged.
K = 1 is the single training, bit for bit.

All randomness comes from generators seeded by ``TrainConfig.seed`` (per image, ``seeds``); the
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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least: losses are computed outside bfloat16 (a float64 training, which
    the tests use to compare a bundle with single trainings without rounding noise, stays so)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _side_by_side(blocks: list[Tensor]) -> Tensor:
    """Images (1, C, h, w) as one bundle tensor (1, K*C, h, w); one image as it is."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def _descend(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on ``loss``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (which module init uses) without disturbing the caller's stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_models(model_cfg: ModelConfig, crop_size: int, seed: int, device: torch.device) -> tuple[Generator, MultiScaleDiscriminator]:
    with _seeded(seed, device):
        g = Generator(model_cfg)
        d = MultiScaleDiscriminator(model_cfg, crop_size)
    return g.to(device), d.to(device)


def training_crop(working_hw: tuple[int, int], cfg: TrainConfig) -> tuple[int, int]:
    """The (h, w) of the crops a working image of ``working_hw`` trains on: the configured side,
    clipped to the image minus one pixel. Raises ``ValueError`` for an image too small to train."""
    h, w = working_hw
    crop = (min(cfg.crop_size, h - 1), min(cfg.crop_size, w - 1))
    if min(crop) < cfg.min_out_side:
        raise ValueError(f"image {w}x{h} is too small to train on: need at least {cfg.min_out_side + 1} px per side")
    return crop


class Trainer:
    """Holds the models, optimisers and RNG streams of one image or a bundle; ``step()`` runs one
    iteration.

    ``image``: one (3, H, W) tensor, or a sequence of K for a bundle. ``seeds``: each image's
    seed (default: ``train_cfg.seed`` for one image); image k trains as ``part_cfg(k)``. The
    images of a bundle need the same crop size (``crop_hw``): group them by it."""

    def __init__(self, image: Tensor | Sequence[Tensor], model_cfg: ModelConfig, train_cfg: TrainConfig,
                 device: torch.device | str = "auto", *, seeds: Sequence[int] | None = None) -> None:
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model_cfg, self.cfg = model_cfg, train_cfg
        sources = [image] if isinstance(image, Tensor) else list(image)
        self.seeds = [train_cfg.seed] if seeds is None and len(sources) == 1 else list(seeds or [])
        if not sources or len(self.seeds) != len(sources):
            raise ValueError(f"a bundle needs one seed per image: {len(sources)} images, {len(self.seeds)} seeds")
        self.k = len(sources)
        for src in sources:
            if src.dim() != 3 or src.shape[0] != 3:
                raise ValueError(f"expected an RGB image tensor (3, H, W), got {tuple(src.shape)}")
        self.images = [working_image(src, train_cfg.max_side).to(self.device) for src in sources]  # (3, H, W) in [-1, 1]
        crops = {training_crop(tuple(im.shape[-2:]), train_cfg) for im in self.images}
        if len(crops) > 1:
            raise ValueError(f"the images of a bundle train on one crop size; these need {sorted(crops)}")
        self.crop_hw = crops.pop()
        if self.device.type == "cuda":  # the same seed gives the same weights on a GPU too
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.g, self.d = self._build()
        # oneDNN (CPU) and cuDNN (tensor cores) both run NHWC convolutions without reorders.
        self.g.to(memory_format=torch.channels_last)
        self.d.to(memory_format=torch.channels_last)
        betas = (train_cfg.beta1, train_cfg.beta2)
        # Fused Adam: one kernel per parameter group instead of a dozen small ops per tensor.
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=train_cfg.lr, betas=betas, fused=True)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=train_cfg.lr, betas=betas, fused=True)
        self.bf16 = bf16_by_default(self.device) if train_cfg.bf16 is None else train_cfg.bf16
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self._lr_factor)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, self._lr_factor)
        # Per image: crops, shapes, shifts (CPU), and noise (on the device).
        self.rngs = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        self.noise_rngs = [torch.Generator(device=self.device).manual_seed(seed + 1) for seed in self.seeds]
        self.iteration = 0
        self.failed: dict[int, str] = {}  # image -> why its training cannot be trusted

    def _build(self) -> tuple[Generator, MultiScaleDiscriminator]:
        """G and D, each image's initialised from its own seed as if it trained alone."""
        side = max(self.crop_hw)
        singles = [build_models(self.model_cfg, side, seed, self.device) for seed in self.seeds]
        if self.k == 1:
            return singles[0]
        with _seeded(self.seeds[0], self.device):  # placeholders, replaced below
            g = Generator(self.model_cfg, bundle=self.k).to(self.device)
            d = MultiScaleDiscriminator(self.model_cfg, side, bundle=self.k).to(self.device)
        g.load_state_dict(bundle.join([s[0].state_dict() for s in singles]))
        d.load_state_dict(bundle.join([s[1].state_dict() for s in singles]))
        return g, d

    def part_cfg(self, k: int) -> TrainConfig:
        """The settings image ``k`` trains with: the bundle's, with its own seed."""
        return dataclasses.replace(self.cfg, seed=self.seeds[k])

    @torch.no_grad()
    def calibrate_norm_stats(self, g: Generator, passes: int) -> None:
        """Re-estimate ``g``'s BatchNorm running statistics (G's, or a copy of it) as an
        equal-weight average over ``passes`` forward passes drawn like training (random crop,
        random output shape at the curriculum's full range). Training leaves them as a
        momentum-0.1 average of the last dozen or so random crops and shapes, so eval-mode outputs
        would shift from one iteration to the next."""
        norms = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        saved = [m.momentum for m in norms]
        was_training = g.training
        g.eval()  # spectral norm's power iteration stays put: only the statistics change
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        # Their own generators: the training streams are left exactly where they were. As in
        # training, the bundle takes the first image's shape; each image draws its own too.
        rngs = [torch.Generator().manual_seed(seed + 2) for seed in self.seeds]
        ch, cw = self.crop_hw
        cfg = self.cfg
        for _ in range(passes):
            crops, scales = [], []
            for k, rng in enumerate(rngs):
                crops.append(self._crop(k, rng))
                scales.append(cfg.min_scale + (cfg.max_scale - cfg.min_scale) * torch.rand(2, generator=rng))
            crop, s = _side_by_side(crops), scales[0]
            out_hw = (max(cfg.min_out_side, round(ch * float(s[0]))), max(cfg.min_out_side, round(cw * float(s[1]))))
            with self.autocast:
                g(crop, out_hw)
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        g.train(was_training)

    # -- continuing an interrupted training -----------------------------------------------------
    def part_state(self, k: int) -> dict[str, Any]:
        """Everything image ``k``'s remaining iterations depend on: weights and buffers of its G
        and D, optimiser and schedule states, both its RNG streams and the iteration, in the
        format of a single training. Loaded into a trainer built with the same image and
        settings, alone or in any bundle, training goes on exactly as if it had never stopped
        (bit-identical on the CPU for the same bundle)."""
        own = self._own({"g": self.g.state_dict(), "d": self.d.state_dict(),
                         "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}, k)
        return {"iteration": self.iteration, **own,
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "rng": self.rngs[k].get_state(), "noise_rng": self.noise_rngs[k].get_state()}

    def part_generator(self, k: int) -> dict[str, Tensor]:
        """Image ``k``'s generator weights and buffers alone (``part_state(k)["g"]``)."""
        return self._own(self.g.state_dict(), k)

    def _own(self, state: Any, k: int) -> Any:
        """Image ``k``'s block of a state of the whole bundle; one image's is the state itself."""
        return state if self.k == 1 else bundle.part(state, k, self.k)

    def load_parts(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue every image from its ``part_state()``, all saved at the same iteration;
        raises ``ValueError`` (or torch's ``RuntimeError`` for mismatched tensors) when they
        cannot belong to this trainer."""
        if len(states) != self.k:
            raise ValueError(f"{len(states)} saved states for a bundle of {self.k}")
        iterations = {state["iteration"] for state in states}
        iteration = iterations.pop()
        if iterations:
            raise ValueError("the images' states were saved at different iterations")
        if not isinstance(iteration, int) or not 0 <= iteration <= self.cfg.iterations:
            raise ValueError(f"iteration {iteration!r} is outside this training's 0..{self.cfg.iterations}")
        if any(state.get("g_ema") is not None for state in states):  # saved by a version that could average G's weights
            raise ValueError("the saved state holds a weight average, which this version does not train")
        whole = bundle.join([{key: state[key] for key in ("g", "d", "opt_g", "opt_d")} for state in states])
        self.g.load_state_dict(whole["g"])
        self.d.load_state_dict(whole["d"])
        self.opt_g.load_state_dict(whole["opt_g"])
        self.opt_d.load_state_dict(whole["opt_d"])
        self.sched_g.load_state_dict(states[0]["sched_g"])
        self.sched_d.load_state_dict(states[0]["sched_d"])
        for state, rng, noise_rng in zip(states, self.rngs, self.noise_rngs, strict=True):
            rng.set_state(state["rng"])
            noise_rng.set_state(state["noise_rng"].to(noise_rng.get_state().device))
        self.iteration = iteration

    def state_dict(self) -> dict[str, Any]:
        """A single training's ``part_state(0)``."""
        if self.k != 1:
            raise ValueError("a bundle's state is its images' states: part_state(k)")
        return self.part_state(0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_parts([state])

    # -- schedule -------------------------------------------------------------------------------
    def _lr_factor(self, i: int) -> float:
        start = self.cfg.lr_decay_start * self.cfg.iterations
        if i < start:
            return 1.0
        return max(0.0, (self.cfg.iterations - i) / max(1.0, self.cfg.iterations - start))

    def sample_target(self) -> tuple[tuple[int, int], Tensor | None]:
        """An output shape around the crop's, and a homography when shifts are enabled: the first
        image's draw, for the whole bundle (every image draws one, as it would alone)."""
        draws = [self._draw_target(rng) for rng in self.rngs]
        return draws[0]

    def _draw_target(self, rng: torch.Generator) -> tuple[tuple[int, int], Tensor | None]:
        cfg = self.cfg
        t = min(1.0, self.iteration / max(1.0, cfg.curriculum_end * cfg.iterations))
        lo, hi = 1 - (1 - cfg.min_scale) * t, 1 + (cfg.max_scale - 1) * t
        ch, cw = self.crop_hw

        def uniform(a: float, b: float) -> float:
            return a + (b - a) * torch.rand((), generator=rng).item()

        out_hw = (max(cfg.min_out_side, round(ch * uniform(lo, hi))), max(cfg.min_out_side, round(cw * uniform(lo, hi))))
        matrix = None
        if cfg.max_shift > 0:
            m = cfg.max_shift * t
            matrix = homography((uniform(-m, m), uniform(-m, m)))
        return out_hw, matrix

    def random_crop(self) -> Tensor:
        """(1, 3K, ch, cw): each image's crop at a random place of its working image."""
        return _side_by_side([self._crop(k, rng) for k, rng in enumerate(self.rngs)])

    def _crop(self, k: int, rng: torch.Generator) -> Tensor:
        h, w = self.images[k].shape[-2:]
        ch, cw = self.crop_hw
        top = int(torch.randint(0, h - ch + 1, (), generator=rng))
        left = int(torch.randint(0, w - cw + 1, (), generator=rng))
        return self.images[k][None, :, top:top + ch, left:left + cw]

    def _noisy(self, x: Tensor) -> Tensor:
        """``x`` (1, 3K, h, w) plus each image's uniform noise from its own stream."""
        shape = (1, x.shape[1] // self.k, *x.shape[2:])
        n = _side_by_side([torch.rand(shape, generator=g, device=x.device, dtype=x.dtype) for g in self.noise_rngs])
        return x + (2 * n - 1) * self.cfg.noise

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

        fake, report = self._g_step(real, out_hw, matrix, inverse, weights)
        report.update(self._d_step(real, fake.detach(), out_hw, matrix, weights))
        if self.iteration >= cfg.second_g_step_start * cfg.iterations:
            report["rec2"] = self._inverse_g_step(real, fake.detach(), inverse)

        self.sched_g.step()
        self.sched_d.step()
        self.iteration += 1
        return report

    def _g_step(self, real: Tensor, out_hw: tuple[int, int], matrix: Tensor | None, inverse: Tensor | None,
                weights: list[float]) -> tuple[Tensor, dict[str, Tensor]]:
        """Fool D at the new shape, and come back to the crop through the inverse map."""
        g, d = self.g, self.d
        d.requires_grad_(False)
        # spectral.cached(): spectral-normalised weights are computed once per step, not once per
        # call (G runs twice, D once here), each group of equal shapes in one batched pass.
        with spectral.cached(), self.autocast:
            fake = g(self._noisy(real), out_hw, matrix)  # (1, 3K, *out_hw)
            rec = g(fake, real.shape[-2:], inverse)
            d_fake = _wide(d(self._noisy(fake), weights))
            loss_adv = losses.g_adv_loss(d_fake)
            loss_rec = losses.reconstruction_loss(_wide(rec), real)
            extra = self.extra_g_losses(real, fake)
        _descend(self.opt_g, self._bundled(sum(extra.values(), loss_adv + self.cfg.rec_weight * loss_rec)))
        with torch.no_grad():
            report = {"g_adv": self._each(loss_adv, lambda: (d_fake - 1).square()),
                      "rec": self._each(loss_rec, lambda: (_wide(rec) - real).abs())}
        return fake, report | {k: self._each(v) for k, v in extra.items()}

    def _d_step(self, real: Tensor, fake: Tensor, out_hw: tuple[int, int], matrix: Tensor | None,
                weights: list[float]) -> dict[str, Tensor]:
        """D on the same real crop and the (detached) fake."""
        d = self.d
        d.requires_grad_(True)
        with spectral.cached(), self.autocast:
            d_real = _wide(d(self._noisy(real), weights))
            d_fake = _wide(d(self._noisy(fake), weights))
            loss = losses.d_loss(d_real, d_fake)
            extra = self.extra_d_losses(real, out_hw, matrix, weights)
        total = sum(extra.values(), loss)
        _descend(self.opt_d, self._bundled(total))
        with torch.no_grad():
            mean_d = self._each(total, lambda: 0.5 * (d_real - 1).square(), lambda: 0.5 * d_fake.square())
        return {"d": mean_d, **{k: self._each(v) for k, v in extra.items()}}

    def _inverse_g_step(self, real: Tensor, fake: Tensor, inverse: Tensor | None) -> Tensor:
        """The inverse mapping alone, from the fake as a fixed input."""
        with self.autocast:
            rec = _wide(self.g(fake, real.shape[-2:], inverse))
        loss = losses.reconstruction_loss(rec, real)
        _descend(self.opt_g, self._bundled(self.cfg.second_rec_weight * loss))
        with torch.no_grad():
            return self._each(loss, lambda: (rec - real).abs())

    def _bundled(self, loss: Tensor) -> Tensor:
        """A loss averaged over the bundle's elements, times K: the sum of the images' own losses
        (each image's tensors are the same size), so image k's gradient is its loss's alone."""
        return loss if self.k == 1 else loss * self.k

    def _each(self, loss: Tensor, *elementwise: Callable[[], Tensor]) -> Tensor:
        """(K,): each image's value of ``loss``, a mean over the bundle of the sum of the
        ``elementwise`` terms, (1, C*K, h, w) each; one image's is ``loss`` itself."""
        if self.k == 1 or not elementwise:
            return loss.detach().reshape(-1).expand(self.k)
        return sum(_wide(term()).mean((0, 2, 3)).view(self.k, -1).mean(1) for term in elementwise)  # type: ignore[return-value]

    # -- hooks for experiments (bench/lab.py): InGAN itself adds nothing ------------------------
    def extra_g_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Weighted terms added to G's loss, computed inside the step's autocast and reported
        under their names."""
        return {}

    def extra_d_losses(self, real: Tensor, out_hw: tuple[int, int], matrix: Tensor | None,
                       weights: list[float]) -> dict[str, Tensor]:
        """Weighted terms added to D's loss (extra fakes, say), as ``extra_g_losses``."""
        return {}

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
        while self.iteration < self.cfg.iterations and len(self.failed) < self.k:
            out = self.step()
            done = self.iteration
            if snapshot is not None and snapshot_every_s is not None and done < self.cfg.iterations:
                now = time.perf_counter()
                if now - last_snapshot >= snapshot_every_s:
                    snapshot(self)
                    last_snapshot = time.perf_counter()  # saving time does not eat the interval
            if done % self.cfg.log_every == 0 or done == self.cfg.iterations:
                self._mark_failed(torch.stack(list(out.values())).isfinite().all(0), "loss")
                if progress:
                    elapsed = time.perf_counter() - start
                    live = [k for k in range(self.k) if k not in self.failed] or list(range(self.k))
                    progress(Progress(done, self.cfg.iterations, {key: float(v[live].mean()) for key, v in out.items()},
                                      elapsed, (done - first) / elapsed if elapsed > 0 else 0.0))
        finite = torch.stack([t.detach().reshape(self.k, -1).isfinite().all(1)
                              for net in (self.g, self.d) for t in net.state_dict().values() if t.dim()])
        self._mark_failed(finite.all(0), "weight")
        if self.cfg.norm_calibration > 0:
            self.calibrate_norm_stats(self.g, self.cfg.norm_calibration)
        self.g.eval()
        self.d.eval()

    def _mark_failed(self, finite: Tensor, what: str) -> None:
        """Mark each image whose entry of ``finite`` (K,) is false, with the first reason seen."""
        for k, ok in enumerate(finite.tolist()):
            if not ok and k not in self.failed:
                self.failed[k] = f"training diverged: a non-finite {what} by iteration {self.iteration}"
