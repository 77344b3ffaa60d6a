"""AR prior: PCA by variance, quantile buckets, round trips, the dot-product token, save/load, training and sampling."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig

from argen.data.registry import build_dataset
from argen.model.gpt import GPT, GPTConfig
from argen.model.pca import components_for_variance, fit_pca
from argen.sample import SamplingConfig, sample_image_tokens
from argen.tasks.ar_prior import ARPriorExperiment, QuantizerSettings, train_ar_prior
from argen.text import dataset_captions, train_text_tokenizer
from argen.train.loop import ResumeMismatchError
from argen.unclip.ar_prior import EmbeddingQuantizer, QuantizerError
from argen.unclip.ar_prior_sampling import (
    QUANTIZER_DIR,
    ARPrior,
    ARPriorError,
    ARPriorSamplingConfig,
    allowed_tokens,
    sample_ar_prior,
)
from argen.unclip.clip import ClipEncoder
from argen.unclip.embeddings import encode_embedding_shard
from tokenizers_img.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/prior_ar_tiny.yaml"


def data_with_covariance(eigenvalues: list[float], *, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) float64 data whose sample covariance is exactly Q diag(eigenvalues) Q^T for a random rotation Q (returned)."""
    gen = torch.Generator().manual_seed(seed)
    D = len(eigenvalues)
    z = torch.randn(n, D, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(z.T @ z / (n - 1))  # whiten exactly: the sample covariance becomes I
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return z * torch.tensor(eigenvalues, dtype=torch.float64).sqrt() @ q.T + 3.0, q


def sphere_data(n: int = 2000, *, dim: int = 16, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Unit vectors (n, dim) around a mean direction, spread along `rank` directions of decaying scale."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0]
    scales = 0.6 ** torch.arange(rank, dtype=torch.float32)
    x = basis[0] * 2.0 + (torch.randn(n, rank, generator=gen) * scales) @ basis[1:rank + 1]
    return F.normalize(x, dim=-1)


# ------------------------------------------------------------------------------------------------ PCA and buckets
def test_pca_keeps_the_fewest_components_reaching_the_variance():
    eig = [5.0, 3.0, 1.0, 0.5, 0.3, 0.2]  # total 10: cumulative shares 0.5, 0.8, 0.9, 0.95, 0.98, 1.0
    x, q = data_with_covariance(eig)
    for variance, want in ((0.5, 1), (0.5 + 1e-6, 2), (0.8, 2), (0.8 + 1e-6, 3), (0.9, 3), (0.96, 5), (0.99, 6), (1.0, 6)):
        pca = fit_pca(x, variance=variance)
        assert pca.n_components == want, (variance, pca.n_components)
        assert components_for_variance(torch.tensor(eig, dtype=torch.float64), variance) == want
    pca = fit_pca(x, variance=0.9)
    assert torch.allclose(pca.eigenvalues, torch.tensor(eig, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(pca.mean, torch.full((6,), 3.0, dtype=torch.float64), atol=1e-9)
    assert pca.explained_variance == pytest.approx(0.9)
    # the kept components are the rotation's first columns (up to sign), in that order
    assert torch.allclose((pca.components @ q[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert fit_pca(x, n_components=4).n_components == 4
    with pytest.raises(ValueError, match=r"variance must be in \(0, 1\], got 1.5"):
        fit_pca(x, variance=1.5)


def test_tokens_come_in_order_of_decreasing_variance():
    gen = torch.Generator().manual_seed(1)
    stds = torch.tensor([0.05, 0.4, 0.1, 0.8, 0.2, 0.02, 0.6, 0.01])  # axis variances in shuffled order
    x = F.normalize(torch.randn(3000, 8, generator=gen) * stds + torch.tensor([0, 0, 0, 0, 0, 5.0, 0, 0]), dim=-1)
    quantizer = EmbeddingQuantizer.fit(x, num_buckets=32, variance=0.999)
    assert torch.all(quantizer.eigenvalues[:-1] >= quantizer.eigenvalues[1:])
    coords = quantizer.coordinates(x)
    variances = coords.var(0)
    assert torch.all(variances[:-1] >= variances[1:]), variances
    assert quantizer.components[0].abs().argmax() == 3 and quantizer.components[1].abs().argmax() == 6  # std 0.8, 0.6
    codes = quantizer.encode(x).float()
    assert codes.var(0)[0] > 0  # every kept coordinate is spread over its buckets
    assert codes.shape == (3000, quantizer.n_components) and codes.min() >= 0 and codes.max() < 32


def test_bucket_edges_are_quantiles_of_the_training_values():
    x = sphere_data(1600)
    quantizer = EmbeddingQuantizer.fit(x, num_buckets=16)
    codes = quantizer.encode(x)  # (N, C)
    for c in range(quantizer.n_components):
        counts = torch.bincount(codes[:, c], minlength=16)
        assert counts.min() >= 99 and counts.max() <= 101, (c, counts)  # N/K = 100 each
    coords = quantizer.coordinates(x)
    assert torch.allclose(quantizer.bounds[:, 0], coords.min(0).values) and torch.allclose(quantizer.bounds[:, -1], coords.max(0).values)
    # values beyond the training range land in the outer buckets
    far = quantizer.mean + 10 * quantizer.components[0]
    assert quantizer.encode(torch.stack([far, 2 * quantizer.mean - far]))[:, 0].tolist() == [15, 0]


def test_round_trip_is_close_and_improves_with_more_buckets():
    data = sphere_data(3500, seed=0)
    train, val = data[:3000], data[3000:]  # val: the same distribution, rows not fitted on
    cosines, errors = [], []
    for k in (4, 16, 64):
        quantizer = EmbeddingQuantizer.fit(train, num_buckets=k)
        trip = quantizer.round_trip(val)
        assert trip.cosine <= trip.pca_cosine + 1e-4 and trip.relative_mse >= trip.pca_relative_mse - 1e-6
        cosines.append(trip.cosine)
        errors.append(trip.relative_mse)
        decoded = quantizer.decode(quantizer.encode(val))
        assert torch.allclose(decoded.norm(dim=-1), torch.ones(len(val)), atol=1e-5)
        assert float((decoded * val).sum(-1).mean()) == pytest.approx(trip.cosine, abs=1e-6)
        if k == 16:  # per-bucket training means reconstruct better than edge midpoints
            assert quantizer.round_trip(train).cosine > quantizer.round_trip(train, dequantize="midpoint").cosine
    assert cosines[0] < cosines[1] < cosines[2], cosines
    assert trip.pca_relative_mse < 0.01 and trip.relative_mse < trip.pca_relative_mse + 0.002, trip  # K = 64
    assert errors[0] > errors[1] > errors[2], errors
    assert cosines[2] > 0.995 and cosines[0] > 0.9, cosines


# ------------------------------------------------------------------------------------------------ dot-product token
def test_dot_token_is_first_and_top_half_sampling_only_draws_upper_buckets():
    gen = torch.Generator().manual_seed(2)
    images = sphere_data(800, seed=3)
    texts = F.normalize(images + 0.7 * torch.randn(images.shape, generator=gen), dim=-1)
    quantizer = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True)
    codes = quantizer.encode(images, texts)
    assert codes.shape == (800, quantizer.n_components + 1) and quantizer.num_tokens == codes.shape[1]
    assert torch.equal(codes[:, 0], quantizer.dot_codes(images, texts))
    assert torch.equal(codes[:, 1:], quantizer.encode(images, texts)[:, 1:])
    dots = (images * texts).sum(-1)
    median = dots.median()
    upper = codes[:, 0] >= quantizer.upper_dot_buckets(0.5)
    assert quantizer.upper_dot_buckets(0.5) == 4 and bool((dots[upper] >= median).all())  # top half = above the median
    with pytest.raises(QuantizerError, match="needs the text embeddings"):
        quantizer.encode(images)

    allowed = allowed_tokens(quantizer, ARPriorSamplingConfig())
    assert allowed[0].tolist() == [False] * 4 + [True] * 4 and bool(allowed[1:].all())
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20 + 8, prefix_len=3, image_grid=(1, quantizer.num_tokens), n_layer=1, n_head=2, n_embd=16))
    prefix = torch.tensor([[1, 2, 19]] * 64)
    sampled = sample_image_tokens(gpt, prefix, image_offset=20, num_codes=8, allowed_codes=allowed,
                                  generator=torch.Generator().manual_seed(0))
    assert sampled[:, 0].min() >= 4 and len(set(sampled[:, 0].tolist())) > 1  # drawn, not fixed, within the top half
    assert sampled[:, 1:].min() < 4  # the PCA tokens are free
    fixed = allowed_tokens(quantizer, ARPriorSamplingConfig(dot_value=float(dots[7])))
    assert fixed[0].nonzero().flatten().tolist() == [int(codes[7, 0])]  # one bucket: the one dot product 7 falls in
    assert allowed_tokens(quantizer, ARPriorSamplingConfig(dot_quantile=None)) is None
    none_at_0 = allowed.clone()
    none_at_0[0] = False
    with pytest.raises(ValueError, match=r"allows no code at positions \[\[0\]\]"):
        sample_image_tokens(gpt, prefix[:1], image_offset=20, num_codes=8, allowed_codes=none_at_0)


def test_text_embedding_tokens_are_given_first_and_forced_when_sampling():
    gen = torch.Generator().manual_seed(6)
    images = sphere_data(600, seed=7)
    texts = F.normalize(images + 0.5 * torch.randn(images.shape, generator=gen), dim=-1)
    plain = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True)
    quantizer = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True, text_tokens=True)
    C = quantizer.n_components
    assert quantizer.dot_index == C and quantizer.num_tokens == 2 * C + 1
    assert quantizer.text_positions.tolist() == list(range(C))
    assert quantizer.image_positions.tolist() == list(range(C + 1, 2 * C + 1))
    codes = quantizer.encode(images, texts)
    assert torch.equal(codes[:, :C], quantizer.text_codes(texts))
    assert torch.equal(codes[:, C:], plain.encode(images, texts))  # the dot and image tokens are unchanged
    assert torch.equal(quantizer.decode(codes), plain.decode(codes[:, C:]))  # only the image tokens decode
    counts = torch.bincount(codes[:, 0], minlength=8)
    assert counts.min() >= 74 and counts.max() <= 76  # text buckets are quantiles of the training text embeddings

    allowed = allowed_tokens(quantizer, ARPriorSamplingConfig(), text_embeds=texts[:5])
    assert allowed.shape == (5, 2 * C + 1, 8) and bool((allowed[:, :C].sum(-1) == 1).all())
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20 + 8, prefix_len=3, image_grid=(1, quantizer.num_tokens), n_layer=1, n_head=2, n_embd=16))
    sampled = sample_image_tokens(gpt, torch.tensor([[1, 2, 19]] * 5), image_offset=20, num_codes=8,
                                  allowed_codes=allowed, config=SamplingConfig(cfg_scale=2.0),
                                  uncond_prefix=torch.tensor([0, 0, 19]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled[:, :C], codes[:5, :C]) and sampled[:, C].min() >= 4
    with pytest.raises(ARPriorError, match="pass text_embeds"):
        allowed_tokens(quantizer, ARPriorSamplingConfig())


def test_interleaved_layout_puts_text_coordinate_k_before_image_coordinate_k():
    gen = torch.Generator().manual_seed(6)
    images = sphere_data(600, seed=7)
    texts = F.normalize(images + 0.5 * torch.randn(images.shape, generator=gen), dim=-1)
    prefix = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True, text_tokens=True)
    woven = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True, text_tokens=True,
                                   interleave=True)
    C = woven.n_components
    assert woven.dot_index == 0 and woven.num_tokens == prefix.num_tokens == 2 * C + 1
    assert woven.text_positions.tolist() == [1 + 2 * k for k in range(C)]
    assert woven.image_positions.tolist() == [2 + 2 * k for k in range(C)]
    a, b = prefix.encode(images, texts), woven.encode(images, texts)
    assert torch.equal(b[:, 0], a[:, C])                                  # the dot token
    assert torch.equal(b[:, 1::2], a[:, :C])                              # text coordinate k at 1 + 2k
    assert torch.equal(b[:, 2::2], a[:, C + 1:])                          # image coordinate k right after it
    assert torch.equal(woven.decode(b), prefix.decode(a))
    assert woven.round_trip(images) == prefix.round_trip(images)
    allowed = allowed_tokens(woven, ARPriorSamplingConfig(dot_quantile=0.5), text_embeds=texts[:3])
    assert torch.equal(allowed[:, 1::2].float().argmax(-1), b[:3, 1::2]) and bool((allowed[:, 1::2].sum(-1) == 1).all())
    assert allowed[:, 0, :4].sum() == 0 and bool(allowed[:, 0, 4:].all()) and bool(allowed[:, 2::2].all())
    with pytest.raises(ValueError, match="interleave .* needs text_tokens=True"):
        EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, interleave=True)
    with pytest.raises(ValueError, match=r"set quantizer.text_tokens=true, or interleave=false"):
        QuantizerSettings(interleave=True)  # a config typo fails on load, before any CLIP or embedding is read


def test_quantizer_save_load_is_identical(tmp_path):
    images = sphere_data(500, seed=4)
    texts = sphere_data(500, seed=5)
    quantizer = EmbeddingQuantizer.fit(images, text_embeds=texts, num_buckets=8, dot_token=True, text_tokens=True,
                                       dequantize="midpoint")
    quantizer.save_pretrained(tmp_path / "q")
    loaded = EmbeddingQuantizer.from_pretrained(tmp_path / "q")
    assert loaded.config == quantizer.config
    for key, value in quantizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = quantizer.encode(images, texts)
    assert torch.equal(loaded.encode(images, texts), codes)
    assert torch.equal(loaded.decode(codes), quantizer.decode(codes))
    with pytest.raises(QuantizerError, match=r"must be \(N, 16\) CLIP embeddings, got shape \(3, 8\)"):
        loaded.encode(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(QuantizerError, match=r"codes span \[0, 8\], outside \[0, 8\)"):
        loaded.decode(torch.cat([codes[:1], torch.full_like(codes[:1], 8)]))


# ------------------------------------------------------------------------------------------------ training and sampling
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny random CLIP, train/val embedding shards of shapes scenes, and a 30-step AR prior trained on them."""
    root = tmp_path_factory.mktemp("ar_prior")
    bpe = train_text_tokenizer(dataset_captions("shapes", limit=2000), vocab_size=512)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=32),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    clip = ClipEncoder.build(config, bpe, text_len=32)
    clip.save(root / "clip")
    for split, n in (("train", 256), ("val", 64)):
        encode_embedding_shard(clip, build_dataset("shapes", split=split, resolution=32, size=n), root / f"emb/{split}",
                               dataset_spec="shapes", split=split)
    exp = load_config(TINY, ARPriorExperiment, [f"data.clip={root / 'clip'}", f"data.train=[{root / 'emb/train'}]",
                                                f"data.val=[{root / 'emb/val'}]", f"train.out_dir={root / 'run'}"])
    result = train_ar_prior(exp)
    return SimpleNamespace(root=root, clip=clip, exp=exp, result=result)


def test_training_lowers_the_loss_and_writes_an_ar_prior(trained):
    with open(trained.result.metrics_csv) as fh:
        losses = [float(r["loss/gpt"]) for r in csv.DictReader(fh)]
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = json.loads((trained.root / "run/metrics.json").read_text())
    fitted = metrics["quantizer"]
    assert fitted["dim"] == 16 and fitted["explained_variance"] >= 0.99 and fitted["num_buckets"] == 16
    assert 0.9 < fitted["round_trip_cosine"] <= fitted["round_trip_pca_cosine"] + 1e-4
    assert metrics["eval"]["val/loss"] < metrics["eval"]["val/loss_uncond"] + 0.5
    scores = metrics["prior_eval"]
    assert scores["ar_prior/num_candidates"] == 64 and -1 <= scores["ar_prior/cosine"] <= 1
    assert 1 <= scores["ar_prior/median_rank"] <= 64 and 0 <= scores["nearest_caption/top1"] <= 1
    assert scores["mean_embedding/cosine"] > 0.5  # an untrained CLIP's embeddings all point one way
    prior = ARPrior.load(trained.result.artifacts_dir)
    assert prior.clip_sha256 == trained.clip.sha256
    assert prior.layout.text_len == 31 and prior.layout.num_image_tokens == 2 * fitted["n_components"] + 1
    with pytest.raises(FileExistsError, match="already holds checkpoint"):
        train_ar_prior(trained.exp)
    other_buckets = load_config(TINY, ARPriorExperiment, [f"data.clip={trained.root / 'clip'}", "quantizer.num_buckets=8",
                                                          f"data.train=[{trained.root / 'emb/train'}]", "data.val=[]",
                                                          f"train.out_dir={trained.root / 'run'}"])
    with pytest.raises(ResumeMismatchError, match="quantizer/ differs"):
        train_ar_prior(other_buckets, resume=True)


def test_sampling_is_seeded_and_returns_unit_embeddings(trained):
    prior = ARPrior.load(trained.result.artifacts_dir)
    captions = ["a red circle", "two blue squares in the top left", ""]
    text = trained.clip.encode_text(captions).embeds
    config = ARPriorSamplingConfig(tokens=SamplingConfig(cfg_scale=2.0))
    first = sample_ar_prior(prior, captions, text_embeds=text, config=config, generator=torch.Generator().manual_seed(0))
    again = sample_ar_prior(prior, captions, text_embeds=text, config=config, generator=torch.Generator().manual_seed(0))
    other = sample_ar_prior(prior, captions, text_embeds=text, config=config, generator=torch.Generator().manual_seed(1))
    assert first.shape == (3, 16) and torch.equal(first, again) and not torch.equal(first, other)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3), atol=1e-5)
    free = sample_ar_prior(prior, captions, text_embeds=text, config=ARPriorSamplingConfig(dot_quantile=None),
                           generator=torch.Generator().manual_seed(0))
    assert free.shape == (3, 16)
    with pytest.raises(ARPriorError, match="pass text_embeds"):
        sample_ar_prior(prior, captions)


def test_a_prior_with_a_swapped_quantizer_is_refused(trained, tmp_path):
    copy = tmp_path / "prior"
    shutil.copytree(trained.result.artifacts_dir, copy)
    images = sphere_data(300, dim=16)
    other = EmbeddingQuantizer.fit(images, text_embeds=images, num_buckets=16, dot_token=True, text_tokens=True)
    other.save_pretrained(copy / QUANTIZER_DIR)
    with pytest.raises(ARPriorError, match="trained on tokens of quantizer"):
        ARPrior.load(copy)
    with pytest.raises(ARPriorError, match="ar_prior.json missing"):
        ARPrior.load(tmp_path)


def test_config_checks():
    with pytest.raises(ConfigError, match="unknown config key 'model.vocab_size'"):
        load_config(TINY, ARPriorExperiment, ["model.vocab_size=10"])
    with pytest.raises(ConfigError, match=r"quantizer.variance must be in \(0, 1\], got 0.0"):
        load_config(TINY, ARPriorExperiment, ["quantizer.variance=0.0"])
    with pytest.raises(ValueError, match=r"dot_quantile must be in \[0, 1\) or None, got 1.0"):
        ARPriorSamplingConfig(dot_quantile=1.0)
