"""Prior-only metrics (no decoder): how close predicted CLIP image embeddings are to the true ones, plus the two trivial
priors every real prior must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TIE_TOLERANCE = 1e-5  # cosines closer than this count as ties in ranks


@dataclass
class PriorMetrics:
    """Predicted vs true CLIP image embeddings of N captions, in cosine terms (embeddings are L2-normalised first).

    cosine: (N,) float32, cos(predicted_i, true_i).
    rank:   (N,) int64, the rank of the true image among the candidates when they are sorted by cosine to the
        prediction: 1 + the number of candidates strictly more similar to predicted_i than true_i is (1 = best; a
        candidate tied with the true image within TIE_TOLERANCE, e.g. an identical render, does not push it down).
    num_candidates: M, so a uniform random guess has an expected rank of about (M + 1) / 2.
    """

    cosine: Tensor
    rank: Tensor
    num_candidates: int

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean())

    @property
    def top1(self) -> float:
        """Share of captions whose true image is the candidate nearest the prediction."""
        return float((self.rank <= 1).float().mean())

    @property
    def top5(self) -> float:
        return float((self.rank <= 5).float().mean())

    @property
    def median_rank(self) -> float:
        return float(self.rank.float().median())

    @property
    def mean_rank(self) -> float:
        return float(self.rank.float().mean())

    def summary(self, prefix: str = "") -> dict[str, float]:
        """The scalars, named `{prefix}cosine`, `{prefix}top1`, ..., for logs and tables."""
        values = {"cosine": self.mean_cosine, "top1": self.top1, "top5": self.top5, "median_rank": self.median_rank,
                  "mean_rank": self.mean_rank, "num_candidates": float(self.num_candidates)}
        return {f"{prefix}{k}": v for k, v in values.items()}


def _check_embeddings(name: str, x: Tensor, *, dim: int | None = None) -> None:
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) batch of embeddings, got shape {tuple(x.shape)}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the predictions have {dim}; compare embeddings of one CLIP.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values.")


@torch.no_grad()
def prior_metrics(predicted: Tensor, true: Tensor, *, candidates: Tensor | None = None,
                  chunk_size: int = 1024) -> PriorMetrics:
    """Score predicted image embeddings (N, D) against the true ones (N, D), row i against row i.

    candidates: (M, D) the images ranked for retrieval; None ranks among `true` itself (the N images of the eval
        set), so row i competes with the other N - 1 true images. Embeddings need not be normalised.
    """
    _check_embeddings("predicted", predicted)
    _check_embeddings("true", true, dim=predicted.shape[1])
    if true.shape[0] != predicted.shape[0]:
        raise ValueError(f"predicted has {predicted.shape[0]} rows but true has {true.shape[0]}; they pair row by row.")
    pred = F.normalize(predicted.float(), dim=-1)
    target = F.normalize(true.float().to(pred.device), dim=-1)
    cand = target if candidates is None else candidates.float().to(pred.device)
    _check_embeddings("candidates", cand, dim=predicted.shape[1])
    cand = F.normalize(cand, dim=-1)
    cosine = (pred * target).sum(-1)  # (N,)
    ranks = []
    for start in range(0, len(pred), chunk_size):
        sims = pred[start:start + chunk_size] @ cand.T  # (n, M)
        # The tolerance absorbs float rounding: the true image among the candidates must not outrank itself.
        ranks.append(1 + (sims > cosine[start:start + chunk_size, None] + TIE_TOLERANCE).sum(-1))
    return PriorMetrics(cosine=cosine.cpu(), rank=torch.cat(ranks).cpu(), num_candidates=len(cand))


def mean_embedding_prior(train_image_embeds: Tensor, num: int) -> Tensor:
    """Trivial prior 1, which ignores the caption: the normalised mean of the normalised training image
    embeddings, repeated `num` times -> (num, D)."""
    _check_embeddings("train_image_embeds", train_image_embeds)
    mean = F.normalize(F.normalize(train_image_embeds.float(), dim=-1).mean(0), dim=-1)
    return mean.expand(num, -1).clone()


@torch.no_grad()
def nearest_caption_prior(train_text_embeds: Tensor, train_image_embeds: Tensor, query_text_embeds: Tensor, *,
                          chunk_size: int = 1024) -> Tensor:
    """Trivial prior 2, a lookup table: for each query caption, the image embedding of the training item whose text
    embedding is nearest by cosine -> (N, D). A caption seen in training has the same text embedding, so it gets the
    image of one of its training occurrences (exact ties go to the lowest index)."""
    _check_embeddings("train_text_embeds", train_text_embeds)
    _check_embeddings("train_image_embeds", train_image_embeds)
    _check_embeddings("query_text_embeds", query_text_embeds, dim=train_text_embeds.shape[1])
    if len(train_text_embeds) != len(train_image_embeds):
        raise ValueError(f"train_text_embeds has {len(train_text_embeds)} rows but train_image_embeds has "
                         f"{len(train_image_embeds)}; they pair row by row.")
    keys = F.normalize(train_text_embeds.float(), dim=-1)
    queries = F.normalize(query_text_embeds.float().to(keys.device), dim=-1)
    index = torch.cat([(queries[s:s + chunk_size] @ keys.T).argmax(-1) for s in range(0, len(queries), chunk_size)])
    return train_image_embeds[index.to(train_image_embeds.device)].float()


def trivial_priors(train, val, *, max_items: int | None = None) -> dict[str, PriorMetrics]:
    """The two priors every real prior must beat, scored on the first `max_items` items of `val` (an EmbeddingSet,
    as is `train`): "mean_embedding" and "nearest_caption" (above)."""
    n = len(val.captions) if max_items is None else min(max_items, len(val.captions))
    true = val.image_embeds[:n]
    return {"mean_embedding": prior_metrics(mean_embedding_prior(train.image_embeds, n), true),
            "nearest_caption": prior_metrics(nearest_caption_prior(train.text_embeds, train.image_embeds,
                                                                   val.text_embeds[:n]), true)}


@dataclass
class PriorEvalConfig:
    """How a trained prior is scored: its samples for the first `max_items` val captions (None: all; 0: not scored)
    against their true image embeddings, in batches of `batch_size`, at guidance `cfg_scale`, noise seeded `seed`."""

    max_items: int | None = 1000
    batch_size: int = 250
    cfg_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.max_items is not None and self.max_items < 0) or self.batch_size < 1:
            raise ValueError(f"max_items must be >= 0 or null and batch_size >= 1, got {self.max_items} and "
                             f"{self.batch_size}.")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}.")
