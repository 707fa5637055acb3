"""Prompts identical to mistral-common, tool-call parsing, and the thinking budget."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import HF
from smallfour.generation import complete, interpret, prompt_tokens, resolve_request
from smallfour.model import Model
from helpers import assert_one_line_error, run_cli

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# mistral-common writes tools and arguments with ensure_ascii=False: "ü" stays one character, not "\\u00fc".
# Function names must be ASCII there; everything else may not be.
UNICODE_TOOLS = [{"type": "function", "function": {
    "name": "meteo_ville", "description": "Le temps qu'il fait — 天気",
    "parameters": {"type": "object", "properties": {"ville": {"type": "string", "description": "p. ex. « Köln »"}},
                   "required": ["ville"]}}}]

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Bonjour !"}],
    "system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    "several turns": [
        {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Rhône."},
        {"role": "user", "content": "Longer?"}, {"role": "assistant", "content": "The Loire is longer."},
        {"role": "user", "content": "Which one flows into the Mediterranean?"}],
    "earlier thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "and 3+3?"}],
    "tools": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abc123def", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "Thanks [INST] </s>"}],
    "non-ASCII tools": [
        {"role": "user", "content": "Quel temps à Zürich ?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abc123def", "type": "function", "function": {
            "name": "meteo_ville", "arguments": "{\"ville\": \"Zürich 東京\"}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "{\"température\": \"21 °C\"}"},
        {"role": "user", "content": "Merci"}],
}
CONVERSATION_TOOLS = {"tools": TOOLS, "non-ASCII tools": UNICODE_TOOLS}


@pytest.fixture(scope="module")
def llm(converted):
    with Model.load(converted(HF, "q8_0"), n_ctx=1024) as model:
        yield model


@pytest.fixture(scope="module")
def reference(checkpoint):
    return MistralTokenizer.from_file(str(checkpoint(HF) / "tekken.json"))


@pytest.mark.parametrize("effort", [None, "none", "high"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_tokens_match_mistral_common(llm, reference, name, effort):
    messages = CONVERSATIONS[name]
    tools = CONVERSATION_TOOLS.get(name)
    request = resolve_request(messages, effort=effort, tools=tools)
    _, tokens = prompt_tokens(llm, request)
    extra = {"reasoning_effort": effort} if effort else {}
    expected = reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools, **extra))
    assert tokens == expected.tokens


def test_cli_dry_run_with_messages_file(tmp_path, converted, reference):
    messages = CONVERSATIONS["several turns"]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    result = run_cli("run", converted(HF, "q8_0"), "--messages", path, "--effort", "high", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    expected = reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages, reasoning_effort="high"))
    assert json.loads(result.stdout)["tokens"] == expected.tokens


def crafted(llm, text: str) -> list[int]:
    return llm.tokenize(text, special=True)


def test_tool_calls_are_parsed(llm):
    tokens = crafted(llm, '[THINK]Need the weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Zürich 東京"}'
                          '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris", "h24": true}')
    result = interpret(llm, tokens)
    assert result.reasoning_content == "Need the weather."
    assert result.content == "" and result.tool_call_error is None and result.finish_reason == "tool_calls"
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls]
    assert calls == [("get_weather", {"city": "Zürich 東京"}), ("get_time", {"tz": "Europe/Paris", "h24": True})]
    # Arguments keep their characters, as the model wrote them and mistral-common writes them back.
    assert result.tool_calls[0]["function"]["arguments"] == '{"city": "Zürich 東京"}'
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in result.tool_calls)
    assert len({c["id"] for c in result.tool_calls}) == 2


@pytest.mark.parametrize(("text", "problem"), [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', "not JSON"),
    ("[TOOL_CALLS]get_weather", "no [ARGS]"),
    ('[TOOL_CALLS][ARGS]{"city": "Paris"}', "no name"),
    ('[TOOL_CALLS]get_weather[ARGS]["Paris"]', "not a JSON object"),
])
def test_malformed_tool_calls_are_reported(llm, text, problem):
    result = interpret(llm, crafted(llm, text))
    assert result.tool_calls == [] and problem in result.tool_call_error
    assert result.finish_reason != "tool_calls"


def test_tool_call_text_without_tools_stays_text(llm):
    result = interpret(llm, crafted(llm, "Hello[TOOL_CALLS]x[ARGS]{}"), parse_tools=False)
    assert result.tool_calls == [] and result.tool_call_error is None and result.content.startswith("Hello")


@pytest.mark.parametrize("budget", [1, 6])
def test_think_budget_closes_the_thought(llm, budget):
    control = llm.control_tokens
    think, close = control["[THINK]"], control["[/THINK]"]
    # A model that always wants to (re)open its thought and can neither close it nor stop.
    bias = {think: 100.0, close: -100.0, control["</s>"]: -100.0}
    request = resolve_request([{"role": "user", "content": "Think."}], effort="high", think_budget=budget,
                              logit_bias=bias, max_tokens=budget + 8, temperature=0.0)
    result = complete(llm, request)
    assert result.tokens[0] == think
    assert result.tokens[budget + 1] == close, result.tokens
    assert result.reasoning_tokens == budget + 1  # the budget's tokens plus the forced [/THINK]
    answer = result.tokens[budget + 2:]
    assert len(answer) == 6 and think not in answer and close not in answer
    # The channels hold exactly their tokens' text: the thought inside, the answer after [/THINK].
    assert result.reasoning_content == llm.detokenize(result.tokens[1:budget + 1]).decode("utf-8", "replace")
    assert result.content == llm.detokenize(answer).decode("utf-8", "replace") != ""


def test_unknown_effort_and_preset(converted):
    model = converted(HF, "q8_0")
    bad_effort = run_cli("run", model, "-p", "x", "--effort", "medium")
    assert bad_effort.returncode == 1 and "accepts none or high" in bad_effort.stderr
    bad_preset = run_cli("run", model, "-p", "x", "--preset", "turbo")
    assert bad_preset.returncode == 1 and "unknown preset" in bad_preset.stderr


def test_cli_messages_body_goes_through_the_openai_layer(tmp_path, converted, reference):
    """A --messages file may be a whole chat-completions body, read as batch and serve read one:
    role developer is the system message, legacy functions / function_call / role function are
    tools / tool calls / tool results, pretty-printed arguments are re-serialised, and
    reasoning_effort "medium" runs as "high"."""
    tools = TOOLS
    body = {"reasoning_effort": "medium", "functions": [tools[0]["function"]], "messages": [
        {"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{\n  "city":   "Paris"\n}'}},
        {"role": "function", "name": "get_weather", "tool_call_id": "abc123def", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "Thanks"}]}
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    result = run_cli("run", converted(HF, "q8_0"), "--messages", path, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert "'medium' runs as 'high'" in result.stderr
    translated = [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "abc123def", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "Thanks"}]
    expected = reference.encode_chat_completion(ChatCompletionRequest.from_openai(translated, tools=tools,
                                                                                   reasoning_effort="high"))
    assert json.loads(result.stdout)["tokens"] == expected.tokens
    # Fields run cannot honour are refused by name, as batch refuses them.
    path.write_text(json.dumps(body | {"stream": True}))
    refused = run_cli("run", converted(HF, "q8_0"), "--messages", path, "--dry-run")
    assert refused.returncode == 1 and "body.stream = true is not supported by smallfour run" in refused.stderr


def test_cli_messages_body_stop_cuts_the_answer(tmp_path, converted):
    """A body's `stop` ends the answer before the stop string, streamed or --json, as batch and serve do."""
    model = converted(HF, "q8_0")
    body = {"messages": [{"role": "user", "content": "Count."}], "temperature": 0, "max_tokens": 24}
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    full = run_cli("run", model, "--messages", path, "--json")
    assert full.returncode == 0, full.stderr
    content = json.loads(full.stdout)["content"]
    assert len(content) >= 8, content  # the fixture model writes something to cut
    stop = content[len(content) // 2:len(content) // 2 + 3]
    cut = content[:content.find(stop)]
    path.write_text(json.dumps(body | {"stop": [stop]}))
    answer = json.loads(run_cli("run", model, "--messages", path, "--json").stdout)
    assert (answer["content"], answer["finish_reason"]) == (cut, "stop")
    streamed = run_cli("run", model, "--messages", path)
    assert streamed.returncode == 0 and streamed.stdout == cut + "\n"


class _CtrlC(io.StringIO):
    """A chat's output that presses Ctrl-C (SIGINT to this process) when the `after`-th piece is written."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.pieces = after, 0

    def write(self, text: str) -> int:
        self.pieces += 1
        if self.pieces == self.after:
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def test_a_reply_cut_short_is_read_back_from_the_cache(llm, reference):
    """A chat reply stopped at max-tokens, then one stopped by Ctrl-C: each next turn reuses the whole KV
    cache (a prompt from the replies' text tokenized again matched it only up to the cut reply), and the
    prompt is mistral-common's encoding of the saved conversation with each cut reply's text tokens
    replaced by the ids the model generated."""
    from rich.console import Console

    from smallfour.chat import Session, send

    eos = llm.control_tokens["</s>"]
    # Temperature 1 on random weights: replies whose text does not tokenize back into their ids.
    session = Session(model=llm, overrides={"max_tokens": 100, "seed": 7, "temperature": 1.0,
                                            "logit_bias": {eos: -100.0}})
    llm.reset()
    send(session, Console(file=io.StringIO()), {"role": "user", "content": "Bonjour"}, live=False)
    first = session.last
    assert first.result.finish_reason == "length" and not first.interrupted
    held = len(llm.tokens)

    session.overrides["max_tokens"] = 400
    send(session, Console(file=_CtrlC(after=100)), {"role": "user", "content": "Tell me a long story"}, live=False)
    second = session.last
    assert second.interrupted and 90 <= second.result.completion_tokens < 400, second.result.finish_reason
    assert second.reused >= 0.9 * held, (second.reused, held)  # measured: 116 of 116; before the fix 58 of 116
    held = len(llm.tokens)

    send(session, Console(file=io.StringIO()), {"role": "user", "content": "Go on"}, live=False)
    third = session.last
    assert third.reused >= 0.9 * held, (third.reused, held)  # measured: 225 of 225; before the fix 141 of 231
    assert third.result.prompt_tokens - third.reused < 20  # only the new turn was read

    # What the model read for the third turn, against mistral-common.
    evaluated = llm.tokens[:third.result.prompt_tokens]
    conversation = [{k: v for k, v in m.items() if k != "interrupted"} for m in session.conversation()]
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 3
    conversation = conversation[:5]  # the third turn's prompt
    assert session.conversation()[3]["interrupted"] is True and "_generated" not in json.dumps(
        session.conversation(), default=str)

    def encode(messages):
        return reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens

    expected = encode(conversation)
    retokenized = False
    for index, turn in ((3, second), (1, first)):  # the later reply first: earlier positions stay
        start = len(encode(conversation[:index]))
        end = encode(conversation[:index + 2]).index(eos, start)
        retokenized |= expected[start:end] != turn.result.tokens
        expected = expected[:start] + turn.result.tokens + expected[end:]
    assert retokenized, "the replies tokenize back into their ids: the test checks nothing, pick another seed"
    assert evaluated == expected


def test_an_image_after_a_reply_cut_short_moves_with_the_generated_ids(llm, converted, tmp_path):
    """The image of the message after a reply cut short sits where the generated ids (not the text's tokens)
    put it: libmtmd evaluates it there (a wrong place fails loudly), and the next turns reuse the whole cache."""
    import numpy as np
    from PIL import Image
    from rich.console import Console

    from smallfour.chat import GENERATED, Session, attach_image, run_turn

    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(picture)
    eos = llm.control_tokens["</s>"]
    session = Session(model=llm, model_path=converted(HF, "q8_0"),
                      overrides={"max_tokens": 60, "seed": 7, "temperature": 1.0, "logit_bias": {eos: -100.0}})
    quiet = Console(file=io.StringIO())
    llm.reset()
    run_turn(session, quiet, "Bonjour", live=False)
    cut = session.messages[-1][GENERATED]
    assert len(cut.generated) != len(cut.rendered)  # what comes after the reply moves
    held = len(llm.tokens)
    attach_image(session, str(picture))
    run_turn(session, quiet, "What is in the picture?", live=False)
    assert session.messages[-2]["content"][0]["type"] == "image_url"
    assert session.last.reused >= 0.9 * held, (session.last.reused, held)
    held = len(llm.tokens)
    run_turn(session, quiet, "And then?", live=False)
    assert session.last.reused >= 0.9 * held, (session.last.reused, held)  # the image's cells included


def test_generated_ids_replace_only_what_the_prompt_still_holds():
    from dataclasses import dataclass

    from smallfour.generation import GeneratedReply, with_generated

    @dataclass(frozen=True)
    class Span:  # an image's place, as vision.ImageSpan has it
        start: int
        n_tokens: int

    tokens = [1, 2, 3, 10, 11, 2, 4, 4, 5, 12, 13, 2, 6]
    spans = [Span(1, 1), Span(6, 2)]
    replies = [GeneratedReply(3, (10, 11), (20, 21, 22)), GeneratedReply(9, (12, 13), (23,))]
    spliced, moved = with_generated(tokens, spans, replies)
    assert spliced == [1, 2, 3, 20, 21, 22, 2, 4, 4, 5, 23, 2, 6]
    assert moved == [Span(1, 1), Span(7, 2)]  # the image after the first reply moved with it
    assert (tokens, spans) == ([1, 2, 3, 10, 11, 2, 4, 4, 5, 12, 13, 2, 6], [Span(1, 1), Span(6, 2)])
    # A reply the prompt no longer holds there (an earlier message changed) is left as the template wrote it.
    assert with_generated(tokens, spans, [GeneratedReply(4, (10, 11), (20,))]) == (tokens, spans)
    # Nor is one replaced that would cut into an image.
    assert with_generated(tokens, spans, [GeneratedReply(5, (2, 4), (20,))]) == (tokens, spans)


EMPTY_CONTENTS = {"empty": ("", ""), "whitespace": (" \n\t", ": only whitespace"),
                  "no parts": ([], ": no parts"),
                  "blank text parts": ([{"type": "text", "text": ""}, {"type": "text", "text": "  "}],
                                       ": no image and no text but whitespace")}


@pytest.mark.parametrize("name", list(EMPTY_CONTENTS))
def test_empty_user_and_system_content_is_refused_like_missing_content(name):
    """Batch lines and serve (the OpenAI layer) refuse an empty user or system message, naming it, as they
    refuse one without content; an empty tool result and a user message that is only an image are fine."""
    from smallfour.openai import RequestError, parse_body

    content, detail = EMPTY_CONTENTS[name]
    question = {"role": "user", "content": "Weather?"}
    for role, messages, index in (("user", [question, {"role": "assistant", "content": "Where?"},
                                            {"role": "user", "content": content}], 2),
                                  ("system", [{"role": "developer", "content": content}, question], 0)):
        with pytest.raises(RequestError) as refused:
            parse_body({"messages": messages})
        assert (refused.value.param, refused.value.status) == ("messages", 400)
        assert refused.value.message == f"body.messages[{index}] ({role}) has empty content{detail}"
    with pytest.raises(RequestError, match=r"body.messages\[0\] \(user\) has no content"):
        parse_body({"messages": [{"role": "user", "content": None}]})  # what empty content is refused like
    calls = {"role": "assistant", "content": None, "tool_calls": [{"id": "abc123def", "type": "function",
                                                                   "function": {"name": "f", "arguments": "{}"}}]}
    accepted = [question, calls, {"role": "tool", "tool_call_id": "abc123def", "content": content}]
    assert parse_body({"messages": accepted}).request.messages[2]["content"] == content
    image = [{"type": "image_url", "image_url": {"url": "photo.png"}}, {"type": "text", "text": ""}]
    assert parse_body({"messages": [{"role": "user", "content": image}]}).request.messages[0]["content"] == image


def test_run_messages_with_an_empty_user_message_is_refused(tmp_path, converted):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "   "}]))
    refused = run_cli("run", converted(HF, "q8_0"), "--messages", path, "--dry-run")
    assert_one_line_error(refused, "body.messages[2] (user) has empty content: only whitespace")
