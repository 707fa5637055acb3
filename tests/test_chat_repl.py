"""`smallfour chat`, driven for real in a terminal: tmux runs the REPL, send-keys types, capture-pane reads.

Needs the `tmux` binary (Debian/Ubuntu package `tmux`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

from rich.console import Console

from conftest import HF
from helpers import PROMPT, SMALLFOUR, assert_one_line_error, stats_numbers


def test_chat_repl_in_a_terminal(converted, terminal, tmp_path):
    model = converted(HF, "q8_0")
    saved = tmp_path / "conversation.json"
    term = terminal(model, "--ctx", "2048", "-n", "16", "--seed", "11")
    term.wait(lambda ls: term.at_prompt(ls, 1), 90, "the first prompt")
    assert "smallfour chat" in term.text() and "effort none" in term.text()

    # A turn typed over two lines (a trailing backslash continues the entry).
    term.submit("Bonjour\\", "second line")
    assert "... second line" in term.text()
    first = stats_numbers(term.submit("/stats"))
    assert first["reused"] == 0 and first["evaluated"] == first["prompt"] > 5
    assert 1 <= first["reply"] <= 16 and first["context_used"] > first["prompt"] and first["context_size"] == 2048
    assert "effort   none (last turn)" in term.text()

    # /effort high reaches the next turn.
    assert "effort high" in term.submit("/effort high")
    term.submit("And now think")
    second = stats_numbers(term.submit("/stats"))
    assert "effort   high (last turn)" in term.text()
    # [MODEL_SETTINGS] sits before the first user message: changing the effort invalidates the cache from there.
    assert 0 < second["reused"] < first["prompt"]

    # Ctrl-C while the model writes a long answer: generation stops, the REPL stays.
    assert "max-tokens 2000" in term.submit("/set max-tokens 2000")
    # Temperature 1 on random weights: a reply whose text does not tokenize back into its ids (below).
    assert "temperature 1.0" in term.submit("/set temperature 1")
    count = term.prompts(term.lines())
    term.type("Tell me a long story")
    term.keys("Enter")

    def writing(lines: list[str]) -> bool:
        footer = [line for line in lines if line][-1:]
        counts = [int(n) for n in re.findall(r"(\d+) tokens[^\n]*\(Ctrl-C stops\)", "\n".join(footer))]
        return bool(counts) and counts[-1] >= 40

    term.wait(writing, 60, "the answer to stream")
    term.keys("C-c")
    lines = term.wait(lambda ls: term.at_prompt(ls, count + 1), 30, "the prompt after Ctrl-C")
    stopped = re.findall(r"\[interrupted after (\d+) tokens; the partial answer is kept\]", "\n".join(lines))
    assert stopped and 40 <= int(stopped[-1]) < 1000, "\n".join(lines[-20:])
    third = stats_numbers(term.submit("/stats"))
    assert third["reply"] == int(stopped[-1])
    # The conversation so far came from the KV cache: at least the whole previous prompt.
    assert third["reused"] >= second["prompt"] and third["evaluated"] < third["prompt"] - second["prompt"] + 40
    assert third["context_used"] >= third["prompt"] + third["reply"] - 1
    # The next turn reads everything before it from the cache, the interrupted reply included: the prompt
    # carries the ids the model generated, not the reply's text tokenized again.
    assert "max-tokens 16" in term.submit("/set max-tokens 16")
    term.submit("Go on")
    after = stats_numbers(term.submit("/stats"))
    assert after["reused"] >= 0.9 * third["context_used"], (after, third)
    assert after["evaluated"] < 20 and after["prompt"] > third["context_used"]

    # Ctrl-C at the prompt drops the line typed so far.
    count = term.prompts(term.lines())
    term.type("never sent")
    term.wait(lambda ls: [line for line in ls if line][-1] == f"{PROMPT} never sent", 10, "the typed text")
    term.keys("C-c")
    term.wait(lambda ls: term.at_prompt(ls, count + 1), 10, "a fresh prompt after Ctrl-C")

    assert f"saved 8 messages to {saved}" in term.submit(f"/save {saved}")
    messages = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4
    assert messages[0]["content"] == "Bonjour\nsecond line"
    assert [m["content"] for m in messages[2::2]] == ["And now think", "Tell me a long story", "Go on"]
    assert all(m["content"] or m.get("reasoning_content") for m in messages[1::2])
    assert messages[5]["interrupted"] is True and not any("interrupted" in messages[i] for i in (1, 3, 7))
    assert all(set(m) <= {"role", "content", "reasoning_content", "interrupted"} for m in messages)
    assert "never sent" not in json.dumps(messages)

    # Ctrl-D leaves with exit code 0.
    term.keys("C-d")
    term.wait(lambda ls: "[exited 0]" in ls, 30, "the REPL to exit")

    # The input history is kept between runs: Up brings back the last entry; /load reads the saved file.
    history = (tmp_path / "home" / "chat_history").read_text(encoding="utf-8")
    assert "/effort high" in history and "Tell me a long story" in history and "never sent" not in history
    again = terminal(model, "--ctx", "2048", "-n", "4")
    again.wait(lambda ls: again.at_prompt(ls, 1), 90, "the prompt of a second run")
    again.keys("Up")
    again.wait(lambda ls: any(line == f"{PROMPT} /save {saved}" for line in ls), 10, "the recalled entry")
    again.keys("C-u")
    assert "loaded 8 messages" in again.submit(f"/load {saved}")
    again.submit("Continue")
    fourth = stats_numbers(again.submit("/stats"))
    assert fourth["reused"] == 0 and fourth["prompt"] > third["prompt"] + 5  # the loaded conversation was sent
    again.keys("C-d")
    again.wait(lambda ls: "[exited 0]" in ls, 30, "the second run to exit")


def test_thinking_is_folded_and_shown_on_request():
    from smallfour.chat import Session, TurnStats, _show_result, _TurnView, run_command
    from smallfour.generation import GenerationResult, resolve_request

    console = Console(record=True, force_terminal=True, width=80, color_system="standard")
    view = _TurnView()
    view.on_text("reasoning", "Let me count the legs.")
    view.on_text("content", "A spider has **8** legs.")
    console.print(view)
    streamed = console.export_text(styles=True)
    assert "\x1b[2mLet me count the legs.\x1b[0m" in streamed  # thinking dimmed while streaming

    result = GenerationResult(content="A spider has **8** legs.", reasoning_content="Let me count the legs.",
                              reasoning_tokens=6, completion_tokens=14, finish_reason="stop")
    session = Session(model=None, preset="think")
    session.last = TurnStats(result, "high", 0, 20, False, 34, 2048)
    _show_result(console, session.last, resolve_request([], preset="think"), rendered=True)
    folded = console.export_text()
    assert "(thought for 6 tokens — /think to show)" in folded
    assert "Let me count" not in folded and "A spider has 8 legs." in folded  # Markdown: ** rendered as bold
    assert run_command(session, console, "/think") is True
    assert "Let me count the legs." in console.export_text()
    assert run_command(session, console, "/exit") is False


def test_no_command_ends_the_repl_and_every_turn_is_saved(converted, tmp_path):
    """Bad /load files and failing commands print one error line each; the conversation survives and is autosaved."""
    model = converted(HF, "q8_0")
    (tmp_path / "latin1.json").write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    (tmp_path / "number.json").write_text('[{"role": "user", "content": 123}]')
    (tmp_path / "object.json").write_text('{"messages": 5}')
    (tmp_path / "markup[x].json").write_text("[/INST] not json")
    (tmp_path / "empty.json").write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},'
                                         ' {"role": "user", "content": ""}]')
    env = {**os.environ, "SMALLFOUR_HOME": str(tmp_path / "home")}
    bad = ["/load latin1.json", "/load number.json", "/load object.json", "/load markup[x].json", "/load missing.json",
           "/image nowhere.png", "/set top-p 7", "/bogus", "/effort extreme", "/load empty.json"]
    # Empty entries (a blank line, spaces, an empty triple-quoted block) send nothing and are no error either.
    script = "\n".join(["hello", *bad, "", "   ", '""" """', "second", ""])
    chat = [*SMALLFOUR, "chat", str(model), "--ctx", "1024", "-n", "8", "--seed", "3"]
    result = subprocess.run(chat, input=script, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    errors = [line.removeprefix(PROMPT).strip() for line in result.stdout.splitlines() if "error: " in line]
    assert len(errors) == len(bad), output
    assert "not UTF-8" in errors[0] and "content must be a string" in errors[1] and "markup[x].json" in errors[3]
    assert errors[9] == "error: empty.json: messages[2] (user) has empty content", output
    saved = list((tmp_path / "home" / "chats").glob("*.json"))
    assert len(saved) == 1, saved
    users = [m["content"] for m in json.loads(saved[0].read_text(encoding="utf-8")) if m["role"] == "user"]
    assert users == ["hello", "second"]  # every failed command left the conversation as it was
    assert not list(saved[0].parent.glob(".*.partial"))

    resumed = subprocess.run([*chat, "--resume"], input="third\n", capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"continuing 4 messages from {saved[0]}" in resumed.stdout, resumed.stdout
    users = [m["content"] for m in json.loads(saved[0].read_text(encoding="utf-8")) if m["role"] == "user"]
    assert users == ["hello", "second", "third"]  # --resume continues the same file

    loaded = subprocess.run([*chat, "--load", str(saved[0])], input="/save copy.json\n", capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert loaded.returncode == 0 and "continuing" in loaded.stdout, loaded.stdout + loaded.stderr
    assert [m["content"] for m in json.loads((tmp_path / "copy.json").read_text()) if m["role"] == "user"] == \
        ["hello", "second", "third"]

    refused = subprocess.run([*chat, "--load", str(tmp_path / "latin1.json")], input="", capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=300)
    assert_one_line_error(refused, "not UTF-8")


def test_retry_answers_again_and_undo_takes_back(converted, tmp_path):
    model = converted(HF, "q8_0")
    env = {**os.environ, "SMALLFOUR_HOME": str(tmp_path / "home")}
    script = "\n".join(["/retry", "hello", "/save one.json", "/retry", "/save two.json", "/undo", "/undo", "second", ""])
    chat = [*SMALLFOUR, "chat", str(model), "--ctx", "1024", "-n", "8", "--temperature", "0"]
    result = subprocess.run(chat, input=script, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    errors = [line.removeprefix(PROMPT).strip() for line in result.stdout.splitlines() if "error: " in line]
    assert errors == ["error: /retry: no message of yours in the conversation yet",
                      "error: /undo: no message of yours in the conversation yet"], output
    first, retried = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"]
    assert retried == first  # the same message again, answered again (greedy: the same reply), not appended
    assert "took back your last message and its reply (2 messages); 0 left" in result.stdout, output
    saved = next((tmp_path / "home" / "chats").glob("*.json"))
    assert [m["content"] for m in json.loads(saved.read_text()) if m["role"] == "user"] == ["second"]
