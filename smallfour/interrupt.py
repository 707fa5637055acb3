"""Ctrl-C as a request to stop at a clean point, for the loops that generate token by token."""

from __future__ import annotations

import signal


class Interrupt:
    """While entered, the first SIGINT only sets `requested`; a second one raises KeyboardInterrupt.

    A generation loop polls it (`interrupt()` or `interrupt.requested`) after each token and
    stops cleanly — a chat turn keeps its partial answer, a batch job writes no partial line —
    while a second Ctrl-C still gets out of a call that does not return. Outside the main
    thread signals cannot be caught, and Ctrl-C keeps its default meaning.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Interrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            return self
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
