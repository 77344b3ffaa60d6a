"""Training-step time of a judge CLIP preset (argen/configs/unclip/judge_clip_64.yaml by default) per precision and
attention implementation, interleaved in one run: transformers' own sdpa and eager attention against argen's
(`argen.model.attention.use_argen_attention`, what `ClipEncoder` runs).

    python benchmarks/clip_train_step.py --threads 2 -o benchmarks/results/clip_train_step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from argen.host import cpu_extensions, cpu_model
from argen.tasks.clip import CLIPExperiment, contrastive_loss
from argen.text import dataset_captions, train_text_tokenizer
from argen.unclip.clip import ClipEncoder
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes

# (name, autocast bf16, attention implementation: "argen" or a transformers one)
SETTINGS = (
    ("float32, transformers sdpa (the judge before)", False, "sdpa"),
    ("float32, argen attention", False, "argen"),
    ("bf16 autocast, transformers sdpa", True, "sdpa"),
    ("bf16 autocast, transformers eager", True, "eager"),
    ("bf16 autocast, argen attention (the judge now, where bf16 is native)", True, "argen"),
)


def build(experiment: CLIPExperiment, tokenizer, implementation: str, *, seed: int) -> torch.nn.Module:
    """The preset's freshly initialised CLIPModel, in train mode, on `implementation`'s attention."""
    config = experiment.model.clip_config(resolution=experiment.data.resolution, text_len=experiment.text_len)
    clip = ClipEncoder.build(config, tokenizer, text_len=experiment.text_len, seed=seed)  # argen attention
    if implementation != "argen":
        clip.model.set_attn_implementation(implementation)
    return clip.model.train()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("argen/configs/unclip/judge_clip_64.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16, help="caption tokens per row (the batch's longest)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timing")
    parser.add_argument("--reps", type=int, default=6, help="interleaved timings per setting; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/clip_train_step"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/clip_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    experiment = load_config(args.config, CLIPExperiment)
    tokenizer = train_text_tokenizer(dataset_captions("shapes", limit=2000), vocab_size=1000)
    batch, res = experiment.train.batch_size, experiment.data.resolution
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, tokenizer.vocab_size, (batch, args.text_tokens), generator=gen)
    ids[:, -1] = tokenizer.pad_id  # the pooled position
    pixels = torch.randn(batch, 3, res, res, generator=gen)

    runs = []
    for name, bf16, implementation in SETTINGS:
        model = build(experiment, tokenizer, implementation, seed=args.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs.append((name, bf16, model, optimizer, []))

    def step(bf16: bool, model, optimizer) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(input_ids=ids, pixel_values=pixels)
        contrastive_loss(out.text_embeds.float(), out.image_embeds.float(), model.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for rep in range(args.reps):
        for name, bf16, model, optimizer, times in runs:
            step(bf16, model, optimizer)  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                step(bf16, model, optimizer)
            times.append((time.perf_counter() - start) / args.steps)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{t[-1]:.3f}" for *_, t in runs), flush=True)

    rows = [{"setting": name, "seconds_per_step": min(times), "timings": times} for name, _, _, _, times in runs]
    reference_s = rows[0]["seconds_per_step"]
    host = f"{cpu_model()} ({', '.join(cpu_extensions()) or 'no vector extensions listed'}), {args.threads} threads"
    m = experiment.model
    lines = [f"Command: `{command}`", "", f"Host: {host}, torch {torch.__version__}", "",
             f"`{args.config}`: vision {m.vision.layers} x {m.vision.width} ({(res // m.patch_size) ** 2 + 1} tokens), "
             f"text {m.text.layers} x {m.text.width} ({args.text_tokens} tokens), batch {batch}; forward, contrastive "
             f"loss, backward, AdamW. Best of {args.reps} interleaved timings of {args.steps} steps.", "",
             "| setting | s / step | speed-up |", "| --- | --- | --- |"]
    lines += [f"| {r['setting']} | {r['seconds_per_step']:.3f} | {reference_s / r['seconds_per_step']:.2f}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "clip_train_step.json",
                       json.dumps({"command": command, "host": host, "rows": rows}, indent=2).encode())
    atomic_write_bytes(args.out / "clip_train_step.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
