"""Build an image folder of random square crops of 89 real photos shipped in Debian and PyPI packages."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from argen.data.imagefolder import METADATA_NAME, split_of

# Every photo is pinned by package version and the first 16 hex digits of the file's sha256; a changed file is an
# error, never a silently different dataset. Chosen by eye from the packages' images: photographs only (no
# renders, illustrations, logos, diagrams or screenshots), one frame per scene (stereo pairs, calibration sequences
# and before/after pairs contribute one image). Some are greyscale photos; they are kept, converted to RGB.
PACKAGES = {  # name -> (registry, version)
    "lomiri-wallpapers-16.04": ("debian", "20.04.0-2"),
    "lomiri-wallpapers-20.04": ("debian", "20.04.0-2"),
    "mate-backgrounds": ("debian", "1.26.0-1"),
    "plasma-workspace-wallpapers": ("debian", "4:5.27.5-2"),
    "opencv-doc": ("debian", "4.6.0+dfsg-12"),
    "scikit-image": ("pypi", "0.26.0"),
    "scikit-learn": ("pypi", "1.9.1"),
}
PHOTOS = (  # (package, file inside the package, sha256 prefix)
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg", "bd86b081f9975e2b"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Dragonfly_by_Bolly.jpg", "af5af17841009732"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_0B_by_freespace.jpg", "c8c0ab18e48d9e04"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_1A_by_freespace.jpg", "89e86af38d04daae"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg", "d2e96e6d4da40dd8"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg", "66268e7b48f8854d"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg", "cc40e313c74e421e"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg", "4c119350ead80201"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg", "414d0072b2f6f2c5"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg", "a5634d1ab5e41a35"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg", "474dab6a4b9f94dc"),
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg", "6572410c09f4492c"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Aqua.jpg", "5c30118205982da4"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Blinds.jpg", "f7aac0dcc2e06d04"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Dune.jpg", "8a67c2cb0be8c46b"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/FreshFlower.jpg", "972b0a0c4e5e3fa9"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Garden.jpg", "d3095ee09d425ef2"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/GreenMeadow.jpg", "8fa0de0aa4089f73"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/LadyBird.jpg", "e35a9a4126ef969c"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/RainDrops.jpg", "3e4ea9671c28c90a"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Storm.jpg", "77ca53077831d323"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/TwoWings.jpg", "665e5abf8a539907"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Wood.jpg", "19c78500ac00a622"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/YellowFlower.jpg", "254da96256acb7ad"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg", "c272434ef39f2abf"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg", "05bef6722fc0ed81"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg", "6e0f3a72feb5a4a9"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/DarkestHour/contents/images/2560x1600.jpg", "8e3703fae3a3c217"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg", "586682dcb362b9f6"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg", "95603a6560c7e8d5"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Grey/contents/images/2560x1600.jpg", "88c31d8944b7e693"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg", "bdca288ce296a981"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg", "cb507baf1dafdcae"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Path/contents/images/2560x1600.jpg", "7477457d7f17b736"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg", "c868b50789591dd4"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/aero1.jpg", "d9a69191f6e3642e"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/aero3.jpg", "1c407146f8762b3b"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/aloeL.jpg", "cce5736808efe80d"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/apple.jpg", "e86879de3d9a807d"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/baboon.jpg", "1a1dd18d78eec444"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/basketball1.png", "ba06f6701f726099"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/board.jpg", "4c9a24ba67138ad5"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/box.png", "1094629c1e2ebbc8"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/box_in_scene.png", "8b0225ff76244a42"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/building.jpg", "742a1baad62ac82e"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/butterfly.jpg", "34a99716b78ded10"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/chicky_512.png", "4d2cf040de084fd3"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/ela_original.jpg", "b55798b35e2dcb24"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/fruits.jpg", "9c031d80a1c52da5"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/graf1.png", "1504b769303c7bde"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/home.jpg", "23b8cf46a1965d0e"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/left.jpg", "fb314330c3eb0a81"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/left01.jpg", "9621899098adffa1"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/leuvenA.jpg", "b2977cdbd9fb3f94"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/messi5.jpg", "1d570e49654e84c7"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/orange.jpg", "152c20d2f380ac98"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/rubberwhale1.png", "eb312435369dac9e"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/smarties.png", "ad3f751c053fdcf4"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/squirrel_cls.jpg", "20bb6e8ae96918a3"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/stuff.jpg", "21cd00afbdd0727f"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/sudoku.png", "000cf81b7ce79501"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/alphamat/input_images/plant.jpg", "9928b44eee0d1d7a"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/dnn_superres/butterfly.png", "1c50e61afddd60eb"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/hfs/data/000.jpg", "e4fec7e2e67a8a42"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/reg/home.png", "205d424fb53bc9a2"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext01.jpg", "7f3041a7019ab4d3"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext02.jpg", "d4295bff9f348012"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext03.jpg", "cadf4a3d29a7ba6f"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext04.jpg", "28e08d142a04f92f"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext05.jpg", "63985ac1a9989a83"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/text/scenetext06.jpg", "e4d64f10bbfb27b2"),
    ("scikit-image", "skimage/data/astronaut.png", "88431cd9653ccd53"),
    ("scikit-image", "skimage/data/brick.png", "7966caf324f6ba84"),
    ("scikit-image", "skimage/data/camera.png", "b0793d2adda0fa6a"),
    ("scikit-image", "skimage/data/chelsea.png", "596aa1e7cb875eb7"),
    ("scikit-image", "skimage/data/coffee.png", "cc02f8ca188b167c"),
    ("scikit-image", "skimage/data/coins.png", "f8d773fc9cfa6f4d"),
    ("scikit-image", "skimage/data/grass.png", "b6b6022426b38936"),
    ("scikit-image", "skimage/data/gravel.png", "c48615b451bf1e60"),
    ("scikit-image", "skimage/data/hubble_deep_field.jpg", "3a19c5dd8a927a93"),
    ("scikit-image", "skimage/data/ihc.png", "f8dd1aa387ddd1f4"),
    ("scikit-image", "skimage/data/moon.png", "78739619d11f7eb9"),
    ("scikit-image", "skimage/data/motorcycle_left.png", "db18e9c415761740"),
    ("scikit-image", "skimage/data/page.png", "341a6f0a61557662"),
    ("scikit-image", "skimage/data/retina.jpg", "38a07f36f27f095e"),
    ("scikit-image", "skimage/data/rocket.jpg", "c2dd0de7c538df8d"),
    ("scikit-image", "skimage/data/text.png", "bd84aa3a6e3c9887"),
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "8378025ad2519d64"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "a77f6ec41e353afd"),
)
_SLUG_PREFIXES = ("usr/share/backgrounds/", "usr/share/wallpapers/", "usr/share/doc/opencv-doc/examples/",
                  "skimage/data/", "sklearn/datasets/images/")


@dataclass(frozen=True)
class Photo:
    index: int
    package: str
    member: str
    sha256: str
    image: Image.Image  # RGB

    @property
    def slug(self) -> str:
        """A short unique folder name: the file's path inside the package without the common prefix."""
        rest = self.member
        for prefix in _SLUG_PREFIXES:
            rest = rest.removeprefix(prefix)
        rest = rest.replace("/contents/images/2560x1600.jpg", "")
        rest = os.path.splitext(rest)[0]
        return f"{self.package}/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", rest)


def fetch_packages(cache: Path) -> dict[str, Path]:
    """Download each pinned package once into `cache` with the registries' own clients (apt-get, pip)."""
    paths = {}
    for name, (registry, version) in PACKAGES.items():
        folder = cache / registry
        folder.mkdir(parents=True, exist_ok=True)
        if registry == "debian":
            pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"  # apt-get writes an epoch ':' as %3a
            cmd = ["apt-get", "download", f"{name}={version}"]
        else:
            pattern = f"{name.replace('-', '_')}-{version}-*.whl"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", ".",
                   f"{name}=={version}"]
        found = sorted(folder.glob(pattern))
        if not found:
            print("fetching:", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=folder, check=True)
            found = sorted(folder.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{' '.join(cmd)} left no file matching {pattern} in {folder}.")
        paths[name] = found[-1]
    return paths


def read_members(archive: Path, members: set[str]) -> dict[str, bytes]:
    """The bytes of the named files inside a .deb (streamed through dpkg-deb) or a wheel."""
    out: dict[str, bytes] = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            out = {m: z.read(m) for m in members}
    else:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name in members and info.isfile():
                    out[name] = tar.extractfile(info).read()
        proc.wait()
    missing = members - set(out)
    if missing:
        raise FileNotFoundError(f"{archive.name} has no regular file(s) {sorted(missing)}.")
    return out


def load_photos(cache: Path) -> list[Photo]:
    archives = fetch_packages(cache)
    photos = []
    for package, archive in archives.items():
        wanted = {m for p, m, _ in PHOTOS if p == package}
        data = read_members(archive, wanted)
        for i, (p, member, sha) in enumerate(PHOTOS):
            if p != package:
                continue
            digest = hashlib.sha256(data[member]).hexdigest()
            if not digest.startswith(sha):
                raise ValueError(f"{package} {member}: sha256 {digest[:16]} != pinned {sha}; the package changed.")
            image = Image.open(io.BytesIO(data[member]))
            image.load()
            photos.append(Photo(i, package, member, digest, image.convert("RGB")))
    return sorted(photos, key=lambda ph: ph.index)


def crop_boxes(size: tuple[int, int], *, n: int, resolution: int, min_frac: float,
               rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """n square boxes (left, top, right, bottom): side log-uniform in [max(resolution, min_frac*short), short]."""
    w, h = size
    short = min(w, h)
    if short < resolution:
        raise ValueError(f"a {w}x{h} photo is smaller than the {resolution}px crops (no upsampling).")
    lo, hi = max(resolution, min_frac * short), short
    boxes = []
    for _ in range(n):
        side = min(short, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        boxes.append((x, y, x + side, y + side))
    return boxes


def key_in_split(stem: str, want: str, val_fraction: float) -> str:
    """`stem-S.png` with the smallest S >= 0 that argen's hashed split puts in `want` ("train" or "val")."""
    for salt in range(100_000):
        key = f"{stem}-{salt}.png"
        if split_of(key, val_fraction) == want:
            return key
    raise RuntimeError(f"no salt puts {stem} in {want} with val_fraction={val_fraction}.")


def build(photos: list[Photo], out: Path, *, resolution: int, crops_per_photo: int, min_frac: float,
          heldout_every: int, val_fraction: float, seed: int) -> dict:
    """Write crops + metadata.jsonl + manifest.json into `out` (which must not exist)."""
    slugs = [ph.slug for ph in photos]
    assert len(set(slugs)) == len(slugs), "photo slugs must be unique"
    lines, rows = [], []
    for ph in photos:
        heldout = heldout_every > 0 and ph.index % heldout_every == heldout_every // 2
        split = "val" if heldout else "train"
        rng = np.random.default_rng([seed, ph.index])
        boxes = crop_boxes(ph.image.size, n=crops_per_photo, resolution=resolution, min_frac=min_frac, rng=rng)
        (out / ph.slug).mkdir(parents=True, exist_ok=True)
        for j, box in enumerate(boxes):
            key = key_in_split(f"{ph.slug}/{j:03d}", split, val_fraction)
            crop = ph.image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
            crop.save(out / key, optimize=False)
            caption = f"photo crop from {ph.package} {ph.member}"
            lines.append(json.dumps({"file_name": key, "text": caption}))
        rows.append({"package": ph.package, "version": PACKAGES[ph.package][1], "member": ph.member,
                     "sha256": ph.sha256, "size": list(ph.image.size), "split": split, "crops": len(boxes)})
    (out / METADATA_NAME).write_text("\n".join(lines) + "\n")
    n_val = sum(r["crops"] for r in rows if r["split"] == "val")
    manifest = {
        "what": f"{len(lines)} random square crops of {len(photos)} distinct real photos, resized to {resolution}px",
        "resolution": resolution, "crops_per_photo": crops_per_photo, "min_frac": min_frac, "seed": seed,
        "val_fraction": val_fraction, "heldout_every": heldout_every,
        "split_note": ("crop file names carry a salt chosen so that argen's hashed split (argen.data.imagefolder."
                       "split_of with this val_fraction) puts every crop of a held-out photo in 'val' and every "
                       "other crop in 'train': val photos are never seen in training"),
        "num_images": len(lines), "num_photos": len(photos),
        "num_val_photos": sum(r["split"] == "val" for r in rows), "num_val_images": n_val,
        "photos": rows,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def write_preview(folder: Path, out: Path, *, per_photo: int, split: str = "val") -> int:
    """Copy the first `per_photo` crops of every `split` photo of a built folder into a small image folder (for
    `argen reconstruct`, which shows a folder's first images: in the full folder those are all one photo)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                for line in (folder / METADATA_NAME).read_text().splitlines() if line}
    shutil.rmtree(out, ignore_errors=True)
    lines = []
    for row in (r for r in manifest["photos"] if r["split"] == split):
        slug = Photo(0, row["package"], row["member"], row["sha256"], Image.new("RGB", (1, 1))).slug
        for key in sorted(k for k in captions if k.startswith(slug + "/"))[:per_photo]:
            (out / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / key, out / key)
            lines.append(json.dumps({"file_name": key, "text": captions[key]}))
    (out / METADATA_NAME).write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--out", type=Path, default=Path("/work/data/real64"))
    parser.add_argument("--cache", type=Path, default=Path("/work/data/real_src"),
                        help="where the pinned .deb and .whl files are downloaded (kept for reuse)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--crops-per-photo", type=int, default=45)
    parser.add_argument("--min-frac", type=float, default=0.08,
                        help="smallest crop side as a fraction of the photo's shorter side (never below resolution)")
    parser.add_argument("--heldout-every", type=int, default=9,
                        help="every k-th photo (by list position) goes wholly to the val split; 0: none")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="must equal the training config's data.val_fraction (argen's default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--preview", type=Path, default=None,
                        help="only write a small folder with the first --preview-per-photo crops of each val photo "
                             "of the existing --out folder (for `argen reconstruct --split all`)")
    parser.add_argument("--preview-per-photo", type=int, default=2)
    args = parser.parse_args(argv)
    if args.preview is not None:
        n = write_preview(args.out, args.preview, per_photo=args.preview_per_photo)
        print(f"wrote {args.preview}: {n} val crops")
        return 0
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to rebuild it.", file=sys.stderr)
        return 2
    photos = load_photos(args.cache)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = build(photos, tmp, resolution=args.resolution, crops_per_photo=args.crops_per_photo,
                     min_frac=args.min_frac, heldout_every=args.heldout_every, val_fraction=args.val_fraction,
                     seed=args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {manifest['what']}; val: {manifest['num_val_images']} crops of "
          f"{manifest['num_val_photos']} held-out photos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
