"""Runtime overhead: smallfour's generation loop against llama.cpp driven directly.

Both sides load the same GGUF with the same context, threads and KV type, feed the
same prompt tokens and decode the same number of tokens greedily. The reference is
llama-cpp-python's low-level API (`llama_decode` + a greedy `llama_sampler`), i.e.
what any llama.cpp front end must do at least; the difference is our overhead
(chat-template tokenization is outside the timed region on both sides: the prompt
is given as token ids). Rounds alternate between the two to share the machine's
noise, and the median of each is reported.

    python bench/runtime.py [--size-mb 300] [--rounds 5] [--prompt-tokens 256] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert.writer import convert_checkpoint  # noqa: E402
from smallfour.fixtures.checkpoint import FixtureSpec, build_fixture  # noqa: E402
from smallfour.generation import ChatRequest, Sampling, continue_tokens  # noqa: E402
from smallfour.model import Model  # noqa: E402

# docs/benchmarks.md is written through bench/convert.py's section writer (a file, not a package).
_spec = importlib.util.spec_from_file_location("bench_convert", REPO / "bench" / "convert.py")
bench_convert = importlib.util.module_from_spec(_spec)
sys.modules["bench_convert"] = bench_convert  # dataclasses look their module up
_spec.loader.exec_module(bench_convert)

SECTION = "bench/runtime.py"


def fixture_for(size_mb: int) -> FixtureSpec:
    """A fixture whose q8_0 GGUF is about `size_mb`: experts dominate, as in the real model."""
    hidden, ff, experts = 512, 512, 64
    per_layer = experts * 3 * ff * hidden * 1.0625  # q8_0 bytes
    fixed = 2 * 131072 * hidden * 1.0625
    layers = max(2, round((size_mb * 1e6 - fixed) / per_layer))
    if layers in (26, 27):  # llama.cpp treats these layer counts as DeepSeek-V2-Lite (no q_lora)
        layers = 28
    return FixtureSpec(hidden_size=hidden, expert_ff=ff, n_experts=experts, n_layers=layers, dense_ff=1024,
                       q_lora_rank=256, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
                       v_head_dim=64, n_heads=8)


def reference_run(llm: Model, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """Prefill and decode seconds through llama.cpp's C API, greedy."""
    import llama_cpp

    llm.reset()  # our bookkeeping forgets the previous round too
    ctx = llm.context
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    sampler = llama_cpp.llama_sampler_init_greedy()
    batch = llama_cpp.llama_batch_init(max(len(prompt), 1), 0, 1)
    try:
        def decode(tokens: list[int], start: int) -> None:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        started = time.perf_counter()
        decode(prompt, 0)
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        prefilled = time.perf_counter()
        for step in range(n_decode - 1):
            decode([token], len(prompt) + step)
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        finished = time.perf_counter()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_sampler_free(sampler)
    return prefilled - started, finished - prefilled


def smallfour_run(llm: Model, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """Prefill and decode seconds through `smallfour.generation.complete`, greedy, same tokens."""
    llm.reset()  # forget the previous round: the whole prompt is evaluated again
    # A plain request, as users send them. Should the model end early (EOS), its decode time is
    # scaled to n_decode tokens: the table compares per-token rates.
    request = ChatRequest(messages=[], sampling=Sampling(temperature=0.0, top_k=0, top_p=1.0, max_tokens=n_decode))
    result = continue_tokens(llm, prompt, request)
    assert result.completion_tokens >= 8, f"the model stopped after {result.completion_tokens} tokens"
    return result.prompt_ms / 1000.0, result.predicted_ms / 1000.0 * (n_decode - 1) / (result.completion_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()

    spec = fixture_for(args.size_mb)
    checkpoint = build_fixture(spec)
    work = Path(tempfile.mkdtemp())
    gguf_path = work / "bench-q8_0.gguf"
    convert_checkpoint(checkpoint, gguf_path, "q8_0")
    size = gguf_path.stat().st_size
    n_ctx = args.prompt_tokens + args.decode_tokens + 8
    llm = Model.load(gguf_path, n_ctx=n_ctx)
    rng = np.random.default_rng(0)
    prompt = [1, *rng.integers(1000, 131072, size=args.prompt_tokens - 1).tolist()]
    # The batch size bounds one prefill call; both sides see the same limit.
    prompt = prompt[: llm.n_batch]

    timings = {"llama.cpp C API": [], "smallfour": []}
    reference_run(llm, prompt, 4)  # warm-up: page in the weights
    for _ in range(args.rounds):
        timings["llama.cpp C API"].append(reference_run(llm, prompt, args.decode_tokens))
        timings["smallfour"].append(smallfour_run(llm, prompt, args.decode_tokens))

    rows = {}
    for name, runs in timings.items():
        prefill = statistics.median(len(prompt) / p for p, _ in runs)
        decode = statistics.median((args.decode_tokens - 1) / d for _, d in runs)
        rows[name] = (prefill, decode)
    ref_prefill, ref_decode = rows["llama.cpp C API"]
    ours_prefill, ours_decode = rows["smallfour"]
    table = [
        "| path | prefill tok/s | decode tok/s |",
        "|---|---:|---:|",
        *(f"| {name} | {p:,.1f} | {d:,.1f} |" for name, (p, d) in rows.items()),
        f"| **smallfour overhead** | {100 * (ref_prefill / ours_prefill - 1):+.1f} % | "
        f"{100 * (ref_decode / ours_decode - 1):+.1f} % |",
    ]
    section = "\n".join([
        f"<!-- {SECTION} -->",
        "## Runtime overhead (`bench/runtime.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), llama.cpp CPU build, "
        f"{llm.n_threads} decode thread(s), fixture GGUF q8_0 of {size / 1e6:.0f} MB "
        f"({spec.n_layers} layers, {spec.n_experts} experts, hidden {spec.hidden_size}); "
        f"{len(prompt)} prompt tokens, {args.decode_tokens} decoded tokens, median of {args.rounds} alternating rounds.",
        "",
        "```",
        f"python bench/runtime.py --size-mb {args.size_mb} --rounds {args.rounds} "
        f"--prompt-tokens {args.prompt_tokens} --decode-tokens {args.decode_tokens}",
        "```",
        "",
        *table,
        "",
        "Overhead = how much slower smallfour's loop (`smallfour.generation.continue_tokens`: llama.cpp's "
        "sampler chain, channel tracking, incremental UTF-8 decoding) is than the bare C API loop on the same "
        "loaded model, for a plain request; negative means within noise of the reference. Target: ≤ 3 %. "
        "`logit_bias` runs in llama.cpp's own sampler and the thinking budget forces `[/THINK]` without "
        "touching the rest of the vocabulary, so neither adds a pass over the logits.",
        f"<!-- /{SECTION} -->",
    ])
    bench_convert.write_section(args.output, section, SECTION)
    print(section)


if __name__ == "__main__":
    main()
