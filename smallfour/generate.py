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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from smallfour.errors import SmallfourError
from smallfour.placement import Placement
from smallfour.prompts import Message, render_segments, user_turn
from smallfour.runtime import chat_template, control_tokens, load_model, tokenize_prompt

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


def prompt_tokens(llm, request: ChatRequest) -> tuple[str, list[int]]:
    """The rendered prompt and its token ids, exactly as mistral-common would encode the request."""
    text, tokens, _ = prompt_with_images(llm, request)
    return text, tokens


def prompt_with_images(llm, request: ChatRequest):
    """Prompt text, token ids (images expanded to mistral-common's grids) and where each image sits."""
    from smallfour.vision import expand_request

    check_effort(request.effort)
    settings: dict[str, Any] = {}
    if request.effort is not None:
        settings["reasoning_effort"] = request.effort
    if request.tools:
        settings["tools"] = request.tools
    segments = render_segments(chat_template(llm), request.messages, **settings)
    tokens, spans = expand_request(llm, request.messages, tokenize_prompt(llm, segments))
    return "".join(s.text for s in segments), tokens, spans


class _Stream:
    """Tracks which channel the model is writing in, from the control tokens it emits."""

    def __init__(self, llm, parse_tools: bool):
        control = control_tokens(llm)
        self.think_open, self.think_close = control.get("[THINK]"), control.get("[/THINK]")
        self.tool_calls, self.args = (control.get("[TOOL_CALLS]"), control.get("[ARGS]")) if parse_tools else (None, None)
        self.channel = "content"
        self.thought_closed = False
        self.calls: list[list[str]] = []  # [name, arguments] as streamed


def complete(llm, request: ChatRequest, *, on_text: Callable[[str, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate one assistant turn. `on_text(channel, text)` gets "reasoning" and "content" pieces."""
    _, tokens, spans = prompt_with_images(llm, request)
    if not spans:
        return continue_tokens(llm, tokens, request, on_text=on_text, should_stop=should_stop)
    # Images go in through libmtmd first; generate() then finds the whole prompt cached.
    from smallfour.vision import eval_prompt, projector_of

    started = time.perf_counter()
    eval_prompt(llm, projector_of(llm), tokens, spans)
    images_ms = (time.perf_counter() - started) * 1000.0
    result = continue_tokens(llm, tokens, request, on_text=on_text, should_stop=should_stop)
    result.prompt_ms += images_ms
    return result


def continue_tokens(llm, tokens: list[int], request: ChatRequest, *,
                    on_text: Callable[[str, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate after already-tokenized prompt `tokens`, with the request's sampling and budget."""
    sampling = request.sampling
    if len(tokens) >= llm.n_ctx():
        raise SmallfourError(f"prompt is {len(tokens)} tokens, the context holds {llm.n_ctx()}")
    # Without a seed each request samples afresh; a previous request's seed must not carry over.
    import llama_cpp

    llm.set_seed(sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
    stream = _Stream(llm, parse_tools=bool(request.tools))
    result = GenerationResult(prompt_tokens=len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    budget = min(sampling.max_tokens, llm.n_ctx() - len(tokens))
    processors = _logits_processors(sampling, request.think_budget, stream, result)
    started = time.perf_counter()
    first_token_at = None
    for token in llm.generate(tokens, temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              min_p=sampling.min_p, repeat_penalty=1.0, logits_processor=processors):
        first_token_at = first_token_at or time.perf_counter()
        if token == llm.token_eos():
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        result.completion_tokens += 1
        text = _route(llm, token, stream, decoder, result)
        if text and on_text is not None:
            on_text(stream.channel, text)
        if should_stop is not None and should_stop():
            result.finish_reason = "interrupted"
            break
        if result.completion_tokens >= budget:
            break
    finished = time.perf_counter()
    first_token_at = first_token_at or finished
    result.prompt_ms, result.predicted_ms = (first_token_at - started) * 1000.0, (finished - first_token_at) * 1000.0
    _finish_tool_calls(stream, result)
    return result


def _route(llm, token: int, stream: _Stream, decoder, result: GenerationResult) -> str:
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
    text = decoder.decode(llm.detokenize([token], special=False))
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


def interpret(llm, tokens: list[int], *, parse_tools: bool = True) -> GenerationResult:
    """What a finished generation means: thinking, answer and tool calls, as `complete` reports them."""
    stream = _Stream(llm, parse_tools)
    result = GenerationResult(tokens=list(tokens), completion_tokens=len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        _route(llm, token, stream, decoder, result)
    _finish_tool_calls(stream, result)
    return result


def _logits_processors(sampling: Sampling, think_budget: int | None, stream: _Stream, result: GenerationResult):
    """Logit bias, and the thinking budget: once spent, `[/THINK]` is the only token left to sample."""
    if not sampling.logit_bias and think_budget is None:
        return None
    bias_ids = np.array(list(sampling.logit_bias), dtype=np.int64)
    bias_values = np.array(list(sampling.logit_bias.values()), dtype=np.float32)

    def process(input_ids, scores):
        if bias_ids.size:
            scores[bias_ids] += bias_values
        if think_budget is None or stream.think_close is None:
            return scores
        if stream.channel == "reasoning" and result.reasoning_tokens >= think_budget:
            forced = np.full_like(scores, -np.inf)
            forced[stream.think_close] = 0.0
            return forced
        if stream.thought_closed and stream.think_open is not None:
            # One thought per turn: once the budget closed it, it stays closed.
            scores[stream.think_open] = -np.inf
        return scores

    from llama_cpp import LogitsProcessorList

    return LogitsProcessorList([process])


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


def one_shot(model: Path, request: ChatRequest, *, n_ctx: int = 4096, verbose: bool = False, kv_type: str = "f16",
             placement: Placement | None = None,
             on_text: Callable[[str, str], None] | None = None, mmproj: Path | None = None) -> GenerationResult:
    llm = load_model(model, n_ctx=n_ctx, seed=request.sampling.seed, verbose=verbose, kv_type=kv_type,
                     placement=placement)
    if mmproj is not None:
        from smallfour.vision import attach_projector, open_projector

        attach_projector(llm, open_projector(llm, mmproj, use_gpu=(placement or Placement()).n_gpu_layers != 0))
    return complete(llm, request, on_text=on_text)


def dry_run(model: Path, request: ChatRequest, *, verbose: bool = False) -> tuple[str, list[int]]:
    """The prompt text the template renders for a request, and its token ids; nothing generated."""
    llm = load_model(model, n_ctx=256, verbose=verbose)
    return prompt_tokens(llm, request)


__all__ = ["ChatRequest", "GenerationResult", "PRESETS", "Sampling", "complete", "continue_tokens", "dry_run",
           "interpret", "one_shot",
           "prompt_tokens", "resolve_request", "user_turn"]
