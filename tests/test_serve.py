"""`smallfour serve` as clients see it: a real server process on 127.0.0.1, the official `openai` SDK.

One server (parallel 2, a queue of 4, an API key, a 1 MiB body limit) on the q8_0 fixture and its
projector serves every test in order; the last one stops it with SIGTERM mid-stream.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import jsonschema
import numpy as np
import openai
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from conftest import HF
from helpers import SMALLFOUR

KEY = "sk-test-" + os.urandom(6).hex()
HELLO = [{"role": "user", "content": "Say hello."}]
EOS = "2"  # </s>: banned where a test needs the answer to run its full length


def call(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    """A plain HTTP call (no SDK): the status and the JSON body."""
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    def __init__(self, process: subprocess.Popen, port: int, log):
        self.process, self.port, self.log = process, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def stats(self) -> dict:
        return call(self.base + "/stats", key=KEY)[1]

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name, encoding="utf-8").read()


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    model = converted(HF, "q8_0")
    assert model.with_name(model.stem + "-mmproj.gguf").is_file()
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+", encoding="utf-8")
    process = subprocess.Popen([*SMALLFOUR, "serve", str(model), "--port", str(port), "--parallel", "2",
                                "--queue", "4", "--ctx", "1024", "--api-key", KEY, "--max-body", "1"],
                               stdout=log, stderr=subprocess.STDOUT)
    served = Served(process, port, log)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, served.output()
        try:
            if call(served.base + "/health")[1]["status"] == "ready":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, served.output()
        time.sleep(0.2)
    yield served
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return MistralTokenizer.from_file(str(checkpoint(HF) / "tekken.json"))


def png_data_url(width: int, height: int) -> str:
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- answers ------------------------------------------------------------------------------------


def test_stream_reassembles_the_same_answer(server, tokenizer):
    seed = int.from_bytes(os.urandom(3), "little")
    args = dict(model="anything", messages=HELLO, max_tokens=8, temperature=1.0, seed=seed,
                logit_bias={EOS: -100})
    whole = server.client.chat.completions.create(**args)
    assert whole.object == "chat.completion" and whole.model == "hf-bf16-q8_0"
    (choice,) = whole.choices
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens == len(tokenizer.encode_chat_completion(
        ChatCompletionRequest.from_openai(HELLO)).tokens)

    pieces, finish, usage = [], None, None
    for part in server.client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        assert part.object == "chat.completion.chunk" and part.id.startswith("chatcmpl-")
        if part.usage is not None:
            usage = part.usage
        for delta in part.choices:
            pieces.append(delta.delta.content or "")
            finish = delta.finish_reason or finish
    assert "".join(pieces) == choice.message.content and finish == "length"
    assert usage.completion_tokens == 8 and usage.prompt_tokens == whole.usage.prompt_tokens
    assert [m.id for m in server.client.models.list().data] == ["hf-bf16-q8_0"]


def test_effort_developer_and_prefix(server, tokenizer):
    messages = [{"role": "developer", "content": "Be brief."}, *HELLO]
    raw = server.client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=2,
                                                                  reasoning_effort="medium")
    assert raw.headers["x-reasoning-effort"] == "high"
    answer = raw.parse()
    assert answer.model_extra["reasoning_effort"] == "high"
    system = [{"role": "system", "content": "Be brief."}, *HELLO]
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat_completion(
        ChatCompletionRequest.from_openai(system, reasoning_effort="high")).tokens)
    # "minimal" is the model's "none"; a final assistant message is continued, not closed with </s>.
    prefix = [*HELLO, {"role": "assistant", "content": "Hello the"}]
    continued = server.client.chat.completions.create(model="m", messages=prefix, max_tokens=1,
                                                      reasoning_effort="minimal")
    assert continued.model_extra["reasoning_effort"] == "none"
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage

    expected = tokenizer.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Say hello."), AssistantMessage(content="Hello the", prefix=True)],
        reasoning_effort="none"))
    assert continued.usage.prompt_tokens == len(expected.tokens)


PICK = {"type": "function", "function": {
    "name": "pick_colour", "description": "Choose a colour.",
    "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                                    "bright": {"type": "boolean"}},
               "required": ["colour", "bright"], "additionalProperties": False}}}
OTHER = {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}


def test_tool_choice_is_enforced(server):
    schema = PICK["function"]["parameters"]
    named = server.client.chat.completions.create(
        model="m", messages=HELLO, tools=[OTHER, PICK], max_tokens=40, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "pick_colour"}})
    (choice,) = named.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "pick_colour"
    jsonschema.validate(json.loads(call.function.arguments), schema)

    # Legacy functions / function_call mean the same; streamed, the call arrives as a tool-call delta.
    calls = []
    for part in server.client.chat.completions.create(
            model="m", messages=HELLO, functions=[PICK["function"]], function_call={"name": "pick_colour"},
            max_tokens=40, stream=True):
        for delta in part.choices:
            calls += delta.delta.tool_calls or []
    (streamed,) = calls
    assert streamed.function.name == "pick_colour" and streamed.id.startswith("call_")
    jsonschema.validate(json.loads(streamed.function.arguments), schema)



def test_response_format_schema(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "size": {"enum": ["small", "large"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    answer = server.client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=60, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop", answer
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_an_image(server):
    text_only = server.client.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    content = [{"type": "image_url", "image_url": {"url": png_data_url(48, 32)}},
               {"type": "text", "text": "Say hello."}]
    seen = server.client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                 max_tokens=2)
    assert seen.usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        server.client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])


def test_logprobs_n_and_penalties(server):
    answer = server.client.chat.completions.create(model="m", messages=HELLO, max_tokens=4, n=3, logprobs=True,
                                                   top_logprobs=2, frequency_penalty=1.0, presence_penalty=0.5,
                                                   seed=5, temperature=1.0, logit_bias={EOS: -100})
    assert [c.index for c in answer.choices] == [0, 1, 2] and answer.usage.completion_tokens == 12
    assert len({c.message.content for c in answer.choices}) > 1  # seeds 5, 6, 7
    for choice in answer.choices:
        entries = choice.logprobs.content
        assert "".join(e.token for e in entries) == choice.message.content
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.logprob - 1e-6 or \
                entry.token in {t.token for t in entry.top_logprobs}


# --- errors -------------------------------------------------------------------------------------


def test_errors_are_openai_errors(server):
    client = server.client
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=HELLO, temperature=7)
    assert "body.temperature must be a number between 0 and 2" in caught.value.message
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="body.verbosity is not supported"):
        client.chat.completions.create(model="m", messages=HELLO, extra_body={"verbosity": "low"})
    with pytest.raises(openai.BadRequestError, match="context holds 1024"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 1200}])
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="m", messages=HELLO, reasoning_effort="extreme")
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
    chat = server.base + "/v1/chat/completions"
    assert call(chat, json.dumps({"messages": HELLO}).encode())[0] == 401
    # A body over --max-body is refused from its Content-Length, before the server reads it.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Content-Length", str((1 << 20) + 1))
    connection.endheaders()
    big = connection.getresponse()
    assert big.status == 413 and json.loads(big.read())["error"]["code"] == "request_too_large"
    connection.close()
    assert call(server.base + "/health") == (200, {"status": "ready"})


def wait_idle(server, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while (stats := server.stats())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def test_disconnect_frees_the_slot(server):
    stream = server.client.chat.completions.create(model="m", messages=HELLO, max_tokens=900, stream=True,
                                                   logit_bias={EOS: -100})
    for _, _ in zip(range(3), stream):
        pass
    assert server.stats()["in_flight"] == 1
    stream.close()
    # 900 tokens take far longer than this on the fixture: only a freed slot is idle so soon.
    assert wait_idle(server, 3.0)["in_flight"] == 0


def test_bounded_load(server):
    """16 clients × 4 requests against 2 slots and 4 places in the queue: each is answered or 429'd."""
    outcomes: Counter = Counter()
    lock = threading.Lock()
    before = server.stats()["requests"]

    def client() -> None:
        mine = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for _ in range(4):
            try:
                answer = mine.chat.completions.create(model="m", messages=HELLO, max_tokens=3)
                outcome = "ok" if answer.usage.completion_tokens >= 1 else "empty"
            except openai.RateLimitError as exc:
                outcome = "429" if exc.response.headers.get("retry-after") == "1" else "429 without Retry-After"
            except Exception as exc:  # noqa: BLE001 — counted, and the assertion below names it
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                outcomes[outcome] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert time.monotonic() - started < 90 and not any(t.is_alive() for t in threads)
    assert set(outcomes) <= {"ok", "429"} and sum(outcomes.values()) == 64, outcomes
    assert outcomes["ok"] >= 6 and outcomes["429"] >= 1, outcomes  # both paths taken
    after = wait_idle(server, 5.0)
    assert after["in_flight"] == 0
    answered = after["requests"].get("200", 0) - before.get("200", 0)
    refused = after["requests"].get("429", 0) - before.get("429", 0)
    assert (answered, refused) == (outcomes["ok"], outcomes["429"])
    assert not any(code.startswith("5") for code in after["requests"]), after


def test_sigterm_finishes_the_stream_then_exits(server):
    stream = server.client.chat.completions.create(model="m", messages=HELLO, max_tokens=12, stream=True,
                                                   logit_bias={EOS: -100})
    first = next(iter(stream))
    server.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"
    assert server.process.wait(timeout=60) == 0, server.output()
    assert "Traceback" not in server.output()
