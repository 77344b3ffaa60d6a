"""How many objects a GPT pipeline draws for two-object relation prompts, per guidance setting: the judge's object
count of every image, beside whole-prompt accuracy. Shows guidance adding objects the caption already named.

    python benchmarks/object_counts.py demo/gpt_run/final --cfg 1 2   # a pipeline, e.g. `argen demo`'s
"""

from __future__ import annotations

import argparse
import collections

import torch

from argen.eval.generation import judge_images, prompt_set
from argen.pipeline import Pipeline
from argen.sample import SamplingConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="a GPT pipeline directory (pipeline.json)")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0], help="guidance scales to compare")
    parser.add_argument("--prompts", type=int, default=100, help="distinct val relation prompts")
    parser.add_argument("-n", type=int, default=2, help="images per prompt")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.pipeline)
    prompts = prompt_set("relation", max_prompts=args.prompts)
    print("| cfg | images | whole prompt | objects drawn: images |\n| --- | --- | --- | --- |")
    for cfg in args.cfg:
        gen = pipe.generate(prompts, n_per_prompt=args.n, sampling=SamplingConfig(cfg_scale=cfg, top_k=args.top_k),
                            seed=args.seed, batch_size=256)
        judged = judge_images(gen.prompts, gen.images)
        counts = collections.Counter(len(r.found.objects) for r in judged)  # the scene the judge parsed
        accuracy = sum(r.correct for r in judged) / len(judged)
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"| {cfg:g} | {len(judged)} | {accuracy:.1%} | {spread} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
