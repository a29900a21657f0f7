"""Inputs of ``embq embed`` and of pipeline steps: rows of text in input order, a chunk at a time.

===========  ==================================================================================
format       one row per
===========  ==================================================================================
``txt``      line; only the line break (``\\n`` or ``\\r\\n``) is removed, nothing is stripped
``jsonl``    non-blank line: field ``field`` of its JSON object
``csv``      record: column ``field`` (quoted line breaks work; a record may be of any size)
``parquet``  record: column ``field``, read one record batch at a time
``batch``    input of an OpenAI Batch request (a ``.jsonl`` of ``/v1/embeddings`` requests)
===========  ==================================================================================

``-`` reads standard input (``txt`` unless ``input_format`` says otherwise), and
a path that is no regular file (a named pipe, ``<(command)``, a device) is read
the same way: once, as a stream, never counted or reopened. A
UTF-8 byte order mark opening the input is dropped, as readers of UTF-8 text
do. A row that cannot be embedded (not valid JSON, no such field) is not an
error of the file: it lands in ``Chunk.problems`` and fails alone. Memory holds
one chunk, whatever the size of the input; pyarrow is imported only for csv
for parquet, torch never.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from embq.producer.errors import InvalidInputError
from embq.producer.files.openai_batch import BatchRequest, is_batch_record, parse_request

#: The path that means standard input.
STDIN = "-"
BOM = b"\xef\xbb\xbf"
#: Bytes read at a time when counting lines.
COUNT_BLOCK = 1 << 20
#: Characters a CSV value may hold (the csv module's default, 131,072, would stop a job at one long
#: text; a text over ``max_text_bytes`` fails alone instead).
CSV_FIELD_LIMIT = (1 << 31) - 1

FORMATS = ("txt", "jsonl", "csv", "parquet")
#: Input suffix -> format; any other suffix is read as text, one text per line.
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Chunk:
    """Consecutive rows of the input, from row ``first`` on."""

    first: int
    #: One per row; a row named in ``problems`` is never sent (its text may be anything).
    texts: list[Any]
    #: The rows' ids (a list, or a pyarrow Array for csv and parquet), or None without ``id_field``.
    ids: Any = None
    #: Offset in the chunk -> why that row cannot be embedded.
    problems: dict[int, str] = field(default_factory=dict)
    #: Line number of each row, where rows are lines but not every line is a row (jsonl).
    lines: list[int] | None = None
    #: OpenAI Batch: the requests whose inputs are ``texts``, in order (refused ones have no rows).
    requests: list[BatchRequest] | None = None

    def __len__(self) -> int:
        return len(self.texts)


class Lines:
    """Byte lines (split at ``\\n`` only) numbered from 1, the BOM of the first dropped.

    A file is read anew by each iteration; standard input once, after the lines a peek kept.
    """

    def __init__(self, path: Path | None, stream: IO[bytes] | None = None) -> None:
        self.path = path
        self._stream = stream
        self._rest: Iterator[tuple[int, bytes]] | None = None
        self._head: list[tuple[int, bytes]] = []

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        if self.path is not None:
            with open(self.path, "rb") as f:
                yield from numbered(f)
            return
        rest = self._remaining()
        head, self._head = self._head, []
        yield from head
        yield from rest

    def _remaining(self) -> Iterator[tuple[int, bytes]]:
        if self._rest is None:
            self._rest = numbered(self._stream if self._stream is not None else sys.stdin.buffer)
        return self._rest

    def first(self, nonblank: bool = False) -> tuple[int, bytes] | None:
        """The first line (or first non-blank line); standard input keeps what it read for the next iteration."""
        if self.path is not None:
            return next((item for item in self if not nonblank or item[1].strip()), None)
        for item in self._head:
            if not nonblank or item[1].strip():
                return item
        for item in self._remaining():
            self._head.append(item)
            if not nonblank or item[1].strip():
                return item
        return None


def numbered(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(lines, 1):
        yield number, (line[len(BOM) :] if number == 1 and line.startswith(BOM) else line)


def text_of_line(line: bytes) -> str:
    """The line without its line break; invalid UTF-8 survives as lone surrogates, which validation names."""
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line.decode("utf-8", "surrogateescape")


class Source(ABC):
    """The rows of one input, read a chunk at a time."""

    #: ``txt``, ``jsonl``, ``csv``, ``parquet`` or ``batch``.
    format = ""

    def __init__(self, path: Path | None, field: str, id_field: str | None, name: str | None = None) -> None:
        #: The file, read as often as needed; None for a stream (standard input, a pipe), read once.
        self.path = path
        self.name = name or (str(path) if path is not None else "<stdin>")
        self.field = field
        self.id_field = id_field

    @abstractmethod
    def count(self) -> int | None:
        """Rows, by a cheap pass over the file (no JSON or CSV values are kept); None for standard input."""

    @abstractmethod
    def chunks(self, rows: int) -> Iterator[Chunk]:
        """The input in chunks of at most ``rows`` rows (a Batch chunk ends with a whole request)."""

    def empty(self) -> bool:
        return self.count() == 0

    def where(self, chunk: Chunk, offset: int) -> str:
        """Where a row is, for messages: its row as the output numbers it (from 0)."""
        return f"{self.name} row {chunk.first + offset}"


class TextSource(Source):
    format = "txt"

    def __init__(self, path: Path | None, lines: Lines, name: str | None = None) -> None:
        super().__init__(path, "", None, name)
        self.lines = lines

    def count(self) -> int | None:
        if self.path is None:
            return None
        rows, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while block := f.read(COUNT_BLOCK):
                rows += block.count(b"\n")
                last = block[-1:]
        return rows + (last != b"\n")

    def empty(self) -> bool:
        return self.lines.first() is None if self.path is None else super().empty()

    def chunks(self, rows: int) -> Iterator[Chunk]:
        first, texts = 0, []
        for _, line in self.lines:
            texts.append(text_of_line(line))
            if len(texts) == rows:
                yield Chunk(first, texts)
                first, texts = first + rows, []
        if texts:
            yield Chunk(first, texts)

    def where(self, chunk: Chunk, offset: int) -> str:
        return f"{self.name}:{chunk.first + offset + 1} (row {chunk.first + offset})"


def load_json(line: bytes) -> Any:
    """One JSON line; invalid UTF-8 inside strings survives as lone surrogates, which validation names."""
    return json.loads(line.decode("utf-8", "surrogateescape"))


class JsonlSource(Source):
    format = "jsonl"

    def __init__(
        self, path: Path | None, lines: Lines, field: str, id_field: str | None, name: str | None = None
    ) -> None:
        super().__init__(path, field, id_field, name)
        self.lines = lines
        first = lines.first(nonblank=True)
        if first is None:
            return
        number, line = first
        try:
            record = load_json(line)
        except ValueError as e:
            raise InvalidInputError(f"{self.name}:{number}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise InvalidInputError(f"{self.name}:{number}: a .jsonl input holds one JSON object per line")
        for name, option in ((field, "--field"), (id_field, "--id-field")):
            if name is not None and name not in record:
                has = ", ".join(map(repr, list(record)[:10])) or "no fields"
                raise InvalidInputError(
                    f"{self.name}:{number}: no field {name!r} in the first record (it has {has}); choose with {option}"
                )

    def count(self) -> int | None:
        if self.path is None:
            return None
        return sum(1 for _, line in self.lines if line.strip())

    def empty(self) -> bool:
        return self.lines.first(nonblank=True) is None

    def chunks(self, rows: int) -> Iterator[Chunk]:
        chunk = Chunk(0, [], [] if self.id_field else None, lines=[])
        for number, line in self.lines:
            if not line.strip():
                continue
            text, id_, problem = self._row(line)
            if problem is not None:
                chunk.problems[len(chunk.texts)] = problem
            chunk.texts.append(text)
            chunk.lines.append(number)  # type: ignore[union-attr]
            if chunk.ids is not None:
                chunk.ids.append(id_)
            if len(chunk.texts) == rows:
                yield chunk
                chunk = Chunk(chunk.first + rows, [], [] if self.id_field else None, lines=[])
        if chunk.texts:
            yield chunk

    def _row(self, line: bytes) -> tuple[Any, Any, str | None]:
        try:
            record = load_json(line)
        except ValueError as e:
            return None, None, f"is not valid JSON ({e})"
        if not isinstance(record, dict):
            return None, None, "is not a JSON object"
        id_ = record.get(self.id_field) if self.id_field else None
        if self.field not in record:
            return None, id_, f"has no field {self.field!r}"
        return record[self.field], id_, None

    def where(self, chunk: Chunk, offset: int) -> str:
        if not chunk.lines:
            return super().where(chunk, offset)
        return f"{self.name}:{chunk.lines[offset]} (row {chunk.first + offset})"


class CsvSource(Source):
    """A header line names the columns; values are text (ids too: CSV has no types).

    Read with the standard library's reader: a record of any size (a 2 MB text
    fails alone, as too long, instead of stopping the job), quoted line breaks,
    and bytes that are not UTF-8 kept as lone surrogates, which validation names
    for a text; an id that is not UTF-8 fails its row alone."""

    format = "csv"

    def __init__(
        self,
        path: Path | None,
        field: str,
        id_field: str | None,
        stream: IO[bytes] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(path, field, id_field, name)
        self._stream = stream
        self._records: Iterator[list[str]] | None = None
        self._columns: tuple[int, int | None] | None = None
        reader = self._reader()
        header = next(reader, None)
        if header is None:  # an empty input: no rows, not a CSV error
            return
        names = header
        for name_, option in ((field, "--field"), (id_field, "--id-field")):
            if name_ is not None and name_ not in names:
                has = ", ".join(map(repr, names[:20]))
                raise InvalidInputError(f"{self.name}: no column {name_!r} (columns: {has}); choose with {option}")
        self._columns = (names.index(field), names.index(id_field) if id_field else None)
        if path is None:
            self._records = reader  # a stream is read once: its records go on after the header

    def _reader(self) -> Iterator[list[str]]:
        """Each record's values, the header's first; a BOM opening the input is dropped."""
        csv.field_size_limit(CSV_FIELD_LIMIT)
        if self.path is not None:
            binary: IO[bytes] = open(self.path, "rb")  # closed when the generator ends
        else:
            binary = self._stream if self._stream is not None else sys.stdin.buffer
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        try:
            yield from csv.reader(text)
        except csv.Error as e:
            raise InvalidInputError(f"{self.name}: not a CSV file Python can read ({e})") from e
        finally:
            if self.path is not None:
                text.close()
            else:
                text.detach()

    def _rows(self) -> Iterator[list[str]]:
        if self._columns is None:
            return
        if self.path is not None:
            records = self._reader()
            next(records)  # the header
        else:
            records, self._records = self._records or iter(()), None
        for values in records:
            if values:  # a blank line is no record
                yield values

    def count(self) -> int | None:
        if self.path is None:
            return None
        return sum(1 for _ in self._rows())

    def empty(self) -> bool:
        return self._columns is None or (self.path is not None and super().empty())

    def chunks(self, rows: int) -> Iterator[Chunk]:
        if self._columns is None:
            return
        text_at, id_at = self._columns
        chunk = Chunk(0, [], [] if id_at is not None else None)
        for values in self._rows():
            offset = len(chunk.texts)
            chunk.texts.append(values[text_at] if text_at < len(values) else None)
            if text_at >= len(values):
                chunk.problems[offset] = f"has no value in column {self.field!r}"
            if chunk.ids is not None and id_at is not None:
                id_ = values[id_at] if id_at < len(values) else None
                if id_ is not None and not is_utf8(id_):
                    chunk.problems[offset] = "has an id that is not valid UTF-8"
                    id_ = id_.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                chunk.ids.append(id_)
            if len(chunk.texts) == rows:
                yield chunk
                chunk = Chunk(chunk.first + rows, [], [] if id_at is not None else None)
        if chunk.texts:
            yield chunk


def is_utf8(value: str) -> bool:
    """False for text read with ``surrogateescape`` from bytes that were not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ParquetSource(Source):
    format = "parquet"

    def __init__(self, path: Path, field: str, id_field: str | None) -> None:
        super().__init__(path, field, id_field)
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InvalidInputError(f"{self.name}: not a Parquet file ({e})") from e
        schema = self.file.schema_arrow
        for name, option in ((field, "--field"), (id_field, "--id-field")):
            if name is not None and name not in schema.names:
                has = ", ".join(map(repr, schema.names[:20]))
                raise InvalidInputError(f"{self.name}: no column {name!r} (columns: {has}); choose with {option}")
        kind = schema.field(field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise InvalidInputError(f"{self.name}: column {field!r} holds {kind}, not text; choose with --field")

    def count(self) -> int:
        return int(self.file.metadata.num_rows)

    def chunks(self, rows: int) -> Iterator[Chunk]:
        columns = list(dict.fromkeys([self.field, *([self.id_field] if self.id_field else [])]))
        first = 0
        for batch in self.file.iter_batches(batch_size=rows, columns=columns):
            texts = batch.column(self.field).to_pylist()
            yield Chunk(first, texts, batch.column(self.id_field) if self.id_field else None)
            first += len(texts)


class BatchSource(Source):
    """An OpenAI Batch file: each request's inputs are rows; a line that is no request stops the job."""

    format = "batch"

    def __init__(self, path: Path | None, lines: Lines, name: str | None = None) -> None:
        super().__init__(path, "input", None, name)
        self.lines = lines

    def _requests(self) -> Iterator[tuple[BatchRequest, list[str]]]:
        for number, line in self.lines:
            if not line.strip():
                continue
            try:
                yield parse_request(load_json(line), number)
            except ValueError as e:  # JSON errors too: the file is not a Batch file, nothing can answer it
                raise InvalidInputError(f"{self.name}:{number}: {e}") from e

    def count(self) -> int | None:
        """Texts of all requests; reading every line first also finds a broken file before any work."""
        if self.path is None:
            return None
        return sum(request.inputs for request, _ in self._requests())

    def empty(self) -> bool:
        return self.lines.first(nonblank=True) is None

    def chunks(self, rows: int) -> Iterator[Chunk]:
        chunk = Chunk(0, [], requests=[])
        for request, texts in self._requests():
            chunk.requests.append(request)  # type: ignore[union-attr]
            chunk.texts.extend(texts)
            if len(chunk.texts) >= rows:
                yield chunk
                chunk = Chunk(chunk.first + len(chunk.texts), [], requests=[])
        if chunk.requests:
            yield chunk

    def where(self, chunk: Chunk, offset: int) -> str:
        for request in chunk.requests or ():
            if offset < request.inputs:
                return f"{self.name}:{request.line} (custom_id {request.custom_id!r}, input {offset})"
            offset -= request.inputs
        return super().where(chunk, offset)


#: Bytes of a text input looked at for a NUL, which no text file holds.
SNIFF_BYTES = 8192


def refuse_binary(file: Path) -> None:
    """A binary file read as lines would give junk texts and fail on bytes that are not UTF-8, after the
    model loaded: refuse it before any work."""
    with open(file, "rb") as f:
        head = f.read(SNIFF_BYTES)
    at = head.find(b"\x00")
    if at >= 0:
        utf16 = " (UTF-16 text? convert it to UTF-8)" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise InvalidInputError(
            f"{file} is not a text file: a NUL byte at offset {at}{utf16}. embq embed reads UTF-8 text, one text "
            "per line, or .jsonl, .csv and .parquet files (--input-format names the format of another suffix)"
        )


def open_source(
    path: str | Path,
    *,
    field: str | None = None,
    id_field: str | None = None,
    input_format: str | None = None,
) -> Source:
    """Open an input and check it before any work: it exists, is a readable file, has the field.

    The format follows the suffix (any unknown suffix reads as text, one text per
    line) unless ``input_format`` names it; a ``.jsonl`` of OpenAI Batch requests
    is recognised by its first line. Raises ``InvalidInputError`` with one line that says what to fix.
    """
    stdin = str(path) == STDIN
    file = None if stdin else Path(path)
    stream: IO[bytes] | None = None
    name = None
    if file is not None:
        if not file.exists():
            raise InvalidInputError(f"{file}: no such file")
        if file.is_dir():
            raise InvalidInputError(f"{file} is a directory; give a file")
        if not os.access(file, os.R_OK):
            raise InvalidInputError(f"{file}: permission denied")
    if input_format is not None and input_format not in FORMATS:
        raise InvalidInputError(f"unknown input format {input_format!r}; choose one of {', '.join(FORMATS)}")
    kind = input_format or ("txt" if file is None else SUFFIXES.get(file.suffix.lower(), "txt"))
    if file is not None and not file.is_file():  # a pipe or <(command): one pass, as standard input
        if kind == "parquet":
            raise InvalidInputError(f"{file}: Parquet cannot be read from a pipe (its index ends the file)")
        name, stream, file = str(file), open(file, "rb"), None  # read until the job ends
    if kind == "txt":
        if field is not None or id_field is not None:
            raise InvalidInputError(
                f"{path}: a text input is one text per line, with no fields; "
                "--field and --id-field need a .jsonl, .csv or .parquet input (or --input-format)"
            )
        if file is not None:
            refuse_binary(file)
        return TextSource(file, Lines(file, stream), name)
    if kind == "csv":
        return CsvSource(file, field or "text", id_field, stream, name)
    if kind == "parquet":
        if file is None:
            raise InvalidInputError("Parquet cannot be read from standard input (its index ends the file): give a file")
        return ParquetSource(file, field or "text", id_field)
    lines = Lines(file, stream)
    first = lines.first(nonblank=True)
    try:
        batch = first is not None and is_batch_record(load_json(first[1]))
    except ValueError:
        batch = False
    if batch:
        if field is not None or id_field is not None:
            raise InvalidInputError(
                f"{path} is an OpenAI Batch file: its texts are each request's body.input and its ids the "
                "custom_id; drop --field and --id-field"
            )
        return BatchSource(file, lines, name)
    return JsonlSource(file, lines, field or "text", id_field, name)
