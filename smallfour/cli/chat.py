"""`smallfour chat`: load a model once and talk to it in the terminal (the REPL is `smallfour.chat`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.console import Console
from rich.text import Text

from smallfour.cli.options import (DEFAULT_CTX, DEFAULT_PRESET, Ctx, Effort, MaxTokens, Mmproj, ModelRef, Preset, Seed,
                                   System, Temperature, ThinkBudget, Threads, ThreadsBatch, TopK, TopP, Verbose,
                                   with_placement_options)
from smallfour.console import Loading
from smallfour.errors import SmallfourError
from smallfour.placing import PlacementFlags


@with_placement_options
def chat(
    model: ModelRef,
    system: System = None,
    preset: Preset = DEFAULT_PRESET,
    effort: Effort = None,
    think_budget: ThinkBudget = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    seed: Seed = None,
    ctx: Ctx = DEFAULT_CTX,
    mmproj: Mmproj = None,
    threads: Threads = None,
    threads_batch: ThreadsBatch = None,
    verbose: Verbose = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last conversation (each one is saved "
                                                          "after every turn).")] = False,
    load: Annotated[Optional[Path], typer.Option("--load", help="Start from a saved conversation (a JSON "
                                                                "messages list, as /save writes).")] = None,
    placement: PlacementFlags = None,
) -> None:
    """Chat with a model in the terminal: history, /commands, Ctrl-C stops a reply, Ctrl-D leaves.

    /help lists the commands; /system, /preset, /effort and /set change the options above for the next turns. The whole
    conversation must fit in --ctx. Thinking shows dimmed, then folds to one line (/think); answers render as Markdown.
    """
    from smallfour.chat import (LineEditor, Session, history_file, last_autosave, load_conversation,
                                new_autosave_path, repl)
    from smallfour.model import Model
    from smallfour.store import resolve_gguf

    model = resolve_gguf(model)
    overrides = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                      seed=seed, think_budget=think_budget).items() if v is not None}
    session = Session(model=None, preset=preset, effort=effort, system=system, overrides=overrides, model_path=model,
                      mmproj=mmproj)
    if resume and load is not None:
        raise SmallfourError("give either --resume or --load FILE, not both")
    start = last_autosave() if resume else load
    if start is not None:
        loaded = load_conversation(session, start)  # a bad file fails here, before the model loads
        if system is not None:
            session.system = system
    # --resume keeps writing to the conversation it continues; anything else starts a new file.
    session.autosave = start if resume else new_autosave_path()
    session.request()  # bad --preset / --effort fail here, before the model loads
    layout = placement.resolve(model, ctx)
    console = Console(highlight=False)
    with Loading(model.name, quiet=verbose):
        session.model = Model.load(model, n_ctx=ctx, verbose=verbose, kv_type=placement.kv_type, placement=layout,
                                   n_threads=threads, n_threads_batch=threads_batch)
    request = session.request()
    console.print(Text.assemble(("smallfour chat", "bold"), f"  {model.name}  ctx {session.model.n_ctx}, preset "
                                f"{session.preset}, effort {request.effort}", style=None), soft_wrap=True)
    if start is not None:
        console.print(Text(f"continuing {loaded} messages from {start}", style="cyan"),
                      soft_wrap=not console.is_terminal)
    console.print(Text(f"/help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves. Saved after every turn "
                       f"to {session.autosave}", style="dim"), soft_wrap=not console.is_terminal)
    editor = LineEditor(history_file())
    try:
        repl(session, console, editor)
    finally:
        editor.save()
