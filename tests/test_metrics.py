"""PSNR, SSIM and codebook usage: closed forms, a scipy reference, and whole-set accumulation."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tokenizers_img.metrics import CodebookUsage, MeanAccumulator, psnr, ssim


def _images(seed: int, shape=(2, 3, 24, 20)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_psnr_identical_is_inf_and_known_mse_matches_closed_form():
    x = _images(0)
    assert torch.isinf(psnr(x, x)).all()
    y = x.clone()
    y[0] = (x[0] + 0.1).clamp(-1, 1)  # clamping changes some pixels: compute the MSE the metric will see
    y[1] = x[1].clamp(-0.9, 0.9)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3)).double()
    expected = 10 * torch.log10(4.0 / mse)
    assert torch.allclose(psnr(x, y), expected)
    # a uniform offset of d everywhere: PSNR = 10 log10(4 / d^2)
    z = torch.zeros(1, 3, 8, 8)
    assert psnr(z, z + 0.2).item() == pytest.approx(10 * math.log10(4 / 0.04))


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Straightforward SSIM for one (C, H, W) image pair in [0, 1]: scipy Gaussian, valid region, channel mean."""
    sig, trunc, r = 1.5, 3.5, 5  # truncate 3.5 * sigma 1.5 -> radius int(5.25 + 0.5) = 5 -> an 11-tap window
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for a, b in zip(x, y):
        f = lambda t: gaussian_filter(t, sig, truncate=trunc, mode="constant")[r:-r, r:-r]
        mu_a, mu_b = f(a), f(b)
        va, vb, cab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
        m = ((2 * mu_a * mu_b + c1) * (2 * cab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def test_ssim_matches_scipy_reference():
    x = _images(1)
    y = (x + 0.3 * _images(2)).clamp(-1, 1)
    got = ssim(x, y)
    for i in range(x.shape[0]):
        ref = _ssim_reference((x[i].double().numpy() + 1) / 2, (y[i].double().numpy() + 1) / 2)
        assert got[i].item() == pytest.approx(ref, abs=1e-10)


def test_ssim_identity_noise_and_constant_closed_form():
    x = _images(3)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    scores = [ssim(x, (x + s * _images(4)).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1 > scores[0] > scores[1] > scores[2]
    # constant images a, b (in [0, 1] units): variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.25, 0.75, 0.01**2
    xa, xb = torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)
    assert ssim(xa, xb).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11px"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_codebook_usage_accumulates_the_whole_set():
    g = torch.Generator().manual_seed(0)
    k = 64
    batches = [torch.randint(0, 40, (3, 16), generator=g) for _ in range(5)]  # codes 40..63 never used
    acc = CodebookUsage(k)
    for b in batches:
        acc.update(b)
    everything = torch.cat([b.flatten() for b in batches])
    counts = torch.bincount(everything, minlength=k)
    assert torch.equal(acc.counts, counts)
    assert acc.total == everything.numel()
    assert acc.usage == pytest.approx((counts > 0).sum().item() / k)
    assert acc.dead_codes == int((counts == 0).sum()) >= 24
    p = counts[counts > 0].double() / counts.sum()
    assert acc.perplexity == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    # the last batch alone (what a one-batch rolling window would report) uses fewer codes
    last = CodebookUsage(k)
    last.update(batches[-1])
    assert last.usage < acc.usage


def test_codebook_usage_merge_of_halves_equals_whole_and_extremes():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 32, (10, 8), generator=g)
    whole, a, b = CodebookUsage(32), CodebookUsage(32), CodebookUsage(32)
    whole.update(idx)
    a.update(idx[:4])
    b.update(idx[4:])
    assert torch.equal(a.merge(b).counts, whole.counts)
    assert a.perplexity == pytest.approx(whole.perplexity)

    uniform, collapsed = CodebookUsage(8), CodebookUsage(8)
    uniform.update(torch.arange(8).repeat(3))
    collapsed.update(torch.full((20,), 5))
    assert uniform.perplexity == pytest.approx(8.0) and uniform.usage == 1.0 and uniform.dead_codes == 0
    assert collapsed.perplexity == pytest.approx(1.0) and collapsed.usage == 1 / 8 and collapsed.dead_codes == 7
    assert math.isnan(CodebookUsage(8).perplexity)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        collapsed.update(torch.tensor([8]))
    with pytest.raises(ValueError, match="cannot merge"):
        collapsed.merge(CodebookUsage(4))


def test_mean_accumulator_over_splits_equals_mean_of_all():
    vals = torch.linspace(0, 10, 11)
    a, b = MeanAccumulator(), MeanAccumulator()
    a.update(vals[:3])
    b.update(vals[3:])
    assert a.merge(b).mean == pytest.approx(vals.mean().item())
    assert math.isnan(MeanAccumulator().mean)
