"""``embq status``: queue depth per model and the workers' counters, in one screen."""

from __future__ import annotations

from producer import keys
from producer.backend import backend_errors, connect
from producer.settings import Settings


def render_status(settings: Settings) -> str:
    broker, cache = connect(settings.broker), connect(settings.cache)
    rows = []
    with backend_errors("broker", settings.broker):
        queues = {
            key.decode()[len(keys.QUEUE_PREFIX):]: broker.llen(key)
            for key in broker.scan_iter(match=keys.QUEUE_PREFIX + "*", _type="list")
        }
    with backend_errors("cache", settings.cache):
        stats = {
            key.decode()[len(keys.STATS):]: {k.decode(): int(v) for k, v in cache.hgetall(key).items()}
            for key in cache.scan_iter(match=keys.STATS + "*")
        }
        vectors = sum(1 for _ in cache.scan_iter(match=keys.VECTOR + "*", count=10_000))
    for model in sorted(set(queues) | set(stats)):
        s = stats.get(model, {})
        rows.append(f"{model:<48} {queues.get(model, 0):>10} {s.get('tasks', 0):>10} "
                    f"{s.get('texts', 0):>12} {s.get('failed', 0):>8}")
    header = f"{'model':<48} {'queued':>10} {'tasks':>10} {'texts':>12} {'failed':>8}"
    return "\n".join([header, *rows, "", f"cached vectors: {vectors}", ""])
