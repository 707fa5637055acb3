"""`smallfour bundle`: an offline install bundle (the work is `smallfour.bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smallfour.console import err, out, progress_bars


class BarSteps:
    """`smallfour.bundle.Steps` as one progress bar per step on stderr."""

    def __init__(self, bars) -> None:
        self.bars, self.task = bars, None

    def start(self, description: str, total: float | None = None, *, unit: str = "items") -> None:
        self.task = self.bars.add_task(description, total=total, unit=unit, detail="")

    def advance(self, amount: float = 1, detail: str = "") -> None:
        self.bars.update(self.task, advance=amount, detail=detail)

    def finish(self) -> None:
        done = next(task for task in self.bars.tasks if task.id == self.task).completed
        self.bars.update(self.task, total=done, completed=done, detail="")


def bundle(
    directory: Annotated[Path, typer.Argument(help="Directory to write the bundle into (must not exist).")],
    python_version: Annotated[Optional[str], typer.Option("--python-version", help="The target's Python as X.Y "
                                                          "(default: this one's).")] = None,
    platform: Annotated[Optional[list[str]], typer.Option("--platform", help="The target's wheel platform tag, e.g. "
                                                          "manylinux_2_28_x86_64 (repeatable; default: this "
                                                          "machine's).")] = None,
    exclude_from: Annotated[Optional[Path], typer.Option("--exclude-from", help="The target's `pip freeze` output: "
                                                         "packages it already has at a suitable version are left "
                                                         "out.")] = None,
    keep_test_vocab: Annotated[bool, typer.Option("--keep-test-vocab", help="Keep llama.cpp's test vocabularies "
                                                  "(vendor/llama.cpp/models, 23 MB) in the sdist.")] = False,
) -> None:
    """Write everything an offline install needs into DIRECTORY: wheels, the llama-cpp-python sdist, install.sh."""
    from smallfour.bundle import Target, build_bundle
    from smallfour.store import human_bytes

    target = Target(python_version, tuple(platform or ()))
    with progress_bars() as bars:
        made = build_bundle(directory, target, BarSteps(bars), exclude_from=exclude_from,
                            keep_test_vocab=keep_test_vocab)
    wheels = sum(1 for name in made.files if name.startswith("wheels/"))
    err(f"{wheels} wheels for Python {target.python}, the llama-cpp-python sdist, install.sh and manifest.json"
        + (f"; left out (the target has them): {', '.join(sorted(made.excluded))}" if made.excluded else ""))
    out(f"{made.path}: {human_bytes(made.size)} ({made.size / 2**20:.1f} MiB)")
    err(f"copy it to the target, then: {made.path.name}/install.sh --cuda 90   (or --metal; CPU without either)")
