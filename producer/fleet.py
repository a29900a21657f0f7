"""The dispatcher's view of the model's workers: found through their heartbeats, their rates sizing bulk
tasks, their deaths named in stall warnings, a model nobody serves refused."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import redis

from embq.producer import keys
from embq.producer.errors import ModelNotServedError
from embq.producer.ops import Op, Redis

if TYPE_CHECKING:
    from embq.producer.dispatcher import Dispatcher

#: The dispatcher's logger: one name for all the dispatcher says, whichever module of it says it.
log = logging.getLogger("embq.producer.dispatcher")
#: Fewest texts in a bulk task, however slow the model's workers: a task costs a worker a few
#: Celery round trips, which must stay small beside its texts.
MIN_TASK_TEXTS = 16
#: Texts in a bulk task while no worker of the model is ready (they start with the job, loading): a
#: fraction of a second on a GPU, seconds on a CPU, so that the first tasks of a job spread over the
#: workers as they come up rather than wait behind a few large ones. Ready workers that have measured no
#: rate yet get the largest tasks: a backfill that starts on an idle fleet must not fill the broker with
#: small tasks that a later job's tasks would wait behind.
START_TASK_TEXTS = 128
#: What a producer reads of a worker's heartbeat (``embq.worker.heartbeat``); ``model`` first.
WORKER_FIELDS = ("model", "namespace", "ready", "speed", "texts")


class WorkerTracking:
    """Tracking the model's workers, for ``embq.producer.dispatcher.Dispatcher``."""

    def _recent_deaths(self: Dispatcher, seconds: float) -> Generator[Op, Any, str]:
        """Workers declared dead in the last ``seconds`` (``embq.worker.holdings``) that held tasks of our
        queues, and what went back to each queue, in words; "" when none."""
        try:
            (raw,) = yield Redis("broker", [("HGETALL", keys.RECLAIMED)])
        except redis.exceptions.RedisError:
            return ""
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        said = []
        for worker, record in pairs:
            facts = json.loads(record)
            queues = {q: n for q, n in facts.get("queues", {}).items() if q in self.settings.queues}
            if queues and facts.get("at", 0) >= time.time() - seconds:
                sent = ", ".join(f"{n} tasks back to {q!r}" for q, n in queues.items())
                said.append(f"{_text(worker)} ({sent})")
        return "; ".join(said)

    def _look_at_workers(self: Dispatcher) -> Generator[Op, Any, list[dict[str, str]]]:
        """The workers online (their heartbeats, found through ``keys.WORKERS``): O(workers), no SCAN.
        ``fresh`` is "1" for a worker that beat within the last 1.5 heartbeats: one killed since
        stays listed until its heartbeat expires, but its rate no longer counts."""
        now = time.time()
        (found,) = yield Redis("cache", [("ZRANGEBYSCORE", keys.WORKERS, now, "+inf", "WITHSCORES")])
        pairs = _scored(found)
        if not pairs:
            return []
        names = [name for name, _ in pairs]
        replies = yield Redis("cache", [("HMGET", keys.worker_key(name), *WORKER_FIELDS) for name in names])
        recent = now + keys.HEARTBEAT_TTL - 1.5 * keys.HEARTBEAT_SECONDS
        return [
            {
                "name": name,
                "fresh": "1" if expires >= recent else "",
                **{f: _text(v) for f, v in zip(WORKER_FIELDS, values, strict=True)},
            }
            for (name, expires), values in zip(pairs, replies, strict=True)
            if values[0] is not None  # its hash expired: gone
        ]

    def _serves(self: Dispatcher, worker: dict[str, str]) -> bool:
        return worker["model"] == self.model and (worker["namespace"] or keys.DEFAULT_NAMESPACE) == self.namespace

    def _learn_from_workers(self: Dispatcher, workers: list[dict[str, str]]) -> None:
        """Bulk tasks sized to the slowest worker's rate (the largest while the ready workers have measured none,
        ``START_TASK_TEXTS`` while none is ready); a worker that embedded since the last look is progress."""
        mine = [w for w in workers if self._serves(w)]
        speeds = [float(w["speed"]) for w in mine if w["fresh"] and w["speed"] and float(w["speed"]) > 0]
        if speeds:
            texts = int(self.settings.task_seconds * min(speeds))
            self.bulk_task_texts = max(MIN_TASK_TEXTS, min(self.settings.task_max_texts, texts))
        elif any(w["ready"] == "1" for w in mine):
            self.bulk_task_texts = self.settings.task_max_texts
        else:
            self.bulk_task_texts = min(START_TASK_TEXTS, self.settings.task_max_texts)
        seen = {w["name"]: int(w["texts"] or 0) for w in mine}
        if any(count > self.worker_texts.get(name, count) for name, count in seen.items()):
            self.last_progress = time.monotonic()
        self.worker_texts = seen

    def _find_model(self: Dispatcher) -> Generator[Op, Any, None]:
        """Is the model served, or was it (its signature)? A worker that is loading counts. Raises
        ``ModelNotServedError`` after ``unknown_model_grace`` seconds of neither."""
        (signature,) = yield Redis("cache", [("GET", self.signature)])
        workers = yield from self._look_at_workers()
        mine = [w for w in workers if self._serves(w)]
        if signature is not None or mine:
            self.model_known, self.unknown_since = True, None
            if not mine and not self.said_no_worker:
                self.said_no_worker = True
                log.warning(
                    "no worker of model %r is online (workers have served it before): its texts wait in queues %s "
                    "until one starts",
                    self.model,
                    " and ".join(repr(q) for q in self.settings.queues),
                )
            return
        now = time.monotonic()
        if self.unknown_since is None:
            self.unknown_since = now
        if not self.said_unknown:
            self.said_unknown = True
            log.info("no worker serves model %r yet; waiting up to %.0fs for one", self.model, self._grace())
        if now - self.unknown_since >= self._grace():
            self.unknown_since = None
            namespace = self.namespace
            served = sorted({w["model"] for w in workers if (w["namespace"] or keys.DEFAULT_NAMESPACE) == namespace})
            raise ModelNotServedError(self.model, served, self._grace())

    def _grace(self: Dispatcher) -> float:
        return self.settings.unknown_model_grace


def _scored(reply: Any) -> list[tuple[str, float]]:
    """``ZRANGEBYSCORE ... WITHSCORES`` as ``(member, score)`` pairs, whether RESP2 (flat) or pairs."""
    if reply and not isinstance(reply[0], list | tuple):
        reply = list(zip(reply[::2], reply[1::2], strict=True))
    return [(_text(member), float(score)) for member, score in reply or []]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else ("" if raw is None else str(raw))
