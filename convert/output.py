"""Output files that are either complete or absent, and the progress a writer reports while it writes them.

One command's outputs are one transaction: each is written under a temporary name beside
its target (`.NAME.PID.partial`), and all are renamed onto their targets only when every
one is finished, so a failure, Ctrl-C or SIGTERM leaves none of them (and no partial file).
If a later rename fails, the outputs already renamed are rolled back: removed, or the file
they replaced (`--force`) put back from the hidden `.NAME.PID.previous` kept until then.
A process killed outright (kill -9, the OOM killer) cannot clean up: each partial file is
held under an exclusive `flock` while it is written, so the next run writing beside it can
tell a dead writer's leftovers (the lock is free) from a live one's and remove them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from convert.errors import ConversionError

PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial$")


class Terminated(ConversionError):
    """SIGTERM arrived while outputs were being written; they were removed (exit code 128 + 15, as the shell's)."""

    exit_code = 143


class Progress(Protocol):
    """Told the totals once, then each written piece (source bytes it consumed); `note` is a one-line remark."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None: ...

    def note(self, message: str) -> None: ...


class NoProgress:
    """The `Progress` of a caller that shows none."""

    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def temporary_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.{os.getpid()}.partial")


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: symlinks and `..` resolved, hard links compared by inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct(outputs: Sequence[Path], inputs: Sequence[Path] = ()) -> None:
    """Refuse two outputs naming one file, and an output that is one of the inputs (symlinks, `..`, hard links)."""
    outputs = [Path(o) for o in outputs]
    for i, output in enumerate(outputs):
        for other in outputs[:i]:
            if _same_file(output, other):
                raise ConversionError(f"two outputs are the same file: {other} and {output}")
        for source in inputs:
            if _same_file(output, Path(source)):
                raise ConversionError(f"the output {output} is the input {source}; write to another file")


def check_outputs(outputs: Sequence[Path], inputs: Sequence[Path] = (), *, force: bool = False) -> None:
    """Refuse, before any work, outputs that would destroy something or each other.

    Besides `check_distinct`: a directory as an output, an existing output without
    `force` and a missing parent directory are one-line errors.
    """
    check_distinct(outputs, inputs)
    for output in map(Path, outputs):
        if output.is_dir():
            raise ConversionError(f"{output} is a directory; give a file name for the output")
        if output.exists() and not force:
            raise ConversionError(f"{output} already exists (use --force to overwrite)")
        if not output.parent.is_dir():
            raise ConversionError(f"output directory {output.parent} does not exist")


def check_output_path(output: Path, force: bool) -> None:
    """`check_outputs` for a single output with no inputs."""
    check_outputs([output], force=force)


def _lock_free(path: Path) -> bool:
    """Whether no process holds `path`'s write lock (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def stale_partials(directory: Path) -> list[Path]:
    """The partial files in `directory` whose writer has died (killed before it could remove them)."""
    try:
        entries = sorted(Path(directory).iterdir())
    except OSError:
        return []
    return [p for p in entries if PARTIAL.match(p.name) and p.is_file() and _lock_free(p)]


def remove_stale_partials(directory: Path, note: Callable[[str], None]) -> None:
    """Remove a dead writer's partial files beside our outputs, saying so in one line each."""
    for path in stale_partials(directory):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError as exc:
            note(f"cannot remove {path}, left by an interrupted run: {exc.strerror or exc}")
            continue
        note(f"removed {path} ({size / 1e6:.1f} MB), left by an interrupted run")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While entered (main thread only), SIGTERM raises `Terminated`, so cleanup runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        raise Terminated("terminated (SIGTERM); partial output removed")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _set_aside(output: Path) -> Path | None:
    """Keep what `output` holds (with --force) under a hidden name until every output has landed.

    A hard link leaves the previous file in place until the rename swaps it atomically; a file
    system without hard links gets it renamed aside instead. None when there is nothing there.
    """
    if not os.path.lexists(output):
        return None
    previous = output.with_name(f".{output.name}.{os.getpid()}.previous")
    previous.unlink(missing_ok=True)  # left by a killed process that had our PID
    try:
        os.link(output, previous, follow_symlinks=False)
    except OSError:
        os.replace(output, previous)
    return previous


def _roll_back(committed: list[tuple[Path, Path | None]]) -> None:
    """Undo the outputs that landed before a later one failed: remove each, or put back what it replaced."""
    for output, previous in reversed(committed):
        # A failed step must not hide the error that brought us here.
        with contextlib.suppress(OSError):
            if previous is None:
                output.unlink(missing_ok=True)
            else:
                os.replace(previous, output)
                # rename() does nothing when both names are links to one file (the output never got replaced).
                previous.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_outputs(*outputs: Path, note: Callable[[str], None] | None = None) -> Iterator[list[Path]]:
    """Temporary paths beside `outputs` to write; all renamed onto their targets when the block succeeds.

    On any failure (SIGTERM included) every temporary file is removed, so a half-written
    file never looks like a finished one and no output lands without the others; OS
    errors (a full disk first of all) become one-line errors. Stale partial files of dead
    writers beside the outputs are removed first (`note` tells the user).
    """
    outputs = tuple(Path(o) for o in outputs)
    for directory in dict.fromkeys(o.parent for o in outputs):
        remove_stale_partials(directory, note or (lambda message: None))
    temporaries = [temporary_path(o) for o in outputs]
    locks: list[int] = []
    everything = " and ".join(map(str, outputs))
    current = everything
    try:
        with _sigterm_raises():
            try:
                for output, temporary in zip(outputs, temporaries):
                    current = output
                    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    locks.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                current = everything  # a write error cannot tell which file it was writing
                yield temporaries
                committed: list[tuple[Path, Path | None]] = []  # each output landed, and what it replaced
                try:
                    for output, temporary in zip(outputs, temporaries):
                        current = output
                        committed.append((output, _set_aside(output)))
                        os.replace(temporary, output)
                except BaseException:
                    _roll_back(committed)
                    raise
                for _, previous in committed:
                    if previous is not None:
                        with contextlib.suppress(OSError):
                            previous.unlink()
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ConversionError(f"no space left on device while writing {current}") from None
                raise ConversionError(f"cannot write {current}: {exc.strerror or exc}") from None
            finally:
                for temporary in temporaries:
                    # A failed removal (a read-only directory) must not hide the error that brought us here.
                    with contextlib.suppress(OSError):
                        temporary.unlink(missing_ok=True)
    finally:
        for fd in locks:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(output: Path, note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """`atomic_outputs` for one file."""
    with atomic_outputs(output, note=note) as (temporary,):
        yield temporary
