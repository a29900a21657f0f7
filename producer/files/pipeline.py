"""A file through embq: rows in, vectors out, in input order, in bounded memory.

``embed_rows`` reads the source a chunk at a time, checks every text, streams
the good ones through ``EmbeddingClient.embed_iter`` (a bounded window of
chunks in flight) and hands each input chunk to the sink as soon as its
vectors are back. Memory holds the chunks in flight, never the file: a million
rows cost what a hundred thousand do. A row that cannot be embedded (bad
input, or a worker failure) fails alone; the summary names the first ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embq.producer.files.sinks import Sink, open_sink, output_format
from embq.producer.files.sources import Chunk, Source, open_source
from embq.producer.stream import DEFAULT_BATCH, DEFAULT_WINDOW
from embq.producer.validation import item_problem

if TYPE_CHECKING:
    from embq.producer.client import EmbeddingClient

#: Failed rows whose place and reason the summary keeps (all of them count).
SHOWN_FAILURES = 20


@dataclass
class Summary:
    """What a job did, in rows: ``cached``, ``computed`` and ``failed`` add up to ``rows``."""

    rows: int = 0
    failed: int = 0
    cached: int = 0
    computed: int = 0
    #: ``(where, why)`` of the first ``SHOWN_FAILURES`` failed rows, in input order.
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Pending:
    """An input chunk whose good rows are in the stream, from stream index ``start`` on."""

    chunk: Chunk
    sent: list[int]
    start: int


class _Vectors:
    """What the stream yielded that no chunk has taken yet; stream chunks and input chunks do not align."""

    def __init__(self) -> None:
        self.parts: deque[np.ndarray] = deque()
        self.size = 0

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.parts.append(vectors)
            self.size += len(vectors)

    def take(self, rows: int, width: int) -> np.ndarray:
        out = []
        self.size -= rows
        while rows:
            head = self.parts[0]
            if len(head) <= rows:
                out.append(self.parts.popleft())
                rows -= len(head)
            else:
                out.append(head[:rows])
                self.parts[0] = head[rows:]
                rows = 0
        # A stream chunk in which every text failed has no width: its rows are NaN at the job's width.
        out = [p if p.shape[1] == width else np.full((len(p), width), np.nan, np.float32) for p in out]
        return np.concatenate(out) if out else np.empty((0, width), np.float32)


def embed_rows(
    client: EmbeddingClient,
    source: Source,
    sink: Sink,
    *,
    rows_per_chunk: int = DEFAULT_BATCH,
    batch: int = DEFAULT_BATCH,
    window: int = DEFAULT_WINDOW,
    dim: int | None = None,
    instruction: str = "",
    timeout: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    priority: str | None = None,
    truncate: bool = False,
    on_rows: Callable[[str, int], None] | None = None,
) -> Summary:
    """Embed every row of ``source`` into ``sink`` in input order; the caller commits or aborts the sink.

    ``on_progress(n)`` hears of rows as they are resolved (texts by the stream,
    rows that could not be sent when their chunk is written); ``on_rows(how, n)`` also of how
    (``EmbeddingClient.embed_iter``).
    """
    summary = Summary()
    pending: deque[_Pending] = deque()
    got = _Vectors()
    width = dim
    max_bytes = client.settings.max_text_bytes

    def feed() -> Iterator[str]:
        sent = 0
        for chunk in source.chunks(rows_per_chunk):
            for offset, text in enumerate(chunk.texts):
                if offset not in chunk.problems:
                    why = item_problem(text, max_bytes)
                    if why is not None:
                        chunk.problems[offset] = f"text {why}"
            good = [offset for offset in range(len(chunk)) if offset not in chunk.problems]
            pending.append(_Pending(chunk, good, sent))  # before its texts: the writer finds it waiting
            sent += len(good)
            for offset in good:
                yield chunk.texts[offset]

    def write(final: bool) -> None:
        while pending and len(pending[0].sent) <= got.size:
            if width is None and not final:
                return  # nothing resolved yet says how wide a vector is
            item = pending.popleft()
            chunk, taken = item.chunk, got.take(len(item.sent), width or 0)
            failed = dict(chunk.problems)
            if chunk.problems:
                vectors = np.full((len(chunk), width or 0), np.nan, np.float32)
                vectors[item.sent] = taken
            else:
                vectors = taken
            missing = np.flatnonzero(np.isnan(taken[:, 0])) if width else range(len(item.sent))
            for k in missing:
                failed[item.sent[k]] = stream.failures.get(item.start + int(k), "no vector")
            sink.write(chunk, vectors, failed)
            summary.rows += len(chunk)
            summary.failed += len(failed)
            for offset in sorted(failed)[: SHOWN_FAILURES - len(summary.failures)]:
                summary.failures.append((source.where(chunk, offset), failed[offset]))
            if chunk.problems and on_progress is not None:
                on_progress(len(chunk.problems))
            if chunk.problems and on_rows is not None:
                on_rows("failed", len(chunk.problems))

    stream = client.embed_iter(
        feed(),
        batch=batch,
        window=window,
        dim=dim,
        instruction=instruction,
        timeout=timeout,
        truncate=truncate,
        failures="nan",
        on_progress=on_progress,
        priority=priority,
        on_rows=on_rows,
    )
    with stream:
        for _, vectors in stream:
            if width is None and vectors.shape[1]:
                width = int(vectors.shape[1])
            got.add(vectors)
            write(final=False)
    write(final=True)
    if pending:
        raise RuntimeError(f"the stream ended with {len(pending)} input chunks unanswered")
    summary.cached, summary.computed = stream.cached_rows, stream.computed_rows
    return summary


def embed_file(
    client: EmbeddingClient,
    input_path: str | Path,
    output_path: str | Path,
    *,
    field: str | None = None,
    id_field: str | None = None,
    input_format: str | None = None,
    dim: int | None = None,
    instruction: str = "",
    timeout: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    truncate: bool = False,
) -> Summary:
    """Embed a file (``-`` for standard input) into ``output_path`` (``.parquet``, ``.jsonl``, ``.npy``).

    The output appears only when complete (written to a temporary name, then
    renamed). For an OpenAI Batch input, ``dim`` is the default ``dimensions``.
    """
    source = open_source(input_path, field=field, id_field=id_field, input_format=input_format)
    output = Path(output_path)
    batch = source.format == "batch"
    rows = source.count() if output_format(output) == "npy" else None
    sink = open_sink(
        output, rows=rows, id_field=id_field, dim=dim, batch=batch, model=client.model, input_path=source.path
    )
    try:
        summary = embed_rows(
            client,
            source,
            sink,
            dim=None if batch else dim,
            instruction=instruction,
            timeout=timeout,
            on_progress=on_progress,
            truncate=truncate,
        )
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return summary
