"""Outputs of ``embq embed`` and of pipeline steps, chosen by suffix, written a chunk at a time.

============  ================================================================
suffix        what each row becomes
============  ================================================================
``.parquet``  ``row`` (int64, input row) or the id column under its own name,
              ``embedding``: ``fixed_size_list<float32>[d]``, null for a failed row,
              and ``error``: why it failed (string), null for the others
``.jsonl``    ``{"row" | ID_FIELD: ..., "embedding": [...]}``; a failed row has
              ``"embedding": null`` and ``"error"``
``.npy``      row i of a float32 ``(rows, d)`` array, NaN for a failed row;
              written through a memory map of each chunk's rows when the row
              count is known first (a cheap first pass over a file), appended
              after a header completed at the end from a stream
Batch input   OpenAI Batch output lines (``embq.producer.files.openai_batch``), one per request
============  ================================================================

Everything is written to a hidden temporary file beside the output
(``.NAME.PID.embq-tmp``) and renamed over it at the end: a killed run never
leaves a truncated file that looks complete, and the next run removes the
temporary files of dead processes.
"""

from __future__ import annotations

import glob
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

import numpy as np

from embq.producer.errors import ConfigurationError, InvalidInputError
from embq.producer.files import openai_batch
from embq.producer.files.sources import Chunk

#: Output suffix -> format.
OUTPUT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npy": "npy"}
#: Vector bytes buffered per Parquet row group: big enough for efficient scans, small enough to bound memory.
ROW_GROUP_BYTES = 8 << 20
#: ... but never fewer rows than this per group, however wide the vectors.
ROW_GROUP_MIN_ROWS = 1024
TEMPORARY_SUFFIX = ".embq-tmp"


def temporary_name(path: Path, pid: int | None = None) -> Path:
    return path.with_name(f".{path.name}.{pid or os.getpid()}{TEMPORARY_SUFFIX}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove what killed runs left beside ``path``: temporary files of processes that no longer exist."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"):
        pid = stale.name[len(path.name) + 2 : -len(TEMPORARY_SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Sink(ABC):
    """Rows in input order, a chunk at a time, into a temporary file that ``commit`` renames."""

    def __init__(self, path: Path, *, id_field: str | None = None, width: int | None = None) -> None:
        self.path = path
        self.tmp = temporary_name(path)
        self.id_field = id_field
        #: Vector width; None until the first vectors say it (or ``--dim`` did).
        self.width = width
        self.rows = 0

    def write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None:
        """Rows ``chunk.first ..``: ``vectors`` (NaN rows where ``failed``), ``failed``: offset -> reason."""
        if chunk.first != self.rows:
            raise RuntimeError(f"rows out of order: got row {chunk.first}, expected {self.rows}")
        if self.width is None or (self.width == 0 and vectors.shape[1]):
            self.width = int(vectors.shape[1])
        self._write(chunk, vectors, failed)
        self.rows += len(chunk)

    @abstractmethod
    def _write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None: ...

    @abstractmethod
    def _close(self) -> None:
        """Finish the temporary file."""

    def commit(self) -> None:
        """Finish and rename into place; an empty input gets an empty output of the right shape."""
        if self.width is None:
            self.width = 0
        self._close()
        os.replace(self.tmp, self.path)

    def _discard(self) -> None:  # noqa: B027 (most sinks hold nothing open)
        """Release what an unfinished output holds open."""

    def abort(self) -> None:
        """Drop the unfinished output: the temporary file goes, an earlier output stays as it was."""
        try:
            self._discard()
        finally:
            self.tmp.unlink(missing_ok=True)


class NpySink(Sink):
    """A float32 ``(rows, width)`` array. With the row count known before the first row, each chunk is written
    through a memory map of its own rows only; from a stream (standard input, a pipe) rows are appended after
    a header whose room is reserved, and the header says their count at the end. Either way resident memory
    holds one chunk, not the file."""

    def __init__(self, path: Path, *, rows: int | None, width: int | None = None) -> None:
        super().__init__(path, width=width)
        self.expected = rows
        self.offset: int | None = None

    def _open(self, width: int) -> None:
        if self.expected is None:
            with open(self.tmp, "wb") as f:
                f.write(npy_header((0, width)))
            self.offset = STREAM_HEADER
            return
        array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(self.expected, width))
        self.offset = int(array.offset)
        del array  # unmapped: rows are mapped one chunk at a time

    def _write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None:
        if self.expected is not None and chunk.first + len(chunk) > self.expected:
            raise InvalidInputError(
                f"the input has more than the {self.expected} rows counted before the job: did it change meanwhile?"
            )
        width = self.width or 0
        if self.offset is None:
            self._open(width)
        if not len(chunk) or not width:
            return
        offset = (self.offset or 0) + chunk.first * width * 4
        if self.expected is None:
            with open(self.tmp, "r+b") as f:
                f.seek(offset)
                f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            return
        part = np.memmap(self.tmp, dtype=np.float32, mode="r+", offset=offset, shape=(len(chunk), width))
        part[:] = vectors
        part.flush()
        del part

    def _close(self) -> None:
        if self.offset is None:
            self._open(self.width or 0)
        if self.expected is None:
            with open(self.tmp, "r+b") as f:
                f.write(npy_header((self.rows, self.width or 0)))
        elif self.rows != self.expected:
            raise InvalidInputError(
                f"the input had {self.rows} rows, not the {self.expected} counted before the job: did it change?"
            )


#: Bytes of the header of a .npy written from a stream: room for any row count, a multiple of 64 as numpy aligns.
STREAM_HEADER = 128


def npy_header(shape: tuple[int, int]) -> bytes:
    """A version 1.0 .npy header for a float32 C-order array of ``shape``, padded to ``STREAM_HEADER`` bytes."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": shape})
    body = (text.ljust(STREAM_HEADER - 11) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + (STREAM_HEADER - 10).to_bytes(2, "little") + body


#: Python types of ids (from JSON lines) and the pyarrow type of the Parquet column that keeps them exactly.
ID_TYPES = {"int": "int64", "float": "float64", "str": "string", "bool": "bool_"}


def id_kind(ids: list[Any], first: int) -> str:
    """The one Python type of these ids ('' when all are missing); ``InvalidInputError`` naming the
    first row that differs, since a Parquet column would silently convert it (7.9 to 7, 1 to "1")."""
    kind = ""
    for offset, value in enumerate(ids):
        if value is None:
            continue
        name = type(value).__name__
        if name not in ID_TYPES:
            raise InvalidInputError(
                f"row {first + offset}: id {value!r} is a {name}; ids are text, numbers or booleans"
            )
        if kind and name != kind:
            raise InvalidInputError(
                f"row {first + offset}: id {value!r} is a {name} where earlier ids are {kind}s: a Parquet column "
                "holds one type. Make the ids one type, or write .jsonl, which keeps each id as it is"
            )
        kind = name
    return kind


def schema(id_name: str, id_type: Any, embedding: Any) -> Any:
    import pyarrow as pa

    return pa.schema([(id_name, id_type), ("embedding", embedding), ("error", pa.string())])


class ParquetSink(Sink):
    def __init__(self, path: Path, *, id_field: str | None = None, width: int | None = None) -> None:
        super().__init__(path, id_field=id_field, width=width)
        self.writer: Any = None
        self.schema: Any = None
        self.id_type: Any = None
        self.id_kind = ""
        self.buffer: list[Any] = []
        self.buffered = 0

    def _ids(self, chunk: Chunk) -> Any:
        import pyarrow as pa

        if self.id_field is None:
            return pa.array(np.arange(chunk.first, chunk.first + len(chunk), dtype=np.int64))
        ids = chunk.ids
        if isinstance(ids, pa.Array | pa.ChunkedArray):
            if self.id_type is None:
                self.id_type = ids.type
            return ids if ids.type == self.id_type else ids.cast(self.id_type)
        kind = id_kind(ids, chunk.first)
        if self.id_type is None:
            self.id_type = getattr(pa, ID_TYPES[kind])() if kind else pa.string()
            self.id_kind = kind
        elif kind and kind != self.id_kind:
            raise InvalidInputError(
                f"ids of rows {chunk.first + 1}..{chunk.first + len(chunk)} are {kind}s where earlier ids are "
                f"{self.id_kind}s: a Parquet column holds one type. Make the ids one type, or write .jsonl, "
                "which keeps each id as it is"
            )
        try:
            return pa.array(ids, self.id_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise InvalidInputError(f"ids of rows {chunk.first + 1}..{chunk.first + len(chunk)}: {e}") from e

    def _embeddings(self, vectors: np.ndarray, failed: dict[int, str]) -> Any:
        import pyarrow as pa

        width = self.width or 0
        kind = pa.list_(pa.float32(), width)
        if not width:
            return pa.nulls(len(vectors), kind)
        mask = np.zeros(len(vectors), dtype=bool)
        mask[list(failed)] = True
        values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
        return pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(mask) if failed else None)

    def _write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None:
        import pyarrow as pa

        errors = pa.array([failed.get(offset) for offset in range(len(chunk))], pa.string())
        columns = [self._ids(chunk), self._embeddings(vectors, failed), errors]
        if self.schema is None:
            self.schema = schema(self.id_field or "row", columns[0].type, columns[1].type)
        self.buffer.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.buffered += len(chunk)
        if self.buffered >= ROW_GROUP_MIN_ROWS and self.buffered * max(self.width or 0, 1) * 4 >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        if self.buffer:
            self.writer.write_table(pa.Table.from_batches(self.buffer, schema=self.schema))
        self.buffer, self.buffered = [], 0

    def _close(self) -> None:
        import pyarrow as pa

        if self.schema is None:  # no rows: the schema still says what rows would be
            id_type = self.id_type or (pa.int64() if self.id_field is None else pa.string())
            kind = pa.list_(pa.float32(), self.width or 0)
            self.schema = schema(self.id_field or "row", id_type, kind)
        self._flush()
        self.writer.close()

    def _discard(self) -> None:
        self.buffer = []
        if self.writer is not None:
            self.writer.close()


class LinesSink(Sink):
    """A text file of JSON lines, written a chunk at a time."""

    def __init__(self, path: Path, *, id_field: str | None = None, width: int | None = None) -> None:
        super().__init__(path, id_field=id_field, width=width)
        self.file: IO[str] | None = open(self.tmp, "w", encoding="utf-8", newline="\n")

    def _write_lines(self, lines: list[str]) -> None:
        assert self.file is not None
        self.file.write("\n".join(lines) + "\n" if lines else "")

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    _discard = _close


class JsonlSink(LinesSink):
    def _write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None:
        key = self.id_field or "row"
        if self.id_field is None:
            ids: Any = range(chunk.first, chunk.first + len(chunk))
        else:
            ids = chunk.ids.to_pylist() if hasattr(chunk.ids, "to_pylist") else chunk.ids
        lines = []
        for offset, (id_, vector) in enumerate(zip(ids, vectors, strict=True)):
            if offset in failed:
                record = {key: id_, "embedding": None, "error": failed[offset]}
            else:
                record = {key: id_, "embedding": vector.tolist()}
            lines.append(json.dumps(record, default=str))
        self._write_lines(lines)


class BatchSink(LinesSink):
    """OpenAI Batch output: one line per request, in the input's order.

    ``dimensions`` is the default for requests that name none (the vectors come full width)."""

    def __init__(self, path: Path, *, model: str, dimensions: int | None = None) -> None:
        super().__init__(path)
        self.model = model
        self.dimensions = dimensions
        #: Request lines written, and those that carry an ``error``.
        self.requests = 0
        self.failed_requests = 0

    def _write(self, chunk: Chunk, vectors: np.ndarray, failed: dict[int, str]) -> None:
        lines, start = [], 0
        for request in chunk.requests or ():
            if request.error is not None:
                line = openai_batch.failure_line(request, request.error, status=400)
            else:
                rows = range(start, start + request.inputs)
                bad = next((row for row in rows if row in failed), None)
                if bad is not None:
                    # As the gateway answers: 422 for a text the worker refused (it would again), not 5xx.
                    status = 400 if bad in chunk.problems else 422
                    message = f"input {bad - start}: {failed[bad]}"
                    line = openai_batch.failure_line(request, message, status=status)
                else:
                    if request.dimensions is None:
                        request.dimensions = self.dimensions
                    line = openai_batch.success_line(request, vectors[start : start + request.inputs], self.model)
                start += request.inputs
            self.requests += 1
            self.failed_requests += line["error"] is not None
            lines.append(openai_batch.dumps(line))
        self._write_lines(lines)


def output_format(path: Path) -> str:
    kind = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigurationError(
            f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; name it .parquet, .jsonl or .npy"
        )
    return kind


def open_sink(
    path: Path,
    *,
    rows: int | None,
    id_field: str | None = None,
    dim: int | None = None,
    batch: bool = False,
    model: str = "",
    input_path: Path | None = None,
) -> Sink:
    """Check the output before any work (format, directory, permission, not the input) and open it.

    ``rows`` is the input's row count (None when unknown, as from standard input:
    ``.npy`` then cannot be written). Raises ``ConfigurationError`` with one line that says what to fix.
    """
    kind = output_format(path)
    if path.is_dir():
        raise ConfigurationError(f"{path} is a directory; name an output file")
    if input_path is not None and path.resolve() == input_path.resolve():
        raise ConfigurationError(f"{path} is also the input; name another output file")
    if batch and kind != "jsonl":
        raise ConfigurationError(
            f"{path}: an OpenAI Batch input is answered with OpenAI Batch output lines; name a .jsonl output"
        )
    if id_field is not None and kind == "npy":
        raise ConfigurationError(f"{path}: a .npy holds only vectors; name a .parquet or .jsonl output to keep ids")
    if not path.parent.is_dir():
        raise ConfigurationError(f"{path.parent}: no such directory")
    remove_stale_temporaries(path)
    try:
        open(temporary_name(path), "wb").close()  # the real test of a permission: root passes every os.access
    except OSError as e:
        raise ConfigurationError(f"cannot write {path}: {e.strerror}") from e
    if batch:
        return BatchSink(path, model=model, dimensions=dim)
    if kind == "npy":
        return NpySink(path, rows=rows, width=dim)
    if kind == "parquet":
        return ParquetSink(path, id_field=id_field, width=dim)
    return JsonlSink(path, id_field=id_field, width=dim)
