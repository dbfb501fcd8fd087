"""Training one InGAN on one image.

Each iteration: a random crop is G's input and D's real example; G maps it to a random output
shape (the range grows with a curriculum) and back; one G step on adversarial + cycle loss, one D
step, and past a point of the schedule a second G step on the inverse mapping alone.

All randomness comes from generators seeded by ``TrainConfig.seed``; the global RNG is touched only
inside a forked scope, so the same seed on the same device gives bit-identical weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import losses, spectral
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


class Trainer:
    """Holds the models, optimisers and RNG streams; ``step()`` runs one iteration."""

    def __init__(self, image: Tensor, model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device | str = "auto") -> None:
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model_cfg, self.cfg = model_cfg, train_cfg
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image tensor (3, H, W), got {tuple(image.shape)}")
        self.image = working_image(image, train_cfg.max_side).to(self.device)  # (3, H, W) in [-1, 1]
        h, w = self.image.shape[-2:]
        self.crop_hw = (min(train_cfg.crop_size, h - 1), min(train_cfg.crop_size, w - 1))
        if min(self.crop_hw) < train_cfg.min_out_side:
            raise ValueError(f"image {w}x{h} is too small to train on: need at least {train_cfg.min_out_side + 1} px per side")
        if self.device.type == "cuda":  # the same seed gives the same weights on a GPU too
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.g, self.d = build_models(model_cfg, max(self.crop_hw), train_cfg.seed, self.device)
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
        self.rng = torch.Generator().manual_seed(train_cfg.seed)  # crops, shapes, shifts (CPU)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(train_cfg.seed + 1)
        self.iteration = 0

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
        # Its own generator: the training streams are left exactly where they were.
        rng = torch.Generator().manual_seed(self.cfg.seed + 2)
        h, w = self.image.shape[-2:]
        ch, cw = self.crop_hw
        cfg = self.cfg
        for _ in range(passes):
            top = int(torch.randint(0, h - ch + 1, (), generator=rng))
            left = int(torch.randint(0, w - cw + 1, (), generator=rng))
            crop = self.image[None, :, top:top + ch, left:left + cw]
            s = cfg.min_scale + (cfg.max_scale - cfg.min_scale) * torch.rand(2, generator=rng)
            out_hw = (max(cfg.min_out_side, round(ch * float(s[0]))), max(cfg.min_out_side, round(cw * float(s[1]))))
            with self.autocast:
                g(crop, out_hw)
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        g.train(was_training)

    # -- continuing an interrupted training -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the remaining iterations depend on: weights and buffers of G and D, optimiser and schedule states, both RNG streams and the iteration. Loaded into a
        trainer built with the same image and configs, training goes on exactly as if it had never
        stopped (bit-identical on the CPU)."""
        return {
            "iteration": self.iteration,
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "rng": self.rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result; raises ``ValueError`` (or torch's
        ``RuntimeError`` for mismatched tensors) when it cannot belong to this trainer."""
        iteration = state["iteration"]
        if not isinstance(iteration, int) or not 0 <= iteration <= self.cfg.iterations:
            raise ValueError(f"iteration {iteration!r} is outside this training's 0..{self.cfg.iterations}")
        if state.get("g_ema") is not None:  # saved by a version that could average G's weights
            raise ValueError("the saved state holds a weight average, which this version does not train")
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.rng.set_state(state["rng"])
        self.noise_rng.set_state(state["noise_rng"].to(self.noise_rng.get_state().device))
        self.iteration = iteration

    # -- schedule -------------------------------------------------------------------------------
    def _lr_factor(self, i: int) -> float:
        start = self.cfg.lr_decay_start * self.cfg.iterations
        if i < start:
            return 1.0
        return max(0.0, (self.cfg.iterations - i) / max(1.0, self.cfg.iterations - start))

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.rng).item()

    def sample_target(self) -> tuple[tuple[int, int], Tensor | None]:
        """An output shape around the crop's, and a homography when shifts are enabled."""
        cfg = self.cfg
        t = min(1.0, self.iteration / max(1.0, cfg.curriculum_end * cfg.iterations))
        lo, hi = 1 - (1 - cfg.min_scale) * t, 1 + (cfg.max_scale - 1) * t
        ch, cw = self.crop_hw
        out_hw = (max(cfg.min_out_side, round(ch * self._uniform(lo, hi))),
                  max(cfg.min_out_side, round(cw * self._uniform(lo, hi))))
        matrix = None
        if cfg.max_shift > 0:
            m = cfg.max_shift * t
            matrix = homography((self._uniform(-m, m), self._uniform(-m, m)))
        return out_hw, matrix

    def random_crop(self) -> Tensor:
        """(1, 3, ch, cw): a crop at a random place of the working image."""
        h, w = self.image.shape[-2:]
        ch, cw = self.crop_hw
        top = int(torch.randint(0, h - ch + 1, (), generator=self.rng))
        left = int(torch.randint(0, w - cw + 1, (), generator=self.rng))
        return self.image[None, :, top:top + ch, left:left + cw]

    def _noisy(self, x: Tensor) -> Tensor:
        n = torch.rand(x.shape, generator=self.noise_rng, device=x.device, dtype=x.dtype)
        return x + (2 * n - 1) * self.cfg.noise

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> dict[str, Tensor]:
        """One iteration of InGAN: a random crop is G's input and D's real example; G maps it to a
        random output shape and back (one G step), D learns the crop from the fake (one D step),
        and past ``second_g_step_start`` a second G step trains the inverse mapping alone."""
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
            fake = g(self._noisy(real), out_hw, matrix)  # (1, 3, *out_hw)
            rec = g(fake, real.shape[-2:], inverse)
            loss_adv = losses.g_adv_loss(d(self._noisy(fake), weights).float())
            loss_rec = losses.reconstruction_loss(rec.float(), real)
            extra = self.extra_g_losses(real, fake)
        _descend(self.opt_g, sum(extra.values(), loss_adv + self.cfg.rec_weight * loss_rec))
        return fake, {"g_adv": loss_adv.detach(), "rec": loss_rec.detach(), **{k: v.detach() for k, v in extra.items()}}

    def _d_step(self, real: Tensor, fake: Tensor, out_hw: tuple[int, int], matrix: Tensor | None,
                weights: list[float]) -> dict[str, Tensor]:
        """D on the same real crop and the (detached) fake."""
        d = self.d
        d.requires_grad_(True)
        with spectral.cached(), self.autocast:
            d_real = d(self._noisy(real), weights).float()
            d_fake = d(self._noisy(fake), weights).float()
            loss = losses.d_loss(d_real, d_fake)
            extra = self.extra_d_losses(real, out_hw, matrix, weights)
        loss = sum(extra.values(), loss)
        _descend(self.opt_d, loss)
        return {"d": loss.detach(), **{k: v.detach() for k, v in extra.items()}}

    def _inverse_g_step(self, real: Tensor, fake: Tensor, inverse: Tensor | None) -> Tensor:
        """The inverse mapping alone, from the fake as a fixed input."""
        with self.autocast:
            rec = self.g(fake, real.shape[-2:], inverse).float()
        loss = losses.reconstruction_loss(rec, real)
        _descend(self.opt_g, self.cfg.second_rec_weight * loss)
        return loss.detach()

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
        Losses are read back (a device sync) only at report points. With ``snapshot``, it is
        called with the trainer every ``snapshot_every_s`` seconds of training (between two
        iterations, never after the last), for the caller to save ``state_dict()``."""
        self.g.train()
        self.d.train()
        start, first = time.perf_counter(), self.iteration
        last_snapshot = start
        while self.iteration < self.cfg.iterations:
            out = self.step()
            done = self.iteration
            if snapshot is not None and snapshot_every_s is not None and done < self.cfg.iterations:
                now = time.perf_counter()
                if now - last_snapshot >= snapshot_every_s:
                    snapshot(self)
                    last_snapshot = time.perf_counter()  # saving time does not eat the interval
            if progress and (done % self.cfg.log_every == 0 or done == self.cfg.iterations):
                elapsed = time.perf_counter() - start
                progress(Progress(done, self.cfg.iterations, {k: float(v) for k, v in out.items()},
                                  elapsed, (done - first) / elapsed if elapsed > 0 else 0.0))
        if self.cfg.norm_calibration > 0:
            self.calibrate_norm_stats(self.g, self.cfg.norm_calibration)
        self.g.eval()
        self.d.eval()

