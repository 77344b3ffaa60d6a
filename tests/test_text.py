"""Text tokenizer: BPE round trip, fixed-length encoding, one truncation warning, hostile inputs, HF interop."""

from __future__ import annotations

import warnings

import pytest
import torch

from argen.text import (
    PAD_TOKEN,
    TextTokenizer,
    TextTokenizerError,
    dataset_captions,
    tokenizer_file_hash,
    train_text_tokenizer,
)

CAPTIONS = dataset_captions("shapes", limit=2000)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_text_tokenizer(CAPTIONS, vocab_size=512)


def test_round_trip_and_shapes_words_are_single_tokens(tok):
    assert 256 < tok.vocab_size <= 512 and tok.pad_token == PAD_TOKEN
    for caption in CAPTIONS[:50]:
        assert tok.decode(tok.tokenize(caption)) == caption
    # the normalizer collapses whitespace, so a user's spacing maps to the training ids
    assert tok.tokenize("  a red   circle ") == tok.tokenize("a red circle")
    assert len(tok.tokenize("a red circle")) == 3


def test_case_is_kept_unless_asked_and_a_saved_lowercasing_tokenizer_still_lowercases(tok, tmp_path):
    assert tok.tokenize("A Red circle") != tok.tokenize("a red circle")
    assert tok.decode(tok.tokenize("A Red circle")) == "A Red circle"
    lower = train_text_tokenizer(CAPTIONS, vocab_size=512, lowercase=True)
    assert lower.tokenize("  A RED   circle ") == lower.tokenize("a red circle")
    loaded = TextTokenizer.load(lower.save(tmp_path / "lower"))  # a file written lowercasing (as before case was kept)
    assert loaded.sha256 == lower.sha256 and loaded.tokenize("A RED circle") == lower.tokenize("a red circle")


def test_fixed_length_encoding_pads_and_empty_is_unconditional(tok):
    rows = tok.encode(["a red circle", ""], text_len=8)
    assert rows.shape == (2, 8) and rows.dtype == torch.long
    assert rows[0, :3].tolist() == tok.tokenize("a red circle") and (rows[0, 3:] == tok.pad_id).all()
    assert (rows[1] == tok.pad_id).all()
    assert (tok.encode("   \n\t ", text_len=4) == tok.pad_id).all()


def test_overlong_prompts_are_truncated_with_one_warning(tok):
    prompts = ["a red circle " * 10, "a blue square", "two green triangles " * 5]
    with pytest.warns(UserWarning) as record:
        rows = tok.encode(prompts, text_len=6)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "2 of 3 prompt(s)" in msg and "text_len=6" in msg and "lengths 30, 15" in msg
    assert rows[0].tolist() == tok.tokenize(prompts[0])[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a blue square"], text_len=6)  # nothing cut, nothing said


@pytest.mark.parametrize("text", ["", "😀🎨 a red 圆", "\x00\x01\x1b[31m\x7f", "\ud800 lone surrogate", "é" * 5000,
                                  "word " * 20000, "\u200b\u200d\ufeff", "a\r\nb\tc"])
def test_no_text_crashes_it(tok, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = tok.encode(text, text_len=16)
    assert rows.shape == (1, 16) and 0 <= int(rows.min()) and int(rows.max()) < tok.vocab_size


def test_non_text_is_a_clear_error(tok):
    with pytest.raises(TypeError, match="must be a str, got NoneType"):
        tok.encode([None], text_len=4)  # type: ignore[list-item]


def test_save_load_keeps_the_bytes_and_transformers_loads_it(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    file = tok.save(tmp_path)
    loaded = TextTokenizer.load(tmp_path)  # a directory holding tokenizer.json
    assert loaded.sha256 == tok.sha256 == tokenizer_file_hash(file)
    assert TextTokenizer.load(file).vocab_size == tok.vocab_size
    hf = PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token=PAD_TOKEN)
    text = "A small Green triangle above a yellow circle 😀"
    assert hf(text)["input_ids"] == tok.tokenize(text)
    ours = tok.encode([text, "a red square"], text_len=24)
    theirs = hf([text, "a red square"], padding="max_length", max_length=24, truncation=True)["input_ids"]
    assert ours.tolist() == theirs and hf.pad_token_id == tok.pad_id


def test_any_local_tokenizer_json_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "red": 2, "circle": 3}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "word.json"))
    tok = TextTokenizer.load(tmp_path / "word.json")
    assert tok.pad_token == "[PAD]" and tok.encode("red circle blue", text_len=4).tolist() == [[2, 3, 0, 1]]
    nopad = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1}, unk_token="[UNK]"))
    nopad.save(str(tmp_path / "nopad.json"))
    with pytest.raises(TextTokenizerError, match="Pass pad_token="):
        TextTokenizer.load(tmp_path / "nopad.json")
    assert TextTokenizer.load(tmp_path / "nopad.json", pad_token="[UNK]").pad_id == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextTokenizerError, match="has no tokenizer.json"):
        TextTokenizer.load(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TextTokenizerError, match="not a valid Hugging Face tokenizer.json"):
        TextTokenizer.load(tmp_path / "bad.json")


def test_vocab_size_too_small_is_an_error():
    with pytest.raises(ValueError, match="use at least 258"):
        train_text_tokenizer(CAPTIONS[:10], vocab_size=100)


def test_train_text_tokenizer_cli(tmp_path, capsys):
    from argen.cli import main

    assert main(["train", "text-tokenizer", "--dataset", "shapes", "--limit", "300", "--vocab-size", "400",
                 "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "trained on 300 captions of shapes" in printed and "caption length in tokens" in printed
    tok = TextTokenizer.load(tmp_path)
    assert tok.vocab_size <= 400 and tok.pad_token == PAD_TOKEN
