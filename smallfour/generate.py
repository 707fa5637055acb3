"""Chat completions: messages through the model's template into llama.cpp, and back as
separate thinking, answer and tool calls.

Mistral Small 4 thinks inside `[THINK]…[/THINK]` when asked for `reasoning_effort:
"high"`, and calls tools as `[TOOL_CALLS]name[ARGS]{json}`. The sampling loop
watches those control tokens as they stream, so thinking and answer arrive on
separate channels, a thinking budget can close the thought by forcing `[/THINK]`,
and tool calls come out as OpenAI-style objects.
"""

from __future__ import annotations

import codecs
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from smallfour.errors import SmallfourError
from smallfour.model import Model
from smallfour.placement import Placement
from smallfour.prompts import Message, render_segments, user_turn
from smallfour.vision import ImageSpan, expand_request

EFFORTS = ("none", "high")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    max_tokens: int = 2048
    seed: int | None = None
    # token id → added to its logit (OpenAI's `logit_bias`; -100 bans, +100 forces).
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Preset:
    effort: str
    sampling: Sampling
    think_budget: int | None
    description: str


# Defaults follow what Mistral published for the two models Small 4 merges: Mistral Small 3.2
# (instant answers) recommends temperature 0.15; Magistral (step-by-step reasoning) recommends
# temperature 0.7 and top-p 0.95. Every value can be overridden on the command line.
PRESETS: dict[str, Preset] = {
    "instant": Preset("none", Sampling(temperature=0.15, top_p=1.0, top_k=0, max_tokens=2048), None,
                      "no thinking, quick and focused answers (Mistral Small 3.2 style)"),
    "think": Preset("high", Sampling(temperature=0.7, top_p=0.95, top_k=0, max_tokens=16384), None,
                    "thinks step by step in [THINK]…[/THINK] first (Magistral style); may think long"),
    "think-budget": Preset("high", Sampling(temperature=0.7, top_p=0.95, top_k=0, max_tokens=8192), 2048,
                           "thinks, but at most 2048 thinking tokens before it must answer"),
}
DEFAULT_PRESET = "instant"


@dataclass
class ChatRequest:
    messages: list[Message]
    effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    think_budget: int | None = None


@dataclass
class GenerationResult:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    finish_reason: str = "length"
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt positions reused from the KV cache

    def as_json(self) -> dict:
        def rate(n: int, ms: float) -> float:
            return round(n / (ms / 1000.0), 2) if ms > 0 else 0.0

        out: dict[str, Any] = {
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens,
                      "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}},
            "timings": {"prompt_ms": round(self.prompt_ms, 2), "prompt_per_second": rate(self.prompt_tokens, self.prompt_ms),
                        "predicted_ms": round(self.predicted_ms, 2),
                        # the first token is timed with the prompt
                        "predicted_per_second": rate(self.completion_tokens - 1, self.predicted_ms)},
        }
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_error:
            out["tool_call_error"] = self.tool_call_error
        return out


def check_effort(effort: str | None) -> None:
    if effort is not None and effort not in EFFORTS:
        raise SmallfourError(f"reasoning effort {effort!r}: Mistral Small 4 accepts {' or '.join(EFFORTS)}")


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
    return "".join(s.text for s in segments), tokens, spans


@dataclass(frozen=True)
class Event:
    """One step of a generation, as `stream_generate` yields them.

    kind "reasoning" / "content": `text` is the next piece of the thought / the answer;
    "tool_calls": the turn ends in tool calls (`result.tool_calls`); "finish": the last event,
    `result` holds the whole turn.
    """

    kind: str
    text: str = ""
    result: GenerationResult | None = None


class _Stream:
    """Tracks which channel the model is writing in, from the control tokens it emits."""

    def __init__(self, model: Model, parse_tools: bool):
        control = model.control_tokens
        self.think_open, self.think_close = control.get("[THINK]"), control.get("[/THINK]")
        self.tool_calls, self.args = (control.get("[TOOL_CALLS]"), control.get("[ARGS]")) if parse_tools else (None, None)
        self.channel = "content"
        self.thought_closed = False
        self.calls: list[list[str]] = []  # [name, arguments] as streamed


class Sampler:
    """llama.cpp's own sampler chain for one request: logit bias, top-k, top-p, min-p, temperature, seed.

    The chain is what llama-cpp-python builds for `Llama.generate` (and llama.cpp's common
    sampler), so seeded runs draw the same way; logit bias runs natively instead of a Python
    pass over the vocabulary every token.
    """

    def __init__(self, model: Model, sampling: Sampling):
        import llama_cpp as lib

        self._lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sampling.logit_bias:
            entries = (lib.llama_logit_bias * len(sampling.logit_bias))(
                *(lib.llama_logit_bias(token, bias) for token, bias in sampling.logit_bias.items()))
            self._add(lib.llama_sampler_init_logit_bias(model.n_vocab, len(entries), entries))
        if sampling.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
        else:
            self._add(lib.llama_sampler_init_top_k(sampling.top_k))
            self._add(lib.llama_sampler_init_top_p(sampling.top_p, 1))
            self._add(lib.llama_sampler_init_min_p(sampling.min_p, 1))
            self._add(lib.llama_sampler_init_temp(sampling.temperature))
            self._add(lib.llama_sampler_init_dist(sampling.seed if sampling.seed is not None
                                                  else lib.LLAMA_DEFAULT_SEED))

    def _add(self, sampler) -> None:
        self._lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, model: Model) -> int:
        """A token from the logits of the last decoded position (the sampler accepts it)."""
        return int(self._lib.llama_sampler_sample(self.chain, model.context, -1))

    def accept(self, token: int) -> None:
        """Tell the chain about a token chosen without it (a forced `[/THINK]`)."""
        self._lib.llama_sampler_accept(self.chain, token)

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


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
    """`stream_generate` after an already-tokenized prompt (images at `spans`)."""
    sampling = request.sampling
    started = time.perf_counter()
    result = GenerationResult(prompt_tokens=len(tokens))
    result.cached_tokens = model.prefill(tokens, spans)
    stream = _Stream(model, parse_tools=bool(request.tools))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    budget = min(sampling.max_tokens, model.n_ctx - len(tokens))
    sampler = Sampler(model, sampling)
    first_token_at = None
    try:
        while True:
            token = _next_token(model, sampler, stream, result, request.think_budget)
            first_token_at = first_token_at or time.perf_counter()
            if model.is_end(token):
                result.finish_reason = "stop"
                break
            result.tokens.append(token)
            result.completion_tokens += 1
            text = _route(model, token, stream, decoder, result)
            if text:
                yield Event(stream.channel, text)
            if should_stop is not None and should_stop():
                result.finish_reason = "interrupted"
                break
            if result.completion_tokens >= budget:
                break
            model.decode([token])
    finally:
        sampler.close()
    finished = time.perf_counter()
    first_token_at = first_token_at or finished
    result.prompt_ms, result.predicted_ms = (first_token_at - started) * 1000.0, (finished - first_token_at) * 1000.0
    _finish_tool_calls(stream, result)
    if result.tool_calls:
        yield Event("tool_calls", result=result)
    yield Event("finish", result=result)


def _next_token(model: Model, sampler: Sampler, stream: _Stream, result: GenerationResult,
                think_budget: int | None) -> int:
    """The thinking budget: once spent, `[/THINK]` is the token; once closed, the thought stays closed."""
    if think_budget is not None and stream.think_close is not None:
        if stream.channel == "reasoning" and result.reasoning_tokens >= think_budget:
            sampler.accept(stream.think_close)
            return stream.think_close
        if stream.thought_closed and stream.think_open is not None:
            model.logits()[stream.think_open] = -np.inf
    return sampler.sample(model)


def complete(model: Model, request: ChatRequest, *, on_text: Callable[[str, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate one assistant turn. `on_text(channel, text)` gets "reasoning" and "content" pieces."""
    return _collect(stream_generate(model, request, should_stop=should_stop), on_text)


def continue_tokens(model: Model, tokens: list[int], request: ChatRequest, *,
                    on_text: Callable[[str, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate after already-tokenized prompt `tokens`, with the request's sampling and budget."""
    return _collect(generate_from(model, tokens, request, should_stop=should_stop), on_text)


def _collect(events: Iterator[Event], on_text: Callable[[str, str], None] | None) -> GenerationResult:
    for event in events:
        if event.kind == "finish":
            return event.result
        if on_text is not None and event.text:
            on_text(event.kind, event.text)
    raise AssertionError("a generation always ends with a finish event")


def _route(model: Model, token: int, stream: _Stream, decoder, result: GenerationResult) -> str:
    """Account one generated token to its channel; the visible text it adds, if any.

    Every token generated inside a thought counts as a thinking token, control tokens
    included: that is what the thinking budget limits.
    """
    if stream.channel == "reasoning":
        result.reasoning_tokens += 1
        if token == stream.think_close:
            stream.channel = "content"
            stream.thought_closed = True
            return ""
    elif token == stream.think_open:
        stream.channel = "reasoning"
        return ""
    if token == stream.tool_calls:
        stream.channel = "tool"
        stream.calls.append(["", None])
        return ""
    if token == stream.args and stream.channel == "tool":
        stream.calls[-1][1] = ""
        return ""
    text = decoder.decode(model.piece(token))
    if stream.channel == "reasoning":
        result.reasoning_content += text
    elif stream.channel == "tool":
        call = stream.calls[-1]
        if call[1] is None:
            call[0] += text
        else:
            call[1] += text
        return ""
    else:
        result.content += text
    return text


def interpret(model: Model, tokens: list[int], *, parse_tools: bool = True) -> GenerationResult:
    """What a finished generation means: thinking, answer and tool calls, as `complete` reports them."""
    stream = _Stream(model, parse_tools)
    result = GenerationResult(tokens=list(tokens), completion_tokens=len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        _route(model, token, stream, decoder, result)
    _finish_tool_calls(stream, result)
    return result


def _finish_tool_calls(stream: _Stream, result: GenerationResult) -> None:
    if not stream.calls:
        return
    calls, problems = [], []
    for index, (name, arguments) in enumerate(stream.calls):
        name = name.strip()
        if not name or arguments is None:
            problems.append(f"tool call {index + 1} has no {'name' if not name else '[ARGS]'}")
            continue
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as exc:
            problems.append(f"tool call {index + 1} ({name}) has arguments that are not JSON: {exc.msg}")
            continue
        if not isinstance(parsed, dict):
            problems.append(f"tool call {index + 1} ({name}) has arguments that are not a JSON object")
            continue
        calls.append({"id": "call_" + secrets.token_hex(6), "type": "function",
                      "function": {"name": name, "arguments": json.dumps(parsed, ensure_ascii=False)}})
    if problems:
        result.tool_call_error = "; ".join(problems)
    else:
        result.tool_calls = calls
        result.finish_reason = "tool_calls"


def resolve_request(messages: list[Message], *, preset: str | None = None, effort: str | None = None,
                    think_budget: int | None = None, tools: list | None = None, **overrides: Any) -> ChatRequest:
    """A request from a preset plus explicit choices; `overrides` are Sampling fields left None when unset."""
    if preset is not None and preset not in PRESETS:
        raise SmallfourError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset or DEFAULT_PRESET]
    check_effort(effort)
    sampling = replace(base.sampling, **{k: v for k, v in overrides.items() if v is not None})
    budget = think_budget if think_budget is not None else base.think_budget
    if budget is not None and budget < 1:
        raise SmallfourError("--think-budget must be at least 1 token")
    return ChatRequest(messages, effort if effort is not None else base.effort, tools, sampling, budget)


def one_shot(model_path: Path, request: ChatRequest, *, n_ctx: int = 4096, verbose: bool = False,
             kv_type: str = "f16", placement: Placement | None = None, n_threads: int | None = None,
             on_text: Callable[[str, str], None] | None = None, mmproj: Path | None = None) -> GenerationResult:
    """Load, answer one request, free."""
    with Model.load(model_path, n_ctx=n_ctx, verbose=verbose, kv_type=kv_type, placement=placement,
                    n_threads=n_threads) as model:
        if mmproj is not None:
            from smallfour.vision import attach_projector, open_projector

            attach_projector(model, open_projector(model, mmproj,
                                                   use_gpu=(placement or Placement()).n_gpu_layers != 0))
        return complete(model, request, on_text=on_text)


def dry_run(model_path: Path, request: ChatRequest, *, verbose: bool = False) -> tuple[str, list[int]]:
    """The prompt text the template renders for a request, and its token ids; only the vocabulary is loaded."""
    with Model.load(model_path, verbose=verbose, vocab_only=True) as model:
        return prompt_tokens(model, request)


__all__ = ["ChatRequest", "Event", "GenerationResult", "PRESETS", "Sampler", "Sampling", "complete",
           "continue_tokens", "dry_run", "generate_from", "interpret", "one_shot", "prompt_tokens", "resolve_request",
           "stream_generate", "user_turn"]
