"""Writing a task's results in one round trip: the vectors over their claims, then the owner's notice.
(A task that waits long hands over the rows done so far the same way, a round trip each: ``HAND_OVER_EVERY``.)

Every vector is written with ``SET key value EX ttl GET``: the value it replaces
is the text's claim, whose flag says whether another producer watches it. The
owner's notice (carrying the vectors) follows the writes on the same connection,
so whoever reads it finds them cached. Watchers are told right after; one that
starts watching after the write finds the vector itself. No wakeup is lost.

The writes are packed here, one buffer for the whole task, because they all have
one shape: redis-py packs a command in a few microseconds of Python, a script
costs Redis several per text, and this costs well under one. Texts that failed
go through the ``RELEASE`` script (rare), which deletes their claims.

The model's counters (``embq status``'s model row) and the worker's own count
of texts stored (its row) move in that same round trip, so that the two rows
agree at every moment rather than a heartbeat apart.
"""

from __future__ import annotations

from typing import Any

import redis

from embq.producer import codec, keys, protocol
from embq.producer.backend import redis_reason
from embq.producer.cluster import CacheClient, is_cluster, look, per_node, release
from embq.producer.errors import BackendUnavailableError
from embq.worker import metrics

#: Adds to the ``stored`` count of a worker's heartbeat hash, only while the hash exists: a store after
#: the heartbeat's last word (a shutdown's final tasks) must not leave a worker without a TTL behind.
COUNT_STORED = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'stored', ARGV[1]) end"


class ResultStore:
    """The worker's side of ``embq.producer.protocol``; one per worker process. ``worker`` names the
    heartbeat hash whose ``stored`` count follows the model's ``texts``."""

    def __init__(self, cache: CacheClient, model: str, ttl: int, worker: str = "") -> None:
        self.cache = cache
        self.ttl = ttl
        self.stats = keys.stats_key(model)
        self.worker = keys.worker_key(worker) if worker else ""

    def store(
        self,
        reply: str,
        done: list[str],
        values: bytes | memoryview,
        width: int,
        failures: dict[str, str],
        cached: list[str] | None = None,
        task: str = "",
        abandoned: int = 0,
        lane: str = keys.INTERACTIVE,
        ends_task: bool = True,
    ) -> int:
        """Write the vectors of ``done`` (``values``: their packed vectors end to end, ``width`` bytes each),
        report ``failures``, tell the owner (``reply``, for its ``task``) and the watchers; ``cached``
        digests needed no work and are reported as done. ``ends_task``: false for the rows a task hands over
        while it runs (the model's task count moves once a task). Returns the number of watchers told."""
        stored = len(done)
        if cached:
            known = set(done)
            extra = [d for d in cached if d not in known]
            if extra:  # their values are in the cache: read them so that the owner needs no round trip
                found = look(self.cache, extra)
                done = done + [d for d, v in zip(extra, found, strict=True) if v is not None]
                values = b"".join([values, *(v for v in found if v is not None)])
        stored_now = set(done)
        failed = {d: r for d, r in failures.items() if d not in stored_now}
        told: dict[bytes, list[str]] = {}
        try:
            if failed:
                owner = reply[len(keys.REPLY) :] if reply else ""
                released = release(self.cache, owner, list(failed))
                told = protocol.watchers_of(released, list(failed))
            old = self._write(reply, task, done, values, width, stored, failed, abandoned, lane, ends_task)
        except redis.exceptions.ResponseError as e:
            # The server's reason only: the arguments (vectors) never reach a message or a log.
            raise BackendUnavailableError(f"the cache Redis refused the results: {refusal(e)}") from None
        metrics.CACHE_WRITES.inc(stored)
        flagged = [d for d, value in zip(done, old, strict=False) if protocol.watched(value)]
        if flagged:
            pipe = self.cache.pipeline(transaction=False)
            for digest in flagged:
                pipe.smembers(keys.watch_key(digest))
                pipe.delete(keys.watch_key(digest))
            for digest, watchers in zip(flagged, pipe.execute()[::2], strict=True):
                for watcher in watchers:
                    told.setdefault(watcher, []).append(digest)
        if told:
            self._tell(told, done, values, failed)
        return len(told)

    def _write(
        self,
        reply: str,
        task: str,
        done: list[str],
        values: bytes | memoryview,
        width: int,
        stored: int,
        failed: dict[str, str],
        abandoned: int = 0,
        lane: str = keys.INTERACTIVE,
        ends_task: bool = True,
    ) -> list[Any]:
        """One round trip: the SETs, the owner's notice, the counters. Returns what the SETs replaced.
        On a cluster, one round trip per node for the SETs, then the notice and the counters."""
        commands: list[tuple[Any, ...]] = []
        if reply:
            fields = protocol.notice_fields(done, values, failed, task=task)
            commands.append(("XADD", reply, "NOMKSTREAM", "*", *protocol.flat(fields)))
        counts = (("tasks", int(ends_task)), ("texts", stored), (f"texts_{lane}", stored), ("failed", len(failed)))
        for field, amount in (*counts, ("abandoned", abandoned)):
            commands.append(("HINCRBY", self.stats, field, amount))
        commands.append(("EXPIRE", self.stats, keys.STATS_TTL))
        if self.worker and stored:
            commands.append(("EVAL", COUNT_STORED, 1, self.worker, stored))
        if not is_cluster(self.cache):
            sets = pack_sets(done[:stored], values, width, self.ttl) if stored else b""
            return send_packed(self.cache, sets, stored, commands)[:stored]  # type: ignore[arg-type]
        old = self._write_on_nodes(done[:stored], values, width) if stored else []
        pipe = self.cache.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()
        return old

    def _write_on_nodes(self, digests: list[str], values: bytes | memoryview, width: int) -> list[Any]:
        view = memoryview(values)

        def write(node: redis.Redis, indices: list[int]) -> list[Any]:
            part = b"".join(view[i * width : (i + 1) * width] for i in indices)
            return send_packed(node, pack_sets([digests[i] for i in indices], part, width, self.ttl), len(indices), [])

        return per_node(self.cache, [keys.vector_key(d) for d in digests], write)  # type: ignore[arg-type]

    def _tell(
        self, told: dict[bytes, list[str]], done: list[str], values: bytes | memoryview, failed: dict[str, str]
    ) -> None:
        """Other producers wait for some of these texts: each gets a notice with its vectors."""
        offsets = split_values(values, len(done))
        index = {d: i for i, d in enumerate(done)}
        pipe = self.cache.pipeline(transaction=False)
        for watcher, digests in told.items():
            ok = [d for d in digests if d in index]
            notice = protocol.notice_fields(
                ok, b"".join(offsets[index[d]] for d in ok), {d: failed[d] for d in digests if d in failed}
            )
            # NOMKSTREAM: a producer that has already returned deleted its stream; recreating it would leak.
            pipe.xadd(watcher, notice, nomkstream=True)  # type: ignore[arg-type]
        pipe.execute()


def send_packed(client: redis.Redis, sets: bytes, count: int, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``sets`` (``count`` packed commands) then ``commands`` on one connection, in one round trip; every
    reply read, errors included, so that the connection stays in step; the first error raised after."""
    connection = client.connection_pool.get_connection()
    try:
        packed: list[bytes | memoryview] = [sets] if count else []
        for command in commands:
            packed += connection.pack_command(*command)
        connection.send_packed_command(packed)
        replies: list[Any] = []
        error: redis.exceptions.ResponseError | None = None
        for _ in range(count + len(commands)):
            try:
                replies.append(connection.read_response())
            except redis.exceptions.ResponseError as e:
                error = error or e
                replies.append(None)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        client.connection_pool.release(connection)
    if error is not None:
        raise error
    return replies


def pack_sets(digests: list[str], values: bytes | memoryview, width: int, ttl: int) -> bytes:
    """``SET embq:v:{digest} value EX ttl GET`` for each text, in the Redis protocol, in one buffer."""
    head = b"*6\r\n$3\r\nSET\r\n$%d\r\n%s" % (len(keys.VECTOR) + keys.DIGEST_HEX, keys.VECTOR.encode())
    middle = b"\r\n$%d\r\n" % width
    tail = b"\r\n$2\r\nEX\r\n$%d\r\n%d\r\n$3\r\nGET\r\n" % (len(str(ttl)), ttl)
    view = memoryview(values)
    parts: list[bytes | memoryview] = []
    for i, digest in enumerate(digests):
        parts += (head, digest.encode(), middle, view[i * width : (i + 1) * width], tail)
    return b"".join(parts)


def split_values(values: bytes | memoryview, count: int) -> list[bytes]:
    """Packed values laid end to end, apart again (each says its own size in its header)."""
    values = bytes(values)
    out: list[bytes] = []
    offset = 0
    for _ in range(count):
        size = codec.value_size(values, offset)
        out.append(values[offset : offset + size])
        offset += size
    return out


def refusal(error: redis.exceptions.RedisError) -> str:
    """Redis's reason for refusing a command, with what to do when it is a full cache."""
    reason = redis_reason(error)
    if isinstance(error, redis.exceptions.OutOfMemoryError) or "maxmemory" in reason:
        advice = "the cache is full and may not evict: give it maxmemory-policy allkeys-lru, as production caches have"
        reason = f"out of memory: {reason} ({advice}, or more memory)"
    return reason
