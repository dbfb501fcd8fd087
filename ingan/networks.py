"""InGAN's generator and multi-scale discriminator, from small parts to the whole.

Generator: 7x7 entry conv -> geometric transform to the output shape -> encoder (3 stages, max-pool)
-> residual bottleneck -> decoder (nearest upsample, additive skips) -> 7x7 exit conv -> tanh.
Any output (H, W) is exact: the transformed features are reflection-padded up to a multiple of the
encoder's total stride and the result is cropped back.

Discriminator: independent small fully-convolutional nets, one per scale of a 1.4x pyramid, whose
maps are upsampled to the finest map's size and summed with scheduled weights.

Both are built for a bundle of ``bundle`` (K) independent models trained as one (``ingan.train``):
every conv is grouped, K groups, and every channel count is K times the model's, image k's
channels being the k-th block. A grouped conv maps block k to block k alone, BatchNorm at batch 1
normalises each channel over its own image, and the rest (pooling, resizing, padding, the warp,
activations) acts channel by channel: no weight, statistic or gradient is shared between blocks,
and K convs run as one. K = 1 is the plain network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .geometry import warp
from .spectral import group_spectral_norms, spectral_norm


def _conv(cin: int, cout: int, k: int, sn: bool = True, stride: int = 1, pad: bool = True, bundle: int = 1) -> nn.Module:
    """Conv with the reference's init (xavier-normal, gain 0.01, zero bias) and spectral norm
    (every conv but G's last); reflection padding keeps borders free of the zero-padding frame
    artefact. With ``bundle`` K > 1, K such convs as one grouped conv (a bundle's weights are
    loaded from K models built alone, ``ingan.bundle``, so its own init is only a placeholder)."""
    conv = nn.Conv2d(bundle * cin, bundle * cout, k, stride=stride, groups=bundle)
    nn.init.xavier_normal_(conv.weight, gain=0.01)
    nn.init.zeros_(conv.bias)
    if sn:
        conv = spectral_norm(conv, bundle)
    if pad and k > 1:
        return nn.Sequential(nn.ReflectionPad2d(k // 2), conv)
    return conv


def _conv_bn_act(cin: int, cout: int, k: int, bundle: int) -> nn.Sequential:
    # BatchNorm at batch size 1 normalises over one image, i.e. acts as instance norm in training.
    return nn.Sequential(_conv(cin, cout, k, bundle=bundle), nn.BatchNorm2d(bundle * cout), nn.LeakyReLU(0.2))


class ResBlock(nn.Module):
    def __init__(self, ch: int, squeeze: int, bundle: int = 1) -> None:
        super().__init__()
        mid, b = ch // squeeze, bundle
        self.body = nn.Sequential(
            _conv(ch, mid, 1, bundle=b), nn.BatchNorm2d(b * mid), nn.LeakyReLU(0.2),
            _conv(mid, mid, 3, bundle=b), nn.BatchNorm2d(b * mid), nn.LeakyReLU(0.2),
            _conv(mid, ch, 1, bundle=b), nn.BatchNorm2d(b * ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Images in and out are (1, 3K, H, W) for a bundle of K, image k in channels 3k..3k+2."""

    def __init__(self, cfg: ModelConfig, bundle: int = 1) -> None:
        super().__init__()
        c, b = cfg.g_channels, bundle
        widths = [c * 2**i for i in range(cfg.g_downsamples + 1)]  # 64, 128, 256, 512
        self.stride = 2**cfg.g_downsamples
        self.bundle = bundle
        self.entry = _conv_bn_act(3, c, 7, b)
        self.down = nn.ModuleList(_conv_bn_act(widths[i], widths[i + 1], 3, b) for i in range(cfg.g_downsamples))
        self.bottleneck = nn.Sequential(*(ResBlock(widths[-1], cfg.g_res_squeeze, b) for _ in range(cfg.g_res_blocks)))
        self.up = nn.ModuleList(_conv_bn_act(widths[i + 1], widths[i], 3, b) for i in reversed(range(cfg.g_downsamples)))
        self.exit = _conv(c, 3, 7, sn=False, bundle=b)
        self.image_skip = cfg.image_skip
        group_spectral_norms(self)  # the residual blocks' layers share shapes

    def features(self, x: Tensor) -> Tensor:
        """Entry features of an image (B, 3, H, W) in [-1, 1]: computed once per image at test time
        and shared by every output size."""
        return self.entry(x)  # (B, C, H, W)

    def decode(self, feats: Tensor, out_hw: tuple[int, int], matrix: Tensor | None = None,
               image: Tensor | None = None) -> Tensor:
        """Transform entry features to ``out_hw`` and synthesise the image there. With
        ``image_skip`` the input ``image`` is needed: it is warped alike and the network's output
        is added to it."""
        h, w = out_hw
        x = warp(feats, out_hw, matrix)  # (B, C, h, w)
        # Pad to a multiple of the total stride, and to at least two bottleneck pixels per side
        # (reflection padding inside the bottleneck needs more than one).
        ph = max(-h % self.stride, 2 * self.stride - h)
        pw = max(-w % self.stride, 2 * self.stride - w)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)  # (B, C, h + ph, w + pw)
        skips = []
        for stage in self.down:
            skips.append(x)
            x = F.max_pool2d(stage(x), 2)
        x = self.bottleneck(x)
        for stage, skip in zip(self.up, reversed(skips), strict=True):
            x = stage(F.interpolate(x, scale_factor=2, mode="nearest")) + skip
        if self.image_skip:
            if image is None:
                raise ValueError("this generator adds its output to the warped input: pass image=")
            y = warp(image, out_hw, matrix) + self.exit(x)[..., :h, :w]
            # Clamped values with the identity's gradient: pixels pushed past black or white can
            # still be pulled back (ModelConfig.image_skip).
            return y + (y.clamp(-1, 1) - y).detach()
        return torch.tanh(self.exit(x))[..., :h, :w]  # (B, 3, h, w)

    def forward(self, x: Tensor, out_hw: tuple[int, int] | None = None, matrix: Tensor | None = None) -> Tensor:
        out_hw = out_hw or (x.shape[-2], x.shape[-1])
        return self.decode(self.features(x), out_hw, matrix, x)


class DiscriminatorNet(nn.Module):
    """One scale: unpadded convs with a 9x9 receptive field at that scale."""

    def __init__(self, c: int, bundle: int = 1) -> None:
        super().__init__()
        b = bundle
        # BatchNorm as in the reference: D sees the real crop and the fake in separate passes of
        # batch size 1, so each is normalised by its own statistics.
        self.body = nn.Sequential(
            _conv(3, c, 3, pad=False, bundle=b), nn.LeakyReLU(0.2),
            _conv(c, 2 * c, 3, stride=2, pad=False, bundle=b), nn.BatchNorm2d(b * 2 * c), nn.LeakyReLU(0.2),
            _conv(2 * c, 2 * c, 3, pad=False, bundle=b), nn.BatchNorm2d(b * 2 * c), nn.LeakyReLU(0.2),
            _conv(2 * c, 1, 1, pad=False, bundle=b),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.body(x))


class MultiScaleDiscriminator(nn.Module):
    """Maps are (1, K, h, w) for a bundle of K: image k's in channel k."""

    def __init__(self, cfg: ModelConfig, crop_size: int, bundle: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.bundle = bundle
        self.nets = nn.ModuleList(DiscriminatorNet(cfg.d_channels, bundle) for _ in range(cfg.n_d_nets(crop_size)))
        group_spectral_norms(self)  # layer k of every scale's net: one batched normalisation

    def n_scales_for(self, hw: tuple[int, int]) -> int:
        """How many scales an image of this size can feed: its smaller side must stay >= 13 px."""
        side = min(hw)
        n = math.ceil(math.log(side / self.cfg.d_min_map_side) / math.log(self.cfg.d_scale_factor))
        return max(1, min(n, len(self.nets)))

    def scale_weights(self, progress: float, pivot: float, n_scales: int) -> list[float]:
        """w_k proportional to f**k, f = 1.4**((pivot - progress) / pivot): coarse scales dominate
        early, uniform at the pivot, fine scales after."""
        f = self.cfg.d_scale_factor ** ((pivot - progress) / pivot)
        w = [f**k for k in range(n_scales)]
        total = sum(w)
        return [wk / total for wk in w]

    def forward(self, x: Tensor, weights: list[float]) -> Tensor:
        """Combined map (B, 1, h0, w0) of an image, weighting the first ``len(weights)`` scales."""
        h, w = x.shape[-2:]
        out = None
        for k, wk in enumerate(weights):
            xk = x
            if k:
                s = self.cfg.d_scale_factor**-k
                size = (max(9, round(h * s)), max(9, round(w * s)))
                # Antialiased so coarse scales see the image, not its aliasing (float32: the
                # antialiased kernel has no bfloat16 CPU implementation).
                xk = F.interpolate(x.to(torch.promote_types(x.dtype, torch.float32)), size=size, mode="bilinear", align_corners=False, antialias=True)
            m = self.nets[k](xk)
            if out is None:
                out = wk * m
            else:
                out = out + wk * F.interpolate(m, size=out.shape[-2:], mode="bilinear", align_corners=False)
        assert out is not None
        return out
