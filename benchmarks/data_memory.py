"""Peak memory and time of loading one image file at a training resolution: thin strips, decompression bombs,
an oversized image, an 8000 x 6000 photo (JPEG and PNG) and a 4000 x 4000 control, each in its own process.

    python benchmarks/data_memory.py                     # every input, the current argen.data.transforms
    python benchmarks/data_memory.py --transforms OLD.py --inputs bomb_9500x9500,photo_8000x6000.jpg

Each input is loaded with `load_image_tensor(path, resolution)` in a child forked after the import (so torch's
import is paid once); the child's peak RSS (wait4) minus that of a child which loads nothing is the memory the
load cost. `--transforms FILE` measures another version of argen/data/transforms.py, e.g. the one before the
header checks: `git show d19cf9f:argen/data/transforms.py > /tmp/transforms_old.py` (careful: with it,
thin_40000x1 takes 10.5 GB and thin_80000x1 21 GB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image


def png_file(ihdr: bytes, idat: bytes) -> bytes:
    """A PNG from its header fields (struct ">IIBBBBB": w, h, bit depth, colour type, 0, 0, 0) and compressed rows."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zeros_png(w: int, h: int, *, color_type: int = 0, rows: int | None = None) -> bytes:
    """An 8-bit PNG of w x h black pixels (color_type 0: grey, 2: RGB), compressed row by row, so a
    9500 x 9500 one is an 88 KB file that never exists decoded. rows < h writes only that many rows."""
    row = bytes(1 + w * {0: 1, 2: 3}[color_type])
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h if rows is None else rows)) + z.flush()
    return png_file(struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0), idat)


def _strip(size: tuple[int, int]) -> Callable[[Path], None]:
    return lambda path: Image.new("RGB", size, (0, 0, 255)).save(path)


def _photo(path: Path) -> None:
    """8000 x 6000 smooth gradients with a sawtooth: compresses like a photo, has edges like one."""
    y, x = np.mgrid[0:6000, 0:8000]
    a = np.stack([x * 255 // 8000, y * 255 // 6000, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(a).save(path, **({"quality": 90} if path.suffix == ".jpg" else {"compress_level": 1}))


INPUTS: dict[str, Callable[[Path], None]] = {  # file name -> writer
    "thin_40000x1.png": _strip((40000, 1)),
    "thin_80000x1.png": _strip((80000, 1)),
    "bomb_9500x9500.png": lambda path: path.write_bytes(zeros_png(9500, 9500)),
    "big_8500x8500.png": lambda path: path.write_bytes(zeros_png(8500, 8500)),
    "photo_8000x6000.jpg": _photo,
    "photo_8000x6000.png": _photo,
    "control_4000x4000.png": lambda path: path.write_bytes(zeros_png(4000, 4000, color_type=2)),
}


class Measurement(NamedTuple):
    name: str
    file_bytes: int
    peak_mb: float  # peak RSS of the loading child over that of an idle child, in MiB
    seconds: float
    outcome: str  # "loaded (3, R, R)", "refused: REASON" or "killed by signal N"


def _in_child(fn: Callable[[], str]) -> tuple[int, float, str]:
    """Run fn in a forked child: (its peak RSS in bytes, seconds, fn's result)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report through the pipe, exit without running the parent's cleanup
        os.close(r)
        start = time.perf_counter()
        outcome = fn()
        os.write(w, json.dumps([time.perf_counter() - start, outcome]).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    _, status, usage = os.wait4(pid, 0)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    if os.WIFSIGNALED(status):
        return usage.ru_maxrss * unit, float("nan"), f"killed by signal {os.WTERMSIG(status)}"
    seconds, outcome = json.loads(report)
    return usage.ru_maxrss * unit, seconds, outcome


def measure(paths: list[Path], *, resolution: int, transforms_file: Path | None = None) -> list[Measurement]:
    """Load each file at `resolution` in its own child process; what it cost in memory and time."""
    if transforms_file is None:
        from argen.data import transforms
    else:
        spec = importlib.util.spec_from_file_location("transforms_under_test", transforms_file)
        transforms = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(transforms)
    warm = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(warm)
    warm.close()

    def load(path: Path | None) -> str:
        transforms.load_image_tensor(warm.name, resolution)  # decoders and the resize path imported in both
        if path is None:
            return "idle"
        try:
            return f"loaded {tuple(transforms.load_image_tensor(path, resolution).shape)}"
        except transforms.ImageDecodeError as err:
            return f"refused: {err.reason}"

    try:
        idle, _, _ = _in_child(lambda: load(None))
        rows = []
        for path in paths:
            peak, seconds, outcome = _in_child(lambda: load(path))
            rows.append(Measurement(path.name, path.stat().st_size, (peak - idle) / 2**20, seconds, outcome))
        return rows
    finally:
        os.unlink(warm.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated, of {', '.join(INPUTS)}")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--transforms", type=Path, default=None, help="a transforms.py to measure instead of argen's")
    p.add_argument("--json", action="store_true", help="one JSON object per input instead of a table")
    args = p.parse_args(argv)
    names = [n if n.endswith((".png", ".jpg")) else n + ".png" for n in args.inputs.split(",")]
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        p.error(f"unknown inputs {unknown}; choose from {', '.join(INPUTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name in names:
            # written in a child: the big arrays of a writer would stay in this process's heap, and in every
            # child forked from it, and hide the memory the loads take
            _in_child(lambda: INPUTS[name](Path(tmp) / name) or "written")
            paths.append(Path(tmp) / name)
        rows = measure(paths, resolution=args.resolution, transforms_file=args.transforms)
    if args.json:
        for row in rows:
            print(json.dumps(row._asdict()))
        return 0
    print(f"| input | file | peak RSS over idle | time | outcome at {args.resolution} px |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row.name} | {row.file_bytes / 1e3:.1f} KB | {row.peak_mb:.1f} MB | {row.seconds:.2f} s | {row.outcome} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
