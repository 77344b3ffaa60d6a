"""`argen tokenize` throughput against DataLoader workers and processes: WebDataset shards of 1024 px JPEG images
(decoded and resized to 256 px: 12 ms each on this host's cores), encoded by a random VQ with the patch encoder
(0.6 ms an image: a stand-in for a GPU, which encodes far faster than a CPU decodes), the settings run in turns.

    python benchmarks/tokenize_workers.py --rounds 3 -o benchmarks/results/tokenize_workers

Settings: 1 process with 0, 1, 2 workers; 2 processes (`accelerate launch --multi_gpu`, gloo on a CPU machine) with 1
worker each. Each process runs one torch thread, so the number of busy cores is what the setting asks for.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from argen.host import cpu_model

REPO = Path(__file__).resolve().parents[1]


def write_shards(folder: Path, *, shards: int, per_shard: int, size: int = 1024) -> None:
    """Tar shards of smooth noise images (JPEG, quality 90: decoding costs what a photo's does) with captions."""
    from PIL import Image

    if folder.is_dir():
        return
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                small = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                for name, data in ((f"{j:05d}.jpg", buf.getvalue()), (f"{j:05d}.txt", f"image {s} {j}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_vq(path: Path) -> None:
    """A random VQ at 256 px (f=16) with the patch encoder: encoding is cheap next to decoding, as on a GPU."""
    import torch

    from tokenizers_img.vq_model import VQConfig, VQModel

    if path.is_dir():
        return
    torch.manual_seed(0)
    VQModel(VQConfig(resolution=256, base_channels=16, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=16,
                     norm_groups=8, codebook_size=1024, codebook_dim=8, attn=False, encoder="patch")).save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(shards: Path, vq: Path, out: Path, *, processes: int, workers: int, images: int) -> tuple[float, float]:
    """(images per second, CPU cores busy on average) of one `argen tokenize` of every split (wall time of the whole
    command; its processes' user + system time over it)."""
    args = ["tokenize", "--tokenizer", str(vq), "--dataset", f"webdataset:{shards}", "--split", "all",
            "--batch-size", "16", "--num-workers", str(workers), "--overwrite", "-o", str(out)]
    if processes == 1:
        cmd = [sys.executable, "-m", "argen", "--threads", "1", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "argen", "--threads", "1", *args]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    meta = json.loads((out / "all" / "meta.json").read_text())
    assert meta["num_items"] == images, meta
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return images / seconds, cpu / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("/tmp/tokenize_workers"))
    p.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenize_workers")
    args = p.parse_args(argv)
    shards, vq = args.work / "shards", args.work / "vq"
    write_shards(shards, shards=args.shards, per_shard=args.per_shard)
    write_vq(vq)
    images = args.shards * args.per_shard
    settings = [(1, 0), (1, 1), (1, 2), (2, 1)]
    speeds: dict[str, list[float]] = {f"{p_} x {w}": [] for p_, w in settings}
    busy: dict[str, list[float]] = {f"{p_} x {w}": [] for p_, w in settings}
    loads = []
    for r in range(args.rounds):
        for processes, workers in (settings if r % 2 == 0 else settings[::-1]):
            name = f"{processes} x {workers}"
            loads.append(os.getloadavg()[0])
            speed, cores = run_setting(shards, vq, args.work / "out", processes=processes, workers=workers, images=images)
            speeds[name].append(speed)
            busy[name].append(cores)
            print(f"round {r}: {name}: {speed:.1f} images/s, {cores:.2f} cores busy", flush=True)
    report = {"host": cpu_model(), "cores": os.cpu_count(), "images": images, "source_px": 1024, "resolution": 256,
              "rounds": args.rounds, "images_per_s": {k: statistics.median(v) for k, v in speeds.items()},
              "cores_busy": {k: statistics.median(v) for k, v in busy.items()}, "runs": speeds,
              "load_average_before_runs": loads,
              "command": "python benchmarks/tokenize_workers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenize_workers.json").write_text(json.dumps(report, indent=2))
    base = report["images_per_s"]["1 x 0"]
    lines = [f"Command: `{report['command']}`", "",
             f"Host: {report['host']}, {report['cores']} cores (shared); {images} JPEG images of 1024 px in "
             f"{args.shards} tar shards, resized to 256 px, encoded by a random patch-encoder VQ; median of {args.rounds} "
             "rounds, settings in turns; wall time of the whole command (start-up included).", "",
             f"Load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f} (other jobs on the host).", "",
             "| processes x workers | images/s | vs 1 x 0 | CPU cores busy (user + system time / wall time) |",
             "| --- | --- | --- | --- |"]
    for name, speed in report["images_per_s"].items():
        lines.append(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {report['cores_busy'][name]:.2f} |")
    (args.out / "tokenize_workers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
