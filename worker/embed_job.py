"""``embq embed``: a file of texts in, a ``.npy`` of vectors out, rows in input order."""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from producer import EmbeddingClient, Settings
from producer.errors import InvalidInputError
from producer.validation import validate_texts
from worker.local import LocalRedis, LocalWorker

log = logging.getLogger(__name__)

#: Texts per ``embed`` call; several calls are in flight so the queue never runs dry.
CHUNK_TEXTS = 2048
#: ``embed`` calls in flight at once.
CALLS_IN_FLIGHT = 4
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
) -> np.ndarray:
    """Embed ``texts`` in chunks with several calls in flight; rows in input order."""
    out: np.ndarray | None = None
    spans = [(start, min(start + CHUNK_TEXTS, len(texts))) for start in range(0, len(texts), CHUNK_TEXTS)]
    with (
        ThreadPoolExecutor(CALLS_IN_FLIGHT) as pool,
        tqdm(total=len(texts), unit="text", file=sys.stderr, disable=not progress, mininterval=0.5) as bar,
    ):
        futures = {
            pool.submit(client.embed, texts[a:b], dim=dim, instruction=instruction, timeout=timeout): (a, b)
            for a, b in spans
        }
        for future in as_completed(futures):
            a, b = futures[future]
            block = future.result()
            if out is None:
                out = np.empty((len(texts), block.shape[1]), dtype=np.float32)
            out[a:b] = block
            bar.update(b - a)
    return out if out is not None else np.zeros((0, dim or 0), dtype=np.float32)


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
    """Embed a file; without a configured Redis, a private Redis and worker live for this call only."""
    texts = read_texts(input_path, field)
    settings = Settings.from_env(model=model)
    try:
        validate_texts(texts, settings.max_text_bytes)
    except InvalidInputError as e:
        lines = ", ".join(str(i + 1) for i in sorted(e.problems)[:10])
        raise InvalidInputError(f"{input_path}: line(s) {lines}: {e}", e.problems) from e
    with ExitStack() as stack:
        if not any(os.environ.get(name) for name in REDIS_VARIABLES):
            log.info("no EMBQ_REDIS_URL set: starting a private Redis and a %s worker", engine)
            local_redis = stack.enter_context(LocalRedis())
            stack.enter_context(LocalWorker(local_redis.url, engine=engine, model=settings.model))
            settings = settings.with_overrides(redis_url=local_redis.url)
        client = stack.enter_context(EmbeddingClient(settings=settings))
        vectors = embed_texts(client, texts, dim=dim, instruction=instruction, timeout=timeout, progress=progress)
    np.save(output_path, vectors)
    log.info("wrote %s: %d x %d float32", output_path, *vectors.shape)
    return 0
