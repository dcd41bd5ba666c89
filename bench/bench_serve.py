#!/usr/bin/env python
"""Server benchmark: `router serve` throughput and latency, batched vs --max-batch-size 1, side by side.

    .venv/bin/python bench/bench_serve.py [--json results.json] [--clients 8] [--calls 25] [--calls-100m 4]
                                          [--server-threads 1]

Builds (offline, in a temp folder unless ``--workdir``) the ``tiny`` and ``100m`` random
Qwen3-VL projects of bench/bench_engine.py (three LoRA adapters, a router head), then for
each model starts ``router serve`` as its own process on a free loopback port twice --
``--max-batch-size 8`` and ``--max-batch-size 1`` -- and runs the same load against both:
``--clients`` threads, each sending its requests one after another
(``POST /v1/chat/completions``, greedy, ``max_tokens`` 16, a 320x240 PNG). It reports
requests per second, p50 / p99 latency as the clients saw it, the mean rows per engine
call (from ``/metrics``), and whether every answer matched between the two servers.

The server runs torch with ``--server-threads`` intra-op threads (``OMP_NUM_THREADS``;
default 1): on a 2-core machine shared with other work, two OpenMP threads spinning against
other processes made one act ~10x slower than one thread did, and the numbers noise.

A script, not a test: prints a markdown table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 16
BATCHED = 8


def _bench_engine():
    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bodies() -> list[bytes]:
    be = _bench_engine()
    out = []
    for i in range(6):
        buf = io.BytesIO()
        be._screen(i).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append(json.dumps({"model": "auto", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": be.PROMPTS[i % 3]}]}]}).encode())
    return out


def serve_and_load(registry: Path, batch: int, clients: int, calls: int, threads: int = 1) -> dict:
    """Start `router serve --max-batch-size batch`, run the load, stop it. Latencies in ms."""
    import httpx

    port = _free_port()
    router = str(Path(sys.executable).parent / "router")
    proc = subprocess.Popen([router, "serve", "--registry", str(registry), "--port", str(port), "--device", "cpu",
                             "--max-batch-size", str(batch), "--max-wait-ms", "10", "--log-level", "warning",
                             "--max-queue", str(4 * clients), "--request-timeout", "900"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VLROUTER_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"router serve failed:\n{proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("router serve did not become ready in 300 s")
            time.sleep(0.2)
        bodies = _bodies()
        headers = {"Content-Type": "application/json"}
        with httpx.Client(base_url=url, timeout=600) as warm:  # one request per body first: lazy inits, caches
            for b in bodies[:3]:
                warm.post("/v1/chat/completions", content=b, headers=headers).raise_for_status()
            rows0, calls0 = _batch_stats(warm.get("/metrics").text)
        latencies: list[float] = []
        answers: dict[tuple[int, int], tuple[str, str]] = {}
        errors: list[str] = []
        barrier = threading.Barrier(clients + 1)

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                barrier.wait()
                for j in range(calls):
                    idx = (j + k) % len(bodies)
                    t0 = time.perf_counter()
                    r = http.post("/v1/chat/completions", content=bodies[idx], headers=headers)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    d = r.json()
                    answers[(k, j)] = (d["model"], d["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows1, calls1 = _batch_stats(httpx.get(f"{url}/metrics").text)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"max_batch_size": batch, "requests": len(latencies), "wall_s": wall, "req_per_s": len(latencies) / wall,
            "p50_ms": statistics.median(latencies), "p99_ms": q[98],
            "mean_rows_per_call": (rows1 - rows0) / (calls1 - calls0),
            "answers": {f"{k}:{j}": v for (k, j), v in sorted(answers.items())}}


def _batch_stats(metrics: str) -> tuple[float, float]:
    """(rows, engine calls) so far, from /metrics' batch-size histogram."""
    rows = float(re.search(r"^vlrouter_batch_size_sum (\S+)$", metrics, re.MULTILINE).group(1))
    calls = float(re.search(r"^vlrouter_batch_size_count (\S+)$", metrics, re.MULTILINE).group(1))
    return rows, calls


def render(results: dict) -> str:
    """The markdown table of one run's results (what bench/run prints and the README shows)."""
    lines = [
        f"### Serving: `router serve`, {results['clients']} concurrent clients, batched vs --max-batch-size 1 "
        f"(greedy, max_tokens={results['max_tokens']})",
        "",
        "| model | server | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | rows per engine call "
        "| answers equal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for preset, r in results["models"].items():
        b, u = r["batched"], r["unbatched"]
        same = "yes" if r["answers_equal"] else "**no**"
        lines.append(f"| {preset} | --max-batch-size {b['max_batch_size']} | {b['requests']} | "
                     f"**{b['req_per_s']:.2f}** ({b['req_per_s'] / u['req_per_s']:.2f}x) | {b['p50_ms']:.0f} | "
                     f"{b['p99_ms']:.0f} | {b['mean_rows_per_call']:.1f} | {same} |")
        lines.append(f"| {preset} | --max-batch-size 1 | {u['requests']} | {u['req_per_s']:.2f} | {u['p50_ms']:.0f} | "
                     f"{u['p99_ms']:.0f} | {u['mean_rows_per_call']:.1f} | |")
    lines += ["", f"{results['cpu_count']} CPUs shared with other work (load average {results['load_average']:.1f} "
                  f"at the end), server and clients on one machine (loopback), {results['server_threads']} torch "
                  f"thread(s) in the server, torch {results['torch']}, Python {results['python']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--calls", type=int, default=25, help="requests per client, tiny model")
    ap.add_argument("--calls-100m", type=int, default=4, help="requests per client, 100m model (~1 s per act)")
    ap.add_argument("--server-threads", type=int, default=1, help="torch intra-op threads of the server")
    ap.add_argument("--workdir", help="keep the built models here (default: a temp folder, removed)")
    args = ap.parse_args()
    import platform

    import torch

    be = _bench_engine()
    t_start = time.time()
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vlrouter-bench-serve-")
        work = Path(tmp.name)
    models = {}
    for preset, calls in (("tiny", args.calls), ("100m", args.calls_100m)):
        reg = work / preset / "registry.yaml"
        if not reg.exists():
            reg = Path(be.run_child("build", work / preset, 0)["registry"])
        batched = serve_and_load(reg, BATCHED, args.clients, calls, args.server_threads)
        unbatched = serve_and_load(reg, 1, args.clients, calls, args.server_threads)
        equal = batched.pop("answers") == unbatched.pop("answers")
        models[preset] = {"batched": batched, "unbatched": unbatched, "answers_equal": equal}
        print(f"{preset}: {batched['req_per_s']:.1f} vs {unbatched['req_per_s']:.1f} req/s", file=sys.stderr)
    results = {"models": models, "clients": args.clients, "max_tokens": MAX_TOKENS, "cpu_count": os.cpu_count(),
               "server_threads": args.server_threads, "load_average": os.getloadavg()[0],
               "torch": torch.__version__, "python": platform.python_version()}
    print(render(results))
    print(f"\n(bench took {time.time() - t_start:.0f}s)", file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
