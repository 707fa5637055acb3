"""Terminal output for the front ends: user strings printed as typed, and the one progress-bar builder.

Every string goes out literally: rich's markup, emoji codes and highlighting are off, so a
path such as `model[draft].gguf` or a message naming `:smile:` prints as typed. Styling
comes only from `(text, style)` pairs, the way `rich.text.Text.assemble` takes them. When
the stream is not a terminal nothing is wrapped, so a log line stays one line.

Library modules print through these functions and never import the CLI.
"""

from __future__ import annotations

from typing import Union

from rich.console import Console, ConsoleRenderable
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

# A piece of a line: literal text, literal text with a rich style, or a ready Text.
Part = Union[str, tuple[str, str], Text]

stdout = Console(highlight=False, markup=False, emoji=False)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)


def out(*parts: Part | ConsoleRenderable, end: str = "\n") -> None:
    """Print a line (or one table) on stdout."""
    _print(stdout, parts, end)


def err(*parts: Part | ConsoleRenderable, end: str = "\n") -> None:
    """Print a line (or one table) on stderr: progress, reports, warnings — what is not the command's result."""
    _print(stderr, parts, end)


def note(text: str) -> None:
    """A side remark on stderr, dimmed: how a decision was taken, where things are."""
    _print(stderr, ((text, "dim"),), "\n")


def _print(console: Console, parts: tuple, end: str) -> None:
    if len(parts) == 1 and not isinstance(parts[0], (str, tuple, Text)):
        console.print(parts[0])  # a table
        return
    console.print(Text.assemble(*parts), end=end, soft_wrap=not console.is_terminal)


def progress_bars(*, transient: bool = False) -> Progress:
    """Bars on stderr for any long task; a task's fields choose what it shows.

    `unit="bytes"` shows size and speed, any other unit done/total; `detail` is a text
    shown after the amount (a rate, an error count). Descriptions print literally.
    """
    return Progress(TextColumn("{task.description:<34}", markup=False), BarColumn(), _AmountColumn(),
                    _DetailColumn(), TimeRemainingColumn(elapsed_when_finished=True), console=stderr,
                    transient=transient)


class _AmountColumn(ProgressColumn):
    """Bytes and bytes/s on a byte bar, done/total on any other."""

    def __init__(self) -> None:
        super().__init__()
        self.size, self.speed, self.count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text.assemble(self.size.render(task), " ", self.speed.render(task))
        return self.count.render(task)


class _DetailColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(str(task.fields.get("detail", "")))
