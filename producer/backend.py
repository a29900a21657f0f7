"""Redis connections and the translation of their failures into ``BackendUnavailableError``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.exceptions import OperationalError

from producer.errors import BackendUnavailableError

BACKEND_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OperationalError, OSError)


def redact(url: str) -> str:
    """``url`` without its password, safe to log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def connect(url: str) -> redis.Redis:
    """A pooled client; it connects on first use. Binary replies: vectors are bytes."""
    return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)


@contextmanager
def backend_errors(role: str, url: str) -> Iterator[None]:
    """Re-raise connection and command failures as ``BackendUnavailableError`` naming the Redis."""
    try:
        yield
    except BACKEND_ERRORS as e:
        raise BackendUnavailableError(f"{role} Redis at {redact(url)} failed: {e}") from e
