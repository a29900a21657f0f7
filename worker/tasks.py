"""The body of the ``embq.embed`` task: check, embed through the batcher, store and notify in one pipeline.

A task some of whose rows were inside an engine pass when the engine died
comes back (requeued at once, or redelivered after the visibility timeout when
the whole worker died) with those rows suspected (``embq.worker.app.Runtime.on_pass``
marks them): they could kill the next engine too. So each suspect row becomes a
task of its own, embedded in an engine call of its own with no other call
beside it, the task's other rows go on as one task, and a text that has been in
the engine at ``MAX_ENGINE_DEATHS`` deaths fails alone while its batch-mates
succeed. Rows that were only waiting are never suspected.

Texts cached while they wait in the batcher (a task sent again, or a retry's,
computed them first) are withdrawn at the batcher's next look and reported as
done: a text is computed once however many tasks carry it.

Before embedding, a task looks at its texts' keys (one MGET): a text whose
claim is gone or is another producer's, or whose producer is gone, has nobody
waiting for it (its call timed out, was cancelled or its producer died; a
producer watching it has claimed it again and sent it itself), so it is skipped,
and counted; a text already cached (a task delivered again, or another copy)
is reported as done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from embq.producer import keys
from embq.producer.cluster import CacheClient, look
from embq.producer.codec import CLAIM_PREFIX, pack_rows, unpack_many
from embq.producer.contract import MAX_TASK_TEXTS, PAYLOAD_VERSION, EmbedPayload, payload_lane, payload_truncates
from embq.producer.validation import item_problem
from embq.worker import metrics
from embq.worker.batcher import Batcher, BatcherStopped
from embq.worker.engines import Engine
from embq.worker.settings import WorkerSettings
from embq.worker.store import ResultStore

log = logging.getLogger(__name__)

#: Deliveries of a lone text during which engines died before it is failed as their cause.
MAX_ENGINE_DEATHS = 2


def payload_problem(payload: Any, model: str, namespace: str) -> str | None:
    """Why a whole message cannot be served, or None. A task of another model or cache namespace
    is refused: this worker's signature vouches for its own keys only."""
    if not isinstance(payload, dict):
        return f"payload is {type(payload).__name__}, not a map"
    if payload.get("v") != PAYLOAD_VERSION:
        return f"payload version {payload.get('v')!r} is not {PAYLOAD_VERSION}; upgrade the older side"
    for name in ("model", "namespace", "instruction", "reply"):
        if not isinstance(payload.get(name), str):
            return f"payload field {name!r} must be a str"
    texts = payload.get("texts")
    if not isinstance(texts, list) or len(texts) > MAX_TASK_TEXTS:
        return f"payload must hold a list of at most {MAX_TASK_TEXTS} texts"
    if payload["model"] != model:
        return f"payload is for model {payload['model']!r}, this worker serves {model!r}"
    if payload["namespace"] != namespace:
        return (
            f"payload is for cache namespace {payload['namespace']!r}, this worker serves {namespace!r} "
            "(start a worker with EMBQ_CACHE_NAMESPACE set to the producers' namespace)"
        )
    return None


def reply_of(payload: Any) -> str:
    """The owner's reply stream, if the payload names one that is ours to write."""
    reply = payload.get("reply") if isinstance(payload, dict) else None
    return reply if isinstance(reply, str) and reply.startswith(keys.REPLY) else ""


def run_embed(
    payload: Any,
    settings: WorkerSettings,
    engine: Engine,
    batcher: Batcher,
    store: ResultStore,
    *,
    engine_deaths: int = 0,
    suspects: list[int] | None = None,
    redelivered: bool = False,
    split: Callable[[EmbedPayload, int], None] | None = None,
    task: str = "",
) -> dict[str, int]:
    """Embed one task's texts; every text ends as a cached vector or a reported failure."""
    problem = payload_problem(payload, settings.shared.model, settings.shared.cache_namespace)
    if problem is not None:
        return refuse(payload, problem, store, task)
    texts: list[Any] = payload["texts"]
    reply = reply_of(payload)
    sent = payload.get("sent")
    if isinstance(sent, int | float) and not isinstance(sent, bool):
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - sent))
    suspected = [row for row in suspects or () if 0 <= row < len(texts)]
    if suspected and len(texts) > 1 and split is not None:
        return split_suspects(payload, suspected, split)

    max_bytes = settings.shared.max_text_bytes
    digests = digests_or_none(payload, texts)
    failures: dict[str, str] = {}
    good: list[tuple[str, str, int]] = []  # (digest, text, row in the task)
    for row, (digest, text) in enumerate(zip(digests, texts, strict=True)):
        why = item_problem(text, max_bytes)
        if digest is None:
            log.error("dropped an item no producer can wait for: it %s", why)
        elif why is not None:
            failures[digest] = f"text {why}"
        else:
            good.append((digest, text, row))

    owner = reply[len(keys.REPLY) :]
    cached, abandoned = look_before_embedding(store.cache, [d for d, _, _ in good], engine.dim, owner, redelivered)
    skip = cached | abandoned
    todo = [item for item in good if item[0] not in skip] if skip else good
    if engine_deaths >= MAX_ENGINE_DEATHS:
        for digest, _, _ in todo:
            failures[digest] = f"the engine died {engine_deaths} times while embedding this text; it is refused"
        todo = []
    metrics.TEXTS_SKIPPED.inc(len(cached))
    instruction = payload["instruction"]
    done: list[str] = []

    became_cached: set[str] = set()  # by another task meanwhile (a retry's, or one sent again): reported as done

    def unwanted(rows: list[int]) -> list[int]:
        digests = [todo[row][0] for row in rows]
        now_cached, gone = look_before_embedding(store.cache, digests, engine.dim, owner, True)
        became_cached.update(now_cached)
        return [row for row, digest in zip(rows, digests, strict=True) if digest in gone or digest in now_cached]

    lane = payload_lane(payload)
    handed_over: set[str] = set()  # digests stored while the task waited (``hand_over``)

    def hand_over(rows: list[int], vectors: np.ndarray) -> None:
        """Rows done while the task waits for others: cached, and their owner told, at once."""
        values, width = pack_rows(vectors, settings.cache_dtype)
        digests = [todo[row][0] for row in rows]
        store.store(reply, digests, values, width, {}, task=task, lane=lane, ends_task=False)
        handed_over.update(digests)

    try:
        alone = bool(payload.get("alone")) or engine_deaths > 0
        job = batcher.embed(
            [engine.format_query(instruction, text) for _, text, _ in todo],
            alone=alone,
            task=task,
            origin=[row for _, _, row in todo],
            lane=lane,
            unwanted=unwanted if owner else None,
            owner=owner,
            truncate=payload_truncates(payload),
            hand_over=hand_over,
        )
        dropped = {todo[row][0] for row in job.dropped}
        abandoned |= dropped - became_cached
        cached |= dropped & became_cached
        metrics.TEXTS_SKIPPED.inc(len(dropped & became_cached))
        metrics.TEXTS_ABANDONED.inc(len(abandoned))
        if abandoned:
            log.info("skipped %d of %d texts nobody waits for any more", len(abandoned), len(texts))
        embedded = np.flatnonzero(job.ok & ~job.handed)  # the rows handed over are stored already
        values: bytes | memoryview = b""
        width = 0
        if job.matrix is not None and len(embedded):
            rows = job.matrix if len(embedded) == len(todo) else job.matrix[embedded]
            values, width = pack_rows(rows, settings.cache_dtype)
        done = [todo[i][0] for i in embedded]
        if len(done) + len(handed_over) + len(job.dropped) < len(todo):
            dropped = set(job.dropped)
            for row in np.flatnonzero(~job.ok).tolist():
                if row not in dropped:
                    failures[todo[row][0]] = job.errors.get(row, "failed")
        store.store(
            reply,
            done,
            values,
            width,
            failures,
            cached=sorted(cached),
            task=task,
            abandoned=len(abandoned),
            lane=lane,
        )
    except (BatcherStopped, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        raise  # the message goes back to the queue or is retried: producers keep waiting
    except Exception as e:
        # No silent drops: whoever waits for these texts hears why they failed.
        reason = f"worker error: {type(e).__name__}: {e}"
        metrics.ERRORS.labels(metrics.WORKER).inc()
        try:
            unstored = {d: reason for d, _, _ in todo if d not in handed_over}
            store.store(reply, [], b"", 0, unstored | failures, task=task)
        except Exception as again:
            log.error("could not report the failure of %d texts either: %s", len(todo), again)
        raise
    if failures:
        metrics.ERRORS.labels(metrics.ITEM).inc(len(failures))
        log.warning("%d of %d texts failed in this task", len(failures), len(texts))
    embedded_count = len(done) + len(handed_over)
    return {"embedded": embedded_count, "cached": len(cached), "failed": len(failures), "skipped": len(abandoned)}


def split_suspects(payload: Any, suspected: list[int], split: Callable[[EmbedPayload, int], None]) -> dict[str, int]:
    """Each suspect row in a task of its own, alone in the engine; the other rows in one task, as usual."""
    texts: list[Any] = payload["texts"]
    log.warning(
        "%d of the %d texts of a task were in an engine pass when the engine died: each runs alone, "
        "the other %d as one task",
        len(suspected),
        len(texts),
        len(texts) - len(suspected),
    )
    for index, row in enumerate(suspected):
        split({**payload, "texts": [texts[row]], "alone": True}, index)  # type: ignore[typeddict-item]
    chosen = set(suspected)
    rest = [text for row, text in enumerate(texts) if row not in chosen]
    if rest:
        split({**payload, "texts": rest, "alone": False}, len(suspected))  # type: ignore[typeddict-item]
    return {"embedded": 0, "failed": 0, "split": len(suspected) + bool(rest)}


def digests_or_none(payload: dict[str, Any], texts: list[Any]) -> list[str | None]:
    """The texts' digests, hashed as one batch; ``None`` for an item no digest can be made of."""
    try:
        model, namespace, instruction = payload["model"], payload["namespace"], payload["instruction"]
        return list(keys.text_digests(model, namespace, instruction, texts, truncate=payload_truncates(payload)))
    except (AttributeError, TypeError, UnicodeEncodeError, KeyError):
        return [digest_or_none(payload, text) for text in texts]


def digest_or_none(payload: dict[str, Any], text: Any) -> str | None:
    try:
        model, namespace, instruction = payload["model"], payload["namespace"], payload["instruction"]
        return keys.text_digest(model, namespace, instruction, text, truncate=payload_truncates(payload))
    except (AttributeError, TypeError, UnicodeEncodeError, KeyError):
        return None


def look_before_embedding(
    cache: CacheClient, digests: list[str], dim: int, owner: str, redelivered: bool
) -> tuple[set[str], set[str]]:
    """``(cached, abandoned)`` among ``digests``, in one round trip: cached ones cost no engine time;
    abandoned ones nobody waits for (see the module doc). ``owner``: the token of the producer that
    sent the task ("" for a producer that names no reply stream: everything is embedded)."""
    if not digests or not (owner or redelivered):
        return set(), set()
    values = look(cache, digests)
    _, valid = unpack_many(values, dim)
    cached = {d for d, ok in zip(digests, valid, strict=True) if ok}
    if not owner:
        return cached, set()
    alive = cache.exists(keys.alive_key(owner))
    claim, token = len(CLAIM_PREFIX), len(CLAIM_PREFIX) + 1  # a claim: the prefix, a flag byte, the token
    abandoned = {
        d
        for d, value in zip(digests, values, strict=True)
        if value is None
        or (value[:claim] == CLAIM_PREFIX and (value[token:].decode(errors="replace") != owner or not alive))
    }
    return cached, abandoned


def refuse(payload: Any, problem: str, store: ResultStore, task: str = "") -> dict[str, int]:
    """A message this worker cannot serve: tell whoever waits for its texts, if they can be named."""
    log.error("refused a task: %s", problem)
    metrics.ERRORS.labels(metrics.REFUSED).inc()
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if not isinstance(texts, list):
        return {"embedded": 0, "failed": 0, "refused": 1}
    digests = [d for d in (digest_or_none(payload, t) for t in texts) if d is not None]
    reason = f"refused by the worker: {problem}"
    store.store(reply_of(payload), [], b"", 0, dict.fromkeys(digests, reason), task=task)
    return {"embedded": 0, "failed": len(digests), "refused": 1}
