"""`smallfour serve`: an OpenAI-compatible HTTP server on the engine.

One engine thread owns the model: it takes submitted requests, calls `Engine.step()` while
there is work and sleeps when there is none. HTTP handlers run on uvicorn's asyncio loop;
they parse the body (`smallfour.openai`), hand the request to the engine thread, and get its
events back through `loop.call_soon_threadsafe`, so no lock is held while tokens stream.

Admission is bounded: at most `parallel + queue` choices are in the server at once (running
or waiting for a slot); beyond that a request is answered 429 with `Retry-After`. A client
that goes away (a closed stream, a dropped connection) sets its request's stop flag, and the
engine thread frees its slot (or its place in the queue) before the next step. uvicorn's
graceful shutdown (SIGTERM, Ctrl-C) stops accepting, lets the requests in flight finish,
then the engine thread stops and the model is freed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from smallfour.console import err
from smallfour.errors import SmallfourError
from smallfour.openai import (ChatCall, RequestError, StopFilter, apply_stop, chunk, completion_body, delta,
                              logprobs_field, new_id, parse_body, tool_call_deltas, usage)

if TYPE_CHECKING:
    from smallfour.completion import Event, GenerationResult
    from smallfour.engine import Engine, Job
    from smallfour.model import Model

RETRY_AFTER_SECONDS = 1
LATENCIES_KEPT = 1000


@dataclass
class ServeOptions:
    model_name: str
    parallel: int
    queue: int                    # choices that may wait for a slot beyond the running ones
    api_key: str | None = None
    max_body: int = 32 << 20      # bytes
    preset: str | None = None
    think_budget: int | None = None


# ---------------------------------------------------------------------------------------------
# One HTTP request inside the engine


@dataclass(eq=False)
class Pending:
    """A request's choices on their way through the engine; events come back on `events`.

    Each item is `(choice index, Event)`, or `(choice index, RequestError)` if that choice
    failed. `cancelled` is set from the asyncio side when the client is gone.
    """

    call: ChatCall
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    jobs: list[Job] = field(default_factory=list)
    filters: list[StopFilter] = field(default_factory=list)

    def post(self, index: int, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, item))


class EngineThread(threading.Thread):
    """Owns the model and the engine; `submit` from any thread, `stop` to finish and exit."""

    def __init__(self, model: Model):
        super().__init__(name="smallfour-engine", daemon=True)
        self.model = model
        self.inbox: deque[Pending] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.running: list[tuple[Pending, int, Job]] = []

    def submit(self, pending: Pending) -> None:
        with self.wake:
            self.inbox.append(pending)
            self.wake.notify()

    def poke(self) -> None:
        """Look at the requests again now (one was cancelled)."""
        with self.wake:
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def run(self) -> None:
        from smallfour.engine import Engine

        engine = Engine(self.model)
        while True:
            with self.wake:
                while not self.inbox and not engine.busy and not self.stopping:
                    self.wake.wait()
                if self.stopping and not self.inbox and not engine.busy:
                    return
                arrived = list(self.inbox)
                self.inbox.clear()
            for pending in arrived:
                self._start(engine, pending)
            if engine.busy:
                try:
                    engine.step()
                except Exception as exc:  # noqa: BLE001 — a bug in one step must not hang every client
                    for pending, index, _ in self.running:
                        pending.post(index, RequestError("server_error", f"{type(exc).__name__}: {exc}",
                                                         status=500))
                    self.running = []
                    engine.cancel()
            self._sweep()

    def _start(self, engine: Engine, pending: Pending) -> None:
        from smallfour.engine import Sampler
        from smallfour.generation import prompt_with_images

        for index, request in enumerate(pending.call.requests()):
            stop = StopFilter(pending.call.stop)
            pending.filters.append(stop)
            try:
                _, tokens, spans = prompt_with_images(self.model, request)
                if request.sampling.constraint is not None:
                    Sampler(self.model, request.sampling).close()  # a grammar that cannot compile fails here
                job = engine.submit(request, tokens, spans,
                                    should_stop=lambda p=pending, s=stop: p.cancelled or s.hit,
                                    on_event=lambda event, p=pending, i=index: self._event(p, i, event))
            except SmallfourError as exc:
                pending.post(index, RequestError("invalid_request", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 — one request must not take the server down
                pending.post(index, RequestError("server_error", f"{type(exc).__name__}: {exc}", status=500))
                continue
            pending.jobs.append(job)
            self.running.append((pending, index, job))

    def _event(self, pending: Pending, index: int, event: Event) -> None:
        """On the engine thread: stop strings are cut here, so the stream never shows what follows one."""
        stop = pending.filters[index]
        if event.kind == "content":
            text = stop.feed(event.text)
            if text:
                pending.post(index, type(event)("content", text))
            return
        if event.kind == "finish":
            rest = stop.flush()
            if rest:
                pending.post(index, type(event)("content", rest))
            apply_stop(event.result, pending.call.stop)
        pending.post(index, event)

    def _sweep(self) -> None:
        """Forget finished jobs; a job the engine failed reports its error to its request."""
        still = []
        for pending, index, job in self.running:
            if job.error is not None:
                pending.post(index, RequestError("invalid_request", str(job.error)))
            elif not job.finished:
                still.append((pending, index, job))
        self.running = still


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Stats:
    """What `GET /stats` reports: request counts by status, tokens, and latency percentiles."""

    started: float = field(default_factory=time.time)
    statuses: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: deque = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))
    total: deque = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def as_json(self, in_flight: int, capacity: int) -> dict:
        def percentiles(values: deque) -> dict:
            if not values:
                return {"p50": None, "p99": None}
            ordered = sorted(values)
            return {"p50": round(statistics.median(ordered), 2),
                    "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)}

        return {"uptime_s": round(time.time() - self.started, 1), "requests": {str(k): v for k, v in
                                                                               sorted(self.statuses.items())},
                "in_flight": in_flight, "capacity": capacity, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "time_to_first_token_ms": percentiles(self.first_token),
                "latency_ms": percentiles(self.total)}


# ---------------------------------------------------------------------------------------------
# The HTTP application


def _sse(item: dict) -> str:
    return f"data: {json.dumps(item, ensure_ascii=False)}\n\n"


class Server:
    """The FastAPI app and what it shares: the engine thread, admission, statistics.

    `load()` runs on a thread at startup, so `GET /health` says "loading" until the model is
    ready; if it fails, the server stops and `failure` says why.
    """

    def __init__(self, options: ServeOptions, load):
        self.options, self.load = options, load
        self.status = "loading"
        self.failure: str | None = None
        self.model: Model | None = None
        self.engine: EngineThread | None = None
        self.in_flight = 0
        self.stats = Stats()
        self.on_failure = lambda: None   # set by the runner: stop serving

    @property
    def capacity(self) -> int:
        return self.options.parallel + self.options.queue

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        try:
            self.model = self.load()
            self.engine = EngineThread(self.model)
            self.engine.start()
            self.status = "ready"
            err(("ready", "green"), f": serving {self.options.model_name} ({self.options.parallel} at once, "
                                    f"{self.options.queue} queued at most)")
        except Exception as exc:  # noqa: BLE001 — reported as the command's one-line error
            self.status, self.failure = "failed", str(exc) if isinstance(exc, SmallfourError) else \
                f"{type(exc).__name__}: {exc}"
            self.on_failure()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine.join()
        if self.model is not None:
            self.model.close()

    # ------------------------------------------------------------------ requests

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError("invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY",
                               status=401)

    async def _body(self, request: Request) -> Any:
        limit = self.options.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError("request_too_large", f"request body of {int(length)} bytes is over the limit of "
                                                    f"{limit} bytes", status=413)
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise RequestError("request_too_large", f"request body is over the limit of {limit} bytes",
                                   status=413)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError("invalid_json", f"request body is not valid JSON: {exc}") from None

    def _ready(self) -> EngineThread:
        if self.status != "ready" or self.engine is None:
            raise RequestError("model_not_ready", f"the model is {self.status}", status=503)
        return self.engine

    async def chat(self, request: Request):
        from fastapi.responses import JSONResponse, StreamingResponse

        from smallfour.vision import image_sources

        started = time.perf_counter()
        self._authorize(request)
        engine = self._ready()
        call = parse_body(await self._body(request), preset=self.options.preset,
                          think_budget=self.options.think_budget, n_vocab=self.model.n_vocab)
        if any(not source.startswith("data:") for source in image_sources(call.request.messages)):
            raise RequestError("invalid_image", "images must be sent as data: URLs (the server neither reads its "
                                                "own files nor fetches URLs)", param="messages")
        if self.in_flight + call.n > self.capacity:
            self.stats.count(429)
            raise RequestError("rate_limit_exceeded", f"the server is busy ({self.in_flight} requests in flight, "
                                                      f"room for {self.capacity}); retry shortly", status=429)
        self.in_flight += call.n
        pending = Pending(call, asyncio.get_running_loop())
        engine.submit(pending)
        headers = {"X-Reasoning-Effort": call.request.effort} if call.effort_asked else {}
        watch = _Watch(self, pending, request, started)
        try:
            first = await watch.next()
        except BaseException:
            watch.close(499)
            raise
        if isinstance(first[1], RequestError):  # the prompt could not start (too long, a bad image…)
            watch.close(first[1].status)
            raise first[1]
        if call.stream:
            return StreamingResponse(self._stream(watch, first), media_type="text/event-stream", headers=headers)
        try:
            results = await self._collect(watch, first)
        except BaseException:
            watch.close(499)
            raise
        if isinstance(results, RequestError):
            watch.close(results.status)
            raise results
        watch.close(200, results)
        return JSONResponse(completion_body(results, self.options.model_name,
                                            effort=call.request.effort if call.effort_asked else None),
                            headers=headers)

    async def _collect(self, watch: _Watch, item) -> list[GenerationResult] | RequestError | None:
        n = watch.pending.call.n
        done: dict[int, GenerationResult] = {}
        while True:
            index, event = item
            if isinstance(event, RequestError):
                return event
            if event.kind == "finish":
                done[index] = event.result
                if len(done) == n:
                    return [done[i] for i in range(n)]
            item = await watch.next()

    async def _stream(self, watch: _Watch, item) -> AsyncIterator[str]:
        call = watch.pending.call
        name, completion_id, created = self.options.model_name, new_id("chatcmpl-"), int(time.time())
        done: dict[int, GenerationResult] = {}
        status = 499
        try:
            yield _sse(chunk(completion_id, created, name,
                             [delta(i, {"role": "assistant", "content": ""}) for i in range(call.n)]))
            while True:
                index, event = item
                if isinstance(event, RequestError):
                    status = event.status
                    yield _sse(event.body())
                    break
                fields: dict[str, Any] = {}
                if event.kind == "content":
                    fields = {"content": event.text}
                elif event.kind == "reasoning":
                    fields = {"reasoning_content": event.text}
                elif event.kind == "tool_calls":
                    fields = {"tool_calls": tool_call_deltas(event.result)}
                if fields:
                    yield _sse(chunk(completion_id, created, name, [delta(index, fields)]))
                if event.kind == "finish":
                    result = event.result
                    last = {"tool_call_error": result.tool_call_error} if result.tool_call_error else {}
                    yield _sse(chunk(completion_id, created, name, [delta(index, last, finish_reason=result.finish_reason,
                                                                          logprobs=logprobs_field(result))]))
                    done[index] = result
                    if len(done) == call.n:
                        break
                item = await watch.next()
            if len(done) == call.n:
                status = 200
                if call.include_usage:
                    yield _sse(chunk(completion_id, created, name, [], usage_=usage([done[i] for i in range(call.n)])))
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            watch.close(status, [done[i] for i in sorted(done)] if status == 200 else None)

    def app(self) -> FastAPI:
        from contextlib import asynccontextmanager

        from fastapi.responses import JSONResponse, Response
        from starlette.exceptions import HTTPException

        @asynccontextmanager
        async def lifespan(_app):
            threading.Thread(target=self._load, name="smallfour-load", daemon=True).start()
            yield
            self.close()

        app = FastAPI(title="smallfour", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestError)
        async def request_error(_request, exc: RequestError):
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status in (429, 503) else None
            if exc.status != 429:
                self.stats.count(exc.status)
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

        @app.exception_handler(ClientGone)
        async def client_gone(_request, _exc: ClientGone):
            return Response(status_code=499)  # nobody is listening; the request's place is already released

        @app.exception_handler(HTTPException)
        async def http_error(_request, exc: HTTPException):
            return JSONResponse(RequestError("not_found" if exc.status_code == 404 else "http_error", str(exc.detail),
                                             status=exc.status_code).body(), status_code=exc.status_code)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.chat(request)

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.options.model_name, "object": "model",
                                                "created": int(self.stats.started), "owned_by": "smallfour"}]}

        @app.get("/health")
        async def health():
            body = {"status": self.status} | ({"error": self.failure} if self.failure else {})
            return JSONResponse(body, status_code=200 if self.status == "ready" else 503)

        @app.get("/stats")
        async def stats(request: Request):
            self._authorize(request)
            return self.stats.as_json(self.in_flight, self.capacity)

        return app


class _Watch:
    """One request's events, read on the asyncio side: notices a client that went away, and
    releases the request's place exactly once (with its status, latency and tokens)."""

    DISCONNECT_CHECK_SECONDS = 0.25

    def __init__(self, server: Server, pending: Pending, request: Request, started: float):
        self.server, self.pending, self.request, self.started = server, pending, request, started
        self.first_token: float | None = None
        self.checked = time.perf_counter()
        self.closed = False

    async def next(self):
        """The next (choice, event); CancelledError-free: a gone client raises `ClientGone`."""
        while True:
            try:
                item = await asyncio.wait_for(self.pending.events.get(), self.DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                item = None
            now = time.perf_counter()
            if item is None or now - self.checked > self.DISCONNECT_CHECK_SECONDS:
                self.checked = now
                if await self.request.is_disconnected():
                    raise ClientGone()
            if item is not None:
                if self.first_token is None and getattr(item[1], "kind", "") in ("content", "reasoning", "finish"):
                    self.first_token = now
                return item

    def close(self, status: int, results: list[GenerationResult] | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        server, pending = self.server, self.pending
        if results is None or len(results) < pending.call.n:
            pending.cancelled = True
            if server.engine is not None:
                server.engine.poke()
        server.in_flight -= pending.call.n
        server.stats.count(status)
        total = (time.perf_counter() - self.started) * 1000.0
        line = f"{status} chat.completions n={pending.call.n}{' stream' if pending.call.stream else ''}"
        if results:
            server.stats.prompt_tokens += results[0].prompt_tokens
            server.stats.completion_tokens += sum(r.completion_tokens for r in results)
            server.stats.total.append(total)
            if self.first_token is not None:
                server.stats.first_token.append((self.first_token - self.started) * 1000.0)
            line += (f" prompt={results[0].prompt_tokens} completion={sum(r.completion_tokens for r in results)} "
                     f"{total:.0f} ms")
        err(line)


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


def serve(options: ServeOptions, load, *, host: str, port: int) -> None:
    """Run the server until SIGTERM / Ctrl-C (requests in flight finish first); SmallfourError if loading failed."""
    import uvicorn

    server = Server(options, load)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on")

    class Runner(uvicorn.Server):
        """uvicorn's server, except that a signal ends it with status 0 once drained (uvicorn
        re-raises the signal, so the process would die of it); a second signal stops waiting."""

        def handle_exit(self, sig, frame) -> None:
            self.force_exit = self.should_exit
            self.should_exit = True

    runner = Runner(config)

    def stop() -> None:
        runner.should_exit = True

    server.on_failure = stop
    err(f"smallfour serve: http://{host}:{port}/v1 (loading {options.model_name}…)")
    runner.run()
    if server.failure is not None:
        raise SmallfourError(server.failure)
    if not runner.started:
        raise SmallfourError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")


__all__ = ["EngineThread", "Pending", "Server", "ServeOptions", "Stats", "serve"]
