"""Hostile, broken and odd inputs at the data boundary: each one loads, is skipped with its reason, or is refused.

The corpus is built here from PIL and numpy (no downloaded files). Every case is one row of a table with its
exact expected outcome; `test_summary` prints the counts (docs/reliability.md quotes them):

    python -m pytest -q tests/test_reliability.py -rA
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data.imagefolder import ImageFolderDataset, index_folder, split_of
from argen.data.registry import DatasetConfig, build_dataset
from argen.data.skips import DatasetError, SkipReport, printable
from argen.data.transforms import ImageDecodeError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("data_memory", ROOT / "benchmarks" / "data_memory.py")
data_memory = importlib.util.module_from_spec(_spec)  # its PNG writer and memory probe, one copy of each
_spec.loader.exec_module(data_memory)

LOADS, SKIPPED, REFUSED, WARNED = "loads", "skipped", "refused", "warned"
RES = 16  # every image is loaded at 16 x 16


# ------------------------------------------------------------------ generated inputs

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(color=(255, 0, 0), size=(20, 12), mode="RGB") -> bytes:
    return _encode(Image.new(mode, size, color), "PNG")


def _noise(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _rgb48_png(color16=(65535, 32768, 0), size=(8, 8)) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    w, h = size
    row = b"\x00" + struct.pack(">HHH", *color16) * w
    return data_memory.png_file(struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0), zlib.compress(row * h))


def _exif_rotated_jpeg() -> bytes:
    """20 x 10 stored, left half black and right half white, EXIF orientation 6 (shown rotated 90 degrees clockwise):
    displayed 10 x 20 with black on top."""
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))
    exif = img.getexif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def _palette_transparent() -> bytes:
    """32 x 16 palette PNG: left half index 0 (transparent), right half index 1 (opaque blue)."""
    img = Image.new("P", (32, 16), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (16, 0, 32, 16))
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ------------------------------------------------------------------ outcome checks

def _rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) int in [0, 255]."""
    return ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(int)


def _colour(rgb, tol=2) -> Callable[[torch.Tensor], bool]:
    def check(x: torch.Tensor) -> bool:
        return x.shape == (3, RES, RES) and bool((np.abs(_rgb(x) - np.array(rgb)) <= tol).all())
    check.__name__ = f"colour{tuple(rgb)}"
    return check


def _black_top_white_bottom(x: torch.Tensor) -> bool:
    a = _rgb(x)
    return bool(a[0].max() < 40 and a[-1].min() > 215)  # EXIF orientation applied: not left/right


def _white_left_blue_right(x: torch.Tensor) -> bool:
    a = _rgb(x)
    return bool((a[:, 0] == 255).all() and (np.abs(a[:, -1] - (0, 0, 255)) <= 2).all())


@dataclass(frozen=True)
class Case:
    """One input and what must happen to it: LOADS (and `check` holds on its tensor), SKIPPED or WARNED (the
    reason matches `reason`), or REFUSED (an `error` whose one-line message matches `reason`)."""

    name: str
    key: str
    outcome: str
    reason: str = ""
    check: Callable[[torch.Tensor], bool] | None = None
    error: type[Exception] = DatasetError


# ------------------------------------------------------------------ the image folder corpus

NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # 'caf\udce9.png': the byte 0xe9 is not UTF-8 on its own
CTRL_OK = "ctl\x1b[31m\n.png"
CTRL_BAD = "bad\x07\r.png"
LONG_OK = "y" * 246 + ".png"  # 250 characters: fine
LONG_BAD = "x" * 296 + ".png"  # 300 characters: more than a file name may have (255 bytes)

# metadata.jsonl, line by line (starting with a UTF-8 byte-order mark)
META_LINES: list[tuple[str, bytes]] = [
    ("bom_first_line", b'\xef\xbb\xbf{"file_name": "meta_bom.png", "text": "after a byte-order mark"}'),
    ("not_json", b'{"file_name": "x.png", "text": '),
    ("not_utf8_line", b'{"file_name": "meta_latin1.png", "text": "caf\xe9"}'),
    ("nested_100k", b"[" * 100_000 + b"]" * 100_000),
    ("huge_integer", b'{"file_name": "n.png", "text": "t", "n": ' + b"9" * 5000 + b"}"),
    ("not_an_object", b"[1, 2, 3]"),
    ("no_file_name", b'{"text": "no file name"}'),
    ("text_not_string", b'{"file_name": "meta_ok.png", "text": 42}'),
    ("lone_surrogate_text", b'{"file_name": "meta_ok.png", "text": "bad \\ud800 text"}'),
    ("dotdot", b'{"file_name": "../outside.png", "text": "escape"}'),
    ("absolute", b'{"file_name": "/etc/passwd", "text": "escape"}'),
    ("nul_in_name", b'{"file_name": "a\\u0000b.png", "text": "nul"}'),
    ("listed", b'{"file_name": "dup.png", "text": "first"}'),
    ("duplicate", b'{"file_name": "./dup.png", "text": "second"}'),
    ("missing_file", b'{"file_name": "gone.png", "text": "missing"}'),
    ("empty_caption", b'{"file_name": "emptycap.png", "text": "   "}'),
    ("too_long_name", json.dumps({"file_name": LONG_BAD, "text": "long"}).encode()),
    ("broken_symlink", b'{"file_name": "dangling.png", "text": "dangling"}'),
    ("through_symlinked_dir", b'{"file_name": "linkdir_out/o.png", "text": "through a symlinked directory"}'),
    ("eps_as_png", b'{"file_name": "eps.png", "text": "PostScript named .png"}'),
    ("cmyk_jpeg", b'{"file_name": "cmyk.jpg", "text": "cmyk"}'),
]
META_KEY = {name: f"metadata.jsonl:{i + 1}" for i, (name, _) in enumerate(META_LINES)}


def build_folder(root: Path, outside: Path) -> None:
    """The image folder corpus: one file (or link, or metadata line) per case in FOLDER_CASES."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    files: dict[str, bytes] = {
        "ok.png": _png((255, 0, 0)),
        "truncated.png": _truncated(_encode(_noise(), "PNG")),
        "truncated.jpg": _truncated(_encode(_noise(), "JPEG")),
        "zero.png": b"",
        "text.png": b"this is not an image\n",
        "bomb.png": data_memory.zeros_png(9500, 9500),  # 90 Mpx, over Pillow's MAX_IMAGE_PIXELS: its warning, escalated
        "bomb_header.png": data_memory.zeros_png(30000, 30000, rows=1),  # 900 Mpx claimed: Pillow's DecompressionBombError
        "big.png": data_memory.zeros_png(8500, 8500),  # 72 Mpx: under Pillow's limit, over ours
        "thin.png": _png((0, 0, 255), size=(40000, 1)),
        "tall.png": _png((0, 0, 255), size=(1, 25)),
        "strip.png": _png((0, 0, 255), size=(200, 10)),  # 20:1, exactly the limit: loads
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "grey16.png": _png(40000, size=(8, 8), mode="I;16"),
        "rgb48.png": _rgb48_png(),
        "palette.png": _palette_transparent(),
        "rgba.png": _png((0, 0, 0, 0), mode="RGBA"),
        "la.png": _png((100, 128), mode="LA"),
        "exif.jpg": _exif_rotated_jpeg(),
        "anim.gif": _animated_gif(),
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "webp.webp": _encode(Image.new("RGB", (16, 16), (0, 255, 0)), "WEBP", lossless=True),
        "tiff.tif": _encode(Image.new("RGB", (16, 16), (0, 255, 0)), "TIFF"),
        "bmp.bmp": _encode(Image.new("RGB", (16, 16), (0, 255, 0)), "BMP"),
        NON_UTF8: _png((0, 255, 0)),
        "latin1_caption.png": _png(),
        CTRL_OK: _png((0, 255, 0)),
        CTRL_BAD: b"broken",
        LONG_OK: _png((0, 255, 0)),
        "bom_caption.png": _png((0, 255, 0)),
        "nocap.png": _png(),
        "meta_bom.png": _png((0, 255, 0)),
        "dup.png": _png((0, 255, 0)),
        "emptycap.png": _png(),
        "sub/real.png": _png((0, 255, 0)),
        "sidecar_out.png": _png(),
    }
    captions: dict[str, bytes] = {
        name: b"a caption" for name in files
        if name not in ("nocap.png", "meta_bom.png", "dup.png", "emptycap.png", "eps.png", "cmyk.jpg", "sidecar_out.png")
    }
    captions["latin1_caption.png"] = b"caf\xe9 au lait"  # Latin-1, not UTF-8
    captions["bom_caption.png"] = b"\xef\xbb\xbfa caption after a byte-order mark"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_bytes(text)
    (root / "metadata.jsonl").write_bytes(b"\n".join(line for _, line in META_LINES) + b"\n")

    # symlinks: in the root and out of it
    (outside / "secret.txt").write_text("a secret from outside the dataset")
    (outside / "secret.png").write_bytes(_png((255, 255, 0)))
    (outside / "outdir").mkdir()
    (outside / "outdir" / "o.png").write_bytes(_png((255, 255, 0)))
    (outside / "outdir" / "o.txt").write_text("outside directory")
    (outside / "outdir" / "loop").symlink_to(outside / "outdir")  # a cycle, for follow_symlinks=True
    (outside / "meta").mkdir()
    (outside / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "m.png", "text": "outside metadata"}) + "\n")
    (root / "link_in.png").symlink_to("sub/real.png")
    (root / "link_in.txt").write_text("a link inside the root")
    (root / "link_out.png").symlink_to(outside / "secret.png")
    (root / "link_out.txt").write_text("a link out of the root")
    (root / "sidecar_out.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir_in").symlink_to("sub")
    (root / "linkdir_out").symlink_to(outside / "outdir")
    (root / "loop").symlink_to(".")
    (root / "dangling.png").symlink_to(root / "no-such-file.png")
    (root / "sub2").mkdir()
    (root / "sub2" / "m.png").write_bytes(_png((0, 255, 0)))
    (root / "sub2" / "metadata.jsonl").symlink_to(outside / "meta" / "metadata.jsonl")


OUTSIDE = r"is a symlink that leads outside the dataset root \(follow_symlinks=True allows it\)"
NOT_DECODABLE = r"cannot decode image: not a PNG, JPEG, WEBP, BMP, GIF, TIFF file"

FOLDER_CASES = [
    # decodable, with the right size, colour and orientation
    Case("png", "ok.png", LOADS, check=_colour((255, 0, 0))),
    Case("strip_20_to_1", "strip.png", LOADS, check=_colour((0, 0, 255))),
    Case("cmyk_jpeg", "cmyk.jpg", LOADS, check=_colour((255, 0, 0), tol=3)),
    Case("grey_16bit_png", "grey16.png", LOADS, check=_colour((156, 156, 156))),  # 40000 / 65535 * 255
    Case("rgb_16bit_png", "rgb48.png", LOADS, check=_colour((255, 128, 0))),
    Case("palette_transparency", "palette.png", LOADS, check=_white_left_blue_right),
    Case("rgba_transparent", "rgba.png", LOADS, check=_colour((255, 255, 255))),
    Case("la_half_alpha", "la.png", LOADS, check=_colour((177, 177, 177))),  # grey 100 at alpha 128 over white
    Case("exif_rotated_jpeg", "exif.jpg", LOADS, check=_black_top_white_bottom),
    Case("animated_gif_first_frame", "anim.gif", LOADS, check=_colour((255, 0, 0))),
    Case("webp", "webp.webp", LOADS, check=_colour((0, 255, 0))),
    Case("tiff", "tiff.tif", LOADS, check=_colour((0, 255, 0))),
    Case("bmp", "bmp.bmp", LOADS, check=_colour((0, 255, 0))),
    Case("non_utf8_file_name", NON_UTF8, LOADS, check=_colour((0, 255, 0))),
    Case("control_chars_in_name", CTRL_OK, LOADS, check=_colour((0, 255, 0))),
    Case("name_250_chars", LONG_OK, LOADS, check=_colour((0, 255, 0))),
    Case("sidecar_with_bom", "bom_caption.png", LOADS, check=_colour((0, 255, 0))),
    Case("metadata_with_bom", "meta_bom.png", LOADS, check=_colour((0, 255, 0))),
    Case("duplicate_first_kept", "dup.png", LOADS, check=_colour((0, 255, 0))),
    Case("symlink_inside_root", "link_in.png", LOADS, check=_colour((0, 255, 0))),
    Case("file_under_symlinked_dir_inside", "sub/real.png", LOADS, check=_colour((0, 255, 0))),
    # broken or hostile images: skipped when decoded
    Case("truncated_png", "truncated.png", SKIPPED, r"cannot decode image \(OSError: .*truncated"),
    Case("truncated_jpeg", "truncated.jpg", SKIPPED, r"cannot decode image \(OSError: .*truncated"),
    Case("zero_bytes", "zero.png", SKIPPED, NOT_DECODABLE),
    Case("text_as_png", "text.png", SKIPPED, NOT_DECODABLE),
    Case("eps_as_png_not_run", "eps.png", SKIPPED, NOT_DECODABLE),
    Case("control_chars_broken", CTRL_BAD, SKIPPED, NOT_DECODABLE),
    Case("bomb_9500x9500_88KB", "bomb.png", SKIPPED,
         r"image too large, a possible decompression bomb \(Image size \(90250000 pixels\) exceeds limit of 89478485 pixels"),
    Case("bomb_header_30000x30000", "bomb_header.png", SKIPPED,
         r"image too large, a possible decompression bomb \(Image size \(900000000 pixels\) exceeds limit of 178956970"),
    Case("big_8500x8500", "big.png", SKIPPED,
         r"image is 8500x8500 = 72\.2 megapixels, over the limit of 67\.1 megapixels \(MAX_PIXELS\)"),
    Case("thin_40000x1", "thin.png", SKIPPED, r"image is 40000x1 pixels, aspect ratio 40000:1 is over the limit of 20:1 \(MAX_ASPECT\)"),
    Case("tall_1x25", "tall.png", SKIPPED, r"image is 1x25 pixels, aspect ratio 25:1 is over the limit of 20:1"),
    # captions and files: skipped at index time
    Case("non_utf8_sidecar", "latin1_caption.png", SKIPPED, r"sidecar caption latin1_caption\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\)"),
    Case("no_caption", "nocap.png", SKIPPED, r"no caption \(no metadata\.jsonl entry and no sidecar nocap\.txt\)"),
    Case("empty_caption", "emptycap.png", SKIPPED, r"^empty caption$"),
    Case("missing_file", "gone.png", SKIPPED, r"listed in metadata\.jsonl:15 but the file does not exist"),
    Case("name_300_chars", LONG_BAD, SKIPPED, r"listed in metadata\.jsonl:17 but the file cannot be checked \(File name too long\)"),
    Case("broken_symlink", "dangling.png", SKIPPED, r"listed in metadata\.jsonl:18 but the file is a broken symlink"),
    # the root is a boundary
    Case("symlink_out_image", "link_out.png", SKIPPED, "file " + OUTSIDE),
    Case("symlink_out_sidecar", "sidecar_out.png", SKIPPED, "sidecar caption sidecar_out.txt " + OUTSIDE),
    Case("symlinked_dir_out", "linkdir_out/", SKIPPED, "directory " + OUTSIDE + "; not entered"),
    Case("listed_through_symlinked_dir_out", "linkdir_out/o.png", SKIPPED, r"listed in metadata\.jsonl:19 but the file " + OUTSIDE),
    Case("symlinked_metadata_out", "sub2/metadata.jsonl", SKIPPED, "metadata file " + OUTSIDE + "; not read"),
    Case("image_of_unread_metadata", "sub2/m.png", SKIPPED, r"no caption \(no metadata\.jsonl entry and no sidecar m\.txt\)"),
    # metadata.jsonl lines: each bad one skipped and named FILE:LINE, the rest of the file used
    Case("malformed_json_line", META_KEY["not_json"], SKIPPED, r"malformed line, not valid JSON \(Expecting value\)"),
    Case("non_utf8_line", META_KEY["not_utf8_line"], SKIPPED, r"line is not valid UTF-8 \(byte 0xe9 at column 46\)"),
    Case("nested_100k_deep", META_KEY["nested_100k"], SKIPPED, r"malformed line, JSON nested too deeply to parse"),
    Case("integer_5000_digits", META_KEY["huge_integer"], SKIPPED, r"malformed line, not valid JSON \(Exceeds the limit"),
    Case("line_not_object", META_KEY["not_an_object"], SKIPPED, r"each line must be a JSON object, got list"),
    Case("no_file_name", META_KEY["no_file_name"], SKIPPED, r"missing or non-string 'file_name' \(got None\)"),
    Case("text_not_string", META_KEY["text_not_string"], SKIPPED, r"'text' must be a string, got 42"),
    Case("text_lone_surrogate", META_KEY["lone_surrogate_text"], SKIPPED, r"'text' is not valid Unicode"),
    Case("dotdot_name", META_KEY["dotdot"], SKIPPED, r"file_name '\.\./outside\.png' must be a relative path inside the dataset root"),
    Case("absolute_name", META_KEY["absolute"], SKIPPED, r"file_name '/etc/passwd' must be a relative path inside the dataset root"),
    Case("nul_in_name", META_KEY["nul_in_name"], SKIPPED, r"file_name 'a\\x00b\.png' contains a NUL character"),
    Case("duplicate_line", META_KEY["duplicate"], SKIPPED,
         r"file_name '\./dup\.png' is listed twice \(first at metadata\.jsonl:13\); this line is ignored"),
]

# the same folder with follow_symlinks=True: what was refused for leaving the root now loads
FOLLOW_CASES = [
    Case("follow_symlink_out_image", "link_out.png", LOADS, check=_colour((255, 255, 0))),
    Case("follow_symlink_out_sidecar", "sidecar_out.png", LOADS, check=_colour((255, 0, 0))),
    Case("follow_symlinked_dir_out", "linkdir_out/o.png", LOADS, check=_colour((255, 255, 0))),
    Case("follow_symlinked_metadata_out", "sub2/m.png", LOADS, check=_colour((0, 255, 0))),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("corpus")
    build_folder(base / "data", base / "outside")
    return base


class FolderOutcomes(NamedTuple):
    by_key: dict[str, tuple[str, object]]  # key -> (LOADS, image tensor) or (SKIPPED, reason)
    captions: dict[str, str]  # key -> caption, for what loaded


def _folder_outcomes(root: Path, **flags) -> FolderOutcomes:
    """Every entry's outcome through the real dataset: the index, then every item."""
    ds = ImageFolderDataset(root, split="all", resolution=RES, **flags)
    out: dict[str, tuple[str, object]] = {s.key: (SKIPPED, s.reason) for s in ds.index_skips}
    captions = {}
    for i, f in enumerate(ds.files):
        item = ds[i]
        if item["key"] == f.key:
            out[f.key] = (LOADS, item["image"])
            captions[f.key] = item["caption"]
        else:
            assert item["skipped"][0].key == f.key
            out[f.key] = (SKIPPED, item["skipped"][0].reason)
    return FolderOutcomes(out, captions)


@pytest.fixture(scope="module")
def folder_outcomes(corpus):
    return _folder_outcomes(corpus / "data")


@pytest.fixture(scope="module")
def follow_outcomes(corpus):
    return _folder_outcomes(corpus / "data", follow_symlinks=True)


def _assert_outcome(case: Case, outcomes: dict[str, tuple[str, object]]) -> None:
    assert case.key in outcomes, f"{case.name}: {printable(case.key)} has no outcome at all"
    got, value = outcomes[case.key]
    assert got == case.outcome, f"{case.name}: expected {case.outcome}, got {got} ({value if got != LOADS else 'image'})"
    if got == LOADS:
        assert case.check(value), f"{case.name}: loaded, but {case.check.__name__} does not hold"
    else:
        assert re.search(case.reason, value), f"{case.name}: reason {value!r} does not match {case.reason!r}"


@pytest.mark.parametrize("case", FOLDER_CASES, ids=lambda c: c.name)
def test_folder_case(case, folder_outcomes):
    _assert_outcome(case, folder_outcomes.by_key)


@pytest.mark.parametrize("case", FOLLOW_CASES, ids=lambda c: c.name)
def test_follow_symlinks_case(case, follow_outcomes):
    _assert_outcome(case, follow_outcomes.by_key)


def test_every_folder_entry_has_a_case(folder_outcomes, follow_outcomes):
    """No entry loads or is skipped without a row saying so (and symlink loops add nothing)."""
    keys = {c.key for c in FOLDER_CASES}
    assert set(folder_outcomes.by_key) == keys
    not_refused = {"linkdir_out/", "sub2/metadata.jsonl"}  # with follow_symlinks=True, entered and read
    assert set(follow_outcomes.by_key) == keys - not_refused
    changed = {k for k in keys - not_refused if follow_outcomes.by_key[k][0] != folder_outcomes.by_key[k][0]}
    assert changed == {c.key for c in FOLLOW_CASES}


def test_captions_are_exact(folder_outcomes, follow_outcomes):
    captions = folder_outcomes.captions
    assert captions["meta_bom.png"] == "after a byte-order mark"
    assert captions["bom_caption.png"] == "a caption after a byte-order mark"
    assert captions["dup.png"] == "first"
    assert not any("\ufffd" in c for c in captions.values())  # nothing silently replaced
    assert follow_outcomes.captions["sidecar_out.png"] == "a secret from outside the dataset"
    assert "a secret" not in " ".join(captions.values())


def test_skip_summary_is_printable(corpus):
    ds = ImageFolderDataset(corpus / "data", split="all", resolution=RES)
    report = SkipReport.for_dataset(ds)
    for i in range(len(ds)):
        report.update(ds[i])
    summary = report.summary(limit=None)
    assert all(line.isprintable() for line in summary.split("\n"))
    assert "  bad\\x07\\r.png: cannot decode image" in summary
    assert f"  {'x' * 296}.png: listed in" in summary
    # the loaded names print escaped too, and their split is defined
    assert printable(CTRL_OK) == "ctl\\x1b[31m\\n.png" and printable(NON_UTF8) == "caf\\xe9.png"
    assert str(ImageDecodeError(CTRL_BAD, "cannot decode image")) == "bad\\x07\\r.png: cannot decode image"
    assert {split_of(k, 0.5) for k in (NON_UTF8, CTRL_OK, "caf\ud800.png")} <= {"train", "val"}


def test_split_of_non_utf8_name_and_stable_for_utf8():
    # an ordinary name hashes exactly as before (UTF-8); an undecodable one hashes as its surrogate
    h = int.from_bytes(hashlib.sha1("élan.png".encode()).digest()[:8], "big") / 2.0**64
    assert split_of("élan.png", 0.5) == ("val" if h < 0.5 else "train")


# ------------------------------------------------------------------ whole-folder and spec refusals

def _refusal_cases(corpus: Path) -> list[tuple[Case, Callable[[], object]]]:
    empty = corpus / "empty"
    empty.mkdir(exist_ok=True)
    only_link = corpus / "only_link"
    if not only_link.exists():
        only_link.mkdir()
        (only_link / "out").symlink_to(corpus / "outside" / "outdir")
    data = corpus / "data"
    marker = corpus / "pipe-ran"
    return [
        (Case("strict_metadata", "", REFUSED, r"data/metadata\.jsonl:2: malformed line, not valid JSON \(Expecting value\)\. Expected captions"),
         lambda: index_folder(data, strict=True)),
        (Case("strict_dataset_config", "", REFUSED, r"metadata\.jsonl:2: malformed line"),
         lambda: DatasetConfig(spec=f"imagefolder:{data}", resolution=RES, strict=True).build("all")),
        (Case("empty_folder", "", REFUSED, r"image folder .*empty is empty\. Put images there with captions"),
         lambda: index_folder(empty)),
        (Case("only_a_symlinked_dir_out", "", REFUSED, r"is empty\..* Not entered: out/ \(directory " + OUTSIDE),
         lambda: index_folder(only_link)),
        (Case("missing_folder", "", REFUSED, r"image folder .*nope does not exist\."),
         lambda: index_folder(corpus / "nope")),
        (Case("pipe_spec", "", REFUSED,
              r"^webdataset shard 'pipe:touch .*pipe-ran' is a pipe: command, which would run in a shell; refused\. "
              r"If you trust this spec, pass allow_pipe=True \(argen CLI: --allow-pipe\)\.$"),
         lambda: build_dataset(f"webdataset:pipe:touch {marker}", resolution=RES)),
        (Case("pipe_in_brace_pattern", "", REFUSED, r"webdataset shard 'pipe:touch .*' is a pipe: command"),
         lambda: build_dataset(f"webdataset:{{{data}/a.tar,pipe:touch {marker}}}", resolution=RES)),
        (Case("pipe_from_config_file", "", REFUSED, r"is a pipe: command.*allow_pipe=True"),
         lambda: DatasetConfig(spec=f"webdataset:pipe:touch {marker}", resolution=RES).build("all")),
        (Case("flag_on_wrong_kind", "", REFUSED, r"follow_symlinks and strict apply to imagefolder specs only, not 'shapes'",
              error=ValueError),
         lambda: DatasetConfig(spec="shapes", follow_symlinks=True)),
    ]


REFUSAL_NAMES = ["strict_metadata", "strict_dataset_config", "empty_folder", "only_a_symlinked_dir_out", "missing_folder",
                 "pipe_spec", "pipe_in_brace_pattern", "pipe_from_config_file", "flag_on_wrong_kind"]


def _run_refusal(case: Case, fn: Callable[[], object]) -> str:
    if case.name.startswith("pipe"):
        pytest.importorskip("webdataset")
    with pytest.raises(case.error) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and message.isprintable(), f"{case.name}: not one printable line: {message!r}"
    assert re.search(case.reason, message), f"{case.name}: {message!r} does not match {case.reason!r}"
    return message


@pytest.mark.parametrize("name", REFUSAL_NAMES)
def test_refusal_case(name, corpus):
    case, fn = next((c, f) for c, f in _refusal_cases(corpus) if c.name == name)
    _run_refusal(case, fn)
    assert not (corpus / "pipe-ran").exists()


def test_refusal_cases_are_all_listed(corpus):
    assert [c.name for c, _ in _refusal_cases(corpus)] == REFUSAL_NAMES


# ------------------------------------------------------------------ webdataset shards

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_shards(folder: Path) -> None:
    folder.mkdir(parents=True)
    red = _png((255, 0, 0), size=(8, 8))
    with tarfile.open(folder / "s0.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in [
            ("ok", {"png": red, "txt": b"red"}),
            ("truncated", {"png": _truncated(_encode(_noise(), "PNG")), "txt": b"cut"}),
            ("nocap", {"png": red}),
            ("emptycap", {"png": red, "txt": b"  \n"}),
            ("latin1", {"png": red, "txt": b"caf\xe9"}),
            ("bom", {"png": red, "txt": b"\xef\xbb\xbfred"}),
            ("bomb", {"png": data_memory.zeros_png(9500, 9500), "txt": b"bomb"}),
            ("thin", {"png": _png(size=(40000, 1)), "txt": b"thin"}),
            ("eps", {"jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "txt": b"eps"}),
            (os.fsdecode(b"caf\xe9"), {"png": red, "txt": b"non-UTF-8 member name"}),
            ("ctl\x1b[31m", {"png": red, "txt": b"control characters in the member name"}),
            ("../../up", {"png": red, "txt": b"a member name with .. (never a path: nothing is extracted)"}),
        ]:
            for ext, data in members.items():
                _tar_add(tar, f"{key}.{ext}", data)
        for name, data in (("dup.png", red), ("dup.png", red), ("dup.txt", b"dup")):
            _tar_add(tar, name, data)  # the same member name twice: webdataset warns, the sample stays
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _tar_add(tar, "link.txt", b"a symlink member")
    with tarfile.open(folder / "s1.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _tar_add(tar, "a.png", red)
        _tar_add(tar, "a.txt", b"before the cut")
        _tar_add(tar, "b.png", _encode(_noise(), "PNG"))
        _tar_add(tar, "b.txt", b"after the cut")
    with tarfile.open(folder / "s1.tar") as tar:
        cut = tar.getmember("b.png").offset_data + 100
    data = (folder / "s1.tar").read_bytes()
    (folder / "s1.tar").write_bytes(data[:cut])  # a shard cut off in the middle of a member


WDS_CASES = [
    Case("wds_png", "s0.tar/ok", LOADS, check=_colour((255, 0, 0))),
    Case("wds_caption_bom", "s0.tar/bom", LOADS, check=_colour((255, 0, 0))),
    Case("wds_duplicate_member", "s0.tar/dup", LOADS, check=_colour((255, 0, 0))),
    Case("wds_non_utf8_member_name", "s0.tar/" + os.fsdecode(b"caf\xe9"), LOADS, check=_colour((255, 0, 0))),
    Case("wds_control_chars_in_name", "s0.tar/ctl\x1b[31m", LOADS, check=_colour((255, 0, 0))),
    Case("wds_dotdot_member_name", "s0.tar/../../up", LOADS, check=_colour((255, 0, 0))),
    Case("wds_before_the_cut", "s1.tar/a", LOADS, check=_colour((255, 0, 0))),
    Case("wds_truncated_member", "s0.tar/truncated", SKIPPED, r"cannot decode image \(OSError: .*truncated"),
    Case("wds_no_caption", "s0.tar/nocap", SKIPPED, r"^no caption \(\.txt\)$"),
    Case("wds_empty_caption", "s0.tar/emptycap", SKIPPED, r"^empty caption$"),
    Case("wds_non_utf8_caption", "s0.tar/latin1", SKIPPED, r"caption \(\.txt\) is not valid UTF-8 \(byte 0xe9 at offset 3\)"),
    Case("wds_bomb", "s0.tar/bomb", SKIPPED, r"image too large, a possible decompression bomb"),
    Case("wds_thin", "s0.tar/thin", SKIPPED, r"aspect ratio 40000:1 is over the limit of 20:1"),
    Case("wds_eps_as_jpg", "s0.tar/eps", SKIPPED, NOT_DECODABLE),
    Case("wds_symlink_member", "s0.tar/link", SKIPPED, r"no image \(\.jpg/\.png/\.jpeg/\.webp\) in sample, found: txt"),
    # a shard cut mid-member: what came before loads; webdataset's warning names the shard
    Case("wds_cut_shard", "s1.tar/b", WARNED, r"ReadError.*unexpected end of data.*s1\.tar"),
]


@pytest.fixture(scope="module")
def wds_outcomes(tmp_path_factory) -> dict[str, tuple[str, object]]:
    pytest.importorskip("webdataset")
    folder = tmp_path_factory.mktemp("shards")
    build_shards(folder / "shards")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(build_dataset(f"webdataset:{folder / 'shards'}", split="all", resolution=RES))
    out: dict[str, tuple[str, object]] = {it["key"]: (LOADS, it["image"]) for it in items}
    for it in items:
        out.update({s.key: (SKIPPED, s.reason) for s in it["skipped"]})
    messages = " | ".join(str(w.message) for w in caught)
    out.update({c.key: (WARNED, messages) for c in WDS_CASES if c.outcome == WARNED and c.key not in out})
    return out


@pytest.mark.parametrize("case", WDS_CASES, ids=lambda c: c.name)
def test_webdataset_case(case, wds_outcomes):
    _assert_outcome(case, wds_outcomes)


def test_every_shard_sample_has_a_case(wds_outcomes):
    assert set(wds_outcomes) == {c.key for c in WDS_CASES}


# ------------------------------------------------------------------ memory: thin and huge images

def test_peak_memory_of_thin_and_huge_images():
    """Each image is loaded at 256 px in its own process (benchmarks/data_memory.py); its peak RSS over an idle
    process is what the load cost. Before the header checks, 40000x1 took 10.5 GB and 9500x9500 loaded (516 MB).
    The control, a 4000x4000 image that is accepted, must show up on the meter (48 MB decoded)."""
    pytest.importorskip("resource")
    inputs = "thin_40000x1,thin_80000x1,bomb_9500x9500,big_8500x8500,control_4000x4000"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_memory.py"), "--inputs", inputs, "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    rows = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
    print("\npeak RSS over an idle process, per image loaded at 256 px:")
    for r in rows.values():
        print(f"  {r['name']:22s} {r['peak_mb']:7.1f} MB  {r['outcome']}")
    for name in ("thin_40000x1.png", "thin_80000x1.png", "bomb_9500x9500.png", "big_8500x8500.png"):
        assert rows[name]["outcome"].startswith("refused: ") and rows[name]["peak_mb"] < 200, rows[name]
    assert rows["thin_40000x1.png"]["outcome"].endswith("aspect ratio 40000:1 is over the limit of 20:1 (MAX_ASPECT)")
    assert "decompression bomb" in rows["bomb_9500x9500.png"]["outcome"]
    assert "MAX_PIXELS" in rows["big_8500x8500.png"]["outcome"]
    control = rows["control_4000x4000.png"]
    assert control["outcome"] == "loaded (3, 256, 256)" and 48 <= control["peak_mb"] < 200, control


# ------------------------------------------------------------------ the counts

def test_summary(corpus, folder_outcomes, follow_outcomes, request):
    """Every row again, tallied: the counts docs/reliability.md reports (print with -rA or -s)."""
    tally = {LOADS: 0, SKIPPED: 0, REFUSED: 0, WARNED: 0}
    rows = [(c, folder_outcomes.by_key) for c in FOLDER_CASES] + [(c, follow_outcomes.by_key) for c in FOLLOW_CASES]
    try:
        wds = request.getfixturevalue("wds_outcomes")
        rows += [(c, wds) for c in WDS_CASES]
    except pytest.skip.Exception:
        pass
    for case, outcomes in rows:
        _assert_outcome(case, outcomes)
        tally[case.outcome] += 1
    for case, fn in _refusal_cases(corpus):
        if case.name.startswith("pipe") and not any(c.name.startswith("wds") for c, _ in rows):
            continue
        _run_refusal(case, fn)
        tally[REFUSED] += 1
    n = sum(tally.values())
    print(f"\nreliability: {n} inputs tried: {tally[LOADS]} loaded, {tally[SKIPPED]} skipped (named), "
          f"{tally[REFUSED]} refused (one-line error), {tally[WARNED]} warned (webdataset, shard named); "
          "0 crashes, 0 wrong outcomes")
    assert n == len(rows) + tally[REFUSED]
