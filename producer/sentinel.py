"""The broker behind Redis Sentinel: one URL names the sentinels and the master's name.

``EMBQ_BROKER_URL=sentinel://[[user]:password@]host:port[;sentinel://host:port...][/db]?master_name=NAME``
is Kombu's own form (sentinels joined by ``;``; the password and database of the
first apply to the master) with the master's name, which Kombu takes as the
transport option ``master_name``, carried in the URL so that one setting says it
all. Celery gets the sentinels and the transport option; embq's own connections
(the producer's look for lost tasks, the worker's start-up probes,
``embq status``) ask the sentinels for the master with redis-py's ``Sentinel``
and follow it when it fails over. The sentinels themselves are reached without a
password (``sentinel_kwargs``), as Kombu does by default.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

SCHEME = "sentinel"
#: Kombu's transport option, and the URL's query parameter that carries it.
MASTER_NAME = "master_name"
DEFAULT_PORT = 26379


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    master: str
    #: The master's password, user and database (the first URL's, as Kombu reads them).
    password: str | None
    username: str | None
    db: int


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse(url: str) -> SentinelURL:
    """Raises ``ValueError`` saying what is missing."""
    parts = [urlsplit(part) for part in url.split(";") if part]
    master = ""
    for part in parts:
        master = dict(parse_qsl(part.query)).get(MASTER_NAME, master)
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
    return SentinelURL(sentinels, master, first.password or None, first.username or None, int(db))


def kombu_url(url: str) -> str:
    """``url`` without ``master_name`` (Kombu wants it as a transport option, not in the URL)."""
    return ";".join(_without_master(part) for part in url.split(";") if part)


def _without_master(part: str) -> str:
    parts = urlsplit(part)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != MASTER_NAME])
    return urlunsplit(parts._replace(query=query))


def master_client(url: str, **options: Any) -> redis.Redis:
    """A client of the current master; it asks the sentinels again when its connection fails."""
    found = parse(url)
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = redis.sentinel.Sentinel(found.sentinels, sentinel_kwargs=timeouts)
    return sentinel.master_for(found.master, password=found.password, username=found.username, db=found.db, **options)


def amaster_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """``master_client`` for redis-py's asyncio client."""
    found = parse(url)
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = redis.asyncio.sentinel.Sentinel(found.sentinels, sentinel_kwargs=timeouts)
    return sentinel.master_for(found.master, password=found.password, username=found.username, db=found.db, **options)
