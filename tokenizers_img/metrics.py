"""Reconstruction metrics over a whole validation set: per-image PSNR and SSIM, and codebook usage counts.

Everything here accumulates over all images or codes seen (sums and counts), never over a rolling window, and
exposes its state as tensors so several processes can all-reduce it (sum) and get the single-process answer.
"""

from __future__ import annotations

import math

import torch

from tokenizers_img.quantizers import perplexity_from_counts


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB: (B, C, H, W) images in [-1, 1] -> (B,) float64.

    PSNR = 10 log10(range^2 / MSE) with range = 2 (the width of [-1, 1]), MSE over C, H, W of each image;
    the dataset figure is the mean of the per-image values (feed them to MeanAccumulator). Both inputs are
    clamped to [-1, 1] first, as they would be when saved as images. Identical images give +inf (no cap).
    """
    _check_pair(x, y)
    x = x.detach().to(torch.float64).clamp(-1, 1)
    y = y.detach().to(torch.float64).clamp(-1, 1)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(4.0 / mse)  # mse = 0 -> +inf


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) float64 Gaussian weights summing to 1, centred."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(coords**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): (B, C, H, W) images in [-1, 1] -> (B,) float64.

    Images are mapped to [0, 1] (data range L = 1) and clamped. Local statistics use an 11x11 Gaussian window
    with sigma 1.5 over 'valid' positions only (no padding, as in the paper's reference code), per channel, with
    C1 = (0.01 L)^2 and C2 = (0.03 L)^2 and population (not sample) covariances. The SSIM map is averaged over
    channels and positions. H and W must be at least `window_size`.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM with a {window_size}px window needs images of at least {window_size}px, got {tuple(x.shape[-2:])}.")
    x = ((x.detach().to(torch.float64) + 1) / 2).clamp(0, 1)
    y = ((y.detach().to(torch.float64) + 1) / 2).clamp(0, 1)
    # Separable 'valid' Gaussian filtering as two matmuls with banded matrices, (H, H-k+1) and (W, W-k+1):
    # exact, and several times faster than a grouped float64 conv on CPU.
    w = gaussian_window(window_size, sigma).to(x.device)
    band_h, band_w = _valid_band(w, x.shape[-2]), _valid_band(w, x.shape[-1])

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-k+1, W-k+1)
        return band_h.T @ t @ band_w

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def _valid_band(w: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n - k + 1) matrix M with M[i, j] = w[i - j] for 0 <= i - j < k: `t @ M` is a 'valid' 1D filter along t's last axis."""
    k = w.numel()
    d = torch.arange(n, device=w.device)[:, None] - torch.arange(n - k + 1, device=w.device)[None, :]
    return torch.where((d >= 0) & (d < k), w[d.clamp(0, k - 1)], torch.zeros((), dtype=w.dtype, device=w.device))


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) image batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")


class MeanAccumulator:
    """Mean of per-item values over a whole set. State: `sum` and `count` float64 tensors (all-reduce both with sum)."""

    def __init__(self, *, device: str | torch.device = "cpu") -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, values: torch.Tensor) -> None:
        """values: any shape; each element is one item (for example the (B,) output of psnr)."""
        values = values.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum += values.sum()
        self.count += values.numel()

    def merge(self, other: "MeanAccumulator") -> "MeanAccumulator":
        """Add another accumulator's state into this one (returns self)."""
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count.to(self.count.device)
        return self

    @property
    def mean(self) -> float:
        """The mean over every item seen; nan before any update."""
        return (self.sum / self.count).item() if self.count > 0 else math.nan


class CodebookUsage:
    """How a codebook of `num_codes` entries is used over a whole set of code indices.

    State: `counts`, an int64 (num_codes,) tensor of how often each code was seen over every update. Updates
    commute and add, so a split of the data gives the same counts as one pass, and multi-process results
    combine by all-reducing `counts` with sum (or with `merge`).
    """

    def __init__(self, num_codes: int, *, device: str | torch.device = "cpu") -> None:
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}.")
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """indices: integer tensor of any shape (for example (B, h*w)) with values in [0, num_codes)."""
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"code indices must be an integer tensor, got {indices.dtype}.")
        flat = indices.detach().reshape(-1).to(device=self.counts.device, dtype=torch.int64)
        if flat.numel() == 0:
            return
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got values in [{lo}, {hi}].")
        self.counts += torch.bincount(flat, minlength=self.num_codes)

    def merge(self, other: "CodebookUsage") -> "CodebookUsage":
        """Add another accumulator's counts into this one (returns self)."""
        if other.num_codes != self.num_codes:
            raise ValueError(f"cannot merge codebook usage over {other.num_codes} codes into one over {self.num_codes}.")
        self.counts += other.counts.to(self.counts.device)
        return self

    @property
    def total(self) -> int:
        """Number of indices seen."""
        return int(self.counts.sum())

    @property
    def usage(self) -> float:
        """Fraction of codes used at least once, in [0, 1]."""
        return (self.counts > 0).sum().item() / self.num_codes

    @property
    def dead_codes(self) -> int:
        """Number of codes never used."""
        return int((self.counts == 0).sum())

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the empirical code distribution, in [1, num_codes]; nan before any update.

        num_codes means uniform use; 1 means a single code (collapse).
        """
        if self.counts.sum() == 0:
            return math.nan
        return perplexity_from_counts(self.counts.to(torch.float64)).item()
