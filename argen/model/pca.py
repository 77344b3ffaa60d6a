"""Principal component analysis in float64, shared by the GPT's code features and the AR prior's embedding tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PCAFit:
    """A principal component analysis of (N, D) data, float64.

    mean: (D,). components: (C, D) orthonormal rows, by decreasing eigenvalue (sign fixed so each row's largest-magnitude
    entry is positive). eigenvalues: (D,) all eigenvalues of the covariance, descending (the kept ones first).
    """

    mean: Tensor
    components: Tensor
    eigenvalues: Tensor

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def explained_variance(self) -> float:
        """Share of the total variance the kept components hold."""
        return float(self.eigenvalues[: self.n_components].sum() / self.eigenvalues.sum())


def components_for_variance(eigenvalues: Tensor, variance: float) -> int:
    """The smallest n whose n largest eigenvalues hold at least `variance` of their sum. eigenvalues: (D,) descending."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}.")
    ratio = eigenvalues.double().cumsum(0) / eigenvalues.double().sum()  # (D,)
    return min(int((ratio < variance - 1e-9).sum()) + 1, len(eigenvalues))  # a share equal to `variance` up to rounding counts


def fit_pca(x: Tensor, *, variance: float = 0.99, n_components: int | None = None) -> PCAFit:
    """PCA of x (N, D) by an eigendecomposition of its covariance in float64. Keeps `n_components` components if given,
    else the fewest that preserve `variance` of the total variance."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs (N, D) data with N >= 2, got shape {tuple(x.shape)}.")
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / (len(x) - 1))  # ascending; vectors in columns
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0), vectors.flip(1).T  # (D,), (D, D) rows, descending
    n = components_for_variance(eigenvalues, variance) if n_components is None else n_components
    if not 1 <= n <= x.shape[1]:
        raise ValueError(f"n_components must be in [1, D={x.shape[1]}], got {n}.")
    components = vectors[:n]
    sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))  # (n, 1)
    return PCAFit(mean=mean, components=components * sign, eigenvalues=eigenvalues)
