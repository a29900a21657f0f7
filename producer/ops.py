"""What the dispatcher asks its drivers to do (``embq.producer.dispatcher``): each op is answered with its
result, or its exception, by a driver that does the I/O (threads: ``embq.producer.client``, asyncio:
``embq.producer.aio``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from embq.producer import keys, protocol
from embq.producer.broker import HELD_SCRIPT
from embq.producer.contract import EmbedPayload


@dataclass(frozen=True)
class Redis:
    """Run ``commands`` on the ``cache`` or the ``broker`` Redis in one round trip; returns their replies.

    ``scripts`` holds the source of every script an EVALSHA names (by its SHA1),
    for the driver to load into a Redis that does not know it yet."""

    target: str
    commands: list[tuple[Any, ...]]
    scripts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PerText:
    """Run ``embq.producer.protocol``'s script ``name`` ("claim", "release") over ``digests`` in the cache, ARGV
    ``args`` then the digests end to end: one round trip on one Redis, one per node on a cluster
    (``embq.producer.client.on_cache``). Returns the script's reply over all of ``digests``."""

    name: str
    args: list[Any]
    digests: list[str]

    def on_one_redis(self) -> Redis:
        """The same as one EVALSHA, for a single Redis."""
        source = protocol.CLAIM if self.name == "claim" else protocol.RELEASE
        sha = hashlib.sha1(source.encode()).hexdigest()
        return Redis("cache", [("EVALSHA", sha, 0, *self.args, "".join(self.digests))], {sha: source})


@dataclass(frozen=True)
class Look:
    """The cache's values of ``digests`` (vectors, claims or None), in order."""

    digests: list[str]

    def on_one_redis(self) -> Redis:
        return Redis("cache", [("MGET", *(keys.vector_key(d) for d in self.digests))] if self.digests else [])


@dataclass(frozen=True)
class Read:
    """XREAD our stream after ``last_id``, blocking up to ``block`` seconds (0: do not block); a call
    that arrives meanwhile wakes it."""

    last_id: Any
    block: float


@dataclass(frozen=True)
class Send:
    """Publish Celery tasks ``(task id, payload)`` to the model's queue."""

    tasks: list[tuple[str, EmbedPayload]]


@dataclass(frozen=True)
class Wait:
    """Nothing to read: wait for a call to arrive, at most ``timeout`` seconds (None: as long as it takes)."""

    timeout: float | None


@dataclass(frozen=True)
class Pause:
    """Sleep ``seconds``: calls that arrive meanwhile join the next round trip."""

    seconds: float


Op = Redis | PerText | Look | Read | Send | Wait | Pause

SCRIPTS = {"held": HELD_SCRIPT}
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}


def script(name: str, keys: list[str], args: list[Any], target: str = "cache") -> Redis:
    return Redis(target, [("EVALSHA", SHAS[name], len(keys), *keys, *args)], {SHAS[name]: SCRIPTS[name]})
