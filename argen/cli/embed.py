"""`argen embed`: encode a dataset's captions and images with a CLIP into an embedding shard for the unCLIP priors."""

from __future__ import annotations

import argparse

from argen.cli.args import add_dataset_options, dataset_options, device, positive_int, seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write an embedding shard: captions with their CLIP text and image embeddings")
    p.add_argument("--clip", required=True, help="a CLIP directory (`argen train clip` final/clip, or a local Hugging Face CLIP)")
    p.add_argument("--dataset", default="shapes", help="shapes | imagefolder:PATH | webdataset:PATTERN")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=positive_int, default=None, help="encode the first N items (shapes train is a 1M-scene stream)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="dataset resolution in pixels (default: the CLIP's image size); images are resized to the CLIP's size")
    p.add_argument("--seed", type=seed, default=0, help="shapes scene seed")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    add_dataset_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard at OUT")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from argen.data.registry import build_dataset
    from argen.unclip.clip import ClipEncoder
    from argen.unclip.embeddings import EmbeddingShard, encode_embedding_shard

    out = Path(args.out)
    if (out / "meta.json").is_file() and not args.overwrite:
        raise FileExistsError(f"{out} already holds an embedding shard; pass --overwrite to replace it.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip = ClipEncoder.load(args.clip, device=device)
    resolution = args.resolution or clip.image_size
    dataset = build_dataset(args.dataset, split=args.split, resolution=resolution, seed=args.seed, **dataset_options(args))
    start = time.perf_counter()
    encode_embedding_shard(clip, dataset, out, dataset_spec=args.dataset, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, overwrite=args.overwrite, seed=args.seed, resolution=resolution)
    shard = EmbeddingShard(out, clip_sha256=clip.sha256)
    print(f"wrote {out}: {len(shard)} {args.dataset}/{args.split} items, embedding dim {shard.dim}, CLIP "
          f"{clip.sha256[:12]} ({time.perf_counter() - start:.0f} s)")
    return 0
