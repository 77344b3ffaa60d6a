"""The image-token GPT: config, KV cache, model, the one attention function, and its CPU inference copies."""

from argen.model.attention import (
    BackendUnavailableError,
    attention,
    available_backends,
    resolve_backend,
)
from argen.model.gpt import GPT, GPTConfig, KVCache, RowPositions, flops_per_token
from argen.model.inference import BF16Linear, CompiledDecoding, PackedLinear, bf16_blocks, pack_for_cpu
from argen.model.onednn import Linear, onednn_available, use_onednn_linears

__all__ = [
    "BF16Linear",
    "GPT",
    "BackendUnavailableError",
    "CompiledDecoding",
    "GPTConfig",
    "KVCache",
    "Linear",
    "PackedLinear",
    "RowPositions",
    "attention",
    "available_backends",
    "bf16_blocks",
    "flops_per_token",
    "onednn_available",
    "pack_for_cpu",
    "resolve_backend",
    "use_onednn_linears",
]
