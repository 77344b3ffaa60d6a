"""Build a captioned image folder of desktop icons from up to ten icon themes in pinned Debian packages.

Each icon's caption is its file name and its category folder, e.g. oxygen `64x64/actions/document-open.png` gives
"document open, an action icon". The themes share the freedesktop icon names, so most captions are drawn in several
styles. Icons are composited onto white and resized to one square size (default 64 px).

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
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_real_folder import key_in_split  # noqa: E402  (the same salted file names as the photo folder)

from argen.data.imagefolder import METADATA_NAME  # noqa: E402
from tokenizers_img.serialization import NotArgenOutputError, atomic_write_dir, check_replaceable  # noqa: E402


# Each .deb is pinned by version and the sha256 of the whole file; a changed package is an error, never a
# silently different dataset. Every theme ships PNGs of at least 48 px, so nothing needs an SVG renderer.
# Themes share the freedesktop icon names ("folder", "edit copy", app names), so one caption is drawn in many styles.
@dataclass(frozen=True)
class Theme:
    package: str
    version: str
    sha256: str  # of the .deb
    folder: str  # the theme's folder inside the package
    size_first: bool  # NxN/CATEGORY/NAME.png when True, CATEGORY/N/NAME.png when False
    licence: str  # from the package's /usr/share/doc/PACKAGE/copyright


THEMES = {
    "oxygen": Theme("oxygen-icon-theme", "5:5.103.0-1",
                    "3e49023e148906e41457a98a19a09858ddd761ef4f212fa356232924b3cebcce",
                    "usr/share/icons/oxygen/base/", True, "LGPL-3+"),
    "mate": Theme("mate-icon-theme", "1.26.0-1", "356945b21bf2449ab4d3c0cead5abbc84fab247b140c6d0252263470df49dc54",
                  "usr/share/icons/mate/", True, "LGPL-3+ or CC-BY-SA"),
    "gnome": Theme("gnome-icon-theme", "3.12.0-5", "243520edcff2c309065b7e12ae08f666580e6098ecafa0c0f7d28c75aedcfdc3",
                   "usr/share/icons/gnome/", True, "GPL-2+ or GPL-3+, by file"),
    "adwaita": Theme("adwaita-icon-theme", "43-1", "4b67610565d16b604d3efd9908e8e4b5d71873c5d0f9347433df509020f22af7",
                     "usr/share/icons/Adwaita/", True, "CC-BY-SA-3.0 or LGPL-3, by file"),
    "nuovext2": Theme("lxde-icon-theme", "0.5.1-2.1", "1b47e4879bf8b456c4d801d9d6a2035550bc50184dea05148e8b6e30c61b5ccd",
                      "usr/share/icons/nuoveXT2/", True, "LGPL-3+"),
    "moka": Theme("moka-icon-theme", "5.5.0-2", "b55540ac018cbb2b2d87f9db451e977d43436069070916025d58ad903fc83117",
                  "usr/share/icons/Moka/", True, "CC-BY-SA-4.0 or GPL-3+"),
    "paper": Theme("paper-icon-theme", "1.5.0+git20200312.aa3e8af-4",
                   "06ce9ee1b11d46aac18e1df9e97c72df7b494e6a5c593d5f5ee595a78c779fcb",
                   "usr/share/icons/Paper/", True, "CC-BY-SA-4.0"),
    "faenza": Theme("faenza-icon-theme", "1.3.1-3", "0ba952f8c066ba427182d165b48453cad6360bd4c62ee1abfbec464662e92b2c",
                    "usr/share/icons/Faenza/", False, "GPL-3+"),
    "obsidian": Theme("obsidian-icon-theme", "3.5-1.1",
                      "bc73451d8574830ba2c9a9575cca6e18ff595bde77ef9f5b5744002049e71eb5",
                      "usr/share/icons/Obsidian/", False, "GPL-3"),
    "elementary": Theme("elementary-xfce-icon-theme", "0.17-1",
                        "012bd2eda0e19b162b9cdc167e904a4a4254f7c2e6409862d0f29a56d3630b75",
                        "usr/share/icons/elementary-xfce/", False, "GPL-2+, LGPL-2+ or CC-BY-SA-2.0, by file"),
}
# Theme category folder -> the caption's description. Left out: animations (spinner sprite sheets), special,
# stock, ui, emotes (smileys: an emoji set, which is kept out of development, tests and tuning for independent
# checks), and anything else not named here.
CATEGORIES = {
    "actions": "an action icon", "apps": "an application icon", "applets": "an applet icon",
    "categories": "a category icon", "devices": "a device icon", "emblems": "an emblem icon",
    "mimetypes": "a file type icon", "mimes": "a file type icon",
    "places": "a place icon", "status": "a status icon", "panel": "a panel icon",
    "web": "a web application icon", "legacy": "an icon",
}
# freedesktop smiley names ("face-smile", "face-wink", "emoji-...") that some themes keep outside emotes/
SMILEY = re.compile(r"(face|emoji|emote|smiley)[-_]", re.IGNORECASE)
SPLIT_FOLDERS = ("train", "val", "heldout")
_SIZE_FIRST = re.compile(r"(?P<px>\d+)x(?P=px)/(?P<category>[^/]+)/(?P<name>[^/]+)\.png")  # NxN/CATEGORY/NAME.png
_CATEGORY_FIRST = re.compile(r"(?P<category>[^/]+)/(?P<px>\d+)/(?P<name>[^/]+)\.png")  # CATEGORY/N/NAME.png
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


def fetch_packages(cache: Path, themes: list[str]) -> dict[str, Path]:
    """Download the .deb of each theme once into `cache` with apt-get and check its pinned sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for theme in themes:
        name, version, sha256 = THEMES[theme].package, THEMES[theme].version, THEMES[theme].sha256
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
        paths[theme] = found[-1]
    return paths


def member_parts(member: str, theme: Theme) -> tuple[int, str, str] | None:
    """(px, category folder, name) of a theme's PNG member, None for any other member."""
    if not member.startswith(theme.folder):
        return None
    m = (_SIZE_FIRST if theme.size_first else _CATEGORY_FIRST).fullmatch(member.removeprefix(theme.folder))
    return (int(m["px"]), m["category"], m["name"]) if m else None


def read_theme(archive: Path, *, theme: str, spec: Theme, min_source_px: int, dropped: Counter) -> list[Icon]:
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
            parts = member_parts(member, spec)
            if parts is None or parts[1] not in CATEGORIES:
                continue
            if info.issym():
                entries[member] = ("link", posixpath.normpath(posixpath.join(posixpath.dirname(member), info.linkname)))
            elif info.isfile():
                entries[member] = ("file", tar.extractfile(info).read())
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {archive} failed with exit status {proc.returncode}.")

    largest: dict[tuple[str, str], tuple[int, str]] = {}  # (category, name) -> (px, member)
    for member in entries:
        px, category, name = member_parts(member, spec)
        if px > largest.get((category, name), (0, ""))[0]:
            largest[(category, name)] = (px, member)

    icons = []
    for (category, name), (px, member) in sorted(largest.items()):
        if SMILEY.match(name):
            dropped["a smiley outside emotes/ (emoji sets are kept out)"] += 1
            continue
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
        target = member_parts(member, spec)
        if target is None or target[1:] != (category, name):
            dropped["symlinked alias of another icon"] += 1
            continue
        if target[0] < min_source_px:
            dropped[f"largest PNG under {min_source_px} px"] += 1
            continue
        icons.append(Icon(theme, category, name, target[0], member, value))
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


def near_duplicate_of(images: list[Image.Image]) -> list[int | None]:
    """Per image, the earlier kept image whose 32 px thumbnail is nearest by mean absolute difference when that is
    under NEAR_DUPLICATE, else None (the image is kept).

    A mean absolute difference under t (of 255) bounds the mean squared one by 255 t, so squared distances from one
    matrix product pick the candidate pairs and only those are compared exactly.
    """
    thumbs = torch.from_numpy(np.stack([np.asarray(im.resize((32, 32), Image.Resampling.BOX), np.float32).reshape(-1)
                                        for im in images]))  # (N, 3072)
    norms = (thumbs * thumbs).sum(1)  # (N,)
    bound = 255.0 * NEAR_DUPLICATE * thumbs.shape[1] * 1.01  # squared-distance bound, with room for fp32 rounding
    candidates: list[list[int]] = []
    for lo in range(0, len(images), 1024):
        rows = thumbs[lo:lo + 1024]
        squared = norms[lo:lo + 1024, None] + norms[None] - 2.0 * rows @ thumbs.T  # (B, N)
        for r, row in enumerate(squared):
            candidates.append([j for j in torch.nonzero(row < bound).flatten().tolist() if j < lo + r])
    result: list[int | None] = []
    kept = set()
    for i, earlier in enumerate(candidates):
        earlier = [j for j in earlier if j in kept]
        diffs = [float((thumbs[j] - thumbs[i]).abs().mean()) for j in earlier]
        if diffs and min(diffs) < NEAR_DUPLICATE:
            result.append(earlier[int(np.argmin(diffs))])
        else:
            result.append(None)
            kept.add(i)
    return result


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
    rendered: list[tuple[Icon, Image.Image]] = []
    for i, icon in enumerate(icons):
        if i % 1000 == 0:
            print(f"rendering {i}/{len(icons)}", flush=True)
        image = render(icon.data, size)
        if ink_fraction(image) < min_ink:
            dropped[f"under {min_ink:.0%} ink on white at {size} px"] += 1
            empty.append(f"{icon.theme}/{icon.category}/{icon.name}")
        else:
            rendered.append((icon, image))
    near: dict[str, str] = {}  # dropped icon -> the kept icon it nearly equals
    kept: list[tuple[Icon, Image.Image]] = []
    for (icon, image), other in zip(rendered, near_duplicate_of([image for _, image in rendered])):
        if other is None:
            kept.append((icon, image))
        else:  # a copy under another name: the first in (theme, category, name) order stays
            dropped["near-duplicate of an earlier icon"] += 1
            first = rendered[other][0]
            near[f"{icon.theme}/{icon.category}/{icon.name}"] = f"{first.theme}/{first.category}/{first.name}"

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
    parser.add_argument("--themes", nargs="+", choices=list(THEMES), default=list(THEMES), metavar="THEME",
                        help=f"icon themes to use, in this order (default all: {' '.join(THEMES)})")
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
    archives = fetch_packages(args.cache / "debian", args.themes)
    icons: list[Icon] = []
    dropped: Counter = Counter()
    for theme, archive in archives.items():
        icons += read_theme(archive, theme=theme, spec=THEMES[theme], min_source_px=args.min_source, dropped=dropped)

    def write(tmp: Path) -> None:
        counts = build(icons, tmp, size=args.size, min_ink=args.min_ink, heldout_fraction=args.heldout_fraction,
                       val_share=args.val_share, val_fraction=args.val_fraction, seed=args.seed)
        counts["dropped_at_render"] = {**dropped, **counts["dropped_at_render"]}
        manifest = {
            "what": f"{counts['num_images']} desktop icons from {len(args.themes)} Debian icon themes, on white, {args.size} px",
            "command": command,
            "sources": [{"theme": t, "package": THEMES[t].package, "version": THEMES[t].version,
                         "sha256": THEMES[t].sha256, "folder": THEMES[t].folder, "licence": THEMES[t].licence}
                        for t in args.themes],
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
