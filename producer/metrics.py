"""Prometheus counters of the producer library, in the default registry.

An ETL job or service that exposes its own ``/metrics`` (``prometheus_client.
start_http_server``) shows them with no further code.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from embq.producer import l1

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


class L1Collector:
    """The L1 counters of every client in the process (``embq.producer.l1.live``), summed by model and
    read at scrape time: the hot path counts with plain integers under the lock it already holds."""

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, list[int]] = {}
        for cache in l1.live():
            s = cache.stats()
            row = totals.setdefault(cache.model, [0] * 6)
            for i, value in enumerate((s.hits, s.misses, s.evictions, s.invalidations, s.bytes, s.entries)):
                row[i] += value
        labels = ["model"]
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily("embq_client_l1_hits", "Texts answered from the in-process L1", labels=labels),
            CounterMetricFamily("embq_client_l1_misses", "Texts looked up in the L1 and not found", labels=labels),
            CounterMetricFamily("embq_client_l1_evictions", "L1 entries evicted to stay in bounds", labels=labels),
            CounterMetricFamily("embq_client_l1_invalidations", "Times the L1 was emptied", labels=labels),
            GaugeMetricFamily("embq_client_l1_bytes", "Bytes the L1 holds (bounded by EMBQ_L1_BYTES)", labels=labels),
            GaugeMetricFamily("embq_client_l1_entries", "Vectors the L1 holds", labels=labels),
        ]
        for model, row in totals.items():
            for family, value in zip(families, row, strict=True):
                family.add_metric([model], value)
        yield from families


REGISTRY.register(L1Collector())
