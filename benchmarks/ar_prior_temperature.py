"""AR prior val metrics at several token temperatures and CFG scales, beside the trivial priors, on the first val
items of a stack written by `argen train unclip`; writes JSON + markdown.

    python benchmarks/ar_prior_temperature.py DIR   # DIR: the output of `argen train unclip -o DIR`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from argen.eval.prior_metrics import trivial_priors
from argen.sample import SamplingConfig
from argen.tasks.ar_prior import score_ar_prior
from argen.unclip.ar_prior_sampling import ARPrior, ARPriorSamplingConfig
from argen.unclip.embeddings import EmbeddingSet
from tokenizers_img.serialization import atomic_write_bytes

SETTINGS = [(1.0, 1.0), (0.7, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 2.0), (0.5, 2.0)]  # (temperature, CFG scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", type=Path, help="a directory written by `argen train unclip` (prior_ar, emb_train, emb_val)")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/ar_prior_temperature"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prior = ARPrior.load(args.stack / "prior_ar" / "final")
    train = EmbeddingSet([str(args.stack / "emb_train")], clip_sha256=prior.clip_sha256)
    val = EmbeddingSet([str(args.stack / "emb_val")], clip_sha256=prior.clip_sha256)
    nearest = trivial_priors(train, val, max_items=args.items)["nearest_caption"].summary("")
    rows = [{"prior": "nearest training caption", **_pick(nearest, "")}]
    for temperature, cfg_scale in SETTINGS:
        start = time.perf_counter()
        config = ARPriorSamplingConfig(tokens=SamplingConfig(temperature=temperature, cfg_scale=cfg_scale))
        metrics = score_ar_prior(prior, val, config=config, seed=0, max_items=args.items).summary("")
        rows.append({"prior": f"AR, T {temperature:g}, CFG {cfg_scale:g}", **_pick(metrics, ""),
                     "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    command = "python benchmarks/ar_prior_temperature.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": command, "stack": str(args.stack), "clip_sha256": prior.clip_sha256, "items": args.items, "rows": rows}
    lines = [f"Command: `{command}` ({args.items} val items, seed 0; ranks among those items' true images)", "",
             "| prior | cosine to the true image embedding | top-1 | top-5 |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['prior']} | {r['cosine']:.3f} | {100 * r['top1']:.1f}% | {100 * r['top5']:.1f}% |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / "results.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


def _pick(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: metrics[prefix + k] for k in ("cosine", "top1", "top5")}


if __name__ == "__main__":
    raise SystemExit(main())
