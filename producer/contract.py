"""What travels between producers and workers: the Celery app settings, task name and payload."""

from __future__ import annotations

import json
import ssl
import time
from typing import Any, NotRequired, TypedDict
from urllib.parse import parse_qsl, urlencode, urlsplit

from celery import Celery
from celery.app.amqp import AMQP

from embq.producer import keys, sentinel
from embq.producer.backend import RedactedConnection
from embq.producer.settings import TASK_TEXTS_LIMIT, Settings

#: The one task embq sends: embed a batch of texts into the cache.
TASK_EMBED = "embq.embed"
#: Bumped when the payload changes shape; workers refuse versions they do not know.
#: 2: the producer's reply stream travels in the task, and its notice carries the vectors.
PAYLOAD_VERSION = 2
#: Workers refuse tasks of more texts than this (they do not trust producers).
MAX_TASK_TEXTS = TASK_TEXTS_LIMIT


class EmbedPayload(TypedDict):
    """The single argument of ``TASK_EMBED``: plain msgpack-able data, never objects."""

    v: int
    model: str
    namespace: str
    instruction: str
    texts: list[str]
    #: The reply stream of the producer that claimed the texts: the worker's notice goes there.
    reply: str
    #: Optional: embed each text in its own engine call (set on texts suspected of killing an engine).
    alone: NotRequired[bool]
    #: Optional: the producer's clock (Unix seconds) when it sent the task, for the queue-wait metric.
    sent: NotRequired[float]
    #: Optional: ``keys.BULK`` for bulk work (its queue says so too); absent, interactive.
    lane: NotRequired[str]
    #: Optional: True when the texts are to be cut at the engine's context rather than fail there;
    #: their keys are the cut kind (``keys.CUT_MARKER``). Absent: not cut (older producers).
    truncate: NotRequired[bool]


def split_task_id(task_id: str, index: int) -> str:
    """The id of part ``index`` of a task a worker splits: it keeps the id its producer
    knows, so the producer can still find its task in the broker."""
    return f"{task_id}/{index}"


def root_task_id(task_id: str) -> str:
    """The id the producer gave, for a task or any part split from it."""
    return task_id.split("/", 1)[0]


def make_payload(
    settings: Settings,
    instruction: str,
    texts: list[str],
    reply: str,
    lane: str = keys.INTERACTIVE,
    *,
    truncate: bool = False,
) -> EmbedPayload:
    payload: EmbedPayload = {
        "v": PAYLOAD_VERSION,
        "model": settings.model,
        "namespace": settings.cache_namespace,
        "instruction": instruction,
        "texts": texts,
        "reply": reply,
        "sent": time.time(),
    }
    if lane == keys.BULK:
        payload["lane"] = keys.BULK
    if truncate:
        payload["truncate"] = True
    return payload


def payload_truncates(payload: Any) -> bool:
    """Whether a payload's texts are to be cut at the engine's context (and keyed as cut)."""
    return isinstance(payload, dict) and payload.get("truncate") is True


def payload_lane(payload: Any) -> str:
    """The lane a payload asks for; anything but ``keys.BULK`` is interactive (older producers)."""
    return keys.BULK if isinstance(payload, dict) and payload.get("lane") == keys.BULK else keys.INTERACTIVE


def payload_queue(payload: EmbedPayload) -> str:
    return keys.queue_name(payload["model"], payload["namespace"], payload_lane(payload))


def signature_dimension(raw: bytes | str | None) -> int | None:
    """A model's dimension, from the engine signature its workers store at ``keys.signature_key``
    (JSON written by ``embq.worker.signature``); None when no worker has told it yet."""
    try:
        dim = json.loads(raw)["dim"] if raw else None
    except (ValueError, TypeError, KeyError):
        return None
    return dim if isinstance(dim, int) and dim > 0 else None


def describe_task(payload: EmbedPayload) -> str:
    """A short account of a task for monitors (Flower's args column)."""
    texts = payload["texts"]
    first = texts[0][:60] if texts else ""
    cut = ", cut at the context" if payload_truncates(payload) else ""
    return f"[{len(texts)} texts, first {first!r}, instruction {payload['instruction'][:40]!r}{cut}]"


def broker_tls(url: str) -> dict[str, Any] | None:
    """TLS options for a ``rediss://`` broker that names none: verify the server, as
    redis-py does for the cache, rather than kombu's default of not verifying it.
    Options in the URL (``?ssl_ca_certs=...&ssl_cert_reqs=required``) take precedence."""
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_" in parts.query:
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def kombu_url(url: str) -> str:
    """The broker URL as kombu spells it: redis-py's ``unix:///path?db=N`` is kombu's
    ``redis+socket:///path?virtual_host=N``; other URLs are the same for both."""
    if sentinel.is_sentinel(url):
        return sentinel.kombu_url(url)
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    query = urlencode([("virtual_host", v) if k == "db" else (k, v) for k, v in parse_qsl(parts.query)])
    return f"redis+socket://{parts.path}" + (f"?{query}" if query else "")


#: kombu's retry policy for publishing a task: waits of 0.1 s, then 0.5 s more each time, capped at 2 s; 13 s in all.
PUBLISH_RETRY = {"max_retries": 9, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2.0}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings both sides must share; the worker adds its own on top."""
    transport: dict[str, Any] = {
        # Unacknowledged late-ack messages come back after this long: it must
        # exceed the longest batch, and be the same wherever Celery reads it.
        "visibility_timeout": settings.visibility_timeout,
        # Workers look for such messages this often (kombu's default sweep is
        # every 10 s x 10 = 100 s): a dead worker's batch is back within
        # visibility_timeout plus at most 10 s.
        "unacked_restore_interval": max(1.0, min(10.0, settings.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
    }
    publish_retry = dict(PUBLISH_RETRY)
    if sentinel.is_sentinel(settings.broker):
        sentinels = sentinel.parse(settings.broker)
        transport.update(sentinel.transport_options(settings.broker))
        # Kombu takes the sentinels for alternates and counts a retry per sentinel, waiting only once
        # per round: the same ~13 s of publishing retries take that many more.
        publish_retry["max_retries"] *= len(sentinels.sentinels)
    config: dict[str, Any] = {
        "broker_url": kombu_url(settings.broker),
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # Publishing rides out a broker restart or failover of ~10 s, as every other command of embq's does
        # (``embq.producer.backend.RETRIES``); Celery's default gives up after 0.6 s.
        "task_publish_retry_policy": publish_retry,
        # No pickle anywhere: a pickled message is refused, not executed.
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "event_serializer": "json",
        # Vectors travel through the cache, not through Celery results.
        "task_ignore_result": True,
        "result_backend": None,
        # At-least-once: ack after the vectors are written; a worker that dies
        # mid-batch leaves its messages to be redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Small prefetch keeps the queue length true for autoscalers (KEDA
        # counts only messages nobody has prefetched).
        "worker_prefetch_multiplier": 1,
        # Task events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_EMBED: {"queue": settings.queue}},
    }
    tls = broker_tls(settings.broker)
    if tls is not None:
        config["broker_use_ssl"] = tls
    return config


class _AMQP(AMQP):
    """Celery's messaging layer with connections that show their URL honestly (see ``RedactedConnection``)."""

    Connection = RedactedConnection


def make_celery(settings: Settings, main: str = "embq") -> Celery:
    """A Celery app configured for ``settings.model``; it does not connect until used."""
    app = Celery(main, set_as_current=False, amqp=_AMQP)
    app.conf.update(celery_config(settings))
    return app
