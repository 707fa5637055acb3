"""`smallfour convert`: a released checkpoint (or a pulled repo) to a GGUF llama.cpp can run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from smallfour.cli.options import GgufOutput, Imatrix, Overwrite, QuantThreads, Recipe
from smallfour.console import err, note, progress_bars
from smallfour.errors import SmallfourError


class ConversionProgress:
    """Bars for bytes read and tensors written: what `convert_checkpoint` and `requantize` report."""

    def __init__(self, progress: Progress):
        self.progress = progress
        # Reading the source's index, configs and vocabulary takes seconds before the first byte is counted: a
        # pulsing bar shows the work has begun (on a terminal only; a log gets no bar that never moved).
        self.preparing = progress.add_task("preparing", total=None) if progress.console.is_terminal else None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        if self.preparing is not None:
            self.progress.remove_task(self.preparing)
        self.bytes_task = self.progress.add_task("reading", total=total_bytes, unit="bytes")
        self.tensor_task = self.progress.add_task("tensors", total=total_tensors, unit="tensors")

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None:
        self.progress.update(self.bytes_task, advance=source_bytes, description=tensor)
        if tensor_done:
            self.progress.update(self.tensor_task, advance=1)

    def note(self, message: str) -> None:
        note(message)


def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint directory: Hugging Face layout (config.json) or Mistral "
                                               "layout (params.json), BF16 or FP8; or a pulled repo id "
                                               "OWNER/NAME\\[@REVISION].")],
    output: GgufOutput,
    recipe: Recipe = "bf16",
    imatrix: Imatrix = None,
    threads: QuantThreads = None,
    force: Overwrite = False,
    no_mmproj: Annotated[bool, typer.Option("--no-mmproj", help="Skip the vision projector GGUF.")] = False,
    mmproj: Annotated[Optional[Path], typer.Option("--mmproj", help="Where to write the vision projector (default: "
                                                                    "OUTPUT's name + -mmproj.gguf).")] = None,
    mmproj_type: Annotated[str, typer.Option("--mmproj-type", help="Vision projector type: f16, f32 or "
                                                                   "q8_0.")] = "f16",
) -> None:
    """Convert a released checkpoint to a GGUF file llama.cpp can run."""
    from convert.writer import convert_checkpoint
    from smallfour.store import resolve_checkpoint

    if no_mmproj and mmproj is not None:
        raise SmallfourError("give either --no-mmproj or --mmproj PATH, not both")
    with progress_bars() as bars:
        report = convert_checkpoint(resolve_checkpoint(source), output, recipe, force=force,
                                    progress=ConversionProgress(bars), mmproj=not no_mmproj, mmproj_output=mmproj,
                                    mmproj_type=mmproj_type, imatrix=imatrix, threads=threads)
    print_fallbacks(report)
    err(f"wrote {report.output} (recipe {report.recipe}, {report.tensors} tensors, "
        f"{report.output_bytes / 1e6:.1f} MB of weights "
        f"from {report.source_bytes / 1e6:.1f} MB, {report.layout} layout)")
    if report.mmproj is not None:
        err(f"wrote {report.mmproj.output} (vision projector, {report.mmproj.tensors} tensors, "
            f"{report.mmproj.output_bytes / 1e6:.1f} MB)")


def print_fallbacks(report) -> None:
    """The tensors written in another type than the recipe's (a row too narrow for its block)."""
    for line in report.fallbacks:
        err(("fallback", "yellow"), f" {line}")
