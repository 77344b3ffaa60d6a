"""Inference copies of a GPT for sampling: bf16 block weights, oneDNN-prepacked weights on the CPU, and a
torch.compile'd decode step."""

from __future__ import annotations

import copy
import platform

import torch
import torch.nn.functional as F
from torch import nn

from argen.host import compile_problem
from argen.model.gpt import GPT, KVCache, RowPositions
from argen.model.onednn import _onednn_matmul, onednn_available


class BF16Linear(nn.Module):
    """Inference-only x W^T with W held in bfloat16: x is cast to bf16 for the product and the result back to x's
    dtype, what bf16 autocast does to a Linear in training. Halves the weights' memory traffic."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("BF16Linear takes bias-free Linear layers only.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class PackedLinear(nn.Module):
    """Inference-only x W^T with W reordered once into oneDNN's blocked layout (as Inductor's CPU freezing does).

    The same arithmetic as the `Linear` or `BF16Linear` it packs (in W's dtype, x cast to it and the result back),
    without re-packing W on every call, which speeds up the small-batch GEMMs of KV-cache decoding (docs/speed.md).
    No autograd; cannot be saved.
    """

    def __init__(self, linear: nn.Linear | BF16Linear):
        super().__init__()
        if getattr(linear, "bias", None) is not None:
            raise ValueError("PackedLinear packs bias-free Linear layers only.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # opaque mkldnn tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_matmul(x.to(self.dtype), self.packed).to(x.dtype)  # (..., out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("a model packed by pack_for_cpu is inference-only and cannot be saved: save the original model.")


class CompiledDecoding(nn.Module):
    """An inference GPT whose one-token KV-cache decode step runs through torch.compile; made by
    `pack_for_cpu(model, compile=True)`. It quacks like the GPT for `sample_image_tokens` (config, parameters, eval,
    the same forward); every other call (no cache, or T > 1 such as the prefill) runs the GPT eagerly.

    Inductor compiles the step with freezing: the weights become constants that it prepacks for oneDNN itself
    (what `PackedLinear` does by hand), and it fuses the rest of the step (norms, RoPE, the cache write, attention
    over the cached keys, SwiGLU, residuals) into a few C++ loops instead of ~1,000 eager ops. Shapes are dynamic, so
    one graph serves every position and batch size (a new one per cache dtype, and for batch 1).
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        problem = compile_problem("cpu")
        if problem is not None:
            raise RuntimeError(f"compile=True: {problem}. Or sample without compile.")
        self.gpt = gpt.eval().requires_grad_(False)
        self.config, self.kv_cache_dtype = gpt.config, gpt.kv_cache_dtype
        self.step = torch.compile(self.gpt, dynamic=True)

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, start: int | RowPositions = 0,
                logits_from: int = 0) -> torch.Tensor:
        if (cache is None or idx.ndim != 2 or idx.shape[1] != 1 or torch.is_grad_enabled()
                or isinstance(start, RowPositions)):
            return self.gpt(idx, cache=cache, start=start, logits_from=logits_from)
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        # freezing is read when a graph is compiled, which may happen on any step (a new batch size or cache dtype);
        # torch.compile(options={"freezing": True}) did not freeze (the step ran slower than eager). Without duck
        # sizing, a cache capacity that equals the number of rows at the first step does not cost a second graph.
        cache.reserve(start + 1)  # grown eagerly: the compiled step only writes in place
        with inductor_config.patch(freezing=True), fx_config.patch(use_duck_shape=False):
            return self.step(idx, cache=cache, start=start)


def bf16_blocks(model: GPT) -> GPT:
    """An inference copy of `model` whose transformer blocks hold their Linear weights in bfloat16 (`BF16Linear`) and
    whose KV cache is bfloat16, the rest in the model's dtype: the arithmetic of bf16 autocast (the residual stream,
    norms, RoPE and softmax stay float32), except that the output heads stay float32 too, so the logits are not
    rounded to bf16. Where bf16 is native (`argen.host.native_bf16`) it halves the weights' and the cache's memory
    traffic, the largest costs of batched decoding. The original is untouched."""
    copied = copy.deepcopy(model).eval().requires_grad_(False)
    _replace_linears(copied.blocks, (nn.Linear,), BF16Linear)
    copied.kv_cache_dtype = torch.bfloat16
    return copied


def _replace_linears(root: nn.Module, kinds: tuple[type, ...], make) -> None:
    """Swap every submodule of `root` that is one of `kinds` for `make(it)`, in place."""
    for module in list(root.modules()):
        for name, child in module.named_children():
            if isinstance(child, kinds):
                setattr(module, name, make(child))


def pack_for_cpu(model: GPT, *, compile: bool = False, bf16: bool = False) -> GPT | CompiledDecoding:
    """An inference copy of a CPU `model` for sampling: its Linear layers hold oneDNN-prepacked weights (`PackedLinear`),
    or with `compile` its decode step is compiled (`CompiledDecoding`). With `bf16` the blocks' weights and the KV
    cache are bfloat16 first (`bf16_blocks`).

    Logits equal the original's up to fp32 rounding (the GEMMs and fused loops sum in another order), or with `bf16`
    up to bf16 autocast's rounding. The copy is in eval mode, has no autograd and cannot be saved; the original is
    untouched. Costs one more copy of the weights in memory (with compile, also Inductor's packed constants) and a
    fraction of a second; pays off for sampling (many forwards). `compile` pays the compilation on the first decode
    step (again for one row per step and for each new cache dtype), then decodes batches faster than the packed
    copy, and one row per step slower (docs/speed.md): worth it for long batched sampling jobs, not for one grid.
    """
    if not onednn_available():
        raise RuntimeError(
            f"pack_for_cpu needs an x86-64 PyTorch built with oneDNN (machine {platform.machine()!r}, "
            f"mkldnn available: {torch.backends.mkldnn.is_available()})."
        )
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_for_cpu needs a float32 or bfloat16 model on the CPU, got {param.dtype} on {param.device}.")
    packed = bf16_blocks(model) if bf16 else copy.deepcopy(model).eval().requires_grad_(False)
    if compile:
        return CompiledDecoding(packed)
    _replace_linears(packed, (nn.Linear, BF16Linear), PackedLinear)
    return packed
