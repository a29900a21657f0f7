"""Writing results: vectors with their TTL, markers cleared, watchers notified.

The write, the marker deletion and the read of the watchers happen in one
MULTI/EXEC transaction, in that order. A producer that registers as a watcher
after the transaction finds the vector on its own second read; one that
registered before is in the set we read and gets a notice. No wakeup is lost.
"""

from __future__ import annotations

from collections import defaultdict

import redis

from producer import keys
from producer.contract import pack_notice
from worker import metrics


def store_results(
    cache: redis.Redis,
    model: str,
    values: dict[str, bytes],
    failures: dict[str, str],
    ttl: int,
    cached: list[str] | None = None,
) -> int:
    """Write ``values`` (digest -> packed vector), report ``failures`` and the ``cached``
    digests that needed no work; returns the notices sent."""
    done = list(values) + [d for d in cached or () if d not in values]
    digests = done + [d for d in failures if d not in values]
    pipe = cache.pipeline(transaction=True)
    for digest, value in values.items():
        pipe.set(keys.vector_key(digest), value, ex=ttl)
    for digest in digests:
        pipe.delete(keys.inflight_key(digest))
        pipe.smembers(keys.watch_key(digest))
        pipe.delete(keys.watch_key(digest))
    stats = keys.stats_key(model)
    pipe.hincrby(stats, "texts", len(values))
    pipe.hincrby(stats, "failed", len(failures))
    pipe.hincrby(stats, "tasks", 1)
    pipe.expire(stats, keys.STATS_TTL)
    replies = pipe.execute()
    metrics.CACHE_WRITES.inc(len(values))
    watchers_of = replies[len(values) : len(values) + 3 * len(digests)][1::3]
    done_for: dict[bytes, list[str]] = defaultdict(list)
    failed_for: dict[bytes, dict[str, str]] = defaultdict(dict)
    for digest, watchers in zip(digests, watchers_of, strict=True):
        for watcher in watchers:
            if digest in failures and digest not in values:
                failed_for[watcher][digest] = failures[digest]
            else:
                done_for[watcher].append(digest)
    watchers = set(done_for) | set(failed_for)
    if not watchers:
        return 0
    pipe = cache.pipeline(transaction=False)
    for watcher in watchers:
        notice = pack_notice(done_for.get(watcher, []), failed_for.get(watcher, {}))
        # NOMKSTREAM: a producer that has already returned deleted its stream; recreating it would leak.
        pipe.xadd(watcher, {"n": notice}, nomkstream=True)
    pipe.execute()
    return len(watchers)
