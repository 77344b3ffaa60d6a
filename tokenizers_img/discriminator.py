"""PatchGAN discriminator: a conv net that scores overlapping image patches as real or fake (one logit per patch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tokenizers_img.serialization import PretrainedMixin


@dataclass
class PatchDiscriminatorConfig:
    """The N-layer PatchGAN of pix2pix (Isola et al. 2017), as used by VQGAN.

    in_channels: image channels. base_channels: width of the first conv; each stride-2 layer doubles it, up to
    `max_channel_mult` times. n_layers: number of stride-2 downsamplings (3 gives a 70x70 receptive field).
    norm: "group" (GroupNorm, default) or "none". BatchNorm is deliberately not offered; see PatchDiscriminator.
    """

    in_channels: int = 3
    base_channels: int = 64
    n_layers: int = 3
    max_channel_mult: int = 8
    norm: Literal["group", "none"] = "group"
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("in_channels", "base_channels", "n_layers", "max_channel_mult", "norm_groups"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"PatchDiscriminatorConfig.{name} must be >= 1, got {value}.")

    @property
    def min_input_size(self) -> int:
        """Smallest square input that still gives a 1x1 logit map."""
        # n_layers stride-2 convs (k4, p1: s -> floor(s/2)), then two stride-1 convs (k4, p1: s -> s - 1).
        return 3 * 2**self.n_layers


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class PatchDiscriminator(PretrainedMixin, nn.Module):
    """(B, C, H, W) image in [-1, 1] -> (B, 1, h, w) real/fake logits, one per receptive-field patch.

    For n_layers=3: 32 px -> 2x2 logits, 64 px -> 6x6, 256 px -> 30x30.

    Normalisation is GroupNorm (or none), never BatchNorm. BatchNorm makes a sample's logit depend on the other
    samples in its batch, so N processes with B/N images each do not compute what one process with B images
    computes; its running-stat buffers differ per process (DDP silently overwrites them with rank 0's on every
    forward) and are updated by every forward, including the generator step's, so a resumed run must replay
    exactly the same forwards to match. GroupNorm normalises each sample on its own: no batch coupling and no
    buffers, so multi-process training and exact resume hold by construction.
    """

    config_class = PatchDiscriminatorConfig

    def __init__(self, config: PatchDiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        use_bias = cfg.norm == "none"  # a norm's affine shift makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.in_channels, cfg.base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = cfg.base_channels
        for n in range(1, cfg.n_layers + 1):
            stride = 2 if n < cfg.n_layers else 1  # the last widening conv keeps the resolution
            ch_out = cfg.base_channels * min(2**n, cfg.max_channel_mult)
            layers += [
                nn.Conv2d(ch, ch_out, 4, stride=stride, padding=1, bias=use_bias),
                _norm(cfg.norm, ch_out, cfg.norm_groups),
                nn.LeakyReLU(0.2),
            ]
            ch = ch_out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN init (Radford et al. 2016): conv weights N(0, 0.02), zero biases, norms at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float -> (B, 1, h, w) logits."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"PatchDiscriminator expects (B, {self.config.in_channels}, H, W) images, got shape {tuple(x.shape)}.")
        if min(x.shape[-2:]) < self.config.min_input_size:
            raise ValueError(
                f"PatchDiscriminator with n_layers={self.config.n_layers} needs images of at least "
                f"{self.config.min_input_size} px, got {tuple(x.shape[-2:])}; lower n_layers."
            )
        return self.net(x)
