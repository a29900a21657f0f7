"""Turning cache misses into vectors without computing any text twice.

For each missing text a producer (1) registers as a watcher, (2) claims an
in-flight marker with ``SET NX`` and a lease, (3) reads the cache again, then
sends only the texts it claimed and are still missing. Texts claimed by someone
else are waited for. Workers write the vector *before* they clear the marker and
read the watchers in one transaction, so a watcher either gets a notice or finds
the vector on its second read: no wakeup is lost, and no producer polls.

The claimer renews its leases while it waits; if it dies, its markers expire and
the producers still waiting take the texts over. If the broker loses a task it
sent (see ``producer.broker``), the claimer sends those texts again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import redis

from producer import keys
from producer.broker import BrokerView
from producer.codec import unpack_many
from producer.contract import unpack_notice

log = logging.getLogger(__name__)

#: Keys per pipeline or script call, to bound the size of one Redis round trip.
CHUNK = 2000
#: How often a producer that waits with no progress says so in the log.
STALL_LOG_SECONDS = 60.0
#: Longest single blocking read; below redis-py's default socket timeout (5 s).
MAX_BLOCK = 2.0
#: Notices fetched per read of the reply stream.
NOTICES_PER_READ = 1024
#: A text whose vector vanishes right after its notice is retried this often.
MAX_ATTEMPTS = 3

RENEW_SCRIPT = """
-- KEYS: in-flight markers; ARGV[1]: the claim token, ARGV[2]: lease in ms.
-- Renews only the markers this producer still owns.
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    renewed = renewed + 1
  end
end
return renewed
"""


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


def chunks(items: list[str], size: int = CHUNK) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MissResolver:
    """Gets the vectors of one call's cache misses; one instance per call."""

    def __init__(
        self,
        cache: redis.Redis,
        texts: dict[str, str],
        send: Callable[[list[str]], dict[str, list[str]]],
        lease_seconds: float,
        queue: str,
        hold_seconds: float = 0.0,
        broker: BrokerView | None = None,
    ) -> None:
        self.cache = cache
        self.texts = texts  # digest -> text, for every miss of the call
        self.send = send  # sends texts (by digest) to the workers; returns {task id: digests}
        self.broker = broker
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.hold_ms = max(self.lease_ms, int(hold_seconds * 1000))
        self.tick = lease_seconds / 4
        self.queue = queue
        self.token = uuid.uuid4().hex
        self.reply = keys.reply_key(self.token)
        self.pending: set[str] = set(texts)
        self.ours: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.failures: dict[str, str] = {}
        self.tasks: dict[str, list[str]] = {}  # tasks we sent whose texts we still wait for
        self.suspects: set[str] = set()  # tasks the broker did not hold at the last tick
        self._renew = cache.register_script(RENEW_SCRIPT)
        self.last_id: Any = "0-0"
        self.missed = 0  # texts the first cache read did not find
        self.sent = 0  # texts sent to workers, resends included
        self.waited = 0  # missing texts first claimed by another producer

    def run(self, deadline: float | None) -> None:
        """Resolve until nothing is pending or ``deadline`` (monotonic) passes."""
        self._read(list(self.texts))  # (1) the cache: hits need no claim, no stream, no worker
        self.missed = len(self.pending)
        if not self.pending:
            return
        try:
            self._open_reply()
            self._take([d for d in self.texts if d in self.pending])  # (2) claim, (3) send
            self.waited = len([d for d in self.pending if d not in self.ours])
            last_progress = last_tick = time.monotonic()
            while self.pending:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return
                wait = self.tick - (now - last_tick)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                before = len(self.pending)
                if wait > 0:
                    self._receive(wait)
                if time.monotonic() - last_tick >= self.tick:
                    self._on_tick()
                    last_tick = time.monotonic()
                if len(self.pending) < before:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress >= STALL_LOG_SECONDS:
                    log.warning(
                        "%d texts still pending with no progress for %.0fs: is a worker consuming queue %r?",
                        len(self.pending),
                        time.monotonic() - last_progress,
                        self.queue,
                    )
                    last_progress = time.monotonic()
        finally:
            if self.pending:
                self._hold_claims()
            self._unwatch(list(self.pending))
            self.cache.delete(self.reply)

    def _hold_claims(self) -> None:
        """Leaving with work queued (a timeout): keep our claims for as long as a
        queued task may take, so that a retry waits for it instead of sending it again."""
        ours = [d for d in self.ours if d in self.pending]
        for part in chunks(ours):
            self._renew(keys=[keys.inflight_key(d) for d in part], args=[self.token, self.hold_ms])

    def _open_reply(self) -> None:
        """Create the reply stream; workers add with NOMKSTREAM, so a notice
        that comes after this call returned cannot leave an orphan key behind."""
        pipe = self.cache.pipeline(transaction=False)
        pipe.xadd(self.reply, {"hello": b""})
        pipe.pexpire(self.reply, 2 * self.lease_ms)
        self.last_id = pipe.execute()[0]

    def _take(self, digests: list[str]) -> None:
        """Watch, claim, read again, and send what this producer now owns."""
        watch_ttl = 2 * self.lease_ms
        claimed: list[str] = []
        for part in chunks(digests):
            pipe = self.cache.pipeline(transaction=False)
            for d in part:
                pipe.sadd(keys.watch_key(d), self.reply)
                pipe.pexpire(keys.watch_key(d), watch_ttl)
            for d in part:
                pipe.set(keys.inflight_key(d), self.token, nx=True, px=self.lease_ms)
            replies = pipe.execute()[2 * len(part) :]
            claimed += [d for d, ok in zip(part, replies, strict=True) if ok]
            # A pipeline retried after a lost connection answers "not set" for the claims
            # its first attempt made: the marker holding our token says they are ours.
            refused = [d for d, ok in zip(part, replies, strict=True) if not ok]
            if refused:
                holders = self.cache.mget([keys.inflight_key(d) for d in refused])
                token = self.token.encode()
                claimed += [d for d, holder in zip(refused, holders, strict=True) if holder == token]
        self.ours.update(claimed)
        found = self._read(digests)
        if found & set(claimed):
            self._release(sorted(found & set(claimed)))
        self._unwatch(sorted(found))  # no notice will come for what the second read found
        to_send = [d for d in claimed if d in self.pending]
        for d in to_send:
            self.attempts[d] = self.attempts.get(d, 0) + 1
        if to_send:
            self.sent += len(to_send)
            try:
                self.tasks.update(self.send(to_send))
            except BaseException:
                self._release(to_send)  # let other producers take them at once, not after the lease
                raise

    def _read(self, digests: list[str]) -> set[str]:
        """Read vectors from the cache; those found are resolved. Returns the found digests."""
        found: set[str] = set()
        for part in chunks(digests):
            values = cast(list[bytes | None], self.cache.mget([keys.vector_key(d) for d in part]))
            matrix, valid = unpack_many(values)
            for d, row, ok in zip(part, matrix, valid, strict=False):
                if ok and d in self.pending:
                    self.vectors[d] = row
                    self.pending.discard(d)
                    found.add(d)
        return found

    def _unwatch(self, digests: list[str]) -> None:
        for part in chunks(digests):
            pipe = self.cache.pipeline(transaction=False)
            for d in part:
                pipe.srem(keys.watch_key(d), self.reply)
            pipe.execute()

    def _release(self, digests: list[str]) -> None:
        self.cache.delete(*(keys.inflight_key(d) for d in digests))
        self.ours.difference_update(digests)

    def _receive(self, wait: float) -> None:
        """Block (at most ``MAX_BLOCK`` per round trip) for notices and handle them."""
        block_ms = max(1, int(min(wait, MAX_BLOCK) * 1000))
        self._handle(self.cache.xread({self.reply: self.last_id}, count=NOTICES_PER_READ, block=block_ms))

    def _drain(self) -> None:
        """Handle the notices already waiting, without blocking."""
        self._handle(self.cache.xread({self.reply: self.last_id}, count=NOTICES_PER_READ))

    def _handle(self, response: Any) -> None:
        raw: list[bytes] = []
        for _stream, entries in stream_entries(response):
            for entry_id, fields in entries:
                self.last_id = entry_id
                if b"n" in fields:
                    raw.append(fields[b"n"])
        if not raw:
            return
        self.cache.xtrim(self.reply, minid=self.last_id)  # read notices need no memory
        done: list[str] = []
        for item in raw:
            ok, failed = unpack_notice(item)
            done.extend(d for d in ok if d in self.pending)
            for d, reason in failed.items():
                if d in self.pending:
                    self.failures[d] = reason
                    self.pending.discard(d)
        if not done:
            return
        found = self._read(done)
        vanished = [d for d in done if d not in found and d in self.pending]
        if vanished:
            self._retry(
                vanished,
                "its vector was not in the cache after the worker wrote it (is the cache Redis out of memory?)",
            )

    def _retry(self, digests: list[str], why: str) -> None:
        retry = []
        for d in digests:
            if self.attempts.get(d, 0) >= MAX_ATTEMPTS:
                self.failures[d] = f"gave up after {MAX_ATTEMPTS} attempts: {why}"
                self.pending.discard(d)
            else:
                retry.append(d)
        if retry:
            log.warning("retrying %d texts: %s", len(retry), why)
            self.ours.difference_update(retry)
            self._take(retry)

    def _on_tick(self) -> None:
        """Renew what we hold, keep our keys alive, take over texts whose claim vanished.

        A claim vanishes when its producer died (the lease expired) or when the
        cache Redis lost its data (a restart without persistence, which also
        loses queued tasks): either way, whoever still waits claims and sends again.
        """
        ours = [d for d in self.ours if d in self.pending]
        for part in chunks(ours):
            self._renew(keys=[keys.inflight_key(d) for d in part], args=[self.token, self.lease_ms])
        if not self.cache.pexpire(self.reply, 2 * self.lease_ms):
            self._open_reply()
        pending = list(self.pending)
        orphaned: list[str] = []
        for part in chunks(pending):
            pipe = self.cache.pipeline(transaction=False)
            for d in part:
                pipe.pexpire(keys.watch_key(d), 2 * self.lease_ms)
                pipe.exists(keys.inflight_key(d))
            replies = pipe.execute()
            orphaned += [d for d, exists in zip(part, replies[1::2], strict=True) if not exists]
        if orphaned:
            self._drain()  # a notice may explain why the marker is gone
            orphaned = [d for d in orphaned if d in self.pending]
        if orphaned:
            log.info("taking over %d texts whose claim vanished", len(orphaned))
            self.ours.difference_update(orphaned)
            self._take(orphaned)
        self._resend_lost()

    def _awaited(self, task_id: str) -> list[str]:
        return [d for d in self.tasks[task_id] if d in self.pending and d in self.ours]

    def _resend_lost(self) -> None:
        """Send again the texts of tasks the broker has held at neither of two ticks.

        Two looks apart, because a task is briefly in neither place while a worker
        moves it from the queue to its unacked hash; a task finished in the
        meantime has left its notice, which is read before anything is resent.
        """
        self.tasks = {t: ds for t in self.tasks if (ds := self._awaited(t))}
        held = self.broker.held(sorted(self.tasks)) if self.broker and self.tasks else None
        if held is None:
            self.suspects.clear()
            return
        missing = set(self.tasks) - held
        if missing & self.suspects:
            self._drain()
        lost = [t for t in missing & self.suspects if self._awaited(t)]
        self.suspects = missing - set(lost)
        if lost:
            digests = [d for t in lost for d in self._awaited(t)]
            for t in lost:
                del self.tasks[t]
            self._retry(digests, "their task left the broker unanswered (lost, or failed by a worker: see its log)")
