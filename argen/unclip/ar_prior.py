"""The AR prior's tokenizer: unit CLIP image embeddings -> PCA coordinates in order of variance -> quantile buckets
(after DALL-E 2's given tokens: the quantised text embedding and text-image dot product), and back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.model.pca import fit_pca
from tokenizers_img.serialization import PretrainedMixin

DEQUANTIZE = ("mean", "midpoint")


class QuantizerError(ValueError):
    """Embeddings or codes do not fit the quantizer (wrong width, codes out of range, a missing text embedding)."""


def _quantile_bounds(values: Tensor, num_buckets: int) -> Tensor:
    """values (N, C) -> bounds (C, K + 1): the training minimum, the K - 1 inner edges at quantiles k/K, the maximum.
    Bucket k holds [bounds[k], bounds[k + 1]), so each holds about N/K training values."""
    q = torch.linspace(0, 1, num_buckets + 1, dtype=values.dtype)
    return torch.quantile(values, q, dim=0).T.contiguous()


def _bucketize(values: Tensor, bounds: Tensor) -> Tensor:
    """values (N, C), bounds (C, K + 1) -> bucket ids (N, C) int64 in [0, K); values outside the training range fall
    into the outer buckets."""
    inner = bounds[:, 1:-1].contiguous()  # (C, K - 1)
    return torch.searchsorted(inner, values.T.contiguous(), right=True).T  # (N, C)


def _bucket_means(values: Tensor, codes: Tensor, bounds: Tensor) -> Tensor:
    """The mean training value of each bucket (C, K); an empty bucket (tied quantile edges) takes its midpoint."""
    C, K = bounds.shape[0], bounds.shape[1] - 1
    sums = torch.zeros(C, K, dtype=values.dtype).scatter_add_(1, codes.T, values.T)
    counts = torch.zeros(C, K, dtype=values.dtype).scatter_add_(1, codes.T, torch.ones_like(values.T))
    midpoints = (bounds[:, :-1] + bounds[:, 1:]) / 2
    return torch.where(counts > 0, sums / counts.clamp(min=1), midpoints)


@dataclass
class QuantizerConfig:
    """Shape of a fitted EmbeddingQuantizer.

    dim: D, the CLIP embedding width. n_components: C, the PCA coordinates kept (one token each, largest variance
    first). num_buckets: K, buckets per coordinate (and per given token). text_tokens: give the caption's CLIP
    text embedding as C tokens (its coordinates in the image PCA basis, in buckets fitted on the training text
    embeddings; DALL-E 2 puts z_t in the prior's prefix). dot_token: the quantised dot product of the unit text and
    image embeddings (DALL-E 2). A row is [t_0 ... t_{C-1}] [dot] i_0 ... i_{C-1} (DALL-E 2's order), or with
    `interleave` (needs text_tokens) [dot] t_0 i_0 t_1 i_1 ...: image coordinate k is then predicted at the position
    that holds text coordinate k, and no attention has to find it. With the prefix layout a GPT fits the caption
    first and may learn the long look-back late or never (the shapes AR prior stayed at its caption-only level in
    one run of eight; interleaved, none of six did). dequantize: a bucket decodes to the mean of its training
    values ("mean") or the middle of its edges ("midpoint").
    """

    dim: int
    n_components: int
    num_buckets: int
    dot_token: bool = False
    dequantize: Literal["mean", "midpoint"] = "mean"
    text_tokens: bool = False
    interleave: bool = False

    def __post_init__(self) -> None:
        if self.interleave and not self.text_tokens:
            raise ValueError("interleave places the text-embedding tokens between the image tokens: it needs "
                             "text_tokens=True.")
        if not 1 <= self.n_components <= self.dim:
            raise ValueError(f"n_components must be in [1, dim={self.dim}], got {self.n_components}.")
        if self.num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {self.num_buckets}.")
        if self.dequantize not in DEQUANTIZE:
            raise ValueError(f"dequantize must be one of {DEQUANTIZE}, got {self.dequantize!r}.")


@dataclass
class RoundTrip:
    """Unit embeddings against their reconstructions after the PCA truncation alone (pca_*) and after PCA +
    quantisation + dequantisation (what the prior can at best return): mean cosine, and the mean squared error
    relative to the embeddings' variance (mean squared distance to their mean; DALL-E 2's "< 1% MSE" measure).
    Embeddings packed tightly around their mean have cosines near 1 whatever happens; the relative error tells."""

    pca_cosine: float
    cosine: float
    pca_relative_mse: float
    relative_mse: float


class EmbeddingQuantizer(nn.Module, PretrainedMixin):
    """Unit CLIP image embeddings (N, D) (with their captions' text embeddings) <-> token rows (N, num_tokens) int64
    in [0, K).

    Token order: [text embedding's C buckets (if text_tokens)] [dot-product bucket (if dot_token)] then the image
    embedding's PCA coordinates 0, 1, ..., C - 1 by decreasing variance; with `interleave`, [dot] then text and
    image coordinate k side by side (see QuantizerConfig). `text_positions`, `dot_index` and `image_positions`
    say where each lies. The given tokens (text, dot) are known or chosen at sampling time; only the image tokens
    decode. Inputs are L2-normalised first; `decode` returns unit embeddings. Build with `fit`; save/load with
    `save_pretrained` / `from_pretrained`.
    """

    config_class = QuantizerConfig

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        D, C, K = config.dim, config.n_components, config.num_buckets
        n_dot = K if config.dot_token else 0
        self.register_buffer("mean", torch.zeros(D))                       # (D,)
        self.register_buffer("components", torch.zeros(C, D))              # (C, D)
        self.register_buffer("eigenvalues", torch.zeros(D))                # (D,) all, descending
        self.register_buffer("bounds", torch.zeros(C, K + 1))              # (C, K + 1) min, quantile edges, max
        self.register_buffer("bucket_means", torch.zeros(C, K))            # (C, K)
        self.register_buffer("dot_bounds", torch.zeros(n_dot + (1 if n_dot else 0)))  # (K + 1,) or (0,)
        self.register_buffer("dot_means", torch.zeros(n_dot))              # (K,) or (0,)
        self.register_buffer("text_bounds", torch.zeros(C if config.text_tokens else 0, K + 1))  # (C or 0, K + 1)

    # ------------------------------------------------------------------------------------------------ fitting
    @classmethod
    @torch.no_grad()
    def fit(cls, image_embeds: Tensor, *, text_embeds: Tensor | None = None, num_buckets: int = 256,
            variance: float = 0.99, n_components: int | None = None, dot_token: bool = False,
            text_tokens: bool = False, interleave: bool = False,
            dequantize: Literal["mean", "midpoint"] = "mean") -> EmbeddingQuantizer:
        """Fit the PCA (on the unit image embeddings (N, D)) and the per-coordinate quantile buckets; with `dot_token`
        also the buckets of the dot products with the unit text embeddings (N, D), with `text_tokens` those of the
        text embeddings' coordinates (text_embeds are then required)."""
        if (dot_token or text_tokens) and text_embeds is None:
            raise QuantizerError("dot_token and text_tokens need text_embeds: their buckets are fitted on the captions' "
                                 "CLIP text embeddings.")
        x = F.normalize(image_embeds.double(), dim=-1)
        pca = fit_pca(x, variance=variance, n_components=n_components)
        quantizer = cls(QuantizerConfig(dim=x.shape[1], n_components=pca.n_components, num_buckets=num_buckets,
                                        dot_token=dot_token, dequantize=dequantize, text_tokens=text_tokens,
                                        interleave=interleave))
        coords = (x - pca.mean) @ pca.components.T  # (N, C) float64
        bounds = _quantile_bounds(coords, num_buckets)
        quantizer.mean.copy_(pca.mean)
        quantizer.components.copy_(pca.components)
        quantizer.eigenvalues.copy_(pca.eigenvalues)
        quantizer.bounds.copy_(bounds)
        quantizer.bucket_means.copy_(_bucket_means(coords, _bucketize(coords, bounds), bounds))
        if dot_token or text_tokens:
            quantizer._check_pair(image_embeds, text_embeds)
        if text_tokens:
            text_coords = (F.normalize(text_embeds.double(), dim=-1) - pca.mean) @ pca.components.T  # (N, C)
            quantizer.text_bounds.copy_(_quantile_bounds(text_coords, num_buckets))
        if dot_token:
            dots = (x * F.normalize(text_embeds.double(), dim=-1)).sum(-1, keepdim=True)  # (N, 1)
            dot_bounds = _quantile_bounds(dots, num_buckets)  # (1, K + 1)
            quantizer.dot_bounds.copy_(dot_bounds[0])
            quantizer.dot_means.copy_(_bucket_means(dots, _bucketize(dots, dot_bounds), dot_bounds)[0])
        return quantizer

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def n_components(self) -> int:
        return self.config.n_components

    @property
    def num_buckets(self) -> int:
        return self.config.num_buckets

    @property
    def dot_index(self) -> int:
        """Index of the dot-product token (when dot_token): first when interleaved, else after the text tokens."""
        return 0 if self.config.interleave else self.config.n_components * int(self.config.text_tokens)

    @property
    def text_positions(self) -> Tensor:
        """(C,) int64 indices of the text-embedding tokens in a row ((0,) without text_tokens)."""
        C, dot = self.config.n_components, int(self.config.dot_token)
        if not self.config.text_tokens:
            return torch.zeros(0, dtype=torch.long)
        return dot + 2 * torch.arange(C) if self.config.interleave else torch.arange(C)

    @property
    def image_positions(self) -> Tensor:
        """(C,) int64 indices of the image tokens in a row, coordinate 0 (largest variance) first."""
        C, dot, text = self.config.n_components, int(self.config.dot_token), int(self.config.text_tokens)
        if self.config.interleave:
            return dot + 2 * torch.arange(C) + 1
        return text * C + dot + torch.arange(C)

    @property
    def num_tokens(self) -> int:
        """Tokens per row: the given ones and C image tokens."""
        return self.config.n_components * (1 + int(self.config.text_tokens)) + int(self.config.dot_token)

    @property
    def explained_variance(self) -> float:
        """Share of the training image embeddings' variance the kept components hold."""
        return float(self.eigenvalues[: self.n_components].sum() / self.eigenvalues.sum())

    def summary(self) -> dict:
        """The fitted sizes, for logs and reports."""
        return {"dim": self.config.dim, "n_components": self.n_components,
                "explained_variance": round(self.explained_variance, 6), "num_buckets": self.num_buckets,
                "text_tokens": self.config.text_tokens, "interleave": self.config.interleave,
                "dot_token": self.config.dot_token,
                "dequantize": self.config.dequantize, "num_tokens": self.num_tokens}

    def upper_dot_buckets(self, quantile: float = 0.5) -> int:
        """The first dot-product bucket lying wholly at or above `quantile` of the training dot products: bucket k
        covers the training quantiles [k/K, (k+1)/K), so 0.5 gives K/2 for even K, the top half."""
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"the dot-product quantile must be in [0, 1), got {quantile}.")
        return min(math.ceil(quantile * self.num_buckets - 1e-9), self.num_buckets - 1)

    # ------------------------------------------------------------------------------------------------ encode / decode
    def _check_embeddings(self, name: str, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise QuantizerError(f"{name} must be (N, {self.config.dim}) CLIP embeddings, got shape {tuple(x.shape)}: "
                                 "use embeddings of the CLIP this quantizer was fitted on.")

    def _check_pair(self, image_embeds: Tensor, text_embeds: Tensor) -> None:
        self._check_embeddings("image_embeds", image_embeds)
        self._check_embeddings("text_embeds", text_embeds)
        if len(image_embeds) != len(text_embeds):
            raise QuantizerError(f"image_embeds has {len(image_embeds)} rows but text_embeds has {len(text_embeds)}; "
                                 "they pair row by row.")

    def coordinates(self, image_embeds: Tensor) -> Tensor:
        """(N, D) -> PCA coordinates (N, C) float32 of the unit embeddings, largest variance first."""
        self._check_embeddings("image_embeds", image_embeds)
        x = F.normalize(image_embeds.float(), dim=-1)
        return (x - self.mean) @ self.components.T

    def dot_codes(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """The dot-product token (N,) int64 in [0, K): the bucket of unit(z_i) . unit(z_t)."""
        if not self.config.dot_token:
            raise QuantizerError("this quantizer was fitted without the dot-product token (dot_token=False).")
        self._check_pair(image_embeds, text_embeds)
        dots = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
        return _bucketize(dots[:, None], self.dot_bounds[None])[:, 0]

    def text_codes(self, text_embeds: Tensor) -> Tensor:
        """The text-embedding tokens (N, C) int64 in [0, K): buckets of unit(z_t)'s image-PCA coordinates."""
        if not self.config.text_tokens:
            raise QuantizerError("this quantizer was fitted without text-embedding tokens (text_tokens=False).")
        self._check_embeddings("text_embeds", text_embeds)
        return _bucketize(self.coordinates(text_embeds), self.text_bounds)

    @torch.no_grad()
    def encode(self, image_embeds: Tensor, text_embeds: Tensor | None = None) -> Tensor:
        """Image embeddings (N, D) (and, with given tokens, the paired text embeddings (N, D)) -> tokens
        (N, num_tokens) int64 in [0, K): the text buckets, the dot bucket and the bucket of each PCA coordinate, at
        `text_positions`, `dot_index` and `image_positions`."""
        codes = _bucketize(self.coordinates(image_embeds), self.bounds)  # (N, C)
        if self.num_tokens == self.n_components:
            return codes
        if text_embeds is None:
            raise QuantizerError("this quantizer gives text-embedding or dot-product tokens: "
                                 "encode(image_embeds, text_embeds) needs the text embeddings of the captions.")
        row = codes.new_zeros(len(codes), self.num_tokens)
        row[:, self.image_positions] = codes
        if self.config.text_tokens:
            row[:, self.text_positions] = self.text_codes(text_embeds)
        if self.config.dot_token:
            row[:, self.dot_index] = self.dot_codes(image_embeds, text_embeds)
        return row

    def bucket_values(self, dequantize: str | None = None) -> Tensor:
        """(C, K) the coordinate value each bucket decodes to: training means or edge midpoints."""
        how = self.config.dequantize if dequantize is None else dequantize
        if how not in DEQUANTIZE:
            raise ValueError(f"dequantize must be one of {DEQUANTIZE}, got {how!r}.")
        return self.bucket_means if how == "mean" else (self.bounds[:, :-1] + self.bounds[:, 1:]) / 2

    @torch.no_grad()
    def decode(self, codes: Tensor, *, dequantize: str | None = None) -> Tensor:
        """Tokens (N, num_tokens) int64 in [0, K) -> unit image embeddings (N, D) float32: dequantise each image
        coordinate, invert the PCA, L2-normalise. The given tokens (text, dot) are dropped."""
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            raise QuantizerError(f"codes must be (N, {self.num_tokens}) (= {self.num_tokens - self.n_components} given "
                                 f"tokens + {self.n_components} image tokens), got {tuple(codes.shape)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_buckets):
            raise QuantizerError(f"codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {self.num_buckets}).")
        codes = codes[:, self.image_positions.to(codes.device)].long()  # (N, C)
        values = self.bucket_values(dequantize)
        coords = values[torch.arange(self.n_components, device=codes.device), codes]  # (N, C)
        return F.normalize(self.mean + coords @ self.components, dim=-1)

    @torch.no_grad()
    def round_trip(self, image_embeds: Tensor, *, dequantize: str | None = None) -> RoundTrip:
        """Unit embeddings (N, D) against their PCA-only and their quantised reconstructions (see RoundTrip)."""
        x = F.normalize(image_embeds.float(), dim=-1)
        pca_only = F.normalize(self.mean + self.coordinates(x) @ self.components, dim=-1)
        codes = _bucketize(self.coordinates(x), self.bounds)
        row = codes.new_zeros(len(codes), self.num_tokens)  # the given tokens do not take part in decoding
        row[:, self.image_positions] = codes
        decoded = self.decode(row, dequantize=dequantize)
        variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
        return RoundTrip(pca_cosine=float((x * pca_only).sum(-1).mean()), cosine=float((x * decoded).sum(-1).mean()),
                         pca_relative_mse=float((x - pca_only).pow(2).sum(-1).mean()) / variance,
                         relative_mse=float((x - decoded).pow(2).sum(-1).mean()) / variance)
