"""Prometheus metrics of one worker process, served on ``EMBQ_METRICS_PORT``.

One engine per process, so the process is the unit: Prometheus adds the pod
or host as target labels, and ``embq_worker_info`` names the model and engine.
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

#: Error kinds counted in ``embq_errors_total``.
ITEM, OUT_OF_MEMORY, ENGINE_DEAD, REFUSED, WORKER = "item", "out_of_memory", "engine_dead", "refused", "worker"

WORKER_INFO = Info("embq_worker", "Model and engine this worker serves")
TEXTS_EMBEDDED = Counter("embq_texts_embedded", "Texts embedded by the engine")
TOKENS_EMBEDDED = Counter(
    "embq_tokens_embedded", "Tokens embedded: counted by the engine where it reports them, else characters / 4"
)
PASS_TOKENS = Counter(
    "embq_pass_tokens", "Real tokens of the texts in engine passes (the tokenizer's count where known)"
)
PASS_PADDED_TOKENS = Counter(
    "embq_pass_padded_tokens",
    "Tokens the engine computed for those passes: longest text x texts for padded passes, else the real ones",
)
ENGINE_BUSY_SECONDS = Counter(
    "embq_engine_busy_seconds", "Seconds with at least one pass in the engine: its rate is the device's busy share"
)
DEVICE_SECONDS = Counter(
    "embq_device_seconds", "Device time of the passes, where the engine knows it (the hash engine's simulated device)"
)
BACKLOG_TEXTS = Gauge("embq_backlog_texts", "Texts the worker holds that no pass has taken yet", ["lane"])
BACKLOG_TOKENS = Gauge("embq_backlog_tokens", "Tokens of those texts", ["lane"])
BACKLOG_TARGET_TOKENS = Gauge(
    "embq_backlog_target_tokens", "Bulk tokens the worker keeps waiting before it stops taking bulk tasks"
)
PASS_BUDGET_TOKENS = Gauge("embq_pass_budget_tokens", "Tokens a pass may take now (lowered after out of memory)")
TEXTS_SKIPPED = Counter("embq_texts_already_cached", "Texts of a task found in the cache: no engine time spent")
TEXTS_ABANDONED = Counter(
    "embq_texts_abandoned", "Texts of a task nobody waited for any more (timed out, cancelled, producer gone): skipped"
)
ENGINE_BATCH_TEXTS = Histogram(
    "embq_engine_batch_texts", "Texts per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
)
ENGINE_SECONDS = Histogram(
    "embq_engine_seconds",
    "Seconds per engine call",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_WAIT_SECONDS = Histogram(
    "embq_queue_wait_seconds",
    "Seconds from a producer sending a task to a worker starting it (clocks of two machines)",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
CACHE_WRITES = Counter("embq_cache_writes", "Vectors written to the cache")
ERRORS = Counter("embq_errors", "Failures by kind", ["kind"])
ENGINE_LOADED = Gauge("embq_engine_loaded", "1 once the engine is loaded, 0 after it died or shut down")
READY = Gauge("embq_worker_ready", "1 while the worker consumes its queue with a loaded engine")

for kind in (ITEM, OUT_OF_MEMORY, ENGINE_DEAD, REFUSED, WORKER):
    ERRORS.labels(kind)  # every kind reads 0 before its first error, so rates work


#: Ports tried from ``EMBQ_METRICS_PORT`` on when it is taken: one per worker on a host with many GPUs.
PORT_TRIES = 16


def serve(port: int, model: str, engine: str) -> int:
    """Expose the metrics on ``port``, or on the next free one when another worker of this host
    holds it; returns the port served, 0 for none. A port that cannot be bound costs the
    metrics, never the worker's work."""
    WORKER_INFO.info({"model": model, "engine": engine})
    if not port:
        return 0
    for candidate in range(port, min(port + PORT_TRIES, 65536)):
        try:
            start_http_server(candidate)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            log.warning("metrics not served: port %d: %s; set EMBQ_METRICS_PORT to a free port, 0 for none", port, e)
            return 0
        if candidate == port:
            log.info("metrics on :%d/metrics, on every interface (EMBQ_METRICS_PORT=0 serves none)", port)
        else:
            log.warning(
                "metrics port %d is taken (another worker on this host?): serving /metrics on :%d; "
                "set EMBQ_METRICS_PORT for each worker to choose where Prometheus finds it",
                port,
                candidate,
            )
        return candidate
    log.warning(
        "metrics not served: ports %d to %d are all taken; set EMBQ_METRICS_PORT to a free port, 0 for none",
        port,
        candidate,
    )
    return 0
