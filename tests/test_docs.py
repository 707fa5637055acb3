"""The docs cannot drift from the CLI: every `smallfour …` line in a shell block of docs/*.md and the README parses.

A first step toward running every block against the demo model: each documented command line
names a command that exists, and every option it uses is one that command takes (long or
short, `--no-…` forms included), so renaming or dropping an option fails here until the docs
follow.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
SHELL_BLOCK = re.compile(r"^```(sh|bash|console|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"|", "||", "&&", ";", "&"}


def command_lines(text: str) -> list[str]:
    """The smallfour invocations of a document's shell blocks: continuation lines joined, prompts dropped."""
    found = []
    for match in SHELL_BLOCK.finditer(text):
        console = match.group(1) == "console"
        joined = re.sub(r"\\\n\s*", " ", match.group(2))
        for line in joined.splitlines():
            if console:
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            if re.search(r"(^|[\s/])smallfour\s", line):
                found.append(line.strip())
    return found


def invocations(line: str) -> list[list[str]]:
    """Each `smallfour ARGS` of a command line (pipelines and `;` lists split), as argument lists."""
    words = shlex.split(line, comments=True)
    calls, current = [], None
    for word in words:
        if word in SEPARATORS or word.endswith(";"):
            if current is not None:
                calls.append(current)
            current = None
            continue
        if current is None and re.fullmatch(r"(.*/)?smallfour", word):
            current = []
        elif current is not None:
            current.append(word)
    if current is not None:
        calls.append(current)
    return calls


def _options() -> dict[str, set[str]]:
    from typer.main import get_command

    from smallfour.cli import app

    group = get_command(app)
    options = {"": {"--version", "--help", "-h"}}
    for name, command in group.commands.items():
        options[name] = {"--help", "-h"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)
                                            if o.startswith("-")}
    return options


CASES = [(doc.relative_to(REPO).as_posix(), line) for doc in DOCUMENTS for line in command_lines(doc.read_text())]


def test_the_docs_show_commands():
    assert len(CASES) > 50  # the extraction itself works (a regex change cannot silently select nothing)


@pytest.mark.parametrize(("document", "line"), CASES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(CASES)])
def test_documented_command_lines_parse(document, line):
    options = _options()
    for args in invocations(line):
        if not args or args[0].startswith("-"):
            unknown = [a for a in args if a.startswith("-") and a not in options[""]]
            assert not unknown, f"{document}: `{line}`: smallfour has no {unknown}"
            continue
        command = args[0]
        assert command in options, f"{document}: `{line}`: no command {command!r}"
        for arg in args[1:]:
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if arg.startswith("-") and arg != "-" and not re.fullmatch(r"-\d+(\.\d+)?", arg) and not flag.startswith("-…"):
                assert flag in options[command], f"{document}: `{line}`: `smallfour {command}` has no option {flag}"
