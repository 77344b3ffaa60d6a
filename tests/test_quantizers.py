"""Invariants of the quantizers: straight-through gradients, loss terms, k-means, dead codes, EMA, FSQ, DDP sync."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tokenizers_img import FSQuantizer, QuantizerOutput, VectorQuantizer
from tokenizers_img.quantizers import ProductQuantizer


def _vq(**kw) -> VectorQuantizer:
    args = dict(dim=4, codebook_size=16, l2_normalize=False, kmeans_init=False, dead_code_threshold=0)
    args.update(kw)
    return VectorQuantizer(**args)


def _clustered(n_per: int, centers: torch.Tensor, *, noise: float, seed: int) -> torch.Tensor:
    """(K*n_per, D) points around `centers`, returned as a (1, D, 1, N) feature map."""
    g = torch.Generator().manual_seed(seed)
    pts = centers.repeat_interleave(n_per, 0) + noise * torch.randn(len(centers) * n_per, centers.shape[1], generator=g)
    return pts.t().reshape(1, centers.shape[1], 1, -1)


def test_output_shapes_and_types():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 5)
    for q in (_vq(), FSQuantizer(levels=(8, 5, 5, 5))):
        out = q(z)
        assert isinstance(out, QuantizerOutput)
        assert out.quantized.shape == (2, 4, 3, 5) and out.quantized.dtype == torch.float32
        assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.num_codes
        assert out.loss.ndim == 0 and out.perplexity.ndim == 0
        assert 1.0 <= float(out.perplexity) <= q.num_codes + 1e-4
        assert torch.equal(q.codes_to_vectors(out.indices), out.quantized)
        assert torch.equal(q.encode(z), out.indices)


def test_straight_through_gradient_reaches_z_only():
    torch.manual_seed(0)
    q = _vq()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    weights = torch.randn_like(out.quantized)
    (out.quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)  # identity Jacobian: the decoder's gradient is copied to z
    assert q.codebook.grad is None  # the reconstruction gradient never reaches the codebook


def test_beta_weights_the_commitment_term():
    """VQ-VAE eq. 3: codebook term ||sg[z] - q||^2 moves the codes; beta * ||z - sg[q]||^2 moves the encoder."""
    torch.manual_seed(0)
    beta = 0.25
    q = _vq(beta=beta)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.loss, out.commit_loss + out.codebook_loss)
    # The two terms have the same unweighted value; only the commitment one carries beta.
    assert torch.allclose(out.commit_loss, beta * out.codebook_loss)

    out.commit_loss.backward(retain_graph=True)
    assert q.codebook.grad is None  # commitment does not train the codebook
    grad_z_commit = z.grad.clone()
    z.grad = None
    out.codebook_loss.backward()
    assert z.grad is None  # the codebook term does not train the encoder
    grad_codes = q.codebook.grad

    n = z.numel()
    zq = out.quantized.detach()
    assert torch.allclose(grad_z_commit, beta * 2 * (z.detach() - zq) / n, atol=1e-7)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    flat_q = zq.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(q.codebook).index_add_(0, out.indices.flatten(), 2 * (flat_q - flat_z) / n)
    assert torch.allclose(grad_codes, expected, atol=1e-7)  # no beta on the codebook term


def test_l2_normalised_codes_have_unit_norm_and_cosine_lookup():
    torch.manual_seed(0)
    q = _vq(l2_normalize=True, codebook_size=32)
    z = 5 * torch.randn(2, 4, 4, 4)
    out = q(z)
    norms = out.quantized.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # Lookup by cosine: the chosen code maximises the cosine similarity with z.
    cos = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1) @ F.normalize(q.codebook, dim=-1).t()
    assert torch.equal(out.indices.flatten(), cos.argmax(-1))
    vecs = q.codes_to_vectors(torch.arange(32).view(1, 4, 8))
    assert torch.allclose(vecs.norm(dim=1), torch.ones(1, 4, 8), atol=1e-5)


def test_kmeans_init_places_codes_on_data_centroids():
    torch.manual_seed(0)
    centers = 4 * torch.randn(8, 4)
    z = _clustered(32, centers, noise=0.1, seed=1)
    flat = z[0, :, 0].t()  # (N, D)

    q = _vq(codebook_size=8, kmeans_init=True, kmeans_iters=20)
    assert not bool(q.initialized) and "initialized" in q.state_dict()
    random_distortion = torch.cdist(flat, q.codebook.detach()).min(-1).values.pow(2).mean()
    q.train()(z)
    assert bool(q.initialized)
    codes = q.codebook.detach()
    distortion = torch.cdist(flat, codes).min(-1).values.pow(2).mean()
    assert distortion < 0.05 * random_distortion
    # A converged codebook: every code is the mean of the samples assigned to it.
    assign = torch.cdist(flat, codes).argmin(-1)
    for k in assign.unique():
        assert torch.allclose(codes[k], flat[assign == k].mean(0), atol=1e-4)
    before = codes.clone()
    q(z)  # k-means runs once only
    assert torch.equal(before, q.codebook.detach())


def test_kmeans_init_on_the_sphere_gives_unit_centroids():
    torch.manual_seed(0)
    z = _clustered(16, torch.randn(8, 4), noise=0.05, seed=2)
    q = _vq(codebook_size=8, kmeans_init=True, l2_normalize=True)
    q.train()(z)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(8), atol=1e-5)


def _dead_codebook_quantizer(**kw) -> VectorQuantizer:
    q = _vq(codebook_size=16, dead_code_threshold=2, **kw)
    with torch.no_grad():
        q.codebook.copy_(100.0 + torch.arange(16.0).unsqueeze(-1).expand(16, 4))
        q.codebook[0] = 0.0  # the only code near the data
        if q.ema:
            q.embed_sum.copy_(q.codebook)  # cluster_size is 1: the EMA state matches the codebook
    return q.train()


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_dead_code_restart_revives_codes():
    q = _dead_codebook_quantizer()
    used = [q(_batch(s)).indices.unique().numel() for s in range(2)]
    assert used == [1, 1]
    assert q.num_dead_codes(unused_for=2) == 15
    torch.manual_seed(0)
    out = q(_batch(2))  # restart at the start of this step, then quantize
    assert out.indices.unique().numel() > 8
    assert q.num_dead_codes(unused_for=1) < 8
    assert float(q.codebook.detach().abs().max()) < 10  # every dead code now sits on an encoder output


def test_dead_code_restarts_land_where_the_codebook_fits_worst():
    # 95% of the vectors sit on one point that a live code already fits exactly; 5% are spread far away.
    # Uniform restarts would put ~95% of the revived codes on the dense point; D^2 draws put none there.
    g = torch.Generator().manual_seed(0)
    dense = torch.zeros(950, 4)
    rare = 5 + torch.randn(50, 4, generator=g)
    z = torch.cat([dense, rare]).t().reshape(1, 4, 1, -1)
    q = _vq(dead_code_threshold=1)
    with torch.no_grad():
        q.codebook.zero_()  # every code on the dense point: one is used, the rest die after a step
    q(z)
    live = q.steps_since_used == 0
    assert int(live.sum()) == 1
    q(z, generator=torch.Generator().manual_seed(1))
    revived = q.codebook.detach()[~live]
    assert revived.norm(dim=-1).min() > 1.0  # every revived code is a far (rare) vector, none the dense point


def test_dead_code_restart_is_deterministic_given_the_rng():
    def run(seed: int, *, use_generator: bool) -> torch.Tensor:
        q = _dead_codebook_quantizer(ema=True)
        if use_generator:
            g = torch.Generator().manual_seed(seed)
            for s in range(3):
                q(_batch(s), generator=g)
        else:
            torch.manual_seed(seed)
            for s in range(3):
                q(_batch(s))
        return q.codebook.clone()

    assert torch.equal(run(0, use_generator=False), run(0, use_generator=False))
    assert torch.equal(run(5, use_generator=True), run(5, use_generator=True))
    assert not torch.equal(run(5, use_generator=True), run(6, use_generator=True))


def test_ema_moves_codes_toward_assigned_means():
    torch.manual_seed(0)
    decay = 0.5
    q = _vq(codebook_size=4, ema=True, ema_decay=decay)
    assert "codebook" not in dict(q.named_parameters())  # EMA codebooks are buffers, untouched by the optimizer
    centers = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 3.0]])
    with torch.no_grad():
        q.codebook.copy_(centers)
        q.embed_sum.copy_(centers)  # cluster_size starts at 1, so embed_sum / cluster_size is the codebook
    z = _clustered(16, centers + 0.5, noise=0.1, seed=3)
    flat = z[0, :, 0].t()
    out = q.train()(z)
    assert float(out.codebook_loss) == 0.0
    for k in range(4):
        members = flat[out.indices.flatten() == k]
        mean = members.mean(0)
        # N <- g N + (1-g) n ; m <- g m + (1-g) sum z ; e = m / N  (Laplace smoothing is ~1e-5 here)
        expected = (decay * centers[k] + (1 - decay) * members.sum(0)) / (decay + (1 - decay) * len(members))
        assert torch.allclose(q.codebook[k], expected, atol=1e-3)
        assert (q.codebook[k] - mean).norm() < (centers[k] - mean).norm()


def test_rotation_trick_value_equals_code_and_gradient_is_rotated():
    torch.manual_seed(0)
    q = _vq(rotation_trick=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.quantized, q.codes_to_vectors(out.indices), atol=1e-5)
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward()
    assert torch.isfinite(z.grad).all() and not torch.allclose(z.grad, w)


def test_quantizer_math_stays_fp32_under_autocast():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 4, 4)
    for q in (_vq(l2_normalize=True), FSQuantizer(levels=(8, 5, 5, 5))):
        ref = q.eval()(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z.bfloat16().float())
        assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
        assert torch.equal(out.indices, ref.indices)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 4, 3, 6)])
def test_fsq_indices_codes_bijection(levels):
    q = FSQuantizer(levels=levels)
    assert q.num_codes == math.prod(levels) and q.dim == len(levels)
    idx = torch.arange(q.num_codes).view(1, 1, -1)
    vecs = q.codes_to_vectors(idx)  # (1, D, 1, K)
    assert vecs.abs().max() <= 1.0
    assert torch.unique(vecs[0, :, 0].t(), dim=0).shape[0] == q.num_codes  # injective
    # Invert the bound: z with tanh(z + shift) * half_l - offset == code integer exactly -> encode gives idx back.
    c = q.grid_constants()
    ints = vecs.permute(0, 2, 3, 1) * c.half_width
    z = torch.atanh((ints + c.offset) / c.half_l) - c.shift
    assert torch.equal(q.encode(z.permute(0, 3, 1, 2)), idx)


def test_fsq_each_channel_takes_exactly_its_levels():
    """Even levels need the half-offset: L=4 must give the 4 integers -2..1, not 3 or 5 values."""
    levels = (2, 3, 4, 5, 8)
    q = FSQuantizer(levels=levels)
    sweep = torch.linspace(-12, 12, 4001)
    z = sweep.view(1, 1, 1, -1).expand(1, len(levels), 1, -1)
    vecs = q(z).quantized[0, :, 0]  # (D, N)
    for d, lv in enumerate(levels):
        values = torch.unique(vecs[d] * (lv // 2))
        assert values.tolist() == list(range(-(lv // 2), lv - lv // 2)), (lv, values.tolist())
    # z = 0 lands on code 0 in every channel.
    assert torch.equal(q(torch.zeros(1, len(levels), 1, 1)).quantized.flatten(), torch.zeros(len(levels)))


def test_fsq_straight_through_gradient():
    q = FSQuantizer(levels=(8, 5, 5, 5))
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    q(z).quantized.sum().backward()
    assert (z.grad > 0).all()


def test_a_product_quantizer_pairs_the_codes_of_its_two_channel_groups():
    """Code = a * 5 + b with a the first VQ's code of channels [0, 3) and b the second's of [3, 5); codes_to_vectors
    gives back what forward quantized, and the losses are the two VQs' sums."""
    torch.manual_seed(0)
    first, second = VectorQuantizer(dim=3, codebook_size=7), VectorQuantizer(dim=2, codebook_size=5)
    pq = ProductQuantizer(first, second).eval()
    assert (pq.dim, pq.num_codes) == (5, 35)
    z = torch.randn(2, 5, 4, 4)
    out = pq(z)
    a, b = first(z[:, :3]), second(z[:, 3:])
    assert torch.equal(out.indices, a.indices * 5 + b.indices) and torch.equal(pq.encode(z), out.indices)
    torch.testing.assert_close(pq.codes_to_vectors(out.indices), out.quantized)
    torch.testing.assert_close(out.loss, a.loss + b.loss)
    with pytest.raises(ValueError, match=r"\[0, 35\), got min 35, max 35"):
        pq.codes_to_vectors(torch.tensor([[[35]]]))


def test_indices_are_validated():
    q = _vq()
    with pytest.raises(ValueError, match=r"\[0, 16\).*max 16"):
        q.codes_to_vectors(torch.tensor([[[16]]]))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\).*\(2, 3, 4, 4\)"):
        q(torch.randn(2, 3, 4, 4))


# ----- two processes (gloo): k-means init and dead-code restarts must leave identical codebooks -----


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for ema in (False, True):
            torch.manual_seed(0)  # same initial weights on every rank
            q = VectorQuantizer(dim=4, codebook_size=32, ema=ema, kmeans_init=True, kmeans_iters=5, dead_code_threshold=1)
            q.train()
            torch.manual_seed(1000 + rank)  # different RNG streams per rank: draws must come from rank 0 only
            for step in range(4):
                g = torch.Generator().manual_seed(10 * step + rank)
                z = torch.randn(2 + rank, 4, 3, 3, generator=g) + rank  # different data and batch sizes per rank
                q(z)
            results[f"codebook_ema{int(ema)}"] = q.codebook.detach().clone()
            results[f"usage_ema{int(ema)}"] = q.steps_since_used.clone()
            if ema:
                results["cluster_size"] = q.cluster_size.clone()
        save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method unavailable")
def test_two_process_codebooks_stay_identical(tmp_path):
    # fork, not spawn: spawned children re-import torch, which costs ~10 s on a busy 2-core machine.
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
