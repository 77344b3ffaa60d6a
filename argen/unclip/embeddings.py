"""Embedding shards: a dataset's captions with their CLIP text and image embeddings, computed once and read by the priors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from argen.saved import SavedDirError
from argen.unclip.clip import ClipEncoder
from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir

META_FILE = "meta.json"
FORMAT = "argen-embeddings"


class EmbeddingShardError(SavedDirError):
    """An embedding shard is incomplete, or was computed by another CLIP than the one in use."""


def encode_embedding_shard(clip: ClipEncoder, dataset, out: str | Path, *, dataset_spec: str, split: str,
                           limit: int | None = None, batch_size: int = 256, overwrite: bool = False,
                           seed: int | None = None, resolution: int | None = None) -> Path:
    """Encode the first `limit` items of `dataset` (items {"image": (3, H, W) in [-1, 1], "caption": str, and
    optionally "key": str}) with `clip` and write, atomically, a directory:

        captions.json      list of N captions
        keys.json          list of N item keys (e.g. "shapes/train/s0/0000042"; row i is dataset item i)
        text_embeds.npy    (N, D) float32, CLIP text embeddings (projected, not normalised)
        image_embeds.npy   (N, D) float32, CLIP image embeddings (projected, not normalised)
        meta.json          {"format", "clip_sha256", "dataset", "split", "seed", "resolution", "count", "dim"}

    `seed` and `resolution` are recorded as given (how to rebuild the dataset: the shapes scene seed, the image side).
    """
    out = Path(out)
    if (out / META_FILE).is_file() and not overwrite:
        raise FileExistsError(f"{out} already holds an embedding shard; pass overwrite=True (--overwrite) to replace it.")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise ValueError(f"nothing to encode: the {dataset_spec}/{split} dataset has {len(dataset)} items and limit={limit}.")
    captions: list[str] = []
    keys: list[str] = []
    text, image = [], []
    for start in tqdm(range(0, n, batch_size), desc=f"CLIP-encoding {dataset_spec}/{split}", unit="batch"):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        caps = [item["caption"] for item in items]
        captions += caps
        keys += [str(item.get("key", start + k)) for k, item in enumerate(items)]
        text.append(clip.encode_text(caps).embeds.cpu())
        image.append(clip.encode_images(torch.stack([item["image"] for item in items])).cpu())
    text_embeds, image_embeds = torch.cat(text).numpy(), torch.cat(image).numpy()

    def write(tmp: Path) -> None:
        for name, array in (("text_embeds.npy", text_embeds), ("image_embeds.npy", image_embeds)):
            np.save(tmp / name, array.astype(np.float32))
        atomic_write_bytes(tmp / "captions.json", json.dumps(captions).encode())
        atomic_write_bytes(tmp / "keys.json", json.dumps(keys).encode())
        meta = {"format": FORMAT, "clip_sha256": clip.sha256, "dataset": dataset_spec, "split": split, "seed": seed,
                "resolution": resolution, "count": n, "dim": int(text_embeds.shape[1])}
        atomic_write_bytes(tmp / META_FILE, json.dumps(meta, indent=2).encode())

    return atomic_write_dir(out, write)


class EmbeddingShard(torch.utils.data.Dataset):
    """An embedding shard read back: item i is {"caption": str, "text_embed": (D,), "image_embed": (D,)} float32.

    `clip_sha256`, when given, must equal the shard's: embeddings of one CLIP are meaningless to a model trained on
    another's.
    """

    def __init__(self, path: str | Path, *, clip_sha256: str | None = None) -> None:
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise EmbeddingShardError(f"{path} is not an embedding shard ({META_FILE} missing); write one with "
                                      "argen.unclip.embeddings.encode_embedding_shard.")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise EmbeddingShardError(f"{meta_file} has format {self.meta.get('format')!r}, expected {FORMAT!r}.")
        if clip_sha256 is not None and self.meta["clip_sha256"] != clip_sha256:
            raise EmbeddingShardError(f"{path} was encoded by CLIP {self.meta['clip_sha256'][:12]}, but the CLIP in use is "
                                      f"{clip_sha256[:12]}; re-encode the shard with this CLIP.")
        self.path = path
        self.captions: list[str] = json.loads((path / "captions.json").read_text())
        keys_file = path / "keys.json"  # absent in shards written before keys were recorded
        self.keys: list[str] | None = json.loads(keys_file.read_text()) if keys_file.is_file() else None
        self.text_embeds = torch.from_numpy(np.load(path / "text_embeds.npy"))
        self.image_embeds = torch.from_numpy(np.load(path / "image_embeds.npy"))
        if not len(self.captions) == len(self.text_embeds) == len(self.image_embeds) == self.meta["count"]:
            raise EmbeddingShardError(f"{path}: captions ({len(self.captions)}), text embeddings ({len(self.text_embeds)}) "
                                      f"and image embeddings ({len(self.image_embeds)}) disagree with count "
                                      f"{self.meta['count']}; the shard is damaged, re-encode it.")
        if self.keys is not None and len(self.keys) != len(self.captions):
            raise EmbeddingShardError(f"{path}: {len(self.keys)} keys for {len(self.captions)} captions; the shard is "
                                      "damaged, re-encode it.")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.captions[i], "text_embed": self.text_embeds[i], "image_embed": self.image_embeds[i]}

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


class EmbeddingSet(torch.utils.data.ConcatDataset):
    """Embedding shards read back and concatenated, each checked against one CLIP's sha256: items as EmbeddingShard's,
    and the whole set's captions and (N, D) float32 text and image embeddings."""

    def __init__(self, paths: list[str], *, clip_sha256: str) -> None:
        self.shards = [EmbeddingShard(p, clip_sha256=clip_sha256) for p in paths]
        super().__init__(self.shards)
        self.paths = [str(s.path) for s in self.shards]
        self.captions = [c for s in self.shards for c in s.captions]
        self.text_embeds = torch.cat([s.text_embeds for s in self.shards])
        self.image_embeds = torch.cat([s.image_embeds for s in self.shards])
