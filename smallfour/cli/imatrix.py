"""`smallfour imatrix`: collect an importance matrix through llama.cpp (the collection is `smallfour.imatrix`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smallfour.cli.options import ModelRef, Threads, Verbose, with_placement_options
from smallfour.console import err, progress_bars
from smallfour.imatrix import MIN_DENSE_ROWS
from smallfour.placing import PlacementFlags


@with_placement_options
def imatrix(
    model: ModelRef,
    text: Annotated[Path, typer.Option("--text", "-f", help="Calibration text (UTF-8). See docs/imatrix.md.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Importance matrix to write (llama.cpp imatrix "
                                                                "GGUF).")],
    ctx: Annotated[int, typer.Option("--ctx", min=MIN_DENSE_ROWS, help="Tokens per chunk (llama-imatrix's "
                                                                       "-c).")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, help="Most chunks to process (default: "
                                                                          "all).")] = None,
    threads: Threads = None,
    verbose: Verbose = False,
    placement: PlacementFlags = None,
) -> None:
    """Collect an importance matrix (per-expert activation statistics) for `smallfour quantize --imatrix`.

    Run it on the precision you will quantize from: an F32, F16, BF16 or Q8_0 GGUF.
    """
    from convert.output import check_distinct
    from smallfour.imatrix import collect_imatrix, read_calibration_text
    from smallfour.store import resolve_gguf

    path = resolve_gguf(model)
    check_distinct([output], [path, text])
    read_calibration_text(text)  # fail on unreadable text before loading anything
    with progress_bars() as bars:
        task = bars.add_task("chunks", total=None, unit="chunks")

        def advance(done: int, total: int) -> None:
            bars.update(task, completed=done, total=total)

        report = collect_imatrix(path, text, output, n_ctx=ctx, chunks=chunks, kv_type=placement.kv_type,
                                 placement=placement.resolve(path, ctx), n_threads=threads, verbose=verbose,
                                 on_chunk=advance)
    for name, (unused, total) in report.unused_experts.items():
        err(("partial", "yellow"), f" {name}: {unused} of {total} experts saw no calibration token "
            "(they get uniform importance)")
    err(f"wrote {report.output} ({report.entries} tensors, {report.chunks} chunks of {report.chunk_size} tokens)")
