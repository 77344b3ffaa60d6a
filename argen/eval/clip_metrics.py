"""Judge-CLIP metrics for generated images: CLIP score, Fréchet distance on CLIP image features, and diversity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> np.ndarray:
    """Per-image CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021, with torchmetrics' weight 100).
    image_embeds, text_embeds: (N, D), row i of each belonging together. Returns (N,) float64."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings must pair up row by row, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}.")
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return (100 * cos.clamp(min=0)).numpy()


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased) of features (N, D), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The matrix square root is taken as sigma1^(1/2) sigma2 sigma1^(1/2) via symmetric eigendecompositions, which
    has the same trace, stays real and needs no epsilon for singular covariances (few images, many dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}.")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sigma1^(1/2), symmetric PSD
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)  # eigenvalues of a symmetric PSD matrix
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def features_frechet_distance(generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_statistics(generated), *feature_statistics(reference))


def pairwise_diversity(image_embeds: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Per prompt, the mean cosine distance 1 - cos over all pairs of its images' embeddings (N, D).
    Prompts with a single image have no pairs and are left out."""
    if len(prompts) != len(image_embeds):
        raise ValueError(f"{len(prompts)} prompts for {len(image_embeds)} embeddings: give one prompt per image.")
    unit = F.normalize(image_embeds.double(), dim=-1)
    out: dict[str, float] = {}
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        n = len(idx)
        if n < 2:
            continue
        e = unit[idx]
        cos = e @ e.T  # (n, n)
        mean_cos = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
        out[prompt] = float(1 - mean_cos)
    return out
