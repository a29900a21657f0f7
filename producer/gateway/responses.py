"""Compact JSON responses, errors included."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from embq.producer.gateway.errors import APIError


class JSON(Response):
    """Like Starlette's ``JSONResponse``; NaN refused (a vector never holds one here)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def error_response(error: APIError) -> JSON:
    return JSON(error.body(), status_code=error.status, headers=error.headers)
