"""``EmbeddingClient.embed_iter``: any number of texts in, ``(start, vectors)`` chunks out, in order.

A bounded number of chunks is in flight, each an ordinary call of the client's
dispatcher, so memory holds the chunks being resolved, not the input or the
output: a pipeline step streams a file of any size through it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Literal

import numpy as np

from embq.producer import keys
from embq.producer.call import Call, choose_lane
from embq.producer.errors import InvalidInputError, ItemFailedError
from embq.producer.validation import validate_options, validate_texts

if TYPE_CHECKING:
    from embq.producer.client import EmbeddingClient

#: Texts per chunk when the caller does not say.
DEFAULT_BATCH = 2048
#: Chunks resolved at once: enough to keep workers busy while the caller writes.
DEFAULT_WINDOW = 4

Failures = Literal["raise", "nan"]


class EmbedStream(Iterator[tuple[int, np.ndarray]]):
    """Yields ``(start, vectors)``: rows ``start .. start + len(vectors)`` of the input, in order.

    With ``failures="nan"`` a text a worker could not embed gets a NaN row and its
    reason lands in ``failures`` (input index -> reason); with ``"raise"`` the chunk
    that holds it raises ``ItemFailedError`` (indices of the whole input).
    ``rows`` counts the rows yielded; ``cached``, ``computed`` (by this client's
    tasks) and ``waited`` (computed for another producer) count how distinct texts
    were found, ``cached_rows`` and ``computed_rows`` how rows were.
    ``timeout`` bounds the wait for each chunk.
    """

    def __init__(
        self,
        client: EmbeddingClient,
        texts: Iterable[str],
        *,
        batch: int,
        window: int,
        dim: int | None,
        instruction: str,
        timeout: float | None,
        failures: Failures,
        truncate: bool = False,
        on_rows: Callable[[str, int], None] | None = None,
        on_progress: Callable[[int], None] | None,
        priority: str | None = None,
    ) -> None:
        if isinstance(texts, (str, bytes, bytearray)):
            raise InvalidInputError("texts must be an iterable of str, not a single str; wrap it in a list: [text]")
        if isinstance(texts, (set, frozenset, dict)):
            raise InvalidInputError(f"texts must be ordered (a list, a generator), not a {type(texts).__name__}")
        for name, value in (("batch", batch), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
        if failures not in ("raise", "nan"):
            raise InvalidInputError(f"failures must be 'raise' or 'nan', got {failures!r}")
        validate_options(instruction, dim, timeout, client.settings.max_text_bytes, truncate)
        #: A stream is bulk work unless told otherwise: nobody waits for its next text in particular.
        self.lane = choose_lane(priority, 0, client.settings, default=keys.BULK)
        self.client = client
        self.source = iter(texts)
        self.batch = batch
        self.window = window
        self.dim = dim
        self.instruction = instruction
        self.truncate = truncate
        self.timeout = timeout
        self.on_failure = failures
        self.on_progress = on_progress
        self.on_rows = on_rows
        self.failures: dict[int, str] = {}
        self.rows = 0
        self.cached = 0
        self.computed = 0
        self.waited = 0
        #: Rows whose vector was cached, and computed (by anyone): with the failed rows, all the rows.
        self.cached_rows = 0
        self.computed_rows = 0
        self._next_start = 0
        self._pending: deque[tuple[int, Call]] = deque()
        self._exhausted = False

    def _fill(self) -> None:
        driver = self.client.driver()
        while not self._exhausted and len(self._pending) < self.window:
            chunk = list(islice(self.source, self.batch))
            if not chunk:
                self._exhausted = True
                return
            start = self._next_start
            self._next_start += len(chunk)
            try:
                validate_texts(chunk, self.client.settings.max_text_bytes)
            except InvalidInputError as e:
                problems = {start + i: reason for i, reason in e.problems.items()}
                raise InvalidInputError(str(e).replace("texts[", "chunk texts["), problems) from e
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            call = Call(
                chunk,
                self.instruction,
                dim=self.dim,
                deadline=deadline,
                on_progress=self.on_progress,
                lane=self.lane,
                truncate=self.truncate,
                on_rows=self.on_rows,
            )
            driver.submit(call)
            self._pending.append((start, call))

    def __next__(self) -> tuple[int, np.ndarray]:
        try:
            self._fill()
            if not self._pending:
                raise StopIteration
            start, call = self._pending.popleft()
            self.client.driver().wait(call)
            call.count(self.client.model)
            self.cached += call.cached
            self.computed += call.computed
            self.waited += call.waited
            self.cached_rows += call.rows_found["cached"]
            self.computed_rows += call.rows_found["computed"] + call.rows_found["waited"]
            try:
                vectors = call.result(self.client.settings)
            except ItemFailedError as e:
                failed = {start + i: reason for i, reason in e.failures.items()}
                if self.on_failure == "raise":
                    first = min(failed)
                    raise ItemFailedError(
                        f"{len(failed)} texts failed; texts[{first}] (index {first}): {failed[first]}",
                        failed,
                        e.vectors,
                    ) from e
                self.failures.update(failed)
                vectors = np.asarray(e.vectors)
            self.rows += len(call.texts)
            self._fill()
            return start, vectors
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop: chunks not yet sent are dropped, those in flight are given up (their claims released)."""
        self._exhausted = True
        if self._pending:
            driver = self.client.driver()
            for _, call in self._pending:
                call.cancel()
            driver.poke()
        self._pending.clear()

    def __enter__(self) -> EmbedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
