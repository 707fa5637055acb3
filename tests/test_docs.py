"""The docs cannot drift from the CLI: every shell block of docs/*.md and the README runs, or says why not.

Two checks. Every `smallfour …` line of a shell block, marked or not, names a command that exists
and only options it takes (long or short, `--no-…` forms included). And every shell block without a
`<!-- needs: … -->` marker runs against the demo model, document by document in a private home and
work directory, exits 0, and prints what the docs show modulo what is random (tests/docs_blocks.py;
the convention is in docs/development.md, "Docs that run").
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from docs_blocks import (DOCUMENTS, NEEDS, OUTPUT_KINDS, REPO, Block, all_blocks, blocks, compare,
                         make_sandbox, run_block, steps)

from smallfour.fixtures.checkpoint import DEMO_SPEC, build_fixture
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


# --- every unmarked shell block runs against the demo model ----------------------------------------------

BLOCKS = all_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.shell]
RUNNABLE = [b for b in SHELL_BLOCKS if not b.needs]
RUN_DOCUMENTS = sorted({b.document for b in RUNNABLE} | {b.document for b in BLOCKS if b.file})


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """A home whose model store holds the demo model as `demo` (from `smallfour demo`) and as `tiny-q8_0`."""
    box = make_sandbox(tmp_path_factory.mktemp("docs-template"), None, build_fixture(DEMO_SPEC))
    result = box.run("smallfour demo")
    assert result.returncode == 0, result.stdout
    models = box.home / ".cache" / "smallfour" / "models"
    for suffix in (".gguf", "-mmproj.gguf"):
        (models / f"tiny-q8_0{suffix}").hardlink_to(models / f"demo{suffix}")
    return box.home


def test_every_shell_block_runs_or_is_marked():
    assert len(SHELL_BLOCKS) > 50 and len(RUNNABLE) > 15  # the extraction works
    for block in BLOCKS:
        unknown = [kind for kind in block.needs if kind not in NEEDS]
        assert not unknown, f"{block.id}: unknown `needs:` {unknown}; known: {sorted(NEEDS)}"
        assert block.output in (None, *OUTPUT_KINDS), f"{block.id}: unknown `output:` {block.output!r}"
        assert not (block.generated or block.output) or block.shell, f"{block.id}: output markers on a non-shell block"
        lines = len(block.body.splitlines())
        assert all(1 <= n <= lines for n in block.generated), f"{block.id}: `generated:` past the block's {lines} lines"
        if block.generated:
            shown = {n for step in steps(block) for n in range(step.first_line, step.first_line + len(step.expected))}
            assert block.generated <= shown, f"{block.id}: `generated:` lines {sorted(block.generated - shown)} " \
                                             f"are not output"


@pytest.mark.parametrize("document", RUN_DOCUMENTS)
def test_documented_blocks_run_against_the_demo_model(document, demo_home, tmp_path):
    box = make_sandbox(tmp_path, demo_home, build_fixture(DEMO_SPEC))
    memo: dict[str, subprocess.CompletedProcess] = {}
    failures = []
    for block in blocks(REPO / document):
        if block.file:
            (box.work / block.file).write_text(block.body)
        if block.shell and not block.needs:
            failures += run_block(block, box, memo)
    assert not failures, "\n\n".join(map(str, failures))


# --- the check itself can fail ------------------------------------------------------------------------

SCALE = next(b for b in RUNNABLE if b.document == "docs/scale.md" and "--engine vllm" in b.body)


def test_a_changed_message_is_caught(demo_home, tmp_path):
    """The scale.md block passes as written, and fails once a word or the line count of its output changes."""
    box = make_sandbox(tmp_path, demo_home, build_fixture(DEMO_SPEC))
    (step,) = steps(SCALE)
    printed = box.run(step.command)
    assert printed.returncode == 0, printed.stdout
    actual = printed.stdout.splitlines()
    assert compare(step.expected, set(), actual, box.replacements()) is None
    reworded = [line.replace("tensor parallel", "tensor-parallel") for line in step.expected]
    assert "tensor-parallel 2" in compare(reworded, set(), actual, box.replacements())
    assert compare(step.expected[:-1], set(), actual, box.replacements()) is not None
    assert compare(step.expected + ["done"], set(), actual, box.replacements()) is not None
    # numbers are free, words are not
    renumbered = [re.sub(r"\d+", "7", line) for line in step.expected]
    assert compare(renumbered, set(), actual, box.replacements()) is None


def test_an_unmarked_block_that_does_not_run_fails(demo_home, tmp_path):
    box = make_sandbox(tmp_path, demo_home, build_fixture(DEMO_SPEC))
    broken = Block("docs/x.md", 1, "sh", "smallfour inspect demo\nsmallfour run no-such-model -p hi\n")
    (failure,) = run_block(broken, box, {})
    assert "exit status 1" in failure.message and "no-such-model" in failure.message
    wrong_output = Block("docs/x.md", 1, "console",
                         "$ smallfour run demo -p Bonjour --dry-run\n<s>[INST]Bonjour[/INST]\n")
    (failure,) = run_block(wrong_output, box, {})
    assert "shown line '<s>[INST]Bonjour[/INST]'" in failure.message


def test_the_comparison_rules():
    printed = [" noise Gymnasium", "more noise", "load: 0.39 s", "│ demo │ 45.1 MB │", "/x/tmp/sf/a-0123456789ab"]
    shown = [" pal koz", "load:   1.74 s", "│ demo    │  … MB │", "/tmp/sf/a-9676b382e3a2"]
    assert compare(shown, {0}, printed, {"/x/tmp/": "/tmp/"}) is None  # a generated run spans two lines
    assert compare(shown, set(), printed, {"/x/tmp/": "/tmp/"}) is not None  # not marked generated: compared
    assert compare(["…", "load: 2 s", "…"], set(), printed, {}) is None
    assert compare(["…", "load: 2 ms", "…"], set(), printed, {}) is not None
    assert compare(['{"content": "x", "usage": {"n": 1}}'], {0}, ['{"content": "y z", "usage": {"n": 4}}'], {}) is None
    assert compare(['{"content": "x", "usage": {"n": 1}}'], {0}, ['{"content": "y z", "usage": {"m": 4}}'], {}) \
        is not None
