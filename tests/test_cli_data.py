"""`argen data preview` and `argen data judge`, run through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from argen.cli import main
from argen.viz import sheet_layout


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    rows = []
    for i, c in enumerate(colors):
        Image.new("RGB", (40 + 7 * i, 30), c).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"picture number {i} with a rather long caption that must wrap onto several lines"})
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "broken"})
    rows.append({"file_name": "missing.png", "text": "missing"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_preview_imagefolder_writes_sheet_and_reports_skips(tmp_path, capsys):
    folder = _folder(tmp_path / "f")
    out = tmp_path / "out" / "grid.png"
    rc = main(["data", "preview", "--dataset", f"imagefolder:{folder}", "--split", "all",
               "--resolution", "64", "-n", "16", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "missing.png" in printed and "skipped 2 samples" in printed
    sheet = Image.open(out)
    cols, rows, cell_w, cell_h, scale = sheet_layout(4, 64)  # 4 usable images of the 6 listed
    assert sheet.size == (cols * cell_w, rows * cell_h) == (2 * cell_w, 2 * cell_h)
    assert cell_w >= 64 * scale >= 128
    # the first cell shows img0 (red), upscaled
    assert sheet.getpixel((4 + 20, 4 + 20)) == (255, 0, 0)
    # captions are drawn in black under each image
    caption_band = np.asarray(sheet)[4 + 64 * scale + 4: cell_h, : cell_w]
    assert (caption_band.sum(-1) < 200).any()
    assert not list(out.parent.glob(".*tmp*"))  # atomic write leaves no temp file


def test_preview_bad_spec_and_bad_folder_exit_cleanly(tmp_path, capsys):
    assert main(["data", "preview", "--dataset", "nope", "-o", str(tmp_path / "g.png")]) == 2
    assert "imagefolder:PATH" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "preview", "--dataset", f"imagefolder:{tmp_path / 'empty'}", "-o", str(tmp_path / "g.png")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_preview_shapes(tmp_path):
    pytest.importorskip("argen.data.shapes")
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "--dataset", "shapes", "--resolution", "32", "-n", "16", "-o", str(out)]) == 0
    cols, rows, cell_w, cell_h, _ = sheet_layout(16, 32)
    assert (cols, rows) == (4, 4) and Image.open(out).size == (4 * cell_w, 4 * cell_h)


# ------------------------------------------------------------------ judge

def _write_judge_folder(root: Path, pairs: list[tuple[np.ndarray, str]], *, sidecar_from: int = 2) -> None:
    """Images as PNG; the first `sidecar_from` captions in metadata.jsonl, the rest as sidecar .txt files."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(pairs):
        Image.fromarray(image).save(root / f"g{i:02d}.png")
        if i < sidecar_from:
            rows.append({"file_name": f"g{i:02d}.png", "text": caption})
        else:
            (root / f"g{i:02d}.txt").write_text(caption)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _explicit_scenes(resolution: int):
    from argen.data.shapes import Scene, ShapeObject, render

    objs = [ShapeObject("circle", "red", "large", "center"), ShapeObject("square", "blue", "large", "top left"),
            ShapeObject("triangle", "green", "large", "bottom right"), ShapeObject("circle", "yellow", "small", "top")]
    captions = ["a large red circle in the center", "a large blue square in the top left",
                "a large green triangle in the bottom right", "a small yellow circle at the top"]
    return [render(Scene((o,)), resolution) for o in objs], captions


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_on_own_renders_is_perfect(tmp_path, resolution, capsys):
    pytest.importorskip("argen.eval.judge")
    from argen.data.shapes import ShapesDataset
    from argen.data.transforms import tensor_to_pil

    ds = ShapesDataset("val", resolution=resolution, size=8, seed=1)
    pairs = [(np.asarray(tensor_to_pil(ds[i]["image"])), ds[i]["caption"]) for i in range(len(ds))]
    _write_judge_folder(tmp_path / "imgs", pairs)
    assert main(["data", "judge", "--images", str(tmp_path / "imgs"), "-o", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert res["totals"]["scored"] == 8 and res["totals"]["errors"] == 0
    assert res["totals"]["accuracy"] == 1.0
    assert all(v["accuracy"] == 1.0 and v["total"] > 0 for v in res["totals"]["attributes"].values())
    assert "| whole prompt | 1.000 | 8 | 8 |" in (tmp_path / "out" / "judge.md").read_text()
    assert "whole prompt" in capsys.readouterr().out


def test_judge_swapped_captions_and_unknown_words(tmp_path):
    pytest.importorskip("argen.eval.judge")
    images, captions = _explicit_scenes(64)
    swapped = [captions[1], captions[0], captions[2], captions[3]]  # g00 and g01 get each other's caption
    pairs = list(zip(images, swapped)) + [(images[2], "a large green hexagon in the bottom right")]
    _write_judge_folder(tmp_path, pairs)
    assert main(["data", "judge", "--images", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "judge.json").read_text())
    t = res["totals"]
    assert (t["images"], t["scored"], t["errors"], t["correct"]) == (5, 4, 1, 2)
    assert t["accuracy"] == 0.5
    by_file = {r["file"]: r for r in res["images"]}
    assert [by_file[f"g{i:02d}.png"]["correct"] for i in range(4)] == [False, False, True, True]
    assert "hexagon" in by_file["g04.png"]["error"] and "correct" not in by_file["g04.png"]
    for name, v in t["attributes"].items():
        assert v["total"] >= 4 and v["accuracy"] == v["correct"] / v["total"]
    # the swapped pair differs in colour, shape and position: those attributes cannot be perfect
    assert any(v["accuracy"] < 1.0 for v in t["attributes"].values())
    # re-running in the same folder ignores the judge.json / judge.md it wrote
    assert main(["data", "judge", "--images", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "judge.json").read_text())["totals"] == t


def test_judge_needs_captions(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["data", "judge", "--images", str(tmp_path)]) == 2
    assert "no captions" in capsys.readouterr().err
