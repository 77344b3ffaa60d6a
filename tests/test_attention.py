"""attention(): every available backend equals the math reference (forward and backward), causal offsets, GQA, errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from argen.model.attention import (
    CPU_BF16_MATH_MAX_KEYS,
    BackendUnavailableError,
    attention,
    available_backends,
    resolve_backend,
)

attention_module = importlib.import_module("argen.model.attention")  # argen.model's `attention` is the function
BACKENDS = available_backends("cpu")
# (n_head, n_kv_head, Tq, Tk, causal): self-attention, GQA, MQA, prefill after a cache, one-token decode, full
CASES = [
    (4, 4, 7, 7, True),
    (4, 2, 7, 7, True),
    (4, 1, 6, 6, True),
    (4, 2, 3, 9, True),
    (4, 4, 1, 9, True),
    (4, 2, 1, 9, True),
    (4, 2, 5, 8, False),
]


def qkv(n_head: int, n_kv_head: int, tq: int, tk: int, *, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n_head, tq, 8, generator=g, dtype=dtype)
    k = torch.randn(2, n_kv_head, tk, 8, generator=g, dtype=dtype)
    v = torch.randn(2, n_kv_head, tk, 8, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_backends_are_sdpa_and_math_and_auto_picks_per_query_length(monkeypatch, amx):
    monkeypatch.setattr(attention_module, "cpu_flash_decodes_bf16", lambda: amx)
    assert set(BACKENDS) >= {"sdpa", "math"} and "auto" not in BACKENDS
    assert resolve_backend("auto", "cpu") == "sdpa" and resolve_backend("auto", "cpu", q_len=7) == "sdpa"
    assert resolve_backend("auto", "cpu", q_len=1) == "math"  # one decode query: plain matmuls are faster on CPU
    # ... except over a bf16 cache, eagerly, on a CPU with AMX, where the batched matmuls copy the keys and values
    # first; without AMX the flash kernel's bf16 path is the slow one
    assert resolve_backend("auto", "cpu", q_len=1, k_len=40, dtype=torch.bfloat16) == ("sdpa" if amx else "math")
    compiled = torch.compile(lambda: resolve_backend("auto", "cpu", q_len=1, k_len=40, dtype=torch.bfloat16),
                             backend="eager", fullgraph=True)
    assert compiled() == "math"  # Inductor fuses the math path
    bf16 = torch.bfloat16  # short bf16 sequences (training under autocast): math; long ones and float32: sdpa
    assert resolve_backend("auto", "cpu", q_len=93, k_len=93, dtype=bf16) == "math"
    assert resolve_backend("auto", "cpu", q_len=8, k_len=93, dtype=bf16, grad=False) == "sdpa"  # no backward follows
    assert resolve_backend("auto", "cpu", q_len=CPU_BF16_MATH_MAX_KEYS + 1, k_len=CPU_BF16_MATH_MAX_KEYS + 1,
                           dtype=bf16) == "sdpa"
    assert resolve_backend("auto", "cpu", q_len=93, k_len=93, dtype=torch.float32) == "sdpa"
    assert resolve_backend("auto", "cuda", q_len=93, k_len=93, dtype=bf16) == "sdpa"
    q, k, v = qkv(4, 2, 1, 9)
    torch.testing.assert_close(attention(q, k, v, backend="auto"), attention(q, k, v, backend="sdpa"))


def test_auto_reads_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast q arrives in float32 (RoPE upcasts it) but the products run in bf16: auto must pick what
    it picks for bf16 (math at short lengths on the CPU), not what it picks for float32."""
    attention_module = importlib.import_module("argen.model.attention")  # the package re-exports a function of that name
    calls = []
    for name in ("_sdpa", "_math"):
        real = getattr(attention_module, name)
        monkeypatch.setattr(attention_module, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    q, k, v = qkv(4, 4, 16, 16)
    attention(q, k, v, backend="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q, k, v, backend="auto")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q, k, v, backend="auto")  # forward only: the slow bf16 backward does not follow
    assert calls == ["_sdpa", "_math", "_sdpa"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}kv{}q{}k{}{}".format(*c[:4], "c" if c[4] else "f"))
def test_backend_equals_math_forward_and_backward(backend, case):
    n_head, n_kv_head, tq, tk, causal = case
    inputs = [t.requires_grad_() for t in qkv(n_head, n_kv_head, tq, tk)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = attention(*inputs, backend=backend, causal=causal)
    ref = attention(*ref_inputs, backend="math", causal=causal)
    assert out.shape == (2, n_head, tq, 8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_queries_align_with_the_last_keys(backend):
    """Queries for positions [Tk - Tq, Tk) against keys [0, Tk) equal the last rows of full causal attention:
    what prefill-after-cache and decode rely on."""
    q, k, v = qkv(4, 2, 9, 9)
    full = attention(q, k, v, backend=backend)
    for tq in (1, 3, 9):
        torch.testing.assert_close(attention(q[:, :, -tq:], k, v, backend=backend), full[:, :, -tq:])
    # and a query never sees a later key: changing the last key leaves every earlier query's output unchanged
    k2 = k.clone()
    k2[:, :, -1] += 5.0
    torch.testing.assert_close(attention(q, k2, v, backend=backend)[:, :, :-1], full[:, :, :-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_equals_repeated_key_value_heads(backend):
    q, k, v = qkv(6, 2, 5, 5)
    grouped = attention(q, k, v, backend=backend)
    repeated = attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), backend=backend)
    torch.testing.assert_close(grouped, repeated)


def test_bfloat16_decode_is_close_to_float64():
    """One query against a bf16 cache (the sampler's cache_dtype=torch.bfloat16): softmax in float32, output in bf16."""
    q, k, v = qkv(4, 2, 1, 40)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention(q, k, v, backend="math"), rtol=0.02, atol=0.02)


def test_float32_sdpa_matches_math():
    q, k, v = qkv(4, 2, 6, 10, dtype=torch.float32)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"),
                               rtol=1e-5, atol=1e-6)


def test_xformers_on_cpu_is_a_clear_error():
    q, k, v = qkv(2, 2, 3, 3)
    with pytest.raises(BackendUnavailableError, match="'xformers' is not available: .*(not installed|needs CUDA)"):
        attention(q, k, v, backend="xformers")
    assert "xformers" not in BACKENDS


def test_unknown_backend_and_bad_shapes_raise():
    q, k, v = qkv(4, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    q, k, v = qkv(4, 3, 3, 3)
    with pytest.raises(ValueError, match="H=4 divisible by Hkv"):
        attention(q, k, v, backend="math")
    q, k, v = qkv(2, 2, 5, 3)
    with pytest.raises(ValueError, match="Tq=5 > Tk=3"):
        attention(q, k, v)
