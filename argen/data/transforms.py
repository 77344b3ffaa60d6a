"""Image files to model tensors: bounded decoding, shorter-side resize, centre crop, (3, R, R) float in [-1, 1]."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from argen.data.skips import printable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The decoders tried, whatever the file is called (JPEG includes Pillow's MPO, a camera JPEG with extra pictures).
# Anything else, e.g. EPS (which Pillow hands to Ghostscript), is "cannot decode image".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

# Limits checked from the header, before any pixel is decoded, so memory per image is bounded by
# MAX_PIXELS (3 bytes each in RGB, a few copies while converting). 2**26 = 8192 x 8192 is below Pillow's own
# decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89.5 M), which is escalated from a warning to a refusal too.
MAX_PIXELS = 2**26
# Longer side over shorter side. A centre crop of a 20:1 strip already drops 95% of it; past that the
# square crop is not the picture (and a 40000x1 strip is what a hostile file looks like).
MAX_ASPECT = 20

# Transparent pixels are composited onto white, the usual convention for icons and cut-outs.
_BACKGROUND = (255, 255, 255)
# How Pillow says "corrupt, truncated or not an image", from Image.open, load and the format plugins.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                  struct.error, MemoryError, RecursionError)


class ImageDecodeError(ValueError):
    """A file is missing, is not an image, is corrupt or truncated, or is over a size limit. `.name` is the file, `.reason` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{printable(name)}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.name, self.reason))


def check_image_size(size: tuple[int, int], *, name: str) -> None:
    """Refuse (ImageDecodeError) an image size over MAX_PIXELS or more elongated than MAX_ASPECT:1."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(name, f"image is {w}x{h} pixels, empty")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(
            name, f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {MAX_PIXELS / 1e6:.1f} megapixels "
            "(MAX_PIXELS); refused before decoding (a decompression bomb, or too large to train on)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        ratio = f"{max(w, h) / min(w, h):.1f}".removesuffix(".0")
        raise ImageDecodeError(name, f"image is {w}x{h} pixels, aspect ratio {ratio}:1 is over the limit of {MAX_ASPECT}:1 (MAX_ASPECT)")


def load_image(source: str | Path | bytes | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Decode an image file (path, bytes or file object) fully into an RGB PIL image at its own size.

    The size in the header is checked first (check_image_size), so a decompression bomb or a 40000x1 strip is
    refused before its pixels are decoded. EXIF orientation is applied; alpha (RGBA, LA, palette transparency)
    is composited onto white; greyscale, palette, CMYK and 16-bit images become 8-bit RGB; an animated image
    gives its first frame. Any failure raises ImageDecodeError naming the file, so callers can skip it.
    """
    return _decode(source, name=name, min_side=None)


def _decode(source: str | Path | bytes | BinaryIO, *, name: str | None, min_side: int | None) -> Image.Image:
    """load_image; with `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
    as long as its shorter side stays at least `min_side`."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC chunks; decoding errors still raise
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # ...but a bomb is refused, not loaded
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                check_image_size(img.size, name=label)
                if min_side is not None:
                    img.draft(None, (min_side, min_side))  # a no-op for formats other than JPEG
                img.load()  # force the full decode here: truncated files fail now, not later
                ImageOps.exif_transpose(img, in_place=True)  # in place: one copy of the pixels fewer at peak
                return _to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError as err:
        raise ImageDecodeError(label, "file not found") from err
    except Image.UnidentifiedImageError as err:  # its message names a file object, not the file
        raise ImageDecodeError(label, f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(label, f"image too large, a possible decompression bomb ({err})") from err
    except _DECODE_ERRORS as err:
        raise ImageDecodeError(label, f"cannot decode image ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        # round(a * 255 / 65535) = (2a + 257) // 514 in place in uint32: the values float64 gave, at half the memory
        a = np.asarray(img).astype(np.uint32)
        a *= 2
        a += 257
        a //= 514
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
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
    """Resize so the shorter side is `resolution` (bicubic, antialiased), then centre-crop to a square.

    Memory stays within max(the image, 4 x resolution**2) pixels: a strip (aspect over 4:1) that would be
    enlarged is not resized whole; only its crop window is resampled (Pillow's `box`), which gives nearly the
    same pixels (Pillow may run the two 1-D passes in the other order) without the resolution**2 x aspect intermediate.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    if new_w * new_h > max(w * h, 4 * resolution**2):
        sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        return img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
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
    """Decode, resize + centre-crop and convert: FloatTensor (3, resolution, resolution) in [-1, 1].

    A JPEG whose shorter side is at least 6 x resolution is decoded at 1/2, 1/4 or 1/8 scale (never below
    3 x resolution, where the resize's own reducing_gap would take over): faster and smaller, nearly the same pixels.
    """
    img = _decode(source, name=name, min_side=3 * resolution)
    return pil_to_tensor(resize_center_crop(img, resolution))
