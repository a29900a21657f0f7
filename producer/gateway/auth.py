"""Bearer keys on ``/v1/*``; ``/health`` and ``/metrics`` stay open for probes and Prometheus."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from embq.producer.gateway.errors import APIError
from embq.producer.gateway.responses import error_response

PROTECTED = "/v1/"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeys:
    """Compares digests in constant time and checks every key, so timing tells nothing about any of them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: bytes) -> bool:
        offered = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(offered, digest)
        return found


def refusal(authorization: bytes | None, keys: ApiKeys) -> APIError | None:
    """None when ``authorization`` (the raw header) carries an accepted key, else the 401 to send."""
    scheme, _, token = (authorization or b"").partition(b" ")
    if not authorization or scheme.lower() != b"bearer" or not token.strip():
        message = "no API key: send it in an 'Authorization: Bearer KEY' header (the openai client's api_key)"
    elif not keys.accepts(token.strip()):
        message = "incorrect API key; the gateway's keys are set in EMBQ_API_KEYS"
    else:
        return None
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BearerAuth:
    """ASGI middleware: requests under ``/v1/`` need one of ``keys``; none at all means open."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            error = refusal(header, self.keys)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
