"""`smallfour demo`: the whole pipeline on the tiny built-in model, kept in the store as `demo`.

Builds (or reuses from the cache) a random Mistral Small 4 checkpoint of the real
architecture in miniature, converts it to GGUF, keeps it in the model store under the
name `demo` (with its vision projector), and answers one prompt with it. The answer is
gibberish — the weights are random — but every step is the real one, and afterwards every
command that takes a model takes `demo`: the demo ends by printing three to try.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from smallfour.cli.convert import ConversionProgress
from smallfour.cli.options import Verbose
from smallfour.console import Loading, err, progress_bars

DEMO_NAME = "demo"
DEMO_PROMPT = "Write one sentence about the Alps."
BATCH_PROMPTS = ("Name a mountain.", "Name a river.", "Name a lake.")


def demo(
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="Prompt to run.")] = DEMO_PROMPT,
    verbose: Verbose = False,
) -> None:
    """Build the tiny built-in Mistral Small 4 model, convert it, keep it as `demo`, and run one prompt on it."""
    from convert.writer import convert_checkpoint
    from smallfour.fixtures.checkpoint import DEMO_SPEC, build_fixture
    from smallfour.generation import one_shot, resolve_request, user_turn
    from smallfour.store import keep_gguf, mmproj_for, smallfour_home

    started = time.perf_counter()
    checkpoint = build_fixture(DEMO_SPEC)
    err(f"1. tiny Mistral Small 4 checkpoint in Mistral's layout ({DEMO_SPEC.n_layers} layers, "
        f"{DEMO_SPEC.n_experts} experts, Tekken v15 vocabulary): {checkpoint}")
    converted = checkpoint / "demo-q8_0.gguf"  # lives and dies with its checkpoint in the cache
    if not converted.exists():
        with progress_bars(transient=True) as bars:
            convert_checkpoint(checkpoint, converted, "q8_0", progress=ConversionProgress(bars))
    gguf_path = keep_gguf(converted, DEMO_NAME, mmproj_for(converted))
    err(f"2. converted to GGUF (q8_0) and kept in the model store as `{DEMO_NAME}`: {gguf_path} "
        f"({gguf_path.stat().st_size / 1e6:.1f} MB)")
    err(f"3. running through llama.cpp: {prompt!r}")
    request = resolve_request(user_turn(prompt), max_tokens=32, temperature=0.0)
    with Loading(DEMO_NAME, quiet=verbose) as spinner:
        result = one_shot(gguf_path, request, verbose=verbose, on_loaded=spinner.stop)
    print(result.content)
    err(f"   {result.completion_tokens} tokens at {result.as_json()['timings']['predicted_per_second']} "
        f"tok/s; total {time.perf_counter() - started:.1f} s. (Random weights: the text is noise.)")
    image, batch_input = write_examples(smallfour_home() / "demo")
    err("next, with the same model (or your own: a GGUF path or a name from `smallfour models`):")
    err(f"  smallfour chat {DEMO_NAME}")
    err(f"  smallfour run {DEMO_NAME} --image {_shown(image)} -p 'What is in this picture?'")
    err(f"  smallfour batch {DEMO_NAME} {_shown(batch_input)} -o demo-results.jsonl")


def write_examples(directory: Path) -> tuple[Path, Path]:
    """A picture and a three-line batch input for the commands the demo suggests (each written once, atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    image, batch_input = directory / "alps.png", directory / "batch.jsonl"
    if not image.exists():
        _atomic(image, _picture)
    if not batch_input.exists():
        lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 16, "seed": i}}
                 for i, text in enumerate(BATCH_PROMPTS, 1)]
        _atomic(batch_input, lambda path: path.write_text("".join(json.dumps(line) + "\n" for line in lines)))
    return image, batch_input


def _picture(path: Path) -> None:
    """Three mountains under a sky: a small PNG any vision model could describe."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (256, 192), (120, 170, 230))
    draw = ImageDraw.Draw(picture)
    for left, top in ((-20, 70), (70, 40), (160, 80)):
        draw.polygon([(left, 192), (left + 60, top), (left + 120, 192)], fill=(90, 90, 100))
        draw.polygon([(left + 45, top + 22), (left + 60, top), (left + 75, top + 22)], fill=(250, 250, 250))
    picture.save(path, format="PNG")


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _shown(path: Path) -> str:
    """`path` with the home directory as ~ (shorter, and the same for every user of the docs)."""
    home = Path.home()
    if path.is_relative_to(home):
        return "~/" + shlex.quote(str(path.relative_to(home)))
    return shlex.quote(str(path))
