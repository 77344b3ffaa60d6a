"""Pipeline directory: save/load round trip, seeded generation, swapped tokenizers refused naming both, `argen sample` end to end."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_gpt_task import CAPTIONS, experiment_for, make_parts, tiny_vq

from argen.cli import main
from argen.pipeline import Pipeline, PipelineError, build_pipeline
from argen.sample import SamplingConfig
from argen.saved import SavedDirError
from argen.text import train_text_tokenizer
from tokenizers_img.serialization import pretrained_hash


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny parts and a GPT trained on them through `argen train gpt`, whose final/ is a pipeline."""
    root = tmp_path_factory.mktemp("pipeline")
    parts = make_parts(root)
    exp = experiment_for(parts, root / "run")
    overrides = [f"data.train=[{parts.train}]", f"data.val=[{parts.val}]", f"data.text_tokenizer={parts.text_file}",
                 f"data.vq_tokenizer={parts.vq_dir}", f"train.out_dir={root / 'run'}", "train.max_steps=150"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "gpt", str(Path(__file__).resolve().parent / "configs/gpt_tiny.yaml"), *overrides]) == 0
    parts.final = Path(exp.train.out_dir) / "final"
    return parts


def test_round_trip_and_seeded_generation(trained, tmp_path):
    out = build_pipeline(tmp_path / "pipe", vq_dir=trained.vq_dir, tokenizer=trained.text_file, gpt_dir=trained.final / "gpt")
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["parts"]["vq"]["hash"] == trained.vq_hash == manifest["gpt_trained_with"]["vq_hash"]
    assert manifest["text_len"] == 8 and manifest["layout"]["vocab_size"] == manifest["layout"]["image_offset"] + 32
    pipe = Pipeline.load(out)
    same = Pipeline.load(trained.final)  # the training run's final/ is the same pipeline
    for k, v in pipe.gpt.state_dict().items():
        assert torch.equal(v, same.gpt.state_dict()[k])

    sampling = SamplingConfig(cfg_scale=3.0, top_k=8)
    a = pipe.generate([CAPTIONS[0], ""], n_per_prompt=3, sampling=sampling, seed=0)
    assert a.images.shape == (6, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.codes.shape == (6, 16) and 0 <= int(a.codes.min()) and int(a.codes.max()) < 32
    assert not a.codes.is_inference() and pipe.vq.decode(a.codes).shape == (6, 3, 16, 16)  # usable outside no_grad
    assert a.prompts == [CAPTIONS[0]] * 3 + [""] * 3 and a.sample_index == [0, 1, 2] * 2
    b = pipe.generate([CAPTIONS[0], ""], n_per_prompt=3, sampling=sampling, seed=0, batch_size=2)
    assert torch.equal(a.codes, b.codes)  # same seed, any batching: same images
    alone = pipe.generate("", n_per_prompt=3, sampling=sampling, seed=0)
    assert torch.equal(alone.codes, a.codes[3:])  # a row depends on (prompt, seed, k) only
    assert not torch.equal(pipe.generate(CAPTIONS[0], n_per_prompt=3, sampling=sampling, seed=1).codes, a.codes[:3])
    # greedy decoding of the trained captions reproduces the memorised code grids
    greedy = pipe.generate(list(CAPTIONS[:3]), sampling=SamplingConfig(temperature=0.0), seed=0)
    assert (greedy.codes == torch.as_tensor(trained.distinct[:3])).float().mean() > 0.9


def test_a_swapped_text_tokenizer_is_refused_naming_both(trained, tmp_path):
    other = train_text_tokenizer([*CAPTIONS, "a white square"] * 3, vocab_size=300)
    other_file = other.save(tmp_path / "other_text")
    with pytest.raises(PipelineError) as err:
        build_pipeline(tmp_path / "pipe", vq_dir=trained.vq_dir, tokenizer=other_file, gpt_dir=trained.final / "gpt")
    msg = str(err.value)
    assert str(trained.final / "gpt") in msg and str(other_file) in msg and other.sha256[:12] in msg
    assert json.loads((trained.final / "gpt/config.json").read_text())["_trained_with"]["text_tokenizer_sha256"][:12] in msg

    # a part replaced inside a built pipeline is caught by its hash
    pipe = tmp_path / "copy"
    shutil.copytree(trained.final, pipe)
    shutil.copy(other_file, pipe / "tokenizer.json")
    with pytest.raises(PipelineError, match=rf"text_tokenizer .*tokenizer.json' has hash {other.sha256[:12]}, but .* records"):
        Pipeline.load(pipe)


def test_a_swapped_vq_is_refused_naming_both(trained, tmp_path):
    other = tiny_vq(tmp_path / "other_vq", seed=5)  # same config, other weights: only the hash tells them apart
    with pytest.raises(PipelineError) as err:
        build_pipeline(tmp_path / "pipe", vq_dir=other, tokenizer=trained.text_file, gpt_dir=trained.final / "gpt")
    msg = str(err.value)
    assert trained.vq_hash[:12] in msg and pretrained_hash(other)[:12] in msg and str(other) in msg
    assert "code shards" in msg and str(trained.final / "gpt") in msg

    # even with pipeline.json rewritten to match the swapped part, the GPT's own record refuses it
    pipe = tmp_path / "copy"
    shutil.copytree(trained.final, pipe)
    shutil.rmtree(pipe / "vq")
    shutil.copytree(other, pipe / "vq")
    manifest = json.loads((pipe / "pipeline.json").read_text())
    manifest["parts"]["vq"]["hash"] = pretrained_hash(other)
    (pipe / "pipeline.json").write_text(json.dumps(manifest))
    for verify in (True, False):  # without verify, pipeline.json's recorded hashes are compared with the GPT's record
        with pytest.raises(PipelineError, match=f"trained on codes of VQ tokenizer {trained.vq_hash[:12]}"):
            Pipeline.load(pipe, verify=verify)
    with pytest.raises(PipelineError, match="pipeline.json is missing"):
        Pipeline.load(trained.vq_dir)


def test_sample_cli_writes_grid_images_and_record(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--pipeline", str(trained.final), "a red circle", "", "a purple circle", "-n", "2",
               "--cfg", "3", "--seed", "0", "--top-k", "8", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "unconditional" in printed and "'purple' never occurred in a training caption" in printed
    grid = Image.open(out)
    assert grid.size[0] >= 2 * 128
    files = sorted((tmp_path / "grid_images").glob("*.png"))
    assert [f.name for f in files] == [f"p{p:03d}_s{k:02d}.png" for p in range(3) for k in range(2)]
    assert Image.open(files[0]).size == (16, 16)
    record = json.loads((tmp_path / "grid.json").read_text())
    assert record["prompts"] == ["a red circle", "", "a purple circle"] and record["seed"] == 0
    assert record["sampling"]["cfg_scale"] == 3.0 and len(record["images"]) == 6
    assert record["pipeline_parts"]["vq"] == trained.vq_hash
    # the same command gives the same images
    assert main(["sample", "--pipeline", str(trained.final), "a red circle", "-n", "2", "--cfg", "3", "--seed", "0",
                 "--top-k", "8", "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again_images/p000_s01.png").read_bytes() == files[1].read_bytes()
    # and so does the compiled decode step
    assert main(["sample", "--pipeline", str(trained.final), "a red circle", "-n", "2", "--cfg", "3", "--seed", "0",
                 "--top-k", "8", "--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    assert (tmp_path / "compiled_images/p000_s01.png").read_bytes() == files[1].read_bytes()


def test_sampling_precision_auto_follows_native_bf16_and_can_be_forced(trained, tmp_path, monkeypatch, capsys):
    import argen.pipeline as pipeline_mod

    for native, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(pipeline_mod, "native_bf16", lambda device, _n=native: _n)
        for precision, want in (("auto", auto), ("fp32", "fp32"), ("bf16", "bf16")):
            pipe = Pipeline.load(trained.final, precision=precision, verify=False)
            assert pipe.sampling_precision == want
            assert pipe.sampler_gpt().kv_cache_dtype == (torch.bfloat16 if want == "bf16" else None)
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"):
        Pipeline.load(trained.final, precision="fp16", verify=False)
    sampling = SamplingConfig(cfg_scale=3.0, top_k=8)
    fp32, bf16 = (Pipeline.load(trained.final, precision=p, verify=False).generate(list(CAPTIONS[:4]), n_per_prompt=2,
                                                                                  sampling=sampling, seed=0).codes
                  for p in ("fp32", "bf16"))
    assert (fp32 == bf16).float().mean() > 0.8  # the same seeds draw nearly the same codes
    out = tmp_path / "fp32.png"
    assert main(["sample", "--pipeline", str(trained.final), "a red circle", "-n", "1", "--precision", "fp32",
                 "-o", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "fp32" and "(fp32)" in capsys.readouterr().out


@pytest.mark.parametrize("damage, match", [
    (lambda m: m.pop("parts"), "has no 'parts' table"),
    (lambda m: m["parts"].pop("gpt"), "lists no 'gpt' part"),
    (lambda m: m["parts"]["vq"].pop("path"), "part 'vq' needs a 'path', a 'class' and a 'hash'"),
    (lambda m: m["parts"]["vq"].update(path="../elsewhere"), "names the path '../elsewhere': parts must be relative"),
    (lambda m: m["parts"]["vq"].update(path="/abs/vq"), "names the path '/abs/vq'"),
])
def test_a_damaged_pipeline_json_is_named_not_a_traceback(trained, tmp_path, damage, match):
    pipe = tmp_path / "copy"
    shutil.copytree(trained.final, pipe)
    manifest = json.loads((pipe / "pipeline.json").read_text())
    damage(manifest)
    (pipe / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match) as err:
        Pipeline.load(pipe)
    assert str(pipe / "pipeline.json") in str(err.value)


def test_a_format_1_pipeline_loads_and_a_wrong_part_class_is_named(trained, tmp_path):
    pipe = tmp_path / "v1"
    shutil.copytree(trained.final, pipe)
    manifest = json.loads((pipe / "pipeline.json").read_text())
    v2 = Pipeline.load(pipe).manifest
    text = manifest["parts"]["text_tokenizer"]
    manifest["format_version"] = 1  # as argen wrote it before: no classes, the text tokenizer's hash under "sha256"
    text["sha256"] = text.pop("hash")
    for part in manifest["parts"].values():
        part.pop("class")
    (pipe / "pipeline.json").write_text(json.dumps(manifest))
    assert Pipeline.load(pipe).manifest["parts"] == v2["parts"]
    assert json.loads((pipe / "pipeline.json").read_text())["format_version"] == 1  # read, never rewritten
    manifest = v2 | {"parts": {**v2["parts"], "gpt": {**v2["parts"]["gpt"], "class": "argen.unclip.decoder.UnCLIPDecoder"}}}
    (pipe / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(SavedDirError, match="part 'gpt' is a argen.unclip.decoder.UnCLIPDecoder, but a pipeline's gpt"):
        Pipeline.load(pipe)


def test_pipeline_parts_cannot_lead_outside_it(trained, tmp_path):
    pipe = tmp_path / "copy"
    shutil.copytree(trained.final, pipe)
    shutil.copytree(pipe / "vq", tmp_path / "outside_vq")
    shutil.rmtree(pipe / "vq")
    (pipe / "vq").symlink_to(tmp_path / "outside_vq")  # same bytes, but outside the directory
    with pytest.raises(ValueError, match="which leads outside .* refusing to load it"):
        Pipeline.load(pipe)
    (pipe / "pipeline.json").write_text('{"format": "argen-pipeline", "format_version": 1, "parts": {')
    with pytest.raises(ValueError, match=r"pipeline.json is not valid JSON \(.* line 1 column"):
        Pipeline.load(pipe)


def test_sample_cli_never_replaces_what_argen_did_not_write(trained, tmp_path, capsys):
    mine = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(mine)
    notes = tmp_path / "holiday.json"
    notes.write_text('{"my": "notes"}')
    before = mine.read_bytes()
    args = ["sample", "--pipeline", str(trained.final), "a red circle", "-n", "1", "-o", str(mine)]
    assert main(args) == 2
    assert "holiday.png is a file that argen did not write" in capsys.readouterr().err
    assert mine.read_bytes() == before and notes.read_text() == '{"my": "notes"}'
    assert not (tmp_path / "holiday_images").exists()
    # its own outputs it replaces: a second run to the same path works
    out = tmp_path / "grid.png"
    assert main(["sample", "--pipeline", str(trained.final), "a red circle", "-n", "1", "-o", str(out)]) == 0
    assert main(["sample", "--pipeline", str(trained.final), "a red circle", "-n", "1", "-o", str(out)]) == 0
    assert json.loads((tmp_path / "grid.json").read_text())["written_by"] == "argen"


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "-1"], "argument --batch-size: must be an integer >= 1, got -1"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'"),
    (["--cfg", "1e38"], r"argument --cfg: must be a number in \[0, 1000\], got 1e\+38"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
    (["--seed", "-1"], "argument --seed: must be an integer in"),
    (["--temperature", "1e-45"], r"temperature must be 0 \(greedy\) or in \[0.0001, 100\], got 1e-45"),
    (["-n", "0"], "argument -n/--num: must be an integer >= 1, got 0"),
])
def test_sample_cli_refuses_out_of_range_options_in_one_line(trained, tmp_path, capsys, option, message):
    try:  # argparse's own range errors exit; the sampler's settings are refused by argen's handler
        rc = main(["sample", "--pipeline", str(trained.final), "a red circle", *option, "-o", str(tmp_path / "g.png")])
    except SystemExit as exit_:
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(message, err.strip().splitlines()[-1]) and "Traceback" not in err  # (argparse prints usage above)
    assert not (tmp_path / "g.png").exists()


def test_python_api_returns_pil_images_with_the_recommended_settings(trained, tmp_path):
    from argen.pipeline import FALLBACK_SAMPLING, set_recommended_sampling

    pipe = Pipeline.from_pretrained(trained.final)
    assert pipe.sampling == FALLBACK_SAMPLING  # nothing recommended yet
    out = pipe("a red circle", num_images=3, seed=1)
    assert len(out.images) == 3 and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    assert out.prompts == ["a red circle"] * 3 and out.result.images.shape == (3, 3, 16, 16)
    assert out.result.sampling == FALLBACK_SAMPLING

    pipe_dir = tmp_path / "pipe"
    shutil.copytree(trained.final, pipe_dir)
    chosen = SamplingConfig(cfg_scale=3.0, temperature=0.5, top_k=8)
    set_recommended_sampling(pipe_dir, chosen)
    pipe = Pipeline.from_pretrained(pipe_dir)
    assert pipe.sampling == chosen
    a = pipe(["a red circle", "a blue square"], num_images=2, seed=0)
    assert a.result.sampling == chosen
    assert torch.equal(a.result.codes, pipe.generate(["a red circle", "a blue square"], n_per_prompt=2, sampling=chosen).codes)
    b = pipe("a red circle", num_images=2, temperature=0.0)  # one field changed, the rest recommended
    assert b.result.sampling == SamplingConfig(cfg_scale=3.0, temperature=0.0, top_k=8)
    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['temprature'\]; SamplingConfig has temperature"):
        pipe("a red circle", temprature=0.5)

    manifest = json.loads((pipe_dir / "pipeline.json").read_text())
    manifest["sampling"]["cfg_scale"] = -1
    (pipe_dir / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=r"pipeline.json: its 'sampling' settings .* are not valid: cfg_scale must be"):
        Pipeline.from_pretrained(pipe_dir).sampling


def test_sample_cli_uses_the_recommended_settings_unless_flags_override(trained, tmp_path, capsys):
    from argen.pipeline import set_recommended_sampling

    pipe_dir = tmp_path / "pipe"
    shutil.copytree(trained.final, pipe_dir)
    set_recommended_sampling(pipe_dir, SamplingConfig(cfg_scale=2.5, temperature=0.5, top_k=8))
    assert main(["sample", "--pipeline", str(pipe_dir), "a red circle", "-n", "1", "-o", str(tmp_path / "a.png")]) == 0
    assert "sampling with CFG 2.5 constant, T 0.5, top-k 8 (pipeline.json recommends it)" in capsys.readouterr().out
    record = json.loads((tmp_path / "a.json").read_text())["sampling"]
    assert (record["cfg_scale"], record["temperature"], record["top_k"]) == (2.5, 0.5, 8)
    assert main(["sample", "--pipeline", str(pipe_dir), "a red circle", "-n", "1", "--top-k", "0", "--cfg", "1",
                 "--decoding", "spatial", "-o", str(tmp_path / "b.png")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())["sampling"]
    assert (record["cfg_scale"], record["temperature"], record["top_k"], record["decoding"]) == (1.0, 0.5, None, "spatial")


def test_gpt_sampler_flags_on_a_unclip_pipeline_are_refused(tmp_path, capsys):
    from argen.unclip.pipeline import UNCLIP_FILE

    (tmp_path / "unclip").mkdir()
    (tmp_path / "unclip" / UNCLIP_FILE).write_text("{}")  # refused before anything is loaded
    rc = main(["sample", "--pipeline", str(tmp_path / "unclip"), "a red circle", "--temperature", "0.5", "--top-k", "4",
               "-o", str(tmp_path / "g.png")])
    assert rc == 2
    assert "error: --temperature, --top-k set the GPT of a token pipeline" in capsys.readouterr().err


def test_a_large_sample_job_caps_its_grid_and_says_where_the_images_are(trained, tmp_path, capsys):
    from argen.cli.sample import GRID_PROMPTS
    from argen.viz import sheet_layout

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a red circle {i}" for i in range(GRID_PROMPTS + 4)) + "\n")
    out = tmp_path / "grid.png"
    assert main(["sample", "--pipeline", str(trained.final), "--prompts-file", str(prompts), "-n", "1", "-o", str(out)]) == 0
    _, rows, _, cell_h, _ = sheet_layout(GRID_PROMPTS, 16, columns=1)
    assert Image.open(out).size[1] == rows * cell_h == GRID_PROMPTS * cell_h
    assert len(list((tmp_path / "grid_images").glob("*.png"))) == GRID_PROMPTS + 4
    assert f"shows the first {GRID_PROMPTS} prompts; all {GRID_PROMPTS + 4} images are in" in capsys.readouterr().out
