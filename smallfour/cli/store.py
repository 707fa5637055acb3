"""The local model store: `smallfour pull`, `smallfour models`, `smallfour rm`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from smallfour.cli.options import AsJson
from smallfour.console import err, out, progress_bars


def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, OWNER/NAME (a checkpoint or a GGUF repo); "
                                                "OWNER/NAME@REVISION also works.")],
    revision: Annotated[Optional[str], typer.Option("--revision", "-r", help="Branch, tag or commit to pull "
                                                                             "(default main); the commit is "
                                                                             "recorded.")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", "-i", help="Only files matching this glob "
                                                         "(repeatable), e.g. '*Q4_K_M*' to pick one GGUF; pickles "
                                                         "never.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=32, help="Files downloaded at once.")] = 4,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash files already in the store and fetch again any "
                                                          "that do not match the Hub.")] = False,
    as_json: AsJson = False,
) -> None:
    """Download a checkpoint or a GGUF from the Hugging Face Hub into the shared hub cache, verified and resumable."""
    from smallfour import store
    from smallfour.pull import pull as pull_repo

    with progress_bars() as progress:
        result = pull_repo(repo_id, revision, include, workers=workers, verify=verify, progress=progress)
    for warning in result.warnings:
        err(("warning", "yellow"), f" {warning}")
    if result.skipped_pickles:
        err(f"skipped pickle files: {', '.join(result.skipped_pickles)}")
    err(f"pulled {result.repo_id}@{result.revision} (commit {result.commit[:12]}): {len(result.files)} files, "
        f"{store.human_bytes(result.total_bytes)}, {store.human_bytes(result.downloaded_bytes)} downloaded")
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    print(result.snapshot)
    if result.kind == "checkpoint":
        err(f"next: smallfour convert {result.repo_id} -o NAME.gguf --recipe q8_0")
    else:
        err(f"next: smallfour run {result.repo_id} -p 'Hello'")


def models(as_json: AsJson = False) -> None:
    """List local models: pulled checkpoints and GGUFs (size, recipe, vision projector) and store GGUFs."""
    from smallfour.store import gguf_dir, hub_cache, human_bytes, list_models

    found = list_models()
    if as_json:
        print(json.dumps({"hub_cache": str(hub_cache()), "store": str(gguf_dir()),
                          "models": [m.as_json() for m in found]}, indent=2))
        return
    if not found:
        err(f"no models yet (hub cache {hub_cache()}, store {gguf_dir()}): `smallfour pull OWNER/NAME` fetches one")
        return
    table = Table(title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("recipe", no_wrap=True)
    table.add_column("mmproj", min_width=6)
    table.add_column("revision", no_wrap=True)
    table.add_column("status", min_width=6)
    for m in found:
        revision = f"{m.revision or ''} {m.commit[:8]}".strip() if m.commit else "-"
        mmproj = m.mmproj or ("no" if m.kind == "gguf" else "-")
        table.add_row(m.name, m.kind, human_bytes(m.bytes), m.recipe or "-", mmproj, revision, m.status)
    out(table)
    err(f"hub cache: {hub_cache()}\nstore: {gguf_dir()}")


def rm(
    name: Annotated[str, typer.Argument(help="What `smallfour models` lists: OWNER/NAME, OWNER/NAME@REVISION, "
                                             "or the name of a GGUF in the store.")],
) -> None:
    """Remove a model: a pulled repo (`owner/name`, or one revision `owner/name@rev`) or a store GGUF."""
    from smallfour.store import human_bytes, remove

    what, freed = remove(name)
    err(f"removed {what} ({human_bytes(freed)} freed)")
