"""WebDataset tar shards through the whole chain: split by process and worker with resumable positions, a tokenizer
trained on the stream (resumed exactly mid-shard), `argen tokenize` with workers, a BPE and a tiny GPT on the codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from argen.cli import main
from argen.data.codes import CodeShardDataset
from argen.data.shapes import ShapesDataset
from argen.data.webdataset import WebDatasetShards

pytest.importorskip("webdataset")
ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 4, 24


def write_shards(folder: Path, *, shards: int = SHARDS, per_shard: int = PER_SHARD, prefix: str = "shard",
                 first_scene: int = 0) -> Path:
    """Tar shards PREFIX-000.tar, ... of 32 px shapes scenes (`KEY.png` + `KEY.txt`) from scene `first_scene` on, plus
    one undecodable sample in the second shard."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = ShapesDataset("train", resolution=32)
    for s in range(shards):
        with tarfile.open(folder / f"{prefix}-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                item = scenes[first_scene + s * per_shard + j]
                png = io.BytesIO()
                pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(png, format="PNG")
                for name, data in ((f"s{s}_{j:03d}.png", png.getvalue()), (f"s{s}_{j:03d}.txt", item["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            if s == 1:
                for name, data in (("broken.png", b"not a png"), ("broken.txt", b"a broken sample")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds") / "shards")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keys(items) -> list[str]:
    return [it["key"] for it in items]


def test_slots_split_the_shards_and_resume_mid_shard(shards):
    data = WebDatasetShards(str(shards), split="all", resolution=32)
    slot_items = [list(zip(range(60), data.slot_items(seed=0, slot=s, num_slots=2, start=None))) for s in (0, 1)]
    for s, items in enumerate(slot_items):
        names = {it["key"].split("/")[0] for _, it in items[:PER_SHARD * 2]}
        assert names == {f"shard-{i:03d}.tar" for i in range(s, SHARDS, 2)}  # slot s reads shards s, s + 2
    first = [it for _, it in slot_items[0]]
    cut = first[17]["stream_position"].tolist()
    resumed = [it for _, it in zip(range(22), data.slot_items(seed=0, slot=0, num_slots=2, start=cut))]
    assert _keys(resumed) == _keys(first[18:40])  # continues after item 17, into the next shard and epoch
    epoch1 = [it for _, it in zip(range(PER_SHARD * 2), data.slot_items(seed=0, slot=1, num_slots=2, start=[1, 1, 0, 0]))]
    assert sorted(_keys(epoch1)) == sorted(_keys([it for _, it in slot_items[1][:PER_SHARD * 2]]))
    with pytest.raises(ValueError, match="4 webdataset shard.* for 5 slots"):
        next(data.slot_items(seed=0, slot=4, num_slots=5, start=None))


def test_heldout_shards_are_their_own_split_and_never_train_or_val(shards, tmp_path):
    from argen.data.registry import has_heldout
    from argen.data.skips import DatasetError

    assert not has_heldout(f"webdataset:{shards}")
    with pytest.raises(DatasetError, match="no shard for the heldout split: held-out shards are named heldout"):
        WebDatasetShards(str(shards), split="heldout", resolution=32)
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    write_shards(root, shards=1, per_shard=5, prefix="heldout", first_scene=1000)  # heldout-000.tar: by its name
    write_shards(root / "heldout", shards=1, per_shard=3, prefix="part", first_scene=2000)  # by its folder
    by_name = [f"heldout-000.tar/s0_{j:03d}" for j in range(5)]
    by_folder = [f"part-000.tar/s0_{j:03d}" for j in range(3)]
    everything = _keys(WebDatasetShards(str(shards), split="all", resolution=32))
    # a directory reads DIR/*.tar and DIR/heldout/*.tar; a brace pattern only the shards it names
    for spec, held_out in ((str(root), by_name + by_folder), (f"{root}/{{shard-{{000..003}},heldout-000}}.tar", by_name)):
        assert has_heldout(f"webdataset:{spec}")
        split = {name: _keys(WebDatasetShards(spec, split=name, resolution=32)) for name in ("train", "val", "heldout")}
        assert sorted(split["heldout"]) == sorted(held_out)
        assert sorted(split["train"] + split["val"]) == sorted(everything)  # the same hash split as without them
        assert split["train"] and split["val"]
    with pytest.raises(DatasetError, match="all of its 1 shards are held-out shards"):
        WebDatasetShards(f"{root}/heldout-000.tar", split="train", resolution=32)


@pytest.mark.slow
def test_tar_shards_to_a_trained_gpt(shards, tmp_path):
    vq_config = ROOT / "tests" / "configs" / "vq_tiny.yaml"
    common = [str(vq_config), f"data.spec=webdataset:{shards}", "data.val_fraction=0.25", "train.max_steps=12",
              "train.save_every=4", "train.num_workers=2", "model.dead_code_threshold=0"]
    assert main(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'vq_a'}"]) == 0
    # the same run stopped after step 6 (its checkpoint: step 4, mid-shard in each worker's slot), then resumed
    from argen.tasks import tokenizer as tok_mod

    real_step = tok_mod.TokenizerTask.training_step

    def stop_at_6(self, batch, *, modules, step):
        if step == 6:
            raise KeyboardInterrupt
        return real_step(self, batch, modules=modules, step=step)

    tok_mod.TokenizerTask.training_step = stop_at_6
    try:
        assert main(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'vq_b'}"]) == 130
    finally:
        tok_mod.TokenizerTask.training_step = real_step
    state = json.loads((tmp_path / "vq_b" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["stream_layout"] == [1, 2] and sorted(state["stream_positions"]) == ["0", "1"]
    assert main(["train", "tokenizer", *common, f"train.out_dir={tmp_path / 'vq_b'}", "--resume"]) == 0
    a = load_file(tmp_path / "vq_a" / "checkpoints" / "step_00000012" / "module.vq.safetensors")
    b = load_file(tmp_path / "vq_b" / "checkpoints" / "step_00000012" / "module.vq.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "vq_a" / "metrics.json").read_text())
    assert any(s["key"] == "shard-001.tar/broken" for s in report["skipped"])

    vq = tmp_path / "vq_a" / "final" / "tokenizer"
    tokenize = ["tokenize", "--tokenizer", str(vq), "--dataset", f"webdataset:{shards}", "--split", "train",
                "--split", "val", "--batch-size", "8"]
    assert main([*tokenize, "-o", str(tmp_path / "codes_1")]) == 0
    assert main([*tokenize, "--num-workers", "2", "-o", str(tmp_path / "codes")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port()), "-m", "argen"]
    run = subprocess.run([*launch, *tokenize, "--num-workers", "1", "-o", str(tmp_path / "codes_2p")], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for split in ("train", "val"):  # 1 process; 2 workers; 2 processes of 1 worker: one and the same shard
        one = CodeShardDataset(tmp_path / "codes_1" / split)
        for other in ("codes", "codes_2p"):
            two = CodeShardDataset(tmp_path / other / split)
            assert np.array_equal(np.asarray(one.codes), np.asarray(two.codes)) and one.keys == two.keys
    train = CodeShardDataset(tmp_path / "codes" / "train")
    val = CodeShardDataset(tmp_path / "codes" / "val")
    assert len(train) + len(val) == SHARDS * PER_SHARD  # the broken sample is skipped, every other one kept
    assert train.keys == sorted(train.keys)  # shard order, then sample order

    assert main(["train", "text-tokenizer", "--dataset", f"codes:{tmp_path / 'codes' / 'train'}", "--vocab-size", "300",
                 "-o", str(tmp_path / "bpe")]) == 0
    assert main(["train", "gpt", str(ROOT / "tests" / "configs" / "gpt_tiny.yaml"),
                 f"data.train=[{tmp_path / 'codes' / 'train'}]", f"data.val=[{tmp_path / 'codes' / 'val'}]",
                 f"data.text_tokenizer={tmp_path / 'bpe'}", f"data.vq_tokenizer={vq}", "data.text_len=64", "train.max_steps=6",
                 f"train.out_dir={tmp_path / 'gpt'}"]) == 0
    gpt = json.loads((tmp_path / "gpt" / "metrics.json").read_text())
    assert gpt["step"] == 6 and Path(gpt["pipeline"]).is_dir() and gpt["eval"]["val/num_items"] == len(val)
