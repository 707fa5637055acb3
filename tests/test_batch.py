"""`smallfour batch`: OpenAI Batch JSONL in and out, bad lines, crash + --resume, Ctrl-C, piping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import HF
from smallfour.batch import BatchOutput, LineError, error_line, parse_jobs, pending_jobs, request_from_body
from smallfour.errors import SmallfourError
from smallfour.generation import PRESETS, prompt_tokens
from smallfour.model import Model
from helpers import SMALLFOUR, assert_one_line_error, line_error, run_cli

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
CHAT_COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "usage", "timings"}


def line(custom_id, body=None, **extra) -> str:
    item = {"custom_id": custom_id, "method": "POST", "url": URL,
            "body": body if body is not None else {"messages": HELLO, "max_tokens": 4}}
    item.update(extra)
    return json.dumps(item)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    return path


def read_output(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output must end with a whole line"
    return [json.loads(text) for text in data.splitlines()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_lines(path: Path, at_least: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(path) < at_least:
        assert process.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "the job wrote no output"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return MistralTokenizer.from_file(str(checkpoint(HF) / "tekken.json"))


# --- the request mapping ------------------------------------------------------------------------


def test_body_fields_map_to_the_request():
    request, stop = request_from_body({"messages": HELLO, "reasoning_effort": "high", "max_tokens": 50,
                                       "max_completion_tokens": 7, "top_p": 0.5, "top_k": -1, "seed": 11,
                                       "logit_bias": {"52528": 100, "3": -100}, "stop": "###"})
    assert request.effort == "high" and request.messages == HELLO
    think = PRESETS["think"].sampling
    assert request.sampling.temperature == think.temperature  # the think preset's default
    assert (request.sampling.max_tokens, request.sampling.top_p, request.sampling.top_k) == (7, 0.5, 0)
    assert request.sampling.seed == 11 and dict(request.sampling.logit_bias) == {52528: 100.0, 3: -100.0}
    assert stop == ("###",)

    instant, _ = request_from_body({"messages": HELLO, "reasoning_effort": "none", "temperature": 0})
    assert instant.effort == "none" and instant.sampling.temperature == 0.0
    assert instant.sampling.max_tokens == PRESETS["instant"].sampling.max_tokens and instant.think_budget is None

    # Without reasoning_effort the command's --preset decides; a thinking line gets --think-budget.
    default, _ = request_from_body({"messages": HELLO}, preset="think-budget", think_budget=9)
    assert default.effort == "high" and default.think_budget == 9
    quick, _ = request_from_body({"messages": HELLO, "reasoning_effort": "none"}, preset="think", think_budget=9)
    assert quick.effort == "none" and quick.think_budget is None

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert request_from_body({"messages": HELLO, "tools": tools})[0].tools == tools
    assert request_from_body({"messages": HELLO, "tools": tools, "tool_choice": "none"})[0].tools is None


@pytest.mark.parametrize("body, fragment", [
    ([], "body must be a JSON object"),
    ({}, "body.messages must be a non-empty list"),
    ({"messages": []}, "body.messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "PATH or data: URL"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only user messages take images"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "text and image_url parts"),
    ({"messages": HELLO, "reasoning_effort": "extreme"}, 'accepts "none" or "high"'),
    ({"messages": HELLO, "temperature": "hot"}, "body.temperature must be a number"),
    ({"messages": HELLO, "max_tokens": 0}, "body.max_tokens must be an integer of at least 1"),
    ({"messages": HELLO, "max_tokens": True}, "body.max_tokens must be an integer"),
    ({"messages": HELLO, "top_p": 1.5}, "body.top_p must be a number between 0 and 1"),
    ({"messages": HELLO, "seed": "1"}, "body.seed must be an integer"),
    ({"messages": HELLO, "logit_bias": {"abc": 1}}, "is not a token id"),
    ({"messages": HELLO, "logit_bias": {"5": 500}}, "between -100 and 100"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "body.stop must be"),
    ({"messages": HELLO, "n": 2}, "body.n = 2 is not supported"),
    ({"messages": HELLO, "stream": True}, "body.stream = true is not supported"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "body.tools must be"),
])
def test_invalid_bodies_are_rejected(body, fragment):
    with pytest.raises(LineError) as caught:
        request_from_body(body)
    assert caught.value.code == "invalid_request" and fragment in caught.value.message


def test_logit_bias_outside_the_vocabulary():
    with pytest.raises(LineError, match="outside the vocabulary"):
        request_from_body({"messages": HELLO, "logit_bias": {"131072": 1}}, n_vocab=131072)


def test_duplicates_and_resume_bookkeeping():
    jobs = parse_jobs([line("a"), "", "{oops", line("a"), line("b", url="/v1/embeddings"), "[]",
                       json.dumps({"url": URL, "body": {"messages": HELLO}})])
    assert [(j.custom_id, j.error.code if j.error else None) for j in jobs] == [
        ("a", None), ("line-3", "invalid_json"), ("a", "duplicate_custom_id"), ("b", "invalid_url"),
        ("line-6", "invalid_json"), ("line-7", "missing_custom_id")]
    # The output already holds the first "a" and line 3's error: those two are done.
    pending = pending_jobs(jobs, Counter({"a": 1, "line-3": 1}))
    assert [(j.line_no, j.custom_id) for j in pending] == [(4, "a"), (5, "b"), (6, "line-6"), (7, "line-7")]
    # A line that has no usable custom_id of its own, written under one a later line uses, makes that
    # later line the duplicate (the ids are unique in the output either way).
    clash = parse_jobs(["{oops", line("line-1")])
    assert [(j.custom_id, j.error.code) for j in clash] == [("line-1", "invalid_json"),
                                                            ("line-1", "duplicate_custom_id")]


def test_resume_drops_a_line_cut_short(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = json.dumps(error_line("a", LineError("c", "m")))
    out.write_bytes(whole.encode() + b"\n" + b'{"id": "y", "custom_id": "b", "resp')
    output, done = BatchOutput.open(out, resume=True)
    output.write({"id": "z", "custom_id": "b", "response": None, "error": None})
    output.close()
    assert done == Counter({"a": 1})
    assert [item["custom_id"] for item in read_output(out)] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind

    # A whole last line whose newline was lost is kept; a damaged line before the last one stops us.
    out.write_bytes(whole.encode())
    output, done = BatchOutput.open(out, resume=True)
    output.close()
    assert done == Counter({"a": 1}) and out.read_bytes() == whole.encode() + b"\n"
    out.write_bytes(b"garbage\n" + whole.encode() + b"\n")
    with pytest.raises(SmallfourError, match="line 1 is not a batch output line"):
        BatchOutput.open(out, resume=True)


def test_reasoning_effort_reaches_the_prompt(converted, tokenizer):
    llm = Model.load(converted(HF, "q8_0"), vocab_only=True)
    for effort in (None, "none", "high"):
        body = {"messages": HELLO} | ({"reasoning_effort": effort} if effort else {})
        request, _ = request_from_body(body)
        extra = {"reasoning_effort": effort} if effort else {}
        expected = tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(HELLO, **extra))
        assert prompt_tokens(llm, request)[1] == expected.tokens, effort
    high, _ = request_from_body({"messages": HELLO, "reasoning_effort": "high"})
    assert '"reasoning_effort": "high"' in prompt_tokens(llm, high)[0]


# --- the command ------------------------------------------------------------------------------------


def test_batch_answers_valid_lines_and_reports_bad_ones(converted, tokenizer, tmp_path):
    (hello,) = tokenizer.instruct_tokenizer.tokenizer.encode(" hello", bos=False, eos=False)
    forced = {"messages": HELLO, "temperature": 0, "logit_bias": {str(hello): 100}}
    lines = [
        line("plain"),
        line("high", {"messages": HELLO, "reasoning_effort": "high", "max_completion_tokens": 2, "max_tokens": 9}),
        "{this is not json",
        line("forced", forced | {"max_tokens": 3}),
        "",
        line("stopped", forced | {"max_tokens": 6, "stop": ["lo hel", "zzz"]}),
        line("plain"),
        line("wrong-url", url="/v1/embeddings"),
        line("wrong-method", method="GET"),
        json.dumps({"method": "POST", "url": URL, "body": {"messages": HELLO}}),
        line("no-messages", {"max_tokens": 4}),
        line("bad-effort", {"messages": HELLO, "reasoning_effort": "extreme"}),
        line("bad-type", {"messages": HELLO, "max_tokens": "four"}),
        line("too-long", {"messages": [{"role": "user", "content": "word " * 800}], "max_tokens": 4}),
        line("seeded-1", {"messages": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": 7}),
        line("seeded-2", {"messages": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": 7}),
        # 16 tokens at temperature 1: two free samples agree with negligible probability.
        line("free-1", {"messages": HELLO, "max_tokens": 16, "temperature": 1.0}),
        line("free-2", {"messages": HELLO, "max_tokens": 16, "temperature": 1.0}),
        line("last"),
    ]
    out = tmp_path / "out.jsonl"
    result = run_cli("batch", converted(HF, "q8_0"), write_jsonl(tmp_path / "in.jsonl", lines), "-o", out,
                     "--ctx", "512")
    assert result.returncode == 0, result.stderr
    assert "18 of 18 requests done (9 answered, 9 error lines" in result.stderr and "tok/s" in result.stderr
    items = read_output(out)
    # Lines are written as requests finish (several run at once), so the order is not the input's.
    assert Counter(i["custom_id"] for i in items) == Counter(
        ["plain", "high", "line-3", "forced", "stopped", "plain", "wrong-url", "wrong-method", "line-10",
         "no-messages",
         "bad-effort", "bad-type", "too-long", "seeded-1", "seeded-2", "free-1", "free-2", "last"])
    assert len({i["id"] for i in items}) == len(items)
    answers = {i["custom_id"]: i for i in items if line_error(i) is None}
    assert set(answers) == {"plain", "high", "forced", "stopped", "seeded-1", "seeded-2", "free-1", "free-2",
                            "last"}
    for item in answers.values():
        assert item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert set(body) == CHAT_COMPLETION_KEYS and body["object"] == "chat.completion"
        assert body["model"] == "hf-bf16-q8_0"
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert "reasoning_tokens" in usage["completion_tokens_details"]

    def usage(custom_id):
        return answers[custom_id]["response"]["body"]["usage"]

    def prompt_length(**extra):
        return len(tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(HELLO, **extra)).tokens)

    assert usage("plain")["prompt_tokens"] == prompt_length()
    assert usage("plain")["completion_tokens"] == 4
    assert usage("high")["prompt_tokens"] == prompt_length(reasoning_effort="high")
    assert usage("high")["completion_tokens"] == 2  # max_completion_tokens wins over max_tokens
    forced_answer = answers["forced"]["response"]["body"]["choices"][0]
    assert forced_answer["message"]["content"] == " hello" * 3 and forced_answer["finish_reason"] == "length"
    stopped = answers["stopped"]["response"]["body"]
    assert stopped["choices"][0]["message"]["content"] == " hel" and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 2

    def content(custom_id):
        return answers[custom_id]["response"]["body"]["choices"][0]["message"]["content"]

    # The same seed samples the same answer; lines without a seed do not inherit it.
    assert content("seeded-1") == content("seeded-2")
    assert content("free-1") != content("free-2")

    errors = {(i["custom_id"], line_error(i)["code"]): line_error(i)["message"] for i in items if line_error(i)}
    assert all(i["response"]["status_code"] == 400 for i in items if line_error(i))
    assert set(errors) == {("line-3", "invalid_json"), ("plain", "duplicate_custom_id"), ("wrong-url", "invalid_url"),
                           ("wrong-method", "invalid_method"), ("line-10", "missing_custom_id"),
                           ("no-messages", "invalid_request"), ("bad-effort", "invalid_request"),
                           ("bad-type", "invalid_request"), ("too-long", "invalid_request")}
    assert "line 3 is not valid JSON" in errors[("line-3", "invalid_json")]
    assert "accepts" in errors[("bad-effort", "invalid_request")]
    assert "context holds 512" in errors[("too-long", "invalid_request")]


def test_existing_output_needs_resume_or_overwrite(converted, tmp_path):
    model = converted(HF, "q8_0")
    source = write_jsonl(tmp_path / "in.jsonl", [line("a")])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert_one_line_error(run_cli("batch", model, source, "-o", out), "already exists", "--resume", "--overwrite")
    assert_one_line_error(run_cli("batch", model, source, "-o", out, "--resume", "--overwrite"), "not both")
    assert_one_line_error(run_cli("batch", model, source, "-o", "-", "--resume"), "--resume needs an output file")
    assert_one_line_error(run_cli("batch", model, tmp_path / "missing.jsonl", "-o", out), "does not exist")
    assert out.read_text() == "previous results\n"


def test_killed_job_resumes_without_loss_or_repeats(converted, tmp_path):
    """Kill -9 part-way, fake a line cut short by the crash, resume: one line per input line, no repeats."""
    model = converted(HF, "q8_0")
    valid = [f"r{n:02d}" for n in range(40)]
    lines = [line(cid, {"messages": [{"role": "user", "content": f"Question {cid}"}], "max_tokens": 8})
             for cid in valid]
    bad = {12: "{truncated", 20: line("r03"), 27: line("r99", url="/v1/completions"),
           33: json.dumps({"url": URL, "body": {"messages": HELLO}})}
    for position, text in sorted(bad.items()):
        lines.insert(position, text)
    source, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"

    job = subprocess.Popen([*SMALLFOUR, "batch", str(model), str(source), "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(out, 5, job)
    finally:
        job.kill()
        job.wait()
    before = out.read_bytes()
    finished = before.count(b"\n")
    assert 5 <= finished < len(lines), "the kill must land part-way"
    done_ids = {json.loads(text)["custom_id"] for text in before.splitlines()}
    next_id = next(cid for cid in valid if cid not in done_ids)
    with open(out, "ab") as file:  # a crash in the middle of writing the next line
        file.write(json.dumps({"id": "batch_req_cut", "custom_id": next_id, "response": {"status_code": 200}})
                   .encode()[:40])

    resumed = run_cli("batch", model, source, "-o", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished} already in the output" in resumed.stderr
    assert out.read_bytes().startswith(before)
    items = read_output(out)
    assert len(items) == len(lines)
    answered = Counter(i["custom_id"] for i in items if line_error(i) is None)
    assert answered == Counter(valid)
    errors = Counter((i["custom_id"][:5], line_error(i)["code"]) for i in items if line_error(i))
    assert errors == Counter({("line-", "invalid_json"): 1, ("r03", "duplicate_custom_id"): 1,
                              ("r99", "invalid_url"): 1, ("line-", "missing_custom_id"): 1})
    assert "batch_req_cut" not in out.read_text()


def test_ctrl_c_stops_cleanly_and_resumes(converted, tmp_path):
    model = converted(HF, "q8_0")
    valid = [f"q{n:02d}" for n in range(30)]
    lines = [line(cid, {"messages": [{"role": "user", "content": f"Tell me about {cid}"}], "max_tokens": 8})
             for cid in valid]
    source, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    job = subprocess.Popen([*SMALLFOUR, "batch", str(model), str(source), "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(out, 3, job)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert f"smallfour batch {model} {source} -o {out} --resume" in stderr.replace("\n", "")
    partial = read_output(out)  # ends with a whole line
    assert 3 <= len(partial) < len(valid) and stdout == ""

    resumed = run_cli("batch", model, source, "-o", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    items = read_output(out)
    assert [i["custom_id"] for i in items] == valid and all(line_error(i) is None for i in items)


def test_stdin_to_stdout(converted, tmp_path):
    lines = [line("one"), "not json", line("two", {"messages": HELLO, "max_tokens": 2})]
    piped = subprocess.run([*SMALLFOUR, "batch", str(converted(HF, "q8_0")), "-", "-o", "-"],
                           input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    items = [json.loads(text) for text in piped.stdout.splitlines()]  # stdout carries only the results
    # In the order they finish: the bad line's error at once, the answers when done.
    assert sorted((i["custom_id"], (line_error(i) or {}).get("code")) for i in items) == [
        ("line-2", "invalid_json"), ("one", None), ("two", None)]
    (two,) = [i for i in items if i["custom_id"] == "two"]
    assert two["response"]["body"]["usage"]["completion_tokens"] == 2
    assert "3 of 3 requests done" in piped.stderr and "stdout" in piped.stderr
    assert os.listdir(tmp_path) == []
