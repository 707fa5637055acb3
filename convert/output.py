"""Output files that are either complete or absent (written under a temporary name, renamed when done),
and the progress a writer reports while it writes one."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from convert.errors import ConversionError


class Progress(Protocol):
    """Told the totals once, then each written piece (source bytes it consumed)."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None: ...


class NoProgress:
    """The `Progress` of a caller that shows none."""

    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None:
        pass


def temporary_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.{os.getpid()}.partial")


def check_output_path(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise ConversionError(f"{output} already exists (use --force to overwrite)")
    if not output.parent.is_dir():
        raise ConversionError(f"output directory {output.parent} does not exist")


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """A temporary path beside `output` to write; renamed onto `output` when the block succeeds.

    On any failure the temporary file is removed, so a half-written file never looks
    like a finished one; OS errors (a full disk first of all) become one-line errors.
    """
    temporary = temporary_path(output)
    try:
        yield temporary
        os.replace(temporary, output)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConversionError(f"no space left on device while writing {output}") from None
        raise ConversionError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
