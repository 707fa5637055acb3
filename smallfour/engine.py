"""The generation engine: many sequences at once over one llama.cpp context (continuous batching).

A decode step of a MoE model is bound by reading weights, so one `llama_decode` that
carries a token for every sequence being generated (and chunks of prompts being read)
costs little more than one for a single sequence. The engine keeps `model.n_seq` slots;
each step it admits queued requests into free slots, puts one token per generating slot
and as much prompt as the batch has room for into one batch, decodes, and samples each
slot's next token with that slot's own llama.cpp sampler chain. A finished request frees
its slot at once and the next one starts in the following step.

A new request starts from the longest prefix some sequence already holds (its own earlier
turn, or another slot's shared system prompt or image) — copied with
`llama_memory_seq_cp`, so those positions are neither evaluated nor stored twice.

Mistral Small 4 thinks inside `[THINK]…[/THINK]` when asked for `reasoning_effort:
"high"`, and calls tools as `[TOOL_CALLS]name[ARGS]{json}`. Each slot watches those control
tokens as they stream, so thinking and answer arrive on separate channels, a thinking
budget closes the thought by forcing `[/THINK]`, and tool calls come out as OpenAI-style
objects. Events go to the request's `on_event` callback (or its queue) as they happen.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from smallfour.completion import ChatRequest, Event, GenerationResult, Sampling
from smallfour.errors import SmallfourError
from smallfour.model import ImageInsert, Model, image_entries, prompt_pieces

# Prompt positions another slot is about to evaluate that make a new request wait a step for them.
WORTH_WAITING = 32


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
    """llama.cpp's own sampler chain for one request: penalties, logit bias, grammar, top-k, top-p,
    min-p, temperature, seed.

    The sampling part is what llama-cpp-python builds for `Llama.generate` (and llama.cpp's
    common sampler), so seeded runs draw the same way; penalties and logit bias run natively
    instead of a Python pass over the vocabulary every token. The grammar
    (`Sampling.constraint`, see `smallfour.grammar`) is checked the way llama.cpp's common
    sampler does it: the chain draws first and the grammar only checks that one token; only
    when it is refused is the whole vocabulary filtered and the draw repeated (filtering 131k
    tokens through a grammar costs far more than a decode step). With `Sampling.logprobs` set it also records
    OpenAI's `logprobs.content` entries for the answer's tokens (not the thought's, not tool
    calls, not control tokens): the log-softmax of the raw logits, as OpenAI and vLLM report.
    """

    def __init__(self, model: Model, sampling: Sampling):
        import llama_cpp as lib

        self._lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sampling.frequency_penalty or sampling.presence_penalty:
            self._add(lib.llama_sampler_init_penalties(model.n_vocab, sampling.max_tokens, 1.0,
                                                       sampling.frequency_penalty, sampling.presence_penalty))
        if sampling.logit_bias:
            entries = (lib.llama_logit_bias * len(sampling.logit_bias))(
                *(lib.llama_logit_bias(token, bias) for token, bias in sampling.logit_bias.items()))
            self._add(lib.llama_sampler_init_logit_bias(model.n_vocab, len(entries), entries))
        self.grammar = None
        if sampling.constraint is not None:
            from smallfour.grammar import grammar_text

            self.grammar = lib.llama_sampler_init_grammar(
                model.vocab, grammar_text(sampling.constraint, model.control_tokens).encode("utf-8"), b"root")
            if not self.grammar:
                self.close()
                raise SmallfourError("llama.cpp could not compile the grammar for this request's constraint")
            self._candidates = np.zeros(model.n_vocab, dtype=[("id", np.int32), ("logit", np.float32),
                                                              ("p", np.float32)])
            self._ids = np.arange(model.n_vocab, dtype=np.int32)
        if sampling.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
        else:
            self._add(lib.llama_sampler_init_top_k(sampling.top_k))
            self._add(lib.llama_sampler_init_top_p(sampling.top_p, 1))
            self._add(lib.llama_sampler_init_min_p(sampling.min_p, 1))
            self._add(lib.llama_sampler_init_temp(sampling.temperature))
            self._add(lib.llama_sampler_init_dist(sampling.seed if sampling.seed is not None
                                                  else lib.LLAMA_DEFAULT_SEED))
        self.top_logprobs = sampling.logprobs
        self.logprobs: list[dict] | None = [] if sampling.logprobs is not None else None
        control = model.control_tokens
        self._think = (control.get("[THINK]"), control.get("[/THINK]"))
        self._tool_calls = control.get("[TOOL_CALLS]")
        self._control = frozenset(control.values())
        self._channel = "content"

    def _add(self, sampler) -> None:
        self._lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, model: Model, index: int = -1) -> int:
        """A token from the logits of batch position `index` of the last decode (the sampler accepts it)."""
        if self.grammar is None:
            token = int(self._lib.llama_sampler_sample(self.chain, model.context, index))
        else:
            logits = model.logits(index)
            token = self._draw(logits, with_grammar=False)
            if not self._allowed(token):
                token = self._draw(logits, with_grammar=True)
            self._lib.llama_sampler_accept(self.grammar, token)
            self._lib.llama_sampler_accept(self.chain, token)
        if self.logprobs is not None:
            self._record(model, index, token)
        return token

    def _apply(self, sampler, candidates: np.ndarray) -> int:
        """Run `sampler` over `candidates` in place; the index it selected (or -1)."""
        lib = self._lib
        array = lib.llama_token_data_array(candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
                                           len(candidates), -1, False)
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(array.selected)

    def _draw(self, logits: np.ndarray, *, with_grammar: bool) -> int:
        candidates = self._candidates
        candidates["id"], candidates["logit"], candidates["p"] = self._ids, logits, 0.0
        if with_grammar:
            self._apply(self.grammar, candidates)
        return int(candidates["id"][self._apply(self.chain, candidates)])

    def _allowed(self, token: int) -> bool:
        single = np.array([(token, 1.0, 0.0)], dtype=self._candidates.dtype)
        self._apply(self.grammar, single)
        return bool(np.isfinite(single["logit"][0]))

    def accept(self, token: int) -> None:
        """Tell the chain about a token chosen without it (a forced `[/THINK]`)."""
        if self.grammar is not None:
            self._lib.llama_sampler_accept(self.grammar, token)
        self._lib.llama_sampler_accept(self.chain, token)
        self._follow(token)

    def _follow(self, token: int) -> bool:
        """Track the channel the token is in; True for an answer token."""
        if token == self._think[0]:
            self._channel = "reasoning"
        elif token == self._think[1] and self._channel == "reasoning":
            self._channel = "content"
        elif token == self._tool_calls:
            self._channel = "tool"
        else:
            return self._channel == "content"
        return False

    def _record(self, model: Model, index: int, token: int) -> None:
        if not self._follow(token) or token in self._control or model.is_end(token):
            return
        logits = model.logits(index).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())

        def entry(t: int) -> dict:
            piece = model.piece(t)
            return {"token": piece.decode("utf-8", errors="replace"), "logprob": float(logprobs[t]),
                    "bytes": list(piece)}

        top = []
        if self.top_logprobs:
            best = np.argpartition(-logprobs, self.top_logprobs)[:self.top_logprobs]
            top = [entry(int(t)) for t in best[np.argsort(-logprobs[best])]]
        self.logprobs.append(entry(token) | {"top_logprobs": top})

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None
        if getattr(self, "grammar", None):
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


@dataclass(eq=False)
class Job:
    """One request in the engine. Events go to `on_event`, or queue in `events` when it is None."""

    request: ChatRequest
    tokens: list[int]
    spans: Sequence[ImageInsert] = ()
    should_stop: Callable[[], bool] | None = None
    on_event: Callable[[Event], None] | None = None
    events: deque[Event] = field(default_factory=deque)
    result: GenerationResult | None = None  # set when finished
    error: SmallfourError | None = None  # set when it failed inside the engine

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        else:
            self.events.append(event)


class _Slot:
    """One sequence of the context and the request it is generating, if any."""

    def __init__(self, seq: int):
        self.seq = seq
        self.job: Job | None = None

    def start(self, model: Model, job: Job, reused: int) -> None:
        self.job = job
        self.pieces = list(prompt_pieces(job.tokens, job.spans, reused))
        self.position = reused
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.stream = _Stream(model, parse_tools=bool(job.request.tools))
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.sampler = Sampler(model, job.request.sampling)
        self.result = GenerationResult(prompt_tokens=len(job.tokens), cached_tokens=reused)
        self.budget = min(job.request.sampling.max_tokens, model.n_ctx_seq - len(job.tokens))
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.next_token is None and bool(self.pieces)

    def finish(self, reason: str | None = None) -> None:
        job, result = self.job, self.result
        if reason is not None:
            result.finish_reason = reason
        finished = time.perf_counter()
        first = self.first_token_at or finished
        result.prompt_ms, result.predicted_ms = (first - self.started) * 1000.0, (finished - first) * 1000.0
        _finish_tool_calls(self.stream, result)
        result.logprobs = self.sampler.logprobs
        self.sampler.close()
        self.job = None
        job.result = result
        if result.tool_calls:
            job.emit(Event("tool_calls", result=result))
        job.emit(Event("finish", result=result))

    def fail(self, error: SmallfourError) -> None:
        self.sampler.close()
        job, self.job = self.job, None
        job.error = error


class Engine:
    """Continuous batching over `model`'s sequences; `submit` requests, then `step` until they finish."""

    def __init__(self, model: Model):
        self.model = model
        self.slots = [_Slot(seq) for seq in range(model.n_seq)]
        self.queue: deque[Job] = deque()

    def submit(self, request: ChatRequest, tokens: list[int], spans: Sequence[ImageInsert] = (), *,
               should_stop: Callable[[], bool] | None = None,
               on_event: Callable[[Event], None] | None = None) -> Job:
        """Queue a request whose prompt is already tokenized (images at `spans`)."""
        self.model.check_fits(tokens, spans)
        job = Job(request, tokens, spans, should_stop, on_event)
        self.queue.append(job)
        return job

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(slot.job is not None for slot in self.slots)

    @property
    def active(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def run(self, job: Job) -> None:
        """Step until `job` is finished (other requests progress alongside)."""
        while not job.finished:
            self.step()
        if job.error is not None:
            raise job.error

    def cancel(self) -> None:
        """Drop every queued and running request (Ctrl-C): their slots stop where they are."""
        self.queue.clear()
        for slot in self.slots:
            if slot.job is not None:
                slot.finish("interrupted")

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """Admit what fits, then one `llama_decode` for every running slot."""
        self._drop_stopped()
        self._admit()
        model = self.model
        for slot in self.slots:  # images go in one at a time, through libmtmd, before the shared batch
            while slot.prefilling and slot.pieces[0][2] is not None:
                self._guard(slot, lambda s=slot: self._decode_image(s))
        room = model.n_batch
        pieces: list[tuple[int, list[int], bool]] = []
        wanting: list[_Slot] = []
        for slot in self.slots:
            if slot.job is not None and slot.next_token is not None:
                pieces.append((slot.seq, [slot.next_token], True))
                wanting.append(slot)
                room -= 1
        for slot in self.slots:
            if room == 0:
                break
            if not slot.prefilling or slot.pieces[0][2] is not None:
                continue
            start, end, _ = slot.pieces[0]
            take = min(end - slot.position, room)
            last = slot.position + take == len(slot.job.tokens)
            pieces.append((slot.seq, slot.job.tokens[slot.position:slot.position + take], last))
            slot.position += take
            room -= take
            if slot.position == end:
                slot.pieces.pop(0)
            if last:
                wanting.append(slot)
        if not pieces:
            return
        try:
            indices = model.decode_batch(pieces)
        except SmallfourError as exc:
            for seq, _, _ in pieces:
                slot = self.slots[seq]
                if slot.job is not None:
                    slot.fail(exc)
            return
        for slot, index in zip(wanting, (i for i in indices if i is not None), strict=True):
            self._advance(slot, index)

    def _drop_stopped(self) -> None:
        """Requests asked to stop (a client gone) leave the queue, or their slot while it reads the prompt;
        generating slots poll `should_stop` after every token."""
        for job in [job for job in self.queue if job.should_stop is not None and job.should_stop()]:
            self.queue.remove(job)
            job.error = SmallfourError("stopped before it started")
        for slot in self.slots:
            if slot.prefilling and slot.job.should_stop is not None and slot.job.should_stop():
                slot.finish("interrupted")

    def _guard(self, slot: _Slot, action: Callable[[], None]) -> None:
        try:
            action()
        except SmallfourError as exc:
            slot.fail(exc)

    def _decode_image(self, slot: _Slot) -> None:
        start, end, span = slot.pieces.pop(0)
        self.model.decode_image(span, slot.job.tokens, slot.seq)
        slot.position = end
        if end == len(slot.job.tokens):
            raise SmallfourError("internal error: a prompt cannot end with an image")

    def _admit(self) -> None:
        """Give queued requests the free slots, each starting from the longest prefix held anywhere.

        A request whose prompt shares a long prefix with one a slot is reading right now waits
        for that (one step, usually): then it copies those positions instead of computing them
        again — what makes the first wave of a batch with one system prompt cheap.
        """
        model = self.model
        waiting: list[Job] = []
        while self.queue:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                break
            job = self.queue.popleft()
            entries = image_entries(job.spans)
            held = {seq: model.reusable_prefix(job.tokens, entries, seq) for seq in range(model.n_seq)}
            source = max(held, key=lambda seq: held[seq])
            if self._soon_shared(job) >= held[source] + WORTH_WAITING:
                waiting.append(job)
                continue
            slot = max(free, key=lambda s: held[s.seq])
            reused = held[source]
            if held[slot.seq] >= reused:
                model.truncate(held[slot.seq], slot.seq)
                reused = held[slot.seq]
            else:
                model.share_prefix(source, slot.seq, reused)
            slot.start(model, job, reused)
        self.queue.extendleft(reversed(waiting))

    def _soon_shared(self, job: Job) -> int:
        """The longest prefix of `job`'s prompt that a slot still reading its prompt is about to hold."""
        longest = 0
        for slot in self.slots:
            if slot.prefilling:
                shared = 0
                for a, b in zip(job.tokens[:-1], slot.job.tokens):
                    if a != b:
                        break
                    shared += 1
                if shared > slot.position:
                    longest = max(longest, shared)
        return longest

    def _advance(self, slot: _Slot, index: int) -> None:
        """The slot's logits are at batch position `index`: sample, emit, decide whether it goes on."""
        job, result, stream = slot.job, slot.result, slot.stream
        token = _next_token(self.model, slot.sampler, stream, result, job.request.think_budget, index)
        slot.first_token_at = slot.first_token_at or time.perf_counter()
        if self.model.is_end(token):
            slot.finish("stop")
            return
        result.tokens.append(token)
        result.completion_tokens += 1
        text = _route(self.model, token, stream, slot.decoder, result)
        if text:
            job.emit(Event(stream.channel, text))
        if job.should_stop is not None and job.should_stop():
            slot.finish("interrupted")
        elif result.completion_tokens >= slot.budget:
            slot.finish("length")
        else:
            slot.next_token = token


def _next_token(model: Model, sampler: Sampler, stream: _Stream, result: GenerationResult,
                think_budget: int | None, index: int) -> int:
    """The thinking budget: once spent, `[/THINK]` is the token; once closed, the thought stays closed."""
    if think_budget is not None and stream.think_close is not None:
        if stream.channel == "reasoning" and result.reasoning_tokens >= think_budget:
            sampler.accept(stream.think_close)
            return stream.think_close
        if stream.thought_closed and stream.think_open is not None:
            model.logits(index)[stream.think_open] = -np.inf
    return sampler.sample(model, index)


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


__all__ = ["Engine", "Job", "Sampler", "interpret"]
