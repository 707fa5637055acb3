"""`smallfour batch`: an OpenAI Batch JSONL through one loaded model (the job itself is `smallfour.batch`)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smallfour.batch import Progress
from smallfour.cli.options import (DEFAULT_CTX, DEFAULT_PRESET, Ctx, Mmproj, ModelRef, Parallel, Preset, ThinkBudget,
                                   Threads, ThreadsBatch, Verbose, with_placement_options)
from smallfour.console import Loading, err, progress_bars
from smallfour.errors import SmallfourError
from smallfour.interrupt import Interrupt
from smallfour.placing import PlacementFlags


class _Bars(Progress):
    """The job's progress as a bar on stderr: requests done, tokens/s, error lines, time left."""

    def __init__(self):
        self.bars = progress_bars()
        self.tokens, self.errors, self.started = 0, 0, time.perf_counter()

    def __enter__(self):
        self.bars.start()
        return self

    def __exit__(self, *exc):
        self.bars.stop()

    def start(self, total: int, skipped: int) -> None:
        self.started = time.perf_counter()
        # Resumed lines are counted done but not timed, so the time left reflects this run's speed.
        self.task = self.bars.add_task(f"requests ({skipped} done before)" if skipped else "requests",
                                       total=total - skipped, unit="requests", detail="0.0 tok/s")

    def advance(self, completion_tokens: int, ok: bool) -> None:
        self.tokens += completion_tokens
        self.errors += not ok
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        errors = f" {self.errors} errors" if self.errors else ""
        self.bars.update(self.task, advance=1, detail=f"{self.tokens / elapsed:.1f} tok/s{errors}")


def confine_job_images(jobs: list, base: Path, allowed: list[Path]) -> None:
    """Hold each line's images to the batch image policy (docs/batch.md); a line that breaks it gets an error line."""
    from smallfour.batch import LineError
    from smallfour.images import ImagePolicy
    from smallfour.vision import confine_images

    policy = ImagePolicy.confined(base, tuple(allowed))
    for job in jobs:
        if job.request is not None:
            try:
                job.request.messages = confine_images(job.request.messages, policy)
            except SmallfourError as exc:
                job.request, job.error = None, LineError("invalid_request", str(exc))


@with_placement_options
def batch(
    model: ModelRef,
    input_file: Annotated[str, typer.Argument(metavar="INPUT", help="JSONL in the OpenAI Batch format: one "
                                              "{custom_id, method, url: /v1/chat/completions, body} per line; "
                                              "- reads stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="JSONL to append results to, one "
                                        "{id, custom_id, response, error} line per input line; - writes stdout.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted job: skip the custom_ids "
                                                          "already in OUTPUT (results and errors alike).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over: empty OUTPUT if it has "
                                                                "lines.")] = False,
    preset: Preset = DEFAULT_PRESET,
    think_budget: ThinkBudget = None,
    ctx: Ctx = DEFAULT_CTX,
    mmproj: Mmproj = None,
    parallel: Parallel = None,
    threads: Threads = None,
    threads_batch: ThreadsBatch = None,
    verbose: Verbose = False,
    allow_path: Annotated[Optional[list[Path]], typer.Option(
        "--allow-path", metavar="DIR", help="Also let lines name images under DIR (by default only files under "
                                            "INPUT's directory; repeatable). See docs/batch.md.")] = None,
    placement: PlacementFlags = None,
) -> None:
    """Run a batch of chat requests (OpenAI Batch JSONL) through one loaded model.

    Each result is appended to OUTPUT as soon as it is done: after a crash or Ctrl-C, --resume does only what is left.

    A bad line (or one whose prompt does not fit in --ctx) gets an error line and the job goes on. --preset gives the
    defaults of lines without reasoning_effort; a line's reasoning_effort "high" uses think's sampling, "none"
    instant's; body fields override either; --think-budget applies to lines that think. Progress (requests,
    tokens/s, time left) goes to stderr.
    """
    from convert.output import check_distinct
    from smallfour.batch import BatchOutput, load_projector, parse_jobs, read_input, run_jobs
    from smallfour.generation import PRESETS
    from smallfour.model import Model
    from smallfour.hardware import detect_hardware
    from smallfour.inventory import model_from_gguf
    from smallfour.planner import Settings, sequences_that_fit
    from smallfour.store import resolve_gguf

    if preset not in PRESETS:
        raise SmallfourError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = resolve_gguf(model)
    lines = read_input(input_file)
    requests = sum(1 for line in lines if line.strip())
    machine = detect_hardware()  # probed once, for the parallel default and the placement check
    if parallel is None:
        settings = Settings(n_ctx=ctx, kv_type=placement.kv_type, flash_attn=placement.flash_attn)
        parallel = sequences_that_fit(model_from_gguf(path), settings, machine,
                                      most=max(1, min(8, requests)))
    layout = placement.resolve(path, ctx * parallel, hardware=machine)
    output_path = None if output == "-" else Path(output)
    if output_path is not None:
        check_distinct([output_path], [path, *([Path(input_file)] if input_file != "-" else []),
                                       *([mmproj] if mmproj is not None else [])])
    sink, done = BatchOutput.open(output_path, resume=resume, overwrite=overwrite)
    try:
        with Loading(path.name, quiet=verbose):
            llm = Model.load(path, n_ctx=ctx, n_seq=parallel, verbose=verbose, kv_type=placement.kv_type,
                             placement=layout, n_threads=threads, n_threads_batch=threads_batch)
            jobs = parse_jobs(lines, preset=preset, think_budget=think_budget, n_vocab=llm.n_vocab)
            confine_job_images(jobs, Path(input_file).parent if input_file != "-" else Path.cwd(), allow_path or [])
            load_projector(llm, path, mmproj, jobs, gpu=layout.n_gpu_layers != 0)
        model_name = path.name.removesuffix(".gguf")
        with Interrupt() as interrupt, _Bars() as bars:
            summary = run_jobs(llm, jobs, sink, model_name=model_name, done=done, progress=bars,
                               should_stop=interrupt)
    finally:
        sink.close()
    rate = summary.completion_tokens / summary.seconds if summary.seconds > 0 else 0.0
    where = "stdout" if output_path is None else str(output_path)
    plural = "" if summary.failed == 1 else "s"
    err(f"{summary.done} of {summary.total} requests done ({summary.succeeded} answered, "
        f"{summary.failed} error line{plural}, {summary.skipped} already in the output); "
        f"{summary.completion_tokens} tokens at {rate:.1f} tok/s → {where}")
    if summary.interrupted:
        args = sys.argv[2:] if sys.argv[1:2] == ["batch"] else [model, input_file, "-o", output]
        command = shlex.join(["smallfour", "batch", *(a for a in args if a not in ("--resume", "--overwrite")),
                              "--resume"])
        hint = f"continue with: {command}" if output_path is not None else \
            "the results so far went to stdout; write to a file (-o FILE) to be able to --resume"
        err(("interrupted", "yellow"), f": {hint}")
        raise typer.Exit(130)
