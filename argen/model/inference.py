"""Inference copies of a GPT for CPU sampling: oneDNN-prepacked weights, and a torch.compile'd decode step."""

from __future__ import annotations

import copy
import platform

import torch
from torch import nn

from argen.host import compile_problem
from argen.model.gpt import GPT, KVCache, RowPositions
from argen.model.onednn import _onednn_matmul, onednn_available


class PackedLinear(nn.Module):
    """Inference-only x W^T with W reordered once into oneDNN's blocked layout (as Inductor's CPU freezing does).

    The same arithmetic as `Linear`, without re-packing W on every call, which speeds up the small-batch GEMMs of
    KV-cache decoding (docs/speed.md). No autograd; cannot be saved.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free Linear layers only.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # opaque mkldnn tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_matmul(x, self.packed)  # (..., out_features)

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
        self.config = gpt.config
        self.step = torch.compile(self.gpt, dynamic=True)

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, start: int | RowPositions = 0,
                logits_from: int = 0) -> torch.Tensor:
        if (cache is None or idx.ndim != 2 or idx.shape[1] != 1 or torch.is_grad_enabled()
                or isinstance(start, RowPositions)):
            return self.gpt(idx, cache=cache, start=start, logits_from=logits_from)
        import torch._inductor.config as inductor_config

        # freezing is read when a graph is compiled, which may happen on any step (a new batch size or cache dtype);
        # torch.compile(options={"freezing": True}) did not freeze (the step ran slower than eager)
        with inductor_config.patch(freezing=True):
            return self.step(idx, cache=cache, start=start)


def pack_for_cpu(model: GPT, *, compile: bool = False) -> GPT | CompiledDecoding:
    """An inference copy of a CPU `model` for sampling: its Linear layers hold oneDNN-prepacked weights (`PackedLinear`),
    or with `compile` its decode step is compiled (`CompiledDecoding`).

    Logits equal the original's up to fp32 rounding (the GEMMs and fused loops sum in another order). The copy is in
    eval mode, has no autograd and cannot be saved; the original is untouched. Costs one more copy of the weights in
    memory (with compile, also Inductor's packed constants) and a fraction of a second; pays off for sampling
    (many forwards). `compile` pays the compilation on the first decode step (again for one row per step and for
    each new cache dtype), then decodes batches faster than the packed copy, and one row per step slower
    (docs/speed.md): worth it for long batched sampling jobs, not for one grid.
    """
    if not onednn_available():
        raise RuntimeError(
            f"pack_for_cpu needs an x86-64 PyTorch built with oneDNN (machine {platform.machine()!r}, "
            f"mkldnn available: {torch.backends.mkldnn.is_available()})."
        )
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_for_cpu needs a float32 or bfloat16 model on the CPU, got {param.dtype} on {param.device}.")
    packed = copy.deepcopy(model).eval().requires_grad_(False)
    if compile:
        return CompiledDecoding(packed)
    for module in list(packed.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return packed
