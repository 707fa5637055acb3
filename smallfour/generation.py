"""Chat completions: messages through the model's template into the engine, and back as
separate thinking, answer and tool calls.

The request and result types live in `smallfour.completion`, the generation loop in
`smallfour.engine`; this module renders and tokenizes prompts (images expanded to
mistral-common's grids) and offers the one-request entry points the front ends use:
`stream_generate` yields events, `complete` returns the finished turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from smallfour.completion import (EFFORTS, PRESETS, ChatRequest, Event, GenerationResult, Sampling, check_effort,
                                  resolve_request)
from smallfour.engine import Engine, interpret
from smallfour.model import Model
from smallfour.placement import Placement
from smallfour.prompts import Message, render_segments, user_turn
from smallfour.vision import ImageSpan, expand_request


def prompt_tokens(model: Model, request: ChatRequest) -> tuple[str, list[int]]:
    """The rendered prompt and its token ids, exactly as mistral-common would encode the request."""
    text, tokens, _ = prompt_with_images(model, request)
    return text, tokens


def prompt_with_images(model: Model, request: ChatRequest) -> tuple[str, list[int], list[ImageSpan]]:
    """Prompt text, token ids (images expanded to mistral-common's grids) and where each image sits."""
    check_effort(request.effort)
    settings: dict[str, Any] = {}
    if request.effort is not None:
        settings["reasoning_effort"] = request.effort
    if request.tools:
        settings["tools"] = request.tools
    segments = render_segments(model.chat_template(), request.messages, **settings)
    tokens, spans = expand_request(model, request.messages, model.tokenize_prompt(segments))
    text = "".join(s.text for s in segments)
    last = request.messages[-1]
    if last.get("role") == "assistant" and not last.get("tool_calls") and tokens and model.is_end(tokens[-1]):
        # A final assistant message is a prefix to continue (mistral-common's `prefix=True`): no `</s>`.
        tokens, text = tokens[:-1], text.removesuffix("</s>")
    return text, tokens, spans


@dataclass(frozen=True)
class GeneratedReply:
    """An assistant reply as the model wrote it: the token ids it generated (what the KV cache holds)
    and the tokens the template gives its text, at `start` in the tokens of the conversation's prompt.

    Text does not always tokenize back into the ids it was generated from (a word split unusually, a
    character cut in half by Ctrl-C, a thought left open), and then a prompt built from the text
    matches the cache only up to there. `with_generated` puts the generated ids back in its place.
    """

    start: int
    rendered: tuple[int, ...]
    generated: tuple[int, ...]


def generated_reply(model: Model, request: ChatRequest, prompt: Sequence[int], reply: Message,
                    generated: Sequence[int]) -> GeneratedReply | None:
    """`reply`, the assistant message generated (as `generated`) after `request`'s prompt `prompt` (the
    template's tokens, as `prompt_with_images` gives them): where its text sits in later prompts, and as
    which tokens. None when the template does not render the reply right after the prompt."""
    _, tokens, _ = prompt_with_images(model, replace(request, messages=[*request.messages, reply]))
    if tokens[:len(prompt)] != list(prompt):
        return None
    return GeneratedReply(len(prompt), tuple(tokens[len(prompt):]), tuple(generated))


def with_generated(tokens: list[int], spans: Sequence[ImageSpan],
                   replies: Iterable[GeneratedReply]) -> tuple[list[int], list[ImageSpan]]:
    """A prompt's `tokens` (images at `spans`) with each reply's rendered tokens replaced by its generated ids.

    A reply is put back only where the prompt still holds exactly its rendered tokens (an earlier
    message or setting changed: the prompt is left as the template wrote it); images after it move.
    """
    spans = list(spans)
    for reply in sorted(replies, key=lambda r: r.start, reverse=True):  # the last first: earlier starts hold
        end = reply.start + len(reply.rendered)
        if tuple(tokens[reply.start:end]) != reply.rendered:
            continue
        if any(span.start < end and span.start + span.n_tokens > reply.start for span in spans):
            continue
        tokens = tokens[:reply.start] + list(reply.generated) + tokens[end:]
        shift = len(reply.generated) - len(reply.rendered)
        spans = [replace(span, start=span.start + shift) if span.start >= end else span for span in spans]
    return tokens, spans


def stream_generate(model: Model, request: ChatRequest, *,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
    """Generate one assistant turn, yielding thinking and answer text as it comes, then the result.

    `should_stop()` is polled after every token; when it turns true the turn ends with
    finish_reason "interrupted". The prompt's shared prefix with what the cache holds is reused.
    """
    _, tokens, spans = prompt_with_images(model, request)
    return generate_from(model, tokens, request, spans=spans, should_stop=should_stop)


def generate_from(model: Model, tokens: list[int], request: ChatRequest, *, spans: Sequence[ImageSpan] = (),
                  should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
    """`stream_generate` after an already-tokenized prompt (images at `spans`): one slot of the engine."""
    engine = Engine(model)
    job = engine.submit(request, tokens, spans, should_stop=should_stop)
    while not job.finished:
        engine.step()
        while job.events:
            yield job.events.popleft()
    if job.error is not None:
        raise job.error


def complete(model: Model, request: ChatRequest, *, on_text: Callable[[str, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate one assistant turn. `on_text(channel, text)` gets "reasoning" and "content" pieces."""
    return _collect(stream_generate(model, request, should_stop=should_stop), on_text)


def continue_tokens(model: Model, tokens: list[int], request: ChatRequest, *, spans: Sequence[ImageSpan] = (),
                    on_text: Callable[[str, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate after already-tokenized prompt `tokens` (images at `spans`), with the request's sampling and budget."""
    return _collect(generate_from(model, tokens, request, spans=spans, should_stop=should_stop), on_text)


def _collect(events: Iterator[Event], on_text: Callable[[str, str], None] | None) -> GenerationResult:
    for event in events:
        if event.kind == "finish":
            return event.result
        if on_text is not None and event.text:
            on_text(event.kind, event.text)
    raise AssertionError("a generation always ends with a finish event")


def one_shot(model_path: Path, request: ChatRequest, *, n_ctx: int = 4096, verbose: bool = False,
             kv_type: str = "f16", placement: Placement | None = None, n_threads: int | None = None,
             n_threads_batch: int | None = None, on_text: Callable[[str, str], None] | None = None, mmproj: Path | None = None,
             on_loaded: Callable[[], None] | None = None) -> GenerationResult:
    """Load, answer one request, free; `on_loaded` is called once the model (and projector) are ready."""
    with Model.load(model_path, n_ctx=n_ctx, verbose=verbose, kv_type=kv_type, placement=placement,
                    n_threads=n_threads, n_threads_batch=n_threads_batch) as model:
        if mmproj is not None:
            from smallfour.vision import attach_projector, open_projector

            attach_projector(model, open_projector(model, mmproj,
                                                   use_gpu=(placement or Placement()).n_gpu_layers != 0))
        if on_loaded is not None:
            on_loaded()
        return complete(model, request, on_text=on_text)


def dry_run(model_path: Path, request: ChatRequest, *, verbose: bool = False) -> tuple[str, list[int]]:
    """The prompt text the template renders for a request, and its token ids; only the vocabulary is loaded."""
    with Model.load(model_path, verbose=verbose, vocab_only=True) as model:
        return prompt_tokens(model, request)


__all__ = ["EFFORTS", "PRESETS", "ChatRequest", "Event", "GeneratedReply", "GenerationResult", "Sampling", "complete",
           "continue_tokens", "dry_run", "generate_from", "generated_reply", "interpret", "one_shot", "prompt_tokens",
           "prompt_with_images", "resolve_request", "stream_generate", "user_turn", "with_generated"]
