"""Many requests at once: smallfour's engine against llama.cpp's own server and batched-bench.

One job of chat requests (a shared system prompt, varied user prompts, 64–256 tokens out,
greedy, `</s>` banned so every request writes exactly its max_tokens) on the bench fixture,
same machine, same run:

- smallfour `batch --parallel N` (the engine in-process, model loaded once per N; the time is
  the job's, not the load's);
- llama.cpp's `llama-server -np N` built from the vendored llama.cpp of the pinned sdist,
  driven through its `/v1/chat/completions` by N concurrent clients on the same requests;
- llama.cpp's `llama-batched-bench` at the same N: the ceiling for pure decode, against
  smallfour's engine decoding N sequences (prompts read, every slot generating).

    python bench/throughput.py [--requests 64] [--parallel 1,4,8,16] [--llama-build DIR]

llama.cpp's tools are built once into `.cache/llama-tools` (cmake, about 10 minutes on 2 cores)
from `.cache/sdist/` (downloaded with pip when missing, as tests/test_vision.py does).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert.writer import convert_checkpoint  # noqa: E402
from smallfour.batch import BatchOutput, parse_jobs, run_jobs  # noqa: E402
from smallfour.completion import ChatRequest, Sampling  # noqa: E402
from smallfour.engine import Engine  # noqa: E402
from smallfour.fixtures.checkpoint import FixtureSpec, build_fixture  # noqa: E402
from smallfour.hardware import physical_cores  # noqa: E402
from smallfour.model import Model  # noqa: E402
from smallfour.placement import Placement  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_convert", REPO / "bench" / "convert.py")
bench_convert = importlib.util.module_from_spec(_spec)
sys.modules["bench_convert"] = bench_convert
_spec.loader.exec_module(bench_convert)

SECTION = "bench/throughput.py"
# The fixture of the engine issue: the real architecture at hidden 1024, 64 experts of 512, top-4 (≈637 MB q8_0).
BENCH_SPEC = FixtureSpec(hidden_size=1024, n_layers=3, n_heads=8, q_lora_rank=256, kv_lora_rank=128,
                         qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_experts=64, n_experts_used=4,
                         expert_ff=512, dense_ff=2048)
EOS = 2
WORDS = ("river mountain engine lattice harbor quartz violet signal meadow copper orbit lantern canyon ember "
         "falcon glacier harvest island jungle kernel ledger marble nebula oasis prairie quiver ribbon summit "
         "thunder umbrella vertex willow").split()


def requests_file(path: Path, count: int, low: int, high: int) -> list[dict]:
    rng = np.random.default_rng(0)
    system = ("You are a careful assistant for an engineering team. Answer precisely, cite the relevant "
              "section when you can, and keep a neutral tone. ") * 6
    lines = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 40))))
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Request {i}: {words}"}],
                "max_tokens": int(rng.integers(low, high + 1)), "temperature": 0, "logit_bias": {str(EOS): -100}}
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


# What `smallfour batch` loads with by default (flash attention on, as llama-server's `-fa auto` on CPU).
CLI_PLACEMENT = Placement(flash_attn=True)


def run_smallfour(gguf: Path, requests: Path, parallel: int, n_ctx: int) -> dict:
    with Model.load(gguf, n_ctx=n_ctx, n_seq=parallel, placement=CLI_PLACEMENT) as model:
        jobs = parse_jobs(requests.read_bytes().splitlines(), n_vocab=model.n_vocab)
        with tempfile.TemporaryDirectory() as work:
            output, done = BatchOutput.open(Path(work) / "out.jsonl")
            try:
                summary = run_jobs(model, jobs, output, model_name="bench", done=done)
            finally:
                output.close()
        threads = model.n_threads
    assert summary.failed == 0 and summary.succeeded == len(jobs), summary
    return {"seconds": summary.seconds, "tokens": summary.completion_tokens, "requests": summary.succeeded,
            "threads": threads}


def engine_decode_rate(gguf: Path, parallel: int, prompt: int, generate: int) -> float:
    """Aggregate tok/s of steps in which every slot generates (prompts already read): pure decode."""
    rng = np.random.default_rng(1)
    sampling = Sampling(temperature=0.0, max_tokens=generate, logit_bias={EOS: -100.0})
    with Model.load(gguf, n_ctx=prompt + generate + 8, n_seq=parallel, placement=CLI_PLACEMENT) as model:
        engine = Engine(model)
        for _ in range(parallel):
            engine.submit(ChatRequest([], sampling=sampling), [1, *rng.integers(1000, 131072, prompt - 1).tolist()])
        tokens, seconds = 0, 0.0
        while engine.busy:
            decoding = all(slot.job is not None and not slot.prefilling for slot in engine.slots)
            active = engine.active
            started = time.perf_counter()
            engine.step()
            if decoding and engine.active == active == parallel:
                tokens += parallel
                seconds += time.perf_counter() - started
    return tokens / seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_llama_server(binary: Path, gguf: Path, lines: list[dict], parallel: int, n_ctx: int, threads: int) -> dict:
    port = free_port()
    server = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                               "-np", str(parallel), "-c", str(n_ctx * parallel), "-t", str(threads), "--jinja",
                               "-ngl", "0", "--no-webui"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("llama-server did not come up")
            time.sleep(0.5)

        def ask(line: dict) -> int:
            body = dict(line["body"], model="bench")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as reply:
                return json.loads(reply.read())["usage"]["completion_tokens"]

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            tokens = sum(pool.map(ask, lines))
        seconds = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    return {"seconds": seconds, "tokens": tokens, "requests": len(lines)}


def batched_bench(binary: Path, gguf: Path, parallel: list[int], prompt: int, generate: int,
                  threads: int) -> dict[int, float]:
    """llama-batched-bench's S_TG (aggregate decode tok/s) per number of sequences."""
    n_ctx = (prompt + generate) * max(parallel) + 64
    result = subprocess.run([str(binary), "-m", str(gguf), "-c", str(n_ctx), "-b", "2048", "-ub", "512",
                             "-npp", str(prompt), "-ntg", str(generate), "-npl", ",".join(map(str, parallel)),
                             "-t", str(threads), "-ngl", "0"],
                            capture_output=True, text=True, check=True)
    rates = {}
    for row in result.stdout.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
            rates[int(cells[2])] = float(cells[7])
    return rates


def llama_tools(build: Path) -> dict[str, Path]:
    tools = {name: build / "bin" / name for name in ("llama-server", "llama-batched-bench")}
    if all(path.exists() for path in tools.values()):
        return tools
    sdist = REPO / ".cache" / "sdist" / "llama_cpp_python-0.3.36"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python==0.3.36", "-d", str(sdist.parent)], check=True)
        subprocess.run(["tar", "xzf", str(sdist.parent / "llama_cpp_python-0.3.36.tar.gz"), "-C", str(sdist.parent)],
                       check=True)
    build.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cmake", str(sdist / "vendor" / "llama.cpp"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
                   cwd=build, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 1), "--target", *tools],
                   cwd=build, check=True, stdout=subprocess.DEVNULL)
    return tools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--parallel", default="1,4,8,16")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--llama-build", type=Path, default=REPO / ".cache" / "llama-tools")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    counts = [int(n) for n in args.parallel.split(",")]

    tools = llama_tools(args.llama_build)
    work = Path(tempfile.mkdtemp())
    gguf = work / "bench-q8_0.gguf"
    convert_checkpoint(build_fixture(BENCH_SPEC), gguf, "q8_0", mmproj=False)
    requests = work / "requests.jsonl"
    lines = requests_file(requests, args.requests, args.min_tokens, args.max_tokens)
    n_ctx = 1024
    threads = physical_cores()

    rows = []
    ceiling = batched_bench(tools["llama-batched-bench"], gguf, counts, 128, 128, threads)
    for n in counts:
        ours = run_smallfour(gguf, requests, n, n_ctx)
        peer = run_llama_server(tools["llama-server"], gguf, lines, n, n_ctx, threads)
        decode = engine_decode_rate(gguf, n, 128, 128)
        rows.append((n, ours, peer, decode, ceiling.get(n)))
        print(n, ours, peer, decode, ceiling.get(n), flush=True)

    base = rows[0][1]["seconds"]
    table = ["| N | smallfour wall s | tok/s | req/s | vs N=1 | llama-server -np N wall s | tok/s | req/s | "
             "engine decode tok/s | llama-batched-bench S_TG | engine / ceiling |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, ours, peer, decode, top in rows:
        ceiling_cells = f"{top:.1f} | {100 * decode / top:.0f} %" if top else "– | –"
        table.append(f"| {n} | {ours['seconds']:.1f} | {ours['tokens'] / ours['seconds']:.1f} | "
                     f"{ours['requests'] / ours['seconds']:.2f} | {base / ours['seconds']:.2f}× | "
                     f"{peer['seconds']:.1f} | {peer['tokens'] / peer['seconds']:.1f} | "
                     f"{peer['requests'] / peer['seconds']:.2f} | {decode:.1f} | {ceiling_cells} |")
    size = gguf.stat().st_size
    section = "\n".join([
        f"<!-- {SECTION} -->",
        "## Many requests at once (`bench/throughput.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), llama.cpp CPU build, {threads} threads on both sides; "
        f"bench fixture q8_0 of {size / 1e6:.0f} MB ({BENCH_SPEC.n_layers} layers, {BENCH_SPEC.n_experts} experts of "
        f"{BENCH_SPEC.expert_ff}, top-{BENCH_SPEC.n_experts_used}, hidden {BENCH_SPEC.hidden_size}); "
        f"{args.requests} chat requests with one system prompt, {args.min_tokens}–{args.max_tokens} tokens out each "
        f"({sum(line['body']['max_tokens'] for line in lines)} in all), greedy, `</s>` banned. "
        "No GPU was at hand for this run.",
        "",
        "```",
        f"python bench/throughput.py --requests {args.requests} --parallel {args.parallel} "
        f"--min-tokens {args.min_tokens} --max-tokens {args.max_tokens}",
        "```",
        "",
        *table,
        "",
        "smallfour: the batch job in-process (`run_jobs` on the engine, model loaded once per N with batch's default "
        "placement, flash attention on; wall = the job). "
        "llama-server: built from the vendored llama.cpp of the pinned sdist, `-np N -c N×1024 --jinja`, N "
        "concurrent clients on `/v1/chat/completions` with the same bodies, wall from the first request to the last "
        "answer (load excluded on both sides). Engine decode: N sequences of 128 prompt tokens, aggregate tok/s over "
        "the steps in which all N generate; llama-batched-bench: `-npp 128 -ntg 128 -npl …`, its S_TG.",
        f"<!-- /{SECTION} -->",
    ])
    bench_convert.write_section(args.output, section, SECTION)
    print(section)


if __name__ == "__main__":
    main()
