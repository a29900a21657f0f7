"""``embq cache clear``: empty the vector cache, never the queue.

On embedded defaults the private Redis's files in ``EMBQ_HOME`` go (every
engine's), once no ``embq embed`` uses them. With a configured Redis
(``EMBQ_REDIS_URL``/``EMBQ_CACHE_URL``) the keys of ``embq.producer.keys.CACHE_PATTERNS``
are found with SCAN and removed with UNLINK, a thousand at a time: never
FLUSHALL, never a broker key, never the statistics.

One model's vectors cannot be told apart from another's: a key is a hash of
model, namespace, instruction and text, and a value holds only the vector. So
there is no per-model clear; a model's vectors expire after ``EMBQ_CACHE_TTL``,
and a new ``EMBQ_CACHE_NAMESPACE`` starts every model afresh.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from embq.producer import keys
from embq.producer.backend import backend_errors, probe, redact
from embq.producer.cluster import CacheClient, connect_cache
from embq.producer.settings import Settings
from embq.worker.home import HomeLock

#: Keys per SCAN step and per UNLINK.
STEP = 1000


def clear_keys(cache: CacheClient) -> int:
    """UNLINK every key of ``CACHE_PATTERNS``; returns how many went. On a cluster SCAN visits every
    master and UNLINK is split by slot (redis-py's cluster client)."""
    removed = 0
    for pattern in keys.CACHE_PATTERNS:
        found: list[bytes] = []
        for key in cache.scan_iter(match=pattern, count=STEP):
            found.append(key)
            if len(found) >= STEP:
                removed += int(cache.unlink(*found))  # type: ignore[arg-type]
                found = []
        if found:
            removed += int(cache.unlink(*found))  # type: ignore[arg-type]
    return removed


def clear_configured(settings: Settings, say: Callable[[str], None]) -> None:
    probe("cache", settings.cache, settings.origin("cache"))  # nothing listens: say so now, not after retries
    with backend_errors("cache", settings.cache, settings.origin("cache")):
        cache = connect_cache(settings.cache)
        try:
            removed = clear_keys(cache)
        finally:
            cache.close()
    say(f"removed {removed:,} cache keys from {redact(settings.cache)}")


def clear_home(home: Path, say: Callable[[str], None]) -> None:
    """Remove the private Redis files of every engine under ``home``, each under its lock (never waiting)."""
    cleared = 0
    for directory in sorted(p for p in home.iterdir() if p.is_dir()) if home.is_dir() else []:
        lock = HomeLock(directory)
        if not lock.path.exists():
            continue
        lock.acquire(wait=False)
        try:
            for item in directory.iterdir():
                if item != lock.path:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            cleared += 1
        finally:
            lock.release()
    say(f"cleared the private cache in {home}" if cleared else f"nothing cached in {home}")
