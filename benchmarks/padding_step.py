"""GPT training-step time with the text padding masked (`model.mask_padding`), the batch's all-pad text columns left
out or kept, against the unmasked model, on batches of a pipeline's own code shards (real caption lengths). Same
architecture, random initial weights, bf16 autocast where native, AdamW; settings interleaved, best of `--reps`.

    python benchmarks/padding_step.py --pipeline runs/icons_s0/gpt_run/final --codes runs/icons_s0/codes/train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from argen.host import host_info, native_bf16
from argen.model import GPT
from argen.pipeline import Pipeline
from argen.tasks.gpt import CaptionedCodes, sequence_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline directory: its GPT's architecture and layout")
    parser.add_argument("--codes", nargs="+", required=True, help="code shard directories (argen tokenize)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.pipeline)
    layout = pipe.layout
    data = CaptionedCodes(args.codes, text_tokenizer=pipe.text, text_len=layout.text_len)
    rng = np.random.default_rng(0)
    batches = [data.__getitems__(rng.integers(0, len(data), args.batch_size).tolist()) for _ in range(args.batches)]
    used = [int((b["text_ids"] != layout.pad_id).any(0).sum()) for b in batches]
    bf16 = native_bf16()
    settings = {"unmasked": (False, False), "masked, all columns": (True, False), "masked, all-pad columns left out": (True, True)}
    models = {}
    for name, (mask, _) in settings.items():
        torch.manual_seed(0)
        gpt = GPT(dataclasses.replace(pipe.gpt.config, mask_padding=mask, pad_id=layout.pad_id)).train()
        models[name] = (gpt, torch.optim.AdamW(gpt.parameters()))

    def step(name: str, batch: dict) -> None:
        gpt, opt = models[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sequence_loss(gpt, batch["text_ids"], batch["codes"], layout=layout, drop_padding=settings[name][1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.reps):
        for name in settings:
            for batch in batches[:2]:  # warm-up
                step(name, batch)
            start = time.perf_counter()
            for batch in batches:
                step(name, batch)
            times[name].append((time.perf_counter() - start) / len(batches))
    best = {name: min(t) * 1e3 for name, t in times.items()}
    print(json.dumps({"host": host_info(measure_bf16=False).describe(), "pipeline": args.pipeline,
                      "text_len": layout.text_len, "caption_columns_used_per_batch": used, "bf16": bf16,
                      "ms_per_step": {k: round(v, 1) for k, v in best.items()},
                      "speedup_vs_unmasked": {k: round(best["unmasked"] / v, 2) for k, v in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
