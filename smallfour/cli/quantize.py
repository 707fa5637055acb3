"""`smallfour quantize`: re-quantize an f32/f16/bf16 GGUF with a recipe (the work is `convert.requantize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smallfour.cli.convert import ConversionProgress, print_fallbacks
from smallfour.cli.options import GgufOutput, Imatrix, Overwrite, QuantThreads, Recipe
from smallfour.console import err, progress_bars


def quantize(
    model: Annotated[Path, typer.Argument(help="GGUF to quantize (f32, f16 or bf16 tensors).")],
    output: GgufOutput,
    recipe: Recipe,
    imatrix: Imatrix = None,
    threads: QuantThreads = None,
    force: Overwrite = False,
) -> None:
    """Quantize a GGUF with a recipe: per-role, per-layer types, optional importance matrix."""
    from convert.requantize import requantize

    with progress_bars() as bars:
        report = requantize(model, output, recipe, force=force, progress=ConversionProgress(bars), imatrix=imatrix,
                            threads=threads)
    print_fallbacks(report)
    err(f"wrote {report.output} (recipe {report.recipe}, {report.tensors} tensors, "
        f"{report.output_bytes / 1e6:.1f} MB of weights from {report.source_bytes / 1e6:.1f} MB)")
