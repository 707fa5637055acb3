"""Chat completion requests and results: sampling settings, presets, the OpenAI-shaped result.

Plain data shared by the generation engine, the front ends and the Python API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from smallfour.errors import SmallfourError
from smallfour.prompts import Message

EFFORTS = ("none", "high")


@dataclass(frozen=True)
class Constraint:
    """What a turn may consist of, enforced token by token by llama.cpp's grammar sampler.

    `answer`: "json" (a JSON value matching `schema`, JSON text; None = any object), "text"
    (free text, but no tool call unless `tools` allows one after it) or "none" (the turn must be
    tool calls). `tools`: the functions it may call, as (name, parameters schema JSON text or
    None for any object); `many_calls` False allows at most one call. `think`: a thought in
    `[THINK]…[/THINK]` may come first (requests that think). `smallfour.grammar` turns this
    into GBNF.
    """

    answer: str = "text"
    schema: str | None = None
    tools: tuple[tuple[str, str | None], ...] = ()
    many_calls: bool = True
    think: bool = False


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
    # OpenAI's penalties over the tokens generated so far (llama.cpp's penalties sampler); 0 = off.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # None: no log probabilities; k ≥ 0: each answer token's, with the k likeliest alternatives.
    logprobs: int | None = None
    constraint: Constraint | None = None


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
    # OpenAI's `logprobs.content` entries for the answer's tokens, when the request asked for them.
    logprobs: list[dict[str, Any]] | None = None

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
