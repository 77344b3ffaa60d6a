"""CLIP: save/load round trip, local Hugging Face CLIP directories, padding invariance, the contrastive loss,
retrieval metric invariants, shapes caption consistency, a tiny training run and embedding shards."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from argen.data.shapes import ShapesDataset, parse_caption, scene_and_caption
from argen.eval.judge import match
from argen.eval.retrieval import hits_at_k, retrieval_metrics, scene_fits, shapes_consistency
from argen.tasks.clip import CLIPExperiment, CLIPTask, contrastive_loss, train_clip
from argen.text import TextTokenizerError, dataset_captions, train_text_tokenizer
from argen.unclip.clip import ClipEncoder, ClipError
from argen.unclip.embeddings import EmbeddingShard, EmbeddingShardError, encode_embedding_shard
from tokenizers_img.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/clip_tiny.yaml"
CAPTIONS = ["a red circle", "two blue squares", "a small green triangle above a yellow circle", "a large white square"]


@pytest.fixture(scope="module")
def bpe():
    return train_text_tokenizer(dataset_captions("shapes", limit=300), vocab_size=400)


def tiny_config(*, max_positions: int = 24) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=max_positions),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)


def images(n: int, *, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_save_load_round_trip(tmp_path, bpe):
    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=3)
    clip.save(tmp_path / "clip")
    back = ClipEncoder.load(tmp_path / "clip")
    assert back.sha256 == clip.sha256 and back.text_len == 20 and back.embed_dim == 16
    a, b = clip.encode_text(CAPTIONS), back.encode_text(CAPTIONS)
    torch.testing.assert_close(a.embeds, b.embeds)
    torch.testing.assert_close(a.states, b.states)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(clip.encode_images(images(3)), back.encode_images(images(3)))
    other = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=4)
    assert other.sha256 != clip.sha256  # another initialisation is another CLIP


def test_padding_does_not_change_the_embedding(bpe):
    long = ClipEncoder.build(tiny_config(max_positions=24), bpe, text_len=24, seed=0)
    short = ClipEncoder(long.model, bpe, text_len=14)
    a, b = long.encode_text(CAPTIONS), short.encode_text(CAPTIONS)
    torch.testing.assert_close(a.embeds, b.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.states[:, :14][b.mask], b.states[b.mask], atol=1e-5, rtol=1e-5)
    # the pooled position is the first PAD after the caption: one past its last token
    n_tokens = [len(bpe.tokenize(c)) for c in CAPTIONS]
    assert a.mask.sum(1).tolist() == [n + 1 for n in n_tokens]


def write_hf_clip(path: Path) -> Path:
    """A tiny local Hugging Face CLIP directory: CLIPModel.save_pretrained plus a byte-level CLIP BPE
    (vocab.json + merges.txt) written here, with merges for 'red' and 'circle'."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(c) for c in keep] + [chr(256 + k) for k in range(len(extra))]  # GPT-2's bytes_to_unicode alphabet
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = tiny_config(max_positions=12)
    cfg.text_config.vocab_size = len(vocab)
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id, cfg.text_config.pad_token_id = 0, 1, 1
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_local_hugging_face_clip_loads_and_encodes(tmp_path):
    path = write_hf_clip(tmp_path / "hf_clip")
    clip = ClipEncoder.load(path)
    assert clip.text_len == 12 and clip.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    ids, mask = clip.tokenize(["a red circle", "a red circle in the top left"])
    tokens = clip.tokenizer.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    enc = clip.encode_text(["a red circle", "a red circle in the top left"])
    assert enc.embeds.shape == (2, 16) and enc.states.shape == (2, 12, 32)
    # HF CLIP pools at the end token: the padding after it does not change the embedding
    torch.testing.assert_close(enc.embeds[:1], ClipEncoder(clip.model, clip.tokenizer, text_len=8).encode_text(["a red circle"]).embeds,
                               atol=1e-5, rtol=1e-5)
    assert clip.encode_images(images(2)).shape == (2, 16)
    with pytest.raises(ClipError, match="pretrained Hugging Face CLIP"):
        clip.save(tmp_path / "copy")


def test_load_rejects_a_directory_that_is_not_a_clip(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ClipError, match="neither clip.json"):
        ClipEncoder.load(tmp_path / "x")
    (tmp_path / "x/config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ClipError, match="model_type='gpt2'"):
        ClipEncoder.load(tmp_path / "x")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_argen_attention_gives_transformers_eager_outputs_and_gradients(monkeypatch, tmp_path, bpe, backend):
    attention_module = importlib.import_module("argen.model.attention")
    monkeypatch.setattr(attention_module, "resolve_backend", lambda *args, **kwargs: backend)
    config = tiny_config()
    config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = 2
    clip = ClipEncoder.build(config, bpe, text_len=20, seed=0)  # runs argen's attention
    assert clip.model.config._attn_implementation == "argen"
    reference = copy.deepcopy(clip.model)
    reference.set_attn_implementation("eager")
    ids, mask = clip.tokenize(CAPTIONS)
    pixels = clip.pixel_values(images(4))
    for padding in (None, mask.long()):  # our BPE pools causally without a mask; a pretrained CLIP passes one
        outs = []
        for model in (clip.model.train(), reference.train()):
            model.zero_grad()
            out = model(input_ids=ids, pixel_values=pixels, attention_mask=padding, return_loss=True)
            out.loss.backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (ours, our_grads), (ref, ref_grads) = outs
        torch.testing.assert_close(ours.text_embeds, ref.text_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.image_embeds, ref.image_embeds, atol=1e-5, rtol=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    clip.save(tmp_path / "clip")  # the implementation is not written: plain transformers loads the saved model
    assert "argen" not in (tmp_path / "clip/model/config.json").read_text()
    assert CLIPModel.from_pretrained(tmp_path / "clip/model").config._attn_implementation != "argen"


# ----------------------------------------------------------------------------------------------- loss

def test_contrastive_loss_equals_transformers_clip_loss(bpe):
    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=0)
    ids, _ = clip.tokenize(CAPTIONS)
    out = clip.model(input_ids=ids, pixel_values=clip.pixel_values(images(4)), return_loss=True)
    torch.testing.assert_close(contrastive_loss(out.text_embeds, out.image_embeds, clip.model.logit_scale), out.loss)


def test_training_step_loss_is_the_full_length_loss(tmp_path, bpe):
    task = CLIPTask(tiny_experiment(tmp_path, bpe), tokenizer=bpe)  # trims the text to the batch's longest caption
    batch = {"image": images(4), "caption": CAPTIONS}
    ids, _ = task.clip.tokenize(CAPTIONS)
    assert ids.shape[1] == 28
    out = task.clip.model(input_ids=ids, pixel_values=task.clip.pixel_values(batch["image"]), return_loss=True)
    step = task.training_step(batch, modules={"clip": task.clip.model}, step=0)
    torch.testing.assert_close(step.losses["clip"], out.loss, atol=1e-5, rtol=1e-5)


def test_repeated_captions_need_no_multi_positive_targets():
    g = torch.Generator().manual_seed(1)
    t, i = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t[3] = t[1]  # items 1 and 3 share a caption, so the (deterministic) text tower gives them equal embeddings
    same = torch.eye(5, dtype=torch.bool)
    same[1, 3] = same[3, 1] = True
    scale = torch.tensor(1.5)
    logits = scale.exp() * t @ i.T
    soft = same.float() / same.float().sum(1, keepdim=True)  # both copies of the caption are positives of both images
    multi = (-(soft * logits.log_softmax(1)).sum(1).mean() - (soft * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(contrastive_loss(t, i, scale), multi)
    # and which of the two images is paired with which copy does not matter
    torch.testing.assert_close(contrastive_loss(t, i, scale), contrastive_loss(t, i[torch.tensor([0, 3, 2, 1, 4])], scale))
    t[3] = F.normalize(t[1] + 0.3, dim=-1)  # different captions: the multi-positive loss is another loss
    logits = scale.exp() * t @ i.T
    multi = (-(soft * logits.log_softmax(1)).sum(1).mean() - (soft * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert not torch.allclose(contrastive_loss(t, i, scale), multi)


# ----------------------------------------------------------------------------------------------- retrieval

def test_retrieval_identical_embeddings_retrieve_themselves():
    e = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(e, e)
    assert (m.t2i_top1, m.i2t_top1, m.t2i_top5, m.candidates) == (1.0, 1.0, 1.0, 50)


def test_retrieval_ties_count_against_the_query():
    m = retrieval_metrics(torch.ones(10, 4), torch.ones(10, 4))  # a collapsed model: every score ties
    assert m.t2i_top1 == m.i2t_top1 == m.t2i_top5 == 0.0
    assert m.t2i_top5 == 0.0 and retrieval_metrics(torch.ones(3, 4), torch.ones(3, 4)).t2i_top5 == 1.0  # k >= N


def test_retrieval_hand_checked_case():
    # scores text x image: caption 0 -> image 0 (hit); caption 1 prefers image 2 (miss at 1, hit at 2);
    # caption 2 prefers image 1, then image 0, then its own (rank 3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.8, 0.6, 0.0]])
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sim = text @ image.T
    assert hits_at_k(sim, torch.eye(3, dtype=torch.bool), 1).tolist() == [True, False, False]
    assert hits_at_k(sim, torch.eye(3, dtype=torch.bool), 2).tolist() == [True, True, False]
    m = retrieval_metrics(text, image)
    assert m.t2i_top1 == pytest.approx(1 / 3)
    # image -> text: image 0 -> text 0 (1.0 vs 0.8: hit); image 1 -> text 1 (0.6 ties text 2's 0.6: miss); image 2 -> text 1
    assert m.i2t_top1 == pytest.approx(1 / 3)
    # caption 1 also fits image 2: consistent top-1 counts it; strict does not
    consistent = torch.eye(3, dtype=torch.bool)
    consistent[1, 2] = True
    m = retrieval_metrics(text, image, consistent=consistent)
    assert m.t2i_top1_consistent == pytest.approx(2 / 3) and m.t2i_top1 == pytest.approx(1 / 3)
    assert m.t2i_ceiling == pytest.approx(2 / 3) and m.t2i_ceiling_expected == pytest.approx((1 + 0.5 + 1) / 3)
    assert m.i2t_ceiling == pytest.approx(2 / 3)  # image 2 fits captions 1 and 2


def test_retrieval_does_not_depend_on_candidate_order():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    image = image + 2 * text  # partly aligned, so the metrics are neither 0 nor 1
    consistent = torch.rand(40, 40, generator=g) < 0.1
    consistent.fill_diagonal_(True)
    perm = torch.randperm(40, generator=g)
    a = retrieval_metrics(text, image, consistent=consistent)
    b = retrieval_metrics(text[perm], image[perm], consistent=consistent[perm][:, perm])
    assert a == b
    assert 0 < a.t2i_top1 < 1


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="must both be"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(4, 4))
    bad = torch.eye(3, dtype=torch.bool)
    bad[1, 1] = False
    with pytest.raises(ValueError, match=r"pairs \[1\]"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), consistent=bad)


def test_scene_fits_agrees_with_the_judge_on_ground_truth_scenes():
    pairs = [scene_and_caption(i, "val") for i in range(60)]
    scenes, captions = [s for s, _ in pairs], [c for _, c in pairs]
    table = shapes_consistency(captions, scenes)
    assert table.diagonal().all()  # every caption fits its own scene
    for c in range(0, 60, 3):
        spec = parse_caption(captions[c])
        for s in range(60):
            attributes, _ = match(spec, scenes[s])
            assert table[c, s].item() == all(v is not False for v in attributes.values()), (captions[c], scenes[s])
    assert 0 < table.float().mean() < 0.5
    assert not scene_fits(parse_caption("two red circles"), scenes[0]) or len(scenes[0].objects) == 2


# ----------------------------------------------------------------------------------------------- training

def tiny_experiment(tmp_path: Path, bpe, **overrides) -> CLIPExperiment:
    text = bpe.save(tmp_path / "text")
    args = [f"text_tokenizer={text}", f"train.out_dir={tmp_path / 'run'}"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(TINY, CLIPExperiment, args)


def test_a_few_steps_reduce_the_contrastive_loss(tmp_path, bpe):
    # temperature 1 at the start: at CLIP's 0.07 this tiny model first collapses to the uniform loss ln(32) and
    # needs many more steps to leave it
    exp = tiny_experiment(tmp_path, bpe, **{"model.logit_scale_init": 0.0})
    task = CLIPTask(exp, tokenizer=bpe)
    data = ShapesDataset("train", size=32)
    batch = {"image": torch.stack([data[i]["image"] for i in range(32)]), "caption": [data[i]["caption"] for i in range(32)]}
    model = task.clip.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = task.training_step(batch, modules={"clip": model}, step=step).losses["clip"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < np.log(32) - 0.3 and losses[-1] < losses[0] - 0.3, losses


def test_train_clip_writes_a_loadable_clip_and_retrieval_metrics(tmp_path, bpe):
    from argen.cli import main

    text = bpe.save(tmp_path / "text")
    assert main(["train", "clip", str(TINY), f"text_tokenizer={text}", f"train.out_dir={tmp_path / 'run'}",
                 "train.max_steps=4", "eval.candidates=32"]) == 0
    exp = tiny_experiment(tmp_path, bpe)
    clip = ClipEncoder.load(tmp_path / "run/final/clip")
    assert clip.tokenizer.sha256 == bpe.sha256 and clip.image_size == 32 and clip.text_len == exp.text_len
    report = json.loads((tmp_path / "run/metrics.json").read_text())
    assert report["candidates"] == 32
    for key in ("t2i_top1", "t2i_top5", "i2t_top1", "t2i_top1_consistent", "t2i_ceiling"):
        assert 0.0 <= report["eval"][f"val/{key}"] <= 1.0
    assert report["eval"]["val/t2i_top1"] <= report["eval"]["val/t2i_top1_consistent"]


def test_config_errors_name_the_problem(tmp_path, bpe):
    with pytest.raises(ValueError, match="not a multiple of model.patch_size=5"):
        tiny_experiment(tmp_path, bpe, **{"model.patch_size": 5})
    with pytest.raises(ValueError, match="width=30 must be divisible by heads=4"):
        tiny_experiment(tmp_path, bpe, **{"model.text.width": 30, "model.text.heads": 4})
    exp = load_config(TINY, CLIPExperiment, [f"text_tokenizer={tmp_path / 'nope'}", f"train.out_dir={tmp_path / 'r'}"])
    with pytest.raises(TextTokenizerError, match="argen train text-tokenizer"):
        train_clip(exp)


# ----------------------------------------------------------------------------------------------- embedding shards

def test_embedding_shard_round_trip_and_wrong_clip(tmp_path, bpe):
    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=0)
    data = ShapesDataset("val", size=12)
    out = encode_embedding_shard(clip, data, tmp_path / "emb", dataset_spec="shapes", split="val", limit=10,
                                 batch_size=4, seed=0, resolution=32)
    shard = EmbeddingShard(out, clip_sha256=clip.sha256)
    assert len(shard) == 10 and shard.dim == 16 and shard.meta["seed"] == 0
    assert shard.keys == [data[i]["key"] for i in range(10)]
    captions = [data[i]["caption"] for i in range(10)]
    assert shard.captions == captions
    torch.testing.assert_close(shard.text_embeds, clip.encode_text(captions).embeds)
    torch.testing.assert_close(shard.image_embeds, clip.encode_images(torch.stack([data[i]["image"] for i in range(10)])))
    assert shard.image_embeds.dtype == torch.float32 and set(shard[3]) == {"caption", "text_embed", "image_embed"}
    other = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=1)
    with pytest.raises(EmbeddingShardError, match="re-encode the shard"):
        EmbeddingShard(out, clip_sha256=other.sha256)
    with pytest.raises(FileExistsError, match="overwrite"):
        encode_embedding_shard(clip, data, out, dataset_spec="shapes", split="val", limit=10)
    np.save(out / "image_embeds.npy", np.zeros((9, 16), np.float32))  # damaged
    with pytest.raises(EmbeddingShardError, match="damaged"):
        EmbeddingShard(out)


def test_embed_cli_writes_a_shard(tmp_path, bpe):
    from argen.cli import main

    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=0)
    clip.save(tmp_path / "clip")
    args = ["embed", "--clip", str(tmp_path / "clip"), "--dataset", "shapes", "--split", "heldout", "--limit", "6",
            "-o", str(tmp_path / "emb")]
    assert main(args) == 0
    shard = EmbeddingShard(tmp_path / "emb", clip_sha256=clip.sha256)
    assert len(shard) == 6 and shard.meta["split"] == "heldout" and shard.meta["resolution"] == 32
    assert main(args) == 2  # exists: refused without --overwrite
    assert main(args + ["--overwrite"]) == 0


def test_the_hash_is_computed_once_and_again_after_the_weights_change(monkeypatch, bpe):
    import argen.unclip.clip as clip_module

    clip = ClipEncoder.build(tiny_config(), bpe, text_len=20, seed=0)
    calls = []
    original = clip_module.ClipEncoder._hash_weights
    monkeypatch.setattr(clip_module.ClipEncoder, "_hash_weights", lambda self: calls.append(1) or original(self))
    first = clip.sha256
    assert clip.sha256 == first and len(calls) == 1
    with torch.no_grad():
        next(clip.model.parameters()).add_(1.0)  # an in-place change bumps the tensor's version
    assert clip.sha256 != first and len(calls) == 2
