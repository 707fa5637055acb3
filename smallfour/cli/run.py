"""`smallfour run`: answer one prompt (or continue a conversation file), streaming the reply to stdout."""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from smallfour.cli.options import (DEFAULT_CTX, DEFAULT_PRESET, AsJson, Ctx, Effort, MaxTokens, Mmproj, ModelRef,
                                   Preset, Seed, System, Temperature, ThinkBudget, Threads, ThreadsBatch, TopK,
                                   TopP, Verbose, with_placement_options)
from smallfour.console import Loading, err, note
from smallfour.errors import SmallfourError
from smallfour.messages import read_json_file
from smallfour.openai import StopFilter, apply_stop
from smallfour.placing import PlacementFlags

if TYPE_CHECKING:
    from smallfour.completion import ChatRequest


def request_messages(prompt: str | None, system: str | None) -> list[dict]:
    """One user turn from -p / stdin (and --system)."""
    if prompt is None:
        if sys.stdin.isatty():
            raise SmallfourError("no prompt: pass -p TEXT, --messages FILE, or pipe the prompt on stdin")
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise SmallfourError("the prompt on stdin is empty")
    elif not prompt.strip():
        raise SmallfourError("the prompt given with -p is empty")
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user",
                                                                                       "content": prompt}]


def file_request(path: Path, system: str | None, fields: dict, *, preset: str,
                 think_budget: int | None) -> tuple[ChatRequest, tuple[str, ...]]:
    """--messages FILE through the OpenAI layer batch and serve use (`smallfour.openai`), so a conversation
    means the same everywhere: role developer, legacy functions, reasoning_effort's mapping, tool_choice,
    response_format. The file is a list of messages or a whole chat-completions body; `fields` (the
    flags that were given) override the body's."""
    from smallfour.completion import check_effort
    from smallfour.openai import RequestError, request_from_body

    data = read_json_file(path, "messages")
    body = dict(data) if isinstance(data, dict) else {"messages": data}
    if not isinstance(body.get("messages"), list):
        raise SmallfourError(f"{path}: expected a JSON list of {{\"role\", \"content\"}} messages, or a "
                             "chat-completions body with a messages list")
    if system is not None:
        body["messages"] = [{"role": "system", "content": system}] + [
            m for m in body["messages"] if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
    check_effort(fields.get("reasoning_effort"))  # the flag takes the model's own values, as with -p
    if fields.get("max_tokens") is not None:
        body.pop("max_completion_tokens", None)  # which the body would otherwise prefer
    body |= {name: value for name, value in fields.items() if value is not None}
    try:
        request, stop = request_from_body(body, preset=preset, think_budget=think_budget, where="run")
    except RequestError as exc:
        raise SmallfourError(f"{path}: {exc.message}") from None
    if body.get("reasoning_effort") not in (None, request.effort):
        note(f"reasoning_effort {body['reasoning_effort']!r} runs as {request.effort!r} (the model knows none and "
             "high)")
    return request, stop


@with_placement_options
def run(
    model: ModelRef,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="The user message; read from stdin if "
                                                                         "omitted.")] = None,
    messages_file: Annotated[Optional[Path], typer.Option("--messages", help="A JSON file with a whole conversation "
                                                                              "instead of -p: OpenAI-style messages, "
                                                                              "or a chat-completions request body "
                                                                              "(flags override its fields).")] = None,
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
    stats: Annotated[bool, typer.Option("--stats", help="After the answer, print on stderr the load time, prompt "
                                                        "and decode tokens and their tok/s (like ollama run "
                                                        "--verbose).")] = False,
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
    if messages_file is None:
        request, stop = resolve_request(request_messages(prompt, system), preset=preset, effort=effort,
                                        think_budget=think_budget, tools=tools, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed), ()
    elif prompt is not None:
        raise SmallfourError("give either -p/--prompt or --messages, not both")
    else:
        request, stop = file_request(messages_file, system, {
            "reasoning_effort": effort, "tools": tools, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "seed": seed}, preset=preset, think_budget=think_budget)
    request = replace(request, messages=attach_images(request.messages, images or []))
    projector = check_images(model, request.messages, mmproj)
    if dry_run:
        text, tokens = render_only(model, request, verbose=verbose)
        print(json.dumps({"prompt": text, "tokens": tokens}, ensure_ascii=False) if as_json else text)
        return
    cut = StopFilter(stop)
    stream = None if as_json else functools.partial(_stream, hide_thinking=hide_thinking, cut=cut)
    layout = placement.resolve(model, ctx, mmproj=projector)
    started = time.perf_counter()
    with Loading(model.name, quiet=verbose) as spinner:
        loaded = []

        def ready() -> None:
            spinner.stop()
            loaded.append(time.perf_counter())

        result = one_shot(model, request, n_ctx=ctx, verbose=verbose, kv_type=placement.kv_type, n_threads=threads,
                          n_threads_batch=threads_batch, placement=layout, on_text=stream, mmproj=projector,
                          on_loaded=ready)
    finished = time.perf_counter()
    apply_stop(result, stop)
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
    else:
        sys.stdout.write(cut.flush() + "\n")
        for call in result.tool_calls:
            print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
        if result.tool_call_error:
            err(("malformed tool call:", "yellow"), f" {result.tool_call_error}")
    if stats:
        sys.stdout.flush()
        print_stats(result, load_s=loaded[0] - started, total_s=finished - started)


def print_stats(result, *, load_s: float, total_s: float) -> None:
    """`--stats`: where the time went, as `ollama run --verbose` shows it (the first token is timed with the prompt)."""
    timings = result.as_json()["timings"]
    evaluated = result.prompt_tokens - result.cached_tokens
    cached = f" ({result.cached_tokens} cached)" if result.cached_tokens else ""
    err(f"load:   {load_s:.2f} s")
    err(f"prompt: {evaluated} tokens{cached} in {result.prompt_ms / 1000:.2f} s, "
        f"{timings['prompt_per_second']:.1f} tok/s")
    err(f"decode: {max(result.completion_tokens - 1, 0)} tokens in {result.predicted_ms / 1000:.2f} s, "
        f"{timings['predicted_per_second']:.1f} tok/s ({result.completion_tokens} generated, the first timed with "
        "the prompt)")
    err(f"total:  {total_s:.2f} s")


def _stream(channel: str, text: str, hide_thinking: bool, cut: StopFilter) -> None:
    # Thinking goes to stderr, dimmed, so stdout carries only the answer (up to a stop string).
    if channel == "reasoning":
        if hide_thinking:
            return
        err((text, "dim"), end="")
    else:
        sys.stdout.write(cut.feed(text))
        sys.stdout.flush()
