"""`smallfour quantize`: re-quantize an f32/f16/bf16 GGUF with a recipe (the work is `convert.requantize`)."""

from __future__ import annotations

from smallfour.cli.convert import ConversionProgress, print_fallbacks
from smallfour.cli.options import GgufOutput, Imatrix, ModelRef, Overwrite, QuantThreads, Recipe
from smallfour.console import err, progress_bars


def quantize(
    model: ModelRef,
    output: GgufOutput,
    recipe: Recipe,
    imatrix: Imatrix = None,
    threads: QuantThreads = None,
    force: Overwrite = False,
) -> None:
    """Quantize a GGUF (f32, f16 or bf16 tensors) with a recipe: per-role, per-layer types, optional importance
    matrix. Its vision projector, if it has one, is copied beside OUTPUT as OUTPUT's name + -mmproj.gguf.
    """
    from convert.requantize import requantize
    from smallfour.store import mmproj_for, resolve_gguf

    model = resolve_gguf(model)
    with progress_bars() as bars:
        report = requantize(model, output, recipe, force=force, progress=ConversionProgress(bars), imatrix=imatrix,
                            threads=threads, mmproj=mmproj_for(model))
    print_fallbacks(report)
    err(f"wrote {report.output} (recipe {report.recipe}, {report.tensors} tensors, "
        f"{report.output_bytes / 1e6:.1f} MB of weights from {report.source_bytes / 1e6:.1f} MB)")
    if report.mmproj is not None:
        err(f"wrote {report.mmproj} (vision projector, copied from {mmproj_for(model).name})")
