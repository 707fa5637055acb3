"""The `smallfour` command line: thin verbs over the Python API, one module per verb or group.

This module builds the app, registers every command, and holds the one table that turns
an exception a command lets out into a line on stderr and an exit code. Typer is imported
under `smallfour.cli` only; library modules print through `smallfour.console`.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from smallfour.cli import (batch, bundle, chat, convert, demo, doctor, imatrix, inspect, plan, quantize, run, serve,
                           store, worker)
from smallfour.console import err
from smallfour.errors import SmallfourError

# What the user sees for an exception a command lets out: its label (the exception's own message follows,
# if it has one) and the exit code (None: the error's `exit_code`). The first matching row wins.
ERRORS: tuple[tuple[type[BaseException], str, str, int | None], ...] = (
    (SmallfourError, "error:", "bold red", None),
    (KeyboardInterrupt, "interrupted", "yellow", 130),
)


class _Command(TyperCommand):
    """A verb whose help reads plainly (see `_readable_metavars`)."""

    def get_params(self, ctx):
        return _readable_metavars(super().get_params(ctx))


class _Commands(TyperGroup):
    """Runs every command through `ERRORS` (one plain-text line, no traceback); help reads plainly."""

    def get_params(self, ctx):
        return _readable_metavars(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except tuple(row[0] for row in ERRORS) as exc:
            _kind, label, style, code = next(row for row in ERRORS if isinstance(exc, row[0]))
            message = str(exc)
            err((label, style), f" {message}" if message else "")
            raise typer.Exit(code if code is not None else exc.exit_code) from None


_TYPE_WORDS = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH"}


def _readable_metavars(params: list) -> list:
    """Help shows `--ctx INTEGER`, `--image TEXT`, `MODEL`, and nothing after a flag (not `<int range>`, `<bool>`,
    `<list[str]>`): the value's type in words, as click writes it; repeatable options say so in their help."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says it; typer would add `<str>`
        elif param.metavar is not None:
            continue
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        elif (descriptor := getattr(param, "type_descriptor", None)) is not None:
            annotation = descriptor.annotation
            if get_origin(annotation) is list:
                annotation = get_args(annotation)[0]
            param.metavar = _TYPE_WORDS.get(annotation, "VALUE")
        else:  # a typer without type descriptors: click's name for the type (TEXT, INTEGER, PATH, …)
            param.metavar = (getattr(param.type, "name", "") or "value").upper()
    return params


app = typer.Typer(
    cls=_Commands,
    help="Run Mistral Small 4 locally: convert released weights to GGUF and run them with llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"smallfour {package_version('smallfour')}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print smallfour's version and exit.")] = False,
) -> None:
    pass

app.command(name="convert", cls=_Command)(convert.convert)
app.command(name="inspect", cls=_Command)(inspect.inspect)
app.command(name="run", cls=_Command)(run.run)
app.command(name="demo", cls=_Command)(demo.demo)
app.command(name="chat", cls=_Command)(chat.chat)
app.command(name="batch", cls=_Command)(batch.batch)
app.command(name="serve", cls=_Command)(serve.serve)
app.command(name="pull", cls=_Command)(store.pull)
app.command(name="models", cls=_Command)(store.models)
app.command(name="rm", cls=_Command)(store.rm)
app.command(name="doctor", cls=_Command)(doctor.doctor)
app.command(name="bundle", cls=_Command)(bundle.bundle)
app.command(name="plan", cls=_Command)(plan.plan)
app.command(name="quantize", cls=_Command)(quantize.quantize)
app.command(name="imatrix", cls=_Command)(imatrix.imatrix)
app.command(name="worker", cls=_Command)(worker.worker)


def main() -> None:
    app()
