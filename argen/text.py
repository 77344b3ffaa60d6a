"""Caption tokenizer: a byte-level BPE (Hugging Face `tokenizers`) trained on captions, saved as tokenizer.json, encoded to a fixed length."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tokenizers_img.serialization import content_hash

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN,)
# Pad tokens of common tokenizer.json files, tried in order when loading one that argen did not train.
PAD_CANDIDATES = (PAD_TOKEN, "[PAD]", "<|pad|>", "<|padding|>", "<|endoftext|>", "</s>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


class TextTokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or unusable (for example, it has no pad token)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_tokenizer_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else `path/tokenizer.json`; raises TextTokenizerError naming what is missing."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"directory {str(path)!r} has no {TOKENIZER_FILE}" if path.is_dir() else f"{str(path)!r} does not exist"
        raise TextTokenizerError(f"text tokenizer not found: {where}. Train one with `argen train text-tokenizer "
                                 f"--dataset shapes -o DIR`, or point at any local {TOKENIZER_FILE}.")
    return file


def tokenizer_file_hash(path: str | Path) -> str:
    """`content_hash` of the tokenizer.json (a file, or a directory holding one): identifies one exact text tokenizer."""
    return content_hash(resolve_tokenizer_file(path))


class TextTokenizer:
    """Captions -> fixed-length id rows. Wraps a `tokenizers.Tokenizer` read from a tokenizer.json.

    The raw file bytes are kept: `save` copies them unchanged, so `sha256` (of those bytes) names the same
    tokenizer before and after a copy. Ids lie in [0, vocab_size); rows are right-padded with `pad_id`.
    """

    def __init__(self, data: bytes, *, pad_token: str | None = None, source: str = "<memory>") -> None:
        from tokenizers import Tokenizer

        self.source = source
        self._bytes = data
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise TextTokenizerError(f"{source} is not a valid Hugging Face tokenizer.json: {err}") from err
        # Padding/truncation settings stored in the file would fight our fixed-length encoding.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_token = self._find_pad(pad_token)
        self.pad_id = int(self.tokenizer.token_to_id(self.pad_token))
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def _find_pad(self, pad_token: str | None) -> str:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        if pad_token is not None:
            if pad_token not in vocab:
                raise TextTokenizerError(f"pad_token={pad_token!r} is not in the vocabulary of {self.source}; "
                                         f"its special tokens are {self._specials()}.")
            return pad_token
        for candidate in PAD_CANDIDATES:
            if candidate in vocab:
                return candidate
        raise TextTokenizerError(f"{self.source} has none of the pad tokens {list(PAD_CANDIDATES)}; its special tokens "
                                 f"are {self._specials()}. Pass pad_token= naming one of its tokens.")

    def _specials(self) -> list[str]:
        return [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]

    @classmethod
    def load(cls, path: str | Path, *, pad_token: str | None = None) -> TextTokenizer:
        """Read a tokenizer.json, or a directory holding one (any local Hugging Face fast tokenizer file)."""
        file = resolve_tokenizer_file(path)
        return cls(file.read_bytes(), pad_token=pad_token, source=str(file))

    @property
    def sha256(self) -> str:
        """SHA-256 of the tokenizer.json bytes: content_hash of the file it is saved as."""
        return _sha256(self._bytes)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer.json bytes unchanged (atomically) to `path`, a directory or a .json file path."""
        from tokenizers_img.serialization import atomic_write_bytes

        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_bytes(file, self._bytes)
        return file

    def tokenize(self, text: str) -> list[int]:
        """All ids of one text, no length limit. Never raises on a str: lone surrogates become '?'."""
        if not isinstance(text, str):
            raise TypeError(f"a caption must be a str, got {type(text).__name__}: {text!r}")
        text = text.encode("utf-8", errors="replace").decode("utf-8")
        return self.tokenizer.encode(text).ids

    def encode(self, texts: str | Sequence[str], *, text_len: int) -> torch.Tensor:
        """Texts -> LongTensor (B, text_len): ids right-padded with `pad_id`; "" (empty) is all PAD (unconditional).

        Texts longer than `text_len` tokens keep their first `text_len` tokens; one warning per call names how
        many were cut, their lengths and `text_len`.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows, lengths = self.encode_ids(texts, text_len=text_len)
        warn_truncated(lengths, text_len=text_len, what="prompt")
        return rows

    def encode_ids(self, texts: Iterable[str], *, text_len: int) -> tuple[torch.Tensor, list[int]]:
        """Like `encode` but silent: returns the padded rows (B, text_len) and each text's untruncated length."""
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}.")
        ids = [self.tokenize(t) for t in texts]
        out = torch.full((len(ids), text_len), self.pad_id, dtype=torch.long)
        for i, row in enumerate(ids):
            row = row[:text_len]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out, [len(row) for row in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """One row of ids back to text, PAD dropped (byte-level BPE: exact up to the normalizer)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        return self.tokenizer.decode([i for i in ids if i != self.pad_id], skip_special_tokens=False).strip()

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, pad={self.pad_token!r} (id {self.pad_id}), source={self.source!r})"


def warn_truncated(lengths: Sequence[int], *, text_len: int, what: str = "prompt") -> None:
    """One warning for all texts longer than `text_len` tokens, naming the count, the lengths and the fix."""
    over = [n for n in lengths if n > text_len]
    if not over:
        return
    shown = ", ".join(str(n) for n in over[:8]) + (", ..." if len(over) > 8 else "")
    warnings.warn(
        f"{len(over)} of {len(lengths)} {what}(s) are longer than text_len={text_len} tokens (lengths {shown}; "
        f"longest {max(over)}) and were truncated to their first {text_len} tokens. A longer text_len needs a "
        "GPT trained with it.", UserWarning, stacklevel=3,
    )


def train_text_tokenizer(captions: Sequence[str], *, vocab_size: int = 512, min_frequency: int = 2,
                         lowercase: bool = False) -> TextTokenizer:
    """Train a byte-level BPE on `captions`; every byte has a token, so no text is ever unknown.

    The normalizer (NFKC, lowercasing only with `lowercase=True`, whitespace runs collapsed and stripped) is saved in
    the file, so a loaded tokenizer normalises as it did when saved (one trained lowercasing keeps lowercasing), and
    `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` encodes exactly the same ids. Case is kept by
    default: "Paris" and "paris" say different things in a caption. `vocab_size` is an upper bound: a small corpus
    (like shapes captions) stops merging earlier.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    if vocab_size < MIN_VOCAB + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: the byte alphabet and specials {SPECIAL_TOKENS} "
                         f"take {MIN_VOCAB}; use at least {MIN_VOCAB + 1} (512 is a good small default).")
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise ValueError("no non-empty captions to train the text tokenizer on.")
    tok = Tokenizer(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
    return TextTokenizer(tok.to_str().encode("utf-8"), pad_token=PAD_TOKEN, source="<trained>")


def dataset_captions(
    spec: str, *, split: str = "train", limit: int | None = None, seed: int = 0, val_fraction: float = 0.05,
    follow_symlinks: bool = False, strict: bool = False, allow_pipe: bool = False,
) -> list[str]:
    """Captions of a dataset without decoding its images where possible.

    spec: `shapes`, `imagefolder:PATH`, `webdataset:PATTERN` (decodes samples), or `codes:DIR` (the captions of
    a code shard written by `argen tokenize`). `limit` caps the count (shapes train is a 1M-scene stream).
    val_fraction, follow_symlinks, strict, allow_pipe: as for `argen.data.registry.build_dataset` (val_fraction
    decides which image-folder files and shards are "val", so it must be the training run's).
    """
    if spec.startswith("codes:"):
        file = Path(spec[len("codes:"):]) / "captions.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: codes:DIR must name a code shard written by `argen tokenize`.")
        with open(file) as fh:
            return [json.loads(line)["text"] for _, line in zip(range(limit if limit is not None else 2**62), fh)]
    from argen.data.registry import parse_spec

    kind, arg = parse_spec(spec)
    if kind == "shapes":
        from argen.data.shapes import SPLIT_SIZES, parse_templates, scene_and_caption

        n = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
        templates = parse_templates(arg)
        return [scene_and_caption(i, split, seed=seed, templates=templates)[1] for i in range(n)]
    if kind == "imagefolder":
        from argen.data.imagefolder import in_split, index_folder

        files = index_folder(arg, follow_symlinks=follow_symlinks, strict=strict).files
        caps = [f.caption for f in files if in_split(f.key, split, val_fraction)]
        return caps[:limit]
    from argen.data.registry import build_dataset

    caps = []
    for item in build_dataset(spec, split=split, resolution=32, val_fraction=val_fraction, allow_pipe=allow_pipe):
        if limit is not None and len(caps) >= limit:
            break
        if item.get("caption"):
            caps.append(item["caption"])
    return caps
