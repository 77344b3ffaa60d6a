"""Row-parallel (ZipAR-style) decoding: its schedule, the tokens of one token per forward when rows do not overlap,
and, when they do, the tokens of one masked forward over what it fed (the KV cache and the masks agree)."""

from __future__ import annotations

import pytest
import torch
from test_sample import BOI, OFFSET, UNCOND, gens, prompts

from argen.model import GPT, GPTConfig, KVCache
from argen.model.gpt import RowPositions
from argen.sample import SamplingConfig, classifier_free_guidance, decode_image_tokens
from argen.zipar import zipar_schedule, zipar_visibility

K = 6
GRID = (4, 5)


def grid_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=OFFSET + K, prefix_len=4, image_grid=GRID, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    init_std=0.2)
    return GPT(cfg).eval()


def decode(model, prefix, config, generator=None, **kw):
    return decode_image_tokens(model, prefix, image_offset=OFFSET, num_codes=K, uncond_prefix=UNCOND, config=config,
                               generator=generator, **kw)


def test_the_schedule_of_a_3x4_grid_two_tokens_apart():
    pass_of, source = zipar_schedule((3, 4), 2)
    assert pass_of.tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7]
    # a row's first token reads the last token of the row above decoded by then, (r - 1, 1)
    assert source.tolist() == [-1, 0, 1, 2, 1, 4, 5, 6, 5, 8, 9, 10]
    assert bool((pass_of[source[1:]] == pass_of[1:] - 1).all())  # each input was decoded in the pass before


def test_a_window_of_the_grid_width_is_raster_order():
    for window in (5, 9):
        pass_of, source = zipar_schedule(GRID, window)
        assert torch.equal(pass_of, torch.arange(20)) and torch.equal(source, torch.arange(20) - 1)
        assert torch.equal(zipar_visibility(GRID, window), torch.ones(20, 20, dtype=torch.bool).tril())


@pytest.mark.parametrize("cfg_scale, schedule", [(1.0, "constant"), (3.0, "linear")])
def test_without_overlap_it_gives_the_tokens_of_one_token_per_forward(cfg_scale, schedule):
    model = grid_model()
    base = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, cfg_schedule=schedule)
    want = decode(model, prompts(5), base)
    got = decode(model, prompts(5), SamplingConfig(**{**base.__dict__, "decoding": "zipar", "window": 5}))
    assert torch.equal(got.codes, want.codes)
    assert got.forward_passes == want.forward_passes == 20


def masked_reference_logits(model: GPT, rows: torch.Tensor, codes: torch.Tensor, window: int) -> torch.Tensor:
    """The image logits (R, N, V) of one forward over the prefix and the tokens row-parallel decoding fed, each query
    seeing what it saw then (`zipar_visibility`), the prefix causally."""
    R, P = rows.shape
    _, source = zipar_schedule(GRID, window)
    fed = codes[:, source[1:]] + OFFSET  # (B, N - 1): the input at each image position after BOI
    tokens = torch.cat([rows, fed.repeat(R // len(codes), 1)], dim=1)  # (R, P + N - 1)
    T = tokens.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask[P - 1 :, P - 1 :] = zipar_visibility(GRID, window)
    positions = RowPositions(index=torch.arange(T).expand(R, -1), end=T, mask=mask.expand(R, 1, -1, -1))
    with torch.no_grad():
        return model(tokens, cache=KVCache.allocate(model.config, R), start=positions)[:, P - 1 :]


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_overlapping_rows_give_the_greedy_tokens_of_one_masked_forward(window, cfg_scale):
    model, B = grid_model(), 4
    config = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, decoding="zipar", window=window)
    prefix = prompts(B)
    got = decode(model, prefix, config)
    assert got.forward_passes == (GRID[0] - 1) * window + GRID[1]  # of 20 one token at a time
    rows = torch.cat([prefix, UNCOND.expand(B, -1)]) if cfg_scale != 1.0 else prefix
    logits = masked_reference_logits(model, rows, got.codes, window)[..., OFFSET : OFFSET + K]
    if cfg_scale != 1.0:
        logits = classifier_free_guidance(logits, cfg_scale)
    assert torch.equal(logits.argmax(dim=-1), got.codes)
    plain = decode(model, prefix, SamplingConfig(temperature=0.0, cfg_scale=cfg_scale))
    assert torch.equal(got.codes[:, : GRID[1]], plain.codes[:, : GRID[1]])  # the first row sees what it always saw
    assert not torch.equal(got.codes, plain.codes)  # and the rest is an approximation: it can differ


def test_seeded_runs_repeat_and_rows_draw_from_their_own_generators():
    model = grid_model()
    config = SamplingConfig(temperature=1.0, top_k=4, cfg_scale=2.0, decoding="zipar", window=2)
    a = decode(model, prompts(4), config, gens(range(4))).codes
    assert torch.equal(a, decode(model, prompts(4), config, gens(range(4))).codes)
    assert not torch.equal(a, decode(model, prompts(4), config, gens(range(10, 14))).codes)
    assert torch.equal(decode(model, prompts(4)[2:3], config, gens([2])).codes, a[2:3])


def test_allowed_codes_are_respected():
    allowed = torch.zeros(20, K, dtype=torch.bool)
    allowed[:, [1, 4]] = True
    allowed[7] = False
    allowed[7, 5] = True  # one allowed code forces it
    codes = decode(grid_model(), prompts(6), SamplingConfig(decoding="zipar", window=2), torch.Generator().manual_seed(0),
                   allowed_codes=allowed).codes
    assert bool(allowed[torch.arange(20), codes].all()) and bool((codes[:, 7] == 5).all())


def test_nan_logits_are_an_error():
    from argen.sample import NonFiniteSamplingError

    model = grid_model()
    with torch.no_grad():
        model.lm_head.weight[OFFSET + 3, 0] = float("nan")
    with pytest.raises(NonFiniteSamplingError, match="NaN token probabilities in 2 of 2 rows"):
        decode(model, prompts(2), SamplingConfig(decoding="zipar", window=2), torch.Generator().manual_seed(0))


assert BOI == prompts(1)[0, -1]  # the prefix layout of test_sample.py
