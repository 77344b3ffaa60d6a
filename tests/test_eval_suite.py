"""`argen eval`: R-precision at its bounds and at chance, precision/recall at theirs, and the whole report on a tiny
pipeline with a tiny judge CLIP, written and read back."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_clip import tiny_config
from test_pipeline import trained  # noqa: F401  (the module-scoped tiny pipeline fixture)

from argen.cli import main
from argen.data.imagefolder import ImageFolderDataset
from argen.eval.caption_metrics import precision_recall, r_precision_hits
from argen.eval.suite import (
    RECONSTRUCTED,
    EvalSettings,
    PairScorer,
    caption_set,
    evaluate_pipeline,
    reference_warning,
    shuffled,
)
from argen.pipeline import Pipeline
from argen.text import train_text_tokenizer
from argen.unclip.clip import ClipEncoder


def test_r_precision_is_perfect_for_a_perfect_judge_and_at_chance_for_shuffled_captions():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(400, 32, generator=g)
    own = torch.arange(400)
    assert r_precision_hits(text, own, text, candidates=100).all()  # each image embeds exactly as its caption
    perm = shuffled(400, seed=1)
    assert not (perm == own).any()
    floor = r_precision_hits(text, perm, text, candidates=10, exclude=own).mean()
    assert abs(floor - 0.1) < 0.05  # the shuffled caption wins only by chance: 1 in 10, with 400 images
    noise = r_precision_hits(torch.randn(400, 32, generator=g), own, text, candidates=10).mean()
    assert abs(noise - 0.1) < 0.05


def test_precision_and_recall_at_their_bounds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    half = torch.cat([real[:100], real[:100] + 100.0])  # half inside the real manifold, half far away
    precision, recall = precision_recall(real, half, k=3)
    assert abs(precision - 0.5) < 0.05 and recall < 1.0


def test_a_reference_set_no_wider_than_the_features_is_named():
    assert reference_warning(129, 128, prompts=300) is None
    assert reference_warning(128, 128, prompts=300).startswith("only 128 reference images beside the 300 prompts' own")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        EvalSettings(candidates=1)
    with pytest.raises(ValueError, match="prompts must be >= 1, got 0"):
        EvalSettings(prompts=0)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    bpe = train_text_tokenizer(["a red circle", "a blue square", "a green triangle", "two red squares"] * 5, vocab_size=300)
    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=0)
    path = tmp_path_factory.mktemp("judge") / "clip"
    clip.save(path)
    return path


def folder(root, n: int = 40):
    """A captioned image folder of 16 px images: a colour per caption."""
    colours = {"a red circle": (220, 30, 30), "a blue square": (30, 30, 220), "a green triangle": (30, 200, 30)}
    root.mkdir()
    lines = []
    for i in range(n):
        caption = list(colours)[i % 3] + ("" if i < 3 else f" number {i}")
        Image.new("RGB", (16, 16), colours[list(colours)[i % 3]]).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_report_holds_generated_ceiling_and_floor_for_every_figure(trained, judge, tmp_path):  # noqa: F811
    data = folder(tmp_path / "images")
    pipe = Pipeline.from_pretrained(trained.final)
    settings = EvalSettings(prompts=12, reference=20, candidates=5, n_boot=50, splits=("all",))
    report = evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=ClipEncoder.load(judge),
                               settings=settings, out=tmp_path / "eval", progress=lambda *_: None)
    row = report["splits"]["all"]
    for name in ("generated", RECONSTRUCTED, "real (ceiling)", "shuffled captions (floor)"):
        r = row[name]
        assert r["images"] == 12
        for key in ("r_precision", "clip_score", "frechet_images", "frechet_pairs", "precision"):
            assert r[key]["low"] <= r[key]["estimate"] <= r[key]["high"], (name, key)
        assert 0 <= r["recall"] <= 100
    # the floor's images are the ceiling's: image-only figures agree, caption-aware ones see the shuffle
    ceiling, floor = row["real (ceiling)"], row["shuffled captions (floor)"]
    assert floor["frechet_images"]["estimate"] == ceiling["frechet_images"]["estimate"]
    assert floor["precision"] == ceiling["precision"]
    # the reconstructed row scores the same captions' own images after encode and decode, against their own captions
    cset = caption_set(f"imagefolder:{data}", "all", resolution=pipe.vq.config.resolution, settings=settings)
    with torch.inference_mode():
        by_hand = PairScorer(ClipEncoder.load(judge), cset, settings).score(
            pipe.vq.decode(pipe.vq.encode(cset.images)).clamp(-1, 1), torch.arange(12))
    assert row[RECONSTRUCTED] == by_hand
    assert row[RECONSTRUCTED]["frechet_images"] != ceiling["frechet_images"]  # reconstructions are not the originals
    tok = report["tokenizer"]
    assert tok["num_images"] == 32 and 0 < tok["codebook_usage"] <= 1 and np.isfinite(tok["frechet_reconstructions"])
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["splits"]["all"]["generated"]["images"] == 12
    assert "| generated (12) |" in (tmp_path / "eval" / "report.md").read_text()
    assert f"| {RECONSTRUCTED} (12) |" in (tmp_path / "eval" / "report.md").read_text()
    assert Image.open(tmp_path / "eval" / "samples_all.png").size[0] > 0


def test_eval_cli_runs_and_refuses_a_too_small_split(trained, judge, tmp_path, capsys):  # noqa: F811
    data = folder(tmp_path / "images", n=12)
    args = ["eval", "--pipeline", str(trained.final), "--dataset", f"imagefolder:{data}", "--judge-clip", str(judge),
            "--splits", "all", "--prompts", "6", "--reference", "5", "--candidates", "4", "--n-boot", "20"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "R-precision generated" in printed
    # 5 reference images cannot give the covariance of wider features: the CLI and the report say so
    width = 2 * ClipEncoder.load(judge).encode_text(["a red circle"]).embeds.shape[1]
    assert f"all: warning: only 5 reference images beside the 6 prompts' own, for {width}-wide" in printed
    assert "**Warning:** only 5 reference images" in (tmp_path / "a" / "report.md").read_text()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["splits"]["all"]["reference"] == 5
    assert main([*args[:-6], "--prompts", "6", "--reference", "3", "--candidates", "4", "-o", str(tmp_path / "b")]) == 2
    assert "more than k=3" in capsys.readouterr().err


def test_captions_are_a_seeded_random_sample_of_the_split_not_its_first_files(tmp_path):
    from argen.eval.suite import caption_set

    data = folder(tmp_path / "images", n=40)  # 40 distinct captions, one per file

    def sample(seed: int) -> list[str]:
        return caption_set(f"imagefolder:{data}", "all", resolution=16,
                           settings=EvalSettings(prompts=8, reference=5, seed=seed)).captions

    folder_order = [c.caption for c in ImageFolderDataset(data, split="all", resolution=16).files][:8]
    assert sample(0) == sample(0)  # the same seed, the same sample
    assert sample(0) != sample(1)
    assert sample(0) != folder_order and sample(1) != folder_order


def test_eval_cli_samples_with_the_flags_given(trained, judge, tmp_path, capsys):  # noqa: F811
    data = folder(tmp_path / "images", n=12)
    args = ["eval", "--pipeline", str(trained.final), "--dataset", f"imagefolder:{data}", "--judge-clip", str(judge),
            "--splits", "all", "--prompts", "6", "--reference", "5", "--candidates", "4", "--n-boot", "20"]
    assert main([*args, "--cfg", "3", "--temperature", "0.5", "--top-k", "7", "-o", str(tmp_path / "a")]) == 0
    assert "sampling with CFG 3 constant, T 0.5, top-k 7" in capsys.readouterr().out
    sampling = json.loads((tmp_path / "a" / "report.json").read_text())["sampling"]
    assert (sampling["cfg_scale"], sampling["temperature"], sampling["top_k"]) == (3.0, 0.5, 7)


def test_reranking_keeps_the_first_draws_and_adds_the_best_of_n_by_another_clip(trained, judge, tmp_path):  # noqa: F811
    data = folder(tmp_path / "images")
    pipe = Pipeline.from_pretrained(trained.final)
    judge_clip = ClipEncoder.load(judge)
    near_judge = ClipEncoder.load(judge)  # the judge's weights nudged: another CLIP that ranks draws as the judge does
    with torch.no_grad():
        next(near_judge.model.parameters()).add_(1e-6)
    base = EvalSettings(prompts=12, reference=20, candidates=5, n_boot=50, splits=("all",))
    plain = evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=judge_clip, settings=base,
                              progress=lambda *_: None)["splits"]["all"]
    settings = EvalSettings(**{**base.__dict__, "rerank": 4})
    report = evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=judge_clip, settings=settings,
                               rerank_clip=near_judge, out=tmp_path / "eval", progress=lambda *_: None)
    row = report["splits"]["all"]
    for key, figure in plain["generated"].items():  # the first draws are the images drawn without reranking
        estimate = figure["estimate"] if isinstance(figure, dict) else figure
        got = row["generated"][key]["estimate"] if isinstance(figure, dict) else row["generated"][key]
        assert got == pytest.approx(estimate, rel=1e-5), key  # decoded in other batches: float rounding only
    assert row["reranked"]["images"] == 12
    # each kept image is the draw the (near-)judge scores highest, so the judge's CLIP score can only rise
    assert row["reranked"]["clip_score"]["estimate"] >= row["generated"]["clip_score"]["estimate"] - 1e-3
    assert row["reranked"]["clip_score"]["estimate"] > row["generated"]["clip_score"]["estimate"]
    gain = row["reranked r_precision gain"]  # paired over captions: its mean is the difference of the two means
    assert gain["estimate"] == pytest.approx(row["reranked"]["r_precision"]["estimate"]
                                             - row["generated"]["r_precision"]["estimate"])
    assert gain["low"] <= gain["estimate"] <= gain["high"]
    assert report["rerank_clip"]["sha256"] == near_judge.sha256
    assert "| best of 4 by the rerank CLIP (12) |" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(ValueError, match="is the judge CLIP"):
        evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=judge_clip, settings=settings,
                          rerank_clip=ClipEncoder.load(judge))
    with pytest.raises(ValueError, match="needs a rerank CLIP"):
        evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=judge_clip, settings=settings)
    with pytest.raises(ValueError, match=r"was given without reranking: give --rerank N \(N > 1\)"):
        evaluate_pipeline(pipe, dataset=f"imagefolder:{data}", judge_clip=judge_clip,
                          settings=dataclasses.replace(settings, rerank=1), rerank_clip=near_judge)
