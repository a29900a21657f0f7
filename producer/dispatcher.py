"""The producer's dispatcher, written once for threads and asyncio.

``Dispatcher.run`` is a generator: it yields what to do (an ``Op``: run a
script, send tasks, read the reply stream, wait for a call) and receives the
result, or the exception, from a driver (``embq.producer.client`` runs it in a
thread with redis-py, ``embq.producer.aio`` in a task with redis-py's asyncio API).
All of the protocol lives here, none of the I/O.

One dispatcher serves every call of its client, so concurrent calls share its
round trips: texts submitted together are claimed by one ``CLAIM``, sent in the
same tasks, and answered by the same notices. Large calls are admitted in
windows: at most ``inflight_texts`` texts are being resolved at once, so a call
of a million texts has its first task queued at once and never holds more than
a window of claims.

Calls go in one of two lanes (``keys.INTERACTIVE``, ``keys.BULK``): interactive
calls are admitted before bulk ones and past the window, and their texts go in
tasks of the interactive queue; bulk tasks are sized to what the model's slowest
worker embeds in ``task_seconds`` (workers publish their rate in their
heartbeat). A call that times out, or is cancelled, releases the claims of the
texts only it wanted, so that workers skip them. Until a worker serves the model
or has served it, nothing is claimed or sent; after ``unknown_model_grace``
seconds of neither, the calls fail with ``ModelNotServedError``.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError

from embq.producer import keys, protocol
from embq.producer.backend import BACKEND_ERRORS, redis_reason, unavailable
from embq.producer.broker import HELD_SCRIPT, UNACKED_KEY, queue_lists, task_ids_held
from embq.producer.call import Call
from embq.producer.codec import unpack_concat, unpack_many
from embq.producer.contract import EmbedPayload, make_payload, root_task_id, signature_dimension
from embq.producer.errors import BackendUnavailableError, EmbqError, ModelNotServedError
from embq.producer.keys import BULK, INTERACTIVE
from embq.producer.pending import OURS, THEIRS, Pending
from embq.producer.settings import Settings

log = logging.getLogger(__name__)

#: Texts per CLAIM script call: bounds one round trip's reply (the cached vectors among them).
CLAIM_CHUNK = 1000
#: Above this recent hit rate, a window is read with a plain MGET before any claim: hits then cost
#: no script. Below it, most texts are new and the CLAIM script reads and claims in one go.
LOOK_FIRST_ABOVE = 0.3
#: Longest blocking read of the reply stream (below redis-py's socket timeouts).
MAX_BLOCK = 2.0
#: Notices fetched per read: each carries a task's vectors (up to a few MB), so a read stays bounded.
NOTICES_PER_READ = 16
#: Sends of one text before it fails: a task that keeps vanishing is not retried for ever.
MAX_ATTEMPTS = 3
#: Seconds between looks for a worker of a model none has served yet (``unknown_model_grace``).
MODEL_RECHECK = 0.5
#: Fewest texts in a bulk task, however slow the model's workers: a task costs a worker a few
#: Celery round trips, which must stay small beside its texts.
MIN_TASK_TEXTS = 16


@dataclass(frozen=True)
class Redis:
    """Run ``commands`` on the ``cache`` or the ``broker`` Redis in one round trip; returns their replies.

    ``scripts`` holds the source of every script an EVALSHA names (by its SHA1),
    for the driver to load into a Redis that does not know it yet."""

    target: str
    commands: list[tuple[Any, ...]]
    scripts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PerText:
    """Run ``embq.producer.protocol``'s script ``name`` ("claim", "release") over ``digests`` in the cache, ARGV
    ``args`` then the digests end to end: one round trip on one Redis, one per node on a cluster
    (``embq.producer.client.on_cache``). Returns the script's reply over all of ``digests``."""

    name: str
    args: list[Any]
    digests: list[str]

    def on_one_redis(self) -> Redis:
        """The same as one EVALSHA, for a single Redis."""
        source = protocol.CLAIM if self.name == "claim" else protocol.RELEASE
        sha = hashlib.sha1(source.encode()).hexdigest()
        return Redis("cache", [("EVALSHA", sha, 0, *self.args, "".join(self.digests))], {sha: source})


@dataclass(frozen=True)
class Look:
    """The cache's values of ``digests`` (vectors, claims or None), in order."""

    digests: list[str]

    def on_one_redis(self) -> Redis:
        return Redis("cache", [("MGET", *(keys.vector_key(d) for d in self.digests))] if self.digests else [])


@dataclass(frozen=True)
class Read:
    """XREAD our stream after ``last_id``, blocking up to ``block`` seconds (0: do not block); a call
    that arrives meanwhile wakes it."""

    last_id: Any
    block: float


@dataclass(frozen=True)
class Send:
    """Publish Celery tasks ``(task id, payload)`` to the model's queue."""

    tasks: list[tuple[str, EmbedPayload]]


@dataclass(frozen=True)
class Wait:
    """Nothing to read: wait for a call to arrive, at most ``timeout`` seconds (None: as long as it takes)."""

    timeout: float | None


@dataclass(frozen=True)
class Pause:
    """Sleep ``seconds``: calls that arrive meanwhile join the next round trip."""

    seconds: float


Op = Redis | PerText | Look | Read | Send | Wait | Pause

#: Texts of one call admitted together: ``(call, their rows, texts, digests)``.
Piece = tuple[Call, Sequence[int], list[str], list[str]]

SCRIPTS = {"held": HELD_SCRIPT}
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}


def script(name: str, keys: list[str], args: list[Any], target: str = "cache") -> Redis:
    return Redis(target, [("EVALSHA", SHAS[name], len(keys), *keys, *args)], {SHAS[name]: SCRIPTS[name]})


class Dispatcher:
    """The state of one client's calls; see the module docstring."""

    def __init__(self, settings: Settings, token: str | None = None, *, check_served: bool = True) -> None:
        """``check_served``: fail calls for a model no worker has ever served (``unknown_model_grace``);
        a caller that starts its own worker on demand (``embq embed``'s private one) turns it off."""
        self.settings = settings
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
        self.bulk_task_texts = settings.task_max_texts
        #: Texts each worker of the model had embedded at the last look: a worker that embeds is progress.
        self.worker_texts: dict[str, int] = {}

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Generator[Op, Any, None]:
        opened = False
        while not self.closing:
            try:
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
        while self.active and (len(self.entries) < self.settings.inflight_texts or self.active[0].lane != BULK):
            yield from self._admit()  # interactive calls are admitted past the window: they are small
        if self.recheck:
            digests, self.recheck = [d for d in self.recheck if d in self.entries], set()
            yield from self._claim(digests, count=False)
        yield from self._drop_expired(time.monotonic())
        if self.inbox or (self.active and len(self.entries) < self.settings.inflight_texts):
            if self.tasks:  # a steady stream of new calls must not keep the notices of sent tasks unread
                response = yield Read(self.last_id, 0)
                if response:
                    yield from self._on_read(response)
            return
        if self.unreported_hits:  # before going quiet: counters should not lag behind the calls
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

    # -- admitting and claiming -------------------------------------------------------------

    def _admit(self) -> Generator[Op, Any, None]:
        """The next texts of the active calls: those cached are placed at once (one MGET, no script);
        the others wait in entries, and those no entry had yet are claimed."""
        room = self.settings.inflight_texts - len(self.entries)
        budget = min(CLAIM_CHUNK, room if self.active[0].lane == BULK else max(room, CLAIM_CHUNK))
        pieces: list[Piece] = []
        while self.active and budget > 0:
            call = self.active[0]
            if call.finished:
                self.active.popleft()
                continue
            start = call.admitted
            end = min(len(call.texts), start + budget)
            texts = call.texts[start:end]
            digests = keys.text_digests(self.model, self.namespace, call.instruction, texts, truncate=call.truncate)
            pieces.append((call, range(start, end), texts, digests))
            budget -= end - start
            call.admitted = end
            if end == len(call.texts):
                self.active.popleft()
        fresh: list[str] = []
        if any(call.truncate for call, _, _, _ in pieces):
            pieces = yield from self._look_cut(pieces, fresh)
        if not pieces:
            yield from self._claim(fresh, count=True)
            return
        if self.hit_rate < LOOK_FIRST_ABOVE:  # mostly new texts: CLAIM finds the cached ones itself
            for call, rows, texts, digests in pieces:
                for row, digest, text in zip(rows, digests, texts, strict=True):
                    if self.entries.add(digest, text, call.instruction, call, row):
                        fresh.append(digest)
            yield from self._claim(fresh, count=True)
            return
        looked = [d for _, _, _, digests in pieces for d in digests]
        values = yield Look(looked)
        matrix, valid = unpack_many(values, self.dim)
        add, position = self.entries.add, 0
        for call, rows, texts, digests in pieces:
            found: list[int] = []
            picks: list[int] = []
            for row, digest, text in zip(rows, digests, texts, strict=True):
                if valid[position]:
                    found.append(row)
                    picks.append(position)
                elif add(digest, text, call.instruction, call, row):
                    fresh.append(digest)
                position += 1
            if found:
                distinct = len({looked[pick] for pick in picks})
                call.place(found, matrix[picks], "cached", distinct)
                self.unreported_hits += distinct
        self._learn_hit_rate(int(valid.sum()), len(looked))
        yield from self._claim(fresh, count=True)

    def _look_cut(self, pieces: list[Piece], fresh: list[str]) -> Generator[Op, Any, list[Piece]]:
        """The pieces of calls that ask for the cut (``truncate``), in one MGET of their cut keys and their
        whole texts' keys: a vector under either is theirs (a text cached whole fit the context, so its cut
        is itself; a text over it has none there, since a call without the cut fails it). The rest wait in
        entries, under their cut keys, and those no entry had yet join ``fresh``, to be claimed. Returns the
        other pieces."""
        cut = [piece for piece in pieces if piece[0].truncate]
        whole = [keys.text_digests(self.model, self.namespace, call.instruction, texts) for call, _, texts, _ in cut]
        looked = [d for _, _, _, digests in cut for d in digests]
        values = yield Look(looked + [d for digests in whole for d in digests])
        matrix, valid = unpack_many(values, self.dim)
        add, position, hits = self.entries.add, 0, 0
        for call, rows, texts, digests in cut:
            found: list[int] = []
            picks: list[int] = []
            for row, digest, text in zip(rows, digests, texts, strict=True):
                pick = position if valid[position] else position + len(looked)
                if valid[pick]:
                    found.append(row)
                    picks.append(pick)
                elif add(digest, text, call.instruction, call, row):
                    fresh.append(digest)
                position += 1
            if found:
                distinct = len({looked[pick % len(looked)] for pick in picks})
                call.place(found, matrix[picks], "cached", distinct)
                self.unreported_hits += distinct
                hits += len(found)
        self._learn_hit_rate(hits, len(looked))
        return [piece for piece in pieces if not piece[0].truncate]

    def _learn_hit_rate(self, hits: int, looked: int) -> None:
        if looked:
            self.hit_rate = 0.8 * self.hit_rate + 0.2 * hits / looked

    def _hits_to_report(self) -> list[tuple[Any, ...]]:
        """Commands adding the hits found by MGET to the model's counters (CLAIM counts its own)."""
        if not self.unreported_hits:
            return []
        hits, self.unreported_hits = self.unreported_hits, 0
        return [("HINCRBY", self.stats, "hits", hits), ("EXPIRE", self.stats, keys.STATS_TTL)]

    def _claim(self, digests: list[str], *, count: bool) -> Generator[Op, Any, None]:
        """CLAIM ``digests`` (entries that exist); resolve the cached, send what we now own."""
        for start in range(0, len(digests), CLAIM_CHUNK):
            part = digests[start : start + CLAIM_CHUNK]
            args = [self.token, self.hold_ms, self.reply, 2 * self.lease_ms, self.stats if count else ""]
            reply = yield PerText("claim", args, part)
            send: list[str] = []
            hit_digests: list[str] = []
            hit_values: list[bytes] = []
            slots, states = self.entries.slots, self.entries.states
            for digest, item in zip(part, reply, strict=True):
                slot = slots.get(digest)
                if slot is None:
                    continue
                if isinstance(item, bytes):
                    hit_digests.append(digest)
                    hit_values.append(item)
                elif item == protocol.CLAIMED:
                    states[slot] = OURS
                    send.append(digest)
                elif item == protocol.OURS:
                    states[slot] = OURS
                    if not self.entries.sent[slot]:  # ours from a call that failed before sending: send it now
                        send.append(digest)
                else:
                    states[slot] = THEIRS
            if count:
                self._learn_hit_rate(len(hit_digests), len(part))
            if hit_digests:  # found at a first claim they were cached; found later, a worker made them for us
                matrix, valid = unpack_many(hit_values, self.dim)
                bad = self._deliver(hit_digests, matrix, valid, "cached" if count else None)
                # Invalid cached values: compute them again (once: not at every look while their
                # task is queued); the worker overwrites them.
                for digest in bad:
                    states[slots[digest]] = OURS
                    if not self.entries.sent[slots[digest]]:
                        send.append(digest)
            yield from self._send(send)

    def _send(self, digests: list[str], why: str = "") -> Generator[Op, Any, None]:
        """Send ``digests`` (ours) as tasks of at most ``task_max_texts`` texts and ``task_max_chars`` characters."""
        pending = self.entries
        groups: dict[tuple[int, str, int], list[tuple[str, int]]] = {}  # by (bulk, instruction, cut)
        given_up: list[str] = []
        for digest in digests:
            slot = pending.slots[digest]
            if pending.attempts[slot] >= MAX_ATTEMPTS:
                given_up.append(digest)
                continue
            pending.attempts[slot] += 1
            key = (pending.bulk[slot], pending.instructions[slot], pending.cut[slot])
            groups.setdefault(key, []).append((digest, slot))
        if why and groups:
            log.warning("sending %d texts again: %s", sum(map(len, groups.values())), why)
        tasks: list[tuple[str, EmbedPayload]] = []
        most_chars = self.settings.task_max_chars
        for (bulk, instruction, cut), group in groups.items():
            lane = BULK if bulk else INTERACTIVE
            most_texts = self.bulk_task_texts if bulk else self.settings.task_max_texts
            batch: list[str] = []
            texts: list[str] = []
            chars = 0
            for digest, slot in [*group, ("", -1)]:
                text = pending.texts[slot] if slot >= 0 else ""
                if batch and (slot < 0 or len(batch) >= most_texts or chars + len(text) > most_chars):
                    task_id = uuid.uuid4().hex
                    payload = make_payload(self.settings, instruction, texts, self.reply, lane, truncate=bool(cut))
                    tasks.append((task_id, payload))
                    self.tasks[task_id] = batch
                    for sent in batch:
                        pending.sent[pending.slots[sent]] = task_id
                    batch, texts, chars = [], [], 0
                if slot < 0:
                    break
                batch.append(digest)
                texts.append(text)
                chars += len(text)
        if tasks:
            yield Send(tasks)
        if given_up:  # failed here: our claims go, so that nobody waits for them (a later call tries again)
            for digest in given_up:
                self._fail(digest, f"gave up after {MAX_ATTEMPTS} attempts" + (f": {why}" if why else ""))
            yield from self._release(given_up)

    # -- results ----------------------------------------------------------------------------

    def _deliver(self, digests: list[str], matrix: Any, valid: Any, how: str | None = None) -> list[str]:
        """Place vectors in the rows that wait for them; returns the digests whose vector is invalid."""
        placed: dict[tuple[Call, str], tuple[list[int], list[int], set[str]]] = {}
        bad: list[str] = []
        slots = self.entries.slots
        for j, digest in enumerate(digests):
            if digest not in slots:
                continue
            if not valid[j]:
                bad.append(digest)
                continue
            state, waiters = self.entries.take(digest)  # type: ignore[misc]
            kind = how or ("computed" if state == OURS else "waited")
            for call, row in waiters:
                rows, picks, distinct = placed.setdefault((call, kind), ([], [], set()))
                rows.append(row)
                picks.append(j)
                distinct.add(digest)
        for (call, kind), (rows, picks, distinct) in placed.items():
            everything = len(picks) == len(matrix) and picks[0] == 0 and picks[-1] == len(picks) - 1
            call.place(rows, matrix if everything else matrix[picks], kind, len(distinct))
        if placed:
            self.last_progress = time.monotonic()
        return bad

    def _fail(self, digest: str, reason: str) -> None:
        taken = self.entries.take(digest)
        if taken is None:
            return
        rows: dict[Call, list[int]] = {}
        for call, row in taken[1]:
            rows.setdefault(call, []).append(row)
        for call, failed in rows.items():
            call.fail_rows(failed, reason)
        self.last_progress = time.monotonic()

    def _on_read(self, response: Any) -> Generator[Op, Any, None]:
        notices: list[dict[bytes, bytes]] = []
        read = False
        for _stream, entries in stream_entries(response):
            for entry_id, fields in entries:
                self.last_id = entry_id
                read = True
                if b"d" in fields:
                    notices.append(fields)
        if read:
            yield Redis("cache", [("XTRIM", self.reply, "MINID", self.last_id)])
        for fields in notices:
            notice = protocol.read_notice(fields)
            if notice.done:
                matrix, valid = unpack_concat(notice.values, len(notice.done), self.dim)
                self.recheck.update(self._deliver(notice.done, matrix, valid))
            task = root_task_id(notice.task) if notice.task else ""
            for digest, reason in notice.failed.items():
                # From the task we wait for, or (for a text another producer computes) from its worker;
                # a failure of a task we gave up on must not fail the text sent again since.
                if self.entries.carried_by(digest, task) or (not task and self._watching(digest)):
                    self._fail(digest, reason)
            self.recheck.update(d for d in notice.released if d in self.entries)

    # -- ticks: liveness, takeovers, lost tasks ---------------------------------------------

    def _open(self) -> Generator[Op, Any, None]:
        """Create our reply stream and our liveness key; workers add to the stream without creating it."""
        last_id, _, _, signature = yield Redis(
            "cache",
            [
                ("XADD", self.reply, "*", "hello", ""),
                ("PEXPIRE", self.reply, 2 * self.lease_ms),
                ("SET", self.alive, 1, "PX", self.lease_ms),
                ("GET", self.signature),
            ],
        )
        self.last_id = last_id
        self.dim = signature_dimension(signature) or self.dim

    def _tick(self) -> Generator[Op, Any, None]:
        """Renew our liveness; look again at every text we wait for: cached meanwhile (a lost
        notice), claim vanished (a Redis restart) or its owner dead: claim and send it."""
        _, exists, signature, *_ = yield Redis(
            "cache",
            [
                ("SET", self.alive, 1, "PX", self.lease_ms),
                ("PEXPIRE", self.reply, 2 * self.lease_ms),
                ("GET", self.signature),
                *self._hits_to_report(),
            ],
        )
        self.dim = signature_dimension(signature) or self.dim
        if not exists:
            yield from self._open()
        yield from self._claim(list(self.entries), count=False)
        yield from self._resend_lost()
        if self.entries or self.active:
            self._learn_from_workers((yield from self._look_at_workers()))
        if self.entries and time.monotonic() - self.last_progress >= self.settings.stall_warning_seconds:
            log.warning(
                "%d texts still pending with no progress for %.0fs (no worker of the model embedded "
                "anything): is a worker consuming queues %s?",
                len(self.entries),
                time.monotonic() - self.last_progress,
                " and ".join(repr(q) for q in self.settings.queues),
            )
            self.last_progress = time.monotonic()

    # -- the model's workers ----------------------------------------------------------------

    def _look_at_workers(self) -> Generator[Op, Any, list[dict[str, str]]]:
        """The workers online (their heartbeats, found through ``keys.WORKERS``): O(workers), no SCAN.
        ``fresh`` is "1" for a worker that beat within the last 1.5 heartbeats: one killed since
        stays listed until its heartbeat expires, but its rate no longer counts."""
        now = time.time()
        (found,) = yield Redis("cache", [("ZRANGEBYSCORE", keys.WORKERS, now, "+inf", "WITHSCORES")])
        pairs = _scored(found)
        if not pairs:
            return []
        names = [name for name, _ in pairs]
        replies = yield Redis("cache", [("HMGET", keys.worker_key(name), *WORKER_FIELDS) for name in names])
        recent = now + keys.HEARTBEAT_TTL - 1.5 * keys.HEARTBEAT_SECONDS
        return [
            {
                "name": name,
                "fresh": "1" if expires >= recent else "",
                **{f: _text(v) for f, v in zip(WORKER_FIELDS, values, strict=True)},
            }
            for (name, expires), values in zip(pairs, replies, strict=True)
            if values[0] is not None  # its hash expired: gone
        ]

    def _serves(self, worker: dict[str, str]) -> bool:
        return worker["model"] == self.model and (worker["namespace"] or keys.DEFAULT_NAMESPACE) == self.namespace

    def _learn_from_workers(self, workers: list[dict[str, str]]) -> None:
        """Bulk tasks sized to the slowest worker's rate; a worker that embedded since the last look is progress."""
        mine = [w for w in workers if self._serves(w)]
        speeds = [float(w["speed"]) for w in mine if w["fresh"] and w["speed"] and float(w["speed"]) > 0]
        if speeds:
            texts = int(self.settings.task_seconds * min(speeds))
            self.bulk_task_texts = max(MIN_TASK_TEXTS, min(self.settings.task_max_texts, texts))
        seen = {w["name"]: int(w["texts"] or 0) for w in mine}
        if any(count > self.worker_texts.get(name, count) for name, count in seen.items()):
            self.last_progress = time.monotonic()
        self.worker_texts = seen

    def _find_model(self) -> Generator[Op, Any, None]:
        """Is the model served, or was it (its signature)? A worker that is loading counts. Raises
        ``ModelNotServedError`` after ``unknown_model_grace`` seconds of neither."""
        (signature,) = yield Redis("cache", [("GET", self.signature)])
        workers = yield from self._look_at_workers()
        mine = [w for w in workers if self._serves(w)]
        if signature is not None or mine:
            self.model_known, self.unknown_since = True, None
            if not mine and not self.said_no_worker:
                self.said_no_worker = True
                log.warning(
                    "no worker of model %r is online (workers have served it before): its texts wait in queues %s "
                    "until one starts",
                    self.model,
                    " and ".join(repr(q) for q in self.settings.queues),
                )
            return
        now = time.monotonic()
        if self.unknown_since is None:
            self.unknown_since = now
        if not self.said_unknown:
            self.said_unknown = True
            log.info("no worker serves model %r yet; waiting up to %.0fs for one", self.model, self._grace())
        if now - self.unknown_since >= self._grace():
            self.unknown_since = None
            namespace = self.namespace
            served = sorted({w["model"] for w in workers if (w["namespace"] or keys.DEFAULT_NAMESPACE) == namespace})
            raise ModelNotServedError(self.model, served, self._grace())

    def _grace(self) -> float:
        return self.settings.unknown_model_grace

    def _watching(self, digest: str) -> bool:
        return self.entries.state(digest) == THEIRS

    def _awaited(self, task_id: str) -> list[str]:
        return [d for d in self.tasks[task_id] if self.entries.carried_by(d, task_id)]

    def _resend_lost(self) -> Generator[Op, Any, None]:
        """Send again the texts of tasks the broker held at neither of two ticks (see ``embq.producer.broker``).

        Two looks apart, because a task is briefly in neither place while a worker
        moves it from the queue to its unacked hash; a task finished meanwhile has
        left its notice, which is read before anything is sent again."""
        self.tasks = {t: ds for t in self.tasks if (ds := self._awaited(t))}
        if not self.tasks or not self.broker_checks:
            self.suspects.clear()
            return
        try:
            lists = [name for queue in self.settings.queues for name in queue_lists(queue)]
            (raw,) = yield script("held", [UNACKED_KEY, *lists], [], "broker")
        except redis.exceptions.ResponseError as e:  # an ACL or a managed Redis without scripts
            log.warning("cannot look for lost tasks in the broker (%s); allow EVALSHA to have them found", e)
            self.broker_checks = False
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.info("broker unreachable while looking for lost tasks: %s", e)
            return
        held = task_ids_held(raw, self.tasks)
        if held is None:
            self.suspects.clear()
            return
        missing = set(self.tasks) - held
        if missing & self.suspects:
            yield from self._on_read((yield Read(self.last_id, 0)))
        lost = [t for t in missing & self.suspects if t in self.tasks and self._awaited(t)]
        self.suspects = missing - set(lost)
        if lost:
            digests = [d for t in lost for d in self._awaited(t)]
            for task_id in lost:
                del self.tasks[task_id]
            yield from self._send(digests, "their task left the broker unanswered (lost, or failed by a worker)")

    # -- giving up --------------------------------------------------------------------------

    def _drop_cancelled(self) -> Generator[Op, Any, None]:
        """Calls the caller gave up on: forget their rows, release what only they wanted."""
        cancelled = {c for c in self.calls if c.cancelled and not c.finished}
        if cancelled:
            for call in cancelled:
                call.finish()
            yield from self._release(self._forget(cancelled))

    def _drop_expired(self, now: float) -> Generator[Op, Any, None]:
        """Calls past their deadline end with a timeout; texts only they wanted are released, as for
        a cancelled call: a worker skips them rather than compute what nobody waits for (what was
        computed before stays cached for a later call)."""
        expired = {c for c in self.calls if c.expire(now)}
        self.calls = [c for c in self.calls if not c.finished]
        if expired:
            yield from self._release(self._forget(expired))

    def _forget(self, calls: set[Call]) -> list[str]:
        """Drop the rows of ``calls``; returns the digests of ours no row waits for any more."""
        orphans: list[str] = []
        pending = self.entries
        for digest, slot in list(pending.slots.items()):
            if pending.forget(slot, calls):
                state, _ = pending.take(digest)  # type: ignore[misc]
                if state == OURS:
                    orphans.append(digest)
        self.active = deque(c for c in self.active if c not in calls)
        return orphans

    def _release(self, digests: list[str]) -> Generator[Op, Any, None]:
        """Delete our claims of ``digests`` and tell whoever watches them to claim them again."""
        for start in range(0, len(digests), CLAIM_CHUNK):
            part = digests[start : start + CLAIM_CHUNK]
            reply = yield PerText("release", [self.token], part)
            watchers = protocol.watchers_of(reply, part)
            if watchers:
                notices = {stream: protocol.notice_fields(released=ds) for stream, ds in watchers.items()}
                yield Redis("cache", [("XADD", s, "NOMKSTREAM", "*", *protocol.flat(n)) for s, n in notices.items()])

    def _abandon(self, error: BaseException) -> Generator[Op, Any, None]:
        """A failure no retry here can fix: our claims are released, then every call ends with ``error``
        (in that order, so that a caller who retries at once finds nothing of ours in its way)."""
        # NEW too: a CLAIM cut short by the failure may have claimed some of them already.
        ours = [d for d in self.entries if self.entries.state(d) != THEIRS]
        try:
            yield from self._release(ours)
        except (*BACKEND_ERRORS, BackendUnavailableError) as e:
            log.info("could not release %d claims (%s); they lapse with our liveness", len(ours), e)
        for call in [*self.calls, *self.inbox]:
            call.fail(error)
        self.calls.clear()
        self.inbox.clear()
        self.active.clear()
        self.entries.clear()
        self.tasks.clear()
        self.suspects.clear()
        self.recheck.clear()

    def _backend_error(self, error: BaseException) -> EmbqError:
        role = "broker" if isinstance(error, OperationalError) else "cache"
        url = self.settings.broker if role == "broker" else self.settings.cache
        return unavailable(role, url, self.settings.origin(role), error)

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


#: What a producer reads of a worker's heartbeat (``embq.worker.heartbeat``); ``model`` first.
WORKER_FIELDS = ("model", "namespace", "ready", "speed", "texts")


def _scored(reply: Any) -> list[tuple[str, float]]:
    """``ZRANGEBYSCORE ... WITHSCORES`` as ``(member, score)`` pairs, whether RESP2 (flat) or pairs."""
    if reply and not isinstance(reply[0], list | tuple):
        reply = list(zip(reply[::2], reply[1::2], strict=True))
    return [(_text(member), float(score)) for member, score in reply or []]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else ("" if raw is None else str(raw))


def describe(error: BaseException) -> str:
    """An error's reason without its payload: redis-py quotes a failed pipeline's commands, values included."""
    return (redis_reason(error) if isinstance(error, redis.exceptions.RedisError) else str(error))[:500]


def stream_entries(response: Any) -> list[tuple[Any, list[tuple[Any, dict[bytes, bytes]]]]]:
    """XREAD's reply as ``[(stream, [(id, fields), ...])]``, whether RESP2 (list) or RESP3 (map)."""
    if not response:
        return []
    if isinstance(response, dict):
        return [
            (name, entries[0] if entries and isinstance(entries[0], list) else entries)
            for name, entries in response.items()
        ]
    return [(name, entries) for name, entries in response]
