"""What ``embq embed`` shows while it runs: rows done, the cached among them as soon as they are found, and
the time left from the rate of computed rows only (cached rows come at once, and would make it a guess).

On a terminal, a bar redrawn every ``REDRAW`` seconds, whose log lines go through tqdm's writer so that
they never break it; elsewhere (a log file, a pipe), no redraws: a line at the start, at each whole
percent done (at most one every ``LINE_GAP`` seconds), at least one every ``LINE_EVERY`` seconds while
rows come slowly, and one at the end; never the same count of rows twice at the end. No rate until computed
rows have come for ``RATE_AFTER`` seconds, and none once all rows are done (the job's summary gives it).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

#: Seconds between redraws of the bar: rows found while nothing else happens (cached rows while the
#: private worker loads its model) show within this long.
REDRAW = 0.5
#: Most seconds between two progress lines off a terminal.
LINE_EVERY = 10.0
#: Fewest seconds between two progress lines off a terminal (at most about 100 lines a job).
LINE_GAP = 1.0
#: Seconds of computed rows before a rate is shown: rows come a notice at a time, several at once, and the
#: first moments' rate says more of how notices bunch than of the engine.
RATE_AFTER = 3.0


class Progress:
    """Fed by ``rows(how, count)`` from the dispatcher's thread; ``close`` draws the last state."""

    def __init__(self, total: int | None, *, say: Callable[[str], None], shown: bool, stream: TextIO = sys.stderr):
        self.total = total
        self.say = say
        self.counts = dict.fromkeys(("cached", "computed", "waited", "failed"), 0)
        self.started = time.monotonic()
        #: When the first computed rows came, and how many: the rate is of the rows computed since (the first
        #: ones took the whole wait for the model and the first pass, which no rate can tell).
        self.computing_since: float | None = None
        self.first_computed = 0
        self.shown = shown
        self.terminal = shown and stream.isatty()
        self.bar = tqdm(
            total=total,
            unit="row",
            file=stream,
            disable=not self.terminal,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
            if total
            else "{n_fmt} rows [{elapsed}{postfix}]",
            mininterval=REDRAW,
        )
        self._lock = threading.Lock()
        #: Off a terminal: the percent done at the last line, when it was said, the line, and the rows it counted.
        self._said_percent = -1
        self._said_at = 0.0
        self._said = ""
        self._said_rows = -1
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="embq-progress", daemon=True)
        if shown:
            self._ticker.start()
        if shown and not self.terminal:  # the first line at once: the job has started
            self._say_line()

    def rows(self, how: str, count: int) -> None:
        """``count`` rows found ``how``: ``cached``, ``computed``, ``waited`` (computed for another producer) or
        ``failed``."""
        with self._lock:
            self.counts[how] += count
            if how != "cached" and self.computing_since is None:
                self.computing_since, self.first_computed = time.monotonic(), count
            self.bar.update(count)

    def describe(self) -> str:
        """``1,478 cached, 2:31 left at 12 row/s``: the rate and the time left are of computed rows only."""
        cached = self.counts["cached"]
        computed = self.counts["computed"] + self.counts["waited"] + self.counts["failed"]
        done = cached + computed
        if self.total is not None and done >= self.total:
            return f"{cached:,} cached, nothing left"  # the summary that follows gives the job's rate
        rate = 0.0
        computing = time.monotonic() - self.computing_since if self.computing_since is not None else 0.0
        if computing >= RATE_AFTER:  # not from the first notice: its time is the wait for the model and a pass
            rate = (computed - self.first_computed) / computing
        at = f" at {rate:,.1f} row/s" if rate else ""
        if self.total is None or not rate:
            return f"{cached:,} cached, time left unknown{at}"
        seconds = int(max(0, self.total - done) / rate)
        return f"{cached:,} cached, {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} left{at}"

    def line(self) -> str:
        done = sum(self.counts.values())
        of = f"{done}/{self.total}" if self.total is not None else f"{done}"
        return f"{of} rows [{tqdm.format_interval(time.monotonic() - self.started)}, {self.describe()}]"

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW if self.terminal else LINE_GAP):
            if self.terminal or time.monotonic() - self._said_at >= LINE_EVERY or self._percent() > self._said_percent:
                self._show()

    def _percent(self) -> int:
        """Whole percent of the rows done (-1 when the total is not known)."""
        return 100 * sum(self.counts.values()) // self.total if self.total else -1

    def _show(self) -> None:
        with self._lock:
            if self.terminal:
                self.bar.set_postfix_str(self.describe(), refresh=False)
                self.bar.refresh()
            elif self.shown:
                self._say_line()

    def _say_line(self) -> None:
        """A line off a terminal, unless it would say again what the last one said (lock held)."""
        line, self._said_at, self._said_percent = self.line(), time.monotonic(), self._percent()
        if line != self._said:
            self._said, self._said_rows = line, sum(self.counts.values())
            self.say(line)

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        if self.terminal or (self.shown and sum(self.counts.values()) != self._said_rows):  # the end, said once
            self._show()
        self.bar.close()
