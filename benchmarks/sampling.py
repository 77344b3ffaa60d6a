"""Measure our KV-cached sampler against Hugging Face `generate` on a same-size Llama, plus training MFU; write JSON + markdown."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from argen.host import cpu_extensions, cpu_model, native_bf16
from argen.model import GPT, GPTConfig, flops_per_token, onednn_available, pack_for_cpu
from argen.sample import SamplingConfig, classifier_free_guidance, sample_image_tokens
from tokenizers_img.serialization import atomic_write_bytes


def build_pair(cfg: GPTConfig, *, seed: int):
    """Our GPT and a transformers LlamaForCausalLM with the same layers, widths, heads, FFN and vocab (eval, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ours = GPT(cfg).eval()
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size + 1, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).eval()
    return ours, hf


def hf_processor(*, image_offset: int, num_codes: int, cfg_scale: float | None):
    """A LogitsProcessor restricting HF `generate` to the image codes and, on a [cond; uncond] batch, applying
    our `classifier_free_guidance` to both halves (HF samples each row on its own, so the uncond rows draw their own
    tokens from the guided logits: the same work per step as ours, 2B rows, though not exact CFG)."""
    from transformers import LogitsProcessor

    class ImageCodesCFG(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            codes = scores[:, image_offset : image_offset + num_codes]  # (R, K)
            if cfg_scale is not None:
                codes = classifier_free_guidance(codes, cfg_scale).repeat(2, 1)  # (2B, K)
            out = torch.full_like(scores, float("-inf"))
            out[:, image_offset : image_offset + num_codes] = codes
            return out

    return ImageCodesCFG()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_sampling(models: dict, hfs: dict, cfg: GPTConfig, *, batch: int, cfg_scale: float, num_codes: int, reps: int,
                     seed: int) -> dict:
    """Seconds per batch for each of our `models` (name -> (GPT, KV-cache dtype or None)) and HF `generate` on each of
    `hfs` (name -> LlamaForCausalLM; "hf" is the float32 one the ratios are against), runs interleaved; best of `reps`."""
    from transformers import LogitsProcessorList

    image_offset = cfg.vocab_size - num_codes
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, image_offset - 1, (batch, cfg.prefix_len), generator=g)
    prefix[:, -1] = image_offset - 1  # BOI
    uncond = torch.zeros(cfg.prefix_len, dtype=torch.long)
    uncond[-1] = image_offset - 1
    sampling = SamplingConfig(temperature=1.0, cfg_scale=cfg_scale)
    rows = torch.cat([prefix, uncond.expand(batch, -1)]) if sampling.uses_cfg else prefix
    processors = LogitsProcessorList([hf_processor(image_offset=image_offset, num_codes=num_codes,
                                                   cfg_scale=cfg_scale if sampling.uses_cfg else None)])
    n = cfg.num_image_tokens

    def run_ours(model: GPT, cache_dtype: torch.dtype | None) -> torch.Tensor:
        return sample_image_tokens(model, prefix, image_offset=image_offset, num_codes=num_codes, uncond_prefix=uncond,
                                   config=sampling, generator=torch.Generator().manual_seed(seed), cache_dtype=cache_dtype)

    def run_hf(hf) -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_k=None,
                               top_p=None, max_new_tokens=n, min_new_tokens=n, logits_processor=processors,
                               pad_token_id=0, eos_token_id=None)

    times: dict[str, list[float]] = {name: [] for name in [*models, *hfs]}
    for rep in range(reps):  # the first rep also warms up; the best rep is reported
        for name, (model, cache_dtype) in models.items():
            start = time.perf_counter()
            codes = run_ours(model, cache_dtype)
            times[name].append(time.perf_counter() - start)
            assert codes.shape == (batch, n), codes.shape
        for name, hf in hfs.items():
            start = time.perf_counter()
            out = run_hf(hf)
            times[name].append(time.perf_counter() - start)
            assert out.shape == (rows.shape[0], cfg.prefix_len + n) and bool((out[:, cfg.prefix_len:] >= image_offset).all())
    best = {name: min(t) for name, t in times.items() if t}
    return {"batch": batch, "cfg_scale": cfg_scale, "rows_per_step": rows.shape[0], "seconds": times,
            "images_per_s": {name: batch / t for name, t in best.items()},
            "speedup_vs_hf": {name: best["hf"] / best[name] for name in models if "hf" in best},
            "speedup_vs_hf_bf16": {name: best["hf bf16"] / best[name] for name in models if "hf bf16" in best}}


def traffic_model(cfg: GPTConfig, *, rows: int, weight_bytes: int) -> dict:
    """Bytes one decode step moves at the mean cache length, per side: the weights once, plus the KV cache.
    Ours reads the cache once (attention); HF's DynamicCache also concatenates it every step (read + write)."""
    mean_len = cfg.prefix_len + (cfg.num_image_tokens - 1) / 2
    kv_fp32 = 4 * 2 * cfg.n_layer * rows * cfg.kv_heads * mean_len * cfg.head_dim
    ours, ours_bf16, hf = weight_bytes + kv_fp32, weight_bytes + kv_fp32 / 2, weight_bytes + 3 * kv_fp32
    return {"rows": rows, "weights_mb": weight_bytes / 1e6, "kv_fp32_mb": kv_fp32 / 1e6,
            "predicted_ratio": hf / ours, "predicted_ratio_bf16_kv": hf / ours_bf16}


def measure_no_cache(ours: GPT, cfg: GPTConfig, *, num_codes: int, seed: int) -> dict:
    """Our sampler with and without the KV cache at batch 1, no CFG (the no-cache path recomputes every step)."""
    image_offset = cfg.vocab_size - num_codes
    prefix = torch.randint(1, image_offset - 1, (1, cfg.prefix_len), generator=torch.Generator().manual_seed(seed))
    prefix[:, -1] = image_offset - 1

    def run(use_cache: bool) -> torch.Tensor:
        return sample_image_tokens(ours, prefix, image_offset=image_offset, num_codes=num_codes,
                                   generator=torch.Generator().manual_seed(seed), use_cache=use_cache)

    cached = min(timed(lambda: run(True)) for _ in range(2))  # the first run warms up
    recomputed = timed(lambda: run(False))
    return {"cache_s": cached, "no_cache_s": recomputed, "speedup": recomputed / cached}


def measure_peak_matmul(*, n: int, reps: int) -> dict:
    """Measured fp32 GEMM FLOP/s, best of `reps` (n x n) @ (n x n) products: torch.matmul (PyTorch's BLAS, MKL on
    x86) and, where available, oneDNN (what `argen.model.onednn.Linear` uses on x86 CPUs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"torch_matmul": 2 * n**3 / min(timed(lambda: torch.matmul(a, b)) for _ in range(reps + 1))}
    if onednn_available():
        out["onednn"] = 2 * n**3 / min(timed(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
                                       for _ in range(reps + 1))
    return out


def measure_training(cfg: GPTConfig, *, batch: int, steps: int, seed: int) -> dict:
    """Forward + cross-entropy + backward + fused AdamW step on random tokens; tokens/s and model FLOP/s (best step)."""
    torch.manual_seed(seed)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    seq = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(seed))
    inputs, targets = seq[:, :-1], seq[:, 1:]  # (B, block_size)

    def step() -> None:
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, AdamW state)
    times = [timed(step) for _ in range(steps)]
    tokens = batch * cfg.block_size
    best = min(times)
    return {"params": model.num_params(), "batch": batch, "seq_len": cfg.block_size, "step_s": times,
            "linears": "oneDNN" if model.lm_head.use_onednn else "F.linear", "tokens_per_s": tokens / best,
            "model_flops_per_s": flops_per_token(cfg, cfg.block_size) * tokens / best,
            "model_flops_per_s_6n": flops_per_token(cfg, 0) * tokens / best}


def to_markdown(payload: dict) -> str:
    s, t, peak = payload["sampling"], payload["training"], payload["peak_flops_per_s"]
    names = list(s[0]["images_per_s"])
    ours = [n for n in names if not n.startswith("hf")]
    vs_bf16 = bool(s[0]["speedup_vs_hf_bf16"])
    lines = [
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {payload['machine']}, torch {payload['torch']}, transformers {payload['transformers']}, "
        f"{payload['threads']} torch threads.",
        "",
        f"Sampling: {payload['sampling_model']}; prefix {payload['prefix_len']} tokens, then {payload['image_tokens']} "
        "image tokens, KV cache on both sides, temperature 1, only image codes sampled. Images/s from the best of "
        f"{payload['reps']} interleaved runs. `ours` is `sample_image_tokens` on the float32 model as built; `ours packed` "
        f"on `pack_for_cpu(model)` (float32, one-time cost {payload['pack_s']:.2f} s, not in the per-batch times); "
        "`ours bf16` on `pack_for_cpu(model, bf16=True)` (the blocks' weights and the KV cache in bfloat16, the rest "
        "float32, as bf16 autocast computes); "
        + (f"`ours compiled` on `pack_for_cpu(model, compile=True)` in the default's precision, whose decode step "
           f"Inductor compiles (one-time cost: {payload['compile_s']:.0f} s to compile and run each setting once "
           "before the timed runs); " if not math.isnan(payload["compile_s"]) else "")  # NaN: --no-compile
        + "`hf` is `generate` on the float32 Llama (its default), `hf bf16` on a bfloat16 copy. "
        f"**`{payload['default']}` is what `argen sample` runs by default on this host.**",
        "",
        "| batch | CFG | rows per step | " + " | ".join(f"{n} images/s" for n in names) + " | "
        + " | ".join(f"{n} vs HF" for n in ours) + (" | " + " | ".join(f"{n} vs HF bf16" for n in ours) if vs_bf16 else "")
        + " |",
        "|" + " --- |" * (3 + len(names) + len(ours) * (1 + vs_bf16)),
    ]
    for r in s:
        cfg = f"scale {r['cfg_scale']:g}" if r["rows_per_step"] > r["batch"] else "off"
        cells = [f"{r['images_per_s'][n]:.3f}" for n in names] + [
            f"**{r['speedup_vs_hf'][n]:.2f}x**" if n == payload["default"] else f"{r['speedup_vs_hf'][n]:.2f}x" for n in ours]
        if vs_bf16:
            cells += [f"{r['speedup_vs_hf_bf16'][n]:.2f}x" for n in ours]
        lines.append(f"| {r['batch']} | {cfg} | {r['rows_per_step']} | " + " | ".join(cells) + " |")
    lines += ["", "Memory-traffic model of one float32 decode step at the mean cache length (fp32 weights read once per step; "
              "ours reads the KV cache once, HF's DynamicCache reads it, then copies it into a new tensor with "
              "torch.cat): the ratio it predicts if both sides ran at the same bandwidth.", "",
              "| rows per step | weights MB | KV cache MB (fp32) | predicted HF / ours | with a bf16 KV cache |",
              "| --- | --- | --- | --- | --- |"]
    for tm in payload["traffic"]:
        lines.append(f"| {tm['rows']} | {tm['weights_mb']:.0f} | {tm['kv_fp32_mb']:.0f} | {tm['predicted_ratio']:.2f}x | "
                     f"{tm['predicted_ratio_bf16_kv']:.2f}x |")
    nc = payload["no_cache"]
    lines += [
        "",
        f"KV cache vs full recompute (`ours packed`, batch 1, no CFG): {nc['cache_s']:.2f} s vs {nc['no_cache_s']:.2f} s "
        f"per image, the cache is {nc['speedup']:.1f}x faster.",
        "",
        f"Training ({payload['train_model']}, {t['params'] / 1e6:.1f}M params, batch {t['batch']} x {t['seq_len']} "
        f"tokens, forward + backward + fused AdamW, {t['linears']} linears): {t['tokens_per_s']:.0f} tokens/s, "
        f"{t['model_flops_per_s'] / 1e9:.1f} GFLOP/s (6N + 12 L C T per token, PaLM).",
        "",
        f"| fp32 GEMM peak measured in this run ({payload['peak_matmul_n']}^3, best of 3 x 10) | GFLOP/s | training MFU | "
        "MFU counting 6N only |",
        "| --- | --- | --- | --- |",
    ]
    for name, flops in peak.items():
        lines.append(f"| {name} | {flops / 1e9:.1f} | {t['model_flops_per_s'] / flops * 100:.1f}% | "
                     f"{t['model_flops_per_s_6n'] / flops * 100:.1f}% |")
    lines += [
        "",
        "MFU is read against the larger of the two peaks (our Linear layers run on oneDNN; on some CPUs MKL's "
        "torch.matmul runs far below it).",
        "",
        "Where the sampling time goes: in fp32 each decode step reads all weights (4 bytes per parameter) and the "
        "KV cache once, on both sides. Ours saves HF's per-step KV-cache concatenation and runs the GEMMs on "
        "oneDNN (prepacked with `pack_for_cpu`) instead of MKL; what is left is bound by memory traffic and "
        "GEMM throughput that HF shares, which caps the ratio at equal precision. `ours bf16` halves the traffic of "
        "the blocks' weights and of the cache. `ours compiled` also removes "
        "most of the rest: Inductor fuses the step's norms, RoPE, cache write, attention over the cached keys and "
        "SwiGLU into a few C++ loops in place of about a thousand eager ops per step.",
        "",
        "HF runs `generate` on the doubled batch [cond; uncond] with a LogitsProcessor that restricts sampling to "
        "the image codes and applies `argen.sample.classifier_free_guidance`, so both sides run 2B rows per step; HF samples "
        "the uncond rows on their own, ours feeds them the cond rows' tokens (exact CFG). Timings on a shared "
        "machine are noisy: compare the ratios within one run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--text-vocab", type=int, default=300, help="text ids; BOI follows, then the image codes")
    parser.add_argument("--num-codes", type=int, default=1024)
    parser.add_argument("--prefix-len", type=int, default=32, help="text tokens + BOI")
    parser.add_argument("--grid", type=int, default=16, help="image tokens = grid x grid")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3, help="runs per sampler setting, the first also warms up")
    parser.add_argument("--train-layers", type=int, default=10)
    parser.add_argument("--train-embd", type=int, default=640)
    parser.add_argument("--train-heads", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-compile", action="store_true", help="skip the `ours compiled` sampler (pack_for_cpu(compile=True))")
    parser.add_argument("--bf16", action="store_true",
                        help="also time bf16 sampling (ours and HF) where bf16 is not native (it is timed where it is)")
    parser.add_argument("--no-native-bf16", action="store_true",
                        help="time as on a CPU without native bf16 (the float32 default); run with ONEDNN_MAX_CPU_ISA=AVX2 "
                             "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 to emulate an AVX2-only host")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/sampling"))
    args = parser.parse_args(argv)
    command = "python benchmarks/sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    vocab = args.text_vocab + 1 + args.num_codes
    cfg = GPTConfig(vocab_size=vocab, prefix_len=args.prefix_len, image_grid=(args.grid, args.grid),
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    peaks = [measure_peak_matmul(n=args.peak_n, reps=10)]  # measured three times: the machine may be shared
    ours, hf = build_pair(cfg, seed=args.seed)
    n_ours, n_hf = ours.num_params(), sum(p.numel() for p in hf.parameters())
    weight_bytes = 4 * (n_ours - ours.tok_emb.weight.numel())  # every matmul weight; the embedding is a row lookup
    assert n_ours == n_hf, f"parameter counts differ: ours {n_ours}, HF {n_hf}"
    native = native_bf16("cpu") and not args.no_native_bf16  # what `argen sample --precision auto` picks on this host
    bf16 = native or args.bf16
    default = "ours bf16" if native else "ours packed"
    models = {"ours": (ours, None)}
    hfs = {"hf": hf, **({"hf bf16": copy.deepcopy(hf).to(torch.bfloat16)} if bf16 else {})}
    pack_s = float("nan")
    if onednn_available():
        start = time.perf_counter()
        packed = pack_for_cpu(ours)
        pack_s = time.perf_counter() - start
        models["ours packed"] = (packed, None)
        if bf16:
            models["ours bf16"] = (pack_for_cpu(ours, bf16=True), None)
    compile_s = float("nan")
    if onednn_available() and not args.no_compile:
        start = time.perf_counter()
        compiled = pack_for_cpu(ours, compile=True, bf16=default == "ours bf16")
        for batch in args.batches:  # compile before timing: batch 1 (one row) gets its own graph, the rest share one
            for scale in (1.0, args.cfg_scale):
                measure_sampling({"ours compiled": (compiled, None)}, {}, cfg, batch=batch, cfg_scale=scale,
                                 num_codes=args.num_codes, reps=1, seed=args.seed)
        compile_s = time.perf_counter() - start
        print(f"ours compiled: compiled and ran each setting once in {compile_s:.1f} s", flush=True)
        models["ours compiled"] = (compiled, None)
    sampling = []
    for batch in args.batches:
        for scale in (1.0, args.cfg_scale):
            row = measure_sampling(models, hfs, cfg, batch=batch, cfg_scale=scale, num_codes=args.num_codes,
                                   reps=args.reps, seed=args.seed)
            print(json.dumps(row), flush=True)
            sampling.append(row)
    no_cache = measure_no_cache(models["ours packed" if "ours packed" in models else "ours"][0], cfg,
                                num_codes=args.num_codes, seed=args.seed)
    print(json.dumps({"no_cache": no_cache}), flush=True)
    del ours, hf, hfs, models
    peaks.append(measure_peak_matmul(n=args.peak_n, reps=10))
    train_cfg = GPTConfig(vocab_size=vocab, prefix_len=args.prefix_len, image_grid=(args.grid, args.grid),
                          n_layer=args.train_layers, n_head=args.train_heads, n_embd=args.train_embd)
    training = measure_training(train_cfg, batch=args.train_batch, steps=args.train_steps, seed=args.seed)
    peaks.append(measure_peak_matmul(n=args.peak_n, reps=10))
    peak = {name: max(p[name] for p in peaks) for name in peaks[0]}  # the best seen: contention only lowers it
    payload = {
        "command": command, "machine": f"{cpu_model()} ({', '.join(cpu_extensions())}), {os.cpu_count()} CPUs, torch kernels "
                   f"{torch.backends.cpu.get_cpu_capability()}, oneDNN ISA cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}",
        "default": default,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "sampling_model": f"{args.n_layer} layers x {args.n_embd} dims, {args.n_head} heads, FFN {cfg.ffn_dim}, "
                          f"vocab {vocab}, {n_ours / 1e6:.1f}M params (both)",
        "prefix_len": args.prefix_len, "image_tokens": cfg.num_image_tokens, "reps": args.reps, "pack_s": pack_s,
        "compile_s": compile_s,
        "sampling": sampling, "no_cache": no_cache,
        "traffic": [traffic_model(cfg, rows=r, weight_bytes=weight_bytes) for r in sorted({x["rows_per_step"] for x in sampling})],
        "train_model": f"{args.train_layers} layers x {args.train_embd} dims, FFN {train_cfg.ffn_dim}",
        "training": training, "peak_flops_per_s": peak, "peak_matmul_n": args.peak_n,
        "mfu": training["model_flops_per_s"] / max(peak.values()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("sampling.json", json.dumps(payload, indent=2)), ("sampling.md", to_markdown(payload))):
        atomic_write_bytes(args.out / name, text.encode())
    print(to_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
