"""Caption following and image-distribution metrics in a judge CLIP's feature space: R-precision and precision/recall
(Kynkäänniemi et al. 2019); the CLIP score and the Fréchet distance live in argen.eval.clip_metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from argen.eval.retrieval import hits_at_k


def r_precision_hits(image_embeds: torch.Tensor, caption_index: torch.Tensor, caption_embeds: torch.Tensor, *,
                     candidates: int = 100, exclude: torch.Tensor | None = None, seed: int = 0) -> np.ndarray:
    """Whether each image retrieves its caption first among `candidates` captions: its caption and candidates - 1
    others drawn at random (seeded) from the rest; ties count against it, so chance is 1 / candidates.

    image_embeds (N, D); caption_index (N,) int64, the row of each image's caption in caption_embeds (C, D), C >= 2.
    exclude: (N,) int64, a further caption per image never drawn as a distractor (for the shuffled-caption floor, the
    image's true caption, which would otherwise beat the shuffled one and push the floor below chance).
    Returns (N,) bool. With fewer captions than `candidates`, all the others are candidates.
    """
    N, C = image_embeds.shape[0], caption_embeds.shape[0]
    if caption_index.shape != (N,) or C < 2 + (exclude is not None):
        raise ValueError(f"need one caption index per image ({N}) and at least {2 + (exclude is not None)} captions, got "
                         f"{tuple(caption_index.shape)} and {C}.")
    rng = np.random.default_rng(seed)
    banned = [{own} | ({int(exclude[i])} if exclude is not None else set()) for i, own in enumerate(caption_index.tolist())]
    k = min(candidates, C - max(len(b) for b in banned) + 1)
    others = np.stack([rng.choice(np.array([c for c in range(C) if c not in b]), size=k - 1, replace=False)
                       for b in banned]) if k > 1 else np.zeros((N, 0), dtype=np.int64)
    cand = torch.cat([caption_index[:, None], torch.from_numpy(others)], dim=1)  # (N, k): column 0 is its own
    img, txt = F.normalize(image_embeds.double(), dim=-1), F.normalize(caption_embeds.double(), dim=-1)
    scores = torch.einsum("nd,nkd->nk", img, txt[cand])
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[:, 0] = True
    return hits_at_k(scores, positives, 1).numpy()


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of features (N, D) to its k-th nearest other row: (N,) float64."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k={k} feature rows for k-nearest-neighbour radii, got {features.shape[0]}.")
    d = torch.cdist(features.double(), features.double())
    return d.kthvalue(k + 1, dim=1).values  # the 1st is the row itself, at distance 0


def within_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> np.ndarray:
    """For each query row, whether it lies within some support row's k-NN ball: (Q,) bool."""
    d = torch.cdist(queries.double(), support.double())  # (Q, S)
    return (d <= radii[None, :]).any(dim=1).numpy()


def precision_recall(real: torch.Tensor, generated: torch.Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of generated features within the real
    features' k-NN manifold, and of real features within the generated one."""
    precision = within_manifold(generated, real, knn_radii(real, k)).mean()
    recall = within_manifold(real, generated, knn_radii(generated, k)).mean()
    return float(precision), float(recall)
