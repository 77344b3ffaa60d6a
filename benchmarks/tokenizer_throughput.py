"""Encode + decode throughput (images/s) of the tokenizer architectures in argen/configs/tokenizer, random weights."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from argen.tasks.tokenizer import TokenizerExperiment
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes
from tokenizers_img.vq_model import VQModel

DEFAULT_CONFIGS = ("argen/configs/tokenizer/shapes_32.yaml", "argen/configs/tokenizer/shapes_32_conv.yaml",
                   "argen/configs/tokenizer/real_64.yaml", "argen/configs/tokenizer/real_256.yaml")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: VQModel, *, batch: int, device: torch.device, dtype: torch.dtype | None, min_seconds: float,
            max_reps: int, generator: torch.Generator) -> dict:
    """Median seconds of encode and of decode for one batch of random images, after one warm-up call.

    Repeats until `min_seconds` of measured time or `max_reps` calls, whichever comes first (at least 3 reps).
    """
    res = model.config.resolution
    images = (torch.rand(batch, model.config.in_channels, res, res, generator=generator) * 2 - 1).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    enc_t, dec_t = [], []
    with torch.inference_mode(), autocast:
        codes = model.encode(images)  # warm-up (allocator, kernels, cudnn autotune)
        model.decode(codes)
        _sync(device)
        while len(enc_t) < max_reps and (len(enc_t) < 3 or sum(enc_t) + sum(dec_t) < min_seconds):
            start = time.perf_counter()
            codes = model.encode(images)
            _sync(device)
            mid = time.perf_counter()
            model.decode(codes)
            _sync(device)
            enc_t.append(mid - start)
            dec_t.append(time.perf_counter() - mid)
    enc, dec = statistics.median(enc_t), statistics.median(dec_t)
    both = statistics.median([a + b for a, b in zip(enc_t, dec_t)])
    return {"batch": batch, "reps": len(enc_t), "encode_s": enc, "decode_s": dec, "encode_decode_s": both,
            "images_per_s": batch / both, "encode_images_per_s": batch / enc, "decode_images_per_s": batch / dec}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for path in args.configs:
        cfg = load_config(path, TokenizerExperiment).model
        torch.manual_seed(args.seed)
        model = VQModel(cfg).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        per_image_s = 0.0
        for batch in sorted(args.batch_sizes):
            if per_image_s * batch > args.max_call_seconds:  # estimated from the previous (smaller) batch
                rows.append({"config": path, "batch": batch, "skipped": f"one call estimated at "
                             f"{per_image_s * batch:.0f} s > --max-call-seconds {args.max_call_seconds:g}"})
                print(f"{path} batch {batch}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
            r = measure(model, batch=batch, device=device, dtype=dtype, min_seconds=args.min_seconds,
                        max_reps=args.max_reps, generator=torch.Generator().manual_seed(args.seed))
            row = {"config": path, "resolution": cfg.resolution, "downsample": cfg.downsample,
                   "grid": cfg.grid_size, "num_codes": cfg.num_codes, "params_m": params / 1e6, **r}
            rows.append(row)
            per_image_s = r["encode_decode_s"] / batch
            print(f"{path} batch {batch}: {row['images_per_s']:.1f} images/s "
                  f"(encode {r['encode_s'] * 1e3:.1f} ms, decode {r['decode_s'] * 1e3:.1f} ms, {r['reps']} reps)",
                  flush=True)
        del model
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "dtype": args.dtype, "torch": torch.__version__, "rows": rows}


def to_markdown(result: dict, *, command: str) -> str:
    setup = (f"Device: {result['device']} ({result['device_name']}), {result['threads']} torch threads, "
             f"{result['dtype']}, torch {result['torch']}. Random weights, random images, torch.inference_mode; "
             "median over repeated calls after one warm-up call.")
    lines = [f"Command: `{command}`", "", setup, "",
             "| config | px | f | grid | codes | params (M) | batch | encode+decode images/s | encode ms | decode ms |",
             "|" + " --- |" * 10]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['config']} | | | | | | {r['batch']} | skipped: {r['skipped']} | | |")
            continue
        lines.append(f"| {r['config']} | {r['resolution']} | {r['downsample']} | {r['grid']}x{r['grid']} | "
                     f"{r['num_codes']} | {r['params_m']:.2f} | {r['batch']} | {r['images_per_s']:.1f} | "
                     f"{r['encode_s'] * 1e3:.1f} | {r['decode_s'] * 1e3:.1f} |")
    if result["device"] == "cpu":
        lines += ["", "CPU figures come from a 2-core machine shared with other jobs: treat them as rough."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="measure at least this long per row")
    parser.add_argument("--max-reps", type=int, default=50)
    parser.add_argument("--max-call-seconds", type=float, default=60.0,
                        help="skip a batch size whose single call is estimated (from the smaller batch) to take longer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/tokenizer_throughput"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device.", file=sys.stderr)
        return 2
    command = "python benchmarks/tokenizer_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    payload = {"command": command, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_" + args.device.split(":")[0]
    text = to_markdown(result, command=command)
    for name, body in ((stem + ".json", json.dumps(payload, indent=2)), (stem + ".md", text)):
        atomic_write_bytes(args.out / name, body.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
