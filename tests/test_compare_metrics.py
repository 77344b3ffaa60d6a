"""Prompt-cluster bootstrap, Fréchet distance, CLIP score and diversity: closed forms and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from argen.eval.clip_metrics import (
    clip_scores,
    feature_statistics,
    features_frechet_distance,
    frechet_distance,
    pairwise_diversity,
)
from argen.eval.stats import PromptBootstrap


def test_bootstrap_resamples_whole_prompts():
    groups = ["a"] * 3 + ["b"] * 2 + ["c"]
    boot = PromptBootstrap(groups, n_boot=50, seed=0)
    for b in range(50):
        idx = boot.resample(b)
        drawn = [groups[i] for i in idx]
        for g in set(drawn):  # a drawn prompt brings all its images, as often as it was drawn
            assert drawn.count(g) % groups.count(g) == 0
        assert drawn.count("a") // 3 + drawn.count("b") // 2 + drawn.count("c") == 3


def test_bootstrap_interval_of_a_constant_is_a_point_and_covers_the_mean():
    groups = [i // 4 for i in range(200)]
    boot = PromptBootstrap(groups, n_boot=300, seed=1)
    const = boot.mean(np.full(200, 0.7))
    assert const.estimate == const.low == const.high == pytest.approx(0.7)
    rng = np.random.default_rng(0)
    values = rng.random(200) < 0.3
    iv = boot.mean(values)
    assert iv.low < iv.estimate < iv.high
    assert iv.estimate == pytest.approx(values.mean())
    # Binomial standard error ~ sqrt(.3 * .7 / 200) = 0.032: a 95% interval spans roughly 4 of them.
    assert 0.06 < iv.high - iv.low < 0.20


def test_paired_difference_of_identical_systems_is_zero_and_of_shifted_ones_is_the_shift():
    groups = [i // 2 for i in range(100)]
    boot = PromptBootstrap(groups, n_boot=200, seed=2)
    a = np.random.default_rng(1).random(100)
    same = boot.difference(a, a)
    assert same.low == same.high == 0.0
    shifted = boot.difference(a + 0.25, a)
    assert shifted.low == pytest.approx(0.25) and shifted.high == pytest.approx(0.25)


def test_recentred_interval_matches_plain_for_a_mean_and_covers_a_frechet_estimate():
    rng = np.random.default_rng(3)
    groups = [i // 2 for i in range(300)]
    boot = PromptBootstrap(groups, n_boot=400, seed=4)
    values = rng.normal(size=300)
    plain = boot.interval(lambda idx: values[idx].mean())
    rc = boot.interval(lambda idx: values[idx].mean(), recentred=True)
    assert abs(rc.low - plain.low) < 0.02 and abs(rc.high - plain.high) < 0.02  # the mean is unbiased
    # Fréchet distance between two samples of one distribution: repeats in a resample shrink its covariance, so
    # nearly every plain resample scores worse than the estimate; the recentred interval keeps the spread and covers it.
    feats, reference = rng.normal(size=(300, 8)), rng.normal(size=(2000, 8))
    ref_stats = feature_statistics(reference)
    fd = lambda idx: frechet_distance(*feature_statistics(feats[idx]), *ref_stats)  # noqa: E731
    plain, rc = boot.interval(fd), boot.interval(fd, recentred=True)
    assert plain.low > plain.estimate  # the flaw being fixed
    assert rc.low < rc.estimate < rc.high and rc.high - rc.low == pytest.approx(plain.high - plain.low)


def test_bootstrap_rejects_misaligned_values():
    boot = PromptBootstrap(["p", "q"], n_boot=5)
    with pytest.raises(ValueError, match="expected 2 per-item values"):
        boot.mean([1.0, 0.0, 1.0])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    assert features_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # Symmetric, and invariant to rotating both sets together.
    y = rng.normal(size=(400, 6)) * 2 + 1
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d = features_frechet_distance(x, y)
    assert features_frechet_distance(y, x) == pytest.approx(d)
    assert features_frechet_distance(x @ q, y @ q) == pytest.approx(d)


def test_frechet_distance_handles_singular_covariances():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 16))  # fewer samples than dimensions: rank-deficient covariances
    y = rng.normal(size=(5, 16))
    mu, sigma = feature_statistics(x)
    # sqrt of the ~1e-16 eigenvalues left by rounding adds ~1e-8 each: zero up to 1e-6 of the trace (~16).
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert features_frechet_distance(x, y) > 0


def test_clip_score_and_diversity():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    i = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(clip_scores(i, t), [100.0, 100 / np.sqrt(2), 0.0])
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    div = pairwise_diversity(e, ["same", "same", "apart", "apart", "alone"])
    assert div["same"] == pytest.approx(0.0)
    assert div["apart"] == pytest.approx(0.0)  # parallel vectors: cosine distance ignores length
    assert "alone" not in div
    div2 = pairwise_diversity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), ["p"] * 3)
    assert div2["p"] == pytest.approx(1 - (0 - 1 + 0) / 3)
