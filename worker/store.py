"""Writing a task's results: one ``COMPLETE`` script stores the vectors, clears the markers and notifies.

The owner's notice (the vectors themselves) is added in the same script that
stores them and clears the markers; watchers (other producers waiting for some
of the texts) are read in that script too and notified right after. A producer
that starts watching after the script finds the vectors cached. No wakeup is lost.
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
        self._complete = cache.register_script(protocol.COMPLETE)

    def store(
        self,
        reply: str,
        done: list[str],
        values: bytes,
        width: int,
        failures: dict[str, str],
        cached: list[str] | None = None,
    ) -> int:
        """Write the vectors of ``done`` (``values``: their packed vectors end to end, ``width`` bytes each),
        report ``failures``, tell the owner (``reply``) and the watchers; ``cached`` digests needed no work
        and are reported as done. Returns the number of watchers told."""
        stored = len(done)
        if cached:
            known = set(done)
            extra = [d for d in cached if d not in known]
            if extra:  # their values are in the cache: read them so that the owner needs no round trip
                found: list[bytes | None] = self.cache.mget([keys.vector_key(d) for d in extra])  # type: ignore[assignment]
                done = done + [d for d, v in zip(extra, found, strict=True) if v is not None]
                values = values + b"".join(v for v in found if v is not None)
        failed = {d: r for d, r in failures.items() if d not in set(done)}
        fields = protocol.notice_fields(done, values, failed)
        args: list[bytes | str | int] = [
            self.ttl, reply, self.stats, stored, width, fields["d"], values, "".join(failed), fields["f"]
        ]  # fmt: skip
        try:
            watched = self._complete(args=args)
        except redis.exceptions.ResponseError as e:
            # The server's reason only: the arguments (vectors) never reach a message or a log.
            raise BackendUnavailableError(f"the cache Redis refused the results: {refusal(e)}") from None
        metrics.CACHE_WRITES.inc(stored)
        if watched:
            self._tell_watchers(watched, done, values, failed)
        return len(watched) // 2

    def _tell_watchers(self, watched: list[Any], done: list[str], values: bytes, failed: dict[str, str]) -> None:
        """Other producers wait for some of these texts: each gets a notice with its vectors."""
        offsets = split_values(values, len(done))
        index = {d: i for i, d in enumerate(done)}
        pipe = self.cache.pipeline(transaction=False)
        for watcher, digests in protocol.watchers_of(watched, [*done, *failed]).items():
            ok = [d for d in digests if d in index]
            notice = protocol.notice_fields(
                ok, b"".join(offsets[index[d]] for d in ok), {d: failed[d] for d in digests if d in failed}
            )
            # NOMKSTREAM: a producer that has already returned deleted its stream; recreating it would leak.
            pipe.xadd(watcher, notice, nomkstream=True)  # type: ignore[arg-type]
        pipe.execute()


def split_values(values: bytes, count: int) -> list[bytes]:
    """Packed values laid end to end, apart again (each says its own size in its header)."""
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
