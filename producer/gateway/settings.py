"""What the gateway adds to the shared settings: keys, request limits, its time limit.

Read from the environment once, by ``embq serve``; the shared ``Settings``
(Redis URLs, cache namespace, ...) come from the same environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embq.producer.settings import read_env


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """Limits of one HTTP request and who may send one."""

    #: Bearer keys accepted on ``/v1/*``; empty means no key is asked for
    #: (``embq serve`` says so at start). Comma-separated in ``EMBQ_API_KEYS``.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Texts in one request. OpenAI's own limit; a larger batch is one
    #: ``embed`` call anyway, so this bounds memory per request, not speed.
    max_request_texts: int = 2048
    #: Bytes of one request body. OpenAI caps a request at 300,000 tokens
    #: (about 1.2 MB of English); 8 MiB leaves room for JSON escapes of other
    #: scripts while bounding what a single request can make the gateway hold.
    max_request_bytes: int = 8 * 1024 * 1024
    #: Seconds a request waits for its vectors before a 504. What was computed
    #: is cached and the rest is dropped (nobody waits for it), so a retry (the
    #: ``openai`` client retries 504 by itself) computes only the rest; raise it
    #: for large uncached batches.
    request_timeout: float = 60.0
    #: Connections and requests the gateway holds at once; past it, new ones get 503 at once. Each
    #: waiting request costs little (an asyncio task); the limit bounds a flood, not normal load.
    max_connections: int = 4096
    #: Models always served, with or without a worker online (``--model``).
    models: tuple[str, ...] = ()
    #: Whether texts over the model's context are cut there, for requests without the field
    #: ``truncate`` (TEI's ``--auto-truncate``): for clients that cannot add one (``openai`` without
    #: ``extra_body``, LangChain's ``OpenAIEmbeddings``). Any worker serves both kinds.
    truncate: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        env = os.environ if environ is None else environ
        values = read_env(cls, env, ENV_NAMES)
        keys = tuple(k.strip() for k in env.get("EMBQ_API_KEYS", "").split(",") if k.strip())
        if keys:
            values["api_keys"] = keys
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


ENV_NAMES: dict[str, str] = {
    "max_request_texts": "EMBQ_MAX_REQUEST_TEXTS",
    "max_request_bytes": "EMBQ_MAX_REQUEST_BYTES",
    "request_timeout": "EMBQ_REQUEST_TIMEOUT",
    "max_connections": "EMBQ_MAX_CONNECTIONS",
    "truncate": "EMBQ_TRUNCATE",
}
