"""`argen train pipeline` (argen.recipe): presets per resolution, one-line errors for bad overrides, stage records,
and (slow) the whole command on a tiny image folder: report with ceiling and floor, reuse, resume and redo."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image

from argen.cli import main
from argen.configs import resolve
from argen.data.imagefolder import ImageFolderDataset
from argen.eval.suite import EvalSettings
from argen.recipe import PRESETS, SHAPES_PRESETS, RecipeSettings, StageRecords, presets_for, run_recipe, split_overrides
from argen.tasks.clip import CLIPExperiment
from argen.tasks.gpt import GPTExperiment
from argen.tasks.tokenizer import TokenizerExperiment
from argen.text import dataset_captions
from tokenizers_img.config import load_config

TINY = Path(__file__).resolve().parent / "configs"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40),
           "white": (240, 240, 240)}


def folder(root: Path, n: int = 60, *, heldout: int = 0) -> Path:
    """A captioned 32 px image folder: a coloured square in one of four corners on black, its caption in Title case;
    with `heldout`, that many more in root/heldout/ (the held-out split)."""
    corners = ("Top left", "Top right", "Bottom left", "Bottom right")
    for where, numbers in ((root, range(n)), (root / "heldout", range(n, n + heldout))):
        if not numbers:
            continue
        where.mkdir(parents=True)
        lines = []
        for i in numbers:
            colour, corner = list(COLOURS)[i % len(COLOURS)], corners[(i // len(COLOURS)) % 4]
            image = Image.new("RGB", (32, 32))
            x, y = (0 if "left" in corner else 16), (0 if "Top" in corner else 16)
            image.paste(COLOURS[colour], (x, y, x + 16, y + 16))
            image.save(where / f"{i:03d}.png")
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"{corner}: a {colour} square, number {i}"}))
        (where / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("resolution", sorted(PRESETS))
def test_every_resolution_has_three_presets_that_load_at_that_resolution(resolution):
    names = presets_for("imagefolder:photos", resolution)
    data = ["data.spec=imagefolder:photos", f"data.resolution={resolution}"]
    tok = load_config(resolve("tokenizer", names[0]), TokenizerExperiment, data)
    assert tok.model.resolution == resolution and tok.model.grid_size in (8, 16)
    assert tok.model.grid_size == (16 if resolution >= 128 else 8)  # 16x16 codes at 128 and 256 px
    gpt = load_config(resolve("gpt", names[1]), GPTExperiment)
    assert gpt.model.n_embd >= 256
    clip = load_config(resolve("unclip", names[2]), CLIPExperiment, data)
    assert clip.train.seed != 0  # the judge has its own initialisation and data order
    assert presets_for("shapes", 32) == SHAPES_PRESETS and presets_for("shapes", 64) == PRESETS[64]
    with pytest.raises(ValueError, match="--resolution 48 has no preset"):
        presets_for("shapes", 48)


def test_overrides_split_by_stage_and_a_bad_one_is_named():
    assert split_overrides(["gpt.train.max_steps=3", "clip.model.patch_size=4", "tokenizer.loss.rec_loss=l2"]) == {
        "tokenizer": ("loss.rec_loss=l2",), "gpt": ("train.max_steps=3",), "clip": ("model.patch_size=4",)}
    with pytest.raises(ValueError, match="'decoder.x=1' must look like STAGE.key.path=value"):
        split_overrides(["decoder.x=1"])
    with pytest.raises(ValueError, match="gpt.data.vq_tokenizer is set by the recipe"):
        split_overrides(["gpt.data.vq_tokenizer=elsewhere"])


@pytest.mark.parametrize("override, named", [("gpt.model.n_layr=2", "'model.n_layr'"),
                                             ("tokenizer.train.max_stepz=2", "'train.max_stepz'"),
                                             ("clip.model.patch_size=5", "patch_size=5"),
                                             ("gpt.train.out_dir=x", "gpt.train.out_dir is set by the recipe")])
def test_a_bad_override_is_one_line_naming_the_key_and_writes_nothing(tmp_path, capsys, override, named):
    out = tmp_path / "run"
    assert main(["train", "pipeline", "--dataset", "shapes", "--resolution", "32", "-o", str(out), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("argen train: error:")
    assert not out.exists()


def test_a_missing_image_folder_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "pipeline", "--dataset", f"imagefolder:{missing}", "--resolution", "64", "-o",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and not (tmp_path / "run").exists()


def test_stage_records_reuse_resume_and_redo_on_changed_inputs(tmp_path, capsys):
    records = StageRecords(tmp_path)
    inputs = {"config": {"train": {"max_steps": 3}}, "vq_hash": "abc"}
    assert records.state("gpt", inputs) == "new"
    records.mark("gpt", inputs, finished=False)
    assert records.state("gpt", inputs) == "started"
    records.mark("gpt", inputs, finished=True)
    assert records.state("gpt", {"vq_hash": "abc", "config": {"train": {"max_steps": 3}}}) == "finished"
    assert records.state("gpt", {**inputs, "vq_hash": "def"}) == "changed"
    assert "gpt: its inputs changed since it last ran (vq_hash)" in capsys.readouterr().out
    assert records.state("gpt", {**inputs, "config": {"train": {"max_steps": 4}}}) == "changed"
    assert "(config.train.max_steps)" in capsys.readouterr().out


def test_dataset_captions_split_an_image_folder_with_the_given_val_fraction(tmp_path):
    root = folder(tmp_path / "images", n=40)
    for fraction in (0.1, 0.5):
        dataset = ImageFolderDataset(root, split="val", resolution=32, val_fraction=fraction)
        expected = sorted(dataset[i]["caption"] for i in range(len(dataset)))
        assert sorted(dataset_captions(f"imagefolder:{root}", split="val", val_fraction=fraction)) == expected
    assert len(dataset_captions(f"imagefolder:{root}", split="val", val_fraction=0.5)) > \
        len(dataset_captions(f"imagefolder:{root}", split="val", val_fraction=0.1))


def _run(out: Path, data: Path, *extra: str, spec: str = "imagefolder", rerank: int = 1) -> dict:
    overrides = ("tokenizer.train.max_steps=2", "tokenizer.train.save_every=0", "tokenizer.eval.max_images=8",
                 "gpt.train.max_steps=4", "gpt.train.save_every=2", "gpt.data.text_len=16", "gpt.eval.max_items=8",
                 "clip.train.max_steps=2", "clip.train.save_every=0", "clip.eval.candidates=8", *extra)
    settings = RecipeSettings(eval=EvalSettings(prompts=4, reference=6, candidates=4, n_boot=20, batch_size=16,
                                                rerank=rerank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_recipe(out, dataset=f"{spec}:{data}", resolution=32, overrides=overrides,
                          tokenizer_config=TINY / "vq_tiny.yaml", gpt_config=TINY / "gpt_tiny.yaml",
                          clip_config=TINY / "clip_tiny.yaml", settings=settings, val_fraction=0.3)


@pytest.mark.slow
def test_the_whole_command_on_an_image_folder_reports_reuses_resumes_and_redoes(tmp_path, capsys, monkeypatch):
    from argen.tasks.gpt import GPTTask

    data, out = folder(tmp_path / "images", heldout=10), tmp_path / "run"
    # the first run dies inside the GPT stage after its step-2 checkpoint (as a kill -9 would leave it)
    real_step = GPTTask.training_step

    def dies_at_step_3(self, batch, *, modules, step):
        if step == 3:
            raise RuntimeError("killed")
        return real_step(self, batch, modules=modules, step=step)

    monkeypatch.setattr(GPTTask, "training_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        _run(out, data)
    monkeypatch.setattr(GPTTask, "training_step", real_step)
    capsys.readouterr()

    report = _run(out, data)
    printed = capsys.readouterr().out
    assert "reusing" in printed and f"resuming {out / 'gpt_run'} from its latest checkpoint" in printed
    assert f"training into {out / 'tokenizer_run'}" not in printed  # the tokenizer finished in the first run
    assert report["gpt"]["steps"] == 4
    for split in ("val", "heldout"):  # the heldout/ folder is scored on its own
        row = report["eval"]["splits"][split]
        for name in ("generated", "real (ceiling)", "shuffled captions (floor)"):
            assert row[name]["images"] == 4 and "estimate" in row[name]["r_precision"]
    assert set(report["tokenizer"]["metrics"]) == {"val", "heldout"}
    markdown = (out / "report.md").read_text()
    assert "real (ceiling)" in markdown and "shuffled captions (floor)" in markdown and "eval/samples_val.png" in markdown
    for name in ("reconstructions.png", "samples_val.png", "eval/samples_val.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    # case is kept: the BPE tells "Top" from "top"
    text = json.loads((out / "gpt_run" / "final" / "tokenizer.json").read_text())
    assert not any(n.get("type") == "Lowercase" for n in text["normalizer"]["normalizers"])

    products = [out / "tokenizer_run" / "final" / "tokenizer" / "model.safetensors", out / "text" / "tokenizer.json",
                out / "gpt_run" / "final" / "gpt" / "model.safetensors",
                out / "judge_clip_run" / "final" / "clip" / "clip.json", out / "eval" / "report.json"]
    mtimes = [p.stat().st_mtime_ns for p in products]
    again = _run(out, data)
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 5 and "training into" not in printed and "resuming" not in printed
    assert [p.stat().st_mtime_ns for p in products] == mtimes
    assert again["eval"] == report["eval"]

    # a changed GPT setting redoes the GPT (and the evaluation of it), nothing before it
    _run(out, data, "gpt.optimizer.lr=1e-3")
    printed = capsys.readouterr().out
    assert "gpt: its inputs changed since it last ran (config.optimizer.lr)" in printed
    assert f"training into {out / 'gpt_run'}" in printed and printed.count("reusing") == 3
    assert products[2].stat().st_mtime_ns != mtimes[2] and products[0].stat().st_mtime_ns == mtimes[0]


@pytest.mark.slow
def test_the_whole_command_on_webdataset_shards(tmp_path):
    pytest.importorskip("webdataset")
    from test_webdataset_chain import write_shards

    shards = write_shards(tmp_path / "shards", shards=8, per_shard=12)
    write_shards(shards, shards=1, per_shard=10, prefix="heldout", first_scene=500)  # heldout-000.tar: its own split
    report = _run(tmp_path / "run", Path(f"{shards}/{{shard-{{000..007}},heldout-000}}.tar"), spec="webdataset")
    assert report["tokenizer"]["metrics"]["val"]["num_images"] > 0
    assert report["tokenizer"]["metrics"]["heldout"]["num_images"] == 10
    for split in ("val", "heldout"):
        row = report["eval"]["splits"][split]
        assert row["generated"]["images"] == 4 and row["real (ceiling)"]["images"] == 4
    assert (tmp_path / "run" / "report.md").stat().st_size > 0


@pytest.mark.slow
def test_rerank_trains_a_second_clip_and_scores_the_best_of_n_beside_the_first_draws(tmp_path, capsys):
    from argen.unclip.clip import ClipEncoder

    data, out = folder(tmp_path / "images"), tmp_path / "run"
    report = _run(out, data, rerank=3)
    judge_seed, rerank_seed = (yaml.safe_load((out / run / "train_config.yaml").read_text())["seed"]
                               for run in ("judge_clip_run", "rerank_clip_run"))
    assert rerank_seed == judge_seed + 1
    judge = ClipEncoder.load(out / "judge_clip_run" / "final" / "clip")
    reranker = ClipEncoder.load(out / "rerank_clip_run" / "final" / "clip")
    assert reranker.sha256 != judge.sha256 and report["eval"]["rerank_clip"]["sha256"] == reranker.sha256
    row = report["eval"]["splits"]["val"]
    assert row["reranked"]["images"] == row["generated"]["images"] == 4
    assert "best of 3 by the rerank CLIP" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["train", "pipeline", "--dataset", f"imagefolder:{data}", "--resolution", "32", "-o",
                 str(tmp_path / "other"), "--no-judge-clip", "--rerank", "4"]) == 2
    assert "drop --no-judge-clip or --rerank" in capsys.readouterr().err
