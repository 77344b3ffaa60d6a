"""Training-step time of the demo GPT (argen/configs/gpt/shapes_32.yaml's architecture) per setting, in one run: the attention
backend, dropout and torch.compile, under bf16 autocast where the CPU computes bf16 natively (as the demo trains).

    python benchmarks/gpt_train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from argen.demo import GPT_CONFIG
from argen.host import native_bf16
from argen.layout import SequenceLayout
from argen.model.gpt import GPT, GPTConfig
from argen.tasks.gpt import GPTExperiment, gpt_config_for
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes

# (name, attention backend, dropout, compile)
SETTINGS = (
    ("sdpa, dropout 0.1 (the demo before)", "sdpa", 0.1, False),
    ("sdpa, no dropout", "sdpa", 0.0, False),
    ("auto (math under bf16 autocast), no dropout (the demo now)", "auto", 0.0, False),
    ("auto, no dropout, torch.compile", "auto", 0.0, True),
)


def demo_gpt_config(args) -> GPTConfig:
    """The demo GPT's architecture (argen/configs/gpt/shapes_32.yaml) at the demo tokenizers' sizes (given as arguments:
    they come from the trained BPE and the VQ config, not from the GPT config)."""
    experiment = load_config(GPT_CONFIG, GPTExperiment)
    layout = SequenceLayout(text_vocab_size=args.text_vocab, pad_id=0, text_len=experiment.data.text_len,
                            num_codes=args.num_codes, image_grid=(args.grid, args.grid))
    return gpt_config_for(experiment.model, layout)


def time_setting(base: GPTConfig, backend: str, dropout: float, compile_: bool, *, args, bf16: bool) -> dict:
    cfg = dataclasses.replace(base, dropout=dropout, attn_backend=backend)
    torch.manual_seed(args.seed)
    model = GPT(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if bf16:  # as accelerate does it: autocast inside the (possibly compiled) forward
        forward = model.forward

        def autocast_forward(*a, **k):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(*a, **k)

        model.forward = autocast_forward
    if compile_:
        model.compile()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1),
                        generator=torch.Generator().manual_seed(args.seed))

    def step() -> None:
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    step()
    warmup_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        best = min(best, (time.perf_counter() - start) / args.steps)
    return {"seconds_per_step": best, "first_two_steps_s": warmup_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-vocab", type=int, default=357, help="the demo BPE's vocabulary")
    parser.add_argument("--num-codes", type=int, default=256, help="the demo VQ's codebook")
    parser.add_argument("--grid", type=int, default=8, help="the demo VQ's code grid side (32 px / 4)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing (best of 3 timings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/gpt_train_step"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/gpt_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bf16 = native_bf16()
    base = demo_gpt_config(args)
    rows = []
    for name, backend, dropout, compile_ in SETTINGS:
        r = time_setting(base, backend, dropout, compile_, args=args, bf16=bf16)
        rows.append({"setting": name, **r})
        print(f"{name}: {r['seconds_per_step']:.3f} s/step (first two steps {r['first_two_steps_s']:.1f} s)", flush=True)
    reference_s = rows[0]["seconds_per_step"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
             f"bf16 autocast: {bf16}", "",
             f"The demo GPT (`{GPT_CONFIG.name}`: {base.n_layer} layers x {base.n_embd}, code features "
             f"{base.code_features}), batch {args.batch} x {base.block_size} tokens, forward + backward + clip + AdamW; "
             f"best of 3 x {args.steps} steps.", "",
             "| setting | s / step | speed-up | first two steps (s, compilation included) |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seconds_per_step']:.3f} | {reference_s / r['seconds_per_step']:.2f}x "
                     f"| {r['first_two_steps_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "gpt_train_step.json", json.dumps({"command": command, "bf16": bf16, "rows": rows},
                                                                   indent=2).encode())
    atomic_write_bytes(args.out / "gpt_train_step.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
