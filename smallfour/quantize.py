"""`smallfour quantize`: re-quantize an f32/f16/bf16 GGUF with a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smallfour.options import err

RECIPE_HELP = ("f32, f16, bf16, q8_0, any GGML type (q4_k, iq4_xs…), a preset (sf-q6, sf-q5, sf-q4, sf-iq4, "
               "sf-q3, sf-iq3, sf-q2, sf-iq2; see docs/recipes.md), fit:SIZE (e.g. fit:60GB) or a recipe .toml file.")


def quantize_command(
    model: Path = typer.Argument(..., help="GGUF to quantize (f32, f16 or bf16 tensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write."),
    recipe: str = typer.Option(..., "--recipe", help=RECIPE_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp imatrix GGUF, "
                                                                   "from `smallfour imatrix`)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Quantization threads (default: all CPUs)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Quantize a GGUF with a recipe: per-role, per-layer types, optional importance matrix."""
    from quant.requantize import requantize
    from smallfour.cli import ConversionProgress, _progress_bars

    with _progress_bars() as bars:
        report = requantize(model, output, recipe, force=force, progress=ConversionProgress(bars), imatrix=imatrix,
                            threads=threads)
    for line in report.fallbacks:
        err.print(f"[yellow]fallback[/] {line}", highlight=False)
    err.print(f"wrote {report.output} (recipe {report.recipe}, {report.tensors} tensors, "
              f"{report.output_bytes / 1e6:.1f} MB of weights from {report.source_bytes / 1e6:.1f} MB)",
              highlight=False)
