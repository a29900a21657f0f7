"""``embq status``: queue depth per model and the workers' counters, in one screen."""

from __future__ import annotations

from typing import Any, cast

from producer import keys
from producer.backend import backend_errors, connect
from producer.settings import Settings


def _name(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def render_status(settings: Settings) -> str:
    """One screen of text; SCANs only embq's own queue and stats keys, never the vectors."""
    broker, cache = connect(settings.broker), connect(settings.cache)
    with backend_errors("broker", settings.broker):
        queues = {
            _name(key)[len(keys.QUEUE_PREFIX) :]: cast(int, broker.llen(key))
            for key in broker.scan_iter(match=keys.QUEUE_PREFIX + "*", _type="list")
        }
    with backend_errors("cache", settings.cache):
        stats = {
            _name(key)[len(keys.STATS) :]: {_name(k): int(v) for k, v in cast(dict, cache.hgetall(key)).items()}
            for key in cache.scan_iter(match=keys.STATS + "*")
        }
        info = cast(dict, cache.info("stats"))
        memory = cast(dict, cache.info("memory"))
        size = cast(int, cache.dbsize())
    lines = [f"{'model':<48} {'queued':>10} {'tasks':>10} {'texts':>12} {'failed':>8}"]
    for model in sorted(set(queues) | set(stats)):
        s = stats.get(model, {})
        lines.append(
            f"{model:<48} {queues.get(model, 0):>10} {s.get('tasks', 0):>10} "
            f"{s.get('texts', 0):>12} {s.get('failed', 0):>8}"
        )
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
    rate = f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"
    lines += [
        "",
        f"cache: {size} keys, {memory.get('used_memory_human', '?')} used, "
        f"policy {memory.get('maxmemory_policy', '?')}, Redis hit rate {rate}",
        "",
    ]
    return "\n".join(lines)
