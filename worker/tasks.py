"""The body of the ``embq.embed`` task: check, embed through the batcher, store, notify."""

from __future__ import annotations

import logging
from typing import Any

import redis

from producer import keys
from producer.codec import pack
from producer.contract import PAYLOAD_VERSION
from producer.validation import item_problem
from worker.batcher import Batcher, BatcherStopped
from worker.engines import Engine
from worker.settings import WorkerSettings
from worker.store import store_results

log = logging.getLogger(__name__)

#: A worker does not trust a producer's message: at most this many texts per task.
MAX_TASK_TEXTS = 4096


def payload_problem(payload: Any, model: str) -> str | None:
    """Why a whole message cannot be served, or None."""
    if not isinstance(payload, dict):
        return f"payload is {type(payload).__name__}, not a map"
    if payload.get("v") != PAYLOAD_VERSION:
        return f"payload version {payload.get('v')!r} is not {PAYLOAD_VERSION}; upgrade the older side"
    if payload.get("model") != model:
        return f"payload is for model {payload.get('model')!r}, this worker serves {model!r}"
    texts = payload.get("texts")
    if not isinstance(texts, list) or len(texts) > MAX_TASK_TEXTS:
        return f"payload must hold a list of at most {MAX_TASK_TEXTS} texts"
    for name in ("namespace", "instruction"):
        if not isinstance(payload.get(name), str):
            return f"payload field {name!r} must be a str"
    return None


def run_embed(
    payload: Any, settings: WorkerSettings, engine: Engine, batcher: Batcher, cache: redis.Redis
) -> dict[str, int]:
    """Embed one task's texts; every text ends as a cached vector or a reported failure."""
    model = settings.shared.model
    problem = payload_problem(payload, model)
    if problem is not None:
        log.error("rejected a task: %s", problem)
        return {"embedded": 0, "failed": 0, "rejected": 1}
    namespace, instruction = payload["namespace"], payload["instruction"]
    max_bytes = settings.shared.max_text_bytes
    failures: dict[str, str] = {}
    good: list[tuple[str, str]] = []  # (digest, text)
    for text in payload["texts"]:
        why = item_problem(text, max_bytes)
        try:
            digest = keys.text_digest(model, namespace, instruction, text)
        except (AttributeError, UnicodeEncodeError):
            log.error("dropped an item no producer can wait for: it %s", why)
            continue
        if why is not None:
            failures[digest] = f"text {why}"
        else:
            good.append((digest, text))
    try:
        job = batcher.embed([engine.format_query(instruction, text) for _, text in good])
        values: dict[str, bytes] = {}
        for index, ((digest, _), vector) in enumerate(zip(good, job.vectors, strict=True)):
            if vector is None:
                failures[digest] = job.errors.get(index, "failed")
            else:
                values[digest] = pack(vector, settings.cache_dtype)
        store_results(cache, model, values, failures, settings.shared.cache_ttl)
    except (BatcherStopped, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        raise  # the message goes back to the queue or is retried: producers keep waiting
    except Exception as e:
        # No silent drops: whoever waits for these texts hears why they failed.
        reason = f"worker error: {type(e).__name__}: {e}"
        store_results(cache, model, {}, {d: reason for d, _ in good} | failures, settings.shared.cache_ttl)
        raise
    if failures:
        log.warning("%d of %d texts failed in this task", len(failures), len(payload["texts"]))
    return {"embedded": len(values), "failed": len(failures)}
