"""OpenAI's embeddings wire format: the request checked field by field, the response built.

Hand-written rather than a pydantic model: every refusal must say which field
and which ``input`` index is wrong, in OpenAI's error shape, and the hot path of
a cached single text should cost microseconds, not a validation framework.
"""

from __future__ import annotations

import base64
import json
import numbers
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from embq.producer import keys
from embq.producer.errors import InvalidInputError
from embq.producer.gateway.errors import APIError, bad_items
from embq.producer.validation import item_problem, validate_texts

#: Characters per token of the ``usage`` estimate: embq's workers budget batches with the same ratio.
CHARS_PER_TOKEN = 4
ENCODINGS = ("float", "base64")
#: Far above any model's dimension: a larger ``dimensions`` is refused before it is used.
MAX_DIMENSIONS = 1 << 20


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None
    #: embq's extension: a query instruction (part of the cache key), e.g. for Qwen3-Embedding.
    instruction: str
    #: embq's extension: the lane (``interactive``, the default, or ``bulk``); the header
    #: ``X-Embq-Priority`` says the same for clients that cannot add a field.
    priority: str | None = None
    #: TEI's field: cut texts over the model's context instead of failing them; None (absent) takes
    #: the gateway's default (``embq serve --truncate``, ``EMBQ_TRUNCATE``).
    truncate: bool | None = None


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def parse_embedding_request(data: dict[str, Any], *, max_texts: int, max_text_bytes: int) -> EmbeddingRequest:
    """Check every field; unknown fields (``user`` among them) are ignored, as most OpenAI-compatible servers do."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the model id, as listed by GET /v1/models", param="model")
    texts = parse_input(data.get("input"), max_texts=max_texts, max_text_bytes=max_text_bytes)
    encoding = data.get("encoding_format")
    if encoding is None:
        encoding = "float"  # OpenAI's default; the openai client always asks for base64 itself
    if encoding not in ENCODINGS:
        raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", param="encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, numbers.Integral)
        or not 0 < int(dimensions) <= MAX_DIMENSIONS
    ):
        raise APIError(
            400,
            f"'dimensions' must be a positive integer no larger than the model's dimension, got {clipped(dimensions)}",
            code="invalid_dimensions",
            param="dimensions",
        )
    instruction = data.get("instruction", "")
    problem = item_problem(instruction, max_text_bytes)
    if problem is not None:
        raise APIError(400, f"'instruction' {problem}", param="instruction")
    priority = data.get("priority")
    if priority is not None and priority not in keys.LANES:
        raise APIError(
            400,
            f"'priority' must be 'interactive' or 'bulk', got {clipped(priority)}",
            param="priority",
            code="invalid_priority",
        )
    truncate = data.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise APIError(400, f"'truncate' must be true or false, got {clipped(truncate)}", param="truncate")
    return EmbeddingRequest(
        model, texts, encoding, None if dimensions is None else int(dimensions), instruction, priority, truncate
    )


def clipped(value: Any, most: int = 40) -> str:
    """``repr(value)`` cut to ``most`` characters: a refusal never echoes a huge value."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit conversion limit
        return f"an integer of over {sys.get_int_max_str_digits():,} digits"
    return text if len(text) <= most else f"{text[: most - 3]}... ({len(text):,} characters)"


def parse_input(value: Any, *, max_texts: int, max_text_bytes: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise APIError(400, f"'input' must be a string or a list of strings, got {type(value).__name__}", param="input")
    if not value:
        raise APIError(400, "'input' is an empty list: send at least one text", param="input")
    if is_token_ids(value):
        raise APIError(
            400,
            "'input' holds token ids; embq embeds text only (its workers tokenise with the model's own "
            "tokenizer): send the texts as strings",
            code="token_ids_unsupported",
            param="input",
        )
    if len(value) > max_texts:
        raise APIError(
            413,
            f"'input' has {len(value)} texts, over the limit of {max_texts} per request: split it",
            code="too_many_inputs",
            param="input",
        )
    try:
        return validate_texts(value, max_text_bytes)
    except InvalidInputError as e:
        raise bad_items(e.problems) from e


def is_token_ids(value: list[Any]) -> bool:
    """``[1, 2, 3]`` or ``[[1, 2], [3]]``: what OpenAI also accepts and embq does not."""

    def ints(items: list[Any]) -> bool:
        return bool(items) and all(isinstance(i, int) and not isinstance(i, bool) for i in items)

    return ints(value) or all(isinstance(v, list) and ints(v) for v in value)


def estimate_tokens(texts: list[str]) -> int:
    """``usage``'s count: an estimate (characters / 4, at least 1 a text), not the model's tokenizer."""
    return sum(max(1, -(-len(t) // CHARS_PER_TOKEN)) for t in texts)


def embedding_response(request: EmbeddingRequest, vectors: np.ndarray) -> dict[str, Any]:
    """OpenAI's response body. ``base64`` is the raw little-endian float32 bytes of each vector."""
    if request.encoding_format == "base64":
        little = np.ascontiguousarray(vectors, dtype="<f4")
        rows: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        rows = vectors.tolist()
    tokens = estimate_tokens(request.texts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
