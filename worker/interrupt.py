"""Ctrl-C, SIGTERM and SIGHUP stop a command at once and cleanly, at any moment.

The first signal says what the stop does and raises ``Interrupted`` in the main
thread wherever it waits (for the model, for vectors, on a write); the
unwinding stops what the command started. Further signals only say that the
stop is under way, so a second Ctrl-C cannot cut a cleanup short. SIGTERM and
SIGHUP that the caller ignores (``nohup``) stay ignored; SIGINT is always
heard, even by a job a script started in the background (where shells ignore
it): a stop someone asked for by name is never lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """Raised by the first of ``SIGNALS``; a command that catches it exits with ``exit_code``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        #: When it came (``time.monotonic``), to say how long the stop took.
        self.at = time.monotonic()
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report a process a signal ended (130 for Ctrl-C)."""
        return 128 + self.signum


def _say(text: str) -> None:
    # Raw write: the signal may arrive in the middle of a buffered write to stderr.
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


@contextmanager
def interruptible(doing: Callable[[], str]) -> Iterator[None]:
    """Within the block, the first signal prints ``embq: SIGNAL: <doing()>`` and raises ``Interrupted``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handle(signum: int, frame: object) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            _say(f"embq: {name}: already stopping\n")
            return
        stopping = True
        _say(f"\nembq: {name}: {doing()}\n")
        raise Interrupted(signum)

    heard = [sig for sig in SIGNALS if sig == signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, handle) for sig in heard}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
