"""unCLIP decoder: forward shapes and checks, CFG rows and null conditions, the seeded samplers and thresholding,
save/load, the training loss going down, and a tiny end-to-end training run that records its CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig

from argen.sample import classifier_free_guidance
from argen.saved import TRAINED_WITH_KEY
from argen.tasks.decoder import (
    DecoderExperiment,
    denoising_loss,
    loss_weights,
    train_decoder,
)
from argen.text import dataset_captions, train_text_tokenizer
from argen.unclip.clip import ClipEncoder, ClipMismatchError, TextEncoding
from argen.unclip.decoder import DecoderArchitecture, DecoderConfig, UnCLIPDecoder, load_decoder
from argen.unclip.decoder_sampling import denoise, initial_noise, sample_decoder
from argen.unclip.schedulers import NoiseSchedule, training_scheduler
from tokenizers_img.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/decoder_tiny.yaml"
CAPTIONS = ["a red circle", "two blue squares", "a small green triangle above a yellow circle"]
D, H = 16, 32  # the tiny CLIP's embed_dim and text width


@pytest.fixture(scope="module")
def clip() -> ClipEncoder:
    bpe = train_text_tokenizer(dataset_captions("shapes", limit=300), vocab_size=400)
    config = CLIPConfig(
        text_config=dict(hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=28),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=D)
    return ClipEncoder.build(config, bpe, text_len=28, seed=0)


def tiny_decoder(*, text: bool = True, seed: int = 0, prediction_type: str = "epsilon") -> UnCLIPDecoder:
    arch = DecoderArchitecture(block_out_channels=(16, 32), attention=(False, True), attention_head_dim=8,
                               context_dim=16, num_image_tokens=2, norm_num_groups=8,
                               schedule=NoiseSchedule(prediction_type=prediction_type))
    torch.manual_seed(seed)
    return UnCLIPDecoder(DecoderConfig(embed_dim=D, resolution=32, text_width=H if text else None,
                                       architecture=arch)).eval()


def inputs(clip: ClipEncoder, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TextEncoding]:
    g = torch.Generator().manual_seed(seed)
    B = len(CAPTIONS)
    x = torch.randn(B, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t, torch.randn(B, D, generator=g), clip.encode_text(CAPTIONS)


def test_forward_shape_and_boundary_errors(clip):
    decoder = tiny_decoder()
    x, t, e, text = inputs(clip)
    assert decoder(x, t, e, text=text).shape == (3, 3, 32, 32)
    assert decoder(x, t[0], e, text=text).shape == (3, 3, 32, 32)  # one timestep for the whole batch
    with pytest.raises(ValueError, match="image_embeds must be"):
        decoder(x, t, torch.randn(3, D + 1), text=text)
    with pytest.raises(ValueError, match="pass text="):
        decoder(x, t, e)
    with pytest.raises(ValueError, match="x_t must be"):
        decoder(x[:, :, :16, :16], t, e, text=text)
    with pytest.raises(ValueError, match="without text conditioning"):
        tiny_decoder(text=False)(x, t, e, text=text)
    assert tiny_decoder(text=False)(x, t, e).shape == (3, 3, 32, 32)


def test_image_embedding_norm_does_not_matter(clip):
    """The decoder reads the direction of the embedding only: raw CLIP output and its unit vector agree."""
    decoder = tiny_decoder()
    x, t, e, text = inputs(clip)
    torch.testing.assert_close(decoder(x, t, e * 7.5, text=text), decoder(x, t, e / e.norm(dim=-1, keepdim=True), text=text))


def test_patch_size_two_runs_on_pixel_unshuffled_images(clip):
    arch = DecoderArchitecture(block_out_channels=(16, 32), attention=(False, True), attention_head_dim=8,
                               context_dim=16, norm_num_groups=8, patch_size=2)
    decoder = UnCLIPDecoder(DecoderConfig(embed_dim=D, resolution=32, architecture=arch))
    assert decoder.unet.config.in_channels == 12 and decoder.unet.config.sample_size == 16
    x, t, e, _ = inputs(clip)
    assert decoder(x, t, e).shape == (3, 3, 32, 32)


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match="same length"):
        DecoderArchitecture(block_out_channels=(32, 64), attention=(True,))
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        DecoderArchitecture(block_out_channels=(24, 64), attention=(False, True))
    with pytest.raises(ValueError, match="resolution=30"):
        DecoderConfig(embed_dim=8, resolution=30, architecture=DecoderArchitecture())
    with pytest.raises(ConfigError, match="text_drop_prb"):
        load_config(TINY, DecoderExperiment, ["text_drop_prb=0.3"])


def test_dropping_uses_the_learned_nulls_and_keeping_ignores_them(clip):
    decoder = tiny_decoder()
    x, t, e, text = inputs(clip)
    keep = torch.zeros(3, dtype=torch.bool)
    only_first = torch.tensor([True, False, False])
    with torch.no_grad():
        base = decoder(x, t, e, text=text, drop_image=keep, drop_text=keep)
        torch.testing.assert_close(base, decoder(x, t, e, text=text))  # all-False drops = no drops
        image_dropped = decoder(x, t, e, text=text, drop_image=only_first)
        text_dropped = decoder(x, t, e, text=text, drop_text=only_first)
        for out in (image_dropped, text_dropped):
            assert not torch.allclose(out[0], base[0], atol=1e-4)  # dropping changes the prediction
            torch.testing.assert_close(out[1:], base[1:])  # only of the dropped row
        decoder.null_image_embed.add_(1.0)
        decoder.null_text_token.add_(1.0)
        torch.testing.assert_close(decoder(x, t, e, text=text), base)  # kept rows never read the nulls
        assert not torch.allclose(decoder(x, t, e, text=text, drop_image=only_first)[0], image_dropped[0], atol=1e-4)
        assert not torch.allclose(decoder(x, t, e, text=text, drop_text=only_first)[0], text_dropped[0], atol=1e-4)
        # a dropped row depends neither on its embedding nor on its caption
        both = torch.ones(3, dtype=torch.bool)
        other_text = clip.encode_text(["a white square", "a cyan circle in the top left", "two red triangles"])
        torch.testing.assert_close(decoder(x, t, e, text=text, drop_image=both, drop_text=both),
                                   decoder(x, t, torch.randn(3, D), text=other_text, drop_image=both, drop_text=both))


def test_cfg_rows_in_one_forward_match_separate_forwards_and_scale_one_is_conditional(clip):
    decoder = tiny_decoder()
    x, t, e, text = inputs(clip)
    doubled = TextEncoding(embeds=torch.cat([text.embeds] * 2), states=torch.cat([text.states] * 2),
                           mask=torch.cat([text.mask] * 2))
    drop = torch.arange(6) >= 3  # [cond; uncond]
    with torch.no_grad():
        both = decoder(torch.cat([x, x]), torch.cat([t, t]), torch.cat([e, e]), text=doubled, drop_image=drop,
                       drop_text=drop)
        cond = decoder(x, t, e, text=text)
        uncond = decoder(x, t, e, text=text, drop_image=~drop[:3], drop_text=~drop[:3])
    torch.testing.assert_close(classifier_free_guidance(both, 1.0), cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(classifier_free_guidance(both, 0.0), uncond, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_sampler_is_seeded(clip, sampler):
    decoder = tiny_decoder()
    _, _, e, text = inputs(clip)

    def run(seed: int) -> torch.Tensor:
        return sample_decoder(decoder, e, text=text, sampler=sampler, steps=4, cfg_scale=2.0,
                              generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all() and a.abs().max() <= 1.0
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))


def test_samplers_differ_and_per_row_generators_make_rows_batch_independent(clip):
    decoder = tiny_decoder()
    _, _, e, text = inputs(clip)
    kwargs = dict(text=text, steps=4, cfg_scale=2.0)
    ddim = sample_decoder(decoder, e, sampler="ddim", generator=torch.Generator().manual_seed(0), **kwargs)
    dpm = sample_decoder(decoder, e, sampler="dpm++", generator=torch.Generator().manual_seed(0), **kwargs)
    assert not torch.allclose(ddim, dpm)
    rows = sample_decoder(decoder, e, sampler="dpm++", generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)],
                          **kwargs)
    alone = sample_decoder(decoder, e[1:2], text=TextEncoding(text.embeds[1:2], text.states[1:2], text.mask[1:2]),
                           sampler="dpm++", steps=4, cfg_scale=2.0, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(rows[1:2], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one per image"):
        initial_noise((3, 3, 32, 32), generator=[torch.Generator()])


def test_thresholding_keeps_the_samples_in_range(clip):
    """A decoder whose predictions are far too large: dynamic thresholding clips every predicted x_0, and
    DPM-Solver++ ends on that x_0, so the unclamped samples stay in [-1, 1]; without it they leave the range."""
    decoder = tiny_decoder()
    with torch.no_grad():
        decoder.unet.conv_out.weight.mul_(200.0)
        decoder.unet.conv_out.bias.add_(3.0)
    _, _, e, text = inputs(clip)
    noise = initial_noise((3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    on = denoise(decoder, noise, e, text=text, sampler="dpm++", steps=5, cfg_scale=2.0, thresholding=True)
    off = denoise(decoder, noise, e, text=text, sampler="dpm++", steps=5, cfg_scale=2.0, thresholding=False)
    assert on.abs().max() <= 1.0 + 1e-6
    assert off.abs().max() > 2.0


class OracleDecoder(torch.nn.Module):
    """Predicts, at every step, the v that points at a fixed x_0 (too bright: 2 * target, outside [-1, 1])."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.config = DecoderConfig(embed_dim=D, resolution=32, architecture=DecoderArchitecture(
            schedule=NoiseSchedule(prediction_type="v_prediction")))
        self.alpha_bar = training_scheduler(self.config.architecture.schedule).alphas_cumprod
        self.x0 = 2.0 * target
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the samplers read the device from the parameters

    def forward(self, x_t, timesteps, image_embeds, *, text=None, drop_image=None, drop_text=None):
        a = self.alpha_bar[timesteps.reshape(-1)].view(-1, 1, 1, 1)
        return (a.sqrt() * x_t - self.x0.expand_as(x_t)) / (1 - a).sqrt()  # x_0 = sqrt(a) x_t - sqrt(1 - a) v


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_thresholded_samplers_converge_to_the_clipped_prediction(sampler):
    """With an oracle that always predicts the same out-of-range x_0, a consistent thresholded sampler ends on that
    x_0 clipped to [-1, 1] (DDIM up to its last step's trace of noise, about 0.03). DDIM must re-derive its epsilon
    from the clipped x_0 for this to hold; without that it lands up to 0.9 away."""
    target = torch.linspace(-0.9, 0.9, 3 * 32 * 32).view(1, 3, 32, 32)
    oracle = OracleDecoder(target)
    noise = initial_noise((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    out = denoise(oracle, noise, torch.randn(2, D), sampler=sampler, steps=10, cfg_scale=1.0, thresholding=True)
    torch.testing.assert_close(out, (2.0 * target).clamp(-1, 1).expand(2, -1, -1, -1), atol=0.05, rtol=0)


def test_save_load_gives_identical_outputs(clip, tmp_path):
    decoder = tiny_decoder(seed=3)
    with torch.no_grad():
        decoder.null_image_embed.add_(0.5)  # a trained-looking state, not the init
    decoder.save_pretrained(tmp_path / "dec")
    back = UnCLIPDecoder.from_pretrained(tmp_path / "dec")
    assert back.config == decoder.config
    x, t, e, text = inputs(clip)
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, e, text=text, drop_image=drop, drop_text=~drop),
                                   decoder(x, t, e, text=text, drop_image=drop, drop_text=~drop), rtol=0, atol=0)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(sample_decoder(back, e, text=text, steps=3, generator=gen()),
                       sample_decoder(decoder, e, text=text, steps=3, generator=gen()))


def test_min_snr_weights():
    scheduler = training_scheduler(NoiseSchedule(prediction_type="epsilon"))
    t = torch.tensor([0, 500, 999])
    assert loss_weights(scheduler, t, min_snr_gamma=None) is None
    w = loss_weights(scheduler, t, min_snr_gamma=5.0)
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(w, (snr.clamp(max=5.0) / snr).float())
    assert w[0] < 1e-3 and w[2] == 1.0  # the nearly clean step is down-weighted, the noisiest keeps weight 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_steps_reduce_the_loss(clip, prediction_type):
    decoder = tiny_decoder(prediction_type=prediction_type).train()
    scheduler = training_scheduler(decoder.config.architecture.schedule)
    images = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, 32, 32) for c in
                          ([1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, -1.0])])
    captions = ["a red square", "a blue square", "a green square", "a yellow square"]
    embeds, text = clip.encode_images(images), clip.encode_text(captions)

    def loss() -> float:
        with torch.no_grad():
            return float(denoising_loss(decoder, images, embeds, text=text, scheduler=scheduler, min_snr_gamma=5.0,
                                        generator=torch.Generator().manual_seed(123)).loss)

    before = loss()
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        out = denoising_loss(decoder, images, embeds, text=text, scheduler=scheduler, image_drop_prob=0.1,
                             text_drop_prob=0.5, min_snr_gamma=5.0, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert loss() < 0.7 * before


def test_per_row_generators_make_the_loss_of_a_row_independent_of_its_batch(clip):
    decoder = tiny_decoder()
    scheduler = training_scheduler(decoder.config.architecture.schedule)
    x, _, e, text = inputs(clip)
    images = x.clamp(-1, 1)

    def loss(rows: list[int]) -> float:
        part = TextEncoding(text.embeds[rows], text.states[rows], text.mask[rows])
        with torch.no_grad():
            return float(denoising_loss(decoder, images[rows], e[rows], text=part, scheduler=scheduler,
                                        image_drop_prob=0.5, text_drop_prob=0.5,
                                        generator=[torch.Generator().manual_seed(10 + r) for r in rows]).loss)

    assert loss([0, 1, 2]) == pytest.approx((loss([0]) + loss([1]) + loss([2])) / 3, rel=1e-4)


def test_train_decoder_records_its_clip_and_evaluates(clip, tmp_path):
    clip.save(tmp_path / "clip")
    exp = load_config(TINY, DecoderExperiment, [f"clip={tmp_path / 'clip'}", f"train.out_dir={tmp_path / 'run'}"])
    result = train_decoder(exp)
    final = result.artifacts_dir / "decoder"
    record = json.loads((final / "config.json").read_text())[TRAINED_WITH_KEY]
    assert record["clip_sha256"] == clip.sha256 and record["clip_path"] == str(tmp_path / "clip")
    for key in ("val/loss", "val/mse", "val/psnr", "val/clip_cosine", "val/judge_agreement", "val/judge_correct", "val/attr/count"):
        assert key in result.eval
    assert result.eval["val/num_images"] == 4 and 0.0 <= result.eval["val/judge_agreement"] <= 1.0
    decoder = load_decoder(final, clip=ClipEncoder.load(tmp_path / "clip"))
    assert decoder.config.text_width == clip.text_width and decoder.config.embed_dim == clip.embed_dim
    other = ClipEncoder.build(CLIPConfig(text_config=clip.model.config.text_config.to_dict(),
                                         vision_config=clip.model.config.vision_config.to_dict(), projection_dim=D),
                              clip.tokenizer, text_len=28, seed=1)
    with pytest.raises(ClipMismatchError, match="trained with CLIP"):
        load_decoder(final, clip=other)


def test_a_decoder_that_produces_nan_is_an_error_not_an_image(clip):
    from argen.sample import NonFiniteSamplingError
    from argen.unclip.pipeline import DecoderSampling, UnclipPipeline, UnclipSampling

    decoder = tiny_decoder()
    pipe = UnclipPipeline(clip=clip, decoder=decoder)
    sampling = UnclipSampling(prior="none", decoder=DecoderSampling(steps=2))
    assert pipe.generate(CAPTIONS[:1], sampling=sampling).images.isfinite().all()
    with torch.no_grad():
        next(p for p in decoder.parameters() if p.ndim == 4).fill_(float("nan"))
    with pytest.raises(NonFiniteSamplingError, match="produced non-finite values .* no image was made"):
        pipe.generate(CAPTIONS[:1], sampling=sampling)
