"""Image folders with captions: `metadata.jsonl` (Hugging Face imagefolder convention) or sidecar `.txt` files.

Layout (subfolders allowed):

    root/metadata.jsonl      {"file_name": "a/b.png", "text": "a red circle"}   one JSON object per line
    root/a/b.png
    root/c.jpg + root/c.txt  sidecar caption, used when metadata.jsonl has no entry for the image

A `metadata.jsonl` may sit in any subfolder; its `file_name`s are relative to its own folder. Keys are
file names relative to `root`, with forward slashes.

Split: a file is in "val" when the first 8 bytes of sha1(key), read as a fraction of 2**64, are below
`val_fraction` (default 0.05), else in "train"; "all" takes both. The split depends only on the file name, so
it is stable when files are added, removed or skipped. With fewer than about 1/val_fraction files the val
split may be empty; asking for an empty split raises.

Bad entries never crash a run: a listed file that does not exist, an image with no or an empty caption
(skipped at index time), and a corrupt, truncated or non-image file (skipped when decoded) are recorded as
`Skip`s; see argen.data.skips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torch.utils.data import Dataset

from argen.data.skips import DatasetError, Skip
from argen.data.transforms import IMAGE_EXTENSIONS, ImageDecodeError, load_image_tensor

METADATA_NAME = "metadata.jsonl"
SPLITS = ("train", "val", "all")
CAPTION_HELP = (
    f"Expected captions as {METADATA_NAME} lines like {{\"file_name\": \"a/b.png\", \"text\": \"a red circle\"}} "
    "(file_name relative to the metadata file's folder), or a sidecar text file next to each image "
    "(a/b.png + a/b.txt)."
)


@dataclass(frozen=True)
class CaptionedFile:
    """One usable entry: key (relative posix file name), absolute path, non-empty caption."""

    key: str
    path: Path
    caption: str


@dataclass
class FolderIndex:
    """What `index_folder` found: usable entries sorted by key, and entries skipped at index time."""

    root: Path
    files: list[CaptionedFile]
    skips: list[Skip] = field(default_factory=list)


def split_of(key: str, val_fraction: float) -> str:
    """"val" or "train" for a file key, from a hash of the key alone (deterministic across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "val" if h < val_fraction else "train"


def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_metadata(meta: Path, root: Path) -> dict[str, tuple[str | None, str]]:
    """key -> (caption or None, "file:line") for every line of one metadata.jsonl; malformed lines raise."""
    out: dict[str, tuple[str | None, str]] = {}
    base = meta.parent.relative_to(root)
    with meta.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{meta}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: malformed line, not valid JSON ({err.msg}). {CAPTION_HELP}") from err
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: each line must be a JSON object, got {type(row).__name__}. {CAPTION_HELP}")
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise DatasetError(f"{where}: missing or non-string 'file_name' (got {name!r}). {CAPTION_HELP}")
            text = row.get("text")
            if text is not None and not isinstance(text, str):
                raise DatasetError(f"{where}: 'text' must be a string, got {text!r}.")
            rel = PurePosixPath(base.as_posix()) / PurePosixPath(name.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                raise DatasetError(f"{where}: file_name {name!r} must be a relative path inside {root}.")
            key = str(PurePosixPath(*[p for p in rel.parts if p != "."]))
            if key in out:
                raise DatasetError(f"{where}: file_name {name!r} is listed twice (first at {out[key][1]}).")
            out[key] = (text, where)
    return out


def index_folder(root: str | Path) -> FolderIndex:
    """Find every image and its caption under `root`. Cheap: checks existence and captions, decodes nothing.

    Raises DatasetError for a missing or empty folder, a folder without images, a folder without any
    captions, or a malformed metadata.jsonl line (naming file:line).
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist.")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} is not a directory.")
    all_files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(PurePosixPath(p.relative_to(root).as_posix())))
    if not all_files:
        raise DatasetError(f"image folder {root} is empty. Put images there with captions. {CAPTION_HELP}")

    metadata: dict[str, tuple[str | None, str]] = {}
    for meta in (p for p in all_files if p.name == METADATA_NAME):
        for key, value in _read_metadata(meta, root).items():
            if key in metadata:
                raise DatasetError(f"{value[1]}: {key!r} is already listed at {metadata[key][1]}.")
            metadata[key] = value

    images = {p.relative_to(root).as_posix(): p for p in all_files if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not images and not metadata:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DatasetError(f"no images found in {root} ({len(all_files)} files, none with an image extension: {exts}).")

    files: list[CaptionedFile] = []
    skips: list[Skip] = []
    n_captions = 0
    for key in sorted(set(images) | set(metadata)):
        path = root / key
        if key in metadata:
            caption, where = metadata[key]
            n_captions += 1
            if not path.is_file():
                skips.append(Skip(key, f"listed in {where} but the file does not exist"))
                continue
        else:
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                skips.append(Skip(key, f"no caption (no {METADATA_NAME} entry and no sidecar {sidecar.name})"))
                continue
            n_captions += 1
            caption = sidecar.read_text(encoding="utf-8", errors="replace")
        caption = (caption or "").strip()
        if not caption:
            skips.append(Skip(key, "empty caption"))
            continue
        files.append(CaptionedFile(key, path, caption))

    if n_captions == 0:
        raise DatasetError(f"found {len(images)} images in {root} but no captions at all. {CAPTION_HELP}")
    if not files:
        preview = "; ".join(f"{s.key}: {s.reason}" for s in skips[:5])
        raise DatasetError(f"no usable captioned images in {root}: all {len(skips)} entries were skipped ({preview}).")
    return FolderIndex(root, files, skips)


class ImageFolderDataset(Dataset):
    """Captioned image folder. Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str, "skipped": list[Skip]}.

    A file that fails to decode is replaced by the next decodable file (index i+1, i+2, ... wrapping), and
    its name goes in the item's "skipped" list, so the main process learns about it even from a worker.
    Batch with `argen.data.skips.collate`.
    """

    def __init__(self, root: str | Path, *, split: str = "train", resolution: int, val_fraction: float = 0.05) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} for an image folder, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        index = index_folder(root)
        self.root, self.split, self.resolution, self.val_fraction = index.root, split, resolution, val_fraction
        keep = (lambda key: True) if split == "all" else (lambda key: split_of(key, val_fraction) == split)
        self.files = [f for f in index.files if keep(f.key)]
        self.index_skips = [s for s in index.skips if keep(s.key)]
        if not self.files:
            raise DatasetError(
                f"split {split!r} of {self.root} is empty ({len(index.files)} usable files, val_fraction={val_fraction}); "
                "use split='all', or change val_fraction."
            )
        self._bad: dict[int, str] = {}  # per-process cache of undecodable indices -> reason

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.files)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} files")
        skipped: list[Skip] = []
        for step in range(n):
            j = (i + step) % n
            f = self.files[j]
            if j not in self._bad:
                try:
                    image = load_image_tensor(f.path, self.resolution, name=f.key)
                    return {"image": image, "caption": f.caption, "key": f.key, "skipped": skipped}
                except ImageDecodeError as err:
                    self._bad[j] = err.reason
            skipped.append(Skip(f.key, self._bad[j]))
        raise DatasetError(f"none of the {n} files in split {self.split!r} of {self.root} could be decoded, e.g. {skipped[0].key}: {skipped[0].reason}")
