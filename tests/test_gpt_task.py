"""GPT task: config without derived sizes, captions tokenized once into the shard, caption dropout, loss goes down,
exact resume."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from argen.data.codes import (
    CodeShardMeta,
    CodeShardWriter,
    caption_ids_name,
    encode_captions,
    open_caption_ids,
    write_caption_ids,
)
from argen.layout import LayoutMismatchError, SequenceLayout
from argen.model.gpt import GPTConfig
from argen.tasks.gpt import (
    DERIVED_GPT_FIELDS,
    CaptionedCodes,
    GPTArchitecture,
    GPTExperiment,
    GPTTask,
    code_features,
    gpt_config_for,
    id_ranges,
    sequence_loss,
    train_gpt,
    vq_code_factors,
)
from argen.text import TextTokenizer, dataset_captions, train_text_tokenizer
from tokenizers_img.config import ConfigError, load_config
from tokenizers_img.serialization import pretrained_hash
from tokenizers_img.vq_model import VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/gpt_tiny.yaml"
CAPTIONS = ("a red circle", "a blue square", "two green triangles", "a small yellow circle in the top left")


def tiny_vq(path: Path, *, seed: int = 0) -> Path:
    """A random (untrained) 16 px VQ with a 4x4 grid of 32 codes, saved to `path`."""
    torch.manual_seed(seed)
    cfg = VQConfig(resolution=16, base_channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                   codebook_size=32, codebook_dim=4)
    VQModel(cfg).save_pretrained(path)
    return path


def write_shard(path: Path, *, codes: np.ndarray, captions: list[str], vq_hash: str, split: str) -> Path:
    meta = CodeShardMeta(num_items=len(codes), done=0, grid=(4, 4), num_codes=32, tokenizer_hash=vq_hash,
                         dataset="test", split=split, resolution=16)
    CodeShardWriter(path, meta, resume=False).append(codes, captions, [f"k{i}" for i in range(len(codes))])
    return path


def make_parts(root: Path) -> SimpleNamespace:
    """VQ dir, text tokenizer file and train/val code shards: 4 distinct (caption, codes) pairs, repeated."""
    vq_dir = tiny_vq(root / "vq")
    vq_hash = pretrained_hash(vq_dir)
    text = train_text_tokenizer(dataset_captions("shapes", limit=500), vocab_size=512, lowercase=True)
    text_file = text.save(root / "text")
    distinct = np.random.default_rng(0).integers(0, 32, size=(4, 16))
    rows = np.tile(np.arange(4), 8)  # 32 training rows
    train = write_shard(root / "codes/train", codes=distinct[rows], captions=[CAPTIONS[i] for i in rows],
                        vq_hash=vq_hash, split="train")
    val = write_shard(root / "codes/val", codes=distinct[rows[:8]], captions=[CAPTIONS[i] for i in rows[:8]],
                      vq_hash=vq_hash, split="val")
    return SimpleNamespace(root=root, vq_dir=vq_dir, vq_hash=vq_hash, text_file=text_file, train=train, val=val,
                           distinct=distinct)


def experiment_for(parts: SimpleNamespace, out: Path, *extra: str) -> GPTExperiment:
    return load_config(TINY, GPTExperiment, [
        f"data.train=[{parts.train}]", f"data.val=[{parts.val}]", f"data.text_tokenizer={parts.text_file}",
        f"data.vq_tokenizer={parts.vq_dir}", f"train.out_dir={out}", *extra,
    ])


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> SimpleNamespace:
    return make_parts(tmp_path_factory.mktemp("gpt_parts"))


def test_config_has_no_derived_sizes_and_checks_the_architecture(parts, tmp_path):
    exp = experiment_for(parts, tmp_path)
    assert exp.cond_drop_prob == 0.1 and exp.text_loss_weight == 0.0 and exp.data.text_len == 8
    with pytest.raises(ConfigError, match="unknown config key 'model.vocab_size'"):
        experiment_for(parts, tmp_path, "model.vocab_size=100")
    with pytest.raises(ConfigError, match="n_embd=32 must be divisible by n_head=3"):
        experiment_for(parts, tmp_path, "model.n_head=3")
    with pytest.raises(ConfigError, match=r"cond_drop_prob must be in \[0, 1\], got 1.5"):
        experiment_for(parts, tmp_path, "cond_drop_prob=1.5")


def test_architecture_is_gpt_config_without_the_derived_sizes():
    arch = {f.name: (f.type, f.default) for f in dataclasses.fields(GPTArchitecture)}
    full = {f.name: (f.type, f.default) for f in dataclasses.fields(GPTConfig) if f.name not in DERIVED_GPT_FIELDS}
    assert arch == full
    assert set(DERIVED_GPT_FIELDS) <= {f.name for f in dataclasses.fields(GPTConfig)}


def test_captions_are_tokenized_once_into_the_shard_and_batches_come_from_memmaps(parts, tmp_path):
    text = TextTokenizer.load(parts.text_file)
    train, val = tmp_path / "train", tmp_path / "val"
    shutil.copytree(parts.train, train)
    shutil.copytree(parts.val, val)
    data = CaptionedCodes([str(train), str(val)], text_tokenizer=text, text_len=8)
    ids_file = train / f"{caption_ids_name(text.sha256, 8)}.bin"
    ids = open_caption_ids(train, text, text_len=8)
    assert ids.tokens.dtype == np.uint16 and len(ids.tokens) < 32 * 8  # written once, in the shard, unpadded
    assert len(data) == 40 and data.num_empty == 0
    batch = data.__getitems__([0, 5, 35, 39])
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (4, 16)
    assert batch["codes"][1].tolist() == parts.distinct[1].tolist()  # row 5 is pair 5 % 4 = 1
    assert batch["codes"][2].tolist() == parts.distinct[3].tolist()  # val row 3
    assert torch.equal(batch["text_ids"][1], text.encode(CAPTIONS[1], text_len=8)[0])
    assert torch.equal(data[5]["codes"], batch["codes"][1])
    expected = sorted(set(text.encode(list(CAPTIONS), text_len=8).flatten().tolist()))
    assert data.seen_text_ids() == expected
    mtime = ids_file.stat().st_mtime_ns
    again = CaptionedCodes([str(train)], text_tokenizer=text, text_len=8)
    assert ids_file.stat().st_mtime_ns == mtime and torch.equal(again[5]["text_ids"], batch["text_ids"][1])  # reused
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(again))[5]["codes"], batch["codes"][1])  # workers map the files again
    with pytest.warns(UserWarning, match="8 of 32 captions are longer than text_len=4 tokens") as rec:
        CaptionedCodes([str(train)], text_tokenizer=text, text_len=4)
    assert len(rec) == 1


def test_batch_encoding_and_the_stored_ids_equal_one_caption_at_a_time(parts, tmp_path):
    text = TextTokenizer.load(parts.text_file)
    captions = [*CAPTIONS, "", "an \udcff odd one", "a very long caption " * 8]
    rows, lengths = encode_captions(text, captions, text_len=8)
    ref, ref_lengths = text.encode_ids(captions, text_len=8)
    assert np.array_equal(rows, ref.numpy()) and lengths.tolist() == ref_lengths
    meta = CodeShardMeta(num_items=len(captions), done=0, grid=(1, 1), num_codes=4, tokenizer_hash="h", dataset="d",
                         split="train", resolution=4)
    CodeShardWriter(tmp_path / "s", meta, resume=False).append(np.zeros((len(captions), 1)), captions,
                                                              [str(i) for i in range(len(captions))])
    stored = write_caption_ids(tmp_path / "s", text, text_len=8, chunk=3)  # chunks end mid-shard
    assert np.array_equal(stored.rows(np.arange(len(captions))[::-1]), ref.numpy()[::-1])
    assert stored.info["num_empty"] == 1 and stored.info["num_truncated"] == 1


def test_a_damaged_code_is_named_when_its_batch_is_read(parts, tmp_path):
    text = TextTokenizer.load(parts.text_file)
    shutil.copytree(parts.train, tmp_path / "train")
    np.load(tmp_path / "train" / "codes.npy", mmap_mode="r+")[6, 3] = 99
    data = CaptionedCodes([str(tmp_path / "train")], text_tokenizer=text, text_len=8)  # start-up reads no codes
    with pytest.raises(LayoutMismatchError, match=r"codes in \[.*, 99\] \(rows \[6\]\), outside \[0, 32\)"):
        data.__getitems__([5, 6])


def test_shards_from_another_vq_are_refused(parts, tmp_path):
    other = tiny_vq(tmp_path / "other_vq", seed=1)
    exp = experiment_for(parts, tmp_path / "run", f"data.vq_tokenizer={other}")
    with pytest.raises(ValueError, match=f"made by tokenizer {parts.vq_hash[:12]}.*uses tokenizer {pretrained_hash(other)[:12]}"):
        train_gpt(exp)


def test_caption_dropout_and_text_weight(parts, tmp_path):
    text = TextTokenizer.load(parts.text_file)
    data = CaptionedCodes([str(parts.train)], text_tokenizer=text, text_len=8)
    layout = SequenceLayout.from_parts(text, text_len=8, num_codes=32, image_grid=(4, 4))
    batch = data.__getitems__(list(range(8)))
    torch.manual_seed(0)
    task = GPTTask(experiment_for(parts, tmp_path, "cond_drop_prob=1.0"), layout=layout, text_tokenizer=text, trained_with={})
    gpt = task.gpt
    out = task.training_step(batch, modules={"gpt": gpt}, step=0)
    empty = torch.full_like(batch["text_ids"], text.pad_id)
    assert float(out.logs["cond_dropped"]) == 1.0
    assert torch.allclose(out.losses["gpt"], sequence_loss(gpt, empty, batch["codes"], layout=layout).loss)
    plain = sequence_loss(gpt, batch["text_ids"], batch["codes"], layout=layout)
    assert torch.allclose(plain.loss, plain.image_loss)  # text_loss_weight 0: image tokens only
    weighted = sequence_loss(gpt, batch["text_ids"], batch["codes"], layout=layout, text_loss_weight=0.5, accuracy=True)
    assert not torch.allclose(weighted.loss, plain.loss) and float(weighted.text_loss) > 0
    # without a text loss no text logits are computed: the image figures are the same, the text loss reads 0
    torch.testing.assert_close(weighted.image_loss, plain.image_loss)
    assert float(plain.text_loss) == 0 and plain.image_acc is None  # accuracy is computed only when asked for
    with torch.no_grad():
        predicted = gpt(layout.split(layout.build(batch["text_ids"], batch["codes"]))[0])[:, layout.prefix_len - 1:]
    assert torch.equal(weighted.image_acc, (predicted.argmax(-1) == batch["codes"] + layout.image_offset).float().mean())


def test_input_noise_corrupts_the_inputs_only(parts, tmp_path):
    """input_noise: the step replaces that share of the input codes with random codes; the targets stay clean."""
    text = TextTokenizer.load(parts.text_file)
    data = CaptionedCodes([str(parts.train)], text_tokenizer=text, text_len=8)
    layout = SequenceLayout.from_parts(text, text_len=8, num_codes=32, image_grid=(4, 4))
    batch = data.__getitems__(list(range(8)))
    task = GPTTask(experiment_for(parts, tmp_path, "cond_drop_prob=0.0", "input_noise=0.5"), layout=layout,
                   text_tokenizer=text, trained_with={})
    gpt = task.gpt.eval()  # no dropout: the loss is a function of the inputs
    seen = []
    gpt.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.manual_seed(3)
    out = task.training_step(batch, modules={"gpt": gpt}, step=0)
    fed = seen[0][:, layout.prefix_len:] - layout.image_offset  # the input codes: all but the last
    clean = batch["codes"][:, :-1]
    changed = (fed != clean).float().mean()
    assert 0.3 < float(changed) < 0.6  # half redrawn, a 32nd of them to the same code
    torch.testing.assert_close(out.losses["gpt"], sequence_loss(gpt, batch["text_ids"], batch["codes"], layout=layout,
                                                                input_codes=torch.cat([fed, batch["codes"][:, -1:]], 1)).loss)
    assert not torch.allclose(out.losses["gpt"], sequence_loss(gpt, batch["text_ids"], batch["codes"], layout=layout).loss)
    with torch.no_grad():  # by hand: the log-probability of the clean targets given the noisy inputs
        logp = gpt(seen[0]).float().log_softmax(-1)[:, layout.prefix_len - 1:]
    by_hand = -logp.gather(-1, (batch["codes"] + layout.image_offset)[..., None]).mean()
    torch.testing.assert_close(out.losses["gpt"], by_hand, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"input_noise must be in \[0, 1\), got 1.0"):
        experiment_for(parts, tmp_path, "input_noise=1.0")


def test_masked_padding_trains_on_the_used_text_columns_only_with_the_same_loss(parts, tmp_path):
    """model.mask_padding: the step leaves out the text columns that hold only pads in the batch; loss, accuracy and
    gradients are those of the full sequence."""
    text = TextTokenizer.load(parts.text_file)
    data = CaptionedCodes([str(parts.train)], text_tokenizer=text, text_len=8)
    layout = SequenceLayout.from_parts(text, text_len=8, num_codes=32, image_grid=(4, 4))
    batch = data.__getitems__(list(range(8)))
    text_ids = batch["text_ids"].clone()
    text_ids[:, 5:] = text.pad_id  # at most 5 caption tokens: 3 all-pad columns to leave out
    text_ids[0] = text.pad_id  # and one empty caption
    task = GPTTask(experiment_for(parts, tmp_path, "model.mask_padding=true"), layout=layout, text_tokenizer=text,
                   trained_with={})
    gpt = task.gpt
    assert gpt.config.mask_padding and gpt.config.pad_id == layout.pad_id == text.pad_id
    losses = {}
    for drop in (False, True):
        out = sequence_loss(gpt, text_ids, batch["codes"], layout=layout, accuracy=True, drop_padding=drop)
        out.loss.backward()
        losses[drop] = (out.loss.detach(), out.image_acc, [p.grad.clone() for p in gpt.parameters()])
        gpt.zero_grad()
    torch.testing.assert_close(losses[True][0], losses[False][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(losses[True][1], losses[False][1])
    for a, b in zip(losses[True][2], losses[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    calls = []
    gpt.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    task.training_step({**batch, "text_ids": text_ids}, modules={"gpt": gpt}, step=0)
    assert calls == [layout.seq_len - 1 - 3]  # the 3 all-pad columns were left out


def test_code_features_are_what_the_vq_codes_look_like(parts, tmp_path):
    text = TextTokenizer.load(parts.text_file)
    layout = SequenceLayout.from_parts(text, text_len=8, num_codes=32, image_grid=(4, 4))
    exp = experiment_for(parts, tmp_path, "model.code_features=6")
    task = GPTTask(exp, layout=layout, text_tokenizer=text, trained_with={}, vq_dir=str(parts.vq_dir))
    feats = task.gpt.code_feat
    assert feats.shape == (layout.vocab_size, 6) and not feats[:layout.image_offset].any()
    vq = VQModel.from_pretrained(parts.vq_dir)
    patches = vq.code_appearance()
    assert patches.shape == (32, 3 * 4 * 4)  # 3 channels of a 4 x 4 pixel patch per code
    # at full rank the features are the centred patches in another basis, scaled: distances keep their ratios
    full = code_features(vq, 32).double()
    d_feat, d_patch = torch.cdist(full, full), torch.cdist(patches.double(), patches.double())
    scale = d_patch[0, 1] / d_feat[0, 1]
    torch.testing.assert_close(d_feat * scale, d_patch, rtol=1e-4, atol=1e-5)
    assert float(full.pow(2).sum(1).mean()) == pytest.approx(1.0)
    # the leading 6 components are what the task put on the image tokens
    torch.testing.assert_close(feats[layout.image_offset:], code_features(vq, 6))
    with pytest.raises(ValueError, match=r"model.code_features=40 must lie in \[1, 32\]"):
        code_features(vq, 40)
    with pytest.raises(ValueError, match="model.code_features needs data.vq_tokenizer"):
        GPTTask(exp, layout=layout, text_tokenizer=text, trained_with={})


def test_a_product_vq_tokenizer_gives_its_gpt_factored_codes(parts, tmp_path):
    """A VQ with 8 structure x 4 colour codes (32, as the shards hold) makes the GPT's image codes factored: no row
    of their own, (8, 4) factor rows; a plain VQ, or none, keeps one row per code."""
    torch.manual_seed(0)
    VQModel(VQConfig(resolution=16, base_channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                     codebook_size=8, codebook_dim=4, colour_codes=4)).save_pretrained(tmp_path / "vq")
    assert vq_code_factors(str(tmp_path / "vq")) == (8, 4)
    assert vq_code_factors(str(parts.vq_dir)) is None and vq_code_factors(None) is None
    text = TextTokenizer.load(parts.text_file)
    layout = SequenceLayout.from_parts(text, text_len=8, num_codes=32, image_grid=(4, 4))
    task = GPTTask(experiment_for(parts, tmp_path), layout=layout, text_tokenizer=text, trained_with={},
                   vq_dir=str(tmp_path / "vq"))
    assert task.gpt.config.code_factors == (8, 4) and task.gpt.tok_emb.num_embeddings == layout.image_offset
    assert task.gpt.config.vocab_size == layout.vocab_size and task.gpt.factor_emb.num_embeddings == 12


def _losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as fh:
        return [float(r["loss/gpt"]) for r in csv.DictReader(fh)]


def test_training_lowers_the_loss_and_writes_a_pipeline(parts, tmp_path):
    from argen.pipeline import Pipeline

    exp = experiment_for(parts, tmp_path / "run", "train.max_steps=80", "train.save_every=0", "cond_drop_prob=0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_gpt(exp)
    losses = _losses(tmp_path / "run")
    assert losses[0] > 3.0 and losses[-1] < 0.5 * losses[0], losses  # 4 code grids memorised: ln(32) = 3.47 -> ~0
    ev = result.eval
    assert ev["val/num_items"] == 8 and ev["val/loss"] < ev["val/loss_uncond"]  # the caption tells which grid
    pipe = Pipeline.load(result.artifacts_dir)
    assert pipe.manifest["parts"]["vq"]["hash"] == parts.vq_hash
    assert pipe.unseen_words("A red circle") == [] and pipe.unseen_words("a purple circle") == ["purple"]


def test_resume_gives_identical_weights(parts, tmp_path, monkeypatch):
    args = ("train.max_steps=8", "train.save_every=4", "cond_drop_prob=0.5", "input_noise=0.3", "train.eval_every=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = train_gpt(experiment_for(parts, tmp_path / "a", *args))

        original = GPTTask.training_step

        def crash_at_6(self, batch, *, modules, step):
            if step == 6:
                raise KeyboardInterrupt
            return original(self, batch, modules=modules, step=step)

        monkeypatch.setattr(GPTTask, "training_step", crash_at_6)
        with pytest.raises(KeyboardInterrupt):
            train_gpt(experiment_for(parts, tmp_path / "b", *args))
        monkeypatch.setattr(GPTTask, "training_step", original)
        resumed = train_gpt(experiment_for(parts, tmp_path / "b", *args), resume=True)
    a = load_file(straight.artifacts_dir / "gpt" / "model.safetensors")
    b = load_file(resumed.artifacts_dir / "gpt" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_matches_eager(parts, tmp_path):
    """train.compile runs the GPT's forward through torch.compile: same losses and weights up to float rounding, same
    weight names in the saved pipeline (the in-place compile adds no `_orig_mod.` prefix)."""
    args = ("train.max_steps=6", "train.save_every=0", "train.eval_every=0", "cond_drop_prob=0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = train_gpt(experiment_for(parts, tmp_path / "eager", *args))
        compiled = train_gpt(experiment_for(parts, tmp_path / "compiled", *args, "train.compile=true"))
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=1e-5)
    a = load_file(eager.artifacts_dir / "gpt" / "model.safetensors")
    b = load_file(compiled.artifacts_dir / "gpt" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_id_ranges():
    assert id_ranges([0, 1, 2, 5, 7, 8]) == [[0, 2], [5, 5], [7, 8]] and id_ranges([]) == []


@pytest.mark.parametrize("name", ["shapes_32", "gpu_100m", "gpu_300m"])
def test_every_shipped_config_parses(name):
    from argen.configs import presets, resolve

    assert name in presets("gpt")
    exp = load_config(resolve("gpt", name), GPTExperiment)
    layout = SequenceLayout(text_vocab_size=8192, pad_id=0, text_len=exp.data.text_len, num_codes=1024, image_grid=(8, 8))
    assert gpt_config_for(exp.model, layout).vocab_size == layout.vocab_size
