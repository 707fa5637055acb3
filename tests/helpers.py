"""What several test modules share: running the CLI as a user does, and driving the chat REPL in tmux."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SMALLFOUR = [sys.executable, "-m", "smallfour"]


def default_sigint() -> None:
    """`preexec_fn` for a child the test will Ctrl-C: a suite started in the background (`pytest … &` from a
    script) ignores SIGINT, its children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SMALLFOUR, *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def line_error(item: dict) -> dict | None:
    """The error of a batch output line (None when answered), checked to have OpenAI's Batch shape:
    a string custom_id, the line's own `error` null, the status and error body the request got."""
    assert isinstance(item["custom_id"], str) and item["custom_id"], item
    assert item["error"] is None, item
    response = item["response"]
    if response["status_code"] == 200:
        return None
    assert response["status_code"] in (400, 500) and set(response) == {"status_code", "request_id", "body"}, item
    error = response["body"]["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), item
    assert error["type"] == ("invalid_request_error" if response["status_code"] == 400 else "server_error"), item
    return error


# --- the chat REPL in a real terminal (the `terminal` fixture in conftest.py starts one) ---------


PROMPT = ">>>"


class Terminal:
    """One tmux pane on a private tmux server, 120×40, running `command`."""

    def __init__(self, socket: str, command: str, env: dict[str, str]):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: the chat REPL test drives a real terminal (apt-get install tmux)")
        self.base = ["tmux", "-u", "-L", socket]
        self.env = env
        self._tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", "-c", str(REPO), command)
        self._tmux("set-option", "-t", "chat", "history-limit", "20000")
        self.socket_path = self._tmux("display-message", "-p", "-t", "chat", "#{socket_path}").strip()

    def _tmux(self, *args: str) -> str:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env, timeout=30)
        assert result.returncode == 0, f"tmux {' '.join(args)}: {result.stderr}"
        return result.stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "chat", "-l", text)

    def lines(self) -> list[str]:
        """The whole pane, scrollback included, wrapped lines joined."""
        return [line.rstrip() for line in self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat").splitlines()]

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait(self, condition, timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if condition(lines):
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; the pane shows:\n" + "\n".join(lines))
            time.sleep(0.1)

    def prompts(self, lines: list[str]) -> int:
        return sum(1 for line in lines if line == PROMPT or line.startswith(PROMPT + " "))

    def at_prompt(self, lines: list[str], count: int) -> bool:
        shown = [line for line in lines if line]
        return self.prompts(lines) >= count and bool(shown) and shown[-1] == PROMPT

    def submit(self, *pieces: str, timeout: float = 60) -> str:
        """Type an entry (pieces end with Enter between them) and wait for the next empty prompt.

        Returns what the pane printed after the entry's first line.
        """
        before = self.lines()
        count = self.prompts(before)
        for piece in pieces:
            self.type(piece)
            self.keys("Enter")
        lines = self.wait(lambda ls: self.at_prompt(ls, count + 1), timeout, f"the prompt after {pieces!r}")
        starts = [i for i, line in enumerate(lines) if line.startswith(PROMPT)]
        return "\n".join(lines[starts[-2]:starts[-1]])

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, env=self.env, timeout=30)
        if self.socket_path:  # tmux leaves the socket file behind
            Path(self.socket_path).unlink(missing_ok=True)


def stats_numbers(text: str) -> dict[str, int]:
    """The numbers of the last /stats table in `text`."""
    prompt = re.findall(r"prompt\s+(\d+) tokens: (\d+) reused from the cache, (\d+) evaluated", text)[-1]
    reply = re.findall(r"reply\s+(\d+) tokens", text)[-1]
    context = re.findall(r"context\s+(\d+) / (\d+) tokens in the KV cache", text)[-1]
    return {"prompt": int(prompt[0]), "reused": int(prompt[1]), "evaluated": int(prompt[2]), "reply": int(reply),
            "context_used": int(context[0]), "context_size": int(context[1])}
