"""WebDataset tar shards of captioned images (`KEY.jpg|.png|.jpeg|.webp` + `KEY.txt`), for data too big for a folder.

Needs the optional `webdataset` package: `pip install 'argen[webdataset]'`.
Keys are `SHARD_FILE_NAME/SAMPLE_KEY`. The train/val split hashes that key exactly as image folders do
(`argen.data.imagefolder.split_of`). A sample with no image, an undecodable image, or a missing or empty
caption is skipped; its key travels in the "skipped" list of the next item this worker yields (or, at the end
of a worker's stream, of the last one), so `SkipReport` in the main process sees it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from argen.data.imagefolder import SPLITS, split_of
from argen.data.skips import DatasetError, Skip
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


def expand_shards(pattern: str) -> list[str]:
    """Shard list from a brace pattern (`data/shard-{000..009}.tar`) or a directory of `.tar` files.

    Local shards must exist; URLs and `pipe:` commands are passed through unchecked.
    """
    path = Path(pattern).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DatasetError(f"no .tar shards in directory {path}.")
        return shards
    wds = require_webdataset()
    shards = list(wds.shardlists.expand_urls(pattern))
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).expanduser().is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(f"webdataset pattern {pattern!r}: {len(missing)} of {len(shards)} shards not found: {', '.join(missing[:5])}{more}.")
    if not shards:
        raise DatasetError(f"webdataset pattern {pattern!r} matches no shards.")
    return shards


class WebDatasetShards(IterableDataset):
    """Captioned images streamed from tar shards, split across DataLoader workers (and nodes) by shard.

    Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str, "skipped": list[Skip]}.
    Batch with `argen.data.skips.collate`.
    """

    index_skips: tuple[Skip, ...] = ()  # nothing is checked before streaming

    def __init__(self, pattern: str, *, split: str = "train", resolution: int, val_fraction: float = 0.05) -> None:
        require_webdataset()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} for webdataset shards, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.pattern, self.split, self.resolution, self.val_fraction = pattern, split, resolution, val_fraction
        self.shards = expand_shards(pattern)

    def _decode(self, key: str, sample: dict[str, Any]) -> dict[str, Any] | Skip:
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
            return Skip(key, f"no image ({'/'.join('.' + e for e in IMAGE_KEYS)}) in sample, found: {found}")
        raw_caption = sample.get(CAPTION_KEY)
        caption = raw_caption.decode("utf-8", errors="replace").strip() if isinstance(raw_caption, bytes) else ""
        if not caption:
            return Skip(key, "empty caption" if raw_caption is not None else f"no caption (.{CAPTION_KEY})")
        try:
            image = load_image_tensor(sample[ext], self.resolution, name=f"{key}.{ext}")
        except ImageDecodeError as err:
            return Skip(key, err.reason)
        return {"image": image, "caption": caption, "key": key, "skipped": []}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wds = require_webdataset()
        stream = wds.WebDataset(
            self.shards, shardshuffle=False, nodesplitter=wds.split_by_node,
            handler=wds.warn_and_continue, empty_check=False,
        )
        held: dict[str, Any] | None = None  # one item of lookahead, so trailing skips still have a carrier
        pending: list[Skip] = []
        for sample in stream:
            key = f"{Path(str(sample.get('__url__', '?'))).name}/{sample['__key__']}"
            if self.split != "all" and split_of(key, self.val_fraction) != self.split:
                continue
            item = self._decode(key, sample)
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
            # No valid sample in this worker's shards: no item can carry the skips, so say so here.
            warnings.warn("no decodable samples in this worker's shards; skipped:\n" + "\n".join(f"  {s.key}: {s.reason}" for s in pending))
