"""ClipEncoder: a `transformers.CLIPModel` with its text tokenizer, saved as one directory, that turns captions and
images into the embeddings every unCLIP part conditions on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from argen.model.attention import use_argen_attention
from argen.model.onednn import use_onednn_linears
from argen.saved import SavedDirError, trained_with
from argen.text import TOKENIZER_FILE, TextTokenizer
from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir

CLIP_FILE = "clip.json"  # our directories: {"format", "text_len", "image_mean", "image_std"} beside model/ and tokenizer.json
MODEL_DIR = "model"
FORMAT = "argen-clip"
# OpenAI CLIP's pixel statistics: the default for a pretrained directory without preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipError(SavedDirError):
    """A CLIP directory is incomplete or not a CLIP, or its parts disagree."""


class ClipMismatchError(SavedDirError):
    """A decoder or prior is used with a CLIP other than the one it was trained with."""


def trained_with_clip(part_dir: str | Path, *, made_by: str, clip: ClipEncoder | None = None) -> dict[str, Any]:
    """The training record of a saved decoder or prior (its CLIP's sha256, path, data ...); with `clip`, checked to
    be that CLIP (ClipMismatchError naming both otherwise)."""
    record = trained_with(part_dir, needs=("clip_sha256",), made_by=made_by, error=ClipMismatchError)
    if clip is not None and record["clip_sha256"] != clip.sha256:
        raise ClipMismatchError(f"{str(part_dir)!r} was trained with CLIP {record['clip_sha256'][:12]} "
                                f"({record.get('clip_path', '?')}), but the CLIP given is {clip.sha256[:12]} ({clip.source}); "
                                "use its own CLIP or retrain it.")
    return record


@dataclass
class TextEncoding:
    """What CLIP says about a batch of captions.

    embeds: (B, D) float32, the projected pooled text embedding (not normalised).
    states: (B, L, H) float32, the final-layer-normed token states (L = text_len, H = text hidden width).
    mask:   (B, L) bool, True on the caption's tokens and on the pooled (end) position, False on the padding after.
    """

    embeds: Tensor
    states: Tensor
    mask: Tensor


class ClipEncoder:
    """A CLIP model and the tokenizer its text tower reads, in eval mode, for conditioning and judging.

    Two kinds of directory load:
    - ours (`save`): model/ (CLIPModel.save_pretrained), tokenizer.json (our byte-level BPE) and clip.json. The BPE
      has no end token, so a caption is cut to text_len - 1 tokens and the first PAD after it is the pooled position
      (`text_config.eos_token_id = pad_id`);
    - a local pretrained Hugging Face CLIP (config.json of model_type "clip" + weights + its tokenizer files), read
      with its own tokenizer and pixel statistics (preprocessor_config.json, else OpenAI's).

    Images go in as the datasets give them: (B, 3, H, W) float in [-1, 1]; they are resized (bicubic, antialiased)
    to the vision tower's size and normalised by the CLIP's pixel mean and std here.

    The model's `nn.Linear` layers are swapped in place for `argen.model.onednn.Linear` (same parameters) so CPU fp32
    GEMMs run on oneDNN, and its attention runs through `argen.model.attention.attention` (`use_argen_attention`).
    """

    def __init__(self, model, tokenizer, *, text_len: int, image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 image_std: tuple[float, ...] = (0.5, 0.5, 0.5), source: str = "<memory>") -> None:
        use_onednn_linears(model)  # in place, same parameters: CPU fp32 GEMMs on oneDNN (a no-op elsewhere)
        use_argen_attention(model)  # argen's attention rule (math for short bf16 sequences on the CPU, else sdpa)
        self.model = model.eval()
        self.tokenizer = tokenizer  # argen.text.TextTokenizer (ours) or a transformers tokenizer (pretrained)
        self.text_len = int(text_len)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.source = source
        if isinstance(tokenizer, TextTokenizer):
            eos = model.config.text_config.eos_token_id
            if eos != tokenizer.pad_id:
                raise ClipError(f"{source}: text_config.eos_token_id={eos} but the BPE's pad id is {tokenizer.pad_id}; "
                                "the pooled position of our captions is their first PAD, so the two must be equal.")
            if eos == 2:  # transformers keeps a legacy argmax pooling for eos_token_id == 2
                raise ClipError(f"{source}: a BPE whose pad id is 2 cannot be pooled by CLIPTextModel (legacy argmax "
                                "pooling); train the BPE with argen.text (PAD is id 0).")
        max_len = model.config.text_config.max_position_embeddings
        if not 2 <= self.text_len <= max_len:
            raise ClipError(f"{source}: text_len={self.text_len} must be in [2, max_position_embeddings={max_len}].")

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, config, tokenizer: TextTokenizer, *, text_len: int, seed: int = 0) -> ClipEncoder:
        """A freshly initialised CLIPModel from a `transformers.CLIPConfig` (its text vocab and eos/pad ids are set
        from the BPE here), seeded for reproducible initialisation."""
        from transformers import CLIPModel

        config.text_config.vocab_size = tokenizer.vocab_size
        config.text_config.pad_token_id = config.text_config.eos_token_id = tokenizer.pad_id
        config.text_config.bos_token_id = tokenizer.pad_id
        config.text_config.max_position_embeddings = max(config.text_config.max_position_embeddings, text_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        return cls(model, tokenizer, text_len=text_len)

    def save(self, path: str | Path) -> Path:
        """Write an argen CLIP directory atomically (only for a CLIP whose tokenizer is our BPE)."""
        if not isinstance(self.tokenizer, TextTokenizer):
            raise ClipError(f"{self.source} is a pretrained Hugging Face CLIP: point at its directory instead of saving a copy.")

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
            self.tokenizer.save(tmp / TOKENIZER_FILE)
            meta = {"format": FORMAT, "text_len": self.text_len, "image_mean": list(self.image_mean),
                    "image_std": list(self.image_std)}
            atomic_write_bytes(tmp / CLIP_FILE, json.dumps(meta, indent=2).encode())

        return atomic_write_dir(path, write)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> ClipEncoder:
        """Load an argen CLIP directory, or a local pretrained Hugging Face CLIP directory."""
        from transformers import CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP directory {path} not found.")
        if (path / CLIP_FILE).is_file():
            meta = json.loads((path / CLIP_FILE).read_text())
            if meta.get("format") != FORMAT:
                raise ClipError(f"{path / CLIP_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}.")
            model = CLIPModel.from_pretrained(path / MODEL_DIR).to(device)
            tokenizer = TextTokenizer.load(path / TOKENIZER_FILE)
            return cls(model, tokenizer, text_len=meta["text_len"], image_mean=meta["image_mean"],
                       image_std=meta["image_std"], source=str(path))
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ClipError(f"{path} holds neither {CLIP_FILE} (an argen CLIP) nor config.json (a Hugging Face CLIP).")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "clip":
            raise ClipError(f"{config_file} has model_type={model_type!r}; a CLIP directory needs model_type 'clip'.")
        from transformers import AutoTokenizer

        model = CLIPModel.from_pretrained(path).to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ClipError(f"{path}: the CLIP's tokenizer files (tokenizer.json or vocab.json + merges.txt) could not "
                            f"be read: {err}") from err
        mean, std = OPENAI_MEAN, OPENAI_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            stats = json.loads(pre.read_text())
            mean, std = stats.get("image_mean", mean), stats.get("image_std", std)
        return cls(model, tokenizer, text_len=model.config.text_config.max_position_embeddings, image_mean=mean,
                   image_std=std, source=str(path))

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sha256(self) -> str:
        """Identifies the exact CLIP: its weights (names, shapes and bytes) and its tokenizer. The config is left out:
        a reloaded config gains bookkeeping keys (dtype, architectures) that do not change the model. Hashed once and
        again only after a weight changed (each tensor's in-place version counter is part of the cache key)."""
        key = tuple((id(t), t._version) for t in self.model.state_dict(keep_vars=True).values())
        cached = getattr(self, "_sha256_cache", None)
        if cached is None or cached[0] != key:
            self._sha256_cache = (key, self._hash_weights())
        return self._sha256_cache[1]

    def _hash_weights(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if isinstance(self.tokenizer, TextTokenizer):
            digest.update(self.tokenizer.sha256.encode())
        else:
            digest.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (ids (B, text_len) long, mask (B, text_len) bool), on the model's device. See TextEncoding.mask."""
        if isinstance(self.tokenizer, TextTokenizer):
            ids = self.tokenizer.encode(list(captions), text_len=self.text_len - 1)
            ids = F.pad(ids, (0, 1), value=self.tokenizer.pad_id)  # (B, text_len): at least one PAD, the pooled one
            real = ids != self.tokenizer.pad_id
            first_pad = (~real).int().argmax(dim=1)
            mask = real | (torch.arange(self.text_len)[None] == first_pad[:, None])
        else:
            enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.text_len,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        return ids.to(self.device), mask.to(self.device)

    def text_forward(self, ids: Tensor, mask: Tensor) -> TextEncoding:
        """Token ids from `tokenize` -> TextEncoding, with autograd (for training)."""
        out = self.model.get_text_features(input_ids=ids, attention_mask=None if isinstance(self.tokenizer, TextTokenizer) else mask.long())
        return TextEncoding(embeds=out.pooler_output, states=out.last_hidden_state, mask=mask)

    def pixel_values(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> the vision tower's normalised input (B, 3, S, S)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}.")
        x = (images.float().to(self.device) + 1) / 2
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) projected image embedding (not normalised), with autograd."""
        return self.model.get_image_features(pixel_values=self.pixel_values(images)).pooler_output

    @torch.no_grad()
    def encode_text(self, captions: list[str], *, batch_size: int = 256) -> TextEncoding:
        """Captions -> TextEncoding (no grad), in batches."""
        parts = [self.text_forward(*self.tokenize(captions[i:i + batch_size])) for i in range(0, len(captions), batch_size)]
        if not parts:
            raise ValueError("encode_text needs at least one caption.")
        return TextEncoding(embeds=torch.cat([p.embeds for p in parts]), states=torch.cat([p.states for p in parts]),
                            mask=torch.cat([p.mask for p in parts]))

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, batch_size: int = 256) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) float32 image embeddings (no grad), in batches."""
        return torch.cat([self.image_forward(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
