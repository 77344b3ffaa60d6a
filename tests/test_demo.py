"""`argen demo` end to end at toy sizes: every stage runs, the report shows the sweep it chose from, a re-run reuses."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from argen.data.codes import read_meta
from argen.demo import DemoSettings, run_demo
from argen.host import native_bf16
from argen.model.gpt import GPT

TOKENIZER = ("train.max_steps=2", "train.batch_size=4", "model.base_channels=8", "model.norm_groups=4",
             "model.z_channels=8", "train.save_every=0", "train.log_every=1")
GPT_TOY = ("train.max_steps=2", "train.batch_size=4", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
           "train.save_every=0", "train.log_every=1", "eval.max_items=20", "train.compile=false")
SETTINGS = DemoSettings(num_train_codes=40, extra_train_codes={"relation": 8}, cfg_scales=(1.0, 2.0), top_ks=(None,), temperatures=(1.0,),
                        sweep_prompts={"single": 2, "relation": 2},
                        eval_prompts={"single": 2, "relation": 2, "heldout": 2},
                        samples_per_prompt={"single": 1, "relation": 1, "heldout": 1})


def test_demo_runs_every_stage_reports_its_sweep_and_reuses_finished_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_demo(out, tokenizer_overrides=TOKENIZER, gpt_overrides=GPT_TOY, settings=SETTINGS)
    # scale 1 once (no guidance has no schedule), scale 2 with each schedule
    assert list(report["sampler_sweep"]) == ["cfg 1, top-k all, T 1", "cfg 2 constant, top-k all, T 1",
                                             "cfg 2 linear, top-k all, T 1"]
    assert report["chosen"] in report["sampler_sweep"]
    gen = report["generation"]
    parts = {k: g for k, g in gen.items() if k.startswith("heldout: ")}
    assert set(gen) - set(parts) == {"single", "relation", "heldout"}
    assert all(gen[k]["num_images"] == 2 for k in ("single", "relation", "heldout"))
    assert sum(g["num_images"] for g in parts.values()) == 2  # the held-out images split by their combination
    assert sum(g["accuracy"] * g["num_images"] for g in parts.values()) == pytest.approx(gen["heldout"]["accuracy"] * 2)
    for name in ("report.md", "reconstructions.png", *report["sheets"].values()):
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text()
    assert "cfg 2 linear, top-k all, T 1" in markdown and report["chosen"] + " (chosen)" in markdown
    precision = "bf16 autocast" if native_bf16() else "float32"  # the preset's mixed_precision auto
    assert f"2 steps ({precision}, eager)" in markdown  # the toy overrides turn train.compile off
    sampled_in = "bf16" if native_bf16("cpu") else "fp32"  # the sampler's precision auto
    assert report["sampling"]["precision"] == sampled_in and f"Judge scores with {report['chosen']} in {sampled_in}" in markdown
    assert json.loads((out / "report.json").read_text())["chosen"] == report["chosen"]
    # the extra relation shard is encoded and trained on beside the full one
    assert read_meta(out / "codes" / "train+relation").num_items == 8
    trained_on = json.loads((out / "gpt_run" / "task_config.json").read_text())["data"]["train"]
    assert trained_on == [str(out / "codes" / "train"), str(out / "codes" / "train+relation")]
    gpt = GPT.from_pretrained(out / "gpt_run" / "final" / "gpt")
    assert gpt.config.code_features == 32  # the shipped config's, filled from the demo's own tokenizer
    vq = json.loads((out / "tokenizer_run" / "final" / "tokenizer" / "config.json").read_text())
    assert (vq["codebook_size"], vq["colour_codes"]) == (128, 32)  # the shipped tokenizer config's
    assert gpt.config.code_factors == (128, 32)  # so the GPT's image codes are (structure, colour) pairs
    codes = 128 * 32
    image = gpt.code_feat[-codes:]
    assert image.abs().sum() > 0 and not gpt.code_feat[: gpt.config.vocab_size - codes].any()

    capsys.readouterr()
    weights = {k: v.clone() for k, v in gpt.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_demo(out, tokenizer_overrides=TOKENIZER, gpt_overrides=GPT_TOY, settings=SETTINGS)
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 3  # tokenizer, text tokenizer, GPT
    assert again["sampler_sweep"] == report["sampler_sweep"] and again["generation"] == report["generation"]
    reloaded = GPT.from_pretrained(out / "gpt_run" / "final" / "gpt").state_dict()
    assert all(torch.equal(reloaded[k], weights[k]) for k in weights)


def test_an_override_after_extra_scenes_is_named_not_taken_for_a_template(tmp_path):
    import pytest

    from argen.cli import main

    with pytest.raises(SystemExit, match="put key.path=value overrides before --extra-scenes"):
        main(["demo", "-o", str(tmp_path / "demo"), "--extra-scenes", "relation=10", "gpt.train.max_steps=1"])
    assert not (tmp_path / "demo").exists()  # refused before any stage ran
