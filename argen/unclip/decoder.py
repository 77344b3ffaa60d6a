"""The unCLIP diffusion decoder: a `diffusers` UNet2DConditionModel that denoises an image given a CLIP image
embedding (as extra context tokens and added to the timestep embedding) and, optionally, CLIP's caption token states."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.model.onednn import use_onednn_linears
from argen.unclip.clip import ClipEncoder, TextEncoding, trained_with_clip
from argen.unclip.diffusion_prior import normalize
from argen.unclip.schedulers import NoiseSchedule
from tokenizers_img.serialization import PretrainedMixin


@dataclass
class DecoderArchitecture:
    """What a user chooses (the `model` section of a YAML experiment); the sizes fixed by CLIP and the data are in
    DecoderConfig.

    block_out_channels: UNet channels per level; each level after the first halves the resolution.
    attention: per level, whether its blocks carry a transformer (self-attention over pixels, then cross-attention
        to the context); the middle block always does. Self-attention at 16x16 costs as much as the rest of a
        small UNet on a CPU, so the shapes config attends at the lowest levels only.
    layers_per_block: ResNet blocks per down level (up levels get one more, as in diffusers).
    attention_head_dim: channels per attention head (diffusers' own `attention_head_dim` argument is, for legacy
        reasons, the number of heads; we pass channels // attention_head_dim per level).
    context_dim: width of the cross-attention context tokens.
    num_image_tokens: the CLIP image embedding becomes this many context tokens (DALL-E 2 used 4).
    patch_size: the UNet runs on (3 * p * p, R / p, R / p) pixel-unshuffled images, p = patch_size (1: off).
    norm_num_groups: GroupNorm groups; must divide every level's channels. dropout: in the ResNet blocks.
    embed_scale: the image embedding is L2-normalised, then multiplied by this (None: sqrt(embed_dim), so each
        coordinate has mean square 1, like the diffusion prior's space).
    schedule: the forward process the decoder is trained with; sampling must use the same one.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    context_dim: int = 128
    num_image_tokens: int = 4
    patch_size: int = 1
    norm_num_groups: int = 32
    dropout: float = 0.0
    embed_scale: float | None = None
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1 or len(self.attention) != levels:
            raise ValueError(f"block_out_channels {self.block_out_channels} and attention {self.attention} must be "
                             "non-empty and of the same length (one entry per UNet level).")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_head_dim:
                raise ValueError(f"every level's channels must be divisible by norm_num_groups={self.norm_num_groups} "
                                 f"and attention_head_dim={self.attention_head_dim}; block_out_channels="
                                 f"{self.block_out_channels}.")
        for name in ("layers_per_block", "context_dim", "num_image_tokens", "patch_size", "attention_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.embed_scale is not None and not self.embed_scale > 0:
            raise ValueError(f"embed_scale must be > 0 or null (sqrt(embed_dim)), got {self.embed_scale}.")


@dataclass
class DecoderConfig:
    """The whole decoder: the sizes CLIP and the data fix, plus the architecture.

    embed_dim: D, CLIP's projection dim. resolution: R, the image side in pixels.
    text_width: H, CLIP's text hidden width when the decoder also reads the caption's token states; None: it
        reads the image embedding only.
    """

    embed_dim: int
    resolution: int
    text_width: int | None = None
    architecture: DecoderArchitecture = field(default_factory=DecoderArchitecture)

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}.")
        if self.text_width is not None and self.text_width < 1:
            raise ValueError(f"text_width must be >= 1 or null (no text conditioning), got {self.text_width}.")
        arch = self.architecture
        factor = arch.patch_size * 2 ** (len(arch.block_out_channels) - 1)
        if self.resolution < 1 or self.resolution % factor:
            raise ValueError(f"resolution={self.resolution} must be divisible by patch_size * 2^(levels - 1) = "
                             f"{arch.patch_size} * 2^{len(arch.block_out_channels) - 1} = {factor}.")

    @property
    def embed_scale(self) -> float:
        scale = self.architecture.embed_scale
        return math.sqrt(self.embed_dim) if scale is None else float(scale)


def build_unet(config: DecoderConfig):
    """The `diffusers.UNet2DConditionModel` of a decoder config: ResNet/transformer levels per `attention`, the
    image embedding added to the timestep embedding through `class_embed_type="projection"`."""
    from diffusers import UNet2DConditionModel

    arch = config.architecture
    channels = 3 * arch.patch_size**2
    heads = tuple(c // arch.attention_head_dim for c in arch.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.resolution // arch.patch_size, in_channels=channels, out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.attention)),
        block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
        attention_head_dim=heads, cross_attention_dim=arch.context_dim, norm_num_groups=arch.norm_num_groups,
        dropout=arch.dropout, class_embed_type="projection", projection_class_embeddings_input_dim=config.embed_dim,
    )


class UnCLIPDecoder(PretrainedMixin, nn.Module):
    """DALL-E 2's decoder (sec. 2.1) on a diffusers UNet.

    The image embedding z (unit-normalised here, then scaled by `embed_scale`) is (a) projected to
    `num_image_tokens` context tokens (diffusers' `ImageProjection`: linear + LayerNorm) and (b) added to the
    timestep embedding (the UNet's `class_embed_type="projection"`). With `text_width` set, CLIP's caption token
    states are projected to the context width and appended to the context; padded positions are masked out of
    the cross-attention.

    CFG conditions: a row whose image embedding is dropped uses a learned null embedding instead (in the scaled
    space, so it reaches the tokens and the timestep path alike); a row whose caption is dropped sees one
    learned null text token and none of its own. Any unit-norm D-vector is a valid condition, e.g. the CLIP
    *text* embedding for the "no prior" baseline.
    """

    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        from diffusers.models.embeddings import ImageProjection

        self.config = config
        arch, D = config.architecture, config.embed_dim
        self.unet = build_unet(config)
        self.image_tokens = ImageProjection(image_embed_dim=D, cross_attention_dim=arch.context_dim,
                                            num_image_text_embeds=arch.num_image_tokens)
        self.null_image_embed = nn.Parameter(torch.randn(D))  # in the scaled space: mean square 1 like a real one
        if config.text_width is not None:
            self.text_proj = nn.Linear(config.text_width, arch.context_dim)
            self.null_text_token = nn.Parameter(torch.randn(arch.context_dim) * 0.02)
        else:
            self.text_proj = None
            self.null_text_token = None
        use_onednn_linears(self)  # the UNet's and projections' CPU fp32 GEMMs on oneDNN (same parameters)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def embed_scale(self) -> float:
        return self.config.embed_scale

    def forward(self, x_t: Tensor, timesteps: Tensor, image_embeds: Tensor, *, text: TextEncoding | None = None,
                drop_image: Tensor | None = None, drop_text: Tensor | None = None) -> Tensor:
        """One denoising prediction.

        x_t: (B, 3, R, R) float, the noised images. timesteps: (B,) or () int64 in [0, num_train_timesteps).
        image_embeds: (B, D) float, CLIP image embeddings of any norm (L2-normalised here).
        text: CLIP's encoding of the B captions (states (B, L, text_width), mask (B, L)); required exactly when
            the decoder was built with text_width, refused otherwise.
        drop_image / drop_text: (B,) bool, True for rows that use the learned null instead (CFG); None drops none.
        Returns (B, 3, R, R) float: epsilon, x_0 or v, per `architecture.schedule.prediction_type`.
        """
        cfg, arch = self.config, self.config.architecture
        B, R = x_t.shape[0], cfg.resolution
        if x_t.shape[1:] != (3, R, R):
            raise ValueError(f"x_t must be (B, 3, {R}, {R}), got shape {tuple(x_t.shape)}.")
        if image_embeds.shape != (B, cfg.embed_dim):
            raise ValueError(f"image_embeds must be (B={B}, embed_dim={cfg.embed_dim}), got "
                             f"{tuple(image_embeds.shape)}; use the CLIP this decoder was trained with.")
        z = normalize(image_embeds, self.embed_scale)  # (B, D), norm embed_scale
        if drop_image is not None:
            z = torch.where(drop_image.view(B, 1), self.null_image_embed.to(z.dtype), z)
        context = self.image_tokens(z)  # (B, K, C)
        mask = None
        if cfg.text_width is None:
            if text is not None:
                raise ValueError("this decoder was trained without text conditioning (text_width null): pass text=None.")
        else:
            if text is None:
                raise ValueError(f"this decoder reads the caption's CLIP token states (text_width={cfg.text_width}): "
                                 "pass text=clip.encode_text(captions).")
            if text.states.ndim != 3 or text.states.shape[0] != B or text.states.shape[2] != cfg.text_width \
                    or text.mask.shape != text.states.shape[:2]:
                raise ValueError(f"text states must be (B={B}, L, text_width={cfg.text_width}) with mask (B, L), got "
                                 f"{tuple(text.states.shape)} and {tuple(text.mask.shape)}.")
            tokens = self.text_proj(text.states.to(context.dtype))  # (B, L, C)
            keep = text.mask.bool()  # (B, L)
            if drop_text is not None:
                dropped = drop_text.view(B, 1)
                first = torch.arange(keep.shape[1], device=keep.device) == 0  # (L,)
                tokens = torch.where(dropped[..., None] & first[:, None], self.null_text_token.to(tokens.dtype), tokens)
                keep = torch.where(dropped, first, keep)  # a dropped caption: the null token alone
            context = torch.cat([context, tokens], dim=1)  # (B, K + L, C)
            mask = torch.cat([keep.new_ones(B, arch.num_image_tokens), keep], dim=1)  # (B, K + L)
        x = F.pixel_unshuffle(x_t, arch.patch_size) if arch.patch_size > 1 else x_t  # (B, 3p^2, R/p, R/p)
        out = self.unet(x, timesteps, encoder_hidden_states=context, class_labels=z.to(context.dtype),
                        encoder_attention_mask=mask).sample
        return F.pixel_shuffle(out, arch.patch_size) if arch.patch_size > 1 else out  # (B, 3, R, R)


def load_decoder(decoder_dir: str | Path, *, clip: ClipEncoder, device: str | torch.device = "cpu") -> UnCLIPDecoder:
    """Load a trained decoder for use with `clip`, which must be the CLIP it was trained with (ClipMismatchError)."""
    trained_with_clip(decoder_dir, clip=clip, made_by="`argen train decoder`")
    return UnCLIPDecoder.from_pretrained(decoder_dir, device=device)
