"""Speculative Jacobi decoding: the greedy tokens of one token per forward, exactly the model's distribution when
sampling (a chi-square test against the enumerated sequence probabilities), and a cache that holds only what the
committed tokens wrote."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from test_sample import BOI, NUM_CODES, OFFSET, PAD, TEXT_VOCAB, UNCOND, gens, prompts, tiny_model

from argen.model import GPT, GPTConfig, KVCache
from argen.sample import RowNoise, SamplingConfig, classifier_free_guidance, decode_image_tokens, filter_logits
from argen.speculative import SpeculativeDecoder

PARALLEL = ("jacobi", "spatial")


def decode(model, prefix, config, generator=None, *, num_codes=NUM_CODES, **kw):
    return decode_image_tokens(model, prefix, image_offset=OFFSET, num_codes=num_codes, uncond_prefix=UNCOND,
                               config=config, generator=generator, **kw)


@pytest.mark.parametrize("decoding", PARALLEL)
@pytest.mark.parametrize("window", [1, 2, 4, 9, 16])
@pytest.mark.parametrize("cfg_scale, schedule", [(1.0, "constant"), (3.0, "linear")])
def test_greedy_parallel_decoding_gives_the_tokens_of_one_token_per_forward(decoding, window, cfg_scale, schedule):
    model = tiny_model()
    base = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, cfg_schedule=schedule)
    want = decode(model, prompts(5), base)
    got = decode(model, prompts(5), SamplingConfig(**{**base.__dict__, "decoding": decoding, "window": window}))
    assert torch.equal(got.codes, want.codes)
    assert want.forward_passes == 9 and 2 <= got.forward_passes <= 10  # (prefill + at most one step per token)


def constant_model() -> GPT:
    """A model whose logits are all zero, so that greedy decoding draws code 0 everywhere."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.norm.weight.zero_()
    return model


@pytest.mark.parametrize("decoding, passes", [("spatial", 2), ("jacobi", 3)])
def test_parallel_decoding_takes_fewer_forward_passes_where_drafts_hold(decoding, passes):
    """Where every code is the same, copied drafts are right at once (the prefill and one pass); Jacobi drafts start
    uniform and are right after one refinement."""
    model = constant_model()
    config = SamplingConfig(temperature=0.0, decoding=decoding, window=9)
    got = decode(model, prompts(4), config)
    assert torch.equal(got.codes, torch.zeros(4, 9, dtype=torch.long))
    assert got.forward_passes == passes  # of 9 one token at a time


@pytest.mark.parametrize("decoding", PARALLEL)
def test_seeded_runs_repeat_and_rows_draw_from_their_own_generators(decoding):
    model = tiny_model()
    config = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0, decoding=decoding, window=4)
    a = decode(model, prompts(4), config, gens(range(4))).codes
    assert torch.equal(a, decode(model, prompts(4), config, gens(range(4))).codes)
    assert not torch.equal(a, decode(model, prompts(4), config, gens(range(10, 14))).codes)
    alone = decode(model, prompts(4)[2:3], config, gens([2])).codes  # a row alone, with its own generator
    assert torch.equal(alone, a[2:3])


def test_allowed_codes_are_respected():
    model = tiny_model()
    allowed = torch.zeros(9, NUM_CODES, dtype=torch.bool)
    allowed[:, [3, 5]] = True
    allowed[4] = False
    allowed[4, 7] = True  # one allowed code forces it
    for decoding in PARALLEL:
        codes = decode(model, prompts(6), SamplingConfig(decoding=decoding, window=4), torch.Generator().manual_seed(0),
                       allowed_codes=allowed).codes
        assert bool(allowed[torch.arange(9), codes].all()) and bool((codes[:, 4] == 7).all())


# --- the distribution: every sequence of a 2x2 grid over 3 codes, its probability enumerated from the model

K = 3


def small_model() -> GPT:
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=OFFSET + K, prefix_len=4, image_grid=(2, 2), n_layer=2, n_head=2, n_embd=16,
                    init_std=0.4)
    return GPT(cfg).eval()


def sequence_probabilities(model: GPT, prefix: torch.Tensor, config: SamplingConfig) -> dict[tuple, float]:
    """P(codes) for every code sequence, from teacher-forced logits through the samplers' own guidance and filters."""
    N = model.config.num_image_tokens
    seqs = torch.tensor(list(itertools.product(range(K), repeat=N)))  # (K^N, N)
    M = len(seqs)
    rows = torch.cat([prefix.expand(M, -1), seqs[:, :-1] + OFFSET], dim=1)
    uncond = torch.cat([UNCOND.expand(M, -1), seqs[:, :-1] + OFFSET], dim=1)
    with torch.no_grad():
        logits = model(torch.cat([rows, uncond]))[:, -N:, OFFSET:OFFSET + K].float()  # (2M, N, K)
    total = torch.ones(M, dtype=torch.float64)
    for t in range(N):
        step = logits[:, t]
        step = classifier_free_guidance(step, config.scale_at(t, N)) if config.uses_cfg else step[:M]
        probs = torch.softmax(filter_logits(step / config.temperature, top_k=config.top_k, top_p=config.top_p), dim=-1)
        total *= probs[torch.arange(M), seqs[:, t]].double()
    return {tuple(s.tolist()): float(p) for s, p in zip(seqs, total)}


def chi_square_p_value(codes: torch.Tensor, probs: dict[tuple, float]) -> float:
    """Goodness of fit of the sampled sequences to `probs`; cells expected fewer than 5 times are pooled."""
    n = len(codes)
    counts: dict[tuple, int] = {}
    for row in codes.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for seq, p in probs.items():
        if p == 0:  # outside top-k / top-p: never drawn
            assert counts.get(seq, 0) == 0, seq
        elif p * n >= 5:
            observed.append(counts.get(seq, 0))
            expected.append(p * n)
        else:
            pooled_o += counts.get(seq, 0)
            pooled_e += p * n
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    assert sum(observed) == n and len(observed) > 10
    scale = n / sum(expected)  # the probabilities sum to 1 up to float rounding
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


# A false alarm (a correct sampler failing) has probability ALPHA per case; with the seeds fixed, a passing case
# always passes. A sampler off by a few percent on one sequence fails: see the check on "token" with a wrong q below.
ALPHA = 1e-3
CASES = [
    SamplingConfig(temperature=1.0, decoding="jacobi", window=3),
    SamplingConfig(temperature=0.7, top_k=2, cfg_scale=2.0, cfg_schedule="linear", decoding="spatial", window=4),
    SamplingConfig(temperature=1.3, top_p=0.8, cfg_scale=1.5, decoding="jacobi", window=2),
    SamplingConfig(temperature=1.0, cfg_scale=3.0, decoding="spatial", window=3),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.decoding}-w{c.window}-T{c.temperature}-cfg{c.cfg_scale}")
def test_parallel_decoding_samples_exactly_the_models_distribution(config):
    model = small_model()
    prefix = torch.tensor([[3, 7, 2, BOI]])
    probs = sequence_probabilities(model, prefix, config)
    assert abs(sum(probs.values()) - 1) < 1e-6 and max(probs.values()) < 0.5  # a spread-out distribution to test
    M = 30_000
    parallel = decode(small_model(), prefix.expand(M, -1), config, torch.Generator().manual_seed(0), num_codes=K)
    assert chi_square_p_value(parallel.codes, probs) > ALPHA
    token = decode(model, prefix.expand(M, -1), SamplingConfig(**{**config.__dict__, "decoding": "token"}),
                   torch.Generator().manual_seed(1), num_codes=K)
    assert chi_square_p_value(token.codes, probs) > ALPHA  # the reference sampler passes the same test


def test_the_chi_square_check_catches_a_biased_sampler():
    """The test has power: accepting drafts with min(1, p/q) computed from a wrong q (uniform, while the drafts come
    from the model's predictions) biases the result, and the check rejects it."""
    model = small_model()
    prefix = torch.tensor([[3, 7, 2, BOI]])
    config = SamplingConfig(temperature=1.0, decoding="jacobi", window=3)
    probs = sequence_probabilities(model, prefix, config)

    class WrongQ(SpeculativeDecoder):
        def step(self):
            self.q = torch.full_like(self.q, 1.0 / self.K)  # forgets what the drafts were drawn from
            super().step()

    M = 30_000
    rows = prefix.expand(M, -1)
    with torch.inference_mode():
        biased = WrongQ(model, rows, batch_size=M, image_offset=OFFSET, num_codes=K, config=config, banned=None,
                        noise=RowNoise(torch.Generator().manual_seed(0), M), cache_dtype=torch.float32).run()
    assert chi_square_p_value(biased.codes, probs) < ALPHA


# --- the cache


@pytest.mark.parametrize("decoding", PARALLEL)
def test_after_each_step_the_cache_is_what_plain_decoding_of_the_committed_tokens_writes(decoding):
    model, B, P = tiny_model(), 3, 4
    config = SamplingConfig(temperature=1.0, cfg_scale=2.0, decoding=decoding, window=4)
    prefix = prompts(B)
    rows = torch.cat([prefix, UNCOND.expand(B, -1)])
    with torch.inference_mode():
        dec = SpeculativeDecoder(model, rows, batch_size=B, image_offset=OFFSET, num_codes=NUM_CODES, config=config,
                                 banned=None, noise=RowNoise(gens(range(B)), B), cache_dtype=torch.float32)
        rejections = 0
        while dec.B:
            before = dict(zip(dec.index.tolist(), dec.n.tolist()))
            dec.step()  # rows that finish leave the batch; dec.index says which given row each one is
            for b, row in enumerate(dec.index.tolist()):
                done = int(dec.n[b])
                rejections += done - before[row] < min(dec.N - before[row], dec.L)
                for half in range(2):  # its cond row, then its uncond row
                    given = rows[row + half * B]
                    tokens = torch.cat([given, dec.seq[b, : max(done - 1, 0)] + OFFSET])[None]  # what was fed and kept
                    plain = KVCache.allocate(model.config, 1)
                    model(tokens, cache=plain, start=0)
                    valid = tokens.shape[1] if done > 0 else P - 1
                    for layer in range(model.config.n_layer):
                        for mine, ref in ((dec.cache.k, plain.k), (dec.cache.v, plain.v)):
                            torch.testing.assert_close(mine[layer][b + half * dec.B, :, :valid], ref[layer][0, :, :valid],
                                                       rtol=1e-4, atol=1e-5)
    assert rejections > 0  # the random model rejects drafts: the test saw the cache rolled back


def test_parallel_decoding_needs_the_cache_and_checks_its_settings():
    with pytest.raises(ValueError, match="decoding must be one of 'token', 'jacobi', 'spatial', 'zipar', got 'zip'"):
        SamplingConfig(decoding="zip")
    with pytest.raises(ValueError, match=r"window must be in \[1, 256\], got 0"):
        SamplingConfig(window=0)
    with pytest.raises(ValueError, match="needs use_cache=True"):
        decode(tiny_model(), prompts(1), SamplingConfig(decoding="jacobi"), use_cache=False)


def test_nan_logits_are_an_error_in_parallel_decoding_too():
    from argen.sample import NonFiniteSamplingError

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[OFFSET + 3, 0] = float("nan")
    for config in (SamplingConfig(temperature=0.0, decoding="jacobi"), SamplingConfig(decoding="spatial", top_k=4)):
        with pytest.raises(NonFiniteSamplingError, match="NaN token probabilities in 2 of 2 rows"):
            decode(model, prompts(2), config, torch.Generator().manual_seed(0))


assert PAD == 0 and TEXT_VOCAB == 10  # the layout these tests share with test_sample.py
