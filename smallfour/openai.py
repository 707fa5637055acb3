"""The one OpenAI chat-completions layer: request bodies in, response bodies and stream chunks out.

`smallfour batch` (each line's `body`) and `smallfour serve` (each POST) read requests here, so
a body means the same in both, and both answer with the same `chat.completion` objects.

Every body field is either honoured or refused with an error naming it (`FIELDS` lists them;
docs/serve.md explains each). Where OpenAI's clients speak a dialect the model does not, the
request is translated rather than refused:

- `reasoning_effort`: the model knows "none" and "high". OpenAI's "minimal" maps to "none";
  "low", "medium" and "xhigh" map to "high" (any thinking at all is the model's one thinking
  mode). The effort used is reported in the response (`reasoning_effort`) when it differs.
- role "developer" is a system message; legacy `functions` / `function_call` (and assistant
  `function_call`, role "function") are tools / tool_choice / tool calls / tool results.
- tool-call arguments in the conversation are parsed and re-serialised with
  `json.dumps(…, ensure_ascii=False)`, as mistral-common encodes them, so compact,
  pretty-printed or object-valued arguments give mistral-common's own token ids.
- `tool_choice` "required" or a named function, `parallel_tool_calls: false` and
  `response_format` json_object / json_schema become a `Constraint` that llama.cpp's grammar
  sampler enforces (`smallfour.grammar`).
"""

from __future__ import annotations

import copy
import json
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from smallfour.completion import Constraint
from smallfour.errors import SmallfourError
from smallfour.messages import MessageError, check_messages

if TYPE_CHECKING:
    from smallfour.completion import ChatRequest, GenerationResult

MAX_STOP = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
# What clients send → what Mistral Small 4 knows. "none" and "high" are the model's own values.
EFFORT_MAP = {"none": "none", "minimal": "none", "low": "high", "medium": "high", "high": "high", "xhigh": "high"}
# Fields that change nothing on a local server, accepted when they have these values (None = any).
NO_EFFECT: dict[str, tuple | None] = {
    "model": None,            # one model is served; its name comes back in `model`
    "user": None, "safety_identifier": None, "prompt_cache_key": None, "metadata": None,
    "store": (False,),        # nothing is stored
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
}
HONOURED = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
            "stop", "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
            "reasoning_effort", "response_format", "logprobs", "top_logprobs", "n", "stream", "stream_options",
            "frequency_penalty", "presence_penalty")
FIELDS = HONOURED + tuple(NO_EFFECT)

# HTTP status → OpenAI's error `type`.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class RequestError(Exception):
    """Why a request cannot run: OpenAI's error fields and the HTTP status it is answered with."""

    def __init__(self, code: str, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.param, self.status = code, message, param, status

    def body(self) -> dict:
        """`{"error": {message, type, param, code}}`, as OpenAI answers."""
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _invalid(name: str, message: str) -> RequestError:
    return RequestError("invalid_request", message, param=name)


@dataclass
class ChatCall:
    """One chat-completions body, understood: the request to generate, and how to answer it."""

    request: ChatRequest
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    effort_asked: str | None = None   # the client's reasoning_effort, when it was mapped to another

    def requests(self) -> list[ChatRequest]:
        """One request per choice; with a seed, choice i draws with seed + i so the choices differ."""
        seed = self.request.sampling.seed
        if self.n == 1 or seed is None:
            return [self.request] * self.n
        return [replace(self.request, sampling=replace(self.request.sampling, seed=seed + i)) for i in range(self.n)]


# ---------------------------------------------------------------------------------------------
# Body fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _number(body: dict, name: str, low: float, high: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise _invalid(name, f"body.{name} must be a number {bound}, got {json.dumps(value)}")
    return float(value)


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bound = f" between {low} and {high}" if high is not None else f" of at least {low}" if low is not None else ""
        raise _invalid(name, f"body.{name} must be an integer{bound}, got {json.dumps(value)}")
    return value


def _boolean(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _invalid(name, f"body.{name} must be true or false, got {json.dumps(value)}")
    return value


def _canonical_arguments(arguments: Any) -> Any:
    """Tool-call arguments as mistral-common encodes them: parsed, then `json.dumps(ensure_ascii=False)`."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments  # mistral-common keeps text that is not JSON as it is
    return json.dumps(arguments, ensure_ascii=False)


def _messages(body: dict) -> list[dict]:
    """The conversation, translated from OpenAI's dialects (developer, functions) and checked."""
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = copy.deepcopy(messages)
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            if message.get("role") == "developer":
                message["role"] = "system"
            elif message.get("role") == "function":
                message["role"] = "tool"
            call = message.pop("function_call", None)
            if call is not None and message.get("role") == "assistant" and "tool_calls" not in message:
                message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": call}]
            calls = message.get("tool_calls")
            if calls is None:
                continue
            if not isinstance(calls, list):
                raise _invalid("messages", f"body.messages[{i}].tool_calls must be a list of tool calls")
            for j, tool_call in enumerate(calls):
                function = tool_call.get("function") if isinstance(tool_call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise _invalid("messages", f"body.messages[{i}].tool_calls[{j}] must be {{\"type\": "
                                               "\"function\", \"function\": {\"name\", \"arguments\"}}")
                function["arguments"] = _canonical_arguments(function.get("arguments") or {})
    try:
        return check_messages(messages, "body.messages")
    except MessageError as exc:
        raise _invalid("messages", str(exc)) from None


def _tool_list(body: dict) -> tuple[list | None, Any]:
    """`tools` and `tool_choice`, from the legacy `functions` / `function_call` when those are given."""
    if body.get("functions") is not None:
        if body.get("tools") is not None:
            raise _invalid("functions", "give either body.tools or the legacy body.functions, not both")
        functions = body["functions"]
        if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
            raise _invalid("functions", "body.functions must be a list of {\"name\", \"parameters\"} objects")
        call = body.get("function_call")
        choice = {"type": "function", "function": {"name": call.get("name")}} if isinstance(call, dict) else call
        return [{"type": "function", "function": f} for f in functions], choice
    if body.get("function_call") is not None:
        raise _invalid("function_call", "body.function_call needs body.functions")
    return body.get("tools"), body.get("tool_choice")


def _tools(body: dict) -> tuple[list | None, Constraint | None]:
    """The tools the prompt lists, and the constraint `tool_choice` / `parallel_tool_calls` need, if any."""
    tools, choice = _tool_list(body)
    parallel = _boolean(body, "parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise _invalid("tool_choice", f"body.tool_choice {json.dumps(choice)} needs body.tools")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise _invalid("tools", "body.tools must be a list of {\"type\": \"function\", \"function\": {\"name\", …}} "
                                "objects")
    if choice == "none" or not tools:
        return None, None
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if choice not in (None, "auto", "required") and named is None:
        raise _invalid("tool_choice", f"body.tool_choice {json.dumps(choice)} is not one of \"none\", \"auto\", "
                                      "\"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}")
    names = [t["function"]["name"] for t in tools]
    if named is not None and named not in names:
        raise _invalid("tool_choice", f"body.tool_choice names {json.dumps(named)}, which is not in body.tools")
    if choice in (None, "auto") and parallel is not False:
        return tools, None  # the model decides; nothing to enforce
    from smallfour.grammar import check_schema

    allowed = tuple((t["function"]["name"], check_schema(t["function"]["parameters"],
                                                         f"body.tools[{i}].function.parameters")
                     if t["function"].get("parameters") is not None else None)
                    for i, t in enumerate(tools) if named is None or t["function"]["name"] == named)
    answer = "text" if choice in (None, "auto") else "none"
    return tools, Constraint(answer=answer, tools=allowed, many_calls=parallel is not False and named is None)


def _response_format(body: dict) -> tuple[str, str | None] | None:
    """("json", schema JSON text or None) for a JSON response format; None for text."""
    value = body.get("response_format")
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return "json", None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _invalid("response_format", "body.response_format.json_schema must be {\"name\", \"schema\": {…}}")
        from smallfour.grammar import check_schema

        return "json", check_schema(spec.get("schema", {"type": "object"}), "body.response_format.json_schema.schema")
    raise _invalid("response_format", f"body.response_format {json.dumps(value)} is not supported; use "
                                      "{\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                                      "\"json_schema\", \"json_schema\": {…}}")


def _logit_bias(body: dict, n_vocab: int | None) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _invalid("logit_bias", "body.logit_bias must be an object {\"TOKEN_ID\": BIAS}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise _invalid("logit_bias", f"body.logit_bias key {json.dumps(key)} is not a token id") from None
        if token < 0 or (n_vocab is not None and token >= n_vocab):
            raise _invalid("logit_bias", f"body.logit_bias token id {token} is outside the vocabulary"
                                         + (f" (0–{n_vocab - 1})" if n_vocab else ""))
        if not _is_number(value) or not -100 <= value <= 100:
            raise _invalid("logit_bias", f"body.logit_bias[{json.dumps(key)}] must be a number between -100 and "
                                         f"100, got {json.dumps(value)}")
        out[token] = float(value)
    return out


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise _invalid("stop", f"body.stop must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings")
    return tuple(stop)


def _logprobs(body: dict) -> int | None:
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise _invalid("top_logprobs", "body.top_logprobs needs body.logprobs: true")
    return (top or 0) if wanted else None


def _refuse_unknown(body: dict) -> None:
    for name, value in body.items():
        if name in HONOURED:
            continue
        if name not in NO_EFFECT:
            raise RequestError("unsupported_parameter", f"body.{name} is not supported by smallfour (see "
                                                        "docs/serve.md for the fields it honours)", param=name)
        allowed = NO_EFFECT[name]
        if value is not None and allowed is not None and value not in allowed:
            raise RequestError("unsupported_value", f"body.{name} = {json.dumps(value)} is not supported by "
                                                    f"smallfour (only {' or '.join(map(json.dumps, allowed))})",
                               param=name)


def _effort(body: dict) -> tuple[str | None, str | None]:
    """(the effort the model gets, the client's value when it was mapped to another)."""
    asked = body.get("reasoning_effort")
    if asked is None:
        return None, None
    if asked not in EFFORT_MAP:
        raise _invalid("reasoning_effort", f"body.reasoning_effort {json.dumps(asked)}: Mistral Small 4 accepts "
                                           "\"none\" or \"high\" (and maps \"minimal\" to \"none\"; \"low\", "
                                           "\"medium\" and \"xhigh\" to \"high\")")
    used = EFFORT_MAP[asked]
    return used, (asked if asked != used else None)


def parse_body(body: Any, *, preset: str | None = None, think_budget: int | None = None,
               n_vocab: int | None = None) -> ChatCall:
    """A chat-completions body as a ChatCall; RequestError naming the field if it cannot run.

    `reasoning_effort` picks the defaults: "high" thinks with the `think` preset's sampling (or
    `preset`'s, if that thinks too), "none" answers with the `instant` preset's; without it the
    request gets `preset`. Fields in the body override the preset's values.
    """
    from smallfour.completion import PRESETS, resolve_request

    if not isinstance(body, dict):
        raise RequestError("invalid_request", "body must be a JSON object (a chat-completions request)")
    messages = _messages(body)
    effort, asked = _effort(body)
    _refuse_unknown(body)
    base = preset or "instant"
    if base not in PRESETS:
        raise SmallfourError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
    if effort is not None and PRESETS[base].effort != effort:
        base = "think" if effort == "high" else "instant"
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    top_k = _integer(body, "top_k", -1)
    tools, constraint = _tools(body)
    json_answer = _response_format(body)
    if json_answer is not None and (constraint is None or constraint.answer != "none"):
        # The answer must be JSON; with tools (tool_choice auto) a call remains allowed instead.
        constraint = replace(constraint or Constraint(tools=tuple((t["function"]["name"], None) for t in tools or ())),
                             answer="json", schema=json_answer[1])
    thinks = (effort or PRESETS[base].effort) == "high"
    if constraint is not None:
        constraint = replace(constraint, think=thinks)
    sampling = dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0),
                    top_p=_number(body, "top_p", 0.0, 1.0), min_p=_number(body, "min_p", 0.0, 1.0),
                    top_k=0 if top_k == -1 else top_k,  # vLLM spells "no limit" -1
                    seed=_integer(body, "seed"), logit_bias=_logit_bias(body, n_vocab),
                    frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
                    presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
                    logprobs=_logprobs(body), constraint=constraint)
    stop = _stop(body)
    n = _integer(body, "n", 1, MAX_N) or 1
    stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _invalid("stream_options", "body.stream_options must be {\"include_usage\": true or false}")
    try:
        request = resolve_request(messages, preset=base, effort=effort,
                                  think_budget=think_budget if thinks else None, tools=tools, **sampling)
    except SmallfourError as exc:
        raise RequestError("invalid_request", str(exc)) from None
    return ChatCall(request, stop, n, stream, bool(options and options.get("include_usage")), asked)


def request_from_body(body: Any, *, preset: str | None = None, think_budget: int | None = None,
                      n_vocab: int | None = None, where: str = "batch jobs") -> tuple[ChatRequest, tuple[str, ...]]:
    """A body that answers with one complete choice (a batch line, `run --messages`): its request and
    stop strings. `where` names the front end in the refusal of `n` and `stream`."""
    call = parse_body(body, preset=preset, think_budget=think_budget, n_vocab=n_vocab)
    for name, value, default in (("n", call.n, 1), ("stream", call.stream, False)):
        if value != default:
            raise RequestError("invalid_request", f"body.{name} = {json.dumps(value)} is not supported by smallfour "
                                                  f"{where}", param=name)
    return call.request, call.stop


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def apply_stop(result: GenerationResult, stop: tuple[str, ...]) -> None:
    """Cut the answer before the first stop string, as OpenAI does, and call it a stop."""
    cuts = [i for i in (result.content.find(s) for s in stop) if i >= 0]
    if cuts:
        result.content = result.content[:min(cuts)]
        result.finish_reason = "stop"


def _message(result: GenerationResult) -> dict:
    message: dict[str, Any] = {"role": "assistant",
                               "content": result.content if result.content or not result.tool_calls else None}
    if result.reasoning_content:
        message["reasoning_content"] = result.reasoning_content
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    if result.tool_call_error:
        message["tool_call_error"] = result.tool_call_error
    return message


def logprobs_field(result: GenerationResult) -> dict | None:
    return {"content": result.logprobs, "refusal": None} if result.logprobs is not None else None


def usage(results: Sequence[GenerationResult]) -> dict:
    """OpenAI's usage for the choices of one request (the prompt is counted once)."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(r.reasoning_tokens for r in results)},
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def completion_body(results: GenerationResult | Sequence[GenerationResult], model_name: str, *,
                    effort: str | None = None, completion_id: str | None = None) -> dict:
    """A chat.completion object, as OpenAI and vLLM return it (plus llama.cpp-server's timings).

    `effort`: the reasoning effort the model used, reported when it is not what the client asked.
    """
    if not isinstance(results, Sequence):
        results = [results]
    body = {"id": completion_id or new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "message": _message(r), "logprobs": logprobs_field(r),
                         "finish_reason": r.finish_reason} for i, r in enumerate(results)],
            "usage": usage(results), "timings": results[0].as_json()["timings"]}
    if effort is not None:
        body["reasoning_effort"] = effort
    return body


def success_line(custom_id: str, result: GenerationResult, model_name: str) -> dict:
    """A batch output line for an answered request (OpenAI's Batch format)."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": new_id("req_"), "body": completion_body(result, model_name)},
            "error": None}


def error_line(custom_id: str, error: RequestError) -> dict:
    """A batch output line for a request that could not run, as OpenAI's Batch API writes one: the
    HTTP status and error body the request would have got, and the line's own `error` null."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": error.status, "request_id": new_id("req_"), "body": error.body()},
            "error": None}


def chunk(completion_id: str, created: int, model_name: str, choices: list[dict], *,
          usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk` of a stream."""
    out = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def delta(index: int, fields: dict, *, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_call_deltas(result: GenerationResult) -> list[dict]:
    """The finished turn's tool calls as stream deltas (each whole: the model's JSON is checked first)."""
    return [{"index": i, "id": call["id"], "type": "function", "function": dict(call["function"])}
            for i, call in enumerate(result.tool_calls)]


class StopFilter:
    """Streams the answer, holding back what could be the start of a stop string.

    `feed(text)` returns what may be sent now; once a stop string appears, `hit` is true and
    nothing after it is ever returned.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.pending, self.hit = stop, "", False
        self.hold = max(map(len, stop), default=1) - 1

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stop:
            return text
        self.pending += text
        cuts = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.hit = True
            out, self.pending = self.pending[:min(cuts)], ""
            return out
        keep = len(self.pending) - self.hold
        out, self.pending = (self.pending[:keep], self.pending[keep:]) if keep > 0 else ("", self.pending)
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


__all__ = ["EFFORT_MAP", "FIELDS", "HONOURED", "NO_EFFECT", "ChatCall", "RequestError", "StopFilter", "apply_stop",
           "chunk", "completion_body", "delta", "error_line", "logprobs_field", "new_id", "parse_body",
           "request_from_body", "success_line", "tool_call_deltas", "usage"]
