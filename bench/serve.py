"""Serving under concurrent load: `smallfour serve --parallel N` against llama.cpp's `llama-server -np N`.

Same model, same machine, same run, same client: the bench fixture of bench/throughput.py
(q8_0) and its chat requests (one shared system prompt, varied user prompts, 64–256 tokens out,
greedy, `</s>` banned so every request writes its max_tokens), sent by N concurrent clients
as streaming `/v1/chat/completions` requests (`stream_options.include_usage`) to each server in
turn, both started with N slots, N × 1024 tokens of context, the same threads, GPU layers and
flash-attention setting. Measured per server: requests/s and output tokens/s over the wall time
from the first request to the last answer (loading excluded), and time to first token (the
first chunk carrying text) at p50 and p99.

    python bench/serve.py [--requests 64] [--parallel 1,4,8] [--gpu-layers 0] [--flash-attn]

llama-server comes from bench/throughput.py's `llama_tools` (built once into
`.cache/llama-tools` from the pinned sdist's vendored llama.cpp).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


import throughput  # noqa: E402 — a sibling script: bench/ is on the path when this one runs

bench_convert = throughput.bench_convert

from convert.writer import convert_checkpoint  # noqa: E402
from smallfour.fixtures.checkpoint import build_fixture  # noqa: E402
from smallfour.hardware import physical_cores  # noqa: E402

SECTION = "bench/serve.py"
N_CTX = 1024  # per slot: the longest request is ≈130 prompt + 256 generated tokens
START_SECONDS = 300


class Server:
    """A server process on a free loopback port, ready once its /health answers 200."""

    def __init__(self, name: str, command: list[str], port: int, log: Path):
        self.name, self.port, self.log = name, port, log
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + START_SECONDS
        while not self._healthy():
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{name} did not come up: " + " | ".join(tail))
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                return reply.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream_request(port: int, body: dict) -> tuple[float, int]:
    """(seconds to the first chunk with text, completion tokens) of one streamed request."""
    body = dict(body, model="bench", stream=True, stream_options={"include_usage": True})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first, usage = None, None
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error in stream: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
                    first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError(f"a stream ended without {'text' if first is None else 'usage'}")
    return first, usage["completion_tokens"]


def drive(server: Server, lines: list[dict], clients: int) -> dict:
    """Every request through `clients` concurrent streams; one short warm-up request first, untimed."""
    warm_up = lines[0]["body"]
    stream_request(server.port, dict(warm_up, messages=[warm_up["messages"][0], {"role": "user", "content": "Hi"}],
                                     max_tokens=8))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda line: stream_request(server.port, line["body"]), lines))
    seconds = time.perf_counter() - started
    ttft = np.array([a[0] for a in answers])
    return {"seconds": seconds, "requests": len(answers), "tokens": sum(a[1] for a in answers),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99))}


def smallfour_command(gguf: Path, port: int, n: int, threads: int, gpu_layers: int, flash_attn: bool) -> list[str]:
    return [sys.executable, "-m", "smallfour", "serve", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(n), "--ctx", str(N_CTX), "--threads", str(threads), "--threads-batch", str(threads),
            "--gpu-layers", str(gpu_layers), "--flash-attn" if flash_attn else "--no-flash-attn"]


def llama_server_command(binary: Path, gguf: Path, port: int, n: int, threads: int, gpu_layers: int,
                         flash_attn: bool) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(n),
            "-c", str(N_CTX * n), "-t", str(threads), "-tb", str(threads), "--jinja", "-ngl", str(gpu_layers),
            "-fa", "on" if flash_attn else "off", "--no-webui"]


def section(args, rows: list, lines: list[dict], size: int, threads: int) -> str:
    table = ["| N clients = slots | smallfour req/s | tok/s | TTFT p50 ms | TTFT p99 ms | llama-server req/s | "
             "tok/s | TTFT p50 ms | TTFT p99 ms | smallfour / llama-server tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, ours, peer in rows:
        cells = []
        for r in (ours, peer):
            cells += [f"{r['requests'] / r['seconds']:.2f}", f"{r['tokens'] / r['seconds']:.1f}",
                      f"{1000 * r['ttft_p50']:.0f}", f"{1000 * r['ttft_p99']:.0f}"]
        ratio = (ours["tokens"] / ours["seconds"]) / (peer["tokens"] / peer["seconds"])
        table.append(f"| {n} | {' | '.join(cells)} | {ratio:.2f}× |")
    spec = throughput.BENCH_SPEC
    where = "CPU only" if args.gpu_layers == 0 else f"{args.gpu_layers} GPU layers (-1 = all)"
    return "\n".join([
        f"<!-- {SECTION} -->",
        "## Serving under concurrent load (`bench/serve.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), {where}, {threads} threads and flash attention "
        f"{'on' if args.flash_attn else 'off'} on both sides; bench fixture q8_0 of {size / 1e6:.0f} MB "
        f"({spec.n_layers} layers, {spec.n_experts} experts of {spec.expert_ff}, top-{spec.n_experts_used}, "
        f"hidden {spec.hidden_size}); {args.requests} chat requests with one system prompt, "
        f"{args.min_tokens}–{args.max_tokens} tokens out each ({sum(line['body']['max_tokens'] for line in lines)} "
        "in all), greedy, `</s>` banned.",
        "",
        "```",
        f"python bench/serve.py --requests {args.requests} --parallel {args.parallel} --min-tokens {args.min_tokens} "
        f"--max-tokens {args.max_tokens} --gpu-layers {args.gpu_layers}" + (" --flash-attn" if args.flash_attn else ""),
        "```",
        "",
        *table,
        "",
        f"Both servers started with N slots of {N_CTX} tokens (`smallfour serve --parallel N --ctx {N_CTX}`; "
        f"`llama-server -np N -c N×{N_CTX} --jinja`, built from the vendored llama.cpp of the pinned sdist), then "
        "driven by the same client: N threads, each sending the next request as a streaming chat completion once "
        "its previous answer ended. Wall time from the first request to the last answer, after one untimed "
        "warm-up request; output tokens from each stream's `usage`; time to first token from sending the request "
        "to the first chunk carrying text.",
        f"<!-- /{SECTION} -->",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--parallel", default="1,4,8", help="comma-separated N: clients and slots on both servers")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers on GPU on both sides (-1 = all)")
    parser.add_argument("--flash-attn", action="store_true", help="flash attention on, on both sides")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--llama-build", type=Path, default=REPO / ".cache" / "llama-tools")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    counts = [int(n) for n in args.parallel.split(",")]

    binary = throughput.llama_tools(args.llama_build)["llama-server"]
    work = Path(tempfile.mkdtemp())
    gguf = work / "bench-q8_0.gguf"
    convert_checkpoint(build_fixture(throughput.BENCH_SPEC), gguf, "q8_0", mmproj=False)
    lines = throughput.requests_file(work / "requests.jsonl", args.requests, args.min_tokens, args.max_tokens)

    commands = {"smallfour": lambda port, n: smallfour_command(gguf, port, n, args.threads, args.gpu_layers,
                                                                 args.flash_attn),
                "llama-server": lambda port, n: llama_server_command(binary, gguf, port, n, args.threads,
                                                                     args.gpu_layers, args.flash_attn)}
    rows = []
    for n in counts:
        results = []
        for name, command in commands.items():
            port = throughput.free_port()
            server = Server(name, command(port, n), port, work / f"{name}-{n}.log")
            try:
                results.append(drive(server, lines, n))
            finally:
                server.stop()
            print(n, name, results[-1], flush=True)
        rows.append((n, *results))

    text = section(args, rows, lines, gguf.stat().st_size, args.threads)
    bench_convert.write_section(args.output, text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
