"""Training-step time of the demo GPT (configs/gpt/shapes_32.yaml's shape) per setting, in one run: the attention
backend, dropout and torch.compile, under bf16 autocast where the CPU computes bf16 natively (as the demo trains).

    python benchmarks/gpt_train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from argen.model.gpt import GPT, GPTConfig
from argen.train.loop import native_bf16
from tokenizers_img.serialization import atomic_write_bytes

# (name, attention backend, dropout, compile)
SETTINGS = (
    ("sdpa, dropout 0.1 (the demo before)", "sdpa", 0.1, False),
    ("sdpa, no dropout", "sdpa", 0.0, False),
    ("auto (math under bf16 autocast), no dropout (the demo now)", "auto", 0.0, False),
    ("auto, no dropout, torch.compile", "auto", 0.0, True),
)


def time_setting(backend: str, dropout: float, compile_: bool, *, args, bf16: bool) -> dict:
    cfg = GPTConfig(vocab_size=args.vocab, prefix_len=args.prefix_len, image_grid=(8, 8), n_layer=4, n_head=4,
                    n_embd=256, abs_pos_emb=True, dropout=dropout, code_features=32, attn_backend=backend)
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
    idx = torch.randint(0, args.vocab, (args.batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(args.seed))

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
    parser.add_argument("--prefix-len", type=int, default=29, help="text tokens + BOI (the demo: 28 + 1)")
    parser.add_argument("--vocab", type=int, default=614, help="the demo's joint vocabulary")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing (best of 3 timings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/gpt_train_step"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/gpt_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bf16 = native_bf16()
    rows = []
    for name, backend, dropout, compile_ in SETTINGS:
        r = time_setting(backend, dropout, compile_, args=args, bf16=bf16)
        rows.append({"setting": name, **r})
        print(f"{name}: {r['seconds_per_step']:.3f} s/step (first two steps {r['first_two_steps_s']:.1f} s)", flush=True)
    base = rows[0]["seconds_per_step"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
             f"bf16 autocast: {bf16}", "",
             f"The demo GPT's shape (4 layers x 256, code features 32), batch {args.batch} x "
             f"{args.prefix_len + 64 - 1} tokens, forward + backward + clip + AdamW; best of 3 x {args.steps} steps.", "",
             "| setting | s / step | speed-up | first two steps (s, compilation included) |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seconds_per_step']:.3f} | {base / r['seconds_per_step']:.2f}x "
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
