"""The broker behind Redis Sentinel: one URL names the sentinels and the master's name.

``EMBQ_BROKER_URL=sentinel://[[user]:password@]host:port[;sentinel://host:port...][/db]?master_name=NAME``
is Kombu's own form (sentinels joined by ``;``; the password and database of the
first apply to the master) with the master's name, which Kombu takes as the
transport option ``master_name``, carried in the URL so that one setting says it
all. Celery gets the sentinels and the transport option; embq's own connections
(the producer's look for lost tasks, the worker's start-up probes,
``embq status``) ask the sentinels for the master with redis-py's ``Sentinel``
and follow it when it fails over. The sentinels themselves are reached without a
password, as Kombu does by default, unless ``sentinel_password=PASSWORD`` (also in
the query) gives theirs: Kombu then gets it in its transport option
``sentinel_kwargs``. The database goes on the first part, where Kombu reads it: one
on another part that differs is refused rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

SCHEME = "sentinel"
#: Kombu's transport option, and the URL's query parameter that carries it.
MASTER_NAME = "master_name"
#: The URL's query parameter for the sentinels' own password (Kombu: ``sentinel_kwargs``).
SENTINEL_PASSWORD = "sentinel_password"
DEFAULT_PORT = 26379
#: Seconds to connect to, and to hear from, a sentinel: a sentinel that hangs is skipped for the next.
SENTINEL_TIMEOUT = 5.0


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    master: str
    #: The master's password, user and database (the first URL's, as Kombu reads them).
    password: str | None
    username: str | None
    db: int
    #: The sentinels' own password, when they require one.
    sentinel_password: str | None = None


#: The sentinels' password in a URL's query, for ``hide_password``.
_SENTINEL_SECRET = re.compile(rf"({SENTINEL_PASSWORD}=)[^&;#]*")


def hide_password(url: str) -> str:
    """``url`` with the sentinels' password of its query masked (the master's is in the netloc)."""
    return _SENTINEL_SECRET.sub(r"\1***", url)


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse(url: str) -> SentinelURL:
    """Raises ``ValueError`` saying what is missing."""
    parts = [urlsplit(part) for part in url.split(";") if part]
    master, sentinel_password = "", ""
    for part in parts:
        query = dict(parse_qsl(part.query))
        master = query.get(MASTER_NAME, master)
        sentinel_password = query.get(SENTINEL_PASSWORD, sentinel_password)
        if any(key.startswith("ssl") for key in query):
            raise ValueError("TLS to a Sentinel broker is not supported: the connection would not be encrypted")
    if not master:
        raise ValueError(f"it names no master: add ?{MASTER_NAME}=NAME (the name the sentinels monitor)")
    sentinels = []
    for part in parts:
        if part.scheme != SCHEME or not part.hostname:
            raise ValueError(f"every part must be sentinel://host:port, got {part.scheme}://{part.hostname or ''}")
        sentinels.append((part.hostname, part.port or DEFAULT_PORT))
    first = parts[0]
    db = first.path.lstrip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    for part in parts[1:]:
        other = part.path.lstrip("/")
        if other and other != db:
            raise ValueError(f"database {other!r} on a later sentinel: give it on the first, where Kombu reads it")
    return SentinelURL(
        sentinels, master, first.password or None, first.username or None, int(db), sentinel_password or None
    )


def transport_options(url: str) -> dict[str, Any]:
    """Kombu's transport options for ``url``: the master's name, and the sentinels' password if any."""
    found = parse(url)
    options: dict[str, Any] = {MASTER_NAME: found.master}
    if found.sentinel_password:
        options["sentinel_kwargs"] = _sentinel_kwargs(found, {})
    return options


def _sentinel_kwargs(found: SentinelURL, options: dict[str, Any]) -> dict[str, Any]:
    """How to ask a sentinel: the client's timeouts, else ``SENTINEL_TIMEOUT``; its password if it needs one."""
    kwargs = {k: options.get(k) or SENTINEL_TIMEOUT for k in ("socket_timeout", "socket_connect_timeout")}
    if found.sentinel_password:
        kwargs["password"] = found.sentinel_password
    return kwargs


def kombu_url(url: str) -> str:
    """``url`` without ``master_name`` and ``sentinel_password`` (Kombu takes them as transport options)."""
    return ";".join(_without_master(part) for part in url.split(";") if part)


def _without_master(part: str) -> str:
    parts = urlsplit(part)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in (MASTER_NAME, SENTINEL_PASSWORD)])
    return urlunsplit(parts._replace(query=query))


E = TypeVar("E", bound=Exception)

#: How redis-py names a sentinel in ``MasterNotFoundError``: the repr of its client, every option included.
_SENTINEL_REPR = re.compile(r"<redis\.[\w.]*Redis\(<.*?[(,]host=([^,>]+),port=(\d+)[,>].*?\)>\)>\)>")


def short_reason(error: E) -> E:
    """``error`` naming each sentinel that failed by ``host:port`` rather than by its client's repr (a
    kilobyte each), so that what it says fits the one line it is logged in."""
    text = str(error)
    short = _SENTINEL_REPR.sub(r"sentinel \1:\2", text)
    return error if short == text else type(error)(short)


class _Sentinel(redis.sentinel.Sentinel):
    def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return super().discover_master(service_name)  # type: ignore[no-any-return]
        except redis.sentinel.MasterNotFoundError as e:
            raise short_reason(e) from None


class _AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    async def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return await super().discover_master(service_name)  # type: ignore[no-any-return]
        except redis.asyncio.sentinel.MasterNotFoundError as e:
            raise short_reason(e) from None


def master_client(url: str, **options: Any) -> redis.Redis:
    """A client of the current master; it asks the sentinels again when its connection fails."""
    found = parse(url)
    sentinel = _Sentinel(found.sentinels, sentinel_kwargs=_sentinel_kwargs(found, options))
    return sentinel.master_for(found.master, password=found.password, username=found.username, db=found.db, **options)


def amaster_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """``master_client`` for redis-py's asyncio client."""
    found = parse(url)
    sentinel = _AsyncSentinel(found.sentinels, sentinel_kwargs=_sentinel_kwargs(found, options))
    return sentinel.master_for(found.master, password=found.password, username=found.username, db=found.db, **options)
