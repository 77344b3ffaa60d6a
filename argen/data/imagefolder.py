"""Image folders with captions: `metadata.jsonl` (Hugging Face imagefolder convention) or sidecar `.txt` files.

Layout (subfolders allowed):

    root/metadata.jsonl      {"file_name": "a/b.png", "text": "a red circle"}   one JSON object per line
    root/a/b.png
    root/c.jpg + root/c.txt  sidecar caption, used when metadata.jsonl has no entry for the image

A `metadata.jsonl` may sit in any subfolder; its `file_name`s are relative to its own folder. Keys are
file names relative to `root`, with forward slashes.

Split: a file is in "val" when the first 8 bytes of sha1(key), read as a fraction of 2**64, are below
`val_fraction` (default 0.05), else in "train"; "all" takes every file. The split depends only on the file name, so
it is stable when files are added, removed or skipped. With fewer than about 1/val_fraction files the val
split may be empty; asking for an empty split raises. Files under a top-level `heldout/` folder are neither train
nor val but the "heldout" split: captions whose images are never trained on, evaluated on their own.

Bad entries never crash a run; each is recorded as a `Skip` (see argen.data.skips) naming the file and why:
- at index time: a listed file that does not exist, an image with no, an empty or a non-UTF-8 caption, a bad
  metadata.jsonl line (malformed JSON, not UTF-8, nested too deeply, not an object, no file_name, a file_name
  with `..` or absolute, a file_name listed twice: the second line is skipped), a file name too long to stat;
- when decoded: a corrupt, truncated, non-image, too large (MAX_PIXELS) or too thin (MAX_ASPECT) file.
Skips of metadata lines are keyed "metadata.jsonl:LINE". With `strict=True` a bad metadata line (or a
duplicate) refuses the whole folder instead, as before. A UTF-8 byte-order mark is accepted.

The root is a boundary: an image, metadata.jsonl or sidecar caption whose real path (symlinks resolved) leaves
the root is skipped ("... is a symlink that leads outside the dataset root"), and a symlinked directory that leads outside is
not entered, unless `follow_symlinks=True`. Symlinks that stay inside the root are fine (a symlinked directory
inside the root is not walked twice: its files are indexed under their real names).

File names need not be UTF-8: an undecodable byte is carried in the key as a surrogate escape (os.fsdecode),
hashed with "surrogatepass" for the split, and printed as `\\xNN` (argen.data.skips.printable).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torch.utils.data import Dataset

from argen.data.skips import DatasetError, Skip, printable
from argen.data.transforms import IMAGE_EXTENSIONS, ImageDecodeError, load_image_tensor

METADATA_NAME = "metadata.jsonl"
SPLITS = ("train", "val", "all")  # the hash splits (WebDataset shards use them too)
HELDOUT = "heldout"  # a top-level folder of an image folder, and the split of its files
CAPTION_HELP = (
    f"Expected captions as {METADATA_NAME} lines like {{\"file_name\": \"a/b.png\", \"text\": \"a red circle\"}} "
    "(file_name relative to the metadata file's folder), or a sidecar text file next to each image "
    "(a/b.png + a/b.txt)."
)
OUTSIDE_ROOT = "is a symlink that leads outside the dataset root (follow_symlinks=True allows it)"


@dataclass(frozen=True)
class CaptionedFile:
    """One usable entry: key (relative posix file name), absolute path, non-empty caption."""

    key: str
    path: Path
    caption: str


@dataclass
class FolderIndex:
    """What `index_folder` found: usable entries sorted by key, and everything skipped at index time.

    `skips` holds them all; `folder_skips` is the part that is not one image (metadata lines, metadata files,
    directories), which a dataset reports in every split.
    """

    root: Path
    files: list[CaptionedFile]
    skips: list[Skip] = field(default_factory=list)
    folder_skips: list[Skip] = field(default_factory=list)


def split_of(key: str, val_fraction: float) -> str:
    """"val" or "train" for a file key, from a hash of the key alone (deterministic across runs and machines).

    The key is hashed as UTF-8; surrogates (the undecodable bytes of a non-UTF-8 file name) are hashed as
    themselves ("surrogatepass"), so every key has a split.
    """
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64
    return "val" if h < val_fraction else "train"


def in_split(key: str, split: str, val_fraction: float) -> bool:
    """Whether the file `key` of an image folder belongs to `split` ("train", "val", "heldout" or "all")."""
    if split == "all":
        return True
    if PurePosixPath(key).parts[0] == HELDOUT:
        return split == HELDOUT
    return split != HELDOUT and split_of(key, val_fraction) == split


def _brief(value: Any, limit: int = 80) -> str:
    """repr of a value from a file, cut to `limit` characters for a one-line message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_file(root: Path, path: Path, *, follow_symlinks: bool) -> str | None:
    """None when `path` is a regular file whose real path is inside `root` (anywhere with follow_symlinks), else why not."""
    try:
        if not path.is_file():
            if path.is_symlink():
                return "is a broken symlink"
            return "is not a regular file" if path.exists() else "does not exist"
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as err:  # e.g. ENAMETOOLONG; RuntimeError: a symlink loop (Python < 3.13)
        return f"cannot be checked ({getattr(err, 'strerror', None) or err})"
    if not follow_symlinks and not real.is_relative_to(root):
        return OUTSIDE_ROOT
    return None


def _walk(root: Path, *, follow_symlinks: bool) -> tuple[list[str], list[Skip]]:
    """Keys of the regular files under `root` (hidden names left out, sorted), and the directories not entered.

    A symlinked directory inside the root is not entered (its files are found under their real names); one
    that leads outside is entered only with follow_symlinks, each real directory once (no symlink loops).
    """
    keys: list[str] = []
    refused: list[Skip] = []
    entered = {root}

    def visit(folder: Path, prefix: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            refused.append(Skip(prefix or ".", f"cannot list the directory ({err.strerror})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = prefix + entry.name
            try:
                if not entry.is_dir():
                    if entry.is_file():  # follows a symlink; _check_file decides about its target
                        keys.append(key)
                    continue
                real = Path(entry.path).resolve()
            except (OSError, RuntimeError) as err:
                refused.append(Skip(key, f"cannot be checked ({getattr(err, 'strerror', None) or err})"))
                continue
            inside = real.is_relative_to(root)
            if entry.is_symlink() and inside:
                continue
            if not inside and not follow_symlinks:
                refused.append(Skip(key + "/", f"directory {OUTSIDE_ROOT}; not entered"))
                continue
            if real not in entered:
                entered.add(real)
                visit(Path(entry.path), key + "/")

    visit(root, "")
    return keys, refused


def _read_metadata(
    root: Path, rel_meta: str, *, strict: bool, entries: dict[str, tuple[str | None, str]], skips: list[Skip],
) -> None:
    """Add key -> (caption or None, "FILE:LINE") to `entries` for each good line of one metadata.jsonl, and a
    Skip keyed "FILE:LINE" to `skips` for each bad one (with strict=True, raise DatasetError instead)."""
    meta = root / rel_meta
    base = PurePosixPath(rel_meta).parent

    def bad(lineno: int, reason: str) -> None:
        if strict:
            raise DatasetError(f"{printable(str(meta))}:{lineno}: {printable(reason)}. {CAPTION_HELP}")
        skips.append(Skip(f"{rel_meta}:{lineno}", reason))

    with meta.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad(lineno, f"line is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except RecursionError:
                bad(lineno, "malformed line, JSON nested too deeply to parse")
                continue
            except ValueError as err:  # json.JSONDecodeError, or an integer with too many digits
                bad(lineno, f"malformed line, not valid JSON ({getattr(err, 'msg', err)})")
                continue
            if not isinstance(row, dict):
                bad(lineno, f"each line must be a JSON object, got {type(row).__name__}")
                continue
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                bad(lineno, f"missing or non-string 'file_name' (got {_brief(name)})")
                continue
            text = row.get("text")
            if text is not None and not isinstance(text, str):
                bad(lineno, f"'text' must be a string, got {_brief(text)}")
                continue
            if text is not None and not _is_unicode(text):
                bad(lineno, f"'text' is not valid Unicode (a lone surrogate escape): {_brief(text)}")
                continue
            if "\0" in name:
                bad(lineno, f"file_name {_brief(name)} contains a NUL character")
                continue
            rel = base / PurePosixPath(name.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                bad(lineno, f"file_name {_brief(name)} must be a relative path inside the dataset root")
                continue
            key = str(PurePosixPath(*[p for p in rel.parts if p != "."]))
            if key in entries:
                bad(lineno, f"file_name {_brief(name)} is listed twice (first at {entries[key][1]}); this line is ignored")
                continue
            entries[key] = (text, f"{rel_meta}:{lineno}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_sidecar(root: Path, sidecar: Path, *, follow_symlinks: bool) -> tuple[str | None, str | None]:
    """(caption, None), or (None, why there is none) for a sidecar .txt; a missing one gives why = "does not exist"."""
    why = _check_file(root, sidecar, follow_symlinks=follow_symlinks)
    if why is not None:
        return None, why
    try:
        raw = sidecar.read_bytes()
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    try:
        return raw.decode("utf-8-sig"), None  # a byte-order mark is accepted and dropped
    except UnicodeDecodeError as err:
        return None, f"is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"


def index_folder(root: str | Path, *, follow_symlinks: bool = False, strict: bool = False) -> FolderIndex:
    """Find every image and its caption under `root`. Cheap: checks files and captions, decodes nothing.

    follow_symlinks: allow images, captions, metadata files and directories whose real path leaves `root`.
    strict: a bad metadata.jsonl line, or a file listed twice, raises DatasetError (naming file:line) instead
    of being skipped.
    Raises DatasetError for a missing or empty folder, a folder without images, or a folder without any captions.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"image folder {printable(str(root))} does not exist.")
    if not root.is_dir():
        raise DatasetError(f"image folder {printable(str(root))} is not a directory.")
    all_keys, folder_skips = _walk(root, follow_symlinks=follow_symlinks)
    not_entered = "".join(f" Not entered: {printable(s.key)} ({s.reason})." for s in folder_skips[:3])
    if not all_keys:
        raise DatasetError(f"image folder {printable(str(root))} is empty. Put images there with captions. {CAPTION_HELP}{not_entered}")

    metadata: dict[str, tuple[str | None, str]] = {}
    for rel_meta in (k for k in all_keys if PurePosixPath(k).name == METADATA_NAME):
        why = _check_file(root, root / rel_meta, follow_symlinks=follow_symlinks)
        if why is not None:
            folder_skips.append(Skip(rel_meta, f"metadata file {why}; not read"))
            continue
        _read_metadata(root, rel_meta, strict=strict, entries=metadata, skips=folder_skips)

    images = {k for k in all_keys if PurePosixPath(k).suffix.lower() in IMAGE_EXTENSIONS}
    if not images and not metadata:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DatasetError(f"no images found in {printable(str(root))} ({len(all_keys)} files, none with an image extension: {exts}).{not_entered}")

    files: list[CaptionedFile] = []
    skips: list[Skip] = []
    n_captions = 0
    for key in sorted(images | set(metadata)):
        path = root / key
        if key in metadata:
            caption, where = metadata[key]
            n_captions += 1
            why = _check_file(root, path, follow_symlinks=follow_symlinks)
            if why is not None:
                skips.append(Skip(key, f"listed in {where} but the file {why}"))
                continue
        else:
            why = _check_file(root, path, follow_symlinks=follow_symlinks)
            if why is not None:
                skips.append(Skip(key, f"file {why}"))
                continue
            sidecar = path.with_suffix(".txt")
            caption, why = _read_sidecar(root, sidecar, follow_symlinks=follow_symlinks)
            if why == "does not exist":
                skips.append(Skip(key, f"no caption (no {METADATA_NAME} entry and no sidecar {sidecar.name})"))
                continue
            n_captions += 1
            if why is not None:
                skips.append(Skip(key, f"sidecar caption {sidecar.name} {why}"))
                continue
        caption = (caption or "").strip()
        if not caption:
            skips.append(Skip(key, "empty caption"))
            continue
        files.append(CaptionedFile(key, path, caption))

    if n_captions == 0:
        raise DatasetError(f"found {len(images)} images in {printable(str(root))} but no captions at all. {CAPTION_HELP}{not_entered}")
    if not files:
        preview = "; ".join(f"{printable(s.key)}: {printable(s.reason)}" for s in skips[:5])
        raise DatasetError(f"no usable captioned images in {printable(str(root))}: all {len(skips)} entries were skipped ({preview}).")
    return FolderIndex(root, files, sorted(skips + folder_skips, key=lambda s: s.key), folder_skips)


class ImageFolderDataset(Dataset):
    """Captioned image folder. Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str, "skipped": list[Skip]}.

    A file that fails to decode is replaced by the next decodable file (index i+1, i+2, ... wrapping), and
    its name goes in the item's "skipped" list, so the main process learns about it even from a worker.
    Batch with `argen.data.skips.collate`. `follow_symlinks` and `strict` are index_folder's.
    """

    def __init__(
        self, root: str | Path, *, split: str = "train", resolution: int, val_fraction: float = 0.05,
        follow_symlinks: bool = False, strict: bool = False,
    ) -> None:
        if split not in (*SPLITS, HELDOUT):
            raise ValueError(f"split must be one of {', '.join((*SPLITS, HELDOUT))} for an image folder, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        index = index_folder(root, follow_symlinks=follow_symlinks, strict=strict)
        self.root, self.split, self.resolution, self.val_fraction = index.root, split, resolution, val_fraction
        keep = lambda key: in_split(key, split, val_fraction)  # noqa: E731
        self.files = [f for f in index.files if keep(f.key)]
        folder_wide = set(index.folder_skips)  # metadata lines and directories belong to every split
        self.index_skips = [s for s in index.skips if s in folder_wide or keep(s.key)]
        if not self.files:
            raise DatasetError(
                f"split {split!r} of {printable(str(self.root))} is empty ({len(index.files)} usable files, val_fraction={val_fraction}); "
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
        raise DatasetError(
            f"none of the {n} files in split {self.split!r} of {printable(str(self.root))} could be decoded, "
            f"e.g. {printable(skipped[0].key)}: {skipped[0].reason}")
