"""Batch jobs in the OpenAI Batch format: a JSONL of chat requests in, a JSONL of results out.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {…}}`
with an OpenAI chat-completions body; each output line is `{"id", "custom_id", "response":
{"status_code", "request_id", "body": <chat.completion>}, "error": null}`, or, for a line that
cannot run, `{"id", "custom_id", "response": null, "error": {"code", "message"}}`. That is what
OpenAI's Batch API and vLLM's `run_batch` read and write, so one file runs on either.

The job survives crashes: every output line is appended, flushed and fsynced as soon as its
request finishes, and `resume` counts the `custom_id`s already in the output (successes and
errors alike) so a second run does only what is left. A line cut short by a crash is dropped
first. Input lines are matched to output lines by `custom_id` and occurrence: the second line
with the same `custom_id` is an error line of its own, and so are lines without a usable
`custom_id`, counted as the `custom_id` null.

One model serves every request; llama.cpp reuses the KV cache for the prompt prefix two
consecutive requests share (a common system prompt, say).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from smallfour.errors import SmallfourError
from smallfour.messages import MessageError, check_messages

if TYPE_CHECKING:
    from smallfour.completion import ChatRequest, Event, GenerationResult
    from smallfour.model import Model

URL = "/v1/chat/completions"
METHOD = "POST"
MAX_STOP = 4
# Body fields a chat-completions request may carry that change nothing here (or only in their
# default form, checked in `_unsupported`); any other field is ignored as well, as vLLM does.
_UNSUPPORTED_UNLESS_DEFAULT = {
    "n": (None, 1),
    "stream": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


class LineError(Exception):
    """Why one input line cannot run: an OpenAI-style error code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Job:
    """One non-blank input line: a request to run, or the error line to write for it."""

    line_no: int
    custom_id: str | None
    request: ChatRequest | None = None
    stop: tuple[str, ...] = ()
    error: LineError | None = None


@dataclass
class BatchSummary:
    total: int = 0          # non-blank input lines
    skipped: int = 0        # already in the output (resume)
    succeeded: int = 0
    failed: int = 0         # error lines written in this run
    completion_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.skipped + self.succeeded + self.failed


# ---------------------------------------------------------------------------------------------
# Input: lines → jobs


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
        raise LineError("invalid_request", f"body.{name} must be a number {bound}, got {json.dumps(value)}")
    return float(value)


def _integer(body: dict, name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or (low is not None and value < low):
        bound = f" of at least {low}" if low is not None else ""
        raise LineError("invalid_request", f"body.{name} must be an integer{bound}, got {json.dumps(value)}")
    return value


def _messages(body: dict) -> list[dict]:
    try:
        return check_messages(body.get("messages"), "body.messages")
    except MessageError as exc:
        raise LineError("invalid_request", str(exc)) from None


def _tools(body: dict) -> list | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise LineError("invalid_request", "body.tools must be a list of {\"type\": \"function\", "
                                           "\"function\": {\"name\", …}} objects")
    if choice == "none":
        return None
    if choice not in (None, "auto"):
        raise LineError("invalid_request", f"body.tool_choice {json.dumps(choice)} is not supported; "
                                           "use \"auto\" or \"none\"")
    return tools or None


def _logit_bias(body: dict, n_vocab: int | None) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise LineError("invalid_request", "body.logit_bias must be an object {\"TOKEN_ID\": BIAS}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise LineError("invalid_request", f"body.logit_bias key {json.dumps(key)} is not a token id") from None
        if token < 0 or (n_vocab is not None and token >= n_vocab):
            raise LineError("invalid_request", f"body.logit_bias token id {token} is outside the vocabulary"
                                               + (f" (0–{n_vocab - 1})" if n_vocab else ""))
        if not _is_number(value) or not -100 <= value <= 100:
            raise LineError("invalid_request", f"body.logit_bias[{json.dumps(key)}] must be a number between "
                                               f"-100 and 100, got {json.dumps(value)}")
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
        raise LineError("invalid_request", f"body.stop must be a non-empty string or a list of 1 to {MAX_STOP} "
                                           "non-empty strings")
    return tuple(stop)


def _unsupported(body: dict) -> None:
    for name, defaults in _UNSUPPORTED_UNLESS_DEFAULT.items():
        value = body.get(name)
        if not any(value is d or (value == d and type(value) is type(d)) for d in defaults):
            raise LineError("invalid_request", f"body.{name} = {json.dumps(value)} is not supported by smallfour "
                                               "batch jobs")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise LineError("invalid_request", "body.response_format is not supported (only {\"type\": \"text\"})")


def request_from_body(body: Any, *, preset: str | None = None, think_budget: int | None = None,
                      n_vocab: int | None = None) -> tuple[ChatRequest, tuple[str, ...]]:
    """The ChatRequest (and stop strings) for one chat-completions body; LineError if it cannot run.

    `reasoning_effort` picks the defaults: "high" thinks with the `think` preset's sampling (or
    `preset`'s, if that thinks too), "none" answers with the `instant` preset's; without it the
    line gets `preset`. Fields in the body override the preset's values.
    """
    from smallfour.generate import EFFORTS, PRESETS, resolve_request

    if not isinstance(body, dict):
        raise LineError("invalid_request", "body must be a JSON object (a chat-completions request)")
    messages = _messages(body)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise LineError("invalid_request", f"body.reasoning_effort {json.dumps(effort)}: Mistral Small 4 accepts "
                                           f"{' or '.join(json.dumps(e) for e in EFFORTS)}")
    _unsupported(body)
    base = preset or "instant"
    if base not in PRESETS:
        raise SmallfourError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
    if effort is not None and PRESETS[base].effort != effort:
        base = "think" if effort == "high" else "instant"
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    top_k = _integer(body, "top_k", -1)
    sampling = dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0),
                    top_p=_number(body, "top_p", 0.0, 1.0), min_p=_number(body, "min_p", 0.0, 1.0),
                    top_k=0 if top_k == -1 else top_k,  # vLLM spells "no limit" -1
                    seed=_integer(body, "seed"), logit_bias=_logit_bias(body, n_vocab))
    stop = _stop(body)
    tools = _tools(body)
    thinks = (effort or PRESETS[base].effort) == "high"
    request = resolve_request(messages, preset=base, effort=effort, think_budget=think_budget if thinks else None,
                              tools=tools, **sampling)
    return request, stop


def parse_line(text: str | bytes, line_no: int, *, preset: str | None = None, think_budget: int | None = None,
               n_vocab: int | None = None) -> Job:
    """One input line as a Job (duplicates are found by `parse_jobs`, which sees every line)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        item = json.loads(text)
    except UnicodeDecodeError:
        return Job(line_no, None, error=LineError("invalid_json", f"line {line_no} is not UTF-8 text"))
    except json.JSONDecodeError as exc:
        return Job(line_no, None, error=LineError("invalid_json", f"line {line_no} is not valid JSON: {exc}"))
    if not isinstance(item, dict):
        return Job(line_no, None, error=LineError("invalid_json", f"line {line_no} is not a JSON object"))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "has no custom_id" if custom_id is None else "has a custom_id that is not a non-empty string"
        return Job(line_no, None, error=LineError("missing_custom_id", f"line {line_no} {what}"))
    job = Job(line_no, custom_id)
    if item.get("url") != URL:
        job.error = LineError("invalid_url", f"url {json.dumps(item.get('url'))} is not supported; "
                                             f"smallfour batch runs {URL}")
    elif item.get("method", METHOD) != METHOD:
        job.error = LineError("invalid_method", f"method {json.dumps(item.get('method'))} is not supported; "
                                                f"use {METHOD}")
    else:
        try:
            job.request, job.stop = request_from_body(item.get("body"), preset=preset, think_budget=think_budget,
                                                      n_vocab=n_vocab)
        except LineError as exc:
            job.error = exc
        except SmallfourError as exc:  # raised by resolve_request for values it rejects
            job.error = LineError("invalid_request", str(exc))
    return job


def parse_jobs(lines: Iterable[str | bytes], **options: Any) -> list[Job]:
    """Every non-blank line as a Job; the second line with a custom_id already seen is an error."""
    jobs, seen = [], set()
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = parse_line(text, line_no, **options)
        if job.custom_id is not None:
            if job.custom_id in seen:
                job.request, job.error = None, LineError(
                    "duplicate_custom_id", f"custom_id {json.dumps(job.custom_id)} (line {line_no}) was used by an "
                                           "earlier line; custom_ids must be unique")
            seen.add(job.custom_id)
        jobs.append(job)
    return jobs


def pending_jobs(jobs: list[Job], done: Counter) -> list[Job]:
    """The jobs not yet in the output: the k-th line with a custom_id is done when the output holds
    k lines with it (lines without a usable custom_id count as custom_id null)."""
    seen: Counter = Counter()
    pending = []
    for job in jobs:
        seen[job.custom_id] += 1
        if seen[job.custom_id] > done[job.custom_id]:
            pending.append(job)
    return pending


# ---------------------------------------------------------------------------------------------
# Output lines


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def error_line(custom_id: str | None, error: LineError) -> dict:
    return {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": error.code, "message": error.message}}


def completion_body(result: GenerationResult, model_name: str) -> dict:
    """A chat.completion object, as OpenAI and vLLM return it (plus llama.cpp-server's timings)."""
    summary = result.as_json()
    message: dict[str, Any] = {"role": "assistant", "content": result.content if result.content or not result.tool_calls
                               else None}
    if result.reasoning_content:
        message["reasoning_content"] = result.reasoning_content
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    if result.tool_call_error:
        message["tool_call_error"] = result.tool_call_error
    return {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": summary["usage"], "timings": summary["timings"]}


def success_line(custom_id: str, result: GenerationResult, model_name: str) -> dict:
    return {"id": _new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": _new_id("req_"),
                         "body": completion_body(result, model_name)},
            "error": None}


def _apply_stop(result: GenerationResult, stop: tuple[str, ...]) -> None:
    """Cut the answer before the first stop string, as OpenAI does, and call it a stop."""
    cuts = [i for i in (result.content.find(s) for s in stop) if i >= 0]
    if cuts:
        result.content = result.content[:min(cuts)]
        result.finish_reason = "stop"


# ---------------------------------------------------------------------------------------------
# The output file: appended line by line, resumable


class BatchOutput:
    """Where output lines go: a file (appended, flushed and fsynced per line, locked against a second
    job) or a stream such as stdout (flushed per line)."""

    def __init__(self, stream: IO[bytes], path: Path | None = None):
        self.stream, self.path = stream, path

    @classmethod
    def open(cls, path: Path | None, *, resume: bool = False, overwrite: bool = False) -> tuple[BatchOutput, Counter]:
        """Open OUTPUT for a job (None = stdout), and the custom_ids already in it (when resuming)."""
        if path is None:
            if resume:
                raise SmallfourError("--resume needs an output file (-o FILE), not stdout")
            return cls(sys.stdout.buffer), Counter()
        if resume and overwrite:
            raise SmallfourError("give either --resume or --overwrite, not both")
        if path.is_dir():
            raise SmallfourError(f"output {path} is a directory")
        try:
            stream = open(path, "ab")
        except OSError as exc:
            raise SmallfourError(f"cannot write output file {path}: {exc.strerror}") from None
        output = cls(stream, path)
        output._lock()
        done: Counter = Counter()
        if os.fstat(stream.fileno()).st_size > 0:
            if overwrite:
                stream.truncate(0)
            elif resume:
                done = output._recover()
            else:
                stream.close()
                raise SmallfourError(f"output {path} already exists and is not empty: pass --resume to continue "
                                     "that job, or --overwrite to start over")
        return output, done

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock
            return
        try:
            fcntl.flock(self.stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.stream.close()
            raise SmallfourError(f"output {self.path} is in use by another smallfour batch job") from None

    def _recover(self) -> Counter:
        """Count the finished custom_ids; drop a last line a crash cut short (rewritten via temp + rename)."""
        assert self.path is not None
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        kept = data[:end]
        if tail.strip() and _output_line(tail) is not None:
            kept += tail + b"\n"  # a complete line whose newline the crash lost
        done: Counter = Counter()
        for number, line in enumerate(kept.splitlines(), start=1):
            if not line.strip():
                continue
            item = _output_line(line)
            if item is None:
                raise SmallfourError(f"output {self.path} line {number} is not a batch output line "
                                     "({\"id\", \"custom_id\", \"response\", \"error\"}); cannot resume from it")
            done[item["custom_id"]] += 1
        if kept != data:
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(temp, "wb") as file:
                file.write(kept)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
            self.stream.close()
            self.stream = open(self.path, "ab")
            self._lock()
        return done

    def write(self, item: dict) -> None:
        self.stream.write(json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n")
        self.stream.flush()
        if self.path is not None:
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()


def _output_line(line: bytes) -> dict | None:
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(item, dict) or not {"custom_id", "response", "error"} <= item.keys():
        return None
    return item


# ---------------------------------------------------------------------------------------------
# Running


class Progress:
    """What `run_jobs` reports; the CLI draws it as a rich progress bar."""

    def start(self, total: int, skipped: int) -> None: ...

    def advance(self, completion_tokens: int, ok: bool) -> None: ...


class _StopStrings:
    """Watches the answer as it streams; `hit` once it contains one of the stop strings."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.content, self.hit = stop, "", False

    def on_event(self, event: Event) -> None:
        if event.kind != "content" or self.hit or not self.stop:
            return
        text = event.text
        start = max(0, len(self.content) - max(map(len, self.stop)) + 1)
        self.content += text
        self.hit = any(s in self.content[start:] for s in self.stop)


def run_jobs(model: Model, jobs: list[Job], output: BatchOutput, *, model_name: str, done: Counter | None = None,
             progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> BatchSummary:
    """Run every job not already in the output on the engine's slots (`model.n_seq` at once).

    One line per job is written as it finishes, so lines come in the order requests finish, not
    the input order; `custom_id` ties them to the input. `should_stop()` is polled after every
    token: when it turns true, the requests in flight are dropped (nothing written for them) and
    the summary says `interrupted`.
    """
    from smallfour.engine import Engine
    from smallfour.generate import prompt_with_images

    progress = progress or Progress()
    todo = deque(pending_jobs(jobs, done or Counter()))
    summary = BatchSummary(total=len(jobs), skipped=len(jobs) - len(todo))
    progress.start(len(jobs), summary.skipped)
    started = time.perf_counter()
    stopped = should_stop or (lambda: False)
    engine = Engine(model)
    running: list[tuple[Job, Any, _StopStrings]] = []

    def write_error(job: Job) -> None:
        output.write(error_line(job.custom_id, job.error))
        summary.failed += 1
        progress.advance(0, False)

    while todo or running:
        if stopped():
            summary.interrupted = True
            engine.cancel()
            break
        while todo and len(engine.queue) + engine.active < len(engine.slots):
            job = todo.popleft()
            if job.error is None:
                assert job.request is not None and job.custom_id is not None
                watch = _StopStrings(job.stop)
                try:
                    _, tokens, spans = prompt_with_images(model, job.request)
                    submitted = engine.submit(job.request, tokens, spans, should_stop=lambda w=watch: w.hit or stopped(),
                                              on_event=watch.on_event)
                except SmallfourError as exc:
                    job.error = LineError("invalid_request", str(exc))
                except Exception as exc:  # noqa: BLE001 — one failing request must not end the job
                    job.error = LineError("server_error", f"{type(exc).__name__}: {exc}")
                else:
                    running.append((job, submitted, watch))
                    continue
            write_error(job)
        if not running:
            continue
        engine.step()
        still = []
        for job, submitted, watch in running:
            if not submitted.finished:
                still.append((job, submitted, watch))
            elif submitted.error is not None:
                job.error = LineError("invalid_request", str(submitted.error))
                write_error(job)
            elif submitted.result.finish_reason == "interrupted" and not watch.hit:
                summary.interrupted = True  # Ctrl-C: nothing is written for it
            else:
                result = submitted.result
                _apply_stop(result, job.stop)
                output.write(success_line(job.custom_id, result, model_name))
                summary.succeeded += 1
                summary.completion_tokens += result.completion_tokens
                progress.advance(result.completion_tokens, True)
        running = still
    summary.seconds = time.perf_counter() - started
    return summary


def read_input(source: str) -> list[bytes]:
    """The input's lines: a file, or stdin for `-`."""
    if source == "-":
        return sys.stdin.buffer.read().splitlines()
    path = Path(source)
    if not path.is_file():
        raise SmallfourError(f"input {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        return path.read_bytes().splitlines()
    except OSError as exc:
        raise SmallfourError(f"cannot read input {path}: {exc.strerror}") from None


def load_projector(model: Model, model_path: Path, mmproj: Path | None, jobs: list[Job], *, gpu: bool) -> None:
    """The vision projector, when some line has an image; if it cannot load, those lines get the reason."""
    from smallfour.vision import attach_projector, find_mmproj, image_sources, open_projector

    if not any(job.request is not None and image_sources(job.request.messages) for job in jobs):
        return
    try:
        attach_projector(model, open_projector(model, find_mmproj(model_path, mmproj), use_gpu=gpu))
    except SmallfourError as exc:
        attach_projector(model, None, error=str(exc))


__all__ = ["BatchOutput", "BatchSummary", "Job", "LineError", "completion_body", "error_line", "load_projector",
           "parse_jobs", "parse_line", "pending_jobs", "read_input", "request_from_body", "run_jobs",
           "success_line"]
