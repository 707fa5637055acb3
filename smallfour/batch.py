"""Batch jobs in the OpenAI Batch format: a JSONL of chat requests in, a JSONL of results out.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {…}}`
with an OpenAI chat-completions body; each output line is `{"id", "custom_id", "response":
{"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}`, or, for a line that
cannot run, the same with `"status_code": 400` (500 for a failure of ours) and the body
`{"error": {"message", "type", "param", "code"}}`. That is what OpenAI's Batch API and vLLM's
`run_batch` read and write, so one file runs on either.

The job survives crashes: every output line is appended, flushed and fsynced as soon as its
request finishes, and `resume` counts the `custom_id`s already in the output (successes and
errors alike) so a second run does only what is left. A line cut short by a crash is dropped
first. Input lines are matched to output lines by `custom_id` and occurrence: the second line
with the same `custom_id` is an error line of its own, and so are lines without a usable
`custom_id` (unparsable JSON, a missing or non-string id): they are written under the string
`line-N` (N the input line number), since readers such as vLLM's require a string.

One model serves every request; llama.cpp reuses the KV cache for the prompt prefix two
consecutive requests share (a common system prompt, say).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from smallfour.errors import SmallfourError
from smallfour.openai import RequestError as LineError
from smallfour.openai import apply_stop, error_line, request_from_body, success_line

if TYPE_CHECKING:
    from smallfour.completion import ChatRequest, Event
    from smallfour.model import Model

URL = "/v1/chat/completions"
METHOD = "POST"
@dataclass
class Job:
    """One non-blank input line: a request to run, or the error line to write for it."""

    line_no: int
    custom_id: str
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


def parse_line(text: str | bytes, line_no: int, *, preset: str | None = None, think_budget: int | None = None,
               n_vocab: int | None = None) -> Job:
    """One input line as a Job (duplicates are found by `parse_jobs`, which sees every line)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        item = json.loads(text)
    except UnicodeDecodeError:
        return Job(line_no, line_id(line_no), error=LineError("invalid_json", f"line {line_no} is not UTF-8 text"))
    except json.JSONDecodeError as exc:
        return Job(line_no, line_id(line_no),
                   error=LineError("invalid_json", f"line {line_no} is not valid JSON: {exc}"))
    if not isinstance(item, dict):
        return Job(line_no, line_id(line_no), error=LineError("invalid_json", f"line {line_no} is not a JSON object"))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "has no custom_id" if custom_id is None else "has a custom_id that is not a non-empty string"
        return Job(line_no, line_id(line_no), error=LineError("missing_custom_id", f"line {line_no} {what}"))
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


def line_id(line_no: int) -> str:
    """The custom_id an output line gets when its input line has none usable."""
    return f"line-{line_no}"


def parse_jobs(lines: Iterable[str | bytes], **options: Any) -> list[Job]:
    """Every non-blank line as a Job; the second line with a custom_id already seen is an error."""
    jobs, seen = [], set()
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = parse_line(text, line_no, **options)
        if job.custom_id in seen:
            job.request, job.error = None, LineError(
                "duplicate_custom_id", f"custom_id {json.dumps(job.custom_id)} (line {line_no}) was used by an "
                                       "earlier line; custom_ids must be unique")
        seen.add(job.custom_id)
        jobs.append(job)
    return jobs


def pending_jobs(jobs: list[Job], done: Counter) -> list[Job]:
    """The jobs not yet in the output: the k-th line with a custom_id is done when the output holds
    k lines with it."""
    seen: Counter = Counter()
    pending = []
    for job in jobs:
        seen[job.custom_id] += 1
        if seen[job.custom_id] > done[job.custom_id]:
            pending.append(job)
    return pending


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
    from smallfour.generation import prompt_with_images

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
                assert job.request is not None
                watch = _StopStrings(job.stop)
                try:
                    _, tokens, spans = prompt_with_images(model, job.request)
                    submitted = engine.submit(job.request, tokens, spans, should_stop=lambda w=watch: w.hit or stopped(),
                                              on_event=watch.on_event)
                except SmallfourError as exc:
                    job.error = LineError("invalid_request", str(exc))
                except Exception as exc:  # noqa: BLE001 — one failing request must not end the job
                    job.error = LineError("server_error", f"{type(exc).__name__}: {exc}", status=500)
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
            elif submitted.error is not None and stopped():
                summary.interrupted = True  # Ctrl-C before it started: --resume runs it
            elif submitted.error is not None:
                job.error = LineError("invalid_request", str(submitted.error))
                write_error(job)
            elif submitted.result.finish_reason == "interrupted" and not watch.hit:
                summary.interrupted = True  # Ctrl-C: nothing is written for it
            else:
                result = submitted.result
                apply_stop(result, job.stop)
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


__all__ = ["BatchOutput", "BatchSummary", "Job", "LineError", "error_line", "load_projector",
           "parse_jobs", "parse_line", "pending_jobs", "read_input", "request_from_body", "run_jobs",
           "success_line"]
