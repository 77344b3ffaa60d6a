"""Bootstrap confidence intervals that resample prompts (not images), shared by every comparison, so several systems
scored on the same prompts can be resampled together and compared pairwise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile bootstrap interval at `level` (0.95: 2.5% and 97.5% quantiles)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def format(self, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        """'52.3% [48.1, 56.0]' style text (scale 100, unit '%')."""
        return (f"{self.estimate * scale:.{digits}f}{unit} [{self.low * scale:.{digits}f}, "
                f"{self.high * scale:.{digits}f}]")


class PromptBootstrap:
    """Resamples of prompt clusters. Images of one prompt share its difficulty, so the resampling unit is the prompt:
    each resample draws len(prompts) prompts with replacement and keeps all images of each draw.

    `groups[i]` is the prompt of item i. The same object applied to several systems' per-image values (aligned on the
    same prompts) gives them the same resamples, so `difference` is a paired bootstrap.
    """

    def __init__(self, groups: Sequence, *, n_boot: int = 1000, seed: int = 0) -> None:
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
        if len(groups) == 0:
            raise ValueError("PromptBootstrap needs at least one item.")
        keys = list(dict.fromkeys(groups))  # prompts in first-seen order
        index = {g: i for i, g in enumerate(keys)}
        codes = np.array([index[g] for g in groups])
        self.members = [np.flatnonzero(codes == c) for c in range(len(keys))]  # item indices of each prompt
        self.num_items, self.n_boot = len(groups), n_boot
        rng = np.random.default_rng(seed)
        self.draws = rng.integers(0, len(keys), size=(n_boot, len(keys)))  # (n_boot, P) prompt draws

    def resample(self, b: int) -> np.ndarray:
        """Item indices of resample b (items of each drawn prompt, repeats kept)."""
        return np.concatenate([self.members[p] for p in self.draws[b]])

    def interval(self, statistic: Callable[[np.ndarray], float], *, level: float = 0.95,
                 recentred: bool = False) -> Interval:
        """`statistic(item_indices) -> float` on all items (the estimate) and on every resample (the interval).

        recentred: keep the resamples' spread around their median but place it at the estimate: [estimate - (median
        - q_low), estimate + (q_high - median)]. For statistics that resampling with repeats biases, such as the
        Fréchet distance (repeated images shrink the covariance and inflate the distance, so plain percentiles can
        lie wholly above the estimate): the shift is an artefact of the repeats, the spread is the sampling noise.
        For an unbiased statistic the median sits at the estimate and both intervals agree.
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}.")
        estimate = float(statistic(np.arange(self.num_items)))
        boots = np.array([statistic(self.resample(b)) for b in range(self.n_boot)], dtype=np.float64)
        low, median, high = np.quantile(boots, [(1 - level) / 2, 0.5, (1 + level) / 2])
        if recentred:
            low, high = estimate - (median - low), estimate + (high - median)
        return Interval(estimate, float(low), float(high), level)

    def mean(self, values: Sequence[float] | np.ndarray, *, level: float = 0.95) -> Interval:
        """Interval of the mean of per-item values (e.g. 0/1 judge verdicts, CLIP scores)."""
        values = self._check(values)
        return self.interval(lambda idx: values[idx].mean(), level=level)

    def difference(self, a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                   level: float = 0.95) -> Interval:
        """Paired interval of mean(a) - mean(b) for two systems' per-item values on the same items."""
        a, b = self._check(a), self._check(b)
        return self.interval(lambda idx: a[idx].mean() - b[idx].mean(), level=level)

    def _check(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.num_items,):
            raise ValueError(f"expected {self.num_items} per-item values (one per image), got shape {values.shape}.")
        return values
