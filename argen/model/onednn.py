"""oneDNN linear layers for CPU float32: forward and both backward GEMMs on oneDNN, the same math as F.linear."""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Whether CPU float32 linears can run on oneDNN: an x86-64 build of PyTorch with mkldnn and its linear ops.

    On x86 oneDNN's JIT GEMMs beat PyTorch's default BLAS (MKL) at this model's GEMM shapes (docs/speed.md);
    other CPUs keep F.linear.
    """
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T (+ bias) on oneDNN; weight may be dense or prepacked."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The weight gradient gy^T x reduces over all N rows. oneDNN needs x^T as a contiguous copy; PyTorch's BLAS reads
# the transpose in place and wins from about N >= WGRAD_BLAS_ROWS * (in + out) rows: long thin activations (CLIP,
# the priors), not the demo GPT's. Measured in docs/speed.md (oneDNN linears).
WGRAD_BLAS_ROWS = 8


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and both backward GEMMs on oneDNN (same fp32 math as F.linear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        gy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad_y, weight.t().contiguous())  # (..., out) @ W -> (..., in)
        if ctx.needs_input_grad[1]:
            xs = x.reshape(-1, x.shape[-1])  # (N, in)
            if xs.shape[0] >= WGRAD_BLAS_ROWS * (xs.shape[1] + gy.shape[1]):
                grad_w = gy.t().mm(xs)  # BLAS reads both operands transposed in place
            else:
                grad_w = _onednn_matmul(gy.t(), xs.t().contiguous())  # (out, N) @ (N, in) -> (out, in)
        if ctx.needs_input_grad[2]:
            grad_b = gy.sum(dim=0)
        return grad_x, grad_w, grad_b


# Below about 2M multiply-adds per GEMM oneDNN's fixed cost per call (~10 us) outweighs its faster kernels.
ONEDNN_MIN_MACS = 1 << 21


class Linear(nn.Linear):
    """nn.Linear (bias-free unless asked) whose CPU float32 GEMMs (forward and backward) of at least
    ONEDNN_MIN_MACS multiply-adds run on oneDNN where `onednn_available()`; smaller ones, GPU, other dtypes and
    autocast use F.linear, and so does a forward traced by torch.compile (Inductor picks its own GEMMs). Same
    parameters and state dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.use_onednn = onednn_available()  # decided once, so forward stays free of cached lookups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.use_onednn and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and x.numel() * self.out_features >= ONEDNN_MIN_MACS and not torch.compiler.is_compiling()):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` inside `model` (a Hugging Face CLIP, a diffusers UNet, ...) by `Linear` holding
    the same Parameter objects, so its CPU float32 GEMMs run on oneDNN, whose fp32 GEMM peak is higher than MKL's
    (docs/speed.md); small models such as the shapes CLIP and decoder gain little, larger ones more. State dict, tied
    weights, optimizer state and the global RNG are untouched. Returns how many layers were replaced (0 where
    `onednn_available()` is False, leaving the model as it was)."""
    if not onednn_available():
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                fast = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fast.weight, fast.bias = child.weight, child.bias  # meta placeholders replaced: no init, no RNG draw
                fast.train(child.training)
                setattr(module, name, fast)
                replaced += 1
    return replaced
