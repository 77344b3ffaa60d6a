"""Sampler invariants: seeded, batch == each prompt alone, cache == recompute, CFG algebra, top-k/top-p sets, exact draws."""

from __future__ import annotations

import importlib

import pytest
import torch

from argen.model import GPT, GPTConfig, onednn_available, pack_for_cpu
from argen.sample import (
    NonFiniteSamplingError,
    RowNoise,
    SamplingConfig,
    TokenPicker,
    classifier_free_guidance,
    filter_logits,
    sample_image_tokens,
)

gpt_module = importlib.import_module("argen.model.gpt")
TEXT_VOCAB, PAD, NUM_CODES = 10, 0, 16
BOI, OFFSET = TEXT_VOCAB, TEXT_VOCAB + 1  # layout: [text | BOI | codes + OFFSET]


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=OFFSET + NUM_CODES, prefix_len=4, image_grid=(3, 3), n_layer=2, n_head=4,
                    n_kv_head=2, n_embd=32)
    return GPT(cfg).eval()


def prompts(batch: int, *, seed: int = 0) -> torch.Tensor:
    text = torch.randint(1, TEXT_VOCAB, (batch, 3), generator=torch.Generator().manual_seed(seed))
    return torch.cat([text, torch.full((batch, 1), BOI)], dim=1)  # (B, prefix_len)


UNCOND = torch.tensor([PAD, PAD, PAD, BOI])


def sample(model, prefix, config: SamplingConfig | None = None, generator=None, **kw):
    return sample_image_tokens(model, prefix, image_offset=OFFSET, num_codes=NUM_CODES, uncond_prefix=UNCOND,
                               config=config or SamplingConfig(), generator=generator, **kw)


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_codes_are_int64_image_codes_of_the_grid():
    codes = sample(tiny_model(), prompts(3), SamplingConfig(temperature=1.5, cfg_scale=2.0), torch.Generator().manual_seed(0))
    assert codes.shape == (3, 9) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < NUM_CODES


def test_same_seed_same_tokens_and_another_seed_differs():
    model, prefix, cfg = tiny_model(), prompts(4), SamplingConfig(temperature=2.0, top_p=0.95, cfg_scale=3.0)
    a = sample(model, prefix, cfg, torch.Generator().manual_seed(7))
    b = sample(model, prefix, cfg, torch.Generator().manual_seed(7))
    c = sample(model, prefix, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("cfg_scale,schedule", [(1.0, "constant"), (3.0, "constant"), (3.0, "linear")])
def test_a_batch_equals_each_prompt_alone_with_per_prompt_generators(cfg_scale, schedule):
    model, prefix = tiny_model(), prompts(3)
    cfg = SamplingConfig(temperature=1.5, top_k=12, cfg_scale=cfg_scale, cfg_schedule=schedule)
    batch = sample(model, prefix, cfg, gens([10, 11, 12]))
    alone = torch.cat([sample(model, prefix[i : i + 1], cfg, gens([10 + i])) for i in range(3)])
    assert torch.equal(batch, alone)


def test_greedy_batch_equals_each_prompt_alone():
    model, prefix, cfg = tiny_model(), prompts(3), SamplingConfig(temperature=0.0, cfg_scale=2.0)
    batch = sample(model, prefix, cfg)
    assert torch.equal(batch, torch.cat([sample(model, prefix[i : i + 1], cfg) for i in range(3)]))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_sampling_equals_full_recompute(cfg_scale):
    model, prefix = tiny_model(), prompts(2)
    cfg = SamplingConfig(temperature=1.2, top_p=0.9, cfg_scale=cfg_scale)
    cached = sample(model, prefix, cfg, torch.Generator().manual_seed(3))
    recomputed = sample(model, prefix, cfg, torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(cached, recomputed)


def test_cfg_scale_1_is_the_conditional_model_alone():
    """Greedy sampling at cfg_scale 1 equals a hand-written greedy loop over the conditional rows only."""
    model, prefix = tiny_model(), prompts(2)
    codes = sample(model, prefix, SamplingConfig(temperature=0.0, cfg_scale=1.0))
    seq = prefix.clone()
    with torch.no_grad():
        for _ in range(9):
            nxt = model(seq)[:, -1, OFFSET:].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt + OFFSET], dim=1)
    assert torch.equal(codes, seq[:, 4:] - OFFSET)
    # the uncond prefix is ignored at scale 1, whatever it is
    other = sample_image_tokens(model, prefix, image_offset=OFFSET, num_codes=NUM_CODES, uncond_prefix=prefix[0],
                                config=SamplingConfig(temperature=0.0))
    assert torch.equal(codes, other)


def test_uncond_rows_do_not_change_a_token_guided_at_scale_1():
    """The linear schedule guides the first token with scale 1: it must equal the unguided draw, though the
    unconditional rows ran in the same batch."""
    model, prefix = tiny_model(), prompts(4)
    plain = sample(model, prefix, SamplingConfig(temperature=1.0), gens([1, 2, 3, 4]))
    ramped = sample(model, prefix, SamplingConfig(temperature=1.0, cfg_scale=4.0, cfg_schedule="linear"), gens([1, 2, 3, 4]))
    assert torch.equal(plain[:, 0], ramped[:, 0])
    constant = sample(model, prefix, SamplingConfig(temperature=0.0, cfg_scale=4.0))
    assert not torch.equal(constant, sample(model, prefix, SamplingConfig(temperature=0.0)))


def test_classifier_free_guidance_batch_order_and_endpoints():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    both = torch.cat([cond, uncond])  # [cond; uncond]
    torch.testing.assert_close(classifier_free_guidance(both, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(classifier_free_guidance(both, 1.0), cond) and torch.equal(classifier_free_guidance(both, 0.0), uncond)
    with pytest.raises(ValueError, match="even batch"):
        classifier_free_guidance(both[:5], 2.0)


def test_linear_schedule_ramps_from_1_to_cfg_scale():
    cfg = SamplingConfig(cfg_scale=5.0, cfg_schedule="linear")
    assert [cfg.scale_at(t, 5) for t in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert SamplingConfig(cfg_scale=5.0).scale_at(0, 5) == 5.0


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert filter_logits(logits, top_k=5).isfinite().all()


@pytest.mark.parametrize("top_p,kept", [(1e-6, {0}), (0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # shuffle, so the filter must sort
    logits = probs.log()[order].unsqueeze(0)
    out = filter_logits(logits, top_p=top_p)[0]
    assert {int(order[i]) for i in range(4) if out[i].isfinite()} == kept


@pytest.mark.parametrize("top_k,top_p", [(3, None), (4, 0.8), (None, 0.8), (None, None)])
def test_picker_draws_follow_the_filtered_distribution(top_k, top_p):
    """Draws (among the top-k candidates only, with top-k): frequencies match softmax(filter_logits(logits)) over the
    whole vocabulary; filtered codes never appear."""
    logits = torch.tensor([0.0, 2.0, -3.0, 1.0, -1.0]).expand(40000, 5)
    config = SamplingConfig(top_k=top_k, top_p=top_p, temperature=0.8)
    pick = TokenPicker(config, batch_size=40000, vocab=5, device=torch.device("cpu"),
                       generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(pick(logits), minlength=5).float() / 40000
    expected = torch.softmax(filter_logits(logits[:1] / 0.8, top_k=top_k, top_p=top_p), -1)[0]
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    assert counts[expected == 0].sum() == 0


def test_categorical_draws_follow_unnormalised_probabilities_and_never_a_zero():
    """Inverse-CDF draws over (B, T, K): frequencies match probs / sum, codes of probability 0 (first, inner, last)
    never appear, and a uniform at its largest value below 1 still lands on the last code of positive probability."""
    probs = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0]) * 7.0  # unnormalised
    rows, per_row = 4, 20000
    noise = RowNoise(gens(range(rows)), rows)
    draws = noise.categorical(probs.expand(rows, per_row, 6))  # (rows, per_row)
    assert draws.shape == (rows, per_row) and draws.dtype == torch.long
    counts = torch.bincount(draws.flatten(), minlength=6).float() / draws.numel()
    torch.testing.assert_close(counts, probs / probs.sum(), atol=0.01, rtol=0)
    assert counts[probs == 0].sum() == 0
    top = RowNoise(None, 1)
    top.uniform = lambda *shape, device: torch.full((1, *shape), 1.0).nextafter(torch.zeros(()))
    assert top.categorical(probs[None]).item() == 4
    # per-row generators: a row's draws do not depend on the other rows
    alone = RowNoise(gens([2]), 1).categorical(probs.expand(1, per_row, 6))
    assert torch.equal(alone[0], draws[2])


def test_only_image_codes_are_sampled_even_when_text_tokens_dominate():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[:OFFSET] *= 50  # text/BOI logits now dwarf the image-code logits
    prefix = prompts(2)
    greedy = sample(model, prefix, SamplingConfig(temperature=0.0))
    assert greedy.max() < NUM_CODES and greedy.min() >= 0
    # each code is the argmax over the image-code slice given the codes before it, fed back shifted by the offset
    # (text ids 0-10 are valid code values too, so a sampler that ignored image_offset would fail here, not above)
    with torch.no_grad():
        logits = model(torch.cat([prefix, greedy[:, :-1] + OFFSET], dim=1))[:, prefix.shape[1] - 1:]  # (B, N, V)
    assert torch.equal(logits[..., OFFSET:OFFSET + NUM_CODES].argmax(dim=-1), greedy)
    assert not torch.equal(logits.argmax(dim=-1), greedy + OFFSET)  # the unrestricted argmax is a text token


@pytest.mark.skipif(not onednn_available(), reason="oneDNN linears need an x86-64 PyTorch with mkldnn")
def test_a_cpu_packed_model_samples_the_same_codes():
    model, prefix, cfg = tiny_model(), prompts(3), SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    assert torch.equal(sample(pack_for_cpu(model), prefix, cfg, gens([4, 5, 6])), sample(model, prefix, cfg, gens([4, 5, 6])))


@pytest.mark.skipif(not onednn_available(), reason="oneDNN linears need an x86-64 PyTorch with mkldnn")
def test_a_compiled_decode_step_samples_the_same_codes_with_one_graph_for_every_step(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(gpt_module, "KV_CHUNK", 3)  # the cache grows 4 times in the 8 decode steps
    model, prefix, cfg = tiny_model(), prompts(3), SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    compiled = pack_for_cpu(model, compile=True)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = sample(compiled, prefix, cfg, gens([4, 5, 6]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 1  # every step and capacity, one graph
    assert torch.equal(got, sample(model, prefix, cfg, gens([4, 5, 6])))
    assert torch.equal(sample(compiled, prefix, cfg, gens([4, 5, 6])), got)  # reused, still the same draws
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 1


def test_sampling_restores_the_training_mode():
    model = tiny_model().train()
    sample(model, prompts(1), SamplingConfig(temperature=0.0))
    assert model.training


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"temperature": -1.0}, r"temperature must be 0 \(greedy\) or in \[0.0001, 100\], got -1.0"),
        ({"temperature": 1e-45}, r"temperature must be 0 \(greedy\) or in \[0.0001, 100\], got 1e-45"),
        ({"temperature": float("nan")}, "temperature must be 0"),
        ({"temperature": float("inf")}, "temperature must be 0"),
        ({"top_k": 0}, "top_k must be >= 1 or None, got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] or None, got 1.5"),
        ({"cfg_scale": -2.0}, r"cfg_scale must be in \[0, 1000\] \(1 = no guidance\), got -2.0"),
        ({"cfg_scale": 1e38}, "cfg_scale must be in .* got 1e\\+38"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be in"),
        ({"cfg_schedule": "cosine"}, "cfg_schedule must be 'constant' or 'linear', got 'cosine'"),
    ],
)
def test_sampling_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_nan_logits_are_an_error_not_an_image():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[OFFSET + 3, 0] = float("nan")  # one image code's logit is NaN everywhere
    for config in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_k=4)):
        with pytest.raises(NonFiniteSamplingError, match=r"NaN token probabilities in 2 of 2 rows"):
            sample(model, prompts(2), config)


def test_bad_sampler_inputs_raise_with_values():
    model, prefix = tiny_model(), prompts(2)
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs uncond_prefix"):
        sample_image_tokens(model, prefix, image_offset=OFFSET, num_codes=NUM_CODES, config=SamplingConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match=r"prefix must be int64 \(B, prefix_len=4\), got torch.int64 \(2, 3\)"):
        sample(model, prefix[:, :3])
    with pytest.raises(ValueError, match=r"\[11, 28\) must lie inside the model's vocab_size=27"):
        sample_image_tokens(model, prefix, image_offset=OFFSET, num_codes=17)
    with pytest.raises(ValueError, match="got 1 generators for 2 prompts"):
        sample(model, prefix, generator=gens([0]))


def test_masked_padding_decodes_the_same_tokens_with_every_decoder():
    """A model with mask_padding, prompts with pads (and the all-pad unconditional prefix) under CFG: greedy tokens
    are the same with the cache, without it, and with the parallel decoders that are exact when greedy."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=OFFSET + NUM_CODES, prefix_len=4, image_grid=(3, 3), n_layer=2, n_head=4,
                    n_kv_head=2, n_embd=32, mask_padding=True, pad_id=PAD)
    model = GPT(cfg).eval()
    prefix = prompts(3)
    prefix[0, 1:3] = PAD  # captions of 1, 3 and 2 tokens
    prefix[2, 2] = PAD
    greedy = SamplingConfig(temperature=0, cfg_scale=3.0)
    want = sample(model, prefix, greedy)
    assert torch.equal(sample(model, prefix, greedy, use_cache=False), want)
    for decoding, window in (("spatial", 4), ("jacobi", 3), ("zipar", 3)):
        config = SamplingConfig(temperature=0, cfg_scale=3.0, decoding=decoding, window=window)
        assert torch.equal(sample(model, prefix, config), want), decoding
    seeded = sample(model, prefix, SamplingConfig(cfg_scale=3.0), generator=gens(range(3)))
    assert torch.equal(sample(model, prefix[2:], SamplingConfig(cfg_scale=3.0), generator=gens([2])), seeded[2:])
