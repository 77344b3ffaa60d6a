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

from argen.cli import main
from argen.data.codes import CodeShardDataset
from argen.tasks.tokenizer import TokenizerExperiment, train_tokenizer
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


def test_tokenize_resumes_and_matches_direct_encoding(tiny_tokenizer, tmp_path, capsys):
    args = ["tokenize", "--tokenizer", str(tiny_tokenizer), "--split", "val", "--limit", "24", "--batch-size", "8"]
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    # an interrupted run: the first 8 rows written, then resumed
    assert main([*args[:-4], "--limit", "24", "--batch-size", "8", "-o", str(tmp_path / "part")]) == 0
    meta_path = tmp_path / "part" / "val" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["done"] = 8
    meta_path.write_text(json.dumps(meta))
    np.load(tmp_path / "part" / "val" / "codes.npy", mmap_mode="r+")[8:] = 0
    assert main([*args, "-o", str(tmp_path / "part"), "--resume"]) == 0

    whole, part = CodeShardDataset(tmp_path / "whole" / "val"), CodeShardDataset(tmp_path / "part" / "val")
    assert np.array_equal(np.asarray(whole.codes), np.asarray(part.codes)) and whole.captions == part.captions
    model = VQModel.from_pretrained(tiny_tokenizer)
    from argen.data.shapes import ShapesDataset

    ds = ShapesDataset("val", resolution=32)
    direct = model.encode(torch.stack([ds[i]["image"] for i in range(24)])).flatten(1)
    assert torch.equal(direct, torch.stack([part[i]["codes"] for i in range(24)]))
    assert part.meta.tokenizer_hash == pretrained_hash(tiny_tokenizer)
    assert main([*args, "-o", str(tmp_path / "whole")]) == 2  # refused: the shard exists, and nothing is touched
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tokenizer").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_tokenizer_config_parses(path):
    exp = load_config(path, TokenizerExperiment)
    assert exp.model.resolution == exp.data.resolution and exp.model.num_codes >= 2
