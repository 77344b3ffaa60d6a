"""Pre-extracted image-code shards: a numpy memmap of codes plus captions (and their token ids, once per text
tokenizer), written resumably by one or many processes, read for GPT training.

A shard directory holds `meta.json`, `codes.npy` (N, h*w) int16/int32, `captions.jsonl` (one {"text", "key"} per
row) and, per text tokenizer and length, the captions' token ids (`text_ids-<sha256[:16]>-<text_len>.bin`, unpadded,
with `.offsets.npy` and a `.json` summary). While `encode_to_shard` runs, the directory holds `plan.json` and
`units/`: the work is cut into units (blocks of items, or one tar shard each), each written atomically when done, so
a killed job resumes at the unit it was in, on any number of processes; the last step merges the units in order.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.data.skips import Skip, SkipReport, collate
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir, remove_output

CODES_NAME = "codes.npy"
CAPTIONS_NAME = "captions.jsonl"
META_NAME = "meta.json"
PLAN_NAME = "plan.json"
UNITS_DIR = "units"
MAX_UNIT_ITEMS = 4096  # items per unit of a map-style dataset: at most this much work is redone after a kill


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


def map_random(path: str | Path, *, dtype: np.dtype | None = None) -> np.ndarray:
    """A read-only memory map of a .npy file (or, given `dtype`, of a raw one) for random access: the kernel is told
    not to read ahead (madvise MADV_RANDOM), which would read ~128 KB around every row a batch picks at random."""
    with open(path, "rb") as fh:
        if dtype is None:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{path} is .npy format {version}; argen reads 1.0 and 2.0.")
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(fh)
            if fortran:
                raise ValueError(f"{path} holds a Fortran-ordered array; argen writes C order.")
        else:
            shape = (os.fstat(fh.fileno()).st_size // np.dtype(dtype).itemsize,)
        offset = fh.tell()
        if not int(np.prod(shape)):
            return np.zeros(shape, dtype=dtype)  # an empty file cannot be mapped
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offset)


def _dtype_for(num_codes: int) -> np.dtype:
    return np.dtype(np.int16) if num_codes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def read_meta(path: str | Path) -> CodeShardMeta:
    """The meta.json of a code shard; a shard that `encode_to_shard` has not finished is named as such."""
    file = Path(path) / META_NAME
    plan = Path(path) / PLAN_NAME
    if plan.is_file():
        units = json.loads(plan.read_text())["units"]
        done = len(list((Path(path) / UNITS_DIR).glob("unit-*.json")))
        raise ValueError(f"code shard {path} is incomplete ({done}/{units} units written): finish it with "
                         "`argen tokenize ... --resume`.")
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
        if n and (codes.min() < 0 or codes.max() >= self.meta.num_codes):
            raise ValueError(f"codes span [{codes.min()}, {codes.max()}], outside [0, {self.meta.num_codes}) of shard "
                             f"{self.path}.")
        self.codes[start : start + n] = codes
        self.codes.flush()
        with open(self.path / CAPTIONS_NAME, "a") as fh:
            for caption, key in zip(captions, keys):
                fh.write(json.dumps({"text": caption, "key": key}) + "\n")
        self.meta = CodeShardMeta(**{**asdict(self.meta), "done": start + n, "grid": self.meta.grid})
        self._write_meta()


def _caption_rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path / CAPTIONS_NAME) as fh:
        for line in fh:
            yield json.loads(line)


class CodeShardDataset(torch.utils.data.Dataset):
    """Reads a complete code shard: item i is {"codes": LongTensor (h*w,), "caption": str, "key": str}.

    Codes are a memmap; captions and keys are read on first use only (`captions`, `keys`).
    """

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
        self.codes = map_random(self.path / CODES_NAME)
        self._rows: list[dict[str, str]] | None = None

    @property
    def captions(self) -> list[str]:
        return [r["text"] for r in self._caption_table()]

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self._caption_table()]

    def _caption_table(self) -> list[dict[str, str]]:
        if self._rows is None:
            self._rows = list(_caption_rows(self.path))
        return self._rows

    def __len__(self) -> int:
        return self.meta.num_items

    def __getitem__(self, i: int) -> dict:
        row = self._caption_table()[i]
        return {"codes": torch.from_numpy(self.codes[i].astype(np.int64)), "caption": row["text"], "key": row["key"]}


# ------------------------------------------------------------------ caption token ids


def caption_ids_name(tokenizer_sha256: str, text_len: int) -> str:
    """File stem of a shard's caption ids for one text tokenizer and prefix length."""
    return f"text_ids-{tokenizer_sha256[:16]}-{text_len}"


class CaptionIds:
    """A shard's captions as token ids, cut to text_len, stored without padding: `tokens` holds every caption's ids
    one after the other (uint16, or int32 for vocabularies over 65536) and `offsets` (N + 1,) int64 where each
    begins, both memory-mapped. `info` counts what was cut and which ids occur (computed once, when written)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, info: dict[str, Any]) -> None:
        self.tokens, self.offsets, self.info = tokens, offsets, info

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, index: np.ndarray) -> np.ndarray:
        """(len(index), text_len) int64: the captions of rows `index`, right-padded with the pad id."""
        text_len = self.info["text_len"]
        start, stop = self.offsets[index], self.offsets[index + 1]
        present = np.arange(text_len) < (stop - start)[:, None]  # (B, text_len): where a caption has a token
        out = np.full((len(index), text_len), self.info["pad_id"], dtype=np.int64)
        out[present] = self.tokens[(start[:, None] + np.arange(text_len))[present]]
        return out

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.offsets.nbytes


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_captions(text_tokenizer: Any, captions: list[str], *, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (N, text_len) int64 right-padded and cut, untruncated lengths (N,)): the ids `TextTokenizer.encode_ids`
    gives, computed by the tokenizer's batch encoder (Rust, on every core) instead of one call per caption."""
    clean = [c.encode("utf-8", errors="replace").decode("utf-8") for c in captions]  # as TextTokenizer.tokenize does
    encoded = text_tokenizer.tokenizer.encode_batch(clean, add_special_tokens=True)
    rows = np.full((len(clean), text_len), text_tokenizer.pad_id, dtype=np.int64)
    lengths = np.empty(len(clean), dtype=np.int64)
    for i, enc in enumerate(encoded):
        ids = enc.ids
        lengths[i] = len(ids)
        rows[i, :min(len(ids), text_len)] = ids[:text_len]
    return rows, lengths


def _ranges(flags: np.ndarray) -> list[list[int]]:
    """Indices where `flags` is set, as inclusive [first, last] runs."""
    idx = np.flatnonzero(flags)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]]
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def write_caption_ids(path: str | Path, text_tokenizer: Any, *, text_len: int, chunk: int = 65536) -> CaptionIds:
    """Tokenize a complete shard's captions once into `text_ids-<sha>-<len>.bin` (the ids, unpadded) +
    `.offsets.npy` + `.json`, streaming captions.jsonl in chunks (memory does not grow with the shard). Atomic: the
    .json, written last, marks them done. `seen` ids include the pad id when a caption is shorter than text_len."""
    path = Path(path)
    meta = read_meta(path)
    stem = caption_ids_name(text_tokenizer.sha256, text_len)
    dtype = _id_dtype(text_tokenizer.vocab_size)
    tmp = path / f".{stem}.bin.tmp-{os.getpid()}"
    offsets = np.zeros(meta.num_items + 1, dtype=np.int64)
    seen = np.zeros(text_tokenizer.vocab_size, dtype=bool)
    empty = truncated = longest = row = 0
    rows_iter = _caption_rows(path)
    with open(tmp, "wb") as fh:
        while row < meta.num_items:
            captions = [r["text"] for _, r in zip(range(chunk), rows_iter)]
            if not captions:
                raise ValueError(f"{path / CAPTIONS_NAME} has {row} lines but meta says {meta.num_items} rows: the shard "
                                 "is damaged.")
            block, lengths = encode_captions(text_tokenizer, captions, text_len=text_len)
            kept = np.minimum(lengths, text_len)
            fh.write(block[np.arange(text_len) < kept[:, None]].astype(dtype).tobytes())
            offsets[row + 1:row + 1 + len(block)] = offsets[row] + np.cumsum(kept)
            seen[np.unique(block)] = True
            empty += int((lengths == 0).sum())
            truncated += int((lengths > text_len).sum())
            longest = max(longest, int(lengths.max()))
            row += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    buf = io.BytesIO()
    np.save(buf, offsets)
    atomic_write_bytes(path / f"{stem}.offsets.npy", buf.getvalue())
    os.replace(tmp, path / f"{stem}.bin")
    info = {"text_tokenizer_sha256": text_tokenizer.sha256, "text_len": text_len, "pad_id": text_tokenizer.pad_id,
            "vocab_size": text_tokenizer.vocab_size, "dtype": dtype.name, "num_items": meta.num_items,
            "num_tokens": int(offsets[-1]), "num_empty": empty, "num_truncated": truncated, "longest": longest,
            "ids_seen": _ranges(seen)}
    atomic_write_bytes(path / f"{stem}.json", json.dumps(info, indent=1).encode())
    return open_caption_ids(path, text_tokenizer, text_len=text_len)


def open_caption_ids(path: str | Path, text_tokenizer: Any, *, text_len: int) -> CaptionIds:
    """The caption ids of a shard for this tokenizer and length, memory-mapped (shared by every process that maps
    them); FileNotFoundError when they were never written (`write_caption_ids`)."""
    path = Path(path)
    stem = caption_ids_name(text_tokenizer.sha256, text_len)
    info_file = path / f"{stem}.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} not found: the captions of {path} have no token ids for this tokenizer yet.")
    info = json.loads(info_file.read_text())
    offsets = map_random(path / f"{stem}.offsets.npy")
    tokens = map_random(path / f"{stem}.bin", dtype=np.dtype(info["dtype"]))
    meta = read_meta(path)
    if (len(offsets) != meta.num_items + 1 or len(tokens) != info["num_tokens"] or info["text_len"] != text_len
            or info["text_tokenizer_sha256"] != text_tokenizer.sha256):
        raise ValueError(f"{path / (stem + '.bin')} holds {len(tokens)} ids of {len(offsets) - 1} captions for tokenizer "
                         f"{info['text_tokenizer_sha256'][:12]}, not the {info['num_tokens']} of {meta.num_items} for "
                         f"{text_tokenizer.sha256[:12]}: delete its three files to write them again.")
    return CaptionIds(tokens, offsets, info)


def caption_ids(path: str | Path, text_tokenizer: Any, *, text_len: int) -> CaptionIds:
    """The shard's caption ids, written first if needed by the main process while the others wait (every process of
    a job calls this)."""
    from argen.train.processes import process_state

    state = process_state()
    try:
        return open_caption_ids(path, text_tokenizer, text_len=text_len)
    except FileNotFoundError:
        pass
    if state.is_main_process:
        print(f"{path}: tokenizing its captions once (text_len {text_len}) ...")
        write_caption_ids(path, text_tokenizer, text_len=text_len)
    state.wait_for_everyone()
    return open_caption_ids(path, text_tokenizer, text_len=text_len)


# ------------------------------------------------------------------ encoding a dataset into a shard


def _plan(dataset: Any, *, n: int | None, processes: int, workers: int) -> dict[str, Any]:
    """How the work is cut: blocks of items of a map-style dataset, or one unit per tar shard of a stream."""
    if n is None:
        return {"kind": "shards", "units": len(dataset.shards), "shards": [Path(s).name for s in dataset.shards]}
    size = max(1, min(MAX_UNIT_ITEMS, math.ceil(n / (4 * processes * max(workers, 1)))))
    return {"kind": "items", "num_items": n, "unit_items": size, "units": max(1, math.ceil(n / size))}


class _UnitBatches(torch.utils.data.IterableDataset):
    """Batches of this process's units, split over DataLoader workers; each batch holds items of one unit only.

    Yields {"unit": u, "last": whether the unit ends with it, "batch": collated items}.
    """

    def __init__(self, dataset: Any, plan: dict[str, Any], units: list[int], *, batch_size: int) -> None:
        self.dataset, self.plan, self.units, self.batch_size = dataset, plan, units, batch_size

    def _items(self, unit: int) -> Iterator[dict[str, Any]]:
        if self.plan["kind"] == "shards":
            yield from self.dataset.shard_items(unit)
            return
        size = self.plan["unit_items"]
        for i in range(unit * size, min((unit + 1) * size, self.plan["num_items"])):
            yield self.dataset[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            held = None  # one batch of lookahead, to mark the unit's last
            for batch in self._batched(unit):
                if held is not None:
                    yield {"unit": unit, "last": False, "batch": held}
                held = batch
            yield {"unit": unit, "last": True, "batch": held}  # None for a shard with no usable sample

    def _batched(self, unit: int) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        for item in self._items(unit):
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield collate(chunk)
                chunk = []
        if chunk:
            yield collate(chunk)


def _unit_files(out: Path, unit: int) -> tuple[Path, Path]:
    return out / UNITS_DIR / f"unit-{unit:06d}.npy", out / UNITS_DIR / f"unit-{unit:06d}.json"


def _write_unit(out: Path, unit: int, codes: list[np.ndarray], rows: list[dict[str, str]], skips: list[Skip],
                *, width: int, dtype: np.dtype) -> None:
    """One finished unit: its codes, then (the mark that it is done) its captions, keys and skips."""
    npy, js = _unit_files(out, unit)
    buf = io.BytesIO()
    np.save(buf, np.concatenate(codes).astype(dtype) if codes else np.zeros((0, width), dtype=dtype))
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_bytes(js, json.dumps({"rows": rows, "skipped": [[s.key, s.reason] for s in skips]}).encode())


def encode_to_shard(model, dataset, out: str | Path, *, dataset_spec: str, split: str, limit: int | None = None,
                    batch_size: int = 128, device: str | torch.device = "cpu", resume: bool = False,
                    overwrite: bool = False, tokenizer_hash: str, num_workers: int = 0,
                    text_tokenizer: Any = None, text_len: int | None = None) -> CodeShardMeta:
    """Encode the first `limit` items of `dataset` with the VQ `model` into a code shard at `out`.

    Runs on every process of a job (torchrun, `accelerate launch`): units go to processes round-robin and to their
    DataLoader workers (`num_workers`, which decode the images) in turn; the main process merges the units at the
    end. A map-style dataset gives rows in index order; a stream (`WebDatasetShards`) rows in shard order, skipped
    samples left out, `limit` keeping the first rows after every shard is read. `resume` continues an interrupted
    shard at its first unfinished unit, on any number of processes; `overwrite` replaces an existing one that
    argen wrote (a directory without argen's marker is refused, never deleted). With `text_tokenizer`, the
    captions' token ids for `text_len` are written too (`write_caption_ids`). Skipped items (corrupt,
    caption-less) are counted and named at the end. Returns the finished shard's meta.
    """
    from argen.train.processes import process_state

    state = process_state()
    out = Path(out)
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    n = None if streamed else (len(dataset) if limit is None else min(limit, len(dataset)))
    grid = (model.config.grid_size, model.config.grid_size)
    settings = {"dataset": dataset_spec, "split": split, "grid": list(grid), "num_codes": model.num_codes,
                "tokenizer_hash": tokenizer_hash, "resolution": model.config.resolution, "limit": limit}
    if state.is_main_process:
        _open_shard(out, settings, dataset, n=n, resume=resume, overwrite=overwrite, processes=state.num_processes,
                    workers=num_workers)
    state.wait_for_everyone()
    if (out / PLAN_NAME).is_file():
        plan = json.loads((out / PLAN_NAME).read_text())
        todo = [u for u in range(state.process_index, plan["units"], state.num_processes)
                if not _unit_files(out, u)[1].is_file()]
        _encode_units(model, dataset, out, plan, todo, batch_size=batch_size, device=device, num_workers=num_workers,
                      show=state.is_main_process, split=split, processes=state.num_processes)
        state.wait_for_everyone()
        if state.is_main_process:
            _merge_units(out, plan, settings, index_skips=getattr(dataset, "index_skips", ()))
    state.wait_for_everyone()
    meta = read_meta(out)
    if text_tokenizer is not None:
        if text_len is None:
            raise ValueError("text_tokenizer needs text_len: the caption prefix length the GPT will use.")
        caption_ids(out, text_tokenizer, text_len=text_len)
    return meta


def _open_shard(out: Path, settings: dict[str, Any], dataset: Any, *, n: int | None, resume: bool, overwrite: bool,
                processes: int, workers: int) -> None:
    """Claim `out` and write its plan (main process): refuse what exists unless resumed or overwritten, and a plan
    written with other settings."""
    if overwrite:
        remove_output(out)  # only a directory argen wrote; anything else is refused and kept
    claim_output_dir(out, kind="code-shard")  # a folder of the user's own is refused, never written into
    plan_file = out / PLAN_NAME
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if not resume:
            raise FileExistsError(f"{out} holds an unfinished code shard; pass --resume to continue it or --overwrite "
                                  "to replace it.")
        mismatched = [f"{k}: {old['settings'].get(k)!r} != {v!r}" for k, v in settings.items() if old["settings"].get(k) != v]
        if mismatched:
            raise ValueError(f"cannot resume {out}: it was written with different settings ({', '.join(mismatched)}). "
                             "Write to a new directory or pass --overwrite.")
        return
    if (out / META_NAME).is_file():
        meta = read_meta(out)
        if not resume:
            raise FileExistsError(f"{out} already holds a code shard; pass --resume to continue it or --overwrite to replace it.")
        if not meta.complete:
            raise ValueError(f"{out} holds a partial shard written row by row by an older argen; pass --overwrite.")
        print(f"{out}: complete ({meta.num_items} items), nothing to do")
        return
    plan = {"settings": settings, **_plan(dataset, n=n, processes=processes, workers=workers)}
    atomic_write_bytes(plan_file, json.dumps(plan, indent=1).encode())


def _encode_units(model: Any, dataset: Any, out: Path, plan: dict[str, Any], todo: list[int], *, batch_size: int,
                  device: Any, num_workers: int, show: bool, split: str, processes: int) -> None:
    """Encode this process's unfinished units, each written when its last batch is encoded."""
    grid = plan["settings"]["grid"]
    width, dtype = grid[0] * grid[1], _dtype_for(plan["settings"]["num_codes"])
    loader = torch.utils.data.DataLoader(_UnitBatches(dataset, plan, todo, batch_size=batch_size), batch_size=None,
                                         num_workers=min(num_workers, max(len(todo), 1)))
    pending: dict[int, tuple[list[np.ndarray], list[dict[str, str]], list[Skip]]] = {}
    total = plan.get("num_items")
    with tqdm(total=total, desc=f"tokenize {split}", unit="img", disable=not show) as bar:
        for part in loader:
            codes, rows, skips = pending.setdefault(part["unit"], ([], [], []))
            batch = part["batch"]
            if batch is not None:
                skips.extend(batch["skipped"])
                with torch.inference_mode():
                    codes.append(model.encode(batch["image"].to(device)).flatten(1).cpu().numpy())  # (B, h*w)
                rows.extend({"text": c, "key": k} for c, k in zip(batch["caption"], batch["key"]))
                bar.update(len(batch["caption"]) * processes)
            if part["last"]:
                _write_unit(out, part["unit"], *pending.pop(part["unit"]), width=width, dtype=dtype)


def _merge_units(out: Path, plan: dict[str, Any], settings: dict[str, Any], *, index_skips: Any = ()) -> None:
    """Concatenate the units in order into codes.npy + captions.jsonl + meta.json, then drop the plan and units."""
    units = range(plan["units"])
    missing = [u for u in units if not _unit_files(out, u)[1].is_file()]
    if missing:
        raise RuntimeError(f"{out}: units {missing[:8]} were not written; rerun with --resume.")
    counts = [len(json.loads(_unit_files(out, u)[1].read_text())["rows"]) for u in units]
    limit = settings["limit"]
    total = sum(counts) if limit is None else min(limit, sum(counts))
    for name in (META_NAME, CODES_NAME, CAPTIONS_NAME):  # what a merge killed half-way left
        (out / name).unlink(missing_ok=True)
    meta = CodeShardMeta(num_items=total, done=0, grid=tuple(settings["grid"]), num_codes=settings["num_codes"],
                         tokenizer_hash=settings["tokenizer_hash"], dataset=settings["dataset"], split=settings["split"],
                         resolution=settings["resolution"])
    writer = CodeShardWriter(out, meta, resume=False)
    skips = SkipReport(index_skips)
    for u in units:
        npy, js = _unit_files(out, u)
        body = json.loads(js.read_text())
        skips.extend(tuple(s) for s in body["skipped"])
        keep = min(len(body["rows"]), total - writer.meta.done)
        if keep:
            writer.append(np.load(npy)[:keep], [r["text"] for r in body["rows"][:keep]],
                          [r["key"] for r in body["rows"][:keep]])
    (out / PLAN_NAME).unlink()
    remove_units = out / UNITS_DIR
    for f in remove_units.iterdir():
        f.unlink()
    remove_units.rmdir()
    print(f"{out}: {total} items, grid {tuple(settings['grid'])}, {settings['num_codes']} codes; {skips.summary()}")
