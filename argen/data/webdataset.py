"""WebDataset tar shards of captioned images (`KEY.jpg|.png|.jpeg|.webp` + `KEY.txt`), for data too big for a folder.

Needs the optional `webdataset` package: `pip install 'argen[webdataset]'`.
Keys are `SHARD_FILE_NAME/SAMPLE_KEY`. Shards are split over processes and DataLoader workers: slot
`rank * num_workers + worker` reads shards slot, slot + S, ... (S slots in all). Training streams them endlessly,
each slot in its own seeded shard order per epoch, and every item says where its slot continues after it, so a run
resumes mid-shard; `argen tokenize` reads one shard at a time (`shard_items`). The train/val split hashes that key exactly as image folders do
(`argen.data.imagefolder.split_of`). Shards whose file name starts with "heldout" (`heldout-000.tar`), or that sit in
a folder named heldout (a directory spec also reads DIR/heldout/*.tar), are the "heldout" split instead, as an image
folder's heldout/ folder is: captions whose images are never trained on, evaluated on their own. A sample with no image, an undecodable, too large or too thin image, or a
missing, empty or non-UTF-8 caption is skipped; its key travels in the "skipped" list of the next item this
worker yields (or, at the end of a worker's stream, of the last one), so `SkipReport` in the main process sees it.

`pipe:CMD` shards (which webdataset runs in a shell) are refused unless the caller passes `allow_pipe=True`:
a dataset spec may come from a shared config file, and a config file must not be able to run commands.
Local shards are opened by absolute path, so a file named `pipe:...tar` is only ever a file.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from argen.data.imagefolder import HELDOUT, SPLITS, split_of
from argen.data.skips import DatasetError, Skip, printable
from argen.data.transforms import ImageDecodeError, load_image_tensor

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
CAPTION_KEY = "txt"


def require_webdataset():
    """Import the optional `webdataset` package, or raise an ImportError that says which extra to install."""
    try:
        import webdataset
    except ImportError as err:
        raise ImportError(
            "webdataset shards need the optional 'webdataset' package, which is not installed. "
            "Install it with: pip install 'argen[webdataset]'"
        ) from err
    return webdataset


def _is_pipe(shard: str) -> bool:
    """Whether webdataset's gopen would hand `shard` to a shell: its URL scheme, as gopen parses it, is pipe."""
    try:
        return urlsplit(shard).scheme == "pipe"  # lower-cased, leading spaces and control characters dropped
    except ValueError:  # not a URL at all (gopen's urlparse fails the same way): nothing is run
        return False


def is_heldout_shard(shard: str) -> bool:
    """Whether a shard belongs to the "heldout" split: its file name starts with "heldout" or its folder is named
    heldout (for URLs, of the URL's path)."""
    path = PurePosixPath(urlsplit(shard).path if "://" in shard else Path(shard).as_posix())
    return path.name.startswith(HELDOUT) or path.parent.name == HELDOUT


def expand_shards(pattern: str, *, allow_pipe: bool = False) -> list[str]:
    """Shard list from a brace pattern (`data/shard-{000..009}.tar`) or a directory of `.tar` files (and of its
    heldout/ folder).

    Local shards must exist and are returned as absolute paths; URLs are passed through unchecked; a `pipe:`
    shard raises DatasetError unless allow_pipe=True.
    """
    path = Path(pattern).expanduser()
    if not _is_pipe(pattern) and path.is_dir():
        shards = sorted(str(p.absolute()) for p in [*path.glob("*.tar"), *path.glob(f"{HELDOUT}/*.tar")])
        if not shards:
            raise DatasetError(f"no .tar shards in directory {printable(str(path))}.")
        return shards
    wds = require_webdataset()
    shards = list(wds.shardlists.expand_urls(pattern))
    pipes = [s for s in shards if _is_pipe(s)]
    if pipes and not allow_pipe:
        raise DatasetError(
            f"webdataset shard '{printable(pipes[0])}' is a pipe: command, which would run in a shell; refused. "
            "If you trust this spec, pass allow_pipe=True (argen CLI: --allow-pipe).")
    local = {s: str(Path(s).expanduser().absolute()) for s in shards if "://" not in s and not _is_pipe(s)}
    missing = [s for s in local if not Path(local[s]).is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        names = printable(", ".join(missing[:5]))
        raise DatasetError(f"webdataset pattern '{printable(pattern)}': {len(missing)} of {len(shards)} shards not found: {names}{more}.")
    if not shards:
        raise DatasetError(f"webdataset pattern '{printable(pattern)}' matches no shards.")
    return [local.get(s, s) for s in shards]


class WebDatasetShards(IterableDataset):
    """Captioned images streamed from tar shards, split across processes and DataLoader workers by shard.

    Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str, "skipped": list[Skip]}.
    Batch with `argen.data.skips.collate`. allow_pipe: let `pipe:` shards run their shell command.
    Iterating it reads this process's and worker's shards once, in order (the process from torch.distributed).
    `shards` are those of the split: the held-out shards for "heldout", the others for "train" and "val".
    """

    index_skips: tuple[Skip, ...] = ()  # nothing is checked before streaming

    def __init__(
        self, pattern: str, *, split: str = "train", resolution: int, val_fraction: float = 0.05, allow_pipe: bool = False,
    ) -> None:
        require_webdataset()
        if split not in (*SPLITS, HELDOUT):
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, {HELDOUT} for webdataset shards, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.pattern, self.split, self.resolution, self.val_fraction = pattern, split, resolution, val_fraction
        shards = expand_shards(pattern, allow_pipe=allow_pipe)
        self.shards = shards if split == "all" else [s for s in shards if is_heldout_shard(s) == (split == HELDOUT)]
        if not self.shards:
            raise DatasetError(
                f"webdataset pattern '{printable(pattern)}' has no shard for the {split} split: "
                + ("held-out shards are named heldout*.tar or sit in a heldout/ folder." if split == HELDOUT
                   else f"all of its {len(shards)} shards are held-out shards (heldout*.tar or in a heldout/ folder)."))

    def _decode(self, key: str, sample: dict[str, Any]) -> dict[str, Any] | Skip:
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
            return Skip(key, f"no image ({'/'.join('.' + e for e in IMAGE_KEYS)}) in sample, found: {found}")
        raw_caption = sample.get(CAPTION_KEY)
        if raw_caption is None:
            return Skip(key, f"no caption (.{CAPTION_KEY})")
        try:
            caption = raw_caption.decode("utf-8-sig").strip()  # a byte-order mark is accepted and dropped
        except UnicodeDecodeError as err:
            return Skip(key, f"caption (.{CAPTION_KEY}) is not valid UTF-8 (byte 0x{raw_caption[err.start]:02x} at offset {err.start})")
        if not caption:
            return Skip(key, "empty caption")
        try:
            image = load_image_tensor(sample[ext], self.resolution, name=f"{key}.{ext}")
        except ImageDecodeError as err:
            return Skip(key, err.reason)
        return {"image": image, "caption": caption, "key": key, "skipped": []}

    def _shard(self, index: int, *, start: int = 0) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
        """(raw sample number after it, item or Skip) for the samples of shard `index` of this split, from raw
        sample `start` on (the samples before are read, not decoded)."""
        wds = require_webdataset()
        stream = wds.WebDataset([self.shards[index]], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                handler=wds.warn_and_continue, empty_check=False)
        for number, sample in enumerate(itertools.islice(stream, start, None), start=start + 1):
            key = f"{Path(str(sample.get('__url__', '?'))).name}/{sample['__key__']}"
            if self.split in ("all", HELDOUT) or split_of(key, self.val_fraction) == self.split:
                yield number, self._decode(key, sample)

    def shard_items(self, index: int) -> Iterator[dict[str, Any]]:
        """The items of shard `index` of this split, in order, each carrying the skips before it (and the last one
        those after it)."""
        yield from _carry_skips((item for _, item in self._shard(index)), where=self.shards[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _process()
        slot, num_slots = _slot(rank, world)
        mine = range(slot, len(self.shards), num_slots)
        yield from _carry_skips((item for i in mine for _, item in self._shard(i)), where="this worker's shards")

    def training_stream(self, *, seed: int, rank: int, world_size: int,
                        start: dict[str, list[int]] | None) -> IterableDataset:
        """This process's endless share, split over DataLoader workers (argen.train.batches.TrainingStream)."""
        return _TrainingSlots(self, seed=seed, rank=rank, world_size=world_size, start=dict(start or {}))

    def slot_items(self, *, seed: int, slot: int, num_slots: int, start: list[int] | None) -> Iterator[dict[str, Any]]:
        """Slot `slot`'s items epoch after epoch: its shards (slot, slot + num_slots, ...) in a seeded order per epoch.
        Each item carries "stream_position" [slot, epoch, shard, next raw sample]; `start` is such a position."""
        mine = list(range(slot, len(self.shards), num_slots))
        if not mine:
            raise ValueError(f"{len(self.shards)} webdataset shard(s) for {num_slots} slots (processes x DataLoader "
                             "workers): every slot needs a shard; use fewer workers or more shards.")
        epoch, first, sample = (start[1:] if start else (0, 0, 0))
        while True:
            order = np.random.default_rng([seed, epoch, slot]).permutation(mine).tolist()
            found = False
            for i in range(first, len(order)):
                for number, item in self._shard(order[i], start=sample if i == first else 0):
                    if not isinstance(item, Skip):
                        item["stream_position"] = torch.tensor([slot, epoch, i, number])
                        found = True
                    yield item
            if not found and first == 0 and sample == 0:
                raise ValueError(f"no decodable {self.split} sample in slot {slot}'s shards "
                                 f"{[Path(self.shards[i]).name for i in mine][:8]}: nothing to train on.")
            epoch, first, sample = epoch + 1, 0, 0


class _TrainingSlots(IterableDataset):
    """The training stream of one process: each DataLoader worker iterates its own slot (see WebDatasetShards)."""

    def __init__(self, shards: WebDatasetShards, *, seed: int, rank: int, world_size: int, start: dict[str, list[int]]) -> None:
        self.shards, self.seed, self.rank, self.world_size, self.start = shards, seed, rank, world_size, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, num_slots = _slot(self.rank, self.world_size)
        items = self.shards.slot_items(seed=self.seed, slot=slot, num_slots=num_slots, start=self.start.get(str(slot)))
        yield from _carry_skips(items, where=f"slot {slot}")


def _process() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _slot(rank: int, world_size: int) -> tuple[int, int]:
    """(this worker's slot, number of slots): slot = rank * num_workers + worker."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


def _carry_skips(items: Iterable[dict[str, Any] | Skip], *, where: str) -> Iterator[dict[str, Any]]:
    """Items with the skips before each attached to it (one item of lookahead, so the skips after the last item
    travel with it); skips with no item at all to carry them are named in a warning."""
    held: dict[str, Any] | None = None
    pending: list[Skip] = []
    for item in items:
        if isinstance(item, Skip):
            pending.append(item)
            continue
        if held is None:
            item["skipped"] = pending
        else:
            held["skipped"].extend(pending)
            yield held
        held, pending = item, []
    if held is not None:
        held["skipped"].extend(pending)
        yield held
    elif pending:
        lines = "\n".join(f"  {printable(s.key)}: {printable(s.reason)}" for s in pending)
        warnings.warn(f"no decodable samples in {where}; skipped:\n" + lines)
