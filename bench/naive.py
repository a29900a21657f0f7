"""What a user writes without embq: one Celery task per text, vectors back as task results.

Same engine, same thread pool and concurrency as an embq worker; no cache, no
coalescing. Run the worker with ``celery -A bench.naive worker --pool threads``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery

from embq.worker.engines import Engine, create_engine

QUEUE = "bench.naive"

app = Celery("bench.naive", broker=os.environ.get("EMBQ_REDIS_URL"), backend=os.environ.get("EMBQ_REDIS_URL"))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)

_engine: Engine | None = None
_lock = threading.Lock()


def engine() -> Engine:
    """Loaded once per worker process, on the first task."""
    global _engine
    with _lock:
        if _engine is None:
            name = os.environ.get("EMBQ_ENGINE", "sentence-transformers")
            loaded = create_engine(name, os.environ["EMBQ_MODEL"], truncate=True)  # as every system here
            loaded.load()
            _engine = loaded
        return _engine


@app.task(name="bench.naive.embed_one")
def embed_one(text: str) -> list[Any]:
    return [float(x) for x in engine().encode([text])[0]]
