"""Attention time per backend in one run, float32 and bf16: causal forward + backward at training shapes, and one
decode query over a KV cache (the sampler's step). Shows where `resolve_backend("auto", ...)` should pick `math`
over `sdpa` on this machine (CPU_BF16_MATH_MAX_KEYS for training; `cpu_flash_decodes_bf16` for decoding).

    python benchmarks/attention_backends.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from argen.host import host_info
from argen.model.attention import CPU_BF16_MATH_MAX_KEYS, attention, resolve_backend
from argen.model.gpt import KV_CHUNK, kv_capacity
from tokenizers_img.serialization import atomic_write_bytes

# (batch, heads, tokens, head_dim): the demo GPT (4 heads, 93 tokens), the sampling benchmark's training model
# (10 heads, 287 tokens), and sequences from 128 to 1024 tokens.
DEFAULT_SHAPES = ((32, 4, 93, 64), (32, 4, 128, 64), (32, 4, 160, 64), (16, 8, 224, 64), (8, 10, 287, 64),
                  (8, 8, 320, 64), (8, 8, 384, 64), (8, 8, 512, 64), (4, 16, 1024, 64))
# Decoding: (rows, heads, cached keys, head_dim) of the 8 x 512 sampling-benchmark GPT at batch 8 with CFG, at the
# start, middle and end of a 16x16 image after a 32-token prefix.
DECODE_SHAPES = ((16, 8, 48, 64), (16, 8, 160, 64), (16, 8, 288, 64))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_mean_seconds(run, reps: int) -> float:
    """One warm-up call of `run`, then the best of 3 means over `reps` calls, in seconds."""
    run()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def time_backend(shape: tuple[int, int, int, int], dtype: torch.dtype, backend: str, *, reps: int, seed: int) -> float:
    """Best-of-3 mean milliseconds of one causal forward + backward."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(3))

    def run() -> None:
        attention(q, k, v, backend=backend, causal=True).float().sum().backward()

    return best_mean_seconds(run, reps) * 1e3


@torch.inference_mode()
def time_decode(shape: tuple[int, int, int, int], dtype: torch.dtype, backend: str, *, reps: int, seed: int) -> float:
    """Best-of-3 mean microseconds of one query per row against `keys` cached positions, as the sampler's CPU decode
    step passes them: the KV cache's whole contiguous capacity (whole KV_CHUNKs) with the unwritten tail masked."""
    rows, heads, keys, dim = shape
    capacity = kv_capacity(keys)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, heads, capacity, dim, generator=g).to(dtype) for _ in range(2))
    mask = (torch.arange(capacity) < keys).expand(rows, 1, 1, capacity)
    run = lambda: attention(q, k, v, backend=backend, causal=False, mask=mask)  # noqa: E731
    return best_mean_seconds(run, reps * 20) * 1e6


def to_markdown(rows: list[dict], decode: list[dict], command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             "Causal self-attention, forward + backward (sum of the output), best of 3 means; `sdpa` and `math` "
             "alternate per row. `auto` is what resolve_backend picks for that row "
             f"(CPU_BF16_MATH_MAX_KEYS = {CPU_BF16_MATH_MAX_KEYS}).", "",
             "| batch x heads x tokens x head dim | dtype | sdpa ms | math ms | math / sdpa | auto |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {r['dtype']} | {r['sdpa_ms']:.1f} | {r['math_ms']:.1f} "
                     f"| {r['math_ms'] / r['sdpa_ms']:.2f} | {r['auto']} |")
    lines += ["", f"One decode query per row over a KV cache (its contiguous capacity, whole chunks of {KV_CHUNK} positions, "
              "the unwritten tail masked), forward only, best of 3 means. "
              "`auto` is resolve_backend's eager pick.", "",
              "| rows x heads x cached keys x head dim | dtype | sdpa µs | math µs | math / sdpa | auto |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in decode:
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {r['dtype']} | {r['sdpa_us']:.0f} | {r['math_us']:.0f} "
                     f"| {r['math_us'] / r['sdpa_us']:.2f} | {r['auto']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="forward + backward passes per timing")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/attention_backends"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/attention_backends.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = f"{host_info(measure_bf16=False).describe()}, {platform.machine()}, torch {torch.__version__}"
    decode = []
    for shape in DECODE_SHAPES:
        for name in args.dtypes:
            dtype = DTYPES[name]
            us = {b: time_decode(shape, dtype, b, reps=args.reps, seed=args.seed) for b in ("sdpa", "math")}
            auto = resolve_backend("auto", "cpu", q_len=1, k_len=shape[2], dtype=dtype, grad=False)
            decode.append({"shape": list(shape), "dtype": name, "sdpa_us": us["sdpa"], "math_us": us["math"],
                           "auto": auto})
            print(f"decode {shape} {name}: sdpa {us['sdpa']:.0f} µs, math {us['math']:.0f} µs, auto -> {auto}", flush=True)
    rows = []
    for shape in DEFAULT_SHAPES:
        for name in args.dtypes:
            dtype = DTYPES[name]
            ms = {b: time_backend(shape, dtype, b, reps=args.reps, seed=args.seed) for b in ("sdpa", "math")}
            auto = resolve_backend("auto", "cpu", q_len=shape[2], k_len=shape[2], dtype=dtype)
            rows.append({"shape": list(shape), "dtype": name, "sdpa_ms": ms["sdpa"], "math_ms": ms["math"], "auto": auto})
            print(f"{shape} {name}: sdpa {ms['sdpa']:.1f} ms, math {ms['math']:.1f} ms, auto -> {auto}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(rows, decode, command, machine)
    payload = {"command": command, "machine": machine, "rows": rows, "decode": decode}
    atomic_write_bytes(args.out / "attention_backends.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(args.out / "attention_backends.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
