"""Skip accounting (and DatasetError, and `printable` names): bad samples are skipped, carried with the batch across DataLoader workers, and reported by name.

Design: a dataset checks what it can cheaply at index time (file exists, caption present) and keeps those
skips in `dataset.index_skips`. A file that fails to decode in `__getitem__` (possibly inside a worker) is
replaced by the next valid sample, deterministically, and its name travels in the returned item under
`item["skipped"]`. `collate` concatenates those lists into `batch["skipped"]`, and a `SkipReport` in the
main process aggregates both sources, de-duplicated by key. Keys stay as found (a file name may hold control
characters, or bytes that are not UTF-8); every message prints them through `printable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch


class DatasetError(ValueError):
    """A dataset cannot be used at all (empty folder, no captions, malformed metadata); the message says why."""


def printable(text: str) -> str:
    """`text` safe to print on one line: control and invisible characters as `\\n`, `\\x1b`, `\\u202e` escapes,
    and bytes that were not UTF-8 (file names decoded with surrogateescape) as `\\xe9`.

    Keys and file names stay raw in `Skip` and on error objects; only messages are escaped.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte, as os.fsdecode and surrogateescape carry it
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])  # '\\n', '\\x1b', '\\u202e', '\\xa0'
    return "".join(out)


@dataclass(frozen=True)
class Skip:
    """One skipped sample: its stable key (relative file name or shard/key) and why."""

    key: str
    reason: str


class SkipReport:
    """Aggregates skipped samples from a dataset's index and from batches; one entry per key."""

    def __init__(self, skips: Iterable[Skip] = ()) -> None:
        self._skips: dict[str, Skip] = {}
        self.extend(skips)

    @classmethod
    def for_dataset(cls, dataset: Any) -> "SkipReport":
        """A report seeded with what `dataset` already skipped while indexing (none for procedural data)."""
        return cls(getattr(dataset, "index_skips", ()))

    def add(self, key: str, reason: str) -> None:
        self._skips.setdefault(key, Skip(key, reason))

    def extend(self, skips: Iterable[Skip | tuple[str, str]]) -> None:
        for s in skips:
            key, reason = (s.key, s.reason) if isinstance(s, Skip) else s
            self.add(key, reason)

    def update(self, batch_or_item: Mapping[str, Any]) -> None:
        """Record the `skipped` entries carried by a collated batch or a single item."""
        self.extend(batch_or_item.get("skipped", ()))

    @property
    def skips(self) -> list[Skip]:
        return sorted(self._skips.values(), key=lambda s: s.key)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.skips]

    def __len__(self) -> int:
        return len(self._skips)

    def summary(self, *, limit: int | None = 50) -> str:
        """Human-readable text: the count, then one line per skipped file with its reason."""
        if not self._skips:
            return "skipped 0 samples"
        skips = self.skips
        shown = skips if limit is None else skips[:limit]
        lines = [f"skipped {len(skips)} sample{'s' if len(skips) != 1 else ''}:"]
        lines += [f"  {printable(s.key)}: {printable(s.reason)}" for s in shown]
        if len(shown) < len(skips):
            lines.append(f"  ... and {len(skips) - len(shown)} more")
        return "\n".join(lines)


def collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors are stacked, strings kept as lists, `skipped` lists concatenated.

    Returns {"image": (B, 3, R, R) float, "caption": list[str], "key": list[str], "skipped": list[Skip]},
    plus any other keys (tensors stacked, everything else as a list).
    """
    if not items:
        raise ValueError("collate got an empty list of items")
    out: dict[str, Any] = {"skipped": [s for it in items for s in it.get("skipped", ())]}
    for name in items[0]:
        if name == "skipped":
            continue
        values = [it[name] for it in items]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
