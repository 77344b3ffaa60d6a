"""`argen tokenize` (pre-extract code shards for GPT training) and `argen reconstruct` (originals beside reconstructions)."""

from __future__ import annotations

import argparse
from pathlib import Path

from argen.cli.args import add_dataset_options, dataset_options, device, int_in, positive_int, seed
from argen.train.processes import ends_processes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="encode a dataset into code shards (numpy memmap + captions) for GPT training; "
                       "runs on every process of `accelerate launch -m argen tokenize ...`, writing one shard set")
    p.add_argument("--tokenizer", required=True, help="directory of a saved VQ tokenizer (config.json + model.safetensors)")
    p.add_argument("--dataset", default="shapes", help="shapes | shapes:TEMPLATES (e.g. shapes:relation) | imagefolder:PATH | webdataset:PATTERN")
    p.add_argument("--split", action="append", help="split(s) to encode (default: train and val)")
    p.add_argument("--limit", type=positive_int, default=None, help="encode at most this many items per split (shapes train is a 1M-scene stream)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-workers", type=int_in(0, 256), default=0,
                   help="DataLoader worker processes per process that decode the images (default 0: in the process)")
    p.add_argument("--text-tokenizer", default=None,
                   help="also tokenize the captions once into the shard with this tokenizer.json (needs --text-len)")
    p.add_argument("--text-len", type=positive_int, default=None, help="caption tokens in the GPT's prefix (data.text_len)")
    p.add_argument("--seed", type=seed, default=0, help="shapes scene seed")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: this process's GPU under accelerate launch, else cuda when available)")
    p.add_argument("-o", "--out", required=True, help="output directory; each split is written to OUT/SPLIT/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run")
    add_dataset_options(p)
    g.add_argument("--overwrite", action="store_true", help="replace existing shards (only ones argen wrote)")
    p.set_defaults(func=run_tokenize)

    r = sub.add_parser("reconstruct", help="write originals beside their reconstructions, with PSNR")
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--dataset", default="shapes")
    r.add_argument("--split", default="val")
    r.add_argument("-n", type=positive_int, default=16, help="number of images")
    r.add_argument("--seed", type=seed, default=0, help="which images: a seeded random draw over the split (and the shapes scene seed)")
    r.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("-o", "--out", required=True, help="output PNG")
    add_dataset_options(r)
    r.set_defaults(func=run_reconstruct)


def _default_device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


@ends_processes
def run_tokenize(args: argparse.Namespace) -> int:
    from argen.data.codes import encode_to_shard
    from argen.data.registry import build_dataset
    from argen.text import TextTokenizer
    from argen.train.processes import process_state
    from tokenizers_img.serialization import claim_output_dir, pretrained_hash
    from tokenizers_img.vq_model import VQModel

    if (args.text_tokenizer is None) != (args.text_len is None):
        raise ValueError("--text-tokenizer and --text-len go together: the caption ids are written for one tokenizer "
                         "and one prefix length.")
    state = process_state()
    device = args.device or ("cpu" if state.device.type == "cpu" else str(state.device))
    text = TextTokenizer.load(args.text_tokenizer) if args.text_tokenizer is not None else None
    model = VQModel.from_pretrained(args.tokenizer, device=device)
    digest = pretrained_hash(args.tokenizer)
    if state.is_main_process:
        claim_output_dir(args.out, kind="code-shards")
    state.wait_for_everyone()
    for split in args.split or ["train", "val"]:
        dataset = build_dataset(args.dataset, split=split, resolution=model.config.resolution, seed=args.seed,
                                **dataset_options(args))
        encode_to_shard(model, dataset, Path(args.out) / split, dataset_spec=args.dataset, split=split, limit=args.limit,
                        batch_size=args.batch_size, device=device, resume=args.resume, overwrite=args.overwrite,
                        tokenizer_hash=digest, num_workers=args.num_workers, text_tokenizer=text, text_len=args.text_len)
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from argen.data.registry import build_dataset
    from argen.data.skips import collate
    from argen.viz import reconstruction_sheet, save_png
    from tokenizers_img.vq_model import VQModel

    device = _default_device(args)
    model = VQModel.from_pretrained(args.tokenizer, device=device)
    dataset = build_dataset(args.dataset, split=args.split, resolution=model.config.resolution, seed=args.seed,
                            **dataset_options(args))
    n = min(args.n, len(dataset))
    # a seeded draw over the whole split, not the first n files (in an image folder those are often one scene)
    picks = sorted(np.random.default_rng(args.seed).choice(len(dataset), size=n, replace=False).tolist())
    batch = collate([dataset[i] for i in picks])
    sheet, scores = reconstruction_sheet(model, batch["image"].to(device), batch["caption"])
    save_png(sheet, Path(args.out))
    print(f"wrote {args.out}: {n} originals beside reconstructions, mean PSNR {scores.mean():.2f} dB")
    return 0
