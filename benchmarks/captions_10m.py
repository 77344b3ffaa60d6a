"""GPT-training start-up at 10M captions: a synthetic 10M-item code shard (written here, never committed), its captions
tokenized once into the shard, then the start-up time and resident memory of each of 2 training processes
(`CaptionedCodes` over the shard, the first epoch's order, the first batch), measured.

    python benchmarks/captions_10m.py --items 10000000 --work /tmp/captions_10m
    python benchmarks/captions_10m.py --items 10000000 --work /tmp/captions_10m --before /tmp/argen_before \
        --before-items 1000000          # also the loop before: every rank tokenizes every caption at start-up

The codes file is created sparse (start-up never reads it); the captions are drawn from a template grammar with a
serial number each, so all 10M are distinct (the worst case for a table of distinct captions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from argen.host import cpu_model

REPO = Path(__file__).resolve().parents[1]
TEXT_LEN = 64  # as argen/configs/gpt/gpu_100m.yaml
WORDS = {
    "size": ["small", "large", "tiny", "huge"],
    "colour": ["red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"],
    "shape": ["circle", "square", "triangle", "star", "ring"],
    "place": ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"],
}


def write_shard(path: Path, *, items: int, grid: int = 16, chunk: int = 1_000_000) -> None:
    """A complete code shard of `items` rows: sparse codes, distinct captions, meta.json last."""
    from argen.data.codes import CAPTIONS_NAME, CODES_NAME, META_NAME
    from tokenizers_img.serialization import claim_output_dir

    if (path / META_NAME).is_file():
        return
    claim_output_dir(path, kind="code-shard")
    np.lib.format.open_memmap(path / CODES_NAME, mode="w+", dtype=np.int16, shape=(items, grid * grid)).flush()
    rng = np.random.default_rng(0)
    with open(path / CAPTIONS_NAME, "w") as fh:
        for start in range(0, items, chunk):
            n = min(chunk, items - start)
            picks = {k: rng.integers(0, len(v), n) for k, v in WORDS.items()}
            fh.writelines(json.dumps({"text": f"photo {start + i}: a {WORDS['size'][picks['size'][i]]} "
                                              f"{WORDS['colour'][picks['colour'][i]]} {WORDS['shape'][picks['shape'][i]]} "
                                              f"in the {WORDS['place'][picks['place'][i]]}", "key": f"k{start + i}"}) + "\n"
                          for i in range(n))
    meta = {"num_items": items, "done": items, "grid": [grid, grid], "num_codes": 16384, "tokenizer_hash": "synthetic",
            "dataset": "synthetic", "split": "train", "resolution": grid * 16}
    (path / META_NAME).write_text(json.dumps(meta))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mapped_mb(file: Path) -> float:
    """Resident MB of this process's mappings of `file` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
            inside = line.rstrip().endswith(str(file))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def _anon_mb() -> float:
    """This process's private (anonymous) resident memory, from /proc/self/status."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def mode_ids(args: argparse.Namespace) -> None:
    """Tokenize the shard's captions once (the one-time cost), with the time and this process's peak memory."""
    from argen.data.codes import write_caption_ids
    from argen.text import TextTokenizer

    text = TextTokenizer.load(args.bpe)
    start = time.perf_counter()
    ids = write_caption_ids(args.shard, text, text_len=TEXT_LEN)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(),
                      "ids_mb_on_disk": ids.nbytes / 2**20, "dtype": str(ids.tokens.dtype),
                      "num_truncated": ids.info["num_truncated"]}))


def mode_rank(args: argparse.Namespace) -> None:
    """One training process's start-up: from process creation to its first batch, then 200 more batches."""
    import psutil

    created = psutil.Process().create_time()
    import torch

    from argen.tasks.gpt import CaptionedCodes
    from argen.text import TextTokenizer
    from argen.train.batches import ShardedBatchSampler
    from argen.train.processes import process_state

    state = process_state()
    text = TextTokenizer.load(args.bpe)
    t0 = time.perf_counter()
    data = CaptionedCodes([str(args.shard)], text_tokenizer=text, text_len=TEXT_LEN)
    built = time.perf_counter() - t0
    micro = 256 // state.num_processes  # the 100M config's global batch over the processes
    sampler = iter(ShardedBatchSampler(len(data), seed=0, epoch=0, micro_batch=micro, num_micro=len(data) // 256,
                                       num_processes=state.num_processes, process_index=state.process_index))
    batch = data.__getitems__(next(sampler))
    first = time.time() - created
    rss, anon = psutil.Process().memory_info().rss / 2**20, _anon_mb()
    ids_files = [*Path(args.shard).glob("text_ids-*.bin"), *Path(args.shard).glob("text_ids-*.offsets.npy")]
    mapped = sum(_mapped_mb(f) for f in ids_files)
    for _ in range(200):
        data.__getitems__(next(sampler))
    out = {"rank": state.process_index, "processes": state.num_processes, "items": len(data),
           "build_seconds": built, "startup_seconds": first, "rss_mb": rss, "anon_mb": anon,
           "ids_resident_mb_at_start": mapped, "ids_resident_mb_after_200_batches": sum(_mapped_mb(f) for f in ids_files),
           "ids_mb_on_disk": sum(f.stat().st_size for f in ids_files) / 2**20,
           "codes_resident_mb_after_200_batches": _mapped_mb(Path(args.shard) / "codes.npy"),
           "rss_mb_after_200_batches": psutil.Process().memory_info().rss / 2**20, "anon_mb_after_200_batches": _anon_mb(),
           "batch": list(batch["text_ids"].shape), "torch": torch.__version__}
    print("RESULT " + json.dumps(out), flush=True)


def mode_before(args: argparse.Namespace) -> None:
    """The loop before (run with PYTHONPATH at its checkout): CaptionedCodes reads captions.jsonl and tokenizes every
    distinct caption into an int64 table, in every process."""
    import psutil

    created = psutil.Process().create_time()
    from argen.tasks.gpt import CaptionedCodes
    from argen.text import TextTokenizer

    text = TextTokenizer.load(args.bpe)
    t0 = time.perf_counter()
    data = CaptionedCodes([str(args.shard)], text_tokenizer=text, text_len=TEXT_LEN)
    print("RESULT " + json.dumps({"items": len(data), "build_seconds": time.perf_counter() - t0,
                                  "startup_seconds": time.time() - created,
                                  "rss_mb": psutil.Process().memory_info().rss / 2**20,
                                  "text_table_mb": data.text_table.numel() * 8 / 2**20}), flush=True)


def _run(cmd: list[str], *, env: dict[str, str] | None = None) -> str:
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return run.stdout


def _results(stdout: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["all", "ids", "rank", "before"], default="all")
    p.add_argument("--items", type=int, default=10_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/captions_10m"))
    p.add_argument("--shard", type=Path, default=None)
    p.add_argument("--bpe", type=Path, default=None)
    p.add_argument("--before", type=Path, default=None, help="a checkout of argen before the change, to measure too")
    p.add_argument("--before-items", type=int, default=1_000_000)
    p.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "captions_10m")
    args = p.parse_args(argv)
    if args.mode != "all":
        {"ids": mode_ids, "rank": mode_rank, "before": mode_before}[args.mode](args)
        return 0

    from argen.text import dataset_captions, train_text_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    bpe = args.work / "bpe"
    if not (bpe / "tokenizer.json").is_file():
        train_text_tokenizer(dataset_captions("shapes", limit=20000) + [f"photo {i}" for i in range(20000)],
                             vocab_size=8192).save(bpe)
    shard = args.work / f"shard_{args.items}"
    t0 = time.perf_counter()
    write_shard(shard, items=args.items)
    written = time.perf_counter() - t0
    me = [sys.executable, str(Path(__file__).resolve())]
    for f in shard.glob("text_ids-*"):
        f.unlink()  # the one-time tokenization is measured each time
    ids = json.loads(_run([*me, "--mode", "ids", "--shard", str(shard), "--bpe", str(bpe)]).strip().splitlines()[-1])
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    ranks = _results(_run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free), *me[1:], "--mode", "rank", "--shard", str(shard), "--bpe", str(bpe)]))
    report = {"host": cpu_model(), "items": args.items, "text_len": TEXT_LEN, "shard_written_seconds": round(written, 1),
              "captions_jsonl_mb": (shard / "captions.jsonl").stat().st_size / 2**20, "tokenize_once": ids,
              "ranks": sorted(ranks, key=lambda r: r["rank"]),
              "command": "python benchmarks/captions_10m.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.before is not None:
        small = args.work / f"shard_{args.before_items}"
        write_shard(small, items=args.before_items)
        for f in small.glob("text_ids-*"):
            f.unlink()
        report["before"] = _results(_run([*me, "--mode", "before", "--shard", str(small), "--bpe", str(bpe)],
                                          env={"PYTHONPATH": str(args.before)}))[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "captions_10m.json").write_text(json.dumps(report, indent=2))
    lines = [f"Command: `{report['command']}`", "", f"Host: {report['host']}; {args.items:,} items, text_len {TEXT_LEN}, "
             f"captions.jsonl {report['captions_jsonl_mb']:.0f} MB.", "",
             f"Captions tokenized once into the shard: {ids['seconds']:.1f} s, peak RSS {ids['peak_rss_mb']:.0f} MB, "
             f"{ids['ids_mb_on_disk']:.0f} MB of {ids['dtype']} ids on disk.", "",
             "| rank | start-up: process start to first batch (s) | CaptionedCodes (s) | RSS at first batch (MB) | of it private (MB) | caption ids mapped at first batch / after 200 more batches (MB) | RSS after 200 batches: private / caption ids / codes (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["ranks"]:
        lines.append(f"| {r['rank']} | {r['startup_seconds']:.1f} | {r['build_seconds']:.3f} | {r['rss_mb']:.0f} | "
                     f"{r['anon_mb']:.0f} | {r['ids_resident_mb_at_start']:.0f} / {r['ids_resident_mb_after_200_batches']:.0f} | "
                     f"{r['anon_mb_after_200_batches']:.0f} / {r['ids_resident_mb_after_200_batches']:.0f} / "
                     f"{r['codes_resident_mb_after_200_batches']:.0f} |")
    lines += ["", "Mapped files count in RSS as the pages a process touched (shared by all processes, clean, reclaimable; "
              "this kernel maps page-cache folios of up to 2 MB at a time). All caption ids of the shard take "
              f"{report['ranks'][0]['ids_mb_on_disk']:.0f} MB."]
    if "before" in report:
        b = report["before"]
        lines += ["", f"Before (every process tokenizes every caption at start-up), measured at {b['items']:,} items on "
                  f"one process: start-up {b['startup_seconds']:.1f} s, CaptionedCodes {b['build_seconds']:.1f} s, RSS "
                  f"{b['rss_mb']:.0f} MB (int64 table {b['text_table_mb']:.0f} MB)."]
    (args.out / "captions_10m.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
