"""The `smallfour` command line: thin verbs over the Python API, one module per verb or group.

This module builds the app, registers every command, and holds the one table that turns
an exception a command lets out into a line on stderr and an exit code. Typer is imported
under `smallfour.cli` only; library modules print through `smallfour.console`.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from smallfour.cli import batch, chat, convert, demo, doctor, imatrix, inspect, plan, quantize, run, serve, store
from smallfour.console import err
from smallfour.errors import SmallfourError

# What the user sees for an exception a command lets out: its label (the exception's own message follows,
# if it has one) and the exit code (None: the error's `exit_code`). The first matching row wins.
ERRORS: tuple[tuple[type[BaseException], str, str, int | None], ...] = (
    (SmallfourError, "error:", "bold red", None),
    (KeyboardInterrupt, "interrupted", "yellow", 130),
)


class _Commands(TyperGroup):
    """Runs every command through `ERRORS`: one plain-text line, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except tuple(row[0] for row in ERRORS) as exc:
            _kind, label, style, code = next(row for row in ERRORS if isinstance(exc, row[0]))
            message = str(exc)
            err((label, style), f" {message}" if message else "")
            raise typer.Exit(code if code is not None else exc.exit_code) from None


app = typer.Typer(
    cls=_Commands,
    help="Run Mistral Small 4 locally: convert released weights to GGUF and run them with llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command(name="convert")(convert.convert)
app.command(name="inspect")(inspect.inspect)
app.command(name="run")(run.run)
app.command(name="demo")(demo.demo)
app.command(name="chat")(chat.chat)
app.command(name="batch")(batch.batch)
app.command(name="serve")(serve.serve)
app.command(name="pull")(store.pull)
app.command(name="models")(store.models)
app.command(name="rm")(store.rm)
app.command(name="doctor")(doctor.doctor)
app.command(name="plan")(plan.plan)
app.command(name="quantize")(quantize.quantize)
app.command(name="imatrix")(imatrix.imatrix)


def main() -> None:
    app()
