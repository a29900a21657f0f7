"""OpenAI Batch files of ``/v1/embeddings`` requests: embq reads their input lines and writes their output lines.

A job moves between OpenAI's Batch API, vLLM's ``run-batch`` and embq unchanged.
Shapes followed (read in their sources):

- input line, OpenAI's ``BatchRequestInput`` and vLLM's
  (``vllm/entrypoints/openai/run_batch.py``): ``{"custom_id", "method": "POST",
  "url": "/v1/embeddings", "body": {"input": str | [str], "model",
  "dimensions"?, "encoding_format"?: "float" | "base64"}}``;
- output line, OpenAI's ``BatchRequestOutput`` (OpenAPI spec, as vLLM mirrors
  it): ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error": null | {"code", "message"}}``;
- ``body`` of a success, openai-python's ``CreateEmbeddingResponse``:
  ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
  "model", "usage": {"prompt_tokens", "total_tokens"}}``; ``base64`` is the
  little-endian float32 bytes, as OpenAI sends them.

Where embq differs, on purpose: every request is embedded by the client's model
(a batch serves one model, as OpenAI's does; the body's ``model`` is not
checked); token arrays as ``input`` are refused (embq embeds text); ``usage``
counts are 0 (producers do not tokenise); a failed request has both a
``response`` with status 400 (bad request) or 422 (a text the worker refused,
as the gateway answers) and an ``error``, so a consumer that checks either
finds it; ``id`` and
``request_id`` are derived from the ``custom_id`` and the line, so a rerun
writes the same file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from embq.producer.codec import truncate

ENDPOINT = "/v1/embeddings"
ENCODINGS = ("float", "base64")


@dataclass
class BatchRequest:
    """One request line: the texts it contributes to the job, or why it cannot run."""

    custom_id: str
    line: int
    #: Texts this request adds to the job's rows (0 when ``error`` is set).
    inputs: int = 0
    dimensions: int | None = None
    encoding: str = "float"
    #: Why the request is refused before any work (it is answered with status 400).
    error: str | None = None


def is_batch_record(record: Any) -> bool:
    """Whether a parsed JSON line looks like a Batch API request (and not a plain record)."""
    return isinstance(record, dict) and "custom_id" in record and "body" in record and "url" in record


def parse_request(record: Any, line: int) -> tuple[BatchRequest, list[str]]:
    """The request and its texts; a request embq cannot serve comes back with ``error`` set and no texts.

    Raises ``ValueError`` for a line that is not a Batch request at all (no
    ``custom_id``): the file is then not a Batch file, and nothing can answer it.
    """
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        raise ValueError("not an OpenAI Batch request: it needs a string 'custom_id'")
    request = BatchRequest(custom_id=record["custom_id"], line=line)
    body = record.get("body")
    url = record.get("url")
    method = record.get("method", "POST")
    if url != ENDPOINT:
        request.error = f"url {url!r} is not supported: embq serves {ENDPOINT}"
    elif str(method).upper() != "POST":
        request.error = f"method {method!r} is not supported: use POST"
    elif not isinstance(body, dict):
        request.error = "body must be a JSON object"
    else:
        texts, request.error = _inputs(body.get("input"))
        if request.error is None:
            request.error = _options(request, body)
        if request.error is None:
            request.inputs = len(texts)
            return request, texts
    return request, []


def _inputs(value: Any) -> tuple[list[str], str | None]:
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, None
    if isinstance(value, list) and not value:
        return [], "'input' must not be empty"
    if isinstance(value, list) and all(isinstance(v, int | list) for v in value):
        return [], "'input' holds token ids; embq embeds text: send strings"
    return [], "'input' must be a string or a list of strings"


def _options(request: BatchRequest, body: dict[str, Any]) -> str | None:
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0:
            return f"'dimensions' must be a positive integer, got {dimensions!r}"
        request.dimensions = dimensions
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        return f"'encoding_format' must be one of {', '.join(ENCODINGS)}, got {encoding!r}"
    request.encoding = encoding
    return None


def _stable_id(prefix: str, request: BatchRequest) -> str:
    digest = hashlib.blake2b(f"{request.line}\0{request.custom_id}".encode(), digest_size=12, person=prefix.encode())
    return prefix + digest.hexdigest()


def success_line(request: BatchRequest, vectors: np.ndarray, model: str) -> dict[str, Any]:
    """The output line of a request whose every input has a vector (rows of ``vectors``, full dimension)."""
    if request.dimensions is not None and request.dimensions > vectors.shape[1]:
        return failure_line(
            request, f"'dimensions' {request.dimensions} exceeds the model's {vectors.shape[1]}", status=400
        )
    vectors = truncate(vectors, request.dimensions)
    data = [
        {"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding)}
        for index, vector in enumerate(vectors)
    ]
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    return _line(request, {"status_code": 200, "request_id": _stable_id("req_", request), "body": body}, None)


def failure_line(request: BatchRequest, message: str, *, status: int) -> dict[str, Any]:
    """The output line of a refused (400) request, or of one whose text the worker could not embed (422)."""
    kind, code = (
        ("invalid_request_error", "invalid_request") if status == 400 else ("invalid_request_error", "item_failed")
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = {"status_code": status, "request_id": _stable_id("req_", request), "body": body}
    return _line(request, response, {"code": code, "message": message})


def _line(request: BatchRequest, response: dict[str, Any], error: dict[str, str] | None) -> dict[str, Any]:
    line_id = _stable_id("batch_req_", request)
    return {"id": line_id, "custom_id": request.custom_id, "response": response, "error": error}


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()  # type: ignore[no-any-return]


def dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"))
