"""What produces a model's cached vectors, claimed in the cache Redis so that no other kind of worker mixes in.

A cache key names the model id, not the engine behind it, so a ``hash`` worker
and a ``sentence-transformers`` worker started with one ``--model`` would both
write under that model's keys (see ``embq.producer.keys`` for the decision). Each
worker therefore computes its signature and compares it with the one stored at
``keys.signature_key``: before it loads its engine when it can tell (the hash
engine and local checkpoints can), and again, complete, before it consumes.
The first worker of a model stores its own (SET NX, TTL ``cache_ttl``); running
workers renew it with their heartbeat, so it lives as long as any vector it
vouches for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, cast

import redis

from embq.producer import keys
from embq.producer.cluster import CacheClient, connect_cache_once
from embq.producer.errors import ConfigurationError
from embq.producer.settings import Settings
from embq.worker.engines import Engine

log = logging.getLogger(__name__)

#: The fields two workers must agree on to share a cache. ``None`` means "not known yet" and is
#: not compared. Truncation is not among them: a call asks for a cut or not, every worker serves
#: both, and a cut text's vector has a key of its own (``keys.CUT_MARKER``). Signatures stored by
#: older workers still hold ``truncates`` and ``truncate_at``; they are not compared.
COMPARED = ("engine", "dim", "checkpoint", "template")
#: How engines that take no template put an instruction before a text.
PREFIX_TEMPLATE = "{instruction}{text}"


class SignatureConflict(ConfigurationError):
    """Raised when a worker's vectors could not match the ones cached for its model."""


def signature_of(engine: Engine) -> dict[str, Any]:
    """This engine's signature; before ``load`` some fields may be None (not known yet)."""
    return {
        "engine": engine.name,
        "dim": engine.dim or None,
        "checkpoint": engine.checkpoint(),
        # The instruction format changes the vector of every text sent with an instruction.
        "template": engine.format_query("{instruction}", "{text}"),
    }


def differences(stored: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The compared fields that both signatures know and that differ."""
    return [
        name
        for name in COMPARED
        if stored.get(name) is not None and mine.get(name) is not None and stored.get(name) != mine.get(name)
    ]


def describe(signature: dict[str, Any]) -> str:
    """One phrase a user can read: ``sentence-transformers engine, dim 384, checkpoint 1a2b3c4d5e6f``."""
    parts = [f"{signature.get('engine', '?')} engine"]
    dim = signature.get("dim")
    if dim:
        parts.append(f"dim {dim}")
    checkpoint = signature.get("checkpoint")
    if checkpoint is None:
        parts.append("checkpoint not known before downloading")
    elif checkpoint:
        digest, _, options = str(checkpoint).partition(" ")
        parts.append(f"checkpoint {digest[:12]}" + (f" ({options})" if options else ""))
    template = signature.get("template")
    if template and template != PREFIX_TEMPLATE:
        parts.append(f"instruction format {template!r}")
    if signature.get("by"):
        parts.append(f"claimed by worker {signature['by']}")
    return ", ".join(parts)


def preflight(engine: Engine, settings: Settings, timeout: float) -> None:
    """Before Celery starts (so before its banner and any weights): raise ``SignatureConflict`` when what is
    known of ``engine`` already disagrees with the model's stored signature. A cache that cannot be read now
    is left to the worker's own start, which waits for it."""
    try:
        client = connect_cache_once(settings.cache, timeout=timeout)
    except redis.exceptions.RedisError as e:
        log.debug("signature not checked before start: %s", e)
        return
    try:
        SignatureGuard(client, settings).check(signature_of(engine))
    except redis.exceptions.RedisError as e:
        log.debug("signature not checked before start: %s", e)
    finally:
        client.close()


class SignatureGuard:
    """Checks, claims and renews one model's signature in the cache Redis."""

    def __init__(self, cache: CacheClient, settings: Settings) -> None:
        self.cache = cache
        self.model = settings.model
        self.namespace = settings.cache_namespace
        self.key = keys.signature_key(settings.cache_namespace, settings.model)
        self.ttl = settings.cache_ttl
        self.by = f"{socket.gethostname()}:{os.getpid()}"
        self.mine: dict[str, Any] | None = None

    def stored(self) -> dict[str, Any] | None:
        raw = self.cache.get(self.key)
        if raw is None:
            return None
        try:
            value = json.loads(cast(bytes, raw))
        except ValueError:
            value = None
        return value if isinstance(value, dict) else {"engine": "unreadable signature"}

    def conflict(self, stored: dict[str, Any], mine: dict[str, Any]) -> SignatureConflict | None:
        fields = differences(stored, mine)
        if not fields:
            return None
        return SignatureConflict(
            f"the cache already holds vectors of model {self.model!r} (cache namespace {self.namespace!r}) "
            f"from a {describe(stored)}; this worker is a {describe(mine)}: their vectors cannot be mixed "
            f"(they differ in {', '.join(fields)}). Serve this engine under another model id (--model), "
            "another cache namespace (EMBQ_CACHE_NAMESPACE), or, once no worker of the other kind runs, "
            "empty the cache with `embq cache clear`"
        )

    def check(self, mine: dict[str, Any]) -> None:
        """Before loading: raise ``SignatureConflict`` if what is known already disagrees."""
        stored = self.stored()
        error = self.conflict(stored, mine) if stored is not None else None
        if error is not None:
            raise error

    def claim(self, mine: dict[str, Any]) -> None:
        """Before consuming, with the complete signature: store it if none is, else agree with it or raise."""
        self.mine = mine
        error = self.renew()
        if error is not None:
            raise error

    def renew(self) -> SignatureConflict | None:
        """Keep the signature alive (or put it back after it was removed); the conflict if another replaced it."""
        if self.mine is None:
            return None
        value = json.dumps({**self.mine, "by": self.by}, sort_keys=True)
        for _ in range(3):  # absent, then claimed by another between our GET and SET: read again
            stored = self.stored()
            if stored is None:
                if self.cache.set(self.key, value, nx=True, ex=self.ttl):
                    log.info("claimed the signature of %s: %s", self.model, describe(self.mine))
                    return None
                continue
            error = self.conflict(stored, self.mine)
            if error is not None:
                return error
            self.cache.expire(self.key, self.ttl)
            return None
        return None
