"""benchmarks/make_icon_folder.py on a tiny fake icon-theme .deb (offline): aliases, sizes, empty icons, splits."""

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from argen.data.imagefolder import ImageFolderDataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_icon_folder", ROOT / "benchmarks" / "make_icon_folder.py")
icons_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = icons_mod  # dataclasses look their module up there
_spec.loader.exec_module(icons_mod)

PREFIX = "usr/share/icons/fake/"
SIZE_FIRST = icons_mod.Theme("fake-icon-theme", "1", "0" * 64, PREFIX, True, "none")
pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def _icon(path: Path, px: int, colour: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (px, px), colour).save(path)


def _fake_deb(tmp: Path, *, size_first: bool = True) -> Path:
    """A theme with 40 plain icons, one at two sizes, one alias, one transparent, one only at 32 px, one in emotes/
    and one smiley name in status/; its folders are NxN/CATEGORY (size_first) or CATEGORY/N."""
    pkg = tmp / "pkg"
    theme = pkg / PREFIX

    def folder(px: int, category: str) -> Path:
        return theme / (f"{px}x{px}/{category}" if size_first else f"{category}/{px}")

    rng = np.random.default_rng(0)
    for i in range(40):
        colour = (*map(int, rng.integers(0, 200, 3)), 255)
        _icon(folder(64, "actions" if i % 2 else "places") / f"thing-{i}.png", 64, colour)
    _icon(folder(32, "actions") / "thing-1.png", 32, (0, 0, 0, 255))  # a smaller size of thing-1: not used
    _icon(folder(128, "actions") / "thing-3.png", 128, (10, 20, 30, 255))  # the largest size of thing-3: used
    (folder(64, "actions") / "thing-alias.png").symlink_to("thing-1.png")
    _icon(folder(64, "places") / "blank.png", 64, (0, 0, 0, 0))
    _icon(folder(32, "apps") / "tiny.png", 32, (200, 0, 0, 255))
    _icon(folder(64, "emotes") / "wink.png", 64, (90, 90, 0, 255))  # emotes/ is not read at all
    _icon(folder(64, "status") / "face-wink.png", 64, (90, 0, 90, 255))  # a smiley name elsewhere: dropped
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: fake-icon-theme\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: fake\n")
    deb = tmp / "fake.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.parametrize("size_first", [True, False], ids=["NxN-category", "category-N"])
def test_both_folder_layouts_give_the_same_icons(tmp_path, size_first):
    spec = icons_mod.Theme("fake-icon-theme", "1", "0" * 64, PREFIX, size_first, "none")
    dropped = Counter()
    icons = icons_mod.read_theme(_fake_deb(tmp_path, size_first=size_first), theme="fake", spec=spec,
                                 min_source_px=64, dropped=dropped)
    assert dropped == {"symlinked alias of another icon": 1, "largest PNG under 64 px": 1,
                       "a smiley outside emotes/ (emoji sets are kept out)": 1}
    assert sorted((i.category, i.name, i.source_px) for i in icons) == sorted(
        [("actions" if k % 2 else "places", f"thing-{k}", 128 if k == 3 else 64) for k in range(40)]
        + [("places", "blank", 64)])


def test_near_duplicates_keep_the_first_and_only_copies_go():
    rng = np.random.default_rng(1)
    base = rng.integers(10, 240, (32, 32, 3))

    def plus_one_on(share: float) -> Image.Image:  # base + 1 on a share of the values: mean difference `share`/255
        return Image.fromarray((base + (rng.random(base.shape) < share)).astype(np.uint8))

    other = Image.fromarray(rng.integers(10, 240, (32, 32, 3)).astype(np.uint8))
    images = [Image.fromarray(base.astype(np.uint8)), other, plus_one_on(0.5), plus_one_on(0.9), other]
    assert icons_mod.NEAR_DUPLICATE == 0.7  # 0.5 is under it, 0.9 above
    assert icons_mod.near_duplicate_of(images) == [None, None, 0, None, 1]


def test_icon_folder_from_fake_theme(tmp_path):
    dropped = Counter()
    icons = icons_mod.read_theme(_fake_deb(tmp_path), theme="fake", spec=SIZE_FIRST, min_source_px=64,
                                 dropped=dropped)
    by_name = {icon.name: icon for icon in icons}
    assert dropped == {"symlinked alias of another icon": 1, "largest PNG under 64 px": 1,
                       "a smiley outside emotes/ (emoji sets are kept out)": 1}
    assert by_name["thing-3"].source_px == 128 and by_name["thing-1"].source_px == 64
    assert by_name["thing-1"].caption == "thing 1, an action icon"
    assert by_name["thing-2"].caption == "thing 2, a place icon"

    out = tmp_path / "out"
    out.mkdir()
    counts = icons_mod.build(icons, out, size=16, min_ink=0.03, heldout_fraction=0.2, val_share=0.2,
                             val_fraction=0.05, seed=0)
    assert counts["dropped_as_empty"] == ["fake/places/blank"]
    assert counts["num_images"] == 40 and sum(counts["counts"].values()) == 40
    assert all(counts["counts"][s] > 0 for s in ("train", "val", "heldout")), counts["counts"]

    def captions(root, split):
        ds = ImageFolderDataset(root, split=split, resolution=16, val_fraction=0.05)
        return sorted(f.caption for f in ds.files)

    train, val, heldout = (captions(out / s, "all") for s in ("train", "val", "heldout"))
    assert captions(out, "train") == train  # argen's hashed split agrees with the folders
    assert captions(out, "val") == val and captions(out, "heldout") == heldout
    heldout_names = {c.split(",")[0].lower() for c in heldout}
    assert heldout_names == set(counts["heldout_names"])
    assert not heldout_names & {c.split(",")[0].lower() for c in train + val}
    meta = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert Image.open(out / "train" / meta[0]["file_name"]).size == (16, 16)
