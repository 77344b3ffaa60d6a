"""GPTConfig, KVCache and GPT: a Llama-style decoder over [text | BOI | image codes] with 1-D/2-D RoPE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from argen.model.attention import BACKENDS, attention
from argen.model.onednn import Linear
from tokenizers_img.serialization import PretrainedMixin


def swiglu_width(n_embd: int) -> int:
    """The default SwiGLU hidden width: 8/3 n_embd (as many weights as a 4x GELU MLP), rounded up to 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


@dataclass(frozen=True)
class BlockConfig:
    """One pre-norm transformer block (`Block`): width, heads (kv_heads < n_head: grouped-query attention), SwiGLU
    hidden width, RMSNorm eps, dropout and attention backend. The GPT's is `GPTConfig.block`; the diffusion prior
    builds its own."""

    n_embd: int
    n_head: int
    kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        sizes = {"n_head": self.n_head, "n_embd": self.n_embd, "n_kv_head": self.kv_heads, "ffn_hidden": self.ffn_dim}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.kv_heads} (grouped-query attention).")
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim = n_embd / n_head = {self.n_embd} / {self.n_head} = {self.head_dim} must be divisible by 4: "
                "2-D RoPE rotates one half of each head by the row and the other half by the column, in pairs."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}.")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.attn_backend!r}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class GPTConfig:
    """Architecture of the image-token GPT.

    The input sequence is `prefix_len` text positions (text ids, then BOI) followed by image tokens on an
    `image_grid` = (h, w) raster; the longest input is `block_size` = prefix_len + h*w - 1 (the last image
    token is only ever a target). `vocab_size` is derived by the sequence layout, never typed in YAML.
    `n_kv_head` < `n_head` gives grouped-query attention (None: n_head). `ffn_hidden` is the SwiGLU hidden
    width (None: 8/3 n_embd rounded up to a multiple of 64). `dropout` applies to the embedding, attention
    weights and both residual branches. `grad_checkpointing` recomputes each block in backward (training only).
    `abs_pos_emb` adds a learned embedding per input position to the token embedding, on top of RoPE: RoPE
    only tells a token where its keys lie relative to it, so an image token cannot read its own row and column
    (to match them against "top right" in the caption) without it; taming-transformers and DALL-E use such
    tables alone.
    `code_features` > 0 gives every token a fixed feature vector of that width (`GPT.code_feat`, zero for text
    tokens; `argen train gpt` fills the image codes' rows with what each code looks like, see
    `argen.tasks.gpt.code_features`). A learned projection of it is added to the token's embedding, and (for codes
    with a row of their own) the head adds the dot product of a learned projection of the hidden state with every
    token's features to the logits: codes that look alike share what the model learns about any of them, which a
    table of independent rows cannot do. The features are saved with the weights.
    `code_factors` = (a, b) says the image codes (the last a * b tokens) are pairs, code = i * b + j, from a product
    tokenizer (`VQConfig.colour_codes`: structure i, colour j). Such a code has no row of its own: its embedding is
    the sum of the rows of i and j (`GPT.factor_emb`), and the head gives log p(i) + log p(j | i): a softmax over
    structures, then one over colours from the hidden state and the structure's own gate (`GPT.colour_logits`). So
    what the model learns of a colour or a structure holds in pairs it never saw (with one row per code, a pair
    never seen as a target is one the model learned never comes), while the colour still depends on which object
    the structure belongs to: two independent softmaxes would mix the colour of one object with the shape of the
    other when either could come next. The image logits are then normalised log-probabilities.
    `mask_padding` hides the text padding (token `pad_id`, which the sequence layout supplies) from attention: no
    position reads a pad (a pad reads only itself), so every other position's output is the same whatever the
    number of pads. Training then drops the text columns that hold only pads in a batch (`forward(positions=...)`),
    which saves most of the prefix's compute on short captions; sampling keeps the full prefix.
    """

    vocab_size: int
    prefix_len: int
    image_grid: tuple[int, int]
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None
    ffn_hidden: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_backend: Literal["auto", "sdpa", "xformers", "math"] = "auto"
    grad_checkpointing: bool = False
    init_std: float = 0.02
    abs_pos_emb: bool = False
    code_features: int = 0
    code_factors: tuple[int, int] | None = None
    mask_padding: bool = False
    pad_id: int | None = None

    def __post_init__(self) -> None:
        self.image_grid = tuple(self.image_grid)  # JSON/YAML give a list
        if self.mask_padding and not (self.pad_id is not None and 0 <= self.pad_id < self.vocab_size):
            raise ValueError(f"mask_padding needs the text padding id pad_id in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_id!r} (argen train gpt takes it from the sequence layout).")
        if self.mask_padding and self.attn_backend == "xformers":
            raise ValueError("mask_padding needs an attention backend that takes a mask: 'auto', 'sdpa' or 'math', "
                             "not 'xformers'.")
        if self.code_factors is not None:
            self.code_factors = tuple(self.code_factors)
            if len(self.code_factors) != 2 or min(self.code_factors) < 1 or self.num_factored_codes >= self.vocab_size:
                raise ValueError(f"code_factors must be two positive ints (a, b) with a * b image codes below "
                                 f"vocab_size={self.vocab_size}, got {self.code_factors!r}.")
        if len(self.image_grid) != 2 or any(not isinstance(s, int) or s < 1 for s in self.image_grid):
            raise ValueError(f"image_grid must be two positive ints (h, w), got {self.image_grid!r}.")
        for name in ("vocab_size", "prefix_len", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        self.block  # noqa: B018  (BlockConfig checks the block's sizes, dropout, eps and backend)
        if self.code_features < 0:
            raise ValueError(f"code_features must be >= 0 (0: off), got {self.code_features}.")
        for name in ("rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")

    @property
    def colour_hidden(self) -> int:
        """Width of the colour MLP of a factored head (`GPT.colour_logits`)."""
        return self.n_embd // 4

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(n_embd=self.n_embd, n_head=self.n_head, kv_heads=self.kv_heads, ffn_dim=self.ffn_dim,
                           norm_eps=self.norm_eps, dropout=self.dropout, attn_backend=self.attn_backend)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        return swiglu_width(self.n_embd) if self.ffn_hidden is None else self.ffn_hidden

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def num_factored_codes(self) -> int:
        """How many tokens (the last ones) are factored image codes: a * b, or 0 without code_factors."""
        return math.prod(self.code_factors) if self.code_factors else 0

    @property
    def num_token_rows(self) -> int:
        """Tokens with a row of their own in the embedding and the head: all but the factored codes."""
        return self.vocab_size - self.num_factored_codes

    @property
    def block_size(self) -> int:
        """The longest input: prefix_len + h*w - 1 positions."""
        return self.prefix_len + self.num_image_tokens - 1


def rope_positions(config: GPTConfig) -> torch.Tensor:
    """Int64 (block_size, 2): the (row, col) RoPE position of every input position.

    Text position p (p < prefix_len) gets (p, p), so text sees plain 1-D RoPE; image token j at
    position prefix_len + j gets (prefix_len + j // w, prefix_len + j % w).
    """
    i = torch.arange(config.block_size)
    P, w = config.prefix_len, config.image_grid[1]
    j = (i - P).clamp(min=0)
    row = torch.where(i < P, i, P + j // w)
    col = torch.where(i < P, i, P + j % w)
    return torch.stack([row, col], dim=-1)


def rope_tables(positions: torch.Tensor, *, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 (block_size, head_dim // 2): the rotation angle of each (d, d + head_dim/2) pair.

    The first head_dim/4 pairs rotate with the row position, the last head_dim/4 with the column; each
    axis uses the usual RoPE frequencies theta^(-i / (head_dim/4)), i < head_dim/4 (Su et al. 2021, eq. 15,
    on head_dim/2 dimensions per axis).
    """
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    pos = positions.to(torch.float64)  # (S, 2): (row, col), or (p, p) for plain 1-D RoPE
    angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)  # (S, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, nh, D) by cos/sin (T, 1, D/2): pair (d, d + D/2) turns by angle d (rotate-half form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# KVCache capacity grows in steps of this many positions (see KVCache).
KV_CHUNK = 32


def kv_capacity(length: int) -> int:
    """The capacity a KVCache grows to for `length` positions: whole KV_CHUNKs (before the block_size cap)."""
    return -(-length // KV_CHUNK) * KV_CHUNK


@dataclass
class KVCache:
    """Keys and values of every layer, passed into `GPT.forward`; the model never keeps state.

    k, v: one contiguous (B, n_kv_head, capacity, head_dim) tensor per layer. `forward(idx, cache=c, start=s)` writes
    positions [s, s + T) and attends to [0, s + T), so positions [0, s) must have been written by earlier calls. The
    capacity grows in steps of KV_CHUNK positions (`reserve`, which forward calls) up to block_size: a one-token decode
    step on the CPU then reads the whole contiguous tensor with the unwritten tail masked (`GPT.forward`), because
    oneDNN's batched matmuls copy a strided slice of a longer tensor on every call (docs/speed.md). Each layer owns
    its tensor (no shared base), so an Inductor-compiled decode step (`pack_for_cpu(model, compile=True)`) writes
    the new position in place.
    A cache in a narrower dtype than the model (bfloat16 under float32 weights) stores keys and values rounded
    to it and runs the attention products in it (softmax still in float32): it halves the cache's memory traffic,
    which at batch 16 is as large as the weights' (benchmarks/sampling.py).
    """

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    visible: torch.Tensor | None = None  # (B, block_size) bool: False where a masked pad was written
    max_length: int | None = None  # the capacity `reserve` grows to at most (None: the current one)

    @classmethod
    def allocate(
        cls, config: GPTConfig, batch_size: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> KVCache:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        shape = (batch_size, config.kv_heads, min(KV_CHUNK, config.block_size), config.head_dim)
        visible = torch.ones(batch_size, config.block_size, dtype=torch.bool, device=device) if config.mask_padding else None
        return cls(*(tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)) for _ in "kv"),
                   visible=visible, max_length=config.block_size)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Grow every layer's tensors (a copy) to hold positions [0, length), in whole KV_CHUNKs up to max_length."""
        if length <= self.capacity:
            return
        limit = self.capacity if self.max_length is None else self.max_length
        if length > limit:
            raise ValueError(f"the KVCache holds at most {limit} positions, asked for {length}.")
        grown = min(kv_capacity(length), limit)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(*t.shape[:2], grown, t.shape[3])
            out[:, :, : t.shape[2]] = t
            out[:, :, t.shape[2] :] = 0  # masked, but finite: a masked weight of 0 times NaN would still be NaN
            return out

        self.k, self.v = tuple(map(grow, self.k)), tuple(map(grow, self.v))

    def rows(self, index: torch.Tensor) -> KVCache:
        """A cache of the rows `index` (B',) only (a copy)."""
        return KVCache(tuple(k[index] for k in self.k), tuple(v[index] for v in self.v),
                       None if self.visible is None else self.visible[index], self.max_length)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


@dataclass(frozen=True)
class RowPositions:
    """Where each row's tokens sit in a forward against a KV cache when rows are at different positions (parallel
    decoding): row b's T tokens are at positions `index[b]`, consecutive, and each sees the cache's keys up to its own
    position. Made by `RowPositions.at(start, T)`; pass it as `start=` to `GPT.forward`."""

    index: torch.Tensor  # (B, T) int64 positions
    end: int             # keys [0, end) are read: the largest position + 1
    mask: torch.Tensor   # (B, 1, T, end) bool: key j is visible to token t of row b when j <= index[b, t]

    @classmethod
    def at(cls, start: torch.Tensor, length: int) -> RowPositions:
        """Row b's `length` tokens at positions start[b] + [0, length); start: (B,) int64."""
        index = start[:, None] + torch.arange(length, device=start.device)  # (B, T)
        end = int(index.max()) + 1
        mask = torch.arange(end, device=start.device) <= index[:, None, :, None]  # (B, 1, T, end)
        return cls(index=index, end=end, mask=mask)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, RoPE on q and k, optional KV-cache write, `attention`, output projection."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qkv = Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_dim)
        self.proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.backend = config.attn_backend
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int | RowPositions = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask: bool (B, 1, T, keys) in place of the causal (or RowPositions) one (`GPT._padding_mask`); with a cache
        its keys may run past start + T, over the cache's masked tail (a CPU decode step, see KVCache)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)  # (B, T, H + Hkv, D): one rotation for q and k
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)  # (B, Hkv, T, D)
        if isinstance(start, RowPositions):  # rows at different positions: written by index, each sees its own keys
            cache_k, cache_v = cache
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            cache_k[rows, :, start.index] = k.transpose(1, 2).to(cache_k.dtype)  # (B, T, Hkv, D) into (B, Hkv, S, D)
            cache_v[rows, :, start.index] = v.transpose(1, 2).to(cache_v.dtype)
            k, v, mask = cache_k[:, :, : start.end], cache_v[:, :, : start.end], start.mask if mask is None else mask
            q = q.to(k.dtype)
        elif cache is not None:
            cache_k, cache_v = cache  # (B, Hkv, capacity, D), possibly in a narrower dtype than x (see KVCache)
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            keys = start + T if mask is None else mask.shape[-1]  # a CPU decode step's mask covers the whole capacity
            k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]  # (B, Hkv, keys, D)
            q = q.to(k.dtype)
        y = attention(q, k, v, backend=self.backend, causal=mask is None, mask=mask,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))  # (B, T, C)


class SwiGLU(nn.Module):
    """w2(silu(x w1) * x w3) with w1 and w3 fused into one projection (Shazeer 2020)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.w13 = Linear(config.n_embd, 2 * config.ffn_dim)
        self.w2 = Linear(config.ffn_dim, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, ffn) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = SelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int | RowPositions = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache=cache, start=start, mask=mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(PretrainedMixin, nn.Module):
    """Token embedding -> n_layer pre-norm blocks (RMSNorm, GQA attention with 1-D/2-D RoPE, SwiGLU) -> RMSNorm -> head.

    `forward(idx, cache=None, start=0)` maps int64 token ids (B, T) to float logits (B, T, vocab_size).
    Without a cache it is plain causal self-attention over idx (start must be 0). With a `KVCache` it
    writes the keys/values of positions [start, start + T) and attends to [0, start + T): prefill is
    start=0 with the whole prefix, decode is T=1 at start = number of tokens already in the cache. With
    `start=RowPositions.at(starts, T)` each row writes and reads at its own positions (parallel decoding).
    """

    config_class = GPTConfig
    kv_cache_dtype: torch.dtype | None = None  # the KV cache's dtype in sampling (None: the weights'); see bf16_blocks

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.num_token_rows, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.abs_pos_emb else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config.block) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.num_token_rows)
        if config.code_factors:  # embedding rows [0, a) for structures, [a, a + b) for colours
            (a, b), hidden = config.code_factors, config.colour_hidden
            self.factor_emb = nn.Embedding(a + b, config.n_embd)
            self.structure_head = Linear(config.n_embd, a)
            self.colour_in = Linear(config.n_embd, hidden)
            self.structure_gate = nn.Embedding(a, hidden)
            self.colour_out = Linear(hidden, b)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.code_features:
            self.register_buffer("code_feat", torch.zeros(config.vocab_size, config.code_features))
            self.feat_in = Linear(config.code_features, config.n_embd)
            self.feat_out = None if config.code_factors else Linear(config.n_embd, config.code_features)
        cos, sin = rope_tables(rope_positions(config), head_dim=config.head_dim, theta=config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections get init_std / sqrt(2 n_layer) (GPT-2)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp.w2.weight):
                nn.init.normal_(weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once. non_embedding drops the input embedding table (kept when tied,
        since it is then also the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel() + (self.factor_emb.weight.numel() if self.config.code_factors else 0)
        return n

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, start: int | RowPositions = 0,
                logits_from: int = 0, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`logits_from` > 0 returns the logits of positions [logits_from, T) only (B, T - logits_from, vocab_size):
        training without a text loss needs none for the text positions, and the head is a large share of a step.
        With `targets` (B, T - logits_from) int64 it returns the log-probability of each target (B, T - logits_from),
        log_softmax(logits) at the target, which a factored head computes without the logits of every code.
        `positions` (T,) int64, increasing: the positions of idx's tokens in a forward without a cache, when columns
        that hold only masked pads were dropped (`GPTConfig.mask_padding`); the outputs are then those of the full
        sequence at these positions."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be int64 token ids (B, T), got shape {tuple(idx.shape)}.")
        B, T = idx.shape
        if not 0 <= logits_from < T:
            raise ValueError(f"logits_from={logits_from} must lie in [0, T={T}).")
        if targets is not None and (isinstance(start, RowPositions) or targets.shape != (B, T - logits_from)):
            raise ValueError(f"targets must be (B, T - logits_from) = {(B, T - logits_from)} token ids, without "
                             f"per-row positions; got {tuple(targets.shape)}.")
        if isinstance(start, RowPositions):
            return self._forward_rows(idx, cache=cache, rows=start)[:, logits_from:]
        if positions is not None:
            return self._forward_at(idx, positions, logits_from=logits_from, targets=targets, cache=cache, start=start)
        if start < 0 or start + T > self.config.block_size:
            raise ValueError(
                f"positions [start, start + T) = [{start}, {start + T}) must lie in [0, block_size={self.config.block_size})."
            )
        if cache is None and start != 0:
            raise ValueError(f"start={start} needs a KVCache holding positions [0, {start}); without a cache start must be 0.")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the KVCache holds {cache.batch_size} rows but idx has {B}.")
        cos = self.rope_cos[start : start + T].unsqueeze(1)  # (T, 1, D/2), broadcast over heads
        sin = self.rope_sin[start : start + T].unsqueeze(1)
        pos = self.pos_emb.weight[start : start + T] if self.pos_emb is not None else None
        # a one-token CPU decode step reads the cache's whole contiguous capacity, its unwritten tail masked (KVCache)
        padded_decode = cache is not None and T == 1 and idx.device.type == "cpu"
        if cache is not None:
            cache.reserve(start + T)
        mask = None
        if self.config.mask_padding or padded_decode:
            keys = torch.arange(cache.capacity if padded_decode else start + T, device=idx.device)
            if not self.config.mask_padding:
                mask = (keys <= start).expand(B, 1, 1, len(keys))
            else:
                visible = idx != self.config.pad_id  # (B, T)
                if cache is not None:
                    cache.visible[:, start : start + T] = visible
                    visible = cache.visible[:, : len(keys)]
                mask = self._padding_mask(visible, keys[None, start : start + T], keys)
        return self._run(idx, cos, sin, pos, cache=cache, start=start, logits_from=logits_from, targets=targets,
                         mask=mask)

    def _forward_at(self, idx: torch.Tensor, positions: torch.Tensor, *, logits_from: int,
                    targets: torch.Tensor | None, cache: KVCache | None, start: int | RowPositions) -> torch.Tensor:
        """forward over tokens at `positions` (T,), without a cache, pads masked."""
        T = idx.shape[1]
        if cache is not None or start != 0 or not self.config.mask_padding:
            raise ValueError("positions= is for a forward without a cache (start=0) of a model with mask_padding: the "
                             "dropped columns must have been masked pads.")
        # the values are checked eagerly only: reading them would split a compiled training step (train.compile)
        if positions.shape != (T,) or positions.dtype != torch.long or not torch.compiler.is_compiling() and (
                not bool((positions[1:] > positions[:-1]).all()) or int(positions[0]) < 0
                or int(positions[-1]) >= self.config.block_size):
            raise ValueError(f"positions must be increasing int64 ({T},) in [0, block_size={self.config.block_size}), "
                             f"got {positions.dtype} {tuple(positions.shape)}.")
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (T, 1, D/2)
        pos = self.pos_emb.weight[positions] if self.pos_emb is not None else None
        mask = self._padding_mask(idx != self.config.pad_id, positions[None], positions)
        return self._run(idx, cos, sin, pos, cache=None, start=0, logits_from=logits_from, targets=targets, mask=mask)

    def _forward_rows(self, idx: torch.Tensor, *, cache: KVCache | None, rows: RowPositions) -> torch.Tensor:
        """forward with each row at its own positions `rows.index` (B, T) against `cache`."""
        if cache is None or cache.batch_size != idx.shape[0]:
            raise ValueError("per-row positions (RowPositions) need a KVCache with one row per idx row.")
        if rows.index.shape != idx.shape or int(rows.index.min()) < 0 or rows.end > self.config.block_size:
            raise ValueError(f"RowPositions {tuple(rows.index.shape)} must match idx {tuple(idx.shape)} and lie in "
                             f"[0, block_size={self.config.block_size}), got [{int(rows.index.min())}, {rows.end}).")
        cache.reserve(rows.end)
        cos = self.rope_cos[rows.index].unsqueeze(2)  # (B, T, 1, D/2), broadcast over heads
        sin = self.rope_sin[rows.index].unsqueeze(2)
        pos = self.pos_emb(rows.index) if self.pos_emb is not None else None
        mask = None
        if self.config.mask_padding:
            batch = torch.arange(idx.shape[0], device=idx.device)[:, None]
            cache.visible[batch, rows.index] = idx != self.config.pad_id
            mask = self._padding_mask(cache.visible[:, : rows.end], rows.index, torch.arange(rows.end, device=idx.device),
                                      order=rows.mask)
        return self._run(idx, cos, sin, pos, cache=cache, start=rows, mask=mask)

    @staticmethod
    def _padding_mask(visible: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, *,
                      order: torch.Tensor | None = None) -> torch.Tensor:
        """bool (B, 1, T, keys): the keys each query reads with the padding masked: those `order` (B or 1, 1, T, keys)
        allows (default: at or before the query's position) that are not pads (`visible` (B, keys)), and the query's
        own key, so a pad reads itself. query_pos (B or 1, T) and key_pos (keys,) are positions in the sequence."""
        at_or_before = (key_pos <= query_pos[..., None])[:, None] if order is None else order
        own = (key_pos == query_pos[..., None])[:, None]  # (B or 1, 1, T, keys)
        return at_or_before & (visible[:, None, None, :] | own)

    def _run(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor | None, *,
             cache: KVCache | None, start: int | RowPositions, logits_from: int = 0,
             targets: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (plus the absolute position rows `pos`), the blocks, the head on positions [logits_from, T):
        logits (B, T - logits_from, vocab_size), or the targets' log-probabilities. mask: bool (B, 1, T, keys), which
        keys each position reads when pads are masked (None: causal, or the RowPositions mask)."""
        x = self._embed(idx)  # (B, T, C)
        if self.config.code_features:
            x = x + self.feat_in(self.code_feat[idx])
        if pos is not None:
            x = x + pos
        x = self.drop(x)
        recompute = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and cache is None:
                x = checkpoint(block, x, cos, sin, mask=mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache=None if cache is None else (cache.k[i], cache.v[i]), start=start, mask=mask)
        return self._head(self.norm(x[:, logits_from:]), targets)

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Normed hidden states (B, T', C) -> logits (B, T', vocab_size): each token row's, plus the code-features
        term; a factored code's is log p(structure) + log p(colour | structure), in float32. With targets (B, T'):
        their log-probabilities under those logits (B, T')."""
        logits = self.lm_head(x)  # (B, T', num_token_rows)
        if not self.config.code_factors:
            if self.config.code_features:
                logits = logits + self.feat_out(x) @ self.code_feat.t().to(x.dtype)
            return logits if targets is None else logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        rows, b = self.config.num_token_rows, self.config.code_factors[1]
        logits = logits.float()
        structure = self.structure_head(x).float().log_softmax(-1)  # (B, T', a)
        if targets is None:
            codes = structure[..., None] + self.colour_logits(x).float().log_softmax(-1)  # (B, T', a, b)
            return torch.cat([logits, codes.flatten(-2)], dim=-1)
        code = (targets - rows).clamp(min=0)
        i, j = code // b, code % b  # only the target's structure needs its colours
        colour = self.colour_logits(x, i).float().log_softmax(-1)  # (B, T', b)
        joint = structure.gather(-1, i[..., None])[..., 0] + colour.gather(-1, j[..., None])[..., 0]
        token = logits.gather(-1, targets.clamp(max=rows - 1)[..., None])[..., 0]
        norm = torch.logaddexp(logits.logsumexp(-1), torch.zeros((), device=x.device))  # the codes sum to 1
        return torch.where(targets < rows, token, joint) - norm

    def colour_logits(self, x: torch.Tensor, structure: torch.Tensor | None = None) -> torch.Tensor:
        """Normed hidden states (B, T', C) -> colour logits given each structure (B, T', a, b), or given `structure`
        (B, T') only (B, T', b): a small MLP of the hidden state and the structure's gate, so which colour comes
        depends on which object's patch is drawn."""
        hidden = self.colour_in(x)
        if structure is None:
            hidden, gate = hidden[..., None, :], self.structure_gate.weight
        else:
            gate = self.structure_gate(structure)
        return self.colour_out(F.gelu(hidden + gate.to(hidden.dtype)))

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token rows; a factored code's is the sum of its structure's and its colour's rows."""
        if not self.config.code_factors:
            return self.tok_emb(idx)
        rows, (a, b) = self.config.num_token_rows, self.config.code_factors
        code = (idx - rows).clamp(min=0)
        factored = self.factor_emb(code // b) + self.factor_emb(a + code % b)
        return torch.where((idx < rows)[..., None], self.tok_emb(idx.clamp(max=rows - 1)), factored)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at `seq_len`, PaLM style (Chowdhery et al. 2022, app. B):
    6 N + 12 n_layer n_embd seq_len, where N counts the matmul weights (every Linear, the output head
    included, the embedding lookup not). The attention term counts the full seq_len x seq_len score matrix,
    as PaLM does, although a causal kernel can skip half of it."""
    C, L, D = config.n_embd, config.n_layer, config.head_dim
    per_layer = C * (config.n_head + 2 * config.kv_heads) * D + config.n_head * D * C + 3 * C * config.ffn_dim
    n_matmul = L * per_layer + C * config.num_token_rows + config.code_features * C  # blocks, token rows, feat_in
    if config.code_factors:  # structure head, colour_in, colour_out (training needs the target structure's only)
        (a, b), hidden = config.code_factors, config.colour_hidden
        n_matmul += C * (a + hidden) + hidden * b
    else:
        n_matmul += config.code_features * (C + config.vocab_size)
    return 6.0 * n_matmul + 12.0 * L * config.n_head * D * seq_len
