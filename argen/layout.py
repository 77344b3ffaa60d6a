"""The joint vocabulary and sequence layout [text ids | BOI | image codes + offset], its loss weights and its checks against a GPT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor


class LayoutMismatchError(ValueError):
    """A GPT config, a code shard or a tokenizer disagrees with the sequence layout."""


class TrainingPair(NamedTuple):
    """A built sequence cut for next-token prediction: inputs = seq[:, :-1], targets = seq[:, 1:] (both (B, seq_len - 1))."""

    inputs: Tensor
    targets: Tensor


@dataclass(frozen=True)
class SequenceLayout:
    """Where each token of a training sequence lives; every size is derived from the four given ones.

        [ text ids, right-padded with PAD to text_len | BOI | image codes + image_offset ]   (seq_len tokens)

    Text ids are the text tokenizer's own (its PAD included), in [0, text_vocab_size). BOI = text_vocab_size.
    Image code c (in [0, num_codes)) is token image_offset + c. The unconditional (CFG) prefix is the empty
    caption: text_len PADs, then BOI.
    """

    text_vocab_size: int
    pad_id: int
    text_len: int
    num_codes: int
    image_grid: tuple[int, int]  # (h, w) of the code grid, row-major in the sequence

    def __post_init__(self) -> None:
        if self.text_vocab_size < 1 or self.num_codes < 1 or self.text_len < 1:
            raise ValueError(f"text_vocab_size ({self.text_vocab_size}), num_codes ({self.num_codes}) and text_len "
                             f"({self.text_len}) must be >= 1.")
        if not 0 <= self.pad_id < self.text_vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside the text vocabulary [0, {self.text_vocab_size}).")
        if len(self.image_grid) != 2 or min(self.image_grid) < 1:
            raise ValueError(f"image_grid must be (h, w) with h, w >= 1, got {self.image_grid}.")
        object.__setattr__(self, "image_grid", (int(self.image_grid[0]), int(self.image_grid[1])))

    @classmethod
    def from_parts(cls, text_tokenizer: Any, *, text_len: int, num_codes: int, image_grid: tuple[int, int]) -> SequenceLayout:
        """From an `argen.text.TextTokenizer` and the image tokenizer's codebook size and grid."""
        return cls(text_vocab_size=text_tokenizer.vocab_size, pad_id=text_tokenizer.pad_id, text_len=text_len,
                   num_codes=num_codes, image_grid=tuple(image_grid))

    @classmethod
    def from_vq(cls, text_tokenizer: Any, vq_config: Any, *, text_len: int) -> SequenceLayout:
        """From an `argen.text.TextTokenizer` and a `tokenizers_img.VQConfig` (square grid of `grid_size`)."""
        g = vq_config.grid_size
        return cls.from_parts(text_tokenizer, text_len=text_len, num_codes=vq_config.num_codes, image_grid=(g, g))

    # ------------------------------------------------------------------------------------------- derived sizes
    @property
    def boi_id(self) -> int:
        return self.text_vocab_size

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size + 1

    @property
    def vocab_size(self) -> int:
        return self.image_offset + self.num_codes

    @property
    def prefix_len(self) -> int:
        return self.text_len + 1

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_image_tokens

    @property
    def block_size(self) -> int:
        """The longest model input, seq_len - 1 (the last image token is only ever a target)."""
        return self.seq_len - 1

    def summary(self) -> dict[str, Any]:
        """Given and derived sizes, for pipeline.json and logs."""
        return {"text_vocab_size": self.text_vocab_size, "pad_id": self.pad_id, "text_len": self.text_len,
                "num_codes": self.num_codes, "image_grid": list(self.image_grid), "boi_id": self.boi_id,
                "image_offset": self.image_offset, "vocab_size": self.vocab_size, "prefix_len": self.prefix_len,
                "seq_len": self.seq_len}

    # ------------------------------------------------------------------------------------------- sequences
    def prefix(self, text_ids: Tensor, *, check: bool = True) -> Tensor:
        """Text ids (B, text_len) -> prefix (B, prefix_len): the text, then BOI. `check` validates the id range."""
        self._check_text(text_ids, values=check)
        boi = torch.full((text_ids.shape[0], 1), self.boi_id, dtype=torch.long, device=text_ids.device)
        return torch.cat([text_ids.long(), boi], dim=1)

    def uncond_prefix(self, *, device: torch.device | str = "cpu") -> Tensor:
        """The CFG unconditional prefix (prefix_len,): the empty caption (all PAD), then BOI."""
        out = torch.full((self.prefix_len,), self.pad_id, dtype=torch.long, device=device)
        out[-1] = self.boi_id
        return out

    def build(self, text_ids: Tensor, codes: Tensor, *, check: bool = True) -> Tensor:
        """Text ids (B, text_len) and codes (B, h*w) or (B, h, w) in [0, num_codes) -> sequences (B, seq_len) int64.

        `check=False` skips the id-range checks (a device sync each) for data validated once up front.
        """
        codes = codes.reshape(codes.shape[0], -1) if codes.ndim == 3 else codes
        if codes.ndim != 2 or codes.shape[1] != self.num_image_tokens:
            raise LayoutMismatchError(f"codes have shape {tuple(codes.shape)}, but the layout expects (B, {self.num_image_tokens}) "
                                      f"= (B, h*w) for image_grid {self.image_grid}.")
        if codes.shape[0] != text_ids.shape[0]:
            raise ValueError(f"batch sizes differ: text ids {tuple(text_ids.shape)}, codes {tuple(codes.shape)}.")
        if check and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise LayoutMismatchError(f"codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {self.num_codes}) "
                                      "(num_codes of the layout): the codes come from a different image tokenizer.")
        return torch.cat([self.prefix(text_ids, check=check), codes.long() + self.image_offset], dim=1)

    def split(self, seq: Tensor) -> TrainingPair:
        """Sequences (B, seq_len) -> inputs and targets (B, seq_len - 1) for next-token prediction."""
        if seq.ndim != 2 or seq.shape[1] != self.seq_len:
            raise ValueError(f"sequences must be (B, {self.seq_len}), got {tuple(seq.shape)}.")
        return TrainingPair(seq[:, :-1], seq[:, 1:])

    def image_codes(self, seq_or_tokens: Tensor) -> Tensor:
        """The image codes (B, h*w) in [0, num_codes) of full sequences (B, seq_len)."""
        return seq_or_tokens[:, self.prefix_len:] - self.image_offset

    def loss_weights(self, targets: Tensor, *, text_loss_weight: float = 0.0) -> Tensor:
        """Per-target weights (B, seq_len - 1) float: image targets 1, text targets (BOI included)
        `text_loss_weight`, PAD targets 0.

        Input position i predicts sequence token i + 1, so image targets are input positions >= prefix_len - 1.
        """
        if targets.shape[-1] != self.seq_len - 1:
            raise ValueError(f"targets must be (B, {self.seq_len - 1}), got {tuple(targets.shape)}.")
        weights = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        weights[:, self.prefix_len - 1:] = 1.0
        if text_loss_weight:
            text = weights[:, : self.prefix_len - 1]
            text[targets[:, : self.prefix_len - 1] != self.pad_id] = float(text_loss_weight)
        return weights

    def _check_text(self, text_ids: Tensor, *, values: bool = True) -> None:
        if text_ids.ndim != 2 or text_ids.shape[1] != self.text_len:
            raise LayoutMismatchError(f"text ids have shape {tuple(text_ids.shape)}, but the layout expects (B, {self.text_len}) "
                                      "(text_len): encode captions with the same text_len.")
        if values and text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= self.text_vocab_size):
            raise LayoutMismatchError(f"text ids span [{int(text_ids.min())}, {int(text_ids.max())}], outside the text "
                                      f"vocabulary [0, {self.text_vocab_size}): they come from a different text tokenizer.")

    # ------------------------------------------------------------------------------------------- checks
    def gpt_sizes(self) -> dict[str, Any]:
        """The GPTConfig fields the layout derives: vocab_size, prefix_len, image_grid."""
        return {"vocab_size": self.vocab_size, "prefix_len": self.prefix_len, "image_grid": self.image_grid}

    def check(self, gpt_config: Any, *, names: tuple[str, str] = ("GPT config", "tokenizers")) -> None:
        """Raise LayoutMismatchError naming both sides if the GPT config's vocab_size, prefix_len or image_grid
        differ from this layout's. `names` label the two sides (for example the GPT and tokenizer paths)."""
        bad = []
        for key, want in self.gpt_sizes().items():
            have = getattr(gpt_config, key)
            have = tuple(have) if key == "image_grid" else have
            if have != want:
                bad.append(f"{key}: {names[0]} has {have}, {names[1]} give {want}")
        if bad:
            raise LayoutMismatchError(
                f"{names[0]} does not fit {names[1]}: " + "; ".join(bad) + ". The layout comes from text tokenizer vocab "
                f"{self.text_vocab_size} + BOI + {self.num_codes} image codes = vocab_size {self.vocab_size}, text_len "
                f"{self.text_len} + BOI = prefix_len {self.prefix_len}, image grid {self.image_grid}. Use the GPT trained "
                "with these tokenizers (and text_len), or retrain it with them."
            )
