"""The first cache level: full-dimension vectors in the producer's own memory, in front of Redis.

A hot text (a support desk's standard phrase, a product name) costs a Redis
round trip per call without it; with it, a call whose texts are all held here
is answered on the caller's thread, with no Redis command and without waking
the dispatcher.

Never stale, never wrong. A vector is only as good as the model that made it
and the cache it came from, so the whole L1 rests on one *epoch*: the model's
engine signature (``keys.signature_key``: checkpoint, dimension, instruction
format, and the worker that claimed it) and the cache generation
(``keys.GENERATION``, a new value at every ``embq cache clear``). The
dispatcher reads both at its ticks and whenever the last read is
``FRESH_SECONDS`` old while calls use the L1; when either differs from the
last read (a cleared cache, another worker under the same model id, a flushed
Redis), every entry goes. The check is not per call: a hit is served only while
the last read was issued less than ``STALE_SECONDS`` ago, and the first hit
past ``FRESH_SECONDS`` asks the dispatcher for a new read (it is still
served). So a client honours a cleared cache or a new signature within
``STALE_SECONDS`` plus one round trip, and an idle client revalidates before
its next hit. Entries of another dimension than the model's are dropped as
they meet one (the dispatcher's first vector of a new worker empties the L1
before it is placed).

Entries expire ``ttl`` seconds (``EMBQ_CACHE_TTL``) after they were stored:
the longest a Redis key can live; a hit read from Redis may have less left
there, but its epoch vouches for it as long as it is kept here.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embq.producer.codec import normalize_rows
from embq.producer.errors import InvalidInputError

log = logging.getLogger(__name__)

#: Seconds after the last look at the epoch from which a hit asks the dispatcher to look again.
#: Shorter: a cleared cache is seen sooner, at one more round trip (two GETs) a second per client.
FRESH_SECONDS = 1.0
#: Seconds after the last look at the epoch past which nothing is served from the L1 before the
#: dispatcher has looked again: the staleness bound of an L1 answer.
STALE_SECONDS = 2.0
#: Bytes charged per entry beside its floats (key string, array object, LRU slot), so that the
#: bound holds for small vectors too.
ENTRY_OVERHEAD = 400

#: Every live L1 of the process, for the Prometheus collector (``embq.producer.metrics``).
_LIVE: weakref.WeakSet[L1Cache] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def live() -> list[L1Cache]:
    """The L1s of the process's open clients."""
    with _LIVE_LOCK:
        return list(_LIVE)


@dataclass(frozen=True)
class L1Stats:
    """What one client's L1 did; counters since the client's dispatcher started."""

    #: Texts answered from the L1 (no Redis command for them).
    hits: int
    #: Texts looked up in the L1 and not found there (they went on to Redis).
    misses: int
    #: Entries dropped to keep ``bytes`` under ``max_bytes`` (least recently used first).
    evictions: int
    #: Entries dropped because their TTL passed.
    expired: int
    #: Times the whole L1 was emptied: a new model signature, a cleared cache, another dimension.
    invalidations: int
    #: Bytes held: the vectors' floats plus ``ENTRY_OVERHEAD`` per entry.
    bytes: int
    #: Vectors held.
    entries: int
    #: The bound (``EMBQ_L1_BYTES``).
    max_bytes: int


class L1Cache:
    """A byte-bounded LRU of full-dimension float32 vectors by text digest; thread-safe.

    Callers use ``answer`` (all or nothing: the hot path); the dispatcher uses ``take``,
    ``put`` and ``confirm`` (see the module docstring)."""

    def __init__(self, model: str, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        #: Called (outside the lock) when a hit finds the epoch ``FRESH_SECONDS`` old: the driver wakes its dispatcher.
        self.on_check: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._bytes = 0
        #: Width of the vectors held: one model, one dimension.
        self._width = 0
        self._epoch: Any = None
        self._confirmed_at = float("-inf")
        #: A hit asked the dispatcher to look at the epoch again, and it has not yet.
        self.check_wanted = False
        self._hits = self._misses = self._evictions = self._expired = self._invalidations = 0
        self._unreported = 0
        with _LIVE_LOCK:
            _LIVE.add(self)

    # -- the callers' side ------------------------------------------------------------------

    def answer(self, digests: Sequence[str], dim: int | None) -> np.ndarray | None:
        """The rows of ``digests`` if every one is held and the epoch is recent, else None (the call goes
        to the dispatcher, which counts the misses). A new array, the ``dim`` prefix re-normalised as
        the Redis path does; raises ``InvalidInputError`` for a ``dim`` over the model's dimension."""
        now = self.clock()
        ask = False
        with self._lock:
            if not self._entries or now - self._confirmed_at >= STALE_SECONDS:
                return None
            entries = self._entries
            found = []
            for digest in digests:
                entry = entries.get(digest)
                if entry is None or entry[1] <= now:
                    return None
                found.append(entry[0])
            for digest in digests:
                entries.move_to_end(digest)
            self._hits += len(found)
            self._unreported += len(found)
            if now - self._confirmed_at >= FRESH_SECONDS and not self.check_wanted:
                self.check_wanted = ask = True
            full = self._width
        if ask:
            self.on_check()
        return assemble(found, full, dim)

    # -- the dispatcher's side --------------------------------------------------------------

    def take(self, digests: Sequence[str], width: int | None) -> list[np.ndarray | None]:
        """The held vector of each digest, or None; counts hits and misses. ``width`` is the model's
        dimension as the dispatcher knows it: entries of another one are dropped."""
        now = self.clock()
        with self._lock:
            if width and self._width and width != self._width:
                self._invalidate(f"the model's dimension is now {width}, not {self._width}")
            if not self._entries or now - self._confirmed_at >= STALE_SECONDS:
                self._misses += len(digests)
                return [None] * len(digests)
            out: list[np.ndarray | None] = []
            entries = self._entries
            hits = 0
            for digest in digests:
                entry = entries.get(digest)
                if entry is not None and entry[1] <= now:
                    self._drop(digest)
                    self._expired += 1
                    entry = None
                if entry is None:
                    out.append(None)
                    continue
                entries.move_to_end(digest)
                out.append(entry[0])
                hits += 1
            self._hits += hits
            self._unreported += hits
            self._misses += len(out) - hits
            return out

    def put(self, digests: Sequence[str], matrix: np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Hold row ``rows[i]`` of ``matrix`` (full-dimension float32) as the vector of ``digests[i]``.
        A width other than the held one empties the L1 first: the model changed under us."""
        if not len(digests):
            return
        width = matrix.shape[1]
        size = width * 4 + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        expires = self.clock() + self.ttl
        with self._lock:
            if width != self._width:
                if self._entries:
                    self._invalidate(f"vectors of dimension {width} came where {self._width} were held")
                self._width = width
            entries = self._entries
            for i, digest in enumerate(digests):
                vector = np.array(matrix[rows[i] if rows is not None else i], dtype=np.float32)
                vector.flags.writeable = False
                if digest in entries:
                    entries.move_to_end(digest)
                    entries[digest] = (vector, expires)
                    continue
                entries[digest] = (vector, expires)
                self._bytes += size
            while self._bytes > self.max_bytes and entries:
                entries.popitem(last=False)
                self._bytes -= size
                self._evictions += 1

    def confirm(self, epoch: Any, issued: float) -> bool:
        """The epoch as read by a round trip sent at ``issued`` (monotonic); True when it changed
        (everything held was dropped)."""
        with self._lock:
            changed = self._epoch is not None and epoch != self._epoch
            if changed and self._entries:
                self._invalidate("the model's signature or the cache generation changed")
            self._epoch = epoch
            self._confirmed_at = max(self._confirmed_at, issued)
            self.check_wanted = False
            return changed

    def check_due(self, busy: bool) -> bool:
        """Whether the dispatcher should look at the epoch now: a hit asked, or calls are in hand (``busy``)
        and the last look is ``FRESH_SECONDS`` old. The latter also while the L1 is empty: calls that wait
        for a new worker of the model get its vectors once its signature is read, not at the next tick."""
        if self.check_wanted:
            return True
        return busy and self._epoch is not None and self.clock() - self._confirmed_at >= FRESH_SECONDS

    @property
    def unreported(self) -> int:
        return self._unreported

    def take_unreported(self) -> int:
        """Hits not yet added to the model's counters in Redis (``embq status``)."""
        with self._lock:
            hits, self._unreported = self._unreported, 0
            return hits

    def stats(self) -> L1Stats:
        with self._lock:
            return L1Stats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                expired=self._expired,
                invalidations=self._invalidations,
                bytes=self._bytes,
                entries=len(self._entries),
                max_bytes=self.max_bytes,
            )

    def close(self) -> None:
        """Let the memory go and leave the process's metrics (the client closed)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _drop(self, digest: str) -> None:
        vector, _ = self._entries.pop(digest)
        self._bytes -= vector.nbytes + ENTRY_OVERHEAD

    def _invalidate(self, why: str) -> None:
        log.info("emptied the L1 of %s (%d vectors): %s", self.model, len(self._entries), why)
        self._entries.clear()
        self._bytes = 0
        self._invalidations += 1


def assemble(vectors: list[np.ndarray], full: int, dim: int | None) -> np.ndarray:
    """One row per vector: the whole vector, or its ``dim`` prefix re-normalised (as ``Call.result`` does)."""
    if dim is not None and dim > full:
        raise InvalidInputError(f"dim={dim} exceeds the model's dimension {full}")
    width = full if dim is None else dim
    out = np.empty((len(vectors), width), dtype=np.float32)
    for row, vector in enumerate(vectors):
        out[row] = vector[:width]
    if width < full:
        normalize_rows(out)
    return out


def empty_stats(max_bytes: int) -> L1Stats:
    """The stats of a client that has no L1 yet (before its first call) or none at all."""
    return L1Stats(0, 0, 0, 0, 0, 0, 0, max_bytes)
