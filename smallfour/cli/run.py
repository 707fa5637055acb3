"""`smallfour run`: answer one prompt (or continue a conversation file), streaming the reply to stdout."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from smallfour.cli.options import (DEFAULT_CTX, DEFAULT_PRESET, AsJson, Ctx, Effort, MaxTokens, Mmproj, ModelRef,
                                   Preset, Seed, System, Temperature, ThinkBudget, Threads, ThreadsBatch, TopK,
                                   TopP, Verbose, with_placement_options)
from smallfour.console import err
from smallfour.errors import SmallfourError
from smallfour.messages import check_messages, load_messages, read_json_file
from smallfour.placing import PlacementFlags


def request_messages(prompt: str | None, messages_file: Path | None, system: str | None) -> list[dict]:
    """The conversation from --messages, or one user turn from -p / stdin."""
    if messages_file is not None:
        if prompt is not None:
            raise SmallfourError("give either -p/--prompt or --messages, not both")
        messages = check_messages(load_messages(messages_file), f"{messages_file}: messages")
    else:
        if prompt is None:
            if sys.stdin.isatty():
                raise SmallfourError("no prompt: pass -p TEXT, --messages FILE, or pipe the prompt on stdin")
            prompt = sys.stdin.read().strip()
            if not prompt:
                raise SmallfourError("the prompt on stdin is empty")
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


@with_placement_options
def run(
    model: ModelRef,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="The user message; read from stdin if "
                                                                         "omitted.")] = None,
    messages_file: Annotated[Optional[Path], typer.Option("--messages", help="A JSON file with a whole conversation "
                                                                              "(OpenAI-style messages) instead of "
                                                                              "-p.")] = None,
    system: System = None,
    images: Annotated[Optional[list[str]], typer.Option("--image", help="Image file (PNG, JPEG, WebP, …) to show "
                                                                        "the model with the prompt; repeat for "
                                                                        "several.")] = None,
    mmproj: Mmproj = None,
    tools_file: Annotated[Optional[Path], typer.Option("--tools", help="JSON file with OpenAI-style tool "
                                                                       "definitions; tool calls come back in --json "
                                                                       "as tool_calls.")] = None,
    preset: Preset = DEFAULT_PRESET,
    effort: Effort = None,
    think_budget: ThinkBudget = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    seed: Seed = None,
    hide_thinking: Annotated[bool, typer.Option("--hide-thinking", help="Do not print the model's "
                                                                        "thinking.")] = False,
    ctx: Ctx = DEFAULT_CTX,
    as_json: AsJson = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Render and tokenize the prompt, generate nothing; "
                                                            "with --json prints {prompt, tokens}.")] = False,
    threads: Threads = None,
    threads_batch: ThreadsBatch = None,
    verbose: Verbose = False,
    placement: PlacementFlags = None,
) -> None:
    """Answer one prompt (or continue a conversation), streaming the reply to stdout.

    Thinking goes to stderr (dimmed) so that stdout carries only the answer. --json prints one object instead:
    content, reasoning_content, tool_calls, usage, timings.
    """
    from smallfour.generation import dry_run as render_only
    from smallfour.generation import one_shot, resolve_request
    from smallfour.store import resolve_gguf
    from smallfour.vision import attach_images, check_images

    model = resolve_gguf(model)
    tools = read_json_file(tools_file, "tools") if tools_file is not None else None
    messages = attach_images(request_messages(prompt, messages_file, system), images or [])
    projector = check_images(model, messages, mmproj)
    request = resolve_request(messages, preset=preset, effort=effort,
                              think_budget=think_budget, tools=tools, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if dry_run:
        text, tokens = render_only(model, request, verbose=verbose)
        print(json.dumps({"prompt": text, "tokens": tokens}, ensure_ascii=False) if as_json else text)
        return
    stream = None if as_json else functools.partial(_stream, hide_thinking=hide_thinking)
    result = one_shot(model, request, n_ctx=ctx, verbose=verbose, kv_type=placement.kv_type, n_threads=threads,
                      n_threads_batch=threads_batch,
                      placement=placement.resolve(model, ctx, mmproj=projector), on_text=stream, mmproj=projector)
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
        return
    sys.stdout.write("\n")
    for call in result.tool_calls:
        print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
    if result.tool_call_error:
        err(("malformed tool call:", "yellow"), f" {result.tool_call_error}")


def _stream(channel: str, text: str, hide_thinking: bool = False) -> None:
    # Thinking goes to stderr, dimmed, so stdout carries only the answer.
    if channel == "reasoning":
        if hide_thinking:
            return
        err((text, "dim"), end="")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
