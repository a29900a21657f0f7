"""Writing a task's results in one round trip: the vectors over their claims, then the owner's notice.

Every vector is written with ``SET key value EX ttl GET``: the value it replaces
is the text's claim, whose flag says whether another producer watches it. The
owner's notice (carrying the vectors) follows the writes on the same connection,
so whoever reads it finds them cached. Watchers are told right after; one that
starts watching after the write finds the vector itself. No wakeup is lost.

The writes are packed here, one buffer for the whole task, because they all have
one shape: redis-py packs a command in a few microseconds of Python, a script
costs Redis several per text, and this costs well under one. Texts that failed
go through the ``RELEASE`` script (rare), which deletes their claims.
"""

from __future__ import annotations

from typing import Any

import redis

from producer import codec, keys, protocol
from producer.backend import redis_reason
from producer.errors import BackendUnavailableError
from worker import metrics


class ResultStore:
    """The worker's side of ``producer.protocol``; one per worker process."""

    def __init__(self, cache: redis.Redis, model: str, ttl: int) -> None:
        self.cache = cache
        self.ttl = ttl
        self.stats = keys.stats_key(model)
        self._release = cache.register_script(protocol.RELEASE)

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
    ) -> int:
        """Write the vectors of ``done`` (``values``: their packed vectors end to end, ``width`` bytes each),
        report ``failures``, tell the owner (``reply``, for its ``task``) and the watchers; ``cached``
        digests needed no work and are reported as done. Returns the number of watchers told."""
        stored = len(done)
        if cached:
            known = set(done)
            extra = [d for d in cached if d not in known]
            if extra:  # their values are in the cache: read them so that the owner needs no round trip
                found: list[bytes | None] = self.cache.mget([keys.vector_key(d) for d in extra])  # type: ignore[assignment]
                done = done + [d for d, v in zip(extra, found, strict=True) if v is not None]
                values = b"".join([values, *(v for v in found if v is not None)])
        stored_now = set(done)
        failed = {d: r for d, r in failures.items() if d not in stored_now}
        told: dict[bytes, list[str]] = {}
        try:
            if failed:
                owner = reply[len(keys.REPLY) :] if reply else ""
                released = self._release(args=[owner, "".join(failed)])
                told = protocol.watchers_of(released, list(failed))
            old = self._write(reply, task, done, values, width, stored, failed, abandoned, lane)
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
    ) -> list[Any]:
        """One round trip: the SETs, the owner's notice, the counters. Returns what the SETs replaced."""
        connection = self.cache.connection_pool.get_connection()
        try:
            commands: list[bytes | memoryview] = [pack_sets(done[:stored], values, width, self.ttl)] if stored else []
            count = stored
            if reply:
                fields = protocol.notice_fields(done, values, failed, task=task)
                commands += connection.pack_command("XADD", reply, "NOMKSTREAM", "*", *protocol.flat(fields))
                count += 1
            counts = (("tasks", 1), ("texts", stored), (f"texts_{lane}", stored), ("failed", len(failed)))
            for field, amount in (*counts, ("abandoned", abandoned)):
                commands += connection.pack_command("HINCRBY", self.stats, field, amount)
            commands += connection.pack_command("EXPIRE", self.stats, keys.STATS_TTL)
            count += 6
            connection.send_packed_command(commands)
            replies: list[Any] = []
            error: redis.exceptions.ResponseError | None = None
            for _ in range(count):  # read every reply, errors included, so the connection stays in step
                try:
                    replies.append(connection.read_response())
                except redis.exceptions.ResponseError as e:
                    error = error or e
                    replies.append(None)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self.cache.connection_pool.release(connection)
        if error is not None:
            raise error
        return replies[:stored]

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
