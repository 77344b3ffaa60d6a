"""The DALL-E 2 diffusion prior network: a causal transformer that denoises a CLIP image embedding given CLIP's view of
the caption, plus the explicit embedding normalisation it works in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.model.attention import BACKENDS
from argen.model.gpt import Block, BlockConfig, rope_tables, swiglu_width
from argen.unclip.clip import ClipEncoder, TextEncoding, trained_with_clip
from argen.unclip.schedulers import NoiseSchedule
from tokenizers_img.serialization import PretrainedMixin

NUM_EXTRA_TOKENS = 4  # after the L text states: [text embedding, timestep, noised image embedding, output query]


def normalize(embeds: Tensor, scale: float) -> Tensor:
    """CLIP embeddings (..., D), any norm -> the diffusion space: L2-normalised, then times `scale`.

    With scale = sqrt(D) (the default, as DALLE2-pytorch) each coordinate has mean square 1, the variance the
    noise schedule assumes for x_0."""
    return F.normalize(embeds.float(), dim=-1) * scale


def denormalize(x: Tensor) -> Tensor:
    """Diffusion-space embeddings (..., D) -> unit-norm CLIP image embeddings, the convention downstream."""
    return F.normalize(x, dim=-1)


@dataclass
class DiffusionPriorArchitecture:
    """What a user chooses (the `model` section of a YAML experiment); the sizes fixed by the CLIP are not here.

    The transformer is the GPT's pre-norm block (RMSNorm, SwiGLU, causal attention through `argen.model.attention`,
    1-D RoPE over the sequence). `embed_scale`: the radius of x_0 in the diffusion space; None means sqrt(embed_dim).
    `schedule` is the forward process; prediction_type "sample" is DALL-E 2's choice (the network predicts x_0).
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    ffn_hidden: int | None = None
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attn_backend: Literal["auto", "sdpa", "xformers", "math"] = "auto"
    embed_scale: float | None = None
    schedule: NoiseSchedule = field(default_factory=lambda: NoiseSchedule(prediction_type="sample"))

    def __post_init__(self) -> None:
        if self.embed_scale is not None and not self.embed_scale > 0:
            raise ValueError(f"embed_scale must be > 0 or null (sqrt(embed_dim)), got {self.embed_scale}.")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.attn_backend!r}.")
        if self.n_layer < 1 or not self.init_std > 0:
            raise ValueError(f"n_layer must be >= 1 and init_std > 0, got {self.n_layer} and {self.init_std}.")
        block_config(self)  # BlockConfig's own checks (head sizes, dropout, ...)


@dataclass
class DiffusionPriorConfig:
    """The whole prior: the CLIP's sizes plus the architecture.

    embed_dim: D, CLIP's projection dim (text and image embeddings). text_width: H, its text tower's hidden width.
    text_len: L, the token states per caption (ClipEncoder.text_len).
    """

    embed_dim: int
    text_width: int
    text_len: int
    architecture: DiffusionPriorArchitecture = field(default_factory=DiffusionPriorArchitecture)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "text_width", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def seq_len(self) -> int:
        return self.text_len + NUM_EXTRA_TOKENS

    @property
    def embed_scale(self) -> float:
        scale = self.architecture.embed_scale
        return math.sqrt(self.embed_dim) if scale is None else float(scale)


def block_config(arch: DiffusionPriorArchitecture) -> BlockConfig:
    """The prior's transformer block: the GPT's `Block` at the architecture's sizes (no grouped-query attention)."""
    return BlockConfig(n_embd=arch.n_embd, n_head=arch.n_head, kv_heads=arch.n_head,
                       ffn_dim=swiglu_width(arch.n_embd) if arch.ffn_hidden is None else arch.ffn_hidden,
                       norm_eps=arch.norm_eps, dropout=arch.dropout, attn_backend=arch.attn_backend)


class DiffusionPrior(PretrainedMixin, nn.Module):
    """Causal transformer over [text token states (L), text embedding, timestep, x_t, query] -> the model output for
    x_t read at the query (DALL-E 2 sec. 2.2: a decoder-only transformer with a causal mask).

    Padded text positions (mask False) are replaced by one learned vector, so their content never reaches the output.
    A row whose text is dropped (CFG) has every text position replaced that way and its text embedding replaced by
    a learned null embedding: the unconditional model.
    """

    config_class = DiffusionPriorConfig

    def __init__(self, config: DiffusionPriorConfig):
        super().__init__()
        self.config = config
        arch = config.architecture
        block = block_config(arch)
        C, D = arch.n_embd, config.embed_dim
        self.text_state_proj = nn.Linear(config.text_width, C)
        self.text_embed_proj = nn.Linear(D, C)
        self.x_proj = nn.Linear(D, C)
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_features = Timesteps(C, flip_sin_to_cos=True, downscale_freq_shift=0)  # sinusoidal, no weights
        self.time_mlp = TimestepEmbedding(C, C)
        self.pad_state = nn.Parameter(torch.zeros(C))  # replaces padded (and dropped) text states
        self.null_text_embed = nn.Parameter(torch.zeros(C))  # replaces the text embedding of a dropped caption
        self.query = nn.Parameter(torch.zeros(C))
        self.pos_emb = nn.Parameter(torch.zeros(config.seq_len, C))  # tells the kinds of token apart, with RoPE
        self.blocks = nn.ModuleList(Block(block) for _ in range(arch.n_layer))
        self.norm = nn.RMSNorm(C, eps=arch.norm_eps)
        self.out = nn.Linear(C, D)
        positions = torch.arange(config.seq_len)[:, None].expand(-1, 2)  # 1-D RoPE: position p is (p, p)
        cos, sin = rope_tables(positions, head_dim=block.head_dim, theta=10000.0)
        self.register_buffer("rope_cos", cos.unsqueeze(1), persistent=False)  # (S, 1, head_dim / 2)
        self.register_buffer("rope_sin", sin.unsqueeze(1), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for weights and the learned tokens, zero biases; residual output projections get
        init_std / sqrt(2 n_layer) (GPT-2)."""
        std, n_layer = self.config.architecture.init_std, self.config.architecture.n_layer
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for p in (self.pad_state, self.null_text_embed, self.query, self.pos_emb):
            nn.init.normal_(p, mean=0.0, std=std)
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp.w2.weight):
                nn.init.normal_(weight, mean=0.0, std=std / math.sqrt(2 * n_layer))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def embed_scale(self) -> float:
        return self.config.embed_scale

    def forward(self, x_t: Tensor, timesteps: Tensor, text: TextEncoding, *, drop_text: Tensor | None = None) -> Tensor:
        """One denoising prediction.

        x_t: (B, D) float, noised embeddings in the diffusion space (see `normalize`).
        timesteps: (B,) or () int64 in [0, num_train_timesteps).
        text: CLIP's encoding of the B captions: embeds (B, D) any norm (normalised here), states (B, L, H), mask (B, L).
        drop_text: (B,) bool, True for rows to predict without their caption (CFG's unconditional rows); None keeps all.
        Returns (B, D) float: x_0, epsilon or v in the diffusion space, per `schedule.prediction_type`.
        """
        cfg = self.config
        B = x_t.shape[0]
        if x_t.ndim != 2 or x_t.shape[1] != cfg.embed_dim:
            raise ValueError(f"x_t must be (B, embed_dim={cfg.embed_dim}), got shape {tuple(x_t.shape)}.")
        if text.states.shape != (B, cfg.text_len, cfg.text_width) or text.mask.shape != (B, cfg.text_len):
            raise ValueError(f"text states must be (B={B}, text_len={cfg.text_len}, text_width={cfg.text_width}) and "
                             f"mask (B, text_len), got {tuple(text.states.shape)} and {tuple(text.mask.shape)}; "
                             "encode the captions with the CLIP this prior was trained with.")
        if text.embeds.shape != (B, cfg.embed_dim):
            raise ValueError(f"text embeds must be (B={B}, embed_dim={cfg.embed_dim}), got {tuple(text.embeds.shape)}.")
        keep = text.mask.bool()  # (B, L)
        text_embed = self.text_embed_proj(normalize(text.embeds, self.embed_scale))  # (B, C)
        if drop_text is not None:
            keep = keep & ~drop_text[:, None]
            text_embed = torch.where(drop_text[:, None], self.null_text_embed.to(text_embed.dtype), text_embed)
        states = self.text_state_proj(text.states)  # (B, L, C)
        states = torch.where(keep[..., None], states, self.pad_state.to(states.dtype))
        time = self.time_mlp(self.time_features(timesteps.reshape(-1).expand(B)).to(states.dtype))  # (B, C)
        extra = torch.stack([text_embed, time, self.x_proj(x_t), self.query.expand(B, -1).to(states.dtype)], dim=1)
        h = torch.cat([states, extra], dim=1) + self.pos_emb  # (B, L + 4, C)
        for block in self.blocks:
            h = block(h, self.rope_cos, self.rope_sin)
        return self.out(self.norm(h[:, -1]))  # (B, D), read at the query


def load_diffusion_prior(prior_dir: str | Path, *, clip: ClipEncoder,
                         device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load a trained prior for use with `clip`, which must be the CLIP it was trained with (ClipMismatchError)."""
    trained_with_clip(prior_dir, clip=clip, made_by="`argen train prior diffusion`")
    return DiffusionPrior.from_pretrained(prior_dir, device=device)
