"""A dead worker's tasks back in the queue in seconds, not after the broker's visibility timeout.

Kombu keeps a message a worker took, and has not acked, in the broker's
``unacked`` hash until the visibility timeout (an hour by default) puts it back
in its queue. That timeout must exceed the longest task, so it cannot also be
how fast a dead worker's texts come back. So each worker keeps, in the broker,
what it holds (``keys.holding_key``: delivery tag -> queue, written before the
task runs) and a lease on it (``~until``, in the broker's own clock, renewed
every ``RENEW_SECONDS``). Every worker looks at the others' leases at
each renewal: one lapsed (``LEASE_MS``) is a dead worker, declared so by one
script, and each of its messages still unacked goes back to the head of its
queue in one transaction, as kombu restores it (the same message: same task id, so its producers keep waiting for
it, and the attempts hash's pass marks still name the suspects of the death).

Two live workers never compute one task: the script also enters the dead
worker in ``keys.DEAD_WORKERS``, and a worker that finds itself there at its
next renewal (it was frozen, or cut off from the broker, for longer than the
lapse) exits at once. A worker reclaims only after its own lease has held for
a whole lapse, so that after a broker restart every worker renews before any
judges another. The visibility timeout stays as the last resort, for what this
cannot see (a message taken and the worker killed before it was written down).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from embq.producer import keys
from embq.producer.backend import connect_once, redis_reason
from embq.producer.broker import UNACKED_KEY

log = logging.getLogger(__name__)

#: KEYS[1]: this worker's holdings hash, KEYS[2]: ``keys.HOLDERS``, KEYS[3]: ``keys.DEAD_WORKERS``.
#: ARGV[1]: this worker's name, ARGV[2]: the lease in ms. Renews the lease in the broker's clock;
#: returns 1 if this worker was declared dead meanwhile.
RENEW_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 1
end
redis.call('HSET', KEYS[1], '~until', ms + tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[1])
return 0
"""

#: KEYS[1]: ``keys.HOLDERS``, KEYS[2]: ``keys.DEAD_WORKERS``, KEYS[3]: ``keys.RECLAIMED``. ARGV[1]: the
#: holdings key prefix, ARGV[2]: ms a dead worker stays in ``DEAD_WORKERS`` (and ``RECLAIMED``).
#: Declares dead each worker whose lease lapsed (so that it exits if it ever wakes) and returns
#: ``{worker, {tag, queue, ...}}`` for each: what it held.
LAPSED_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ms - tonumber(ARGV[2]))
for _, worker in ipairs(forgotten) do
  redis.call('HDEL', KEYS[3], worker)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms - tonumber(ARGV[2]))
local lapsed = {}
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local holding = ARGV[1] .. worker
  local lease = tonumber(redis.call('HGET', holding, '~until') or '0')
  if lease < ms then
    redis.call('HDEL', holding, '~until')
    lapsed[#lapsed + 1] = worker
    lapsed[#lapsed + 1] = redis.call('HGETALL', holding)
    redis.call('DEL', holding)
    redis.call('SREM', KEYS[1], worker)
    redis.call('ZADD', KEYS[2], ms, worker)
  end
end
return lapsed
"""

#: Seconds between two renewals of a worker's lease, and how long the lease lasts: a dead worker's
#: tasks are back in their queue this long (and at most one renewal more) after its last renewal. Long
#: beside a renewal, so that a worker busy for a second is never taken for dead.
RENEW_SECONDS = 1.0
LEASE_MS = 10_000
#: Milliseconds a dead worker stays in ``keys.DEAD_WORKERS``: far longer than any freeze it could wake from.
DEAD_REMEMBERED_MS = 24 * 3600 * 1000


class Holdings:
    """What this worker holds in the broker, under a lease; the tasks of workers whose lease lapsed go back
    to their queues. ``on_dead`` runs when this worker finds itself declared dead (default: exit)."""

    def __init__(self, broker_url: str, name: str, on_dead: Callable[[], None] | None = None) -> None:
        self.client = connect_once(broker_url, timeout=2 * RENEW_SECONDS)
        self.name = name
        self.key = keys.holding_key(name)
        self.on_dead = on_dead or _exit_at_once
        self._lock = threading.Lock()
        self._tags: dict[str, str] = {}  # task id -> delivery tag, of the tasks we hold
        self._healthy_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embq-holdings", daemon=True)
        self._renew = self.client.register_script(RENEW_SCRIPT)
        self._lapsed = self.client.register_script(LAPSED_SCRIPT)

    def start(self) -> None:
        self.renew()
        self._thread.start()

    def took(self, task_id: str, tag: str, queue: str) -> None:
        """A message was delivered to us (before its task runs): written down at once, so that a kill a
        moment later still finds it."""
        with self._lock:
            self._tags[task_id] = tag
        try:
            self.client.hset(self.key, tag, queue)
        except redis.exceptions.RedisError as e:  # the visibility timeout still covers it
            log.debug("could not note a task taken: %s", redis_reason(e))

    def left(self, task_id: str) -> None:
        """A task ended (about to be acked, or back in its queue): not ours to give back any more."""
        with self._lock:
            tag = self._tags.pop(task_id, None)
        if tag is None:
            return
        try:
            self.client.hdel(self.key, tag)
        except redis.exceptions.RedisError as e:  # an unacked tag is the only one ever moved: harmless
            log.debug("could not note a task done: %s", redis_reason(e))

    def renew(self) -> None:
        """Renew our lease in the broker's clock; exit (``on_dead``) if we were declared dead meanwhile."""
        declared_dead = self._renew(keys=[self.key, keys.HOLDERS, keys.DEAD_WORKERS], args=[self.name, LEASE_MS])
        if declared_dead:
            log.critical(
                "this worker was declared dead (no lease renewal for %.0fs): its tasks went back to the queue "
                "for other workers; exiting at once so that no task is computed twice",
                LEASE_MS / 1000,
            )
            self.on_dead()

    def reclaim(self) -> dict[str, dict[str, int]]:
        """Put the unacked messages of workers whose lease lapsed back at the head of their queues;
        returns, per dead worker, the messages moved to each queue."""
        raw = self._lapsed(
            keys=[keys.HOLDERS, keys.DEAD_WORKERS, keys.RECLAIMED], args=[keys.HOLDING, DEAD_REMEMBERED_MS]
        )
        moved: dict[str, dict[str, int]] = {}
        for worker, fields in zip(raw[::2], raw[1::2], strict=True):
            name = _text(worker)
            held = {_text(tag): _text(queue) for tag, queue in zip(fields[::2], fields[1::2], strict=True)}
            moved[name] = self._restore(held) if held else {}
            self.client.hset(keys.RECLAIMED, name, json.dumps({"at": time.time(), "queues": moved[name]}))
            said = ", ".join(f"{n} to {q!r}" for q, n in moved[name].items()) or "none was still unacked"
            log.warning(
                "worker %s stopped renewing its lease (dead, or cut off for %.0fs): its tasks went back to their "
                "queues at once: %s",
                name,
                LEASE_MS / 1000,
                said,
            )
        return moved

    def _restore(self, held: dict[str, str]) -> dict[str, int]:
        """As kombu restores a message after the visibility timeout (``QoS.restore_by_tag``): marked
        redelivered, pushed where consumers pop next, out of the unacked hash, in one transaction."""
        tags = list(held)

        def restore(pipe: redis.client.Pipeline) -> dict[str, int]:
            found = pipe.hmget(UNACKED_KEY, tags)
            pipe.multi()
            queues: dict[str, int] = {}
            for tag, raw in zip(tags, found, strict=True):
                if raw is None:  # acked, or requeued, meanwhile
                    continue
                message = json.loads(raw)[0]
                message.get("headers", {})["redelivered"] = True
                message.get("properties", {}).get("delivery_info", {})["redelivered"] = True
                pipe.rpush(held[tag], json.dumps(message))
                queues[held[tag]] = queues.get(held[tag], 0) + 1
            pipe.hdel(UNACKED_KEY, *tags)
            pipe.zrem(UNACKED_KEY + "_index", *tags)
            return queues

        return self.client.transaction(restore, UNACKED_KEY, value_from_callable=True)  # type: ignore[no-any-return]

    def _run(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self.renew()
                now = time.monotonic()
                if self._healthy_since is None:
                    self._healthy_since = now
                if now - self._healthy_since >= LEASE_MS / 1000:
                    self.reclaim()
            except redis.exceptions.RedisError as e:
                self._healthy_since = None  # judge others only after a whole lapse of our own renewals
                log.debug("holdings renewal failed: %s", redis_reason(e))

    def stop(self) -> None:
        """A clean stop: Celery has acked or requeued what we held; nothing is left to reclaim."""
        self._stop.set()
        self._thread.join(5)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.srem(keys.HOLDERS, self.name)
            pipe.delete(self.key)
            pipe.execute()
        except redis.exceptions.RedisError:
            pass  # lapses, and is reclaimed (empty) by another worker
        self.client.close()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _exit_at_once() -> None:
    os._exit(EXIT_DECLARED_DEAD)


#: Exit status of a worker that found itself declared dead (its tasks were given to others).
EXIT_DECLARED_DEAD = 6
