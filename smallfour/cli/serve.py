"""`smallfour serve`: an OpenAI-compatible HTTP server (the server itself is `smallfour.server`)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from smallfour.cli.options import (DEFAULT_CTX, DEFAULT_PRESET, Ctx, Mmproj, ModelRef, Parallel, Preset, ThinkBudget,
                                   Threads, ThreadsBatch, Verbose, with_placement_options)
from smallfour.errors import SmallfourError
from smallfour.placing import PlacementFlags

API_KEY_ENV = "SMALLFOUR_API_KEY"


@with_placement_options
def serve(
    model: ModelRef,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; the default answers this machine only. "
                                                     "0.0.0.0 listens on every interface (give --api-key).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8080,
    parallel: Parallel = None,
    queue: Annotated[Optional[int], typer.Option("--queue", min=0, help="Requests that may wait for a free slot "
                                                                        "(default: 4 × --parallel); beyond that the "
                                                                        "server answers 429 with Retry-After.")]
    = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help=f"Require Authorization: Bearer KEY (default: "
                                                                     f"${API_KEY_ENV}, if set).")] = None,
    max_body: Annotated[int, typer.Option("--max-body", min=1, help="Largest request body, in MiB (images come as "
                                                                    "data: URLs inside it).")] = 32,
    preset: Preset = DEFAULT_PRESET,
    think_budget: ThinkBudget = None,
    ctx: Ctx = DEFAULT_CTX,
    mmproj: Mmproj = None,
    threads: Threads = None,
    threads_batch: ThreadsBatch = None,
    verbose: Verbose = False,
    placement: PlacementFlags = None,
) -> None:
    """Serve the OpenAI chat-completions API (POST /v1/chat/completions, GET /v1/models, /health, /stats).

    Point any OpenAI client at http://HOST:PORT/v1. Requests without reasoning_effort get --preset's defaults; body
    fields override them. SIGTERM or Ctrl-C stops accepting requests, lets those in flight finish, then exits.
    """
    from smallfour.generation import PRESETS
    from smallfour.model import Model
    from smallfour.planner import sequences_that_fit
    from smallfour.server import ServeOptions
    from smallfour.server import serve as run_server
    from smallfour.store import resolve_gguf

    if preset not in PRESETS:
        raise SmallfourError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = resolve_gguf(model)
    if parallel is None:
        parallel = sequences_that_fit(path, ctx, placement.kv_type, flash_attn=placement.flash_attn, most=8)
    layout = placement.resolve(path, ctx * parallel)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

    def load() -> Model:
        from smallfour.vision import attach_projector, find_mmproj, open_projector

        llm = Model.load(path, n_ctx=ctx, n_seq=parallel, verbose=verbose, kv_type=placement.kv_type,
                         placement=layout, n_threads=threads, n_threads_batch=threads_batch)
        try:
            attach_projector(llm, open_projector(llm, find_mmproj(path, mmproj), use_gpu=layout.n_gpu_layers != 0))
        except SmallfourError as exc:
            if mmproj is not None:
                llm.close()
                raise
            attach_projector(llm, None, error=str(exc))  # requests with images get the reason
        return llm

    options = ServeOptions(model_name=path.name.removesuffix(".gguf"), parallel=parallel,
                           queue=queue if queue is not None else 4 * parallel, api_key=key,
                           max_body=max_body << 20, preset=preset, think_budget=think_budget)
    run_server(options, load, host=host, port=port)
