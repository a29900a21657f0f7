"""``embq embed``: a file of texts in, a ``.npy`` of vectors out, rows in input order."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from producer import EmbeddingClient, Settings
from producer.errors import InvalidInputError, ItemFailedError
from producer.validation import validate_texts
from worker.local import LocalRedis, LocalWorker

log = logging.getLogger(__name__)

#: Texts per ``embed`` call; several calls are in flight so the queue never runs dry.
CHUNK_TEXTS = 2048
#: ``embed`` calls in flight at once.
CALLS_IN_FLIGHT = 4
#: Failed lines named in the log; all of them are NaN rows in the output.
SHOWN_FAILURES = 20
#: Variables that point embq at an existing Redis; without them a private stack is started.
REDIS_VARIABLES = ("EMBQ_REDIS_URL", "EMBQ_BROKER_URL", "EMBQ_CACHE_URL")


def read_texts(path: Path, field: str | None = None) -> list[str]:
    """One text per line (only the line break is removed), or ``field`` of each JSON line of a ``.jsonl``."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        raw = f.read()
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if path.suffix != ".jsonl":
        return lines
    key = field or "text"
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            text = record[key]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{path}:{number}: no string field {key!r} in this JSON line ({e})") from e
        texts.append(text)
    return texts


def embed_texts(
    client: EmbeddingClient,
    texts: list[str],
    *,
    dim: int | None,
    instruction: str,
    timeout: float | None,
    progress: bool = True,
) -> tuple[np.ndarray, dict[int, str]]:
    """Embed ``texts`` in chunks with several calls in flight.

    Returns the rows in input order (NaN where a text failed) and the failures
    by input index: one bad text costs its own row, not the job.
    """
    out: np.ndarray | None = None
    failures: dict[int, str] = {}
    spans = [(start, min(start + CHUNK_TEXTS, len(texts))) for start in range(0, len(texts), CHUNK_TEXTS)]
    pool = ThreadPoolExecutor(CALLS_IN_FLIGHT)
    try:
        with tqdm(total=len(texts), unit="text", file=sys.stderr, disable=not progress, mininterval=0.5) as bar:
            futures = {
                pool.submit(client.embed, texts[a:b], dim=dim, instruction=instruction, timeout=timeout): (a, b)
                for a, b in spans
            }
            for future in as_completed(futures):
                a, b = futures[future]
                try:
                    block = future.result()
                except ItemFailedError as e:
                    block = np.asarray(e.vectors)
                    failures.update({a + i: reason for i, reason in e.failures.items()})
                if out is None:
                    out = np.empty((len(texts), block.shape[1]), dtype=np.float32)
                out[a:b] = block
                bar.update(b - a)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on an error, queued chunks are not sent
    return (out if out is not None else np.zeros((0, dim or 0), dtype=np.float32)), failures


def run_embed_file(
    input_path: Path,
    output_path: Path,
    *,
    field: str | None,
    model: str | None,
    engine: str,
    dim: int | None,
    instruction: str,
    timeout: float | None,
    progress: bool,
) -> int:
    """Embed a file; without a configured Redis, a private Redis and worker live for this call only.

    Returns 0, or 1 when some texts failed (their rows are NaN and their lines are logged).
    """
    texts = read_texts(input_path, field)
    settings = Settings.from_env(model=model)
    try:
        validate_texts(texts, settings.max_text_bytes)
    except InvalidInputError as e:
        lines = ", ".join(str(i + 1) for i in sorted(e.problems)[:10])
        raise InvalidInputError(f"{input_path}: line(s) {lines}: {e}", e.problems) from e
    with ExitStack() as stack:
        stack.enter_context(exit_on_termination())
        if not any(os.environ.get(name) for name in REDIS_VARIABLES):
            log.info("no EMBQ_REDIS_URL set: starting a private Redis and a %s worker", engine)
            local_redis = stack.enter_context(LocalRedis())
            stack.enter_context(LocalWorker(local_redis.url, engine=engine, model=settings.model))
            settings = settings.with_overrides(redis_url=local_redis.url)
        client = stack.enter_context(EmbeddingClient(settings=settings))
        vectors, failures = embed_texts(
            client, texts, dim=dim, instruction=instruction, timeout=timeout, progress=progress
        )
    np.save(output_path, vectors)
    log.info("wrote %s: %d x %d float32", output_path, *vectors.shape)
    if failures:
        for index in sorted(failures)[:SHOWN_FAILURES]:
            log.error("%s:%d failed: %s", input_path, index + 1, failures[index])
        log.error("%d of %d texts failed; their rows are NaN", len(failures), len(texts))
        return 1
    return 0


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the private Redis and worker are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
