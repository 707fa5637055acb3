"""`smallfour demo`: the whole pipeline on the tiny built-in model.

Builds (or reuses from the cache) a random Mistral Small 4 checkpoint of the real
architecture in miniature, converts it to GGUF, and answers one prompt with it.
The answer is gibberish — the weights are random — but every step is the real one.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from smallfour.cli.convert import ConversionProgress
from smallfour.cli.options import Verbose
from smallfour.console import err, progress_bars

DEMO_PROMPT = "Write one sentence about the Alps."


def demo(
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="Prompt to run.")] = DEMO_PROMPT,
    verbose: Verbose = False,
) -> None:
    """Build the tiny built-in Mistral Small 4 model, convert it, and run one prompt on it."""
    from convert.writer import convert_checkpoint
    from smallfour.fixtures.checkpoint import DEMO_SPEC, build_fixture
    from smallfour.generation import one_shot, resolve_request, user_turn

    started = time.perf_counter()
    checkpoint = build_fixture(DEMO_SPEC)
    err(f"1. tiny Mistral Small 4 checkpoint in Mistral's layout ({DEMO_SPEC.n_layers} layers, "
        f"{DEMO_SPEC.n_experts} experts, Tekken v15 vocabulary): {checkpoint}")
    gguf_path = checkpoint / "demo-q8_0.gguf"  # lives and dies with its checkpoint in the cache
    if not gguf_path.exists():
        with progress_bars(transient=True) as bars:
            convert_checkpoint(checkpoint, gguf_path, "q8_0", progress=ConversionProgress(bars))
    err(f"2. converted to GGUF (q8_0): {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB)")
    err(f"3. running through llama.cpp: {prompt!r}")
    request = resolve_request(user_turn(prompt), max_tokens=32, temperature=0.0)
    result = one_shot(gguf_path, request, verbose=verbose)
    print(result.content)
    err(f"   {result.completion_tokens} tokens at {result.as_json()['timings']['predicted_per_second']} "
        f"tok/s; total {time.perf_counter() - started:.1f} s. (Random weights: the text is noise.)")
