"""Diffusion prior: embedding normalisation, the network's invariants, the sampler (seeds, CFG, best-of-N),
save/load, and a few training steps on a tiny CLIP's embedding shards."""

import json
import math
from pathlib import Path

import pytest
import torch

from argen.data.registry import build_dataset
from argen.text import dataset_captions, train_text_tokenizer
from argen.unclip.clip import ClipEncoder, TextEncoding
from argen.unclip.diffusion_prior import (
    DiffusionPrior,
    DiffusionPriorArchitecture,
    DiffusionPriorConfig,
    denormalize,
    normalize,
)
from argen.unclip.embeddings import encode_embedding_shard
from argen.unclip.prior_sampling import pick_best_of, sample_diffusion_prior
from argen.unclip.schedulers import training_scheduler

CAPTIONS = ["a red circle", "two blue squares in the top left", "a small green triangle above a yellow circle"]


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig

    tok = train_text_tokenizer(dataset_captions("shapes", limit=2000), vocab_size=400)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, max_position_embeddings=28),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    return ClipEncoder.build(config, tok, text_len=28, seed=0)


def _prior(clip: ClipEncoder, seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    arch = DiffusionPriorArchitecture(n_layer=2, n_head=2, n_embd=32, init_std=0.2)  # an untrained net that reacts to x_t
    return DiffusionPrior(DiffusionPriorConfig(embed_dim=clip.embed_dim, text_width=clip.text_width,
                                               text_len=clip.text_len, architecture=arch)).eval()


def test_normalize_puts_embeddings_on_the_sqrt_d_sphere_and_denormalize_undoes_it():
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 7.0
    x = normalize(e, math.sqrt(64))
    torch.testing.assert_close(x.norm(dim=-1), torch.full((6,), 8.0))
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(6))  # unit mean-square coordinates
    torch.testing.assert_close(denormalize(x), e / e.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(denormalize(x).norm(dim=-1), torch.ones(6))
    assert _prior_config_scale(64) == pytest.approx(8.0)


def _prior_config_scale(dim: int) -> float:
    return DiffusionPriorConfig(embed_dim=dim, text_width=8, text_len=4).embed_scale


def test_forward_shape_and_padding_content_does_not_matter(clip):
    prior = _prior(clip)
    text = clip.encode_text(CAPTIONS)
    assert not text.mask.all(), "the captions must be padded for this test to mean anything"
    x_t, t = torch.randn(3, clip.embed_dim), torch.tensor([0, 500, 999])
    out = prior(x_t, t, text)
    assert out.shape == (3, clip.embed_dim)
    garbage = torch.where(text.mask[..., None], text.states, 100 * torch.randn_like(text.states))
    torch.testing.assert_close(prior(x_t, t, TextEncoding(text.embeds, garbage, text.mask)), out)


def test_dropped_text_ignores_the_caption(clip):
    prior = _prior(clip)
    a, b = clip.encode_text(CAPTIONS), clip.encode_text(list(reversed(CAPTIONS)))
    x_t, t, drop = torch.randn(3, clip.embed_dim), torch.tensor([10, 20, 30]), torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(prior(x_t, t, a, drop_text=drop), prior(x_t, t, b, drop_text=drop))
    assert not torch.allclose(prior(x_t, t, a), prior(x_t, t, b))


def test_cfg_batch_rows_equal_separate_forwards_and_scale_one_is_conditional(clip):
    from argen.sample import classifier_free_guidance

    prior = _prior(clip)
    text = clip.encode_text(CAPTIONS)
    x_t, t = torch.randn(3, clip.embed_dim), torch.tensor([5, 50, 500])
    both = TextEncoding(torch.cat([text.embeds] * 2), torch.cat([text.states] * 2), torch.cat([text.mask] * 2))
    drop = torch.arange(6) >= 3  # [cond; uncond]
    out = prior(torch.cat([x_t, x_t]), torch.cat([t, t]), both, drop_text=drop)
    cond = prior(x_t, t, text)
    torch.testing.assert_close(classifier_free_guidance(out, 1.0), cond, atol=1e-5, rtol=1e-5)
    uncond = prior(x_t, t, text, drop_text=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(classifier_free_guidance(out, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_sampler_is_seeded_and_returns_unit_embeddings(clip, sampler):
    prior = _prior(clip)
    text = clip.encode_text(CAPTIONS)

    def run(seed: int) -> torch.Tensor:
        return sample_diffusion_prior(prior, text, sampler=sampler, steps=4, cfg_scale=2.0,
                                      generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.shape == (3, clip.embed_dim)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(run(0), a, rtol=0, atol=0)
    assert (run(1) - a).abs().max() > 1e-3


def test_cfg_scale_zero_samples_ignore_the_caption(clip):
    prior = _prior(clip)
    a, b = clip.encode_text(CAPTIONS), clip.encode_text(list(reversed(CAPTIONS)))

    def run(text: TextEncoding, scale: float) -> torch.Tensor:
        return sample_diffusion_prior(prior, text, steps=3, cfg_scale=scale, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(run(a, 0.0), run(b, 0.0))
    assert not torch.allclose(run(a, 1.0), run(b, 1.0))


def test_best_of_two_keeps_the_candidate_nearest_the_text_embedding(clip):
    prior = _prior(clip)
    text = clip.encode_text(CAPTIONS)
    best = sample_diffusion_prior(prior, text, steps=3, best_of=2, generator=torch.Generator().manual_seed(0))
    # The same noise, drawn for the captions each repeated twice in a row, gives the two candidates per caption.
    twice = TextEncoding(*(x.repeat_interleave(2, 0) for x in (text.embeds, text.states, text.mask)))
    cands = sample_diffusion_prior(prior, twice, steps=3, generator=torch.Generator().manual_seed(0)).view(3, 2, -1)
    sims = torch.einsum("bnd,bd->bn", cands, torch.nn.functional.normalize(text.embeds, dim=-1))
    torch.testing.assert_close(best, cands[torch.arange(3), sims.argmax(1)])
    assert (cands[:, 0] - cands[:, 1]).abs().max() > 1e-3  # the candidates differ, so the choice is a real one


def test_pick_best_of_on_constructed_candidates():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.0, 1.0], [1.0, 0.1]], [[0.2, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(pick_best_of(cands, text), torch.tensor([[1.0, 0.1], [0.2, 1.0]]))


def test_save_load_gives_identical_predictions(clip, tmp_path):
    prior = _prior(clip, seed=3)
    prior.save_pretrained(tmp_path / "prior")
    loaded = DiffusionPrior.from_pretrained(tmp_path / "prior")
    assert loaded.config == prior.config
    text = clip.encode_text(CAPTIONS)
    x_t, t = torch.randn(3, clip.embed_dim), torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded(x_t, t, text), prior(x_t, t, text), rtol=0, atol=0)


def test_sampler_rejects_bad_arguments(clip):
    prior = _prior(clip)
    text = clip.encode_text(CAPTIONS[:1])
    with pytest.raises(ValueError, match="best_of"):
        sample_diffusion_prior(prior, text, best_of=0)
    with pytest.raises(ValueError, match="sampler='euler'"):
        sample_diffusion_prior(prior, text, sampler="euler")
    with pytest.raises(ValueError, match="text states must be"):
        prior(torch.randn(1, clip.embed_dim), torch.tensor([0]), TextEncoding(text.embeds, text.states[:, :5], text.mask[:, :5]))


def test_training_reduces_the_loss_and_final_records_the_clip(clip, tmp_path):
    from argen.tasks.diffusion_prior import (
        PRIOR_DIR,
        DiffusionPriorExperiment,
        EmbeddingSet,
        denoising_loss,
        train_diffusion_prior,
    )
    from argen.unclip.clip import ClipMismatchError
    from argen.unclip.diffusion_prior import load_diffusion_prior
    from tokenizers_img.config import load_config

    clip.save(tmp_path / "clip")
    for split, size in (("train", 128), ("val", 32)):
        encode_embedding_shard(clip, build_dataset("shapes", split=split, resolution=32, size=size),
                               tmp_path / split, dataset_spec="shapes", split=split)
    experiment = load_config(Path(__file__).parent / "configs/prior_diffusion_tiny.yaml", DiffusionPriorExperiment, [
        f"data.clip={tmp_path / 'clip'}", f"data.train=[{tmp_path / 'train'}]", f"data.val=[{tmp_path / 'val'}]",
        f"train.out_dir={tmp_path / 'run'}", "train.max_steps=40", "train.save_every=0", "train.ema_decay=null"])
    result = train_diffusion_prior(experiment)

    data = EmbeddingSet([str(tmp_path / "train")], clip_sha256=clip.sha256)
    captions, image = data.captions[:64], data.image_embeds[:64]
    text = clip.encode_text(captions)
    scheduler = training_scheduler(experiment.model.schedule)

    @torch.no_grad()
    def loss(prior: DiffusionPrior) -> float:
        x0 = normalize(image, prior.embed_scale)
        return float(denoising_loss(prior, x0, text, scheduler=scheduler, generator=torch.Generator().manual_seed(0)))

    torch.manual_seed(experiment.train.seed)  # train_diffusion_prior's initial weights
    initial = DiffusionPrior(load_diffusion_prior(result.artifacts_dir / PRIOR_DIR, clip=clip).config).eval()
    trained = load_diffusion_prior(result.artifacts_dir / PRIOR_DIR, clip=clip)
    assert loss(trained) < 0.7 * loss(initial)

    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(report["baselines"]) == {"mean_embedding", "nearest_caption"}
    assert {"val/cosine", "val/top1", "val/top5", "val/median_rank", "val/loss"} <= set(result.eval)
    other = ClipEncoder.build(clip.model.config, clip.tokenizer, text_len=clip.text_len, seed=1)
    with pytest.raises(ClipMismatchError, match="trained with CLIP"):
        load_diffusion_prior(result.artifacts_dir / PRIOR_DIR, clip=other)
