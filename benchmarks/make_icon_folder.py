"""Build a captioned image folder of desktop icons (Oxygen and MATE icon themes from pinned Debian packages).

Each icon's caption is its file name and its theme folder, e.g. oxygen `64x64/actions/document-open.png` gives
"document open, an action icon". Icons are composited onto white and resized to one square size (default 64 px).

Layout (every split folder is also an image folder on its own; see argen.data.imagefolder):

    OUT/train/THEME/CATEGORY/NAME-S.png + OUT/train/metadata.jsonl
    OUT/val/...                          icons picked at random; their names may occur in train in another theme
    OUT/heldout/...                      icons whose names occur nowhere in train or val
    OUT/manifest.json                    sources, rules, counts, held-out names and the command

argen splits an image folder by a hash of each file name (split_of), so the salt S in each name is chosen to
make that hash agree with the folder, and a top-level heldout/ folder is its own split: `imagefolder:OUT` gives
exactly train/ as "train", val/ as "val" and heldout/ as "heldout".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import posixpath
import re
import shlex
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_real_folder import key_in_split  # noqa: E402  (the same salted file names as the photo folder)

from argen.data.imagefolder import METADATA_NAME  # noqa: E402
from tokenizers_img.serialization import NotArgenOutputError, atomic_write_dir, check_replaceable  # noqa: E402

# Each .deb is pinned by version and the sha256 of the whole file; a changed package is an error, never a
# silently different dataset. Both ship PNGs up to 256 px, so nothing needs an SVG renderer.
PACKAGES = {  # name -> (version, sha256 of the .deb, theme name, folder of the theme's NxN size folders)
    "oxygen-icon-theme": ("5:5.103.0-1", "3e49023e148906e41457a98a19a09858ddd761ef4f212fa356232924b3cebcce",
                          "oxygen", "usr/share/icons/oxygen/base/"),
    "mate-icon-theme": ("1.26.0-1", "356945b21bf2449ab4d3c0cead5abbc84fab247b140c6d0252263470df49dc54",
                        "mate", "usr/share/icons/mate/"),
}
LICENCES = {  # from each package's /usr/share/doc/NAME/copyright
    "oxygen-icon-theme": "LGPL-3+ (Oxygen team, 2007)",
    "mate-icon-theme": "LGPL-3+ or CC-BY-SA (MATE and GNOME/Tango artists, 2002-2013)",
}
# Theme category folder -> the caption's description. Left out: animations (spinner sprite sheets), special.
CATEGORIES = {
    "actions": "an action icon", "apps": "an application icon", "applets": "an applet icon",
    "categories": "a category icon", "devices": "a device icon", "emblems": "an emblem icon",
    "emotes": "an emote icon", "mimetypes": "a file type icon", "places": "a place icon", "status": "a status icon",
}
SPLIT_FOLDERS = ("train", "val", "heldout")
_MEMBER = re.compile(r"(\d+)x\1/([^/]+)/([^/]+)\.png")  # SIZExSIZE/CATEGORY/NAME.png inside a theme folder
INK_LEVEL = 24  # a pixel is ink when some channel is at least this far below white (of 255), after compositing
# Two icons are near-duplicates when their 32 px thumbnails differ by under this mean absolute value (of 255).
# Chosen by eye on the closest oxygen pairs: copies under two names (font-afm/font-type1, text-calendar/
# text-vcalendar) are at 0.01-0.66; the closest distinct pair (an executable-script page against an MS-DOS
# executable page) is at 0.76.
NEAR_DUPLICATE = 0.7


@dataclass(frozen=True)
class Icon:
    theme: str
    category: str
    name: str  # file name without .png, as the theme spells it
    source_px: int  # side of the PNG used (the largest the theme ships for this name)
    member: str  # path of that PNG inside the package
    data: bytes

    @property
    def caption(self) -> str:
        return f"{caption_words(self.name)}, {CATEGORIES[self.category]}"


def caption_words(name: str) -> str:
    """An icon name as words: `-`, `_`, `.` and `+` become spaces, case is kept ("x-office-document" -> "x office document")."""
    return re.sub(r"[-_.+\s]+", " ", name).strip()


def name_key(name: str) -> str:
    """What counts as the same icon name across themes and categories (for the held-out split)."""
    return caption_words(name).lower()


def fetch_packages(cache: Path) -> dict[str, Path]:
    """Download each pinned .deb once into `cache` with apt-get and check its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (version, sha256, _, _) in PACKAGES.items():
        pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"  # apt-get writes an epoch ':' as %3a
        found = sorted(cache.glob(pattern))
        if not found:
            cmd = ["apt-get", "download", f"{name}={version}"]
            print("fetching:", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=cache, check=True)
            found = sorted(cache.glob(pattern))
        if not found:
            raise FileNotFoundError(f"apt-get download {name}={version} left no file matching {pattern} in {cache}.")
        digest = hashlib.sha256(found[-1].read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(f"{found[-1]}: sha256 {digest} != pinned {sha256}; the package changed. "
                             "Pin the new version and check its icons before using it.")
        paths[name] = found[-1]
    return paths


def read_theme(archive: Path, *, theme: str, prefix: str, min_source_px: int,
               dropped: Counter) -> list[Icon]:
    """The icons of one theme in a .deb: per (category, name) the PNG at the largest size the theme ships.

    A name whose largest entry is a symlink to another (category, name) is an alias of that icon and is dropped
    (the target is kept under its own name); a symlink to the same name at another size is followed. A name
    whose largest PNG is under `min_source_px` is dropped. Reasons are counted in `dropped`.
    """
    entries: dict[str, tuple[str, bytes | None]] = {}  # member -> ("file", bytes) or ("link", resolved target)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for info in tar:
            member = info.name.removeprefix("./")
            m = _MEMBER.fullmatch(member.removeprefix(prefix)) if member.startswith(prefix) else None
            if m is None or m.group(2) not in CATEGORIES:
                continue
            if info.issym():
                entries[member] = ("link", posixpath.normpath(posixpath.join(posixpath.dirname(member), info.linkname)))
            elif info.isfile():
                entries[member] = ("file", tar.extractfile(info).read())
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {archive} failed with exit status {proc.returncode}.")

    largest: dict[tuple[str, str], tuple[int, str]] = {}  # (category, name) -> (px, member)
    for member in entries:
        px, category, name = _MEMBER.fullmatch(member.removeprefix(prefix)).groups()
        if int(px) > largest.get((category, name), (0, ""))[0]:
            largest[(category, name)] = (int(px), member)

    icons = []
    for (category, name), (px, member) in sorted(largest.items()):
        for _ in range(10):  # follow a chain of symlinks
            kind, value = entries.get(member, ("missing", None))
            if kind != "link":
                break
            member = value
        if kind == "missing":
            dropped["broken or outside symlink"] += 1
            continue
        if kind == "link":
            dropped["symlink loop"] += 1
            continue
        target_px, target_category, target_name = _MEMBER.fullmatch(member.removeprefix(prefix)).groups()
        if (target_category, target_name) != (category, name):
            dropped["symlinked alias of another icon"] += 1
            continue
        if int(target_px) < min_source_px:
            dropped[f"largest PNG under {min_source_px} px"] += 1
            continue
        icons.append(Icon(theme, category, name, int(target_px), member, value))
    print(f"{theme}: {len(icons)} icons from {len(largest)} names in {archive.name}", flush=True)
    return icons


def render(data: bytes, size: int) -> Image.Image:
    """A PNG composited onto white (centred on a white square if it is not square) and resized to size x size, RGB."""
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    layer = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    layer.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    flat = Image.alpha_composite(canvas, layer).convert("RGB")
    return flat if side == size else flat.resize((size, size), Image.Resampling.LANCZOS)


def ink_fraction(image: Image.Image) -> float:
    """Share of pixels that are not (near) white: some channel at least INK_LEVEL below 255."""
    a = np.asarray(image, dtype=np.int16)  # (H, W, 3)
    return float((a.min(axis=2) <= 255 - INK_LEVEL).mean())


def seeded_fraction(seed: int, text: str) -> float:
    """A number in [0, 1) fixed by (seed, text), for picking splits that do not move when icons are added."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{text}".encode()).digest()[:8], "big") / 2.0**64


def assign_splits(icons: list[Icon], *, heldout_fraction: float, val_share: float, seed: int) -> list[str]:
    """"heldout" for every icon whose name_key is picked (so held-out names occur in no other split), else "val"
    for a seeded `val_share` of the rest, else "train"."""
    splits = []
    for icon in icons:
        if seeded_fraction(seed, "heldout/" + name_key(icon.name)) < heldout_fraction:
            splits.append("heldout")
        elif seeded_fraction(seed, f"val/{icon.theme}/{icon.category}/{icon.name}") < val_share:
            splits.append("val")
        else:
            splits.append("train")
    return splits


def build(icons: list[Icon], out: Path, *, size: int, min_ink: float, heldout_fraction: float, val_share: float,
          val_fraction: float, seed: int) -> dict:
    """Render `icons` into split folders under `out` (an empty directory) and return the manifest's counts."""
    dropped: Counter = Counter()
    empty: list[str] = []
    near: dict[str, str] = {}  # dropped icon -> the kept icon it nearly equals
    thumbs = np.zeros((len(icons), 32 * 32 * 3), np.float32)  # (N, 3072) rows of the kept icons
    kept: list[tuple[Icon, Image.Image]] = []
    for i, icon in enumerate(icons):
        if i % 250 == 0:
            print(f"rendering {i}/{len(icons)}", flush=True)
        image = render(icon.data, size)
        if ink_fraction(image) < min_ink:
            dropped[f"under {min_ink:.0%} ink on white at {size} px"] += 1
            empty.append(f"{icon.theme}/{icon.category}/{icon.name}")
            continue
        thumb = np.asarray(image.resize((32, 32), Image.Resampling.BOX), np.float32).reshape(-1)
        if kept:
            diff = np.abs(thumbs[: len(kept)] - thumb).mean(axis=1)  # (K,)
            j = int(diff.argmin())
            if diff[j] < NEAR_DUPLICATE:  # a copy under another name: the first in (theme, category, name) order stays
                dropped["near-duplicate of an earlier icon"] += 1
                other = kept[j][0]
                near[f"{icon.theme}/{icon.category}/{icon.name}"] = f"{other.theme}/{other.category}/{other.name}"
                continue
        thumbs[len(kept)] = thumb
        kept.append((icon, image))

    splits = assign_splits([icon for icon, _ in kept], heldout_fraction=heldout_fraction, val_share=val_share,
                           seed=seed)
    lines: dict[str, list[str]] = {s: [] for s in SPLIT_FOLDERS}
    per_category: Counter = Counter()
    for (icon, image), split in zip(kept, splits):
        stem = f"{split}/{icon.theme}/{icon.category}/{icon.name}"
        key = key_in_split(stem, "train" if split == "train" else "val", val_fraction)
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / key, optimize=False)
        lines[split].append(json.dumps({"file_name": key.removeprefix(split + "/"), "text": icon.caption}))
        per_category[f"{split}/{icon.theme}/{icon.category}"] += 1
    for split, rows in lines.items():
        (out / split).mkdir(exist_ok=True)
        (out / split / METADATA_NAME).write_text("\n".join(rows) + "\n" if rows else "")

    train_names = {name_key(icon.name) for (icon, _), s in zip(kept, splits) if s != "heldout"}
    heldout_names = sorted({name_key(icon.name) for (icon, _), s in zip(kept, splits) if s == "heldout"})
    assert not train_names & set(heldout_names), "held-out names must occur only in the held-out split"
    return {
        "num_images": len(kept), "counts": {s: len(rows) for s, rows in lines.items()},
        "per_category": dict(sorted(per_category.items())), "dropped_at_render": dict(dropped),
        "heldout_names": heldout_names, "dropped_as_empty": empty,
        "dropped_as_near_duplicate": near,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, default=Path("/work/data/icons64"),
                        help="output folder; an existing one is replaced only if argen wrote it")
    parser.add_argument("--cache", type=Path, default=Path("/work/data/icon_src"),
                        help="where the pinned .deb files are downloaded (kept for reuse)")
    parser.add_argument("--size", type=int, default=64, help="side of the square output PNGs")
    parser.add_argument("--min-source", type=int, default=64,
                        help="drop icons whose largest PNG is smaller than this many pixels")
    parser.add_argument("--min-ink", type=float, default=0.03,
                        help=f"drop icons with less than this share of pixels at least {INK_LEVEL}/255 below white")
    parser.add_argument("--heldout-fraction", type=float, default=0.05,
                        help="share of distinct icon names whose icons all go to heldout/")
    parser.add_argument("--val-share", type=float, default=0.05, help="share of the other icons that go to val/")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="must equal the training config's data.val_fraction (argen's default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out names and the val icons")
    args = parser.parse_args(argv)
    if not 8 <= args.size <= 1024:
        parser.error(f"--size must be in [8, 1024], got {args.size}")
    for flag in ("min_ink", "heldout_fraction", "val_share", "val_fraction"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    command = shlex.join(["python", "benchmarks/make_icon_folder.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        check_replaceable(args.out)  # before any download; atomic_write_dir checks again when it replaces it
    except NotArgenOutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    archives = fetch_packages(args.cache / "debian")
    icons: list[Icon] = []
    dropped: Counter = Counter()
    for package, archive in archives.items():
        _, _, theme, prefix = PACKAGES[package]
        icons += read_theme(archive, theme=theme, prefix=prefix, min_source_px=args.min_source, dropped=dropped)

    def write(tmp: Path) -> None:
        counts = build(icons, tmp, size=args.size, min_ink=args.min_ink, heldout_fraction=args.heldout_fraction,
                       val_share=args.val_share, val_fraction=args.val_fraction, seed=args.seed)
        counts["dropped_at_render"] = {**dropped, **counts["dropped_at_render"]}
        manifest = {
            "what": f"{counts['num_images']} desktop icons from two Debian icon themes, on white, {args.size} px",
            "command": command,
            "sources": [{"package": p, "version": v, "sha256": sha, "theme": t, "folder": prefix,
                         "licence": LICENCES[p]} for p, (v, sha, t, prefix) in PACKAGES.items()],
            "size": args.size, "min_source_px": args.min_source, "min_ink": args.min_ink, "ink_level": INK_LEVEL,
            "heldout_fraction": args.heldout_fraction, "val_share": args.val_share,
            "val_fraction": args.val_fraction, "seed": args.seed,
            "rules": {
                "caption": "name with - _ . + as spaces (case kept), then the category's description, "
                           "e.g. 'document open, an action icon'",
                "duplicates": "per theme, category and name the largest PNG the theme ships; a name whose largest "
                              "entry is a symlink to another icon is dropped as an alias; an icon whose 32 px "
                              f"thumbnail differs from an earlier kept one by under {NEAR_DUPLICATE}/255 on average "
                              "is dropped as a near-duplicate",
                "empty": f"dropped when under min_ink of the pixels are at least {INK_LEVEL}/255 below white "
                         "after compositing onto white and resizing",
                "splits": "heldout: every icon whose name (words, lower case) is picked by a seeded hash, so "
                          "held-out names occur in no train or val caption; val: a seeded hash of the rest; "
                          "file names carry a salt so argen's split_of with val_fraction puts train/ in 'train' "
                          "and val/ in 'val'; argen reads heldout/ as the 'heldout' split",
            },
            **counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    atomic_write_dir(args.out, write)
    manifest = json.loads((args.out / "manifest.json").read_text())
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s: {manifest['what']}")
    print("  per split:", ", ".join(f"{s} {n}" for s, n in manifest["counts"].items()))
    print("  dropped:", ", ".join(f"{why} {n}" for why, n in manifest["dropped_at_render"].items()))
    print(f"  {len(manifest['heldout_names'])} held-out names, e.g. {', '.join(manifest['heldout_names'][:5])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
