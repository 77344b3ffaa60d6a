"""The one attention function: causal or full, grouped-query, with sdpa, xformers and reference math backends."""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers", "math")


class BackendUnavailableError(RuntimeError):
    """An attention backend was asked for by name but cannot run here (not installed, or wrong device)."""


@functools.lru_cache(maxsize=1)
def _xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can. Unknown names raise ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}.")
    if backend == "xformers":
        if not _xformers_installed():
            return "the xformers package is not installed (pip install 'argen[xformers]')"
        if torch.device(device).type != "cuda":
            return f"xformers.ops.memory_efficient_attention needs CUDA tensors, got device {str(device)!r}"
    return None


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The concrete backends (not "auto") that can run on `device`, reference "math" included."""
    return tuple(b for b in BACKENDS if b != "auto" and backend_unavailable_reason(b, device) is None)


# "auto" on the CPU runs `math` for bf16 attention over at most this many keys (see resolve_backend).
CPU_BF16_MATH_MAX_KEYS = 192


@functools.cache
def cpu_flash_decodes_bf16() -> bool:
    """Whether the CPU flash kernel decodes one query over a bf16 cache faster than `math`: on CPUs with AMX, whose
    tile instructions that kernel's bf16 path uses (docs/speed.md measures both kinds of host)."""
    from argen.host import cpu_extensions

    return "AMX" in cpu_extensions()


def resolve_backend(backend: str, device: torch.device | str, *, q_len: int | None = None,
                    k_len: int | None = None, dtype: torch.dtype | None = None, grad: bool = True) -> str:
    """The concrete backend `attention` runs for `backend` on `device`; an unavailable one raises, naming why.

    "auto" is "sdpa" (PyTorch's flash / memory-efficient kernels on GPU, its flash kernel on CPU; xformers
    runs only when asked for by name), except on the CPU in two cases where plain batched matmuls are faster
    (measured in docs/speed.md):
    - one query (q_len=1, KV-cache decode): "math" is two batched matrix-vector products (which Inductor fuses),
      while the CPU flash kernel is tuned for blocks of queries. Eager decoding over a bf16 cache runs "sdpa" on a
      CPU with AMX (`cpu_flash_decodes_bf16`); without AMX the flash kernel's bf16 path is the slower one;
    - bf16 (q in bf16, or bf16 autocast) with at most CPU_BF16_MATH_MAX_KEYS keys, when `grad` (a backward may
      follow): the CPU flash kernel's bf16 backward is slow at short sequences (`python
      benchmarks/attention_backends.py`). In float32, and forward only (sampling), it keeps up.
    """
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {backend!r} is not available: {reason}.")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu":
        return "sdpa"
    if q_len == 1:
        eager_bf16 = dtype == torch.bfloat16 and not torch.compiler.is_compiling()
        return "sdpa" if eager_bf16 and cpu_flash_decodes_bf16() else "math"
    short = k_len is not None and k_len <= CPU_BF16_MATH_MAX_KEYS
    return "math" if dtype == torch.bfloat16 and short and grad else "sdpa"


def causal_mask(q_len: int, k_len: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (q_len, k_len), True where attention is allowed: query i sits at key position k_len - q_len + i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    causal: bool = True,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention, softmax(q k^T / sqrt(D)) v, over heads.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query attention: query head h reads
    key/value head h // (H // Hkv)) and Tq <= Tk when causal. Returns (B, H, Tq, D) in q's dtype.

    causal=True aligns the queries with the *last* Tq keys (bottom-right): query i sits at position
    Tk - Tq + i and sees keys [0, Tk - Tq + i]. So training (Tq == Tk), prefill and one-token decode
    against a KV cache holding positions [0, Tk) all use the same call. Note that PyTorch's
    `is_causal=True` aligns top-left, which is only the same when Tq == Tk; this function handles it.

    mask: bool (B, 1, Tq, Tk), True where query i of row b may attend key j, in place of `causal` (which must then
    be False): rows at different positions against one KV cache (parallel decoding) each see their own keys. Every
    query must see at least one key. The sdpa and math backends take it; xformers does not.

    dropout_p > 0 applies attention dropout (global RNG); pass 0 in eval.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D), got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(
            f"k and v must be (B={B}, Hkv, Tk, D={D}) with H={H} divisible by Hkv; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={Tq} > Tk={Tk}.")
    if mask is not None:
        if causal:
            raise ValueError("give causal=False with an explicit mask: the mask says which keys each query sees.")
        if mask.dtype != torch.bool or mask.shape != (B, 1, Tq, Tk):
            raise ValueError(f"mask must be bool (B, 1, Tq, Tk) = ({B}, 1, {Tq}, {Tk}), got {mask.dtype} {tuple(mask.shape)}.")
    # under autocast the matmuls (and sdpa) run in the autocast dtype, whatever q's dtype (RoPE leaves q in fp32)
    device_type = q.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
    name = resolve_backend(backend, q.device, q_len=Tq, k_len=Tk, dtype=dtype, grad=torch.is_grad_enabled())
    if name == "sdpa":
        return _sdpa(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)
    if name == "xformers":
        if mask is not None:
            raise BackendUnavailableError("attention backend 'xformers' takes no per-row mask (parallel decoding); "
                                          "use attn_backend 'sdpa' or 'auto'.")
        # xformers wants one dtype; under autocast q and k leave RoPE in fp32 while v comes out of the linear in bf16
        out = _xformers(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, dropout_p=dropout_p)
        return out.to(q.dtype)
    return _math(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, mask: torch.Tensor | None,
          dropout_p: float) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if not causal or Tq == 1:  # one query at the end of the keys sees all of them: no mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(Tq, Tk, device=q.device)  # bottom-right; is_causal would align top-left here
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, dropout_p: float) -> torch.Tensor:
    import xformers.ops as xops

    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    # xformers layout (B, T, groups, heads per group, D); k/v are broadcast over the heads of their group.
    q5 = q.transpose(1, 2).reshape(B, Tq, Hkv, G, D)
    k5 = k.transpose(1, 2).unsqueeze(3).expand(B, Tk, Hkv, G, D)
    v5 = v.transpose(1, 2).unsqueeze(3).expand(B, Tk, Hkv, G, D)
    bias = None
    if causal and Tq > 1:
        bias = xops.LowerTriangularFromBottomRightMask()
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, p=dropout_p)  # (B, Tq, Hkv, G, D)
    return out.reshape(B, Tq, H, D).transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, mask: torch.Tensor | None,
          dropout_p: float) -> torch.Tensor:
    """The reference: explicit scores and softmax (in at least fp32). The G = H / Hkv query heads that share a
    key/value head are folded into the query axis, so k and v are never copied."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    q = (q * (1.0 / math.sqrt(D))).reshape(B, Hkv, G * Tq, D)  # head h reads key/value head h // G
    scores = q @ k.transpose(-2, -1)  # (B, Hkv, G*Tq, Tk)
    if mask is not None:
        scores = scores.view(B, Hkv, G, Tq, Tk).masked_fill(~mask[:, :, None], float("-inf")).view(B, Hkv, G * Tq, Tk)
    elif causal and Tq > 1:  # one query at the end of the keys sees all of them
        scores = scores.view(B, Hkv, G, Tq, Tk).masked_fill(~causal_mask(Tq, Tk, device=q.device), float("-inf"))
        scores = scores.view(B, Hkv, G * Tq, Tk)
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return (weights @ v).view(B, H, Tq, D)


HF_ATTENTION = "argen"  # the name `use_argen_attention` registers with transformers' AttentionInterface


def _hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract over `attention`: q, k, v (B, H, T, D) and the bool mask of
    `sdpa_mask` (or None) in, (B, Tq, H, D) out, so a Hugging Face model gets the backend rule of `resolve_backend`."""
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-6):
        raise ValueError(f"{type(module).__name__} scales attention by {scaling}: argen's attention takes only the "
                         "standard 1/sqrt(head_dim).")
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    mask = None if attention_mask is None else attention_mask.expand(B, 1, Tq, Tk)
    out = attention(query, key, value, causal=bool(causal) and mask is None, mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def use_argen_attention(model: torch.nn.Module) -> None:
    """Run a transformers model's attention (a CLIPModel, say) through `attention` with backend "auto", in place:
    on the CPU in bf16 the short sequences of a small CLIP run the math path, whose backward is faster there than the
    flash kernel's (docs/speed.md). Masks are built as for sdpa (bool, True = attend). Weights are untouched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTENTION, _hf_attention_forward)
    AttentionMaskInterface.register(HF_ATTENTION, sdpa_mask)
    model.set_attn_implementation(HF_ATTENTION)
