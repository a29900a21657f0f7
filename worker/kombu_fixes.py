"""Fixes to kombu's Redis transport that a worker needs to ride out a broker restart or a full broker.

When the broker's connection drops, Celery closes the old connection and opens
a new one, but the old channel is still used: its ``close`` restores the
messages it had delivered, and a task that finishes meanwhile acknowledges its
message on it. Both reach for the closed connection's client to make a Redis
client, and kombu fails with ``AttributeError: 'NoneType' object has no
attribute 'hostname'`` (or ``'client'``). Celery expects a connection error
there and handles one (it ignores it on close, and logs an acknowledgement it
could not make), but treats anything else as unrecoverable and stops the
worker: seen in about one broker restart in three under load.

So a channel whose connection is gone raises the connection error it stands
for. Likewise a broker at its ``maxmemory`` under ``noeviction`` refuses the
transactions that record a message as taken and that acknowledge it
(``OutOfMemoryError``), which stopped the worker the same way: a refused
record is logged and the task runs (if this worker died meanwhile, the task's
producer, which finds it nowhere in the broker, sends it again), and a refused
acknowledgement is raised as the broker error Celery logs.
Nothing is lost: a message not acknowledged stays in the broker's ``unacked``
hash and returns to the queue after the visibility timeout, and a task whose
vectors were stored meanwhile finds them cached when it runs again.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger(__name__)

_original_connparams = kombu_redis.Channel._connparams
_original_ack = kombu_redis.QoS.ack
_original_append = kombu_redis.QoS.append


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.exceptions.ConnectionError("the broker connection of this channel was closed")
    return _original_connparams(self, asynchronous=asynchronous)


def _ack(self: Any, delivery_tag: Any) -> Any:
    try:
        return _original_ack(self, delivery_tag)
    except redis.exceptions.ResponseError as e:  # a full broker: the message stays unacknowledged
        raise redis.exceptions.ConnectionError(f"the broker refused to acknowledge a task: {e}") from e


def _append(self: Any, message: Any, delivery_tag: Any) -> None:
    try:
        _original_append(self, message, delivery_tag)
    except redis.exceptions.ResponseError as e:  # a full broker: the task runs without its copy in ``unacked``
        log.warning("the broker did not record a task as taken (%s); it runs all the same", e)
        virtual.QoS.append(self, message, delivery_tag)


def apply() -> None:
    """Install the fixes (idempotent)."""
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
    kombu_redis.QoS.ack = _ack  # type: ignore[method-assign]
    kombu_redis.QoS.append = _append  # type: ignore[method-assign]
