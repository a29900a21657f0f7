"""The gateway's Prometheus metrics, in the default registry beside the producer's ``embq_client_*``.

``embq_client_cache_hits_total`` and ``embq_client_cache_misses_total`` (counted
by the client library inside the gateway) give the cache hit rate of HTTP
traffic; the metrics here add requests, their latency and their texts.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("embq_gateway_requests", "HTTP requests answered", ["endpoint", "status"])
LATENCY = Histogram(
    "embq_gateway_request_seconds",
    "Seconds from a request's arrival to its response",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("embq_gateway_requests_in_flight", "Requests being answered")
TEXTS = Counter("embq_gateway_texts", "Texts in successful embedding requests", ["model"])

#: Endpoints by path; anything else is counted as "other", so that stray paths cannot grow the label set.
ENDPOINTS = ("/v1/embeddings", "/v1/models", "/health", "/health/live", "/metrics")


def endpoint(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class RequestMetrics:
    """ASGI middleware: counts every HTTP response by endpoint and status, and times it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before a response starts

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            IN_FLIGHT.dec()
            name = endpoint(scope["path"])
            REQUESTS.labels(name, str(status)).inc()
            LATENCY.labels(name).observe(time.perf_counter() - started)
