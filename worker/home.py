"""``EMBQ_HOME``: where embedded defaults keep their private Redis's data, and the lock that guards it.

Default: ``embq`` in the user's cache directory, by platform convention:
``$XDG_CACHE_HOME/embq`` or ``~/.cache/embq`` on Linux, ``~/Library/Caches/embq``
on macOS, ``%LOCALAPPDATA%\\embq`` on Windows. Cached vectors are data that can
be recomputed, which is what a cache directory is for.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from embq.producer.errors import EmbqError


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        xdg = env.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the spec ignores relative paths
    return base / "embq"


def embq_home(environ: Mapping[str, str] | None = None) -> Path:
    """``EMBQ_HOME``, else the default."""
    env = os.environ if environ is None else environ
    value = env.get("EMBQ_HOME", "").strip()
    return Path(value).expanduser() if value else default_home(env)


class HomeBusy(EmbqError):
    """Raised when another ``embq`` process holds a home directory that must not wait."""


class HomeLock:
    """An exclusive ``flock`` on ``DIR/lock``: one private stack per directory at a time.

    Pass ``fd`` to the processes the holder starts (``pass_fds``): the lock is
    shared by every copy of the descriptor and held until the last one closes,
    so a killed holder keeps it until its private Redis has written its file and exited.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "lock"
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The PID of the last process that took the lock (which may have left its children holding it)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def acquire(self, wait: bool, on_busy: Callable[[int | None], None] | None = None) -> None:
        """Take the lock; when it is held, call ``on_busy(holder)`` and wait (signals still interrupt),
        or raise ``HomeBusy`` when not ``wait``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder()
                if not wait:
                    who = f"an embq process (pid {holder})" if holder else "another embq process"
                    raise HomeBusy(f"{who} is using {self.path.parent}; try again when it has finished") from None
                if on_busy is not None:
                    on_busy(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
