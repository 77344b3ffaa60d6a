"""Image grids: captioned contact sheets written as PNG (atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from tokenizers_img.serialization import PNG_MARK, atomic_write_bytes, check_replaceable, claim_output_dir

CAPTION_LINES = 4  # captions are wrapped to this many lines under each image, then cut with "..."
MIN_CELL = 128  # images are upscaled (nearest) by an integer factor to at least this many pixels


def sheet_layout(n: int, image_size: int, *, columns: int | None = None) -> tuple[int, int, int, int, int]:
    """(cols, rows, cell_w, cell_h, scale) of the contact sheet for n images of side image_size (square by default)."""
    if n <= 0:
        raise ValueError(f"need at least one image, got n={n}")
    scale = max(1, math.ceil(MIN_CELL / image_size))
    side = image_size * scale
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    line_h = _line_height(_font())
    return cols, rows, side + 8, side + 8 + CAPTION_LINES * line_h + 4, scale


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow's bundled font; nothing is downloaded
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Agy|")
    return bottom - min(top, 0) + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to pixel `width`, at most CAPTION_LINES lines; overflow ends in '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        elif len(lines) == CAPTION_LINES:  # one line too many is enough to know the caption is cut
            lines.append(word)
            break
        else:
            lines.append(_cut(word, font, width) if font.getlength(word) > width else word)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = _cut(lines[-1], font, width, force=True)
    return lines or [""]


def _cut(line: str, font, width: int, *, force: bool = False) -> str:
    """Trim `line` so that it plus '...' fits `width`; unless `force`, a line that already fits is kept."""
    if not force and font.getlength(line) <= width:
        return line
    lo, hi = 0, len(line)  # binary search for the longest prefix that fits with "..." (not one character at a time)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(line[:mid] + "...") <= width:
            lo = mid
        else:
            hi = mid - 1
    return line[:lo].rstrip() + "..."


def contact_sheet(images: Sequence[torch.Tensor | Image.Image], captions: Sequence[str], *,
                  columns: int | None = None) -> Image.Image:
    """A grid of images (each (3, R, R) in [-1, 1] or PIL, all the same size) with each caption wrapped under it."""
    from argen.data.transforms import tensor_to_pil

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    pils = [im if isinstance(im, Image.Image) else tensor_to_pil(im) for im in images]
    size = pils[0].size[0]
    cols, rows, cell_w, cell_h, scale = sheet_layout(len(pils), size, columns=columns)
    font = _font()
    line_h = _line_height(font)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, cap) in enumerate(zip(pils, captions)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        sheet.paste(im.convert("RGB").resize((size * scale, size * scale), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(_wrap(cap, font, cell_w - 8)):
            draw.text((x, y + size * scale + 4 + k * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def reconstruction_sheet(vq, images: torch.Tensor, captions: Sequence[str]) -> tuple[Image.Image, torch.Tensor]:
    """Each original beside its VQ reconstruction with its PSNR, 4 pairs a row (fewer when there are fewer).

    vq: a `tokenizers_img.VQModel`; images (B, 3, R, R) in [-1, 1] on its device. Returns the sheet and the
    per-image PSNR (B,) in dB."""
    from tokenizers_img.metrics import psnr

    recon = vq.reconstruct(images)
    scores = psnr(images, recon)
    tiles, labels = [], []
    for i in range(len(images)):
        tiles += [images[i], recon[i]]
        labels += [captions[i], f"reconstruction, {scores[i]:.1f} dB"]
    return contact_sheet(tiles, labels, columns=min(8, 2 * len(images))), scores


def save_png(img: Image.Image, path: Path) -> None:
    """Write `img` as a PNG carrying argen's mark (a text chunk); a file at `path` that argen did not write is refused."""
    check_replaceable(path)
    info = PngInfo()
    info.add_text(*PNG_MARK)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def save_image_folder(folder: Path, images: Sequence[torch.Tensor], captions: Sequence[str],
                      names: Sequence[str]) -> list[Path]:
    """Write images ((3, H, W) in [-1, 1]) as folder/name PNGs plus a metadata.jsonl ({"file_name", "text"}, the
    image-folder caption format that `argen data judge` scores); empty captions get no metadata line."""
    import json

    from argen.data.transforms import tensor_to_pil

    claim_output_dir(folder, kind="images")
    files, lines = [], []
    for image, caption, name in zip(images, captions, names, strict=True):
        save_png(tensor_to_pil(image), folder / name)
        files.append(folder / name)
        if caption.strip():
            lines.append(json.dumps({"file_name": name, "text": caption}))
    atomic_write_bytes(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
    return files
