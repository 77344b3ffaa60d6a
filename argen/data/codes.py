"""Pre-extracted image-code shards: a numpy memmap of codes plus captions, written resumably, read for GPT training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.data.skips import SkipReport, collate
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir, remove_output

CODES_NAME = "codes.npy"
CAPTIONS_NAME = "captions.jsonl"
META_NAME = "meta.json"


@dataclass(frozen=True)
class CodeShardMeta:
    """What a code shard holds and which tokenizer made it."""

    num_items: int        # rows reserved in codes.npy
    done: int             # rows written so far (resume point)
    grid: tuple[int, int]  # (h, w) of each code grid
    num_codes: int        # codebook size K: codes lie in [0, K)
    tokenizer_hash: str   # pretrained_hash of the VQ tokenizer directory
    dataset: str          # dataset spec the images came from
    split: str
    resolution: int

    @property
    def complete(self) -> bool:
        return self.done == self.num_items


def _dtype_for(num_codes: int) -> np.dtype:
    return np.dtype(np.int16) if num_codes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def read_meta(path: str | Path) -> CodeShardMeta:
    file = Path(path) / META_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {str(path)!r} is not a code shard written by `argen tokenize`.")
    raw = json.loads(file.read_text())
    raw["grid"] = tuple(raw["grid"])
    return CodeShardMeta(**raw)


class CodeShardWriter:
    """Writes codes in chunks; a killed run resumes at `meta.done` with nothing duplicated or lost.

    Order per chunk: codes into the memmap (flushed), captions appended, then meta.json replaced
    atomically. On resume the captions file is cut back to `done` lines, so a crash between the
    steps only repeats the unfinished chunk.
    """

    def __init__(self, path: str | Path, meta: CodeShardMeta, *, resume: bool) -> None:
        self.path = claim_output_dir(path, kind="code-shard")  # a folder of the user's own is refused, never written into
        existing = self.path / META_NAME
        dtype = _dtype_for(meta.num_codes)
        if resume and existing.is_file():
            old = read_meta(self.path)
            mismatched = [k for k in ("num_items", "grid", "num_codes", "tokenizer_hash", "dataset", "split", "resolution")
                          if getattr(old, k) != getattr(meta, k)]
            if mismatched:
                raise ValueError(
                    f"cannot resume {self.path}: it was written with different settings "
                    f"({', '.join(f'{k}: {getattr(old, k)!r} != {getattr(meta, k)!r}' for k in mismatched)}). "
                    "Write to a new directory or pass --overwrite."
                )
            self.meta = old
            self.codes = np.load(self.path / CODES_NAME, mmap_mode="r+")
            self._truncate_captions(old.done)
        else:
            if existing.is_file() and not resume:
                raise FileExistsError(f"{self.path} already holds a code shard; pass --resume to continue it or --overwrite to replace it.")
            self.meta = meta
            shape = (meta.num_items, meta.grid[0] * meta.grid[1])
            self.codes = np.lib.format.open_memmap(self.path / CODES_NAME, mode="w+", dtype=dtype, shape=shape)
            (self.path / CAPTIONS_NAME).write_text("")
            self._write_meta()

    def _truncate_captions(self, keep: int) -> None:
        lines = (self.path / CAPTIONS_NAME).read_text().splitlines(keepends=True)[:keep]
        if len(lines) != keep:
            raise ValueError(f"{self.path / CAPTIONS_NAME} has {len(lines)} lines but meta says {keep} rows are done: the shard is damaged; rewrite it.")
        atomic_write_bytes(self.path / CAPTIONS_NAME, "".join(lines).encode())

    def _write_meta(self) -> None:
        body = asdict(self.meta)
        body["grid"] = list(body["grid"])
        atomic_write_bytes(self.path / META_NAME, json.dumps(body, indent=2).encode())

    def append(self, codes: np.ndarray, captions: list[str], keys: list[str]) -> None:
        """codes: (N, h*w) integers in [0, K); one caption and key per row."""
        n = len(codes)
        start = self.meta.done
        if start + n > self.meta.num_items:
            raise ValueError(f"shard {self.path} is full: {start} + {n} rows > {self.meta.num_items}.")
        self.codes[start : start + n] = codes
        self.codes.flush()
        with open(self.path / CAPTIONS_NAME, "a") as fh:
            for caption, key in zip(captions, keys):
                fh.write(json.dumps({"text": caption, "key": key}) + "\n")
        self.meta = CodeShardMeta(**{**asdict(self.meta), "done": start + n, "grid": self.meta.grid})
        self._write_meta()


class CodeShardDataset(torch.utils.data.Dataset):
    """Reads a complete code shard: item i is {"codes": LongTensor (h*w,), "caption": str, "key": str}."""

    def __init__(self, path: str | Path, *, expect_tokenizer_hash: str | None = None) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if not self.meta.complete:
            raise ValueError(f"code shard {self.path} is incomplete ({self.meta.done}/{self.meta.num_items} rows): finish it with `argen tokenize ... --resume`.")
        if expect_tokenizer_hash is not None and expect_tokenizer_hash != self.meta.tokenizer_hash:
            raise ValueError(
                f"code shard {self.path} was made by tokenizer {self.meta.tokenizer_hash[:12]}, "
                f"but this run uses tokenizer {expect_tokenizer_hash[:12]}: re-run `argen tokenize` with the same tokenizer."
            )
        self.codes = np.load(self.path / CODES_NAME, mmap_mode="r")
        rows = [json.loads(line) for line in (self.path / CAPTIONS_NAME).read_text().splitlines()]
        self.captions = [r["text"] for r in rows]
        self.keys = [r["key"] for r in rows]

    def __len__(self) -> int:
        return self.meta.num_items

    def __getitem__(self, i: int) -> dict:
        return {"codes": torch.from_numpy(self.codes[i].astype(np.int64)), "caption": self.captions[i], "key": self.keys[i]}


def encode_to_shard(model, dataset, out: str | Path, *, dataset_spec: str, split: str, limit: int | None = None,
                    batch_size: int = 128, device: str | torch.device = "cpu", resume: bool = False,
                    overwrite: bool = False, tokenizer_hash: str) -> CodeShardMeta:
    """Encode the first `limit` items of `dataset` with the VQ `model` into a code shard at `out`.

    `resume` continues an interrupted shard (nothing lost or duplicated); `overwrite` replaces an existing one
    that argen wrote (a directory without argen's marker is refused, never deleted).
    Skipped items (corrupt, caption-less) are counted and named at the end. Returns the finished shard's meta.
    """
    from torch.utils.data import DataLoader, Subset

    n = len(dataset) if limit is None else min(limit, len(dataset))
    out = Path(out)
    if overwrite:
        remove_output(out)  # only a directory argen wrote; anything else is refused and kept
    grid = (model.config.grid_size, model.config.grid_size)
    meta = CodeShardMeta(num_items=n, done=0, grid=grid, num_codes=model.num_codes, tokenizer_hash=tokenizer_hash,
                         dataset=dataset_spec, split=split, resolution=model.config.resolution)
    writer = CodeShardWriter(out, meta, resume=resume)
    if writer.meta.complete:
        print(f"{out}: complete ({n} items), nothing to do")
        return writer.meta
    skips = SkipReport.for_dataset(dataset)
    loader = DataLoader(Subset(dataset, range(writer.meta.done, n)), batch_size=batch_size, collate_fn=collate)
    with tqdm(total=n, initial=writer.meta.done, desc=f"tokenize {split}", unit="img") as bar:
        for batch in loader:
            skips.update(batch)
            with torch.inference_mode():
                codes = model.encode(batch["image"].to(device))  # (B, h, w)
            writer.append(codes.flatten(1).cpu().numpy(), batch["caption"], batch["key"])
            bar.update(len(codes))
    print(f"{out}: {n} items, grid {grid}, {model.num_codes} codes; {skips.summary()}")
    return writer.meta
