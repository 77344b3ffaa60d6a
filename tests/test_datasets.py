"""Real-data datasets: transforms, image folders, skip accounting across workers, WebDataset shards, registry."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data.imagefolder import ImageFolderDataset, index_folder, split_of
from argen.data.registry import DatasetConfig, build_dataloader, build_dataset, parse_spec
from argen.data.skips import DatasetError, SkipReport, collate
from argen.data.transforms import ImageDecodeError, load_image, load_image_tensor, resize_center_crop


def _png_bytes(color=(255, 0, 0), size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_image(path: Path, color=(255, 0, 0), size=(20, 12), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _write_metadata(root: Path, rows: list[dict]) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------ transforms

@pytest.mark.parametrize("size", [(20, 12), (7, 31), (64, 64), (3, 3)])
@pytest.mark.parametrize("mode,color", [("RGB", (10, 200, 30)), ("L", 128), ("RGBA", (0, 0, 255, 255)), ("P", 3), ("I;16", 40000)])
def test_resize_crop_shape_and_range(tmp_path, size, mode, color):
    path = _write_image(tmp_path / "x.png", color=color, size=size, mode=mode)
    x = load_image_tensor(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_transforms_values(tmp_path):
    # pure colours survive resize exactly; transparent pixels become white; greyscale becomes equal channels
    x = load_image_tensor(_write_image(tmp_path / "r.png", (255, 0, 0), size=(33, 9)), 8)
    assert torch.allclose(x[0], torch.ones(8, 8)) and torch.allclose(x[1:], -torch.ones(2, 8, 8))
    x = load_image_tensor(_write_image(tmp_path / "t.png", (0, 0, 0, 0), mode="RGBA"), 8)
    assert torch.allclose(x, torch.ones_like(x))
    x = load_image_tensor(_write_image(tmp_path / "g.jpg", 100, mode="L"), 8)
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])


def test_centre_crop_takes_the_middle():
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20] = 255  # white middle third of a wide image
    out = np.asarray(resize_center_crop(Image.fromarray(a), 10))
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_resize_is_the_whole_image_resize_except_for_enlarged_strips():
    """The same pixels as resizing the whole image then cropping, except where that would enlarge a strip
    (aspect over 4:1, smaller than the output): there only the crop window is resampled, nearly the same."""
    def whole_then_crop(img, r):  # the definition, as this function was written before the crop-window path
        w, h = img.size
        new_w, new_h = max(r, round(w * r / min(w, h))), max(r, round(h * r / min(w, h)))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (new_w - r) // 2, (new_h - r) // 2
        return img.crop((left, top, left + r, top + r))

    rng = np.random.default_rng(0)
    n_whole = n_window = 0
    for w, h, r in itertools.product((3, 9, 17, 64, 100, 257, 1000), (8, 50, 99, 480), (8, 32, 256)):
        if max(w, h) > 20 * min(w, h):
            continue
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8))
        scale = r / min(w, h)
        window = max(r, round(w * scale)) * max(r, round(h * scale)) > max(w * h, 4 * r * r)
        for img in (noise, smooth):
            got, want = np.asarray(resize_center_crop(img, r)).astype(int), np.asarray(whole_then_crop(img, r)).astype(int)
            if not window:
                assert np.array_equal(got, want), (w, h, r)
            elif img is smooth:
                assert np.abs(got - want).max() <= 2, (w, h, r)
        n_whole, n_window = n_whole + (not window), n_window + window
    assert n_whole > 40 and n_window > 5


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg").size == (10, 20)


def test_decode_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    trunc = _png_bytes(size=(64, 64))
    (tmp_path / "trunc.png").write_bytes(trunc[: len(trunc) // 2])
    for name in ("bad.png", "trunc.png", "missing.png"):
        with pytest.raises(ImageDecodeError, match=name):
            load_image(tmp_path / name)


# ------------------------------------------------------------------ image folder

def _messy_folder(root: Path) -> None:
    """10 good images (metadata + sidecar, in subfolders) plus one of every kind of bad entry."""
    rows = []
    for i in range(8):
        _write_image(root / "sub" / f"good{i}.png", (i * 30, 0, 0))
        rows.append({"file_name": f"sub/good{i}.png", "text": f"caption {i}"})
    for i in range(2):
        _write_image(root / "side" / f"s{i}.jpg", (0, i * 100, 0))
        (root / "side" / f"s{i}.txt").write_text(f"sidecar {i}\n")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    trunc = _png_bytes(size=(64, 64))
    (root / "truncated.png").write_bytes(trunc[: len(trunc) // 2])
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    _write_image(root / "nocap.png")
    _write_image(root / "emptycap.png")
    rows += [
        {"file_name": "corrupt.png", "text": "corrupt"},
        {"file_name": "truncated.png", "text": "truncated"},
        {"file_name": "notes.pdf", "text": "a pdf"},
        {"file_name": "gone.png", "text": "missing file"},
        {"file_name": "emptycap.png", "text": "  "},
    ]
    _write_metadata(root, rows)


BAD_AT_INDEX = {"gone.png", "nocap.png", "emptycap.png"}
BAD_AT_DECODE = {"corrupt.png", "truncated.png", "notes.pdf"}


def test_imagefolder_skips_bad_entries_and_reports_them(tmp_path):
    _messy_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, split="all", resolution=8)
    assert {s.key for s in ds.index_skips} == BAD_AT_INDEX
    report = SkipReport.for_dataset(ds)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        report.update(it)
        assert it["image"].shape == (3, 8, 8) and it["caption"].strip()
    assert set(report.keys) == BAD_AT_INDEX | BAD_AT_DECODE
    summary = report.summary()
    for name in BAD_AT_INDEX | BAD_AT_DECODE:
        assert name in summary
    assert "skipped 6 samples" in summary
    # the good entries are all served; captions come from metadata and sidecars
    captions = {it["key"]: it["caption"] for it in items}
    assert captions["sub/good3.png"] == "caption 3" and captions["side/s1.jpg"] == "sidecar 1"
    assert {it["key"] for it in items} == {f"sub/good{i}.png" for i in range(8)} | {"side/s0.jpg", "side/s1.jpg"}


def test_imagefolder_skip_reporting_with_two_workers(tmp_path):
    _messy_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, split="all", resolution=8)
    loader = build_dataloader(ds, batch_size=2, num_workers=2)
    report = SkipReport.for_dataset(ds)
    n = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 8, 8) and len(batch["caption"]) == batch["image"].shape[0]
        report.update(batch)
        n += len(batch["key"])
    assert n == len(ds)
    assert set(report.keys) == BAD_AT_INDEX | BAD_AT_DECODE


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(60):
        _write_image(tmp_path / f"im{i:03d}.png", size=(4, 4))
        (tmp_path / f"im{i:03d}.txt").write_text(f"c{i}")
    train = ImageFolderDataset(tmp_path, split="train", resolution=4, val_fraction=0.2)
    val = ImageFolderDataset(tmp_path, split="val", resolution=4, val_fraction=0.2)
    train_keys, val_keys = {f.key for f in train.files}, {f.key for f in val.files}
    assert train_keys.isdisjoint(val_keys) and len(train_keys | val_keys) == 60
    assert 0 < len(val_keys) < 30
    assert [f.key for f in ImageFolderDataset(tmp_path, split="val", resolution=4, val_fraction=0.2).files] == sorted(val_keys)
    assert all(split_of(k, 0.2) == "val" for k in val_keys)
    # the split of a file does not depend on the other files in the folder
    (tmp_path / "im000.png").unlink()
    assert {f.key for f in ImageFolderDataset(tmp_path, split="val", resolution=4, val_fraction=0.2).files} == val_keys - {"im000.png"}


def test_a_heldout_folder_is_its_own_split_and_never_train_or_val(tmp_path):
    from argen.data.registry import has_heldout
    from argen.text import dataset_captions

    for i in range(40):
        _write_image(tmp_path / "icons" / f"im{i:03d}.png", size=(4, 4))
        (tmp_path / "icons" / f"im{i:03d}.txt").write_text(f"seen {i}")
    assert not has_heldout(f"imagefolder:{tmp_path}")
    for i in range(5):
        _write_image(tmp_path / "heldout" / f"h{i}.png", size=(4, 4))
        (tmp_path / "heldout" / f"h{i}.txt").write_text(f"unseen {i}")
    assert has_heldout(f"imagefolder:{tmp_path}") and has_heldout("shapes") and not has_heldout("shapes:relation")
    keys = {s: {f.key for f in ImageFolderDataset(tmp_path, split=s, resolution=4, val_fraction=0.2).files}
            for s in ("train", "val", "heldout", "all")}
    assert keys["heldout"] == {f"heldout/h{i}.png" for i in range(5)}
    assert keys["train"] | keys["val"] == keys["all"] - keys["heldout"] and keys["train"].isdisjoint(keys["val"])
    assert len(keys["all"]) == 45
    train_captions = dataset_captions(f"imagefolder:{tmp_path}", split="train", val_fraction=0.2)
    assert train_captions and not any(c.startswith("unseen") for c in train_captions)  # the BPE never sees them
    assert sorted(dataset_captions(f"imagefolder:{tmp_path}", split="heldout")) == [f"unseen {i}" for i in range(5)]


def test_folder_errors_are_helpful(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty.*metadata\.jsonl"):
        index_folder(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        index_folder(tmp_path / "nope")
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    (noimg / "readme.md").write_text("hi")
    with pytest.raises(DatasetError, match=r"no images found in .*noimg"):
        index_folder(noimg)
    nocap = tmp_path / "nocap"
    _write_image(nocap / "a.png")
    _write_image(nocap / "b.png")
    with pytest.raises(DatasetError, match=r"2 images in .*nocap but no captions.*metadata\.jsonl.*sidecar"):
        index_folder(nocap)


def test_malformed_metadata_names_file_and_line(tmp_path):
    _write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n\n{"file_name": "b.png", "text": \n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:3: malformed"):
        index_folder(tmp_path, strict=True)
    # by default the bad line is skipped and named, and the good one is used
    index = index_folder(tmp_path)
    assert [f.key for f in index.files] == ["a.png"]
    assert [(s.key, s.reason) for s in index.skips] == [("metadata.jsonl:3", "malformed line, not valid JSON (Expecting value)")]
    assert index.folder_skips == index.skips
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:1: missing .*file_name"):
        index_folder(tmp_path, strict=True)
    (tmp_path / "a.txt").write_text("sidecar")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "one"}\n{"file_name": "./a.png", "text": "two"}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:2: file_name './a.png' is listed twice \(first at metadata\.jsonl:1\)"):
        index_folder(tmp_path, strict=True)
    index = index_folder(tmp_path)
    assert [(f.key, f.caption) for f in index.files] == [("a.png", "one")] and [s.key for s in index.skips] == ["metadata.jsonl:2"]


def test_metadata_line_skips_are_in_every_split(tmp_path):
    for i in range(40):
        _write_image(tmp_path / f"im{i:02d}.png", size=(4, 4))
    rows = "".join(json.dumps({"file_name": f"im{i:02d}.png", "text": f"c{i}"}) + "\n" for i in range(40))
    (tmp_path / "metadata.jsonl").write_text(rows + "not json\n")
    for split in ("train", "val"):
        ds = ImageFolderDataset(tmp_path, split=split, resolution=4, val_fraction=0.3)
        assert [s.key for s in ds.index_skips] == ["metadata.jsonl:41"]


def test_pipe_shards_are_refused_unless_allowed(tmp_path):
    pytest.importorskip("webdataset")
    from argen.data.webdataset import expand_shards

    marker = tmp_path / "ran"
    for spec in (f"webdataset:pipe:touch {marker}", f"webdataset:{{pipe:touch {marker},x.tar}}", f"webdataset:PIPE:touch {marker}"):
        with pytest.raises(DatasetError, match=r"is a pipe: command.*refused\. If you trust this spec, pass allow_pipe=True"):
            build_dataset(spec, resolution=8)
    with pytest.raises(DatasetError, match="allow_pipe=True"):
        DatasetConfig(spec=f"webdataset:pipe:touch {marker}", resolution=8).build("all")
    assert not marker.exists()
    assert expand_shards(f"pipe:cat {marker}", allow_pipe=True) == [f"pipe:cat {marker}"]
    # a local shard whose name looks like a pipe is opened as a file, by its absolute path
    (tmp_path / "pipe:x.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "pipe:x.tar")]


def test_dataset_config_flags(tmp_path):
    assert DatasetConfig(spec=f"imagefolder:{tmp_path}", follow_symlinks=True, strict=True).strict
    with pytest.raises(ValueError, match="apply to imagefolder specs only"):
        DatasetConfig(spec="shapes", strict=True)
    assert not hasattr(DatasetConfig(), "allow_pipe")


def test_all_undecodable_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("a caption")
    ds = ImageFolderDataset(tmp_path, split="all", resolution=8)
    with pytest.raises(DatasetError, match="could be decoded"):
        ds[0]


# ------------------------------------------------------------------ webdataset

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)


def test_webdataset_round_trip_and_skips(tmp_path):
    pytest.importorskip("webdataset")
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "shard-000.tar", [
        ("a0", {"png": _png_bytes((255, 0, 0)), "txt": b"red"}),
        ("a1", {"jpg": _png_bytes((0, 255, 0)), "txt": b"green"}),  # PIL sniffs the real format
        ("bad", {"png": b"garbage", "txt": b"broken"}),
    ])
    _write_shard(shards / "shard-001.tar", [
        ("b0", {"webp": _png_bytes((0, 0, 255)), "txt": b"blue"}),
        ("nocap", {"png": _png_bytes()}),
        ("emptycap", {"png": _png_bytes(), "txt": b"   "}),
    ])
    expected_keys = {"shard-000.tar/a0", "shard-000.tar/a1", "shard-001.tar/b0"}
    expected_skips = {"shard-000.tar/bad", "shard-001.tar/nocap", "shard-001.tar/emptycap"}
    for spec in (f"webdataset:{shards}", f"webdataset:{shards}/shard-{{000..001}}.tar"):
        ds = build_dataset(spec, split="all", resolution=8)
        items = list(ds)
        assert {it["key"] for it in items} == expected_keys
        red = next(it for it in items if it["key"].endswith("a0"))
        assert red["caption"] == "red" and red["image"].shape == (3, 8, 8)
        assert torch.allclose(red["image"][0], torch.ones(8, 8))
        report = SkipReport()
        for it in items:
            report.update(it)
        assert set(report.keys) == expected_skips  # trailing skips of a shard are still reported
    # two workers, one shard each: every skip still reaches the main process
    report = SkipReport()
    keys = []
    for batch in build_dataloader(build_dataset(f"webdataset:{shards}", split="all", resolution=8), batch_size=2, num_workers=2):
        report.update(batch)
        keys += batch["key"]
    assert set(keys) == expected_keys and set(report.keys) == expected_skips


def test_webdataset_missing_shards_error(tmp_path):
    pytest.importorskip("webdataset")
    with pytest.raises(DatasetError, match="not found"):
        build_dataset(f"webdataset:{tmp_path}/s-{{0..1}}.tar", resolution=8)
    with pytest.raises(DatasetError, match="no .tar shards"):
        build_dataset(f"webdataset:{tmp_path}", resolution=8)


def test_webdataset_without_package_says_which_extra(monkeypatch):
    import sys

    from argen.data import webdataset as wds_mod

    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'argen\[webdataset\]'"):
        wds_mod.require_webdataset()


# ------------------------------------------------------------------ registry, collate

def test_unknown_spec_lists_valid_forms():
    for bad in ("shape", "imagefolder", "imagefolder:", "hf:foo"):
        with pytest.raises(ValueError, match=r"(?s)unknown dataset spec.*imagefolder:PATH.*webdataset:PATTERN"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="unknown dataset spec"):
        DatasetConfig(spec="folder:x")
    assert parse_spec("imagefolder:/a:b") == ("imagefolder", "/a:b")


def test_dataset_config_builds_imagefolder(tmp_path):
    _write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    cfg = DatasetConfig(spec=f"imagefolder:{tmp_path}", resolution=8, val_fraction=0.0)
    ds = cfg.build("train")
    assert len(ds) == 1 and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="val_fraction"):
        DatasetConfig(val_fraction=1.0)


def test_collate_stacks_and_concatenates_skips():
    items = [{"image": torch.zeros(3, 2, 2), "caption": "a", "key": "k0", "skipped": [("x", "bad")]},
             {"image": torch.ones(3, 2, 2), "caption": "b", "key": "k1"}]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["caption"] == ["a", "b"] and batch["key"] == ["k0", "k1"]
    assert batch["skipped"] == [("x", "bad")]


def test_registry_shapes():
    pytest.importorskip("argen.data.shapes")
    ds = build_dataset("shapes", split="train", resolution=32, size=4, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and isinstance(item["caption"], str) and isinstance(item["key"], str)
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_dataset_config_parses_with_the_typed_loader():
    from tokenizers_img.config import ConfigError, load_config

    cfg = load_config({"spec": "shapes", "resolution": 64, "size": None}, DatasetConfig, ["num_workers=2"])
    assert cfg == DatasetConfig(spec="shapes", resolution=64, num_workers=2)
    with pytest.raises(ConfigError, match="val_fracton"):
        load_config({"val_fracton": 0.1}, DatasetConfig)
    with pytest.raises(ConfigError, match="unknown dataset spec"):
        load_config({"spec": "imagefolder"}, DatasetConfig)


def test_shapes_template_spec():
    ds = build_dataset("shapes:relation", split="train", resolution=32, size=5)
    assert len(ds) == 5 and ds.templates == ("relation",)
    assert parse_spec("shapes:relation,list") == ("shapes", "relation,list")
    with pytest.raises(ValueError, match="dataset spec 'shapes:relations': templates must be distinct names"):
        parse_spec("shapes:relations")
