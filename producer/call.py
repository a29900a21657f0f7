"""One ``embed`` request as the dispatcher sees it: its texts, where their vectors go, and how it ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embq.producer import keys, metrics
from embq.producer.codec import normalize_rows
from embq.producer.errors import EmbqTimeoutError, InvalidInputError, ItemFailedError
from embq.producer.settings import Settings


class Call:
    """Rows ``0 .. len(texts) - 1``; the dispatcher fills them, the caller waits for ``finished``.

    Every method but ``wait``'s result and ``cancel`` runs in the dispatcher; the
    caller only reads the call once ``on_finish`` has fired.
    """

    def __init__(
        self,
        texts: list[str],
        instruction: str,
        *,
        dim: int | None = None,
        deadline: float | None = None,
        on_progress: Callable[[int], None] | None = None,
        lane: str = keys.INTERACTIVE,
        truncate: bool = False,
        on_rows: Callable[[str, int], None] | None = None,
    ) -> None:
        self.texts = texts
        self.instruction = instruction
        #: Cut texts over the engine's context instead of failing them; their keys are the cut kind.
        self.truncate = truncate
        #: ``keys.INTERACTIVE`` or ``keys.BULK``: which queue its tasks go to, and who goes first.
        self.lane = lane
        self.dim = dim
        self.deadline = deadline
        self.on_progress = on_progress
        #: Told ``(how, rows)`` as rows are resolved: ``cached``, ``computed``, ``waited`` or ``failed``.
        self.on_rows = on_rows
        self.arrived = time.monotonic()
        #: Texts handed to the dispatcher's windows so far: large calls are admitted piece by piece.
        self.admitted = 0
        self.remaining = len(texts)
        self.matrix: np.ndarray | None = None
        #: The model's dimension, once a vector came.
        self.full = 0
        self.failures: dict[int, str] = {}
        self.error: BaseException | None = None
        self.cancelled = False
        self.finished = False
        #: Set by the driver: wakes whoever waits for this call (a thread or a coroutine).
        self.on_finish: Callable[[], None] = lambda: None
        #: The driver's handle on the waiter: a ``threading.Event`` or an ``asyncio.Future``.
        self.signal: Any = None
        #: Distinct texts found in the cache, computed by this client's tasks, computed for
        #: another producer, or failed.
        self.cached = 0
        self.computed = 0
        self.waited = 0
        self.failed = 0
        #: Rows (not texts: a text may fill many) by how their vector was found: these add up, with the
        #: failed rows, to the call's rows.
        self.rows_found = {"cached": 0, "computed": 0, "waited": 0}

    def place(self, rows: list[int], vectors: np.ndarray, how: str, distinct: int) -> None:
        """Vectors for ``rows`` (one per row, ``distinct`` texts): ``how`` is ``cached``, ``computed`` or ``waited``."""
        if self.finished or not rows:
            return
        if self.matrix is None:  # with ``dim``, only the prefix is kept: a large call needs n x dim floats
            self.full = vectors.shape[1]
            width = self.full if self.dim is None else min(self.dim, self.full)
            self.matrix = np.empty((len(self.texts), width), dtype=np.float32)
        if vectors.shape[1] != self.full:
            self.fail_rows(rows, f"vector of dimension {vectors.shape[1]} where the model gave {self.full}", distinct)
            return
        index = np.asarray(rows)
        target: Any = index
        if index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
            target = slice(int(index[0]), int(index[-1]) + 1)  # rows in a run, as a window gives: no scatter
        self.matrix[target] = vectors[:, : self.matrix.shape[1]]
        setattr(self, how, getattr(self, how) + distinct)
        self.rows_found[how] += len(rows)
        self._resolved(len(rows), how)

    def fail_rows(self, rows: list[int], reason: str, distinct: int = 1) -> None:
        if self.finished:
            return
        for row in rows:
            self.failures[row] = reason
        self.failed += distinct
        self._resolved(len(rows), "failed")

    def _resolved(self, count: int, how: str) -> None:
        self.remaining -= count
        if self.on_progress is not None:
            self.on_progress(count)
        if self.on_rows is not None:
            self.on_rows(how, count)
        if self.remaining <= 0:
            self.finish()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.error = error
            self.finish()

    def expire(self, now: float) -> bool:
        """Fail with ``EmbqTimeoutError`` once the deadline passed; True if it did."""
        if self.finished or self.deadline is None or now < self.deadline:
            return False
        self.fail(
            EmbqTimeoutError(
                f"{self.remaining} of {len(self.texts)} texts still missing after the timeout; are workers "
                "consuming the model's queue? What was computed stays cached; workers skip the rest, "
                "which nobody waits for any more, and a later call computes only that.",
                missing=self.remaining,
                total=len(self.texts),
            )
        )
        return True

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.on_finish()

    def cancel(self) -> None:
        """The caller gave up (Ctrl-C): the dispatcher releases what only this call wanted."""
        self.cancelled = True

    def count(self, model: str) -> None:
        """Into the client's Prometheus counters."""
        metrics.count_call(model, self.cached, self.computed, self.waited, self.failed, time.monotonic() - self.arrived)

    def result(self, settings: Settings) -> np.ndarray:
        """The caller's side, once finished: the rows, or the error they end in (a timeout names the
        queue of the call's lane)."""
        if self.error is not None:
            if isinstance(self.error, EmbqTimeoutError):
                queue = keys.queue_name(settings.model, settings.cache_namespace, self.lane)
                raise EmbqTimeoutError(
                    str(self.error).replace("the model's queue", f"queue {queue!r}"),
                    missing=self.error.missing,
                    total=self.error.total,
                ) from None
            raise self.error
        if self.dim is not None and self.full and self.dim > self.full:
            raise InvalidInputError(f"dim={self.dim} exceeds the model's dimension {self.full}")
        if self.matrix is None:
            self.matrix = np.full((len(self.texts), self.dim or 0), np.nan, dtype=np.float32)
        if self.failures:
            self.matrix[sorted(self.failures)] = np.nan
        result = self.matrix
        if self.dim is not None and self.full > self.dim:  # the Matryoshka prefix, re-normalised
            normalize_rows(result)
        if self.failures:
            first = min(self.failures)
            raise ItemFailedError(
                f"{len(self.failures)} of {len(self.texts)} texts failed; texts[{first}] (index {first}): "
                f"{self.failures[first]}. The other rows are in .vectors and cached.",
                self.failures,
                result,
            )
        return result


def before_sending(texts: list[str], dim: int | None, full: int | None) -> np.ndarray | None:
    """What the model's known dimension settles before anything is sent: an impossible ``dim``
    raises, and an empty input gets its shape ``(0, dim or the model's)``."""
    if dim is not None and full is not None and dim > full:
        raise InvalidInputError(f"dim={dim} exceeds the model's dimension {full}")
    if not texts:
        return np.zeros((0, dim or full or 0), dtype=np.float32)
    return None


#: What ``priority=`` takes: a lane, or None for the default by size.
PRIORITIES = (None, *keys.LANES)

log = logging.getLogger(__name__)
_said_capped = False  # a call above the interactive cap is logged once per process, not at each call


def choose_lane(priority: str | None, texts: int, settings: Settings, default: str | None = None) -> str:
    """The lane of a call: ``priority`` if given, else ``default`` (a stream is bulk), else by size:
    a call of at most ``interactive_max_texts`` texts is someone waiting, a larger one is a batch.

    Interactive is for queries, whatever a caller claims: a call of more than
    ``interactive_cap_texts`` texts goes bulk even with ``priority="interactive"``, so that one caller
    cannot queue a backfill ahead of everyone's queries."""
    global _said_capped
    if priority not in PRIORITIES:
        raise InvalidInputError(f"priority must be 'interactive', 'bulk' or None (by size), got {priority!r}")
    lane = priority or default or (keys.INTERACTIVE if texts <= settings.interactive_max_texts else keys.BULK)
    if lane == keys.INTERACTIVE and texts > settings.interactive_cap_texts:
        if not _said_capped:
            _said_capped = True
            log.warning(
                "a call of %d texts asked for the interactive lane, which takes at most %d "
                "(EMBQ_INTERACTIVE_CAP_TEXTS): it goes in the bulk lane (said once)",
                texts,
                settings.interactive_cap_texts,
            )
        return keys.BULK
    return lane
