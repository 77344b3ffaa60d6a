"""Convolutional encoder and decoder (ResNet blocks, GroupNorm + SiLU, self-attention at the lowest resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2, with a 1x1 skip when channels change."""

    def __init__(self, in_ch: int, out_ch: int, *, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, *, norm_groups: int):
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour upsampling then a 3x3 convolution (no checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn: bool,
        z_channels: int,
        norm_groups: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = base_channels
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base_channels * mult, norm_groups=norm_groups, dropout=dropout))
                ch = base_channels * mult
                if attn and i == last:
                    attns.append(AttnBlock(ch, norm_groups=norm_groups))
            level.blocks = nn.ModuleList(blocks)
            level.attns = nn.ModuleList(attns)
            level.down = Downsample(ch) if i != last else nn.Identity()
            self.levels.append(level)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, norm_groups=norm_groups, dropout=dropout),
            AttnBlock(ch, norm_groups=norm_groups) if attn else nn.Identity(),
            ResBlock(ch, ch, norm_groups=norm_groups, dropout=dropout),
        )
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # see Decoder.forward
        for level in self.levels:
            for i, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attns):
                    h = level.attns[i](h)
            h = level.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f) where each latent sees only its own f x f
    patch: a stride-f patch embedding, then `depth` residual MLPs applied at each position (1x1 convolutions, no
    normalisation across positions).

    `Encoder`'s 3x3 convolutions and GroupNorm (statistics over the whole image) make every code depend on its
    surroundings: on 32 px shapes the conv encoder spread plain black patches over hundreds of codes, so a GPT
    must predict which of them the encoder would pick from objects it has not drawn yet. Here a code is a function
    of its patch alone; the decoder still sees all codes.
    """

    def __init__(self, *, in_channels: int, patch: int, width: int, depth: int, z_channels: int):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * width, 1), nn.SiLU(), nn.Conv2d(2 * width, width, 1))
            for _ in range(depth)
        )
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, width, H/f, W/f)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f); the mirror of `Encoder`."""

    def __init__(
        self,
        *,
        out_channels: int,
        base_channels: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn: bool,
        z_channels: int,
        norm_groups: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch = base_channels * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, norm_groups=norm_groups, dropout=dropout),
            AttnBlock(ch, norm_groups=norm_groups) if attn else nn.Identity(),
            ResBlock(ch, ch, norm_groups=norm_groups, dropout=dropout),
        )
        self.levels = nn.ModuleList()
        last = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):  # lowest resolution first
            level = nn.Module()
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, base_channels * ch_mult[i], norm_groups=norm_groups, dropout=dropout))
                ch = base_channels * ch_mult[i]
                if attn and i == last:
                    attns.append(AttnBlock(ch, norm_groups=norm_groups))
            level.blocks = nn.ModuleList(blocks)
            level.attns = nn.ModuleList(attns)
            level.up = Upsample(ch) if i != 0 else nn.Identity()
            self.levels.append(level)
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # channels-last activations: oneDNN (CPU) and cuDNN convolutions run them without reordering each layer's input
        h = self.mid(self.conv_in(z.contiguous(memory_format=torch.channels_last)))
        for level in self.levels:
            for i, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attns):
                    h = level.attns[i](h)
            h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
