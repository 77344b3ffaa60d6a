"""The image-token GPT: config, KV cache, model and the one attention function."""

from argen.model.attention import (
    BackendUnavailableError,
    attention,
    available_backends,
    resolve_backend,
)
from argen.model.gpt import GPT, GPTConfig, KVCache, flops_per_token

__all__ = [
    "GPT",
    "BackendUnavailableError",
    "GPTConfig",
    "KVCache",
    "attention",
    "available_backends",
    "flops_per_token",
    "resolve_backend",
]
