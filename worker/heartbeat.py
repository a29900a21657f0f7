"""A worker's heartbeat in the cache Redis: what ``embq status`` lists as workers online.

A hash per worker process with a short TTL, refreshed by a thread: a worker
that dies drops off the list by itself within ``HEARTBEAT_TTL``. Each beat also
enters the worker in the sorted set ``embq:workers`` (scored by the time its
hash expires), so that a reader finds the workers without scanning the cache.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from embq.producer import keys
from embq.producer.backend import redis_reason
from embq.producer.cluster import CacheClient, pipeline

log = logging.getLogger(__name__)


def worker_name() -> str:
    """How ``embq status`` and the producers name this worker process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """``cache`` should not retry (``embq.producer.backend.connect_once``): a beat that fails is
    simply the next one's job, and a shutdown must not wait for a Redis that is gone.
    ``also`` runs at every beat (the worker renews its engine signature there)."""

    def __init__(
        self,
        cache: CacheClient,
        fields: dict[str, str],
        progress: Callable[[], dict[str, str]],
        also: Callable[[], None] | None = None,
    ) -> None:
        self.cache = cache
        self.also = also
        self.name = worker_name()
        self.key = keys.worker_key(self.name)
        self.fields = {**fields, "pid": str(os.getpid()), "started": f"{time.time():.0f}"}
        self.progress = progress
        self.ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        mapping: dict[Any, Any] = {
            **self.fields,
            **{k: str(v) for k, v in self.progress().items()},
            "ready": str(int(self.ready)),
        }
        now = time.time()
        pipe = pipeline(self.cache, atomic=True)
        pipe.hset(self.key, mapping=mapping)
        pipe.expire(self.key, keys.HEARTBEAT_TTL)
        pipe.zadd(keys.WORKERS, {self.name: now + keys.HEARTBEAT_TTL})
        # Entries of workers that died without a word; readers also skip names whose hash is gone,
        # so a clock that differs between hosts costs nothing but a stale entry for a while.
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - keys.HEARTBEAT_TTL)
        pipe.expire(keys.WORKERS, keys.HEARTBEAT_TTL)
        pipe.execute()

    def set_ready(self, ready: bool) -> None:
        """Readiness shows in ``embq status`` at once, not at the next beat."""
        self.ready = ready
        try:
            self.beat()
        except redis.exceptions.RedisError as e:
            log.debug("heartbeat failed: %s", redis_reason(e))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.exceptions.RedisError as e:  # the cache is down: status shows us again once it is back
                log.debug("heartbeat failed: %s", redis_reason(e))
            if self.also is not None:
                try:
                    self.also()
                except redis.exceptions.RedisError as e:
                    log.debug("heartbeat task failed: %s", redis_reason(e))
            self._stop.wait(keys.HEARTBEAT_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        try:
            pipe = pipeline(self.cache, atomic=True)
            pipe.zrem(keys.WORKERS, self.name)
            pipe.delete(self.key)
            pipe.execute()
        except redis.exceptions.RedisError:
            pass  # it expires by itself
