"""Cache values: a tiny header and the raw vector, never pickle.

Layout (little-endian): ``b"EQ"``, version byte, dtype code byte, ``uint32`` dim,
then ``dim`` floats. The header makes a value self-describing, so a reader can
reject a value of the wrong size or kind without knowing the model; anything
that does not check out reads as a miss.

A value must also be one the model could have made: every engine returns
unit vectors (``embq.worker.engines.Engine``), so a vector whose length is not 1
(a zero vector, huge or non-finite floats) is a miss, and so is one of another
dimension than the model's when the reader knows it (the signature its workers
store). A miss is computed again and its key overwritten.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"EQ"
VERSION = 1
#: A key whose vector is being computed holds a claim (``embq.producer.protocol``): this header, version 0.
CLAIM_PREFIX = MAGIC + b"\x00"
HEADER = struct.Struct("<2sBBI")
DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_CODES: dict[str, int] = {"float32": 1, "float16": 2}
#: How far a stored vector's length may be from 1: float16 storage moves it by ~5e-4.
UNIT_TOLERANCE = 0.01


def pack(vector: np.ndarray, dtype: str = "float32") -> bytes:
    """Encode one full-dimension vector; ``float16`` halves the memory at ~1e-3 precision."""
    code = DTYPE_CODES[dtype]
    flat = np.ascontiguousarray(vector, dtype=DTYPES[code]).reshape(-1)
    return HEADER.pack(MAGIC, VERSION, code, flat.shape[0]) + flat.tobytes()


def pack_rows(matrix: np.ndarray, dtype: str = "float32") -> tuple[memoryview, int]:
    """``pack`` for every row of ``matrix``, end to end in one buffer: ``(buffer, bytes per row)``.
    One conversion and one copy, however many rows; the buffer is a view, not a second copy."""
    code = DTYPE_CODES[dtype]
    rows = np.ascontiguousarray(matrix, dtype=DTYPES[code]).reshape(len(matrix), -1)
    width = HEADER.size + rows.shape[1] * rows.itemsize
    out = np.empty((len(rows), width), dtype=np.uint8)
    out[:, : HEADER.size] = np.frombuffer(HEADER.pack(MAGIC, VERSION, code, rows.shape[1]), dtype=np.uint8)
    out[:, HEADER.size :] = rows.view(np.uint8).reshape(len(rows), -1)
    return out.reshape(-1).data, width


def value_size(blob: bytes, offset: int = 0) -> int:
    """Bytes of the packed value that starts at ``offset`` (header included), per its header."""
    _, _, code, dim = HEADER.unpack_from(blob, offset)
    dtype = DTYPES.get(code)
    return HEADER.size + dim * (dtype.itemsize if dtype else 0)


def header_of(value: bytes) -> tuple[int, int] | None:
    """``(dtype code, dim)`` if ``value`` is a well-formed cache value, else None."""
    if len(value) < HEADER.size:
        return None
    magic, version, code, dim = HEADER.unpack_from(value)
    dtype = DTYPES.get(code)
    if magic != MAGIC or version != VERSION or dtype is None or dim == 0:
        return None
    if len(value) != HEADER.size + dim * dtype.itemsize:
        return None
    return code, dim


def unpack(value: bytes | None, dim: int | None = None) -> np.ndarray | None:
    """One value to a float32 vector; None for a miss or an invalid value."""
    matrix, valid = unpack_many([value], dim)
    return np.array(matrix[0]) if valid[0] else None  # a writable copy, not a view of the reply


def unpack_many(values: Sequence[bytes | None], dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode many values at once: ``(float32 matrix, valid mask)``; the matrix may be read-only.

    Rows whose value is missing, malformed, not a unit vector, or of another
    dimension than ``dim`` (the model's, when known; else the majority's) are
    invalid (their rows mean nothing). Values of one layout (the usual MGET of
    hits) are decoded by one ``frombuffer`` over their concatenation, headers
    compared by numpy; a mix (misses, claims, other layouts) is copied row by
    row. Both beat a fancy-indexed assignment, which cost 7 us a vector at dim 2560.
    """
    if values and None not in values and len(set(map(len, values))) == 1:  # type: ignore[arg-type]  # hits
        uniform = _unpack_uniform(b"".join(values), len(values), dim)  # type: ignore[arg-type]
        if uniform is not None:
            if not uniform[1].all():
                _log_invalid(values, uniform[1])
            return uniform
    values = [None if v is None or v[:3] == CLAIM_PREFIX else v for v in values]  # a claim is a miss
    headers = [header_of(v) if v is not None else None for v in values]
    if dim is None:
        dims = Counter(h[1] for h in headers if h is not None)
        dim = dims.most_common(1)[0][0] if dims else None
    valid = np.zeros(len(values), dtype=bool)
    if dim is None:
        _log_invalid(values, valid)
        return np.zeros((len(values), 0), dtype=np.float32), valid
    matrix = np.zeros((len(values), dim), dtype=np.float32)
    for row, (value, header) in enumerate(zip(values, headers, strict=True)):
        if header is not None and header[1] == dim:
            matrix[row] = np.frombuffer(value, dtype=DTYPES[header[0]], offset=HEADER.size)  # type: ignore[arg-type]
            valid[row] = True
    valid &= unit_rows(matrix)
    _log_invalid(values, valid)
    return matrix, valid


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Which rows are unit vectors, within ``UNIT_TOLERANCE`` (False for non-finite rows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        squares = np.einsum("ij,ij->i", matrix, matrix)
    return np.asarray(np.abs(squares - 1) <= 2 * UNIT_TOLERANCE)


def _unpack_uniform(blob: bytes, count: int, dim: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``count`` values of one layout laid end to end: headers compared and floats read without a loop
    (a view for float32). None when they are not all alike, or not of dimension ``dim``."""
    width = len(blob) // count if count else 0
    first = header_of(blob[:width]) if width and width * count == len(blob) else None
    if first is None or (dim is not None and first[1] != dim):
        return None
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(count, -1)
    if not (rows[:, : HEADER.size] == rows[0, : HEADER.size]).all():
        return None
    matrix = rows[:, HEADER.size :].view(DTYPES[first[0]]).astype(np.float32, copy=False)
    return matrix, unit_rows(matrix)


def unpack_concat(blob: bytes, count: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``count`` packed values laid end to end (a notice's vectors): ``(matrix, valid mask)``."""
    uniform = _unpack_uniform(blob, count, dim)
    if uniform is not None:
        return uniform
    values: list[bytes | None] = []
    offset = 0
    for _ in range(count):
        if len(blob) - offset < HEADER.size:
            values.append(None)
            continue
        magic, version, code, width = HEADER.unpack_from(blob, offset)
        layout = DTYPES.get(code)
        size = HEADER.size + width * (layout.itemsize if layout else 0)
        if magic != MAGIC or version != VERSION or layout is None or size > len(blob) - offset:
            values.append(None)
            offset = len(blob)
            continue
        values.append(blob[offset : offset + size])
        offset += size
    return unpack_many(values, dim)


def _log_invalid(values: Sequence[bytes | None], valid: np.ndarray) -> None:
    bad = sum(1 for v, ok in zip(values, valid, strict=False) if v is not None and not ok)
    if bad:
        log.warning(
            "ignored %d invalid cache value(s) (wrong size, layout or dimension, or not a unit vector); "
            "they will be recomputed",
            bad,
        )


def truncate(matrix: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka read: keep the first ``dim`` components and L2-normalise again."""
    if dim is None or dim == matrix.shape[1]:
        return matrix
    head = np.array(matrix[:, :dim], dtype=np.float32)
    normalize_rows(head)
    return head


#: Rows normalised at a time: a whole-matrix norm would need a temporary as large as the result.
NORMALIZE_ROWS = 65_536


def normalize_rows(matrix: np.ndarray) -> None:
    """Scale each non-zero row of ``matrix`` to unit length, in place."""
    for start in range(0, len(matrix), NORMALIZE_ROWS):
        block = matrix[start : start + NORMALIZE_ROWS]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, norms, out=block, where=norms > 0)
