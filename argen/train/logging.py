"""Metric sinks for training: an append-safe wide CSV and an optional TensorBoard writer."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from tokenizers_img.serialization import atomic_write_bytes


class MetricsCsv:
    """One row per logged step, columns `step` then metric names in first-seen order.

    A metric that appears later (say a discriminator loss that starts at step 1000) widens the header: the file is
    rewritten once, atomically, with empty cells for earlier rows. `truncate_after(step)` drops rows past a resumed step.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = ["step"]
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = list(reader)

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > `step` (rows a resumed run will write again)."""
        kept = [r for r in self.rows if int(r["step"]) <= step]
        if len(kept) != len(self.rows) or self.path.is_file():
            self.rows = kept
            self._rewrite()

    def append(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": str(step), **{k: _fmt(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        stale = any(int(r["step"]) >= step for r in self.rows)  # a step written again replaces the old row
        self.rows = [r for r in self.rows if int(r["step"]) < step] + [row]
        if new or stale or not self.path.is_file():
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow(row)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def tensorboard_writer(log_dir: str | Path, *, purge_step: int | None) -> Any | None:
    """A SummaryWriter (events after `purge_step` dropped on resume), or None with a note when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard is not installed; logging to CSV only (pip install tensorboard).")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
