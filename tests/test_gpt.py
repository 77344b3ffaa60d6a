"""GPT invariants: cached decoding == full forward, batch == rows alone, 2-D RoPE, strict save/load, checkpointing, config checks."""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import math

import pytest
import torch

from argen.model import GPT, GPTConfig, KVCache, available_backends, flops_per_token
from argen.model.gpt import apply_rope, rope_positions, rope_tables
from argen.model.inference import BF16Linear, PackedLinear, bf16_blocks, pack_for_cpu
from argen.model.onednn import ONEDNN_MIN_MACS, WGRAD_BLAS_ROWS, Linear, onednn_available, use_onednn_linears
from tokenizers_img.config import from_dict, to_dict

gpt_module = importlib.import_module("argen.model.gpt")


def tiny(**kw) -> GPTConfig:
    args = {"vocab_size": 40, "prefix_len": 5, "image_grid": (3, 4), "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32}
    args.update(kw)
    return GPTConfig(**args)


def model_of(cfg: GPTConfig, *, seed: int = 0) -> GPT:
    """Seeded model in eval mode; with code_features, random features for every token but the first (text) one."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    if cfg.code_features:
        with torch.no_grad():
            model.code_feat[1:] = torch.randn(cfg.vocab_size - 1, cfg.code_features)
    return model


def tokens(cfg: GPTConfig, batch: int = 2, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_derived_sizes():
    cfg = tiny()
    assert cfg.block_size == 5 + 12 - 1 and cfg.head_dim == 8 and cfg.kv_heads == 2 and cfg.ffn_dim == 128  # 85.3 rounded up to 64s
    assert tiny(n_embd=96, n_head=4).ffn_dim == 256  # 8/3 * 96 = 256 exactly
    assert tiny(n_kv_head=None).kv_heads == 4
    logits = model_of(cfg)(tokens(cfg))
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size) and logits.dtype == torch.float32


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("n_kv_head, abs_pos_emb, code_features, code_factors",
                         [(4, False, 0, None), (2, False, 0, None), (1, False, 0, None), (2, True, 0, None),
                          (2, False, 6, None), (2, False, 0, (6, 4)), (2, False, 6, (6, 4))])
def test_cached_decoding_equals_full_forward(backend, n_kv_head, abs_pos_emb, code_features, code_factors):
    cfg = tiny(n_kv_head=n_kv_head, attn_backend=backend, abs_pos_emb=abs_pos_emb, code_features=code_features,
               code_factors=code_factors)
    model, idx = model_of(cfg), tokens(cfg)
    with torch.no_grad():
        full = model(idx)
        # prefill the prefix, then one token at a time
        cache = KVCache.allocate(cfg, 2)
        steps = [model(idx[:, : cfg.prefix_len], cache=cache, start=0)]
        steps += [model(idx[:, t : t + 1], cache=cache, start=t) for t in range(cfg.prefix_len, cfg.block_size)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        # uneven chunks (T > 1 with start > 0) reach the same logits
        cache = KVCache.allocate(cfg, 2)
        bounds = [0, 3, 4, 9, cfg.block_size]
        chunks = [model(idx[:, a:b], cache=cache, start=a) for a, b in itertools.pairwise(bounds)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("mask_padding", [False, True])
def test_the_cache_grows_in_chunks_and_a_decode_step_reads_its_whole_contiguous_capacity(monkeypatch, backend,
                                                                                         mask_padding):
    monkeypatch.setattr(gpt_module, "KV_CHUNK", 3)
    cfg = tiny(attn_backend=backend, mask_padding=mask_padding, pad_id=0)
    model, idx = model_of(cfg), tokens(cfg)
    idx[0, 2] = 0  # a pad in row 0's caption
    seen = []  # (keys, contiguous) of each one-query attention call
    real_attention = gpt_module.attention

    def spy(q, k, v, **kw):
        if q.shape[2] == 1:
            seen.append((k.shape[2], k.is_contiguous() and v.is_contiguous()))
        return real_attention(q, k, v, **kw)

    monkeypatch.setattr(gpt_module, "attention", spy)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(cfg, 2)
        assert cache.capacity == 3
        steps = [model(idx[:, : cfg.prefix_len], cache=cache, start=0)]
        capacities = [cache.capacity]
        for t in range(cfg.prefix_len, cfg.block_size):
            steps.append(model(idx[:, t : t + 1], cache=cache, start=t))
            capacities.append(cache.capacity)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert capacities == [6, 6, 9, 9, 9, 12, 12, 12, 15, 15, 15, 16]  # whole chunks up to block_size = 16
    assert seen == [(c, True) for c in capacities[1:] for _ in range(cfg.n_layer)]
    assert cache.rows(torch.tensor([1])).capacity == 16 and cache.rows(torch.tensor([1])).max_length == 16
    with pytest.raises(ValueError, match="the KVCache holds at most 16 positions, asked for 17"):
        cache.reserve(17)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_a_bfloat16_cache_under_float32_weights_stays_close_to_the_full_forward(backend):
    cfg = tiny(attn_backend=backend)
    model, idx = model_of(cfg), tokens(cfg)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(cfg, 2, dtype=torch.bfloat16)
        steps = [model(idx[:, : cfg.prefix_len], cache=cache, start=0)]
        steps += [model(idx[:, t : t + 1], cache=cache, start=t) for t in range(cfg.prefix_len, cfg.block_size)]
    out = torch.cat(steps, dim=1)
    assert out.dtype == torch.float32 and {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per key/value): logits move by ~1e-3 of their scale, not more.
    err = (out - full).abs().max() / full.abs().max()
    assert 0 < err < 1e-2


def test_backends_give_the_same_model_outputs_and_gradients():
    outs, grads = [], []
    for backend in available_backends("cpu"):
        model = model_of(tiny(attn_backend=backend))
        logits = model(tokens(model.config))
        logits.square().mean().backward()
        outs.append(logits.detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-6)


def test_a_batch_equals_each_row_alone_and_is_causal():
    cfg = tiny()
    model, idx = model_of(cfg), tokens(cfg, 3)
    with torch.no_grad():
        batch = model(idx)
        for i in range(3):
            torch.testing.assert_close(model(idx[i : i + 1]), batch[i : i + 1], rtol=1e-5, atol=1e-5)
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % cfg.vocab_size
        torch.testing.assert_close(model(changed)[:, :9], batch[:, :9])
        assert not torch.allclose(model(changed)[:, 9:], batch[:, 9:])


def test_absolute_position_table_adds_to_the_token_embedding():
    rope_only = model_of(tiny())
    both = GPT(tiny(abs_pos_emb=True)).eval()
    missing, unexpected = both.load_state_dict(rope_only.state_dict(), strict=False)
    assert missing == ["pos_emb.weight"] and not unexpected
    idx = tokens(tiny())
    with torch.no_grad():
        both.pos_emb.weight.zero_()
        torch.testing.assert_close(both(idx), rope_only(idx))  # a zero table is the RoPE-only model
        both.pos_emb.weight[7].fill_(1.0)  # moving one position's embedding changes logits from there on only
        diff = (both(idx) - rope_only(idx)).abs().amax(dim=(0, 2))
    assert diff[:7].max() == 0 and diff[7:].min() > 0


def test_code_features_let_codes_that_look_alike_share_what_is_learned():
    """One SGD step towards code a raises the logit of code b, which never was a target but has a's features,
    by more than half as much as a's, and lowers that of code c (the opposite features); without code features b
    hardly moves. Logit changes are taken relative to their mean over the vocabulary (softmax ignores a shift)."""
    a, b, c = 20, 30, 35
    idx = tokens(tiny(), batch=4)[:, :-1]
    target = torch.full_like(idx, a)

    def logit_rise(code_features: int) -> tuple[float, float]:
        model = model_of(tiny(code_features=code_features, init_std=0.1))
        if code_features:
            with torch.no_grad():
                model.code_feat[b] = model.code_feat[a]
                model.code_feat[c] = -model.code_feat[a]
        before = model(idx).detach()
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten())
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
            rise = (model(idx) - before).mean(dim=(0, 1))
            rise -= rise.mean()  # softmax ignores a shift of all logits
        return float(rise[a]), float(rise[b]), float(rise[c])

    rise_a, rise_b, rise_c = logit_rise(6)
    assert rise_a > 0 and rise_b > 0.5 * rise_a and rise_c < 0, (rise_a, rise_b, rise_c)
    plain_a, plain_b, _ = logit_rise(0)
    assert plain_a > 0 and plain_b < 0.2 * plain_a, (plain_a, plain_b)


def test_factored_codes_embed_as_sums_and_predict_structure_then_colour():
    """With code_factors (a, b) = (6, 4) the last 24 tokens are codes i * 4 + j: the embedding of code (i, j) is
    the sum of rows i and a + j; its logit is log p(i) + log p(j | i), the structure head's softmax plus the colour
    MLP's given that structure, so the image logits are a normalised distribution and the colour's depends on i.
    Text tokens keep their own rows."""
    cfg = tiny(code_factors=(6, 4))
    model, idx = model_of(cfg), tokens(cfg)
    assert cfg.num_token_rows == 16 and model.tok_emb.num_embeddings == 16 and model.factor_emb.num_embeddings == 10
    code = torch.tensor(16 + 3 * 4 + 2)  # (i, j) = (3, 2)
    torch.testing.assert_close(model._embed(code), model.factor_emb.weight[3] + model.factor_emb.weight[6 + 2])
    torch.testing.assert_close(model._embed(torch.tensor(5)), model.tok_emb.weight[5])
    hidden = []
    model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():
        codes = model(idx)[..., 16:].reshape(*idx.shape, 6, 4)
        x = hidden[0]
        torch.testing.assert_close(codes.exp().sum((-2, -1)), torch.ones(idx.shape))  # normalised over the codes
        structure = codes.logsumexp(-1)  # log p(i)
        torch.testing.assert_close(structure, model.structure_head(x).log_softmax(-1))
        colour = codes - structure[..., None]  # log p(j | i)
        torch.testing.assert_close(colour, model.colour_logits(x).log_softmax(-1))
    assert (colour - colour[..., :1, :]).abs().amax() > 1e-4  # p(j | i) differs between structures (init std 0.02)
    with pytest.raises(ValueError, match="code_factors must be two positive ints"):
        tiny(code_factors=(8, 5))  # 40 codes leave no room for text in a vocabulary of 40


@pytest.mark.parametrize("code_features, code_factors", [(0, None), (6, (6, 4))])
def test_logits_from_gives_the_last_positions_logits(code_features, code_factors):
    cfg = tiny(code_features=code_features, code_factors=code_factors)
    model, idx = model_of(cfg), tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, logits_from=cfg.prefix_len - 1), model(idx)[:, cfg.prefix_len - 1:])
    with pytest.raises(ValueError, match=r"logits_from=16 must lie in \[0, T=16\)"):
        model(idx, logits_from=16)


@pytest.mark.parametrize("code_features, code_factors", [(0, None), (5, None), (5, (6, 4))])
def test_targets_give_the_log_softmax_of_the_logits_at_each_target(code_features, code_factors):
    """forward(targets=...) is log_softmax(logits) at the target, text and image targets alike, also for a factored
    head, which computes only the target structure's colours."""
    cfg = tiny(code_features=code_features, code_factors=code_factors)
    model, idx = model_of(cfg), tokens(cfg, batch=3)
    targets = torch.randint(0, cfg.vocab_size, (3, idx.shape[1] - 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx, logits_from=2).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(model(idx, logits_from=2, targets=targets), expected)
    with pytest.raises(ValueError, match=r"targets must be \(B, T - logits_from\)"):
        model(idx, targets=targets)


def test_factored_codes_let_a_pair_never_seen_rise_with_its_parts():
    """SGD steps towards codes (0, 1) and (2, 0) raise the logit of code (0, 0), never a target, nearly as much as a
    target's when codes are factored: it shares structure 0 with one and colour 0 with the other. With one row per
    code it moves much less (rises are measured against the mean rise of the codes that share nothing with the
    targets: structures 1, 3, 4, 5 with colours 2, 3)."""
    idx = tokens(tiny(), batch=4)[:, :-1]
    target = torch.full_like(idx, 16 + 0 * 4 + 1)
    target[::2] = 16 + 2 * 4 + 0

    def rises(code_factors) -> tuple[float, float]:
        model = model_of(tiny(code_factors=code_factors, init_std=0.1))
        before = model(idx).detach()
        for _ in range(3):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten()).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        with torch.no_grad():
            rise = (model(idx) - before).mean(dim=(0, 1))
        codes = rise[16:].view(6, 4)
        unrelated = codes[[1, 3, 4, 5]][:, [2, 3]].mean()
        return float(codes[0, 1] - unrelated), float(codes[0, 0] - unrelated)

    target_rise, unseen_rise = rises((6, 4))
    assert target_rise > 0 and unseen_rise > 0.8 * target_rise, (target_rise, unseen_rise)
    target_rise, unseen_rise = rises(None)
    assert target_rise > 0 and abs(unseen_rise) < 0.3 * target_rise, (target_rise, unseen_rise)


def test_rope_positions_are_1d_for_text_and_2d_for_image_tokens():
    cfg = tiny(prefix_len=3, image_grid=(2, 3))
    pos = rope_positions(cfg).tolist()
    # text 0, 1, BOI 2, then image tokens (r, c) = (0,0) (0,1) (0,2) (1,0) (1,1); (1,2) is never an input
    assert pos == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 4], [3, 5], [4, 3], [4, 4]]


def test_2d_rope_scores_depend_only_on_the_row_and_column_offsets():
    cfg = tiny(prefix_len=2, image_grid=(4, 4), n_embd=64, n_head=4)
    cos, sin = rope_tables(rope_positions(cfg), head_dim=cfg.head_dim, theta=cfg.rope_theta)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, cfg.head_dim, generator=g, dtype=torch.float64)

    def score(i: int, j: int) -> float:  # q at input position i against k at input position j
        rot = [apply_rope(x.view(1, 1, 1, -1), cos[p].double().view(1, 1, -1), sin[p].double().view(1, 1, -1))
               for x, p in ((q, i), (k, j))]
        return (rot[0] * rot[1]).sum().item()

    def image(r: int, c: int) -> int:
        return cfg.prefix_len + 4 * r + c

    # the same (dr, dc) = (1, 1) offset at two places in the grid: equal scores
    assert score(image(0, 1), image(1, 2)) == pytest.approx(score(image(2, 0), image(3, 1)), abs=1e-5)
    # the same raster distance (4) as a vertical step vs wrapping across rows: different offsets, different scores
    assert score(image(0, 3), image(1, 3)) != pytest.approx(score(image(1, 0), image(1, 3)), abs=1e-3)


@pytest.mark.parametrize("tie, code_features, code_factors", [(False, 0, None), (True, 0, None), (False, 5, None),
                                                              (False, 0, (6, 4)), (True, 5, (6, 4))])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tie, code_features, code_factors):
    cfg = tiny(tie_embeddings=tie, code_features=code_features, code_factors=code_factors)
    model = model_of(cfg)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    model.save_pretrained(tmp_path / "gpt")
    saved = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert saved["_class_name"] == "GPT" and saved["image_grid"] == [3, 4]
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert loaded.config == cfg and isinstance(loaded.config.image_grid, tuple) and not loaded.training
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    idx = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    if code_features:  # the features travel with the weights
        assert torch.equal(loaded.code_feat, model.code_feat) and loaded.code_feat[1:].abs().sum() > 0


def test_config_survives_dict_round_trip():
    cfg = tiny(n_kv_head=None, ffn_hidden=48, attn_backend="math")
    assert from_dict(GPTConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_from_pretrained_of_a_vq_directory_names_both_classes(tmp_path):
    from tokenizers_img import VQConfig, VQModel

    VQModel(VQConfig(resolution=16, base_channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                     norm_groups=4, codebook_size=32, codebook_dim=4)).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="holds a VQModel checkpoint, not a GPT"):
        GPT.from_pretrained(tmp_path / "vq")


def test_gradient_checkpointing_gives_the_same_gradients():
    idx = tokens(tiny())
    grads = []
    for ckpt in (False, True):
        model = model_of(tiny(grad_checkpointing=ckpt)).train()
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_dropout_only_in_training():
    model, idx = model_of(tiny(dropout=0.2)), tokens(tiny())
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_init_scales_residual_projections_and_counts_params():
    cfg = tiny(n_embd=64, n_head=4, n_layer=8, init_std=0.02)
    model = model_of(cfg)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].mlp.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == model.num_params() - cfg.vocab_size * cfg.n_embd
    tied = model_of(tiny(n_embd=64, n_head=4, n_layer=8, tie_embeddings=True))
    assert tied.num_params() == model.num_params() - cfg.vocab_size * cfg.n_embd


@pytest.mark.parametrize("code_features, code_factors", [(0, None), (6, None), (6, (6, 4))])
def test_flops_per_token_counts_every_matmul_weight(code_features, code_factors):
    cfg = tiny(n_embd=64, n_head=4, n_kv_head=2, code_features=code_features, code_factors=code_factors)
    model = model_of(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    features = code_features * cfg.vocab_size if code_factors is None else 0  # the head's product with code_feat
    assert flops_per_token(cfg, 16) == 6 * (matmul + features) + 12 * cfg.n_layer * cfg.n_embd * 16


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN linears need an x86-64 PyTorch with mkldnn")


@needs_onednn
@pytest.mark.parametrize("rows, width_in, width_out, bias", [(24, 96, 1024, False), (4000, 32, 64, True)])
def test_onednn_linear_equals_f_linear_in_forward_and_backward(rows, width_in, width_out, bias):
    torch.manual_seed(0)
    layer = Linear(width_in, width_out, bias=bias)
    assert layer.use_onednn
    x = torch.randn(rows, 3, width_in).transpose(0, 1).requires_grad_()  # (3, rows, in), non-contiguous
    assert x.numel() * layer.out_features >= ONEDNN_MIN_MACS  # large enough to take the oneDNN path
    # the weight gradient of the first on oneDNN, of the second (long and thin) on BLAS
    assert (3 * rows >= WGRAD_BLAS_ROWS * (width_in + width_out)) == (rows == 4000)
    ref_x = x.detach().clone().requires_grad_()
    y, ref = layer(x), torch.nn.functional.linear(ref_x, layer.weight, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    params = (layer.weight, layer.bias) if bias else (layer.weight,)
    got, want = torch.autograd.grad(y, (x, *params), grad), torch.autograd.grad(ref, (ref_x, *params), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is honoured: F.linear in bf16
        assert layer(x).dtype == torch.bfloat16


@needs_onednn
def test_use_onednn_linears_keeps_parameters_outputs_and_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 512), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(512, 96, bias=False), torch.nn.Linear(96, 512)))
    model[2][1].weight = model[0].weight  # tied, as HF heads are
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 96, requires_grad=True)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    rng = torch.get_rng_state()
    assert use_onednn_linears(model) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # converting draws no random numbers
    assert all(type(m) is Linear for m in (model[0], model[2][0], model[2][1])) and model[2][0].bias is None
    assert list(model.parameters()) == params and model[2][1].weight is model[0].weight  # same objects, tie kept
    assert model.state_dict().keys() == state.keys()
    y = model(x)
    assert x.numel() * 512 >= ONEDNN_MIN_MACS  # the big layers take the oneDNN path
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(y.square().sum(), [x, *params]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert use_onednn_linears(model) == 0  # already converted


@needs_onednn
def test_pack_for_cpu_keeps_the_logits_and_leaves_the_original_alone(tmp_path):
    cfg = tiny(tie_embeddings=True)
    model, idx = model_of(cfg).train(), tokens(cfg)
    packed = pack_for_cpu(model)
    assert isinstance(packed.blocks[0].attn.qkv, PackedLinear) and not packed.training
    assert type(model.blocks[0].attn.qkv) is Linear and model.training and model.lm_head.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), model.eval()(idx), rtol=1e-5, atol=1e-5)
        cache_a, cache_b = KVCache.allocate(cfg, 2), KVCache.allocate(cfg, 2)
        torch.testing.assert_close(packed(idx[:, :7], cache=cache_a), model(idx[:, :7], cache=cache_b), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference-only and cannot be saved"):
        packed.save_pretrained(tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def autocast_rounding(model: GPT) -> GPT:
    """`model` with what bf16 autocast does to its blocks' Linear layers spelled out in float32: weights, inputs and
    outputs rounded to bf16 (a product of two bf16 numbers is exact in float32, so only the summation order differs)."""
    ref = copy.deepcopy(model).eval()

    def bf16(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    for module in ref.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = bf16(module.weight.data)
            module.register_forward_pre_hook(lambda _, args: (bf16(args[0]),))
            module.register_forward_hook(lambda _, args, out: bf16(out))
    return ref


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_onednn)])
@pytest.mark.parametrize("factored", [False, True])
def test_bf16_blocks_compute_what_bf16_autocast_computes_with_float32_heads(pack, factored):
    cfg = tiny(vocab_size=13 + 12, code_factors=(4, 3)) if factored else tiny()
    model, idx = model_of(cfg).train(), tokens(cfg)
    fast = pack_for_cpu(model, bf16=True) if pack else bf16_blocks(model)
    inner = [m for m in fast.blocks.modules() if isinstance(m, (torch.nn.Linear, BF16Linear, PackedLinear))]
    heads = [fast.lm_head, *([fast.structure_head, fast.colour_in, fast.colour_out] if factored else [])]
    dtype = (lambda m: m.dtype) if pack else (lambda m: m.weight.dtype)
    assert len(inner) == 4 * cfg.n_layer and all(dtype(m) == torch.bfloat16 for m in inner)
    assert all(dtype(m) == torch.float32 for m in heads) and fast.norm.weight.dtype == torch.float32
    assert fast.kv_cache_dtype == torch.bfloat16 and not fast.training
    assert model.kv_cache_dtype is None and type(model.blocks[0].attn.qkv) is Linear and model.training
    with torch.no_grad():
        got, want, fp32 = fast(idx), autocast_rounding(model)(idx), model.eval()(idx)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert (got - fp32).abs().max() > 10 * (got - want).abs().max()  # the rounding is bf16's, not float32's


def test_a_bf16_kv_cache_holds_the_keys_of_the_forward_without_it():
    cfg = tiny()
    fast, idx = bf16_blocks(model_of(cfg)), tokens(cfg)
    with torch.no_grad():
        full = fast(idx)
        cache = KVCache.allocate(cfg, 2, dtype=fast.kv_cache_dtype)
        steps = [fast(idx[:, :5], cache=cache)] + [fast(idx[:, t : t + 1], cache=cache, start=t) for t in range(5, cfg.block_size)]
    assert cache.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=2e-3, atol=2e-3)  # keys and values rounded to bf16


def test_forward_rejects_bad_positions_and_caches():
    cfg = tiny()
    model, idx = model_of(cfg), tokens(cfg)
    with pytest.raises(ValueError, match=r"start=3 needs a KVCache"):
        model(idx[:, :2], start=3)
    with pytest.raises(ValueError, match=r"\[10, 20\) must lie in \[0, block_size=16\)"):
        model(idx[:, :10], cache=KVCache.allocate(cfg, 2), start=10)
    with pytest.raises(ValueError, match="holds 3 rows but idx has 2"):
        model(idx[:, :2], cache=KVCache.allocate(cfg, 3))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_embd": 30}, "n_embd=30 must be divisible by n_head=4"),
        ({"n_kv_head": 3}, "n_head=4 must be divisible by n_kv_head=3"),
        ({"n_embd": 24, "n_head": 4}, "head_dim = n_embd / n_head = 24 / 4 = 6 must be divisible by 4"),
        ({"image_grid": (3,)}, r"image_grid must be two positive ints \(h, w\), got \(3,\)"),
        ({"image_grid": (0, 4)}, r"image_grid must be two positive ints"),
        ({"vocab_size": 0}, "vocab_size must be >= 1, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0, got 0.0"),
        ({"attn_backend": "flash"}, "attn_backend must be one of .* got 'flash'"),
        ({"code_features": -1}, r"code_features must be >= 0 \(0: off\), got -1"),
    ],
)
def test_config_validation_prints_the_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_config_json_names_the_key(tmp_path):
    model_of(tiny()).save_pretrained(tmp_path / "gpt")
    path = tmp_path / "gpt" / "config.json"
    path.write_text(path.read_text().replace('"n_layer"', '"n_layers"'))
    with pytest.raises(ValueError, match="n_layers"):
        GPT.from_pretrained(tmp_path / "gpt")


@needs_onednn
def test_count_flops_sees_onednn_linears():
    from argen.compare import count_flops

    layer, x = Linear(256, 512, bias=True), torch.randn(64, 256)
    assert x.numel() * layer.out_features >= ONEDNN_MIN_MACS  # the oneDNN path, not F.linear
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == count_flops(lambda: torch.nn.functional.linear(x, layer.weight)) == 2 * 64 * 256 * 512


PAD = 0


def padded(cfg: GPTConfig, lengths: list[int], *, seed: int = 0) -> torch.Tensor:
    """Rows of [caption of `length` tokens, pads up to prefix_len - 1, BOI-like token, image tokens] (B, block_size)."""
    seq = tokens(cfg, len(lengths), seed=seed).clamp(min=1)  # no pad outside the padding
    for row, n in enumerate(lengths):
        seq[row, n : cfg.prefix_len - 1] = PAD
    return seq


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("abs_pos_emb, code_factors", [(False, None), (True, (4, 5))])
def test_masked_padding_gives_the_same_outputs_with_the_all_pad_columns_dropped(backend, abs_pos_emb, code_factors):
    """With mask_padding, no position reads a pad: dropping the text columns that hold only pads (positions= keeps the
    others where they were) leaves every other output the same; the same weights without the mask read them."""
    cfg = tiny(prefix_len=8, mask_padding=True, pad_id=PAD, attn_backend=backend, abs_pos_emb=abs_pos_emb,
               code_factors=code_factors)
    model = model_of(cfg)
    seq = padded(cfg, [3, 1, 0])  # captions of 3, 1 and 0 tokens in 7 text columns
    full = model(seq)
    keep = torch.cat([torch.arange(3), torch.arange(7, cfg.block_size)])
    short = model(seq[:, keep], positions=keep)
    real = seq[:, keep] != PAD  # the short sequence's non-pad positions
    torch.testing.assert_close(short[real], full[:, keep][real], atol=1e-5, rtol=1e-5)
    unmasked = model_of(tiny(prefix_len=8, attn_backend=backend, abs_pos_emb=abs_pos_emb, code_factors=code_factors))
    assert not torch.allclose(unmasked(seq)[:, -1], full[:, -1], atol=1e-4)  # the same weights read the pads
    assert torch.isfinite(full).all()  # the all-pad caption row reads only BOI and itself: no NaN


def test_masked_padding_keeps_cached_decoding_equal_to_the_full_forward():
    cfg = tiny(prefix_len=8, mask_padding=True, pad_id=PAD)
    model = model_of(cfg)
    seq = padded(cfg, [3, 0])
    full = model(seq)
    cache = KVCache.allocate(cfg, 2)
    steps = [model(seq[:, : cfg.prefix_len], cache=cache, start=0)]
    for t in range(cfg.prefix_len, cfg.block_size):
        steps.append(model(seq[:, t : t + 1], cache=cache, start=t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert not cache.visible[0, 3:7].any() and cache.visible[0, :3].all() and cache.visible[:, 7:].all()
    assert cache.rows(torch.tensor([1])).visible.shape == (1, cfg.block_size)


def test_positions_are_checked():
    cfg = tiny(prefix_len=8, mask_padding=True, pad_id=PAD)
    model, seq = model_of(cfg), padded(cfg, [3])
    with pytest.raises(ValueError, match="increasing int64"):
        model(seq[:, :4], positions=torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="mask_padding"):
        model_of(tiny())(seq[:, :4], positions=torch.arange(4))
    with pytest.raises(ValueError, match="pad_id"):
        tiny(mask_padding=True)
    with pytest.raises(ValueError, match="takes a mask"):
        tiny(mask_padding=True, pad_id=PAD, attn_backend="xformers")
