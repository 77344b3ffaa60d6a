"""Image files to model tensors: robust decoding, shorter-side resize, centre crop, (3, R, R) float in [-1, 1]."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Transparent pixels are composited onto white, the usual convention for icons and cut-outs.
_BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """A file is missing, is not an image, or is corrupt or truncated. `.name` is the file, `.reason` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.name, self.reason))


def load_image(source: str | Path | bytes | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Decode an image file (path, bytes or file object) fully into an RGB PIL image.

    EXIF orientation is applied; alpha (RGBA, LA, palette transparency) is composited onto white;
    greyscale, palette, CMYK and 16-bit images become 8-bit RGB. Any failure raises ImageDecodeError
    naming the file, so callers can skip it rather than crash.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC chunks; decoding errors still raise
            with Image.open(source) as img:
                img.load()  # force the full decode here: truncated files fail now, not later
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except FileNotFoundError as err:
        raise ImageDecodeError(label, "file not found") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(label, f"image too large ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's ways of saying "corrupt / not an image"
        raise ImageDecodeError(label, f"cannot decode image ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (bicubic, antialiased), then centre-crop to a square."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image (H, W) -> FloatTensor (3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3) uint8
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """FloatTensor (3, H, W) in [-1, 1] -> RGB PIL image; values outside the range are clipped."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB")


def load_image_tensor(source: str | Path | bytes | BinaryIO, resolution: int, *, name: str | None = None) -> torch.Tensor:
    """Decode, resize + centre-crop and convert: FloatTensor (3, resolution, resolution) in [-1, 1]."""
    return pil_to_tensor(resize_center_crop(load_image(source, name=name), resolution))
