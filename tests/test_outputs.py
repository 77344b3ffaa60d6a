"""Nothing a user owns is replaced or deleted: output markers, --overwrite, marked files, and one-line CLI errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_gpt_task import tiny_vq
from test_serialization import Tiny, TinyConfig

from argen.cli import main
from argen.cli.args import device, float_in, int_in
from argen.data.codes import CodeShardWriter, encode_to_shard, read_meta
from argen.viz import _font, _wrap, contact_sheet, save_png
from tokenizers_img.serialization import (
    OUTPUT_MARKER,
    NotArgenOutputError,
    claim_output_dir,
    is_argen_output,
    pretrained_hash,
    remove_output,
    write_marked_json,
    write_marked_markdown,
)


def user_folder(path):
    """A folder of the user's own: two images and a notes file."""
    path.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path / name)
    (path / "notes.txt").write_text("mine")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def unchanged(path, before):
    return {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_claim_takes_new_empty_and_marked_directories_only(tmp_path):
    assert claim_output_dir(tmp_path / "new", kind="run").is_dir() and is_argen_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", kind="run")
    claim_output_dir(tmp_path / "new", kind="run")  # again: already ours
    before = user_folder(tmp_path / "mine")
    with pytest.raises(NotArgenOutputError, match=f"mine is a directory that argen did not write .*no {OUTPUT_MARKER}"):
        claim_output_dir(tmp_path / "mine", kind="run")
    with pytest.raises(NotArgenOutputError):
        remove_output(tmp_path / "mine")
    assert unchanged(tmp_path / "mine", before)
    remove_output(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_pretrained_never_replaces_a_users_folder(tmp_path):
    before = user_folder(tmp_path / "photos")
    with pytest.raises(NotArgenOutputError, match="photos is a directory that argen did not write"):
        Tiny(TinyConfig()).save_pretrained(tmp_path / "photos")
    assert unchanged(tmp_path / "photos", before)
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    Tiny(TinyConfig(width=3)).save_pretrained(tmp_path / "m")  # its own directory it replaces
    assert Tiny.from_pretrained(tmp_path / "m").config.width == 3


def captioned_folder(path):
    before = user_folder(path)
    (path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red square"}\n'
                                         '{"file_name": "b.png", "text": "a red square"}\n')
    return {**before, "metadata.jsonl": (path / "metadata.jsonl").read_bytes()}


def test_tokenize_overwrite_pointed_at_an_image_folder_deletes_nothing(tmp_path, capsys):
    vq = tiny_vq(tmp_path / "vq")
    before = captioned_folder(tmp_path / "images" / "all")
    rc = main(["tokenize", "--tokenizer", str(vq), "--dataset", f"imagefolder:{tmp_path / 'images'}", "--split", "all",
               "--device", "cpu", "-o", str(tmp_path / "images"), "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images is a directory that argen did not write" in err and "Traceback" not in err
    assert unchanged(tmp_path / "images" / "all", before)
    # into a directory of its own, --overwrite replaces the shard it wrote
    out = tmp_path / "codes"
    for _ in range(2):
        assert main(["tokenize", "--tokenizer", str(vq), "--dataset", f"imagefolder:{tmp_path / 'images'}", "--split",
                     "all", "--device", "cpu", "-o", str(out), "--overwrite"]) == 0
    assert read_meta(out / "all").complete and is_argen_output(out / "all")
    assert unchanged(tmp_path / "images" / "all", before)


def test_a_shard_is_never_written_into_a_users_folder(tmp_path):
    from argen.data.codes import CodeShardMeta

    before = user_folder(tmp_path / "mine")
    meta = CodeShardMeta(num_items=2, done=0, grid=(2, 2), num_codes=8, tokenizer_hash="h", dataset="d", split="train",
                         resolution=8)
    with pytest.raises(NotArgenOutputError):
        CodeShardWriter(tmp_path / "mine", meta, resume=False)
    assert unchanged(tmp_path / "mine", before)
    from tokenizers_img.vq_model import VQModel

    vq = VQModel.from_pretrained(tiny_vq(tmp_path / "vq"))
    dataset = [{"image": torch.zeros(3, 16, 16), "caption": "a red square", "key": f"k{i}"} for i in range(2)]
    with pytest.raises(NotArgenOutputError):
        encode_to_shard(vq, dataset, tmp_path / "mine", dataset_spec="test", split="val", limit=2, overwrite=True,
                        tokenizer_hash=pretrained_hash(tmp_path / "vq"))
    assert unchanged(tmp_path / "mine", before)


def test_marked_files_are_replaced_others_refused(tmp_path):
    grid = contact_sheet([torch.zeros(3, 8, 8)], ["a red circle"])
    save_png(grid, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").text == {"Software": "argen"}
    save_png(grid, tmp_path / "g.png")
    write_marked_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"written_by": "argen", "a": 1}
    write_marked_json(tmp_path / "r.json", {"a": 2})
    write_marked_markdown(tmp_path / "r.md", "# report\n")
    write_marked_markdown(tmp_path / "r.md", "# report\n")
    for name, write in (("p.png", lambda f: save_png(grid, f)), ("p.json", lambda f: write_marked_json(f, {})),
                        ("p.md", lambda f: write_marked_markdown(f, "x"))):
        (tmp_path / name).write_bytes(b"the user's own bytes")
        with pytest.raises(NotArgenOutputError, match=f"{name} is a file that argen did not write"):
            write(tmp_path / name)
        assert (tmp_path / name).read_bytes() == b"the user's own bytes"


class CountingFont:
    """Wraps a font and counts `getlength` calls: caption fitting must not try one character at a time."""

    def __init__(self, font):
        self.font, self.calls = font, 0

    def getlength(self, text):
        self.calls += 1
        return self.font.getlength(text)


@pytest.mark.parametrize("caption", ["x" * 8000, " ".join(["word"] * 8000), "a " + "y" * 8000 + " b"])
def test_long_captions_are_fitted_in_few_measurements(caption):
    font = CountingFont(_font())
    lines = _wrap(caption, font, 120)
    assert 1 <= len(lines) <= 4 and any(line.endswith("...") for line in lines)
    assert all(font.font.getlength(line) <= 120 for line in lines)
    assert font.calls < 60  # one character at a time took thousands


def test_cli_range_types_name_the_problem():
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1, got 0"):
        int_in(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '1.5'"):
        int_in(1)("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\], got 2"):
        float_in(0.0, 1.0)("2")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number, got 'inf'"):
        float_in(0.0)("inf")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'tpu'"):
        device("tpu")
    assert device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="sees no CUDA GPU; use --device cpu"):
            device("cuda:0")


def test_os_errors_are_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    import argen.viz

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "preview.png"))

    monkeypatch.setattr(argen.viz, "atomic_write_bytes", full_disk)
    rc = main(["data", "preview", "--dataset", "shapes", "--resolution", "32", "-n", "2", "-o", str(tmp_path / "preview.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and str(tmp_path / "preview.png") in err
    assert "Traceback" not in err


def test_sample_record_and_grid_carry_the_mark(tmp_path):
    images = torch.zeros(2, 3, 8, 8)
    from argen.viz import save_image_folder

    files = save_image_folder(tmp_path / "imgs", images, ["a", "b"], ["0.png", "1.png"])
    assert is_argen_output(tmp_path / "imgs") and all(is_argen_output(f) for f in files)
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])), np.full((8, 8, 3), 128, dtype=np.uint8))


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import os

    from tokenizers_img.serialization import atomic_write_bytes

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'r.json'}: No space left on device") as err:
        atomic_write_bytes(tmp_path / "r.json", b"{}")
    assert err.value.filename == str(tmp_path / "r.json") and list(tmp_path.iterdir()) == []


def test_only_errors_argen_raises_on_purpose_are_one_line(monkeypatch, capsys):
    import argen.cli.data

    def python_bug(args):
        _first, _second = [1, 2, 3]  # a ValueError from Python itself: a bug, shown with its traceback
        return 0

    monkeypatch.setattr(argen.cli.data, "judge_main", python_bug)
    parser_args = ["data", "judge", "--images", "."]
    with pytest.raises(ValueError, match="too many values to unpack"):
        main(parser_args)
    assert main(["sample", "--pipeline", "/nonexistent", "a red circle"]) == 2  # argen's own: one line
    assert "Traceback" not in capsys.readouterr().err
