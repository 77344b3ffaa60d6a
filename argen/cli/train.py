"""`argen train MODEL CONFIG [key=value ...]`: build the experiment from YAML and run it through the shared loop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    models = p.add_subparsers(dest="model", metavar="MODEL")
    t = models.add_parser("tokenizer", help="train a VQ-VAE / VQGAN image tokenizer")
    t.add_argument("config", help="YAML experiment, e.g. configs/tokenizer/shapes_32.yaml")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=2000 optimizer.lr=3e-4")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    t.set_defaults(func=run_train_tokenizer)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from argen.tasks.tokenizer import TOKENIZER_DIR, TokenizerExperiment, train_tokenizer
    from tokenizers_img.config import load_config

    experiment = load_config(args.config, TokenizerExperiment, args.overrides)
    result = train_tokenizer(experiment, resume=args.resume)
    print(json.dumps(result.eval, indent=2))
    print(f"tokenizer saved to {result.artifacts_dir / TOKENIZER_DIR}; metrics in {Path(experiment.train.out_dir) / 'metrics.json'}")
    return 0
