"""Input checks that run before anything touches Redis.

Every item is checked, not just the first bad one, so the error lists all
offending indices and a caller can resubmit exactly the good items.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from embq.producer.errors import InvalidInputError

#: Offending items named in the message itself; all of them are in ``problems``.
SHOWN_PROBLEMS = 5


def item_problem(item: Any, max_bytes: int) -> str | None:
    """What is wrong with one item, or None when it can be embedded."""
    if not isinstance(item, str):
        return f"is {type(item).__name__}, not str"
    if len(item) > max_bytes:  # a character is at least one byte: skip encoding giants
        return f"is {len(item):,} characters, over the limit of {max_bytes:,} UTF-8 bytes"
    if item.isascii():  # one byte a character, and no lone surrogate: nothing to encode
        return None
    try:
        size = len(item.encode("utf-8"))
    except UnicodeEncodeError as e:
        return f"is not valid UTF-8 (lone surrogate {item[e.start]!r} at position {e.start})"
    if size > max_bytes:
        return f"is {size:,} UTF-8 bytes, over the limit of {max_bytes:,}"
    return None


def validate_texts(texts: Any, max_bytes: int) -> list[str]:
    """Return ``texts`` as a list of str, or raise ``InvalidInputError`` naming every bad index."""
    if isinstance(texts, (str, bytes, bytearray)):
        raise InvalidInputError(
            f"texts must be a list of str, got a single {type(texts).__name__}; wrap it in a list: [text]"
        )
    if isinstance(texts, (set, frozenset, dict, Mapping)):
        raise InvalidInputError(
            f"texts must be ordered (a list, a tuple, a generator), got a {type(texts).__name__}: "
            "row i of the result is the vector of texts[i]"
        )
    if not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a list of str, got {type(texts).__name__}")
    items = list(texts)
    problems = {}
    for index, item in enumerate(items):
        problem = item_problem(item, max_bytes)
        if problem is not None:
            problems[index] = problem
    if problems:
        shown = "; ".join(f"texts[{i}] (index {i}) {p}" for i, p in list(problems.items())[:SHOWN_PROBLEMS])
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise InvalidInputError(
            f"{len(problems)} of {len(items)} texts cannot be embedded, nothing was sent: {shown}{more}",
            problems,
        )
    return items


def validate_options(instruction: Any, dim: Any, timeout: Any, max_bytes: int, truncate: Any = False) -> None:
    """Check the keyword arguments of ``embed`` with messages that name the argument."""
    if not isinstance(truncate, bool):
        raise InvalidInputError(f"truncate must be True or False, got {truncate!r}")
    problem = item_problem(instruction, max_bytes)
    if problem is not None:
        raise InvalidInputError(f"instruction {problem}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0):
        raise InvalidInputError(f"dim must be a positive int or None, got {dim!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < float(timeout) < math.inf
    ):
        raise InvalidInputError(f"timeout must be a positive, finite number of seconds or None, got {timeout!r}")
