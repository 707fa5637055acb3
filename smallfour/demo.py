"""`smallfour demo`: the whole pipeline on the tiny built-in model.

Builds (or reuses from the cache) a random Mistral Small 4 checkpoint of the real
architecture in miniature, converts it to GGUF, and answers one prompt with it.
The answer is gibberish — the weights are random — but every step is the real one.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from convert.writer import convert_checkpoint
from smallfour.fixtures.checkpoint import DEMO_SPEC, build_fixture
from smallfour.generate import one_shot, resolve_request, user_turn


def run_demo(prompt: str, *, verbose: bool, console: Console, progress) -> Path:
    started = time.perf_counter()
    checkpoint = build_fixture(DEMO_SPEC)
    console.print(f"1. tiny Mistral Small 4 checkpoint in Mistral's layout ({DEMO_SPEC.n_layers} layers, "
                  f"{DEMO_SPEC.n_experts} experts, Tekken v15 vocabulary): {checkpoint}", highlight=False)
    gguf_path = checkpoint / "demo-q8_0.gguf"  # lives and dies with its checkpoint in the cache
    if not gguf_path.exists():
        with Progress(console=console, transient=True) as bars:
            convert_checkpoint(checkpoint, gguf_path, "q8_0", progress=progress(bars))
    console.print(f"2. converted to GGUF (q8_0): {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB)",
                  highlight=False)
    console.print(f"3. running through llama.cpp: {prompt!r}", highlight=False)
    request = resolve_request(user_turn(prompt), max_tokens=32, temperature=0.0)
    result = one_shot(gguf_path, request, verbose=verbose)
    print(result.content)
    console.print(f"   {result.completion_tokens} tokens at {result.as_json()['timings']['predicted_per_second']} "
                  f"tok/s; total {time.perf_counter() - started:.1f} s. (Random weights: the text is noise.)",
                  highlight=False)
    return gguf_path
