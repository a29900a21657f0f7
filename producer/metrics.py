"""Prometheus counters of the producer library, in the default registry.

An ETL job or service that exposes its own ``/metrics`` (``prometheus_client.
start_http_server``) shows them with no further code.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CACHE_HITS = Counter("embq_client_cache_hits", "Unique texts of a call found in the cache", ["model"])
CACHE_MISSES = Counter("embq_client_cache_misses", "Unique texts of a call not in the cache", ["model"])
TEXTS_SENT = Counter("embq_client_texts_sent", "Texts sent to workers, resends included", ["model"])
TEXTS_WAITED = Counter(
    "embq_client_texts_waited", "Missing texts another producer was computing: waited for, not sent", ["model"]
)
WAIT_SECONDS = Histogram(
    "embq_client_wait_seconds",
    "Seconds a call with misses waited for their vectors",
    ["model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
)


def count_call(model: str, cached: int, computed: int, waited: int, failed: int, seconds: float) -> None:
    """One finished call: distinct texts found cached, computed by its client's tasks, computed for
    another producer, failed; and how long it waited when it had misses."""
    missed = computed + waited + failed
    CACHE_HITS.labels(model).inc(cached)
    CACHE_MISSES.labels(model).inc(missed)
    TEXTS_SENT.labels(model).inc(computed)
    TEXTS_WAITED.labels(model).inc(waited)
    if missed:
        WAIT_SECONDS.labels(model).observe(seconds)
