"""What llama.cpp's RPC protocol costs: the same model local, on one loopback worker, and split over two.

Every configuration runs `smallfour run --stats` as a user would (a fresh process, greedy, `--requests`
times, medians), with the workers started by `smallfour worker` on this machine. Loopback has no wire
latency or bandwidth limit, so the difference to the local run is the protocol's own overhead (serialising
each graph, copying activations and logits through the kernel's TCP stack, one round trip per hand-over);
a real network adds its round-trip time per hand-over and token on top.

    python bench/rpc.py [--requests 5] [--tokens 128] [--fixture bench|tiny]

The worker is built once into `$SMALLFOUR_HOME/rpc/` (`smallfour worker` does it; minutes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert.writer import convert_checkpoint  # noqa: E402
from smallfour.fixtures.checkpoint import FixtureSpec, build_fixture  # noqa: E402
from smallfour.hardware import physical_cores  # noqa: E402
from smallfour.rpc import Endpoint, ensure_worker_build, probe  # noqa: E402


import throughput  # noqa: E402 — a sibling script: bench/ is on the path when this one runs

bench_convert = throughput.bench_convert
SECTION = "bench/rpc.py"
SMALLFOUR = [sys.executable, "-m", "smallfour"]
PROMPT = "Write a long story about a lighthouse keeper and the sea. " * 8
DECODE = re.compile(r"decode: (\d+) tokens in [\d.]+ s, ([\d.]+) tok/s")
PREFILL = re.compile(r"prompt: (\d+) tokens in [\d.]+ s, ([\d.]+) tok/s")
LOAD = re.compile(r"load:\s+([\d.]+) s")


def fixtures() -> dict[str, FixtureSpec]:
    # bench: the engine benchmark's fixture (bench/throughput.py), big enough that decode is not all overhead.
    return {"bench": throughput.BENCH_SPEC, "tiny": FixtureSpec()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(count: int, threads: int) -> tuple[list[str], list[subprocess.Popen]]:
    endpoints, processes = [], []
    for _ in range(count):
        port = free_port()
        processes.append(subprocess.Popen([*SMALLFOUR, "worker", "--port", str(port), "--threads", str(threads)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        endpoints.append(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    for endpoint in endpoints:
        host, port = endpoint.split(":")
        while True:
            try:
                probe(Endpoint(host, int(port)), timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return endpoints, processes


def measure(gguf: Path, tokens: int, requests: int, threads: int, rpc: list[str]) -> dict:
    """Medians over `requests` fresh `smallfour run --stats` processes."""
    decode, prefill, load = [], [], []
    for _ in range(requests):
        command = [*SMALLFOUR, "run", str(gguf), "-p", PROMPT, "-n", str(tokens), "--temperature", "0",
                   "--ctx", "2048", "--threads", str(threads), "--stats"]
        if rpc:
            command += ["--rpc", ",".join(rpc)]
        else:
            command += ["--gpu-layers", "0"]  # local means this process's CPU, whatever GPU the build sees
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        decode.append(float(DECODE.search(done.stderr).group(2)))
        prefill.append(float(PREFILL.search(done.stderr).group(2)))
        load.append(float(LOAD.search(done.stderr).group(1)))
    return {"decode": statistics.median(decode), "prefill": statistics.median(prefill),
            "load": statistics.median(load)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5, help="runs per configuration (medians)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--fixture", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()

    ensure_worker_build()
    spec = fixtures()[args.fixture]
    work = Path(tempfile.mkdtemp())
    gguf = work / "rpc-q8_0.gguf"
    convert_checkpoint(build_fixture(spec), gguf, "q8_0", mmproj=False)
    threads = physical_cores()

    rows = {"local": measure(gguf, args.tokens, args.requests, threads, [])}
    for count in (1, 2):
        endpoints, processes = start_workers(count, threads)
        try:
            rows[f"{count} worker{'s' if count > 1 else ''}"] = measure(gguf, args.tokens, args.requests, threads,
                                                                        endpoints)
        finally:
            for process in processes:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
        print(count, rows, flush=True)

    base = rows["local"]
    table = ["| where the layers run | decode tok/s | vs local | prompt tok/s | vs local | load s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        table.append(f"| {name} | {row['decode']:,.1f} | {row['decode'] / base['decode']:.2f}× | "
                     f"{row['prefill']:,.1f} | {row['prefill'] / base['prefill']:.2f}× | {row['load']:.2f} |")
    section = "\n".join([
        f"<!-- {SECTION} -->",
        "## Across machines: llama.cpp's RPC protocol (`bench/rpc.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), loopback only; llama.cpp CPU builds ({threads} threads "
        f"in the client and in each worker); fixture q8_0 of {gguf.stat().st_size / 1e6:.0f} MB "
        f"({spec.n_layers} layers, hidden {spec.hidden_size}); a {len(PROMPT.split())}-word prompt, "
        f"{args.tokens} tokens greedy, median of {args.requests} fresh `smallfour run --stats` processes.",
        "",
        "```",
        f"python bench/rpc.py --requests {args.requests} --tokens {args.tokens} --fixture {args.fixture}",
        "```",
        "",
        *table,
        "",
        "local: `--gpu-layers 0`, the model in this process. Workers: `smallfour worker` on 127.0.0.1, the client "
        "with `--rpc` (all layers on the workers, split by their free memory; only the input embeddings stay in the "
        "client). Load includes sending the weights to the workers. On a real network add one round trip per "
        "hand-over and token (`smallfour plan --rpc` counts the hand-overs and the bytes)." + (
            f" Here the client and two workers, {threads} threads each, share {os.cpu_count()} cores, so the "
            "two-worker row measures that contention as much as the protocol; on separate machines each worker "
            "has its own cores." if 3 * threads > (os.cpu_count() or 1) else ""),
        f"<!-- /{SECTION} -->",
    ])
    bench_convert.write_section(args.output, section, SECTION)
    print(section)


if __name__ == "__main__":
    main()
