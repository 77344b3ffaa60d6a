"""One entry point from a dataset spec string (`shapes`, `shapes:TEMPLATES`, `imagefolder:PATH`, `webdataset:PATTERN`)
to a dataset."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from argen.data.skips import collate

SPEC_FORMS = (
    "shapes                      the built-in procedural shapes world (splits: train, val, heldout)",
    "shapes:TEMPLATES            shapes scenes of only these caption templates, comma-separated, e.g. shapes:relation "
    "(of single_full, single_partial, list, count, relation; splits: train, val)",
    "imagefolder:PATH            a folder of images with metadata.jsonl or sidecar .txt captions (splits: train, val, all, "
    "and heldout: the files under PATH/heldout/, never in train or val); "
    "files whose real path leaves PATH (symlinks) are skipped unless follow_symlinks=True, and a bad metadata.jsonl "
    "line is skipped unless strict=True",
    "webdataset:PATTERN          tar shards, a brace pattern like data/shard-{000..009}.tar or a directory of .tar (splits: train, val, all, "
    "and heldout: the shards named heldout*.tar or in a heldout/ folder, never in train or val); "
    "pipe:CMD shards run only with allow_pipe=True, which a config file cannot set",
)


def has_heldout(spec: str) -> bool:
    """Whether the dataset has a "heldout" split: captions whose images are never trained on (shapes' held-out
    compositions, an image folder's heldout/ folder, held-out webdataset shards)."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return not arg
    if kind == "imagefolder":
        from argen.data.imagefolder import HELDOUT

        return (Path(arg) / HELDOUT).is_dir()
    from argen.data.webdataset import expand_shards, is_heldout_shard

    return any(is_heldout_shard(s) for s in expand_shards(arg, allow_pipe=True))  # lists shards, runs nothing


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a dataset spec into (kind, argument); raise ValueError listing the valid forms."""
    kind, sep, arg = spec.partition(":")
    if kind == "shapes" and not sep:
        return kind, ""
    if kind == "shapes" and arg:
        from argen.data.shapes import parse_templates

        try:
            parse_templates(arg)
        except ValueError as e:
            raise ValueError(f"dataset spec {spec!r}: {e}") from None
        return kind, arg
    if kind in ("imagefolder", "webdataset") and sep and arg:
        return kind, arg
    forms = "\n  ".join(SPEC_FORMS)
    raise ValueError(f"unknown dataset spec {spec!r}. Valid forms:\n  {forms}")


def build_dataset(
    spec: str, *, split: str = "train", resolution: int, seed: int = 0,
    val_fraction: float = 0.05, size: int | None = None,
    follow_symlinks: bool = False, strict: bool = False, allow_pipe: bool = False,
) -> Dataset:
    """The dataset a spec names. Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str}.

    `seed` and `size` (number of scenes) apply to shapes; `val_fraction` to image folders and shards;
    `follow_symlinks` (let files and directories outside the folder in) and `strict` (a bad metadata.jsonl line
    refuses the folder) to image folders; `allow_pipe` (run `pipe:` shard commands) to shards. Each is ignored
    by the kinds it does not apply to, so a CLI can pass them whatever the spec.
    Real-data items also carry "skipped"; batch with `argen.data.skips.collate` (or `build_dataloader`).
    """
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        from argen.data.shapes import ShapesDataset, parse_templates

        return ShapesDataset(split, resolution=resolution, size=size, seed=seed, templates=parse_templates(arg))
    if kind == "imagefolder":
        from argen.data.imagefolder import ImageFolderDataset

        return ImageFolderDataset(arg, split=split, resolution=resolution, val_fraction=val_fraction,
                                  follow_symlinks=follow_symlinks, strict=strict)
    from argen.data.webdataset import WebDatasetShards

    return WebDatasetShards(arg, split=split, resolution=resolution, val_fraction=val_fraction, allow_pipe=allow_pipe)


def indexable(dataset: Any, *, max_images: int | None) -> Any:
    """A dataset that can be indexed (an evaluation set): as it is, or the first `max_images` items of a stream, read once
    and held in memory (every process reads the whole stream: torch.distributed is not asked to split it)."""
    if not isinstance(dataset, IterableDataset):
        return dataset
    if max_images is None:
        raise ValueError(f"the val split of {type(dataset).__name__} is a stream: set eval.max_images (its first "
                         "images are read once and kept in memory).")
    shards = getattr(dataset, "shard_items", None)  # WebDatasetShards: every shard in order, whatever the process
    stream = (item for i in range(len(dataset.shards)) for item in shards(i)) if shards is not None else iter(dataset)
    return list(itertools.islice(stream, max_images))


def build_dataloader(
    dataset: Dataset, *, batch_size: int, shuffle: bool = False, num_workers: int = 0,
    generator: torch.Generator | None = None, drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with `collate` (strings as lists, skips carried). Shuffling is ignored for streamed shards."""
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and not iterable, num_workers=num_workers,
        collate_fn=collate, generator=generator, drop_last=drop_last,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )


@dataclass
class DatasetConfig:
    """The data section of a model config.

    spec: `shapes`, `imagefolder:PATH` or `webdataset:PATTERN`; resolution: side of the square crop in pixels;
    val_fraction: share of files hashed into "val" (image folders, shards); num_workers: DataLoader workers;
    seed: shapes scene seed; size: number of shapes scenes per split (None: the shapes default);
    follow_symlinks, strict: image folders only (see build_dataset).
    There is deliberately no allow_pipe field: a config file must not be able to run commands, so `pipe:`
    shards are allowed only by the caller, `build(..., allow_pipe=True)`.
    """

    spec: str = "shapes"
    resolution: int = 32
    val_fraction: float = 0.05
    num_workers: int = 0
    seed: int = 0
    size: int | None = None
    follow_symlinks: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        kind, _ = parse_spec(self.spec)
        if kind != "imagefolder" and (self.follow_symlinks or self.strict):
            raise ValueError(f"follow_symlinks and strict apply to imagefolder specs only, not {self.spec!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"size must be positive or null, got {self.size}")

    def build(self, split: str = "train", *, allow_pipe: bool = False) -> Dataset:
        return build_dataset(
            self.spec, split=split, resolution=self.resolution, seed=self.seed,
            val_fraction=self.val_fraction, size=self.size,
            follow_symlinks=self.follow_symlinks, strict=self.strict, allow_pipe=allow_pipe,
        )

    def dataloader(self, split: str = "train", *, batch_size: int, shuffle: bool = False,
                   generator: torch.Generator | None = None, drop_last: bool = False, allow_pipe: bool = False) -> Any:
        return build_dataloader(
            self.build(split, allow_pipe=allow_pipe), batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            generator=generator, drop_last=drop_last,
        )
