"""DDP's bucketed all-reduce overlapped with the backward (the loop now) against the hand-written all-reduce of every
gradient after the backward (the loop before): the training-step time of a small GPT on 2 CPU processes (gloo), the
two versions run in turns so that a busy machine slows both alike.

    git archive d9df488 | tar -x -C /tmp/argen_before      # the commit before the change
    python benchmarks/ddp_overlap.py --before /tmp/argen_before --rounds 3 -o benchmarks/results/ddp_overlap

Each run trains `--steps` optimizer steps with `argen train gpt` under torchrun (1 thread per process) on random codes
with shapes captions; its step time is the median over the logged intervals after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from argen.host import cpu_model

REPO = Path(__file__).resolve().parents[1]


def make_data(work: Path, *, items: int, grid: int, num_codes: int) -> tuple[Path, Path]:
    """Random code shards with shapes captions, and a BPE trained on those captions (written once)."""
    from argen.data.codes import CodeShardMeta, CodeShardWriter
    from argen.text import dataset_captions, train_text_tokenizer

    shard, bpe = work / "codes", work / "bpe"
    if not (shard / "meta.json").is_file():
        captions = dataset_captions("shapes", limit=items)
        meta = CodeShardMeta(num_items=items, done=0, grid=(grid, grid), num_codes=num_codes, tokenizer_hash="random",
                             dataset="random", split="train", resolution=grid * 4)
        codes = np.random.default_rng(0).integers(0, num_codes, size=(items, grid * grid))
        CodeShardWriter(shard, meta, resume=False).append(codes, captions, [f"k{i}" for i in range(items)])
        train_text_tokenizer(captions, vocab_size=512).save(bpe)
    return shard, bpe


def write_config(work: Path, args: argparse.Namespace, shard: Path, bpe: Path) -> Path:
    config = work / "gpt.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"n_layer": args.layers, "n_head": args.width // 64, "n_embd": args.width, "dropout": 0.0,
                  "attn_backend": "sdpa"},
        "data": {"train": [str(shard)], "text_tokenizer": str(bpe), "text_len": 16},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "log_every": args.log_every, "save_every": 0,
                  "mixed_precision": "no", "lr_schedule": "constant"},
        "cond_drop_prob": 0.1,
    }))
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_run(code: Path, config: Path, out: Path, *, grad_accum: int) -> float:
    """Seconds per optimizer step of one 2-process run of the argen at `code` (median over logged intervals)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "argen", "train", "gpt", str(config), f"train.out_dir={out}", f"train.grad_accum={grad_accum}",
           "--overwrite"]
    run = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    import csv

    with open(out / "logs" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    batch = json.loads(config.read_text())["train"]["batch_size"]
    return statistics.median(batch / float(r["samples_per_s"]) for r in rows[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout of argen before the change")
    p.add_argument("--after", type=Path, default=REPO, help="the argen to compare (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grad-accum", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="global batch (16 per process)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("/tmp/ddp_overlap"))
    p.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp_overlap")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    shard, bpe = make_data(args.work, items=4096, grid=8, num_codes=256)
    config = write_config(args.work, args, shard, bpe)
    time_run(args.after, config, args.work / "warmup", grad_accum=1)  # writes the caption ids once, outside the timing
    times: dict[str, dict[int, list[float]]] = {"before": {}, "after": {}}
    start = time.perf_counter()
    for r in range(args.rounds):
        for ga in args.grad_accum:
            order = ("before", "after") if r % 2 == 0 else ("after", "before")  # alternate who runs first
            for name in order:
                code = args.before if name == "before" else args.after
                seconds = time_run(code, config, args.work / f"{name}_ga{ga}_r{r}", grad_accum=ga)
                times[name].setdefault(ga, []).append(seconds)
                print(f"round {r} grad_accum {ga} {name}: {seconds:.4f} s/step", flush=True)
    rows = []
    for ga in args.grad_accum:
        before, after = statistics.median(times["before"][ga]), statistics.median(times["after"][ga])
        pairs = [a / b for a, b in zip(times["after"][ga], times["before"][ga])]
        rows.append({"grad_accum": ga, "before_s_per_step": before, "after_s_per_step": after,
                     "ratio_after_over_before": after / before, "ratio_per_round": pairs,
                     "before_runs": times["before"][ga], "after_runs": times["after"][ga]})
    import torch

    report = {"host": cpu_model(), "torch": torch.__version__, "processes": 2, "threads_per_process": 1,
              "model": {"layers": args.layers, "width": args.width}, "global_batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "minutes": round((time.perf_counter() - start) / 60, 1), "results": rows,
              "command": "python benchmarks/ddp_overlap.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_overlap.json").write_text(json.dumps(report, indent=2))
    lines = [f"Command: `{report['command']}`", "",
             f"Host: {report['host']}, torch {report['torch']}; 2 processes (torchrun, gloo) x 1 thread; GPT "
             f"{args.layers} x {args.width}, global batch {args.batch}, {args.steps} steps per run, {args.rounds} rounds, "
             "runs of the two versions in turns.", "",
             "| grad_accum | before: all-reduce after backward (s/step) | after: DDP overlap (s/step) | after / before | per round |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['grad_accum']} | {row['before_s_per_step']:.4f} | {row['after_s_per_step']:.4f} | "
                     f"{row['ratio_after_over_before']:.3f} | {', '.join(f'{x:.3f}' for x in row['ratio_per_round'])} |")
    (args.out / "ddp_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
