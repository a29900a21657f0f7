"""Errors in OpenAI's JSON shape, with the status codes the ``openai`` client maps to its exceptions.

``{"error": {"message", "type", "param", "code"}}``; the client raises
``BadRequestError`` (400), ``AuthenticationError`` (401), ``NotFoundError``
(404), ``UnprocessableEntityError`` (422) and ``APIStatusError`` subclasses for
the rest, and retries 408, 409, 429 and 5xx by itself (twice by default).
"""

from __future__ import annotations

import logging

from embq.producer.errors import (
    BackendUnavailableError,
    EmbqError,
    EmbqTimeoutError,
    InvalidInputError,
    ItemFailedError,
    ModelNotServedError,
)

log = logging.getLogger(__name__)

#: Failing indices named in a message; the body's ``failed`` lists them all.
SHOWN = 5

INVALID = "invalid_request_error"
SERVER = "server_error"


class APIError(Exception):
    """Raised by a handler to answer with OpenAI's error body and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        code: str | None = None,
        param: str | None = None,
        failed: dict[int, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.failed = failed
        self.headers = headers

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.failed is not None:  # embq's addition: every offending index, as a JSON object
            error["failed"] = {str(i): reason for i, reason in sorted(self.failed.items())}
        return {"error": error}


def name_items(problems: dict[int, str], what: str) -> str:
    shown = "; ".join(f"input[{i}] {reason}" for i, reason in sorted(problems.items())[:SHOWN])
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return f"{len(problems)} input item(s) {what}: {shown}{more}"


def bad_items(problems: dict[int, str]) -> APIError:
    return APIError(
        400,
        name_items(problems, "cannot be embedded, nothing was computed") + ". Fix or drop them and resend.",
        code="invalid_input",
        param="input",
        failed=problems,
    )


def from_embq(error: EmbqError, *, model: str, timeout: float) -> APIError:
    """The HTTP answer to an error of ``AsyncEmbeddingClient.embed``.

    ``InvalidInputError`` without item problems can only concern ``dimensions``
    here: every other argument was checked before the call.
    """
    if isinstance(error, InvalidInputError):
        if error.problems:
            return bad_items(error.problems)
        return APIError(400, f"'dimensions' is impossible: {error}", code="invalid_dimensions", param="dimensions")
    if isinstance(error, ItemFailedError):
        # 422, not 500: the worker refused these texts (over the model's context, say) and would
        # again, while the openai client retries every 5xx. Their batch-mates are cached.
        return APIError(
            422,
            name_items(error.failures, "failed in the worker")
            + ". The other items are cached: resend without the failed ones.",
            code="item_failed",
            param="input",
            failed=error.failures,
        )
    if isinstance(error, ModelNotServedError):
        return APIError(404, f"The model {model!r} does not exist: {error}", code="model_not_found", param="model")
    if isinstance(error, EmbqTimeoutError):
        return APIError(
            504,
            f"{error.missing} of {error.total} vectors were not ready within {timeout:g}s "
            f"(are workers serving {model!r}?). What was computed is cached and what was not is dropped: "
            "a retry computes only the rest.",
            type=SERVER,
            code="timeout",
        )
    if isinstance(error, BackendUnavailableError):
        log.error("backend unavailable: %s", error)  # the URL, redacted, stays in the gateway's log
        return APIError(
            503,
            "embq's Redis cannot be reached; retry later.",
            type=SERVER,
            code="backend_unavailable",
            headers={"Retry-After": "1"},
        )
    log.exception("embedding failed", exc_info=error)
    return APIError(500, f"embedding failed: {error}", type=SERVER, code="internal_error")
