"""Terminal output for the front ends: user strings printed as typed, and the one progress-bar builder.

Every string goes out literally: rich's markup, emoji codes and highlighting are off, so a
path such as `model[draft].gguf` or a message naming `:smile:` prints as typed. Styling
comes only from `(text, style)` pairs, the way `rich.text.Text.assemble` takes them. When
the stream is not a terminal nothing is wrapped, so a log line stays one line.

Library modules print through these functions and never import the CLI.
"""

from __future__ import annotations

import os
from typing import Union

from rich.console import Console, ConsoleRenderable
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

# A piece of a line: literal text, literal text with a rich style, or a ready Text.
Part = Union[str, tuple[str, str], Text]

# Not a terminal (a pipe, a file) and no COLUMNS: no width to fit, so tables take their natural width
# instead of folding cells (a path, an override regex) at rich's default of 80 columns.
UNBOUNDED_WIDTH = 100_000


def _console(**kwargs) -> Console:
    console = Console(highlight=False, markup=False, emoji=False, **kwargs)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = UNBOUNDED_WIDTH
    return console


stdout = _console()
stderr = _console(stderr=True)


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


class Loading:
    """A spinner on stderr while a model loads: the one sign of life between the command and its first output.

    Quiet when `quiet` (llama.cpp's own log is showing) and invisible when stderr is not a
    terminal, so logs get no spinner frames. `stop()` may be called early (when loading is
    done but the command goes on) and again on exit.
    """

    def __init__(self, what: str, *, quiet: bool = False) -> None:
        self._status = None if quiet else stderr.status(Text(f"loading {what}…"), spinner="dots")

    def __enter__(self) -> "Loading":
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()


def progress_bars(*, transient: bool = False) -> Progress:
    """Bars on stderr for any long task; a task's fields choose what it shows.

    `unit="bytes"` shows size and speed, any other unit done/total; `detail` is a text
    shown after the amount (a rate, an error count). Descriptions print literally.
    """
    return _Progress(TextColumn("{task.description:<34}", markup=False), BarColumn(), _AmountColumn(),
                     _DetailColumn(), TimeRemainingColumn(elapsed_when_finished=True), console=stderr,
                     transient=transient)


class _Progress(Progress):
    """Bars that leave nothing behind when no task was added: a command that fails before its first bar
    (a pull refused, a quantize of a quantized file) prints its error alone, without an empty line above it."""

    def stop(self) -> None:
        if self.tasks:
            super().stop()
        elif not self.disable:
            self.live.transient = True
            self.live.stop()  # without Progress.stop's line break for the (empty) final render


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
