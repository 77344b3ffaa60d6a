"""Tokenizer training end to end: train, resume after kill -9, reconstruct, tokenize to code shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import argen.data.codes as codes_mod
from argen.cli import main
from argen.configs import presets, resolve
from argen.data.codes import CodeShardDataset
from argen.tasks.tokenizer import TokenizerExperiment, TokenizerTask, train_tokenizer
from tokenizers_img.config import ConfigError, load_config
from tokenizers_img.serialization import pretrained_hash
from tokenizers_img.vq_model import VQModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/vq_tiny.yaml"
TINY_GAN = ROOT / "tests/configs/vqgan_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq") / "run"
    exp = load_config(TINY, TokenizerExperiment, [f"train.out_dir={out}"])
    result = train_tokenizer(exp)
    return result.artifacts_dir / "tokenizer"


def test_training_writes_a_loadable_tokenizer_and_whole_set_metrics(tiny_tokenizer):
    run = tiny_tokenizer.parents[1]
    metrics = json.loads((run / "metrics.json").read_text())["eval"]
    assert metrics["val/num_images"] == 32  # eval.max_images in the tiny config
    assert 0 < metrics["val/codebook_usage"] <= 1 and metrics["val/used_codes"] <= 64
    model = VQModel.from_pretrained(tiny_tokenizer)
    assert model.config.resolution == 32 and model.config.grid_size == 8
    # the final tokenizer is the last checkpoint's vq weights
    ckpt = load_file(run / "checkpoints" / "step_00000020" / "module.vq.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt[k]), k


def test_a_tokenizer_is_not_compiled_under_bf16_autocast_on_the_cpu():
    task = TokenizerTask(load_config(TINY, TokenizerExperiment))
    assert "wrong gradients, zero for some layers" in task.compile_problem(torch.device("cpu"), "bf16")
    assert "train.mixed_precision=no" in task.compile_problem(torch.device("cpu"), "bf16")
    assert task.compile_problem(torch.device("cpu"), "no") is None


def test_resolution_is_typed_once():
    exp = load_config(TINY, TokenizerExperiment, ["data.resolution=64"])
    assert exp.model.resolution == 64
    with pytest.raises(ConfigError, match="model.resolution=128 disagrees with data.resolution=32"):
        load_config(TINY, TokenizerExperiment, ["model.resolution=128"])


def test_gan_phase_trains_both_optimizers(tmp_path):
    exp = load_config(TINY_GAN, TokenizerExperiment, [f"train.out_dir={tmp_path}"])
    result = train_tokenizer(exp)
    header, *rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    cols = header.split(",")
    last = dict(zip(cols, rows[-1].split(",")))
    assert float(last["g_factor"]) > 0 and float(last["d_weight"]) > 0  # generator listens to the discriminator
    assert "loss/discriminator" in cols
    disc_w = load_file(result.checkpoint / "module.disc.safetensors")
    assert all(torch.isfinite(v).all() for v in disc_w.values())


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "argen", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_kill_9_then_resume_gives_the_same_weights(tmp_path):
    common = [str(TINY), "train.max_steps=40", "train.save_every=10", "model.dead_code_threshold=3"]
    straight = _run_cli(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'a'}"])

    killed = _run_cli(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'b'}"])
    latest = tmp_path / "b" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _run_cli(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'b'}", "--resume"])
    for proc in (straight, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]

    a = VQModel.from_pretrained(tmp_path / "a" / "final" / "tokenizer").state_dict()
    b = VQModel.from_pretrained(tmp_path / "b" / "final" / "tokenizer").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reconstruct_writes_a_grid(tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert main(["reconstruct", "--tokenizer", str(tiny_tokenizer), "-n", "4", "-o", str(out)]) == 0
    assert out.is_file() and "mean PSNR" in capsys.readouterr().out


def test_tokenize_resumes_and_matches_direct_encoding(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    args = ["tokenize", "--tokenizer", str(tiny_tokenizer), "--split", "val", "--limit", "24", "--batch-size", "8"]
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    # an interrupted run: two units written, then killed while writing the third; resumed
    real, written = codes_mod._write_unit, []

    def dies_at_the_third(*a, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(a[1])
        real(*a, **kw)

    monkeypatch.setattr(codes_mod, "_write_unit", dies_at_the_third)
    assert main([*args, "-o", str(tmp_path / "part")]) == 130  # interrupted
    monkeypatch.setattr(codes_mod, "_write_unit", real)
    with pytest.raises(ValueError, match=r"is incomplete \(2/4 units written\)"):
        CodeShardDataset(tmp_path / "part" / "val")
    assert main([*args, "-o", str(tmp_path / "part")]) == 2  # refused without --resume
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "part"), "--resume"]) == 0

    whole, part = CodeShardDataset(tmp_path / "whole" / "val"), CodeShardDataset(tmp_path / "part" / "val")
    assert np.array_equal(np.asarray(whole.codes), np.asarray(part.codes)) and whole.captions == part.captions
    assert sorted(p.name for p in (tmp_path / "part" / "val").iterdir()) == [
        ".argen-output", "captions.jsonl", "codes.npy", "meta.json"]  # the plan and units are gone
    model = VQModel.from_pretrained(tiny_tokenizer)
    from argen.data.shapes import ShapesDataset

    ds = ShapesDataset("val", resolution=32)
    direct = model.encode(torch.stack([ds[i]["image"] for i in range(24)])).flatten(1)
    assert torch.equal(direct, torch.stack([part[i]["codes"] for i in range(24)]))
    assert part.meta.tokenizer_hash == pretrained_hash(tiny_tokenizer)
    assert main([*args, "-o", str(tmp_path / "whole")]) == 2  # refused: the shard exists, and nothing is touched
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


def test_tokenize_with_workers_writes_the_same_shard_and_caption_ids(tiny_tokenizer, tmp_path):
    from argen.text import TextTokenizer, dataset_captions, train_text_tokenizer

    text = train_text_tokenizer(dataset_captions("shapes", limit=300), vocab_size=300)
    text_file = text.save(tmp_path / "bpe")
    args = ["tokenize", "--tokenizer", str(tiny_tokenizer), "--split", "val", "--limit", "20", "--batch-size", "4"]
    assert main([*args, "-o", str(tmp_path / "plain")]) == 0
    assert main([*args, "--num-workers", "2", "--text-tokenizer", str(text_file), "--text-len", "12",
                 "-o", str(tmp_path / "workers")]) == 0
    a, b = CodeShardDataset(tmp_path / "plain" / "val"), CodeShardDataset(tmp_path / "workers" / "val")
    assert np.array_equal(np.asarray(a.codes), np.asarray(b.codes)) and a.captions == b.captions
    ids = codes_mod.open_caption_ids(tmp_path / "workers" / "val", TextTokenizer.load(text_file), text_len=12)
    assert np.array_equal(ids.rows(np.arange(len(b))), text.encode_ids(b.captions, text_len=12)[0].numpy())


@pytest.mark.parametrize("name", presets("tokenizer"))
def test_every_shipped_tokenizer_config_parses(name):
    exp = load_config(resolve("tokenizer", name), TokenizerExperiment)
    assert exp.model.resolution == exp.data.resolution and exp.model.num_codes >= 2
