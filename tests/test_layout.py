"""Sequence layout: derived ids and sizes, built sequences, loss weights, and mismatch errors that name both sides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from argen.layout import LayoutMismatchError, SequenceLayout
from tokenizers_img.vq_model import VQConfig

LAYOUT = SequenceLayout(text_vocab_size=10, pad_id=0, text_len=4, num_codes=6, image_grid=(2, 3))


def test_derived_ids_and_sizes():
    L = LAYOUT
    assert (L.boi_id, L.image_offset, L.vocab_size) == (10, 11, 17)
    assert (L.prefix_len, L.num_image_tokens, L.seq_len, L.block_size) == (5, 6, 11, 10)
    assert L.gpt_sizes() == {"vocab_size": 17, "prefix_len": 5, "image_grid": (2, 3)}
    assert L.uncond_prefix().tolist() == [0, 0, 0, 0, 10]


def test_from_vq_and_text_tokenizer():
    tok = SimpleNamespace(vocab_size=300, pad_id=7)
    L = SequenceLayout.from_vq(tok, VQConfig(resolution=32, ch_mult=(1, 2, 2), codebook_size=64), text_len=16)
    assert L.image_grid == (8, 8) and L.num_codes == 64 and L.pad_id == 7 and L.vocab_size == 300 + 1 + 64


def test_build_split_and_weights():
    L = LAYOUT
    text = torch.tensor([[3, 4, 0, 0], [0, 0, 0, 0]])
    codes = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 5, 5, 0, 0, 0]])
    seq = L.build(text, codes)
    assert seq.shape == (2, 11) and seq.dtype == torch.long
    assert seq[0].tolist() == [3, 4, 0, 0, 10, 11, 12, 13, 14, 15, 16]
    assert torch.equal(L.build(text, codes.view(2, 2, 3)), seq)  # (B, h, w) codes too
    assert torch.equal(L.image_codes(seq), codes)
    inputs, targets = L.split(seq)
    assert torch.equal(inputs, seq[:, :-1]) and torch.equal(targets, seq[:, 1:])

    w = L.loss_weights(targets)
    # input position i predicts token i+1: the image targets are positions prefix_len-1 .. end
    assert w[0].tolist() == [0, 0, 0, 0] + [1] * 6
    assert (targets[w > 0] >= L.image_offset).all() and int((w > 0).sum()) == 2 * L.num_image_tokens
    w = L.loss_weights(targets, text_loss_weight=0.1)
    # row 0 targets: 4 (text), PAD, PAD, BOI, codes...; PAD targets weigh nothing
    assert w[0].tolist() == pytest.approx([0.1, 0, 0, 0.1] + [1] * 6)
    assert w[1].tolist() == pytest.approx([0, 0, 0, 0.1] + [1] * 6)


def test_bad_inputs_say_what_is_wrong():
    L = LAYOUT
    text = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(LayoutMismatchError, match=r"outside \[0, 6\)"):
        L.build(text, torch.tensor([[0, 1, 2, 3, 4, 6]]))
    with pytest.raises(LayoutMismatchError, match=r"expects \(B, 6\)"):
        L.build(text, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LayoutMismatchError, match=r"expects \(B, 4\) \(text_len\)"):
        L.build(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(LayoutMismatchError, match=r"text vocabulary \[0, 10\)"):
        L.prefix(torch.tensor([[1, 2, 3, 10]]))
    with pytest.raises(ValueError, match="pad_id=12"):
        SequenceLayout(text_vocab_size=10, pad_id=12, text_len=4, num_codes=6, image_grid=(2, 3))


@pytest.mark.parametrize("field,value,expect", [
    ("vocab_size", 18, "vocab_size: gpt/ has 18, tok.json \\+ vq/ give 17"),
    ("prefix_len", 9, "prefix_len: gpt/ has 9, tok.json \\+ vq/ give 5"),
    ("image_grid", (3, 2), "image_grid: gpt/ has \\(3, 2\\), tok.json \\+ vq/ give \\(2, 3\\)"),
])
def test_check_names_both_sides(field, value, expect):
    ok = SimpleNamespace(vocab_size=17, prefix_len=5, image_grid=[2, 3])
    LAYOUT.check(ok)
    bad = SimpleNamespace(**{**vars(ok), field: value})
    with pytest.raises(LayoutMismatchError, match=expect):
        LAYOUT.check(bad, names=("gpt/", "tok.json + vq/"))
