"""``EmbeddingClient``: texts in, vectors out, through the cache first and the queue second."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from celery import Celery

from producer import keys, metrics
from producer.backend import backend_errors, connect
from producer.broker import BrokerView
from producer.codec import truncate
from producer.contract import TASK_EMBED, make_celery, make_payload
from producer.errors import EmbqTimeoutError, InvalidInputError, ItemFailedError
from producer.inflight import MissResolver
from producer.settings import Settings
from producer.stream import DEFAULT_BATCH, DEFAULT_WINDOW, EmbedStream, Failures
from producer.validation import validate_options, validate_texts

log = logging.getLogger(__name__)


class EmbeddingClient:
    """Embeds texts with one model through embq's cache and workers; safe to share across threads.

    ``redis_url`` serves as broker and cache unless ``broker_url``/``cache_url``
    say otherwise; when it is None, the ``EMBQ_*`` environment decides.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        broker_url: str | None = None,
        cache_url: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        base = settings or Settings.from_env()
        if redis_url is not None:
            base = base.with_overrides(redis_url=redis_url, broker_url="", cache_url="")
        self.settings = base.with_overrides(model=model, broker_url=broker_url, cache_url=cache_url)
        self.model = self.settings.model
        self.queue = keys.queue_name(self.model)
        self._cache = connect(self.settings.cache)
        self._broker = self._cache if self.settings.broker == self.settings.cache else connect(self.settings.broker)
        self._broker_view = BrokerView(self._broker, self.queue)
        self._celery: Celery | None = None
        self._lock = threading.Lock()

    def embed(
        self,
        texts: Any,
        *,
        dim: int | None = None,
        instruction: str = "",
        timeout: float | None = None,
    ) -> np.ndarray:
        """Vectors for ``texts``: float32, shape ``(len(texts), d)``, row i for text i.

        ``dim`` serves a Matryoshka prefix of the stored full vector, re-normalised.
        ``instruction`` is the model's query instruction; it is part of the cache key.
        ``timeout`` (seconds) bounds the wait for workers; None waits as long as
        the work is alive (claims are renewed, lost ones are taken over).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        settings = self.settings
        items = validate_texts(texts, settings.max_text_bytes)
        validate_options(instruction, dim, timeout, settings.max_text_bytes)
        digests = keys.text_digests(self.model, settings.cache_namespace, instruction, items)
        unique = dict(zip(digests, items, strict=False))
        started = time.monotonic()
        with backend_errors("cache", settings.cache):
            resolver = MissResolver(
                self._cache,
                unique,
                lambda ds: self._send(instruction, ds, unique),
                settings.lease_seconds,
                self.queue,
                hold_seconds=settings.visibility_timeout,
                broker=self._broker_view,
            )
            resolver.run(deadline)
        self._count(resolver, time.monotonic() - started)
        if resolver.pending:
            missing = sum(1 for d in digests if d in resolver.pending)
            raise EmbqTimeoutError(
                f"{missing} of {len(items)} texts still missing after {timeout}s; "
                f"are workers consuming queue {self.queue!r}? Their work is not lost: "
                f"a later call collects what they finish.",
                missing=missing,
                total=len(items),
            )
        return self._assemble(digests, resolver, dim)

    def embed_iter(
        self,
        texts: Iterable[str],
        *,
        batch: int = DEFAULT_BATCH,
        window: int = DEFAULT_WINDOW,
        dim: int | None = None,
        instruction: str = "",
        timeout: float | None = None,
        failures: Failures = "raise",
        on_progress: Callable[[int], None] | None = None,
    ) -> EmbedStream:
        """Stream any number of texts: yields ``(start, vectors)`` chunks of ``batch`` rows, in input order,
        with at most ``window`` chunks in flight. See ``EmbedStream`` for failures and counters;
        ``on_progress(n)`` is called as texts are resolved."""
        return EmbedStream(
            self,
            texts,
            batch=batch,
            window=window,
            dim=dim,
            instruction=instruction,
            timeout=timeout,
            failures=failures,
            on_progress=on_progress,
        )

    def _count(self, resolver: MissResolver, seconds: float) -> None:
        misses = resolver.missed
        pipe = self._cache.pipeline(transaction=False)
        stats = keys.stats_key(self.model)
        pipe.hincrby(stats, "hits", len(resolver.texts) - misses)
        pipe.hincrby(stats, "misses", misses)
        pipe.expire(stats, keys.STATS_TTL)
        with backend_errors("cache", self.settings.cache):
            pipe.execute()
        metrics.CACHE_HITS.labels(self.model).inc(len(resolver.texts) - misses)
        metrics.CACHE_MISSES.labels(self.model).inc(misses)
        metrics.TEXTS_SENT.labels(self.model).inc(resolver.sent)
        metrics.TEXTS_WAITED.labels(self.model).inc(resolver.waited)
        if misses:
            metrics.WAIT_SECONDS.labels(self.model).observe(seconds)

    def _assemble(self, digests: list[str], resolver: MissResolver, dim: int | None) -> np.ndarray:
        full = next((v.shape[0] for v in resolver.vectors.values()), 0)
        if dim is not None and full and dim > full:
            raise InvalidInputError(f"dim={dim} exceeds the model's dimension {full} ({self.model})")
        matrix = np.full((len(digests), full), np.nan, dtype=np.float32)
        failures: dict[int, str] = {}
        for row, d in enumerate(digests):
            vector = resolver.vectors.get(d)
            if vector is not None:
                matrix[row] = vector
            else:
                failures[row] = resolver.failures.get(d, "no vector")
        result = truncate(matrix, dim) if full else matrix.reshape(len(digests), dim or 0)
        if failures:
            first = min(failures)
            raise ItemFailedError(
                f"{len(failures)} of {len(digests)} texts failed; texts[{first}] (index {first}): {failures[first]}. "
                "The other rows are in .vectors and cached.",
                failures,
                result,
            )
        return result

    def _send(self, instruction: str, digests: list[str], texts: dict[str, str]) -> dict[str, list[str]]:
        """Enqueue texts as tasks bounded by the task text and character budgets.

        Returns the digests each task carries, by task id."""
        app = self._app()
        batches: list[list[str]] = []
        current: list[str] = []
        chars = 0
        for d in digests:
            size = len(texts[d])
            if current and (
                len(current) >= self.settings.task_max_texts or chars + size > self.settings.task_max_chars
            ):
                batches.append(current)
                current, chars = [], 0
            current.append(d)
            chars += size
        if current:
            batches.append(current)
        tasks = {uuid.uuid4().hex: batch for batch in batches}
        with backend_errors("broker", self.settings.broker), app.producer_or_acquire() as producer:
            for task_id, batch in tasks.items():
                app.send_task(
                    TASK_EMBED,
                    args=[make_payload(self.settings, instruction, [texts[d] for d in batch])],
                    task_id=task_id,
                    queue=self.queue,
                    # The default exchange routes by list name alone: no binding
                    # key in Redis that a restart could lose.
                    exchange="",
                    routing_key=self.queue,
                    producer=producer,
                )
        log.debug("sent %d texts in %d tasks to %s", len(digests), len(tasks), self.queue)
        return tasks

    def _app(self) -> Celery:
        with self._lock:
            if self._celery is None:
                self._celery = make_celery(self.settings)
            return self._celery

    def close(self) -> None:
        """Release connections; the client must not be used afterwards."""
        self._cache.close()
        self._broker.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
