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


def store_results(
    cache: redis.Redis,
    model: str,
    values: dict[str, bytes],
    failures: dict[str, str],
    ttl: int,
) -> int:
    """Write ``values`` (digest -> packed vector), report ``failures``; returns notices sent."""
    digests = list(values) + [d for d in failures if d not in values]
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
    watchers_of = replies[len(values) : len(values) + 3 * len(digests)][1::3]
    done: dict[bytes, list[str]] = defaultdict(list)
    failed: dict[bytes, dict[str, str]] = defaultdict(dict)
    for digest, watchers in zip(digests, watchers_of, strict=False):
        for watcher in watchers:
            if digest in values:
                done[watcher].append(digest)
            else:
                failed[watcher][digest] = failures[digest]
    if not done and not failed:
        return 0
    pipe = cache.pipeline(transaction=False)
    for watcher in set(done) | set(failed):
        # NOMKSTREAM: a producer that has already returned deleted its stream; recreating it would leak.
        pipe.xadd(watcher, {"n": pack_notice(done.get(watcher, []), failed.get(watcher, {}))}, nomkstream=True)
    pipe.execute()
    return len(set(done) | set(failed))
