"""``EmbeddingClient.embed_iter``: any number of texts in, ``(start, vectors)`` chunks out, in order.

A bounded number of chunks is in flight, so memory holds the chunks being
resolved, not the input or the output: a pipeline step streams a file of any
size through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING, Literal

import numpy as np

from producer.errors import InvalidInputError, ItemFailedError

if TYPE_CHECKING:
    from producer.client import EmbeddingClient

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
    ``rows``, ``cached`` and ``computed`` count what was yielded so far.
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
        on_progress: Callable[[int], None] | None,
    ) -> None:
        if isinstance(texts, (str, bytes, bytearray)):
            raise InvalidInputError("texts must be an iterable of str, not a single str; wrap it in a list: [text]")
        if not isinstance(batch, int) or batch <= 0 or not isinstance(window, int) or window <= 0:
            raise InvalidInputError(f"batch and window must be positive ints, got batch={batch!r}, window={window!r}")
        if failures not in ("raise", "nan"):
            raise InvalidInputError(f"failures must be 'raise' or 'nan', got {failures!r}")
        self.client = client
        self.source = iter(texts)
        self.batch = batch
        self.window = window
        self.options = {"dim": dim, "instruction": instruction, "timeout": timeout}
        self.on_failure = failures
        self.on_progress = on_progress
        self.failures: dict[int, str] = {}
        self.rows = 0
        self.cached = 0
        self.computed = 0
        self._next_start = 0
        self._pending: deque[tuple[int, int, Future[np.ndarray]]] = deque()
        self._pool = ThreadPoolExecutor(window, thread_name_prefix="embq-stream")
        self._exhausted = False

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self.window:
            chunk = list(islice(self.source, self.batch))
            if not chunk:
                self._exhausted = True
                return
            start = self._next_start
            self._next_start += len(chunk)
            future = self._pool.submit(self.client.embed, chunk, **self.options)  # type: ignore[arg-type]
            self._pending.append((start, len(chunk), future))

    def __next__(self) -> tuple[int, np.ndarray]:
        try:
            self._fill()
            if not self._pending:
                self.close()
                raise StopIteration
            start, size, future = self._pending.popleft()
            try:
                vectors = future.result()
            except ItemFailedError as e:
                failed = {start + i: reason for i, reason in e.failures.items()}
                if self.on_failure == "raise":
                    raise ItemFailedError(str(e), failed, e.vectors) from e
                self.failures.update(failed)
                vectors = np.asarray(e.vectors)
            except InvalidInputError as e:
                raise InvalidInputError(str(e), {start + i: reason for i, reason in e.problems.items()}) from e
            self.rows += size
            if self.on_progress is not None:
                self.on_progress(size)
            self._fill()
            return start, vectors
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop: chunks not yet sent are dropped; those in flight finish in the background."""
        self._exhausted = True
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> EmbedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
