"""The producer's dispatcher, written once for threads and asyncio.

``Dispatcher.run`` is a generator: it yields what to do (an ``Op``: run a
script, send tasks, read the reply stream, wait for a call) and receives the
result, or the exception, from a driver (``embq.producer.client`` runs it in a
thread with redis-py, ``embq.producer.aio`` in a task with redis-py's asyncio API).
All of the protocol lives here, none of the I/O.

The state machine is ``Dispatcher`` (its loop, its ticks, opening and closing);
its concerns each have a module, mixed into it: admission and claiming
(``embq.producer.admission``: windows, L1 and cache lookups, CLAIM, tasks
sent), reply reading (``embq.producer.replies``), the model's workers
(``embq.producer.fleet``), recovery and giving up (``embq.producer.recovery``),
and the ops a driver answers (``embq.producer.ops``).

One dispatcher serves every call of its client, so concurrent calls share its
round trips: texts submitted together are claimed by one ``CLAIM``, sent in the
same tasks, and answered by the same notices. Large calls are admitted in
windows: at most ``inflight_texts`` texts are being resolved at once, so a call
of a million texts has its first task queued at once and never holds more than
a window of claims.

Calls go in one of two lanes (``keys.INTERACTIVE``, ``keys.BULK``): interactive
calls are admitted before bulk ones, past the bulk window but through their own
(``interactive_cap_texts``), and their texts go in tasks of the interactive
queue; bulk tasks are sized to what the model's slowest worker embeds in
``task_seconds`` (workers publish their rate in their heartbeat). A call that
times out, or is cancelled, releases the claims of the texts only it wanted, so
that workers skip them. Until a worker serves the model or has served it,
nothing is claimed or sent; after ``unknown_model_grace``
seconds of neither, the calls fail with ``ModelNotServedError``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Generator
from typing import Any

from embq.producer import keys
from embq.producer.admission import CLAIM_CHUNK, Admission
from embq.producer.backend import BACKEND_ERRORS
from embq.producer.call import Call
from embq.producer.contract import signature_dimension
from embq.producer.errors import BackendUnavailableError, EmbqError
from embq.producer.fleet import START_TASK_TEXTS, WorkerTracking
from embq.producer.keys import BULK
from embq.producer.l1 import L1Cache
from embq.producer.ops import Look, Op, Pause, PerText, Read, Redis, Send, Wait
from embq.producer.pending import OURS, Pending
from embq.producer.recovery import Recovery
from embq.producer.replies import Replies
from embq.producer.settings import Settings

log = logging.getLogger(__name__)

#: Longest blocking read of the reply stream (below redis-py's socket timeouts).
MAX_BLOCK = 2.0
#: Notices fetched per read: each carries a task's vectors (up to a few MB), so a read stays bounded.
NOTICES_PER_READ = 16
#: Seconds between looks for a worker of a model none has served yet (``unknown_model_grace``).
MODEL_RECHECK = 0.5


class Dispatcher(Admission, Replies, Recovery, WorkerTracking):
    """The state of one client's calls; see the module docstring."""

    def __init__(
        self, settings: Settings, token: str | None = None, *, check_served: bool = True, l1: L1Cache | None = None
    ) -> None:
        """``check_served``: fail calls for a model no worker has ever served (``unknown_model_grace``);
        a caller that starts its own worker on demand (``embq embed``'s private one) turns it off.
        ``l1``: the client's in-process cache, which this dispatcher fills and keeps in its epoch."""
        self.settings = settings
        self.l1 = l1
        self.model = settings.model
        self.namespace = settings.cache_namespace
        self.token = token or uuid.uuid4().hex
        self.reply = keys.reply_key(self.token)
        self.alive = keys.alive_key(self.token)
        self.stats = keys.stats_key(settings.model)
        self.signature = keys.signature_key(settings.cache_namespace, settings.model)
        #: The model's dimension as its workers state it (their signature, read at every tick): a
        #: cached value of another dimension cannot be the model's and reads as a miss. None
        #: while no worker has stated it.
        self.dim: int | None = None
        self.lease_ms = max(1, int(settings.lease_seconds * 1000))
        #: Markers outlive a queued task: a live owner is what keeps them, not their TTL.
        self.hold_ms = max(self.lease_ms, int(settings.visibility_timeout * 1000))
        self.tick = settings.lease_seconds / 4
        self.coalesce = settings.coalesce_ms / 1000
        self.inbox: deque[Call] = deque()
        self.active: deque[Call] = deque()
        self.calls: list[Call] = []
        self.entries = Pending()
        self.tasks: dict[str, list[str]] = {}
        self.suspects: set[str] = set()
        self.recheck: set[str] = set()
        self.broker_checks = True
        self.last_id: Any = "0-0"
        self.next_tick = 0.0
        self.last_progress = time.monotonic()
        self.closing = False
        #: Hits found by MGET, not yet added to the model's counters (they ride on the next round trip).
        self.unreported_hits = 0
        #: Recent share of cached texts among those admitted: it decides whether a window is
        #: looked up with a plain MGET first (cheap hits) or claimed at once (no second look).
        self.hit_rate = 1.0
        #: Set by the driver while it blocks on the stream, so that a new call wakes it.
        self.reading = False
        #: Whether a worker serves the model, or has (its signature); until then nothing is claimed
        #: nor sent, so that a mistyped model leaves no queue behind.
        self.model_known = not check_served or settings.unknown_model_grace <= 0
        self.unknown_since: float | None = None
        self.said_unknown = False  # the wait for an unknown model is logged once, not at each call
        self.said_no_worker = False
        #: Texts per bulk task: what the model's slowest worker embeds in ``task_seconds``.
        self.bulk_task_texts = min(START_TASK_TEXTS, settings.task_max_texts)
        #: Texts each worker of the model had embedded at the last look: a worker that embeds is progress.
        self.worker_texts: dict[str, int] = {}

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Generator[Op, Any, None]:
        opened = False
        while not self.closing:
            try:
                if self.l1 is not None and self.l1.check_due(bool(self.inbox or self.active or self.entries)):
                    yield from self._check_l1()
                if not opened:  # at the first call, and again after a failure, not before
                    if not self.inbox:
                        yield Wait(None)
                        continue
                    yield from self._open()
                    opened = True
                    self.next_tick = time.monotonic() + self.tick
                yield from self._step()
            except BACKEND_ERRORS as e:
                yield from self._abandon(self._backend_error(e))
                opened = False
            except EmbqError as e:  # said in one line to the callers (a private worker that could not start)
                yield from self._abandon(e)
            except Exception as e:  # a bug must not strand the callers
                log.exception("embq dispatcher failed")
                yield from self._abandon(e)
        yield from self._close()

    def _step(self) -> Generator[Op, Any, None]:
        self._take_inbox()
        linger = self._linger()
        if linger > 0:
            yield Pause(linger)
            self._take_inbox()
        yield from self._drop_cancelled()
        if not self.model_known:
            yield from self._find_model()
            if not self.model_known:
                yield from self._drop_expired(time.monotonic())
                yield Pause(MODEL_RECHECK) if self.calls or self.inbox else Wait(None)
                return
        if time.monotonic() >= self.next_tick:  # first: after a quiet spell our liveness must hold before we claim
            yield from self._tick()
            self.next_tick = time.monotonic() + self.tick
        while self._admissible():
            yield from self._admit()
        if self.recheck:
            digests, self.recheck = [d for d in self.recheck if d in self.entries], set()
            yield from self._claim(digests, count=False)
        yield from self._drop_expired(time.monotonic())
        if self.inbox or self._admissible():
            if self.tasks:  # a steady stream of new calls must not keep the notices of sent tasks unread
                response = yield Read(self.last_id, 0)
                if response:
                    yield from self._on_read(response)
            return
        # Before going quiet: counters should not lag behind the calls.
        if self.unreported_hits or (self.l1 is not None and self.l1.unreported):
            yield Redis("cache", self._hits_to_report())
        timeout = self._until_next_event()
        if not self.entries:
            yield Wait(None if timeout is None and not self.calls else timeout)
            return
        block = MAX_BLOCK if timeout is None else max(0.0, min(MAX_BLOCK, timeout))
        response = yield Read(self.last_id, block)
        if response:
            yield from self._on_read(response)
        elif block >= MAX_BLOCK:  # a quiet stream: make sure it is still there (a flushed or restarted Redis)
            (exists,) = yield Redis("cache", [("EXISTS", self.reply)])
            if not exists:
                log.info("reply stream vanished; opening it again and looking at every pending text")
                yield from self._open()
                self.recheck.update(self.entries)

    def _until_next_event(self) -> float | None:
        deadlines = [c.deadline for c in self.calls if c.deadline is not None and not c.finished]
        if self.entries or self.tasks:
            deadlines.append(self.next_tick)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _linger(self) -> float:
        """Seconds small new calls wait for company, so that one round trip and one task serve them all.

        Only while other texts are in flight: a lone caller never waits, and under
        concurrency the wait is bounded by ``coalesce_ms`` after the oldest arrival."""
        if not self.active or not self.entries or self.coalesce <= 0:
            return 0.0
        if sum(len(c.texts) - c.admitted for c in self.active) >= CLAIM_CHUNK:
            return 0.0
        return self.active[0].arrived + self.coalesce - time.monotonic()

    def _take_inbox(self) -> None:
        """New calls join the active ones: interactive calls ahead of every bulk call."""
        while self.inbox:
            call = self.inbox.popleft()
            self.calls.append(call)
            if call.lane == BULK:
                self.active.append(call)
            else:
                first_bulk = next((i for i, c in enumerate(self.active) if c.lane == BULK), len(self.active))
                self.active.insert(first_bulk, call)

    # -- ticks: liveness, takeovers, lost tasks ---------------------------------------------

    def _open(self) -> Generator[Op, Any, None]:
        """Create our reply stream and our liveness key; workers add to the stream without creating it. Learn
        the workers' rates at once: a new client's first bulk tasks are sized as later ones."""
        issued = time.monotonic()
        last_id, _, _, signature, generation = yield Redis(
            "cache",
            [
                ("XADD", self.reply, "*", "hello", ""),
                ("PEXPIRE", self.reply, 2 * self.lease_ms),
                ("SET", self.alive, 1, "PX", self.lease_ms),
                ("GET", self.signature),
                ("GET", keys.GENERATION),
            ],
        )
        self.last_id = last_id
        self._observe(signature, generation, issued)
        self._learn_from_workers((yield from self._look_at_workers()))

    def _check_l1(self) -> Generator[Op, Any, None]:
        """Read the L1's epoch (the model's signature, the cache generation) again; report its hits."""
        assert self.l1 is not None
        self.l1.check_wanted = False  # asked and answered, even if this read fails: no loop on a dead Redis
        issued = time.monotonic()
        signature, generation, *_ = yield Redis(
            "cache", [("GET", self.signature), ("GET", keys.GENERATION), *self._hits_to_report()]
        )
        self._observe(signature, generation, issued)

    def _observe(self, signature: Any, generation: Any, issued: float) -> None:
        """What a read of the signature and the generation (sent at ``issued``) tells: the model's dimension,
        and whether the L1 still holds the model's vectors. When not, pending texts are looked at again:
        vectors of the new worker may be in the cache, which the old dimension refused."""
        if self.l1 is not None and self.l1.confirm((signature, generation), issued):
            self.recheck.update(self.entries)
        self.dim = signature_dimension(signature) or self.dim

    def _tick(self) -> Generator[Op, Any, None]:
        """Renew our liveness; look again at every text we wait for: cached meanwhile (a lost
        notice), claim vanished (a Redis restart) or its owner dead: claim and send it."""
        issued = time.monotonic()
        _, exists, signature, generation, *_ = yield Redis(
            "cache",
            [
                ("SET", self.alive, 1, "PX", self.lease_ms),
                ("PEXPIRE", self.reply, 2 * self.lease_ms),
                ("GET", self.signature),
                ("GET", keys.GENERATION),
                *self._hits_to_report(),
            ],
        )
        self._observe(signature, generation, issued)
        if not exists:
            yield from self._open()
        yield from self._claim(list(self.entries), count=False)
        yield from self._resend_lost()
        if self.entries or self.active:
            self._learn_from_workers((yield from self._look_at_workers()))
        if self.entries and time.monotonic() - self.last_progress >= self.settings.stall_warning_seconds:
            stalled = time.monotonic() - self.last_progress
            deaths = yield from self._recent_deaths(stalled)
            log.warning(
                "%d texts still pending with no progress for %.0fs (no worker of the model embedded "
                "anything): is a worker consuming queues %s?%s",
                len(self.entries),
                stalled,
                " and ".join(repr(q) for q in self.settings.queues),
                f" Workers died meanwhile: {deaths}." if deaths else "",
            )
            self.last_progress = time.monotonic()

    def _close(self) -> Generator[Op, Any, None]:
        try:
            yield from self._drop_cancelled()
        except (*BACKEND_ERRORS, BackendUnavailableError) as e:
            log.info("could not release the claims of cancelled calls (%s); they lapse with our liveness", e)
        ours = [d for d in self.entries if self.entries.state(d) == OURS]
        for call in [*self.calls, *self.inbox]:
            call.fail(EmbqError("the client was closed while this call waited"))
        try:
            # Nobody waits for our queued texts any more: workers skip them, watchers claim them again.
            yield from self._release(ours)
            yield Redis("cache", [("DEL", self.alive), ("DEL", self.reply), *self._hits_to_report()])
        except (*BACKEND_ERRORS, BackendUnavailableError) as e:  # the callers heard of it already
            log.debug("could not close the reply stream (%s); it expires by itself", e)


__all__ = ["NOTICES_PER_READ", "Dispatcher", "Look", "Op", "Pause", "PerText", "Read", "Redis", "Send", "Wait"]
