"""VQConfig and VQModel: images in [-1, 1] <-> grids of codebook indices, saved as config.json + model.safetensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_img.autoencoder import Decoder, Encoder, PatchEncoder
from tokenizers_img.quantizers import FSQuantizer, ProductQuantizer, Quantizer, QuantizerOutput, VectorQuantizer
from tokenizers_img.serialization import PretrainedMixin


@dataclass
class VQConfig:
    """Architecture and quantizer of a VQ tokenizer. Defaults: a LlamaGen-style VQ-16 at 256 px.

    Derived sizes are properties: `downsample` = 2 ** (len(ch_mult) - 1), `grid_size` = resolution // downsample,
    `num_codes` (codebook_size for "vq", times colour_codes with a colour codebook; prod(fsq_levels) for "fsq"),
    `code_dim` (channels the quantizer sees).
    `codebook_size`, `codebook_dim`, `l2_normalize`, `beta`, `ema*`, `kmeans*`, `dead_code_threshold` and
    `rotation_trick` apply to "vq" only; `fsq_levels` to "fsq" only.
    """

    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn: bool = True  # self-attention at the lowest resolution (encoder and decoder)
    encoder: Literal["conv", "patch"] = "conv"  # "patch": each code sees only its own patch (see PatchEncoder)
    z_channels: int = 256
    norm_groups: int = 32  # GroupNorm groups; every channel count must be divisible by it
    dropout: float = 0.0
    quantizer: Literal["vq", "fsq"] = "vq"
    codebook_size: int = 16384
    codebook_dim: int = 8  # low-dimensional lookup space (LlamaGen: 8)
    l2_normalize: bool = True  # cosine lookup on the unit sphere (ViT-VQGAN / LlamaGen)
    beta: float = 0.25  # commitment weight: beta * ||z - sg(q)||^2
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    kmeans_init: bool = True  # codebook <- k-means centroids of the first training batch (all processes)
    kmeans_iters: int = 10
    dead_code_threshold: int = 100  # restart codes unused for this many training steps; 0 disables
    rotation_trick: bool = False  # Fifty et al. 2024 gradient estimator instead of straight-through
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # > 0: each code is a (structure, colour) pair (see `structure_and_colour`): codebook_size structure codes times
    # colour_codes colour codes, so that a GPT learns shape and colour apart and can draw pairs it never saw.
    colour_codes: int = 0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.fsq_levels = tuple(self.fsq_levels)
        positive = {
            "resolution": self.resolution, "in_channels": self.in_channels, "base_channels": self.base_channels,
            "num_res_blocks": self.num_res_blocks, "z_channels": self.z_channels, "norm_groups": self.norm_groups,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.downsample not in (4, 8, 16):
            raise ValueError(
                f"ch_mult={self.ch_mult} gives downsample factor {self.downsample}; it must be 4, 8 or 16 "
                "(len(ch_mult) must be 3, 4 or 5)."
            )
        if min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult entries must be >= 1, got {self.ch_mult}.")
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution={self.resolution} is not divisible by the downsample factor {self.downsample} "
                f"(ch_mult={self.ch_mult})."
            )
        widths = sorted({self.base_channels * m for m in self.ch_mult})
        bad = [c for c in widths if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"channel widths {bad} (base_channels={self.base_channels} x ch_mult={self.ch_mult}) are not "
                f"divisible by norm_groups={self.norm_groups}."
            )
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"encoder must be 'conv' or 'patch', got {self.encoder!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}.")
        if self.quantizer == "vq":
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}.")
            if self.codebook_dim < 1:
                raise ValueError(f"codebook_dim must be >= 1, got {self.codebook_dim}.")
            if self.beta < 0:
                raise ValueError(f"beta must be >= 0, got {self.beta}.")
            if not 0.0 < self.ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}.")
            if self.kmeans_init and self.kmeans_iters < 1:
                raise ValueError(f"kmeans_iters must be >= 1 when kmeans_init is on, got {self.kmeans_iters}.")
            if self.dead_code_threshold < 0:
                raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {self.dead_code_threshold}.")
        else:
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ValueError(f"fsq_levels must be a non-empty tuple of ints >= 2, got {self.fsq_levels}.")
        if self.colour_codes:
            if self.colour_codes < 2 or self.quantizer != "vq" or self.in_channels != 3:
                raise ValueError(f"colour_codes={self.colour_codes}: a colour codebook needs colour_codes >= 2, "
                                 f"quantizer 'vq' (got {self.quantizer!r}) and RGB images (in_channels 3, got "
                                 f"{self.in_channels}); 0 turns it off.")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample

    @property
    def num_codes(self) -> int:
        if self.quantizer == "fsq":
            return math.prod(self.fsq_levels)
        return self.codebook_size * (self.colour_codes or 1)

    @property
    def code_dim(self) -> int:
        if self.quantizer == "fsq":
            return len(self.fsq_levels)
        return self.codebook_dim * (2 if self.colour_codes else 1)


@dataclass
class VQOutput:
    """reconstruction: (B, in_channels, H, W), roughly in [-1, 1]; quantizer_output: the quantizer's result."""

    reconstruction: torch.Tensor
    quantizer_output: QuantizerOutput


def build_quantizer(config: VQConfig) -> Quantizer:
    """The quantizer a config asks for, consuming `config.code_dim` channels."""
    if config.quantizer == "fsq":
        return FSQuantizer(levels=config.fsq_levels)

    def vq(codebook_size: int) -> VectorQuantizer:
        return VectorQuantizer(
            dim=config.codebook_dim,
            codebook_size=codebook_size,
            l2_normalize=config.l2_normalize,
            beta=config.beta,
            ema=config.ema,
            ema_decay=config.ema_decay,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            dead_code_threshold=config.dead_code_threshold,
            rotation_trick=config.rotation_trick,
        )

    if config.colour_codes:
        return ProductQuantizer(vq(config.codebook_size), vq(config.colour_codes))
    return vq(config.codebook_size)


# A patch whose brightest pixel is dimmer than this keeps its brightness in the structure map (a saved colour
# tokenizer's codes depend on it: changing it changes what they mean).
STRUCTURE_FLOOR = 0.05


def structure_and_colour(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> what each f x f patch looks like without its colour, and its colour.

    structure (B, 1, H, W): each pixel's brightness (its RGB norm) over that of the brightest pixel of its patch
    (at least STRUCTURE_FLOOR), in [-1, 1]; colour (B, 3, H/f, W/f): the RGB of that brightest pixel, in [-1, 1]. A
    patch of a flat-coloured object gives the same structure in every colour.
    """
    x = (images.float() + 1) / 2
    b, _, h, w = x.shape
    bright = x.pow(2).sum(1, keepdim=True).sqrt()  # (B, 1, H, W); x.norm(dim=1) ran 100x slower on a CPU
    peak, where = F.max_pool2d(bright, patch, return_indices=True)  # (B, 1, h, w): value and flat index in H*W
    colour = x.flatten(2).gather(2, where.flatten(2).expand(-1, 3, -1)).view(b, 3, h // patch, w // patch)
    scale = F.interpolate(peak, scale_factor=patch, mode="nearest").clamp(min=STRUCTURE_FLOOR)
    return (bright / scale).clamp(max=1) * 2 - 1, colour * 2 - 1


class VQModel(PretrainedMixin, nn.Module):
    """Encoder -> 1x1 conv to code_dim -> quantizer -> 1x1 conv to z_channels -> decoder.

    Images are float (B, in_channels, H, W) in [-1, 1] with H, W divisible by `config.downsample`;
    codes are int64 (B, H/f, W/f) in [0, config.num_codes).
    """

    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        arch = dict(
            base_channels=config.base_channels, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
            attn=config.attn, z_channels=config.z_channels, norm_groups=config.norm_groups, dropout=config.dropout,
        )
        in_channels = 1 if config.colour_codes else config.in_channels  # the structure map of structure_and_colour
        if config.encoder == "patch":  # as wide as the conv encoder's last level, num_res_blocks + 1 MLPs deep
            self.encoder = PatchEncoder(in_channels=in_channels, patch=config.downsample,
                                        width=config.base_channels * config.ch_mult[-1],
                                        depth=config.num_res_blocks + 1, z_channels=config.z_channels)
        else:
            self.encoder = Encoder(in_channels=in_channels, **arch)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim if config.colour_codes else config.code_dim, 1)
        if config.colour_codes:  # each patch's colour (3 values) -> its colour latent, position by position
            width = config.base_channels
            self.colour_encoder = nn.Sequential(nn.Conv2d(3, width, 1), nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(),
                                                nn.Conv2d(width, config.codebook_dim, 1))
        self.quantizer = build_quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = Decoder(out_channels=config.in_channels, **arch)

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def last_decoder_layer(self) -> nn.Parameter:
        """The final conv's weight, for the VQGAN adaptive GAN weight ||grad L_rec|| / ||grad L_gan||."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.config.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, H, W) with H and W divisible by {f}, "
                f"got shape {tuple(images.shape)}."
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}.")

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        if not self.config.colour_codes:
            return self.quant_conv(self.encoder(images))  # (B, code_dim, h, w)
        structure, colour = structure_and_colour(images, self.config.downsample)
        colour = colour.to(self.quant_conv.weight.dtype)
        return torch.cat([self.quant_conv(self.encoder(structure.to(colour.dtype))), self.colour_encoder(colour)], dim=1)

    def forward(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> VQOutput:
        """Reconstruct images through the quantizer. In training mode the quantizer updates its statistics
        (k-means init, dead-code restart, EMA); `generator` drives their random draws (default: global RNG)."""
        q = self.quantizer(self._latents(images), generator=generator)
        reconstruction = self._decode_vectors(q.quantized)
        return VQOutput(reconstruction=reconstruction, quantizer_output=q)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64. Never changes quantizer state."""
        return self.quantizer.encode(self._latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w), or (B, h*w) for a square grid, -> images (B, C, h*f, w*f), roughly in [-1, 1]."""
        if codes.ndim == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes (B, N) need a square grid, got N={codes.shape[1]}; pass (B, h, w) instead.")
            codes = codes.reshape(codes.shape[0], side, side)
        elif codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w) or (B, h*w), got shape {tuple(codes.shape)}.")
        return self._decode_vectors(self.quantizer.codes_to_vectors(codes))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> decode(encode(images)) clamped to [-1, 1], `batch_size` images at a time."""
        return torch.cat([self.decode(self.encode(images[i:i + batch_size])).clamp(-1, 1)
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def code_appearance(self, *, background: float = -1.0, batch_size: int = 256) -> torch.Tensor:
        """What each code looks like: (num_codes, C * f * f), code k decoded at the centre of a grid of the code a
        flat image of value `background` encodes to, its own f x f pixels flattened (channel-major).

        Decoding a grid of code k alone would not do: the decoder's GroupNorm normalises a constant grid away."""
        f, side = self.config.downsample, self.config.grid_size
        flat = torch.full((1, self.config.in_channels, side * f, side * f), background,
                          device=self.post_quant_conv.weight.device)
        context = self.encode(flat)  # (1, side, side)
        r = side // 2
        out = []
        for start in range(0, self.num_codes, batch_size):
            ks = torch.arange(start, min(start + batch_size, self.num_codes), device=context.device)
            grids = context.expand(len(ks), -1, -1).clone()
            grids[:, r, r] = ks
            images = self.decode(grids).float()
            out.append(images[:, :, r * f:(r + 1) * f, r * f:(r + 1) * f].flatten(1))
        return torch.cat(out)

    def _decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, code_dim, h, w), fp32 from the quantizer, -> images (B, C, H, W)."""
        return self.decoder(self.post_quant_conv(vectors.to(self.post_quant_conv.weight.dtype)))
