"""The shell blocks of the docs as runnable examples: markers, running them, comparing what they print.

The convention is written down in docs/development.md ("Docs that run"). In short:

- every fenced block tagged `sh`, `bash`, `shell` or `console` in README.md and docs/*.md runs
  against the demo model, in document order, unless an HTML comment right before its fence says
  `<!-- needs: KIND[, KIND…] -->` with a KIND from `NEEDS`;
- in a `console` block, `$ ` lines (with `\\` continuations) are commands and the lines after one,
  up to the next `$ `, are what it prints (stdout and stderr together), compared modulo what is
  random (`normalise`); a block without `$ ` lines is a script whose output is not shown;
- `<!-- generated: 3, 5-6 -->` says those lines of the block (1 = the first line inside the fence)
  are text the model wrote: each run of them matches one or more lines (a JSON line: the same keys);
- `<!-- output: machine -->` runs the block but does not compare its output (it describes the
  machine it ran on);
- `<!-- file: NAME -->` before any fenced block writes that block's text to NAME in the work
  directory, and `$ cat NAME` of a NAME not there yet writes the shown output to it first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
SHELLS = ("sh", "bash", "console", "shell")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*(needs|generated|output|file):\s*(.*?)\s*-->")
NEEDS = {
    "real-weights": "the 119B release or a GGUF of it (≈120 GB)",
    "gpu": "a GPU (or a GPU build of llama.cpp)",
    "network": "the network beyond the Hub: pip, git, other machines",
    "hub": "the Hugging Face Hub",
    "terminal": "an interactive terminal (the chat REPL; tests/test_chat_repl.py drives it through tmux)",
    "server": "a `smallfour serve` running",
    "slow": "minutes of work: the test suite, mutants, benchmarks",
    "synopsis": "a usage pattern with placeholders, not a command",
}
OUTPUT_KINDS = {"machine"}
ELLIPSIS = "…"
TIMEOUT = 120  # seconds a documented command may take on the demo model (a command that never ends fails)


@dataclass
class Block:
    document: str  # path relative to the repository
    line: int  # line of the opening fence, 1-based
    lang: str
    body: str
    needs: list[str] = field(default_factory=list)
    generated: set[int] = field(default_factory=set)  # 1-based lines of the body
    output: str | None = None
    file: str | None = None

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def shell(self) -> bool:
        return self.lang in SHELLS


def _line_numbers(spec: str) -> set[int]:
    numbers: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the markers in the comment lines right above its fence."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        indent = match.group("indent")
        body = "".join(row[len(indent):] if row.startswith(indent) else row
                       for row in match.group("body").splitlines(keepends=True))
        block = Block(path.relative_to(REPO).as_posix(), line, match.group("lang"), body)
        above = text[:match.start()].splitlines()
        while above and above[-1].strip().startswith("<!--"):
            comment = above.pop().strip()
            for kind, value in MARKER.findall(comment):
                value = re.split(r"\s+[—-]\s+", value, maxsplit=1)[0]  # "needs: gpu — why" keeps "gpu"
                if kind == "needs":
                    block.needs += [k.strip() for k in value.split(",") if k.strip()]
                elif kind == "generated":
                    block.generated |= _line_numbers(value)
                elif kind == "output":
                    block.output = value.strip()
                else:
                    block.file = value.strip()
        found.append(block)
    return found


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in blocks(document)]


# --- console blocks: commands and what they print ----------------------------------------------------


@dataclass
class Step:
    command: str
    expected: list[str]  # shown output lines
    first_line: int  # body line (1-based) of the first expected line


def steps(block: Block) -> list[Step]:
    """A console block as commands, each with the output shown under it; any other shell block is one script."""
    rows = block.body.splitlines()
    if block.lang != "console" or not any(r.startswith("$ ") for r in rows):
        return [Step(block.body, [], 0)]
    found: list[Step] = []
    index = 0
    while index < len(rows):
        row = rows[index]
        if row.startswith("$ "):
            command = row[2:]
            while command.endswith("\\") and index + 1 < len(rows):
                index += 1
                command += "\n" + rows[index]
            found.append(Step(command, [], index + 2))
        elif row.rstrip() == "$":
            pass  # an empty prompt: the end of a session
        elif found:
            found[-1].expected.append(row)
        else:
            raise ValueError(f"{block.id}: output before the first `$ ` command")
        index += 1
    return found


# --- comparing modulo what is random --------------------------------------------------------------------

HEX = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{12,}\b")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
RULE = re.compile(r"[─━═]+")


def normalise(line: str, replacements: dict[str, str] | None = None) -> str:
    """What of a line is not random: paths of this run, hashes, numbers (timings, sizes, ids) and
    column padding are reduced to placeholders; the wording stays."""
    for real, shown in (replacements or {}).items():
        line = line.replace(real, shown)
    line = HEX.sub("HEX", line)
    line = NUMBER.sub("0", line)
    line = RULE.sub("─", line)
    line = re.sub(r"[ \t]+", " ", line)
    return line.strip()


def _pattern(shown: str) -> re.Pattern:
    return re.compile(".*?".join(map(re.escape, normalise(shown).split(ELLIPSIS))) + r"\Z")


def _json_shape(value):
    if isinstance(value, dict):
        return {key: _json_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_shape(item) for item in value[:1]]
    if isinstance(value, bool) or value is None:
        return repr(value)
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _generated_match(shown: str, actual: str) -> bool:
    try:
        expected = json.loads(shown)
    except ValueError:
        return True
    if not isinstance(expected, (dict, list)):
        return True
    try:
        return _json_shape(json.loads(actual)) == _json_shape(expected)
    except ValueError:
        return False


def compare(expected: list[str], generated: set[int], actual: list[str], replacements: dict[str, str]) -> str | None:
    """None when `actual` is what `expected` shows, else a report of the first difference.

    A shown line that is only `…` (or a table row of `…`) stands for any lines (none included); `…`
    inside a line for any text; a run of `generated` indices (0-based into `expected`) for one or more
    lines the model wrote (a JSON line: one line with the same keys). Blank lines are not compared.
    """
    raw = [line for line in actual if normalise(line, replacements)]
    actual = [normalise(line, replacements) for line in raw]
    items: list[tuple[str, object]] = []
    for index, shown in enumerate(expected):
        if not shown.strip():
            continue  # blank lines are layout (a pipe gets one where a terminal's progress bar was)
        if index in generated:
            if items and items[-1][0] == "generated" and not shown.lstrip().startswith(("{", "[")):
                continue
            items.append(("generated", shown))
        elif ELLIPSIS in shown and not re.sub(r"[…│┃|\s]", "", shown):
            items.append(("any", None))  # `…`, or a table row of `…`: lines left out
        else:
            items.append(("line", (shown, _pattern(shown))))

    best = [0, 0]  # the furthest (item, line) reached, for the report
    seen: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) not in seen:
            seen[i, j] = step(i, j)
        return seen[i, j]

    def step(i: int, j: int) -> bool:
        if (i, j) > tuple(best):
            best[:] = [i, j]
        if i == len(items):
            return j == len(actual)
        kind, value = items[i]
        if kind == "any":
            return any(match(i + 1, k) for k in range(j, len(actual) + 1))
        if j == len(actual):
            return False
        if kind == "line":
            return bool(value[1].match(actual[j])) and match(i + 1, j + 1)
        if value.lstrip().startswith(("{", "[")):
            return _generated_match(value, raw[j]) and match(i + 1, j + 1)
        return any(match(i + 1, k) for k in range(j + 1, len(actual) + 1))

    if match(0, 0):
        return None
    i, j = best
    if i == len(items):
        wanted = "(end of the shown output)"
    else:
        wanted = items[i][1][0] if items[i][0] == "line" else f"({items[i][0]} lines)"
    got = actual[j] if j < len(actual) else "(end of output)"
    return f"shown line {wanted!r}\n     normalised {normalise(wanted) if isinstance(wanted, str) else wanted!r}\n" \
           f"printed line {got!r}"


# --- running ----------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A document's private world: a work directory, a home (every smallfour and Hugging Face
    default under it) whose fixture cache holds the demo checkpoint and whose model store holds the
    demo model (as `demo` and as `tiny-q8_0`), and its own /tmp for the absolute /tmp paths the docs use."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def env(self) -> dict[str, str]:
        dropped = ("SMALLFOUR_", "HF_", "COLUMNS", "LINES", "TMUX", "NO_COLOR", "FORCE_COLOR")
        env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
                   PYTHONUNBUFFERED="1", LANG="C.UTF-8", LC_ALL="C.UTF-8", HF_HUB_OFFLINE="1",
                   HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
        return env

    def replacements(self) -> dict[str, str]:
        """Paths this run printed → the paths the docs show."""
        return {str(self.tmp) + "/": "/tmp/", str(self.home) + "/": "/home/you/", str(self.work) + "/": ""}

    def command(self, text: str) -> str:
        """The command as the docs show it, its /tmp paths moved into the sandbox."""
        return re.sub(r"(?<![\w.~])/tmp/", str(self.tmp) + "/", text)

    def run(self, command: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["bash", "-c", self.command(command)], cwd=self.work, env=self.env(),
                                  timeout=timeout, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired as stopped:
            output = stopped.output.decode(errors="replace") if isinstance(stopped.output, bytes) else stopped.output
            note = f"\n(still running after {timeout} s: stopped)"
            return subprocess.CompletedProcess(command, 124, (output or "") + note)


def make_sandbox(root: Path, template_home: Path | None, checkpoint: Path) -> Sandbox:
    """A fresh sandbox: its home a hard-linked copy of `template_home` (or, without one, a home whose
    fixture cache holds `checkpoint`), `tiny/` the demo checkpoint and `.venv` this environment."""
    box = Sandbox(root)
    if template_home is not None:
        shutil.copytree(template_home, box.home, copy_function=os.link, symlinks=True)
    else:
        shutil.copytree(checkpoint, box.home / ".cache" / "smallfour" / "fixtures" / checkpoint.name,
                        copy_function=os.link)
    box.work.mkdir(parents=True)
    box.tmp.mkdir()
    # `.venv/bin/smallfour` as from a clone: only the entry point, so a stray `python3 -m venv .venv` or
    # `.venv/bin/pip` in an unmarked block cannot touch this environment
    (box.work / ".venv" / "bin").mkdir(parents=True)
    (box.work / ".venv" / "bin" / "smallfour").symlink_to(Path(sys.executable).parent / "smallfour")
    (box.work / "tiny").symlink_to(box.home / ".cache" / "smallfour" / "fixtures" / checkpoint.name)
    return box


@dataclass
class Failure:
    block: Block
    command: str
    message: str

    def __str__(self) -> str:
        return f"{self.block.id}: `{self.command.strip()}`\n{self.message}"


def run_block(block: Block, box: Sandbox, memo: dict[str, subprocess.CompletedProcess]) -> list[Failure]:
    """Run a runnable block in its document's sandbox; what failed (exit status or output), empty if nothing."""
    failures = []
    for step in steps(block):
        cat = re.fullmatch(r"cat ([\w.-]+)", step.command.strip())
        if cat and not (box.work / cat[1]).exists():
            (box.work / cat[1]).write_text("".join(row + "\n" for row in step.expected))
        script = step.command if block.lang == "console" else "set -e\n" + step.command
        result = memo.get(step.command.strip())  # a command several blocks show runs once
        if result is None:
            result = memo[step.command.strip()] = box.run(script)
        if result.returncode != 0:
            failures.append(Failure(block, step.command, f"exit status {result.returncode}:\n{result.stdout[-3000:]}"))
            continue
        if step.expected and block.output != "machine":
            generated = {n - step.first_line for n in block.generated}
            report = compare(step.expected, generated, result.stdout.splitlines(), box.replacements())
            if report:
                failures.append(Failure(block, step.command, report + "\n--- printed:\n" + result.stdout[-3000:]))
    return failures
