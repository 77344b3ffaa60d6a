"""The image-token GPT: config, KV cache, model and the one attention function."""

from argen.model.attention import (
    BackendUnavailableError,
    attention,
    available_backends,
    resolve_backend,
)
from argen.model.gpt import GPT, CompiledDecoding, GPTConfig, KVCache, flops_per_token, onednn_available, pack_for_cpu

__all__ = [
    "GPT",
    "BackendUnavailableError",
    "CompiledDecoding",
    "GPTConfig",
    "KVCache",
    "attention",
    "available_backends",
    "flops_per_token",
    "onednn_available",
    "pack_for_cpu",
    "resolve_backend",
]
