"""Load on `argen serve`: N clients on loopback for a bounded time, a health probe and the server's memory.

    python benchmarks/serve_load.py --pipeline runs/demo/gpt_run/final --clients 16 --seconds 120
    python benchmarks/serve_load.py --pipeline P --unclip U --clients 8 --seconds 60 -o /tmp/serve_load

Starts `argen serve` in its own process on a free port, then runs `--clients` threads for `--seconds`. Each client
submits a job (a shapes prompt, 1-8 images, a random seed), polls it until it ends, and starts again; one job in
ten it cancels after a moment, one submission in ten carries a bad setting (expected: HTTP 400 with a message), and
a refused one (HTTP 503, queue full) waits its Retry-After, capped at 2 s. A probe GETs /api/health every 0.2 s;
the server's RSS is read from /proc every second. At the end the still-running jobs are cancelled and the server
is stopped. Every response is sorted: answered (2xx), refused with a reason (400/404/503 with a JSON `error`), or
unexplained (anything else, or no answer); the run passes when nothing is unexplained. Writes serve_load.json and
serve_load.md to -o.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from tokenizers_img.serialization import atomic_write_bytes

PROMPTS = ["a red circle", "a large blue square in the top left", "two green triangles",
           "a small yellow circle above a red square", "a magenta triangle to the left of a cyan circle", ""]
BAD = [{"n": 1000}, {"gpt": {"temperature": "-3"}}, {"gpt": {"cfg_scale": "lots"}}, {"seed": -1}]


class Tally:
    """Thread-safe counts and samples."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, list[float]] = {}
        self.examples: dict[str, str] = {}

    def count(self, key: str, example: str | None = None, *, by: int = 1) -> None:
        with self.lock:
            self.counts[key] += by
            if example is not None:
                self.examples.setdefault(key, example)

    def sample(self, key: str, value: float) -> None:
        with self.lock:
            self.samples.setdefault(key, []).append(value)


def call(base: str, path: str, tally: Tally, *, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """One request: (status, JSON body); sorts the response into the tally (status 0: no answer)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method="POST" if data is not None or path.endswith("cancel")
                                     else "GET", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except OSError as err:
        tally.count("unexplained: no answer", f"{path}: {err}")
        return 0, {}
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {}
    if 200 <= status < 300:
        tally.count("answered")
    elif status in (400, 404, 503) and isinstance(payload.get("error"), str) and payload["error"]:
        tally.count(f"refused {status}", payload["error"])
    else:
        tally.count(f"unexplained: HTTP {status}", raw[:200].decode(errors="replace"))
    return status, payload


def client(base: str, stop: float, tally: Tally, seed: int) -> None:
    """Submit, poll to the end, repeat until `stop` (monotonic time)."""
    rng = random.Random(seed)
    while time.monotonic() < stop:
        body = {"prompt": rng.choice(PROMPTS), "n": rng.randint(1, 8), "seed": rng.randrange(2**31)}
        if rng.random() < 0.1:
            body.update(rng.choice(BAD))
        start = time.monotonic()
        status, job = call(base, "/api/jobs", tally, body=body)
        tally.sample("submit_s", time.monotonic() - start)
        if status == 503:
            tally.count("jobs refused (queue full)")
            time.sleep(min(2.0, rng.uniform(0.5, 2.0)))
            continue
        if status != 202:
            continue
        tally.count("jobs queued")
        cancel_at = start + rng.uniform(0.2, 1.5) if rng.random() < 0.1 else None
        while True:
            now = time.monotonic()
            if (cancel_at is not None and now >= cancel_at) or now >= stop:
                asked = time.monotonic()
                call(base, f"/api/jobs/{job['id']}/cancel", tally)
                while (s := call(base, f"/api/jobs/{job['id']}", tally)[1]).get("state") in ("queued", "running"):
                    time.sleep(0.02)
                tally.sample("cancel_to_stopped_s", time.monotonic() - asked)
                tally.count(f"jobs {s.get('state', 'lost')}")
                break
            status, s = call(base, f"/api/jobs/{job['id']}", tally)
            if s.get("state") in ("done", "cancelled", "failed") or status != 200:
                tally.count(f"jobs {s.get('state', 'lost')}")
                if s.get("state") == "done":
                    tally.sample("job_s", time.monotonic() - start)
                    tally.count("images", by=sum(c["images"] for c in s["columns"]))
                break
            time.sleep(0.2)


def probe(base: str, stop: float, tally: Tally) -> None:
    while time.monotonic() < stop:
        start = time.monotonic()
        call(base, "/api/health", tally, timeout=10)
        tally.sample("health_s", time.monotonic() - start)
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True, help="GPT pipeline directory")
    p.add_argument("--unclip", default=None, help="unCLIP pipeline directory (adds its priors' columns)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--max-waiting", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (argen --threads)")
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/serve_load"))
    args = p.parse_args(argv)

    port = free_port()
    command = [sys.executable, "-m", "argen", *(["--threads", str(args.threads)] if args.threads else []), "serve",
               "--pipeline", args.pipeline, "--port", str(port), "--max-waiting", str(args.max_waiting),
               *(["--unclip", args.unclip] if args.unclip else [])]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    try:
        deadline = time.monotonic() + 300
        while call(base, "/api/health", Tally(), timeout=2)[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"argen serve did not start: {server.stdout.read() if server.stdout else ''}")
            time.sleep(0.5)
        rss = [(0.0, rss_mb(server.pid))]
        begin = time.monotonic()
        stop = begin + args.seconds
        threads = [threading.Thread(target=client, args=(base, stop, tally, i)) for i in range(args.clients)]
        threads.append(threading.Thread(target=probe, args=(base, stop, tally)))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            rss.append((time.monotonic() - begin, rss_mb(server.pid)))
        wall = time.monotonic() - begin
        health_after = call(base, "/api/health", tally)[1]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    unexplained = {k: v for k, v in tally.counts.items() if k.startswith("unexplained")}
    later = [m for t, m in rss if t >= args.seconds / 4]  # after the warm-up quarter
    health = tally.samples.get("health_s", [0.0])
    result = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "clients": args.clients, "seconds": round(wall, 1), "max_waiting": args.max_waiting,
        "counts": dict(tally.counts), "examples": tally.examples,
        "health_ms": {"n": len(health), "p50": 1000 * statistics.median(health), "p99": 1000 * percentile(health, 0.99),
                      "max": 1000 * max(health)},
        "job_s": _summary(tally.samples.get("job_s", [])),
        "cancel_to_stopped_s": _summary(tally.samples.get("cancel_to_stopped_s", [])),
        "rss_mb": {"start": round(rss[0][1], 1), "after_warmup_min": round(min(later), 1),
                   "after_warmup_max": round(max(later), 1), "end": round(rss[-1][1], 1),
                   "samples": [(round(t, 1), round(m, 1)) for t, m in rss]},
        "health_after": health_after, "unexplained": unexplained, "passed": not unexplained,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "serve_load.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / "serve_load.md", markdown(result).encode())
    print(markdown(result))
    return 0 if result["passed"] else 1


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p90": round(percentile(values, 0.9), 3),
            "max": round(max(values), 3)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    c, h, m = r["counts"], r["health_ms"], r["rss_mb"]
    refused = {k: v for k, v in c.items() if k.startswith("refused")}
    lines = [
        f"`{r['command']}` on {r['host']['cpu']} ({r['host']['cores']} cores): {r['clients']} clients for "
        f"{r['seconds']} s, queue of {r['max_waiting']}.", "",
        "| measure | value |", "| --- | --- |",
        f"| responses answered (2xx) | {c.get('answered', 0)} |",
        *(f"| responses {k} with a message | {v} |" for k, v in sorted(refused.items())),
        f"| responses unexplained (other status, no message, no answer) | {sum(r['unexplained'].values())} |",
        f"| jobs queued / done / cancelled / failed / refused (queue full) | {c.get('jobs queued', 0)} / "
        f"{c.get('jobs done', 0)} / {c.get('jobs cancelled', 0)} / {c.get('jobs failed', 0)} / "
        f"{c.get('jobs refused (queue full)', 0)} |",
        f"| images made | {c.get('images', 0)} |",
        f"| job time, submit to done (p50 / p90 / max) | {_fmt(r['job_s'])} s |",
        f"| cancel to stopped (p50 / p90 / max) | {_fmt(r['cancel_to_stopped_s'])} s |",
        f"| /api/health latency (p50 / p99 / max, {h['n']} probes) | {h['p50']:.1f} / {h['p99']:.1f} / {h['max']:.1f} ms |",
        f"| server RSS: start / after the first quarter (min - max) / end | {m['start']} / {m['after_warmup_min']} - "
        f"{m['after_warmup_max']} / {m['end']} MB |",
    ]
    examples = "\n".join(f"- {k}: \"{v}\"" for k, v in sorted(r["examples"].items()))
    return "\n".join(lines) + "\n\nExample messages:\n\n" + examples + "\n"


def _fmt(s: dict) -> str:
    return f"{s['p50']} / {s['p90']} / {s['max']}" if s.get("n") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
