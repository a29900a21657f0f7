"""``embq embed``: a file of any size in, vectors out, in input order, in bounded memory; a killed run resumes.

Before any Redis, worker or model starts, input and output are checked (a
missing file, a directory, an unknown field or suffix, an unwritable directory
are one-line errors, exit 2) and an empty input writes an empty output at once.
Then, without a configured Redis, a private one and a worker start
(``embq.worker.private``); the rows stream through ``embq.producer.files.embed_rows``
with a progress bar; the output is renamed into place at the end. A run killed
at any point and started again finds what it finished in the cache.
Ctrl-C, SIGTERM and SIGHUP stop everything within seconds, leave nothing
behind and exit 128 + the signal (130 for Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from embq.producer import EmbeddingClient, Settings
from embq.producer.errors import ConfigurationError
from embq.producer.files import embed_rows, open_sink, open_source
from embq.producer.files.sinks import BatchSink, Sink, output_format
from embq.producer.files.sources import Source
from embq.producer.settings import flag_urls
from embq.worker.home import embq_home
from embq.worker.interrupt import Interrupted, interruptible
from embq.worker.private import PrivateStack, configured_redis
from embq.worker.progress import Progress
from embq.worker.settings import check_engine_model, default_model

log = logging.getLogger(__name__)

#: Exit status when some rows failed (they are NaN or null in the output, and named in the log).
EXIT_ROWS_FAILED = 1


@dataclass(frozen=True)
class EmbedOptions:
    input: str
    output: Path | None = None
    field: str | None = None
    id_field: str | None = None
    input_format: str | None = None
    model: str | None = None
    engine: str = "sentence-transformers"
    #: Cut texts over the model's context instead of failing them (the call's ``truncate``).
    truncate: bool = False
    dim: int | None = None
    instruction: str = ""
    timeout: float | None = None
    priority: str = "bulk"
    progress: bool = True
    quiet: bool = False
    #: Redis URL flags (``--redis-url``...): they, like EMBQ_REDIS_URL, turn the private stack off.
    redis_url: str | None = None
    broker_url: str | None = None
    cache_url: str | None = None


def default_output(source: Source, options: EmbedOptions) -> Path:
    if options.output is not None:
        return options.output
    if source.path is None:
        raise ConfigurationError(
            f"reading {source.name} as a stream: name the output with -o (.parquet, .jsonl or .npy)"
        )
    if source.format == "batch":
        return source.path.with_name(f"{source.path.stem}_output.jsonl")
    return source.path.with_suffix(".npy")


class Job:
    """One run: what it says on stderr, and what it has started that an interruption must stop."""

    def __init__(self, options: EmbedOptions) -> None:
        self.options = options
        self.started = time.monotonic()
        self.private: PrivateStack | None = None
        self.sink: Sink | None = None
        self.done = False

    def say(self, text: str) -> None:
        if not self.options.quiet:
            tqdm.write(f"embq: {text}", file=sys.stderr)

    def doing(self) -> str:
        """What an interruption does, said when it comes."""
        parts = ["stopping"]
        if self.private is not None:
            parts.append("the private worker and Redis")
        if self.sink is not None:
            parts.append(f"and removing the unfinished {self.sink.path.name}")
        return " ".join(parts) + "…"

    def run(self) -> int:
        with ExitStack() as stack:
            stack.callback(self._close_sink)
            return self._run(stack)

    def _close_sink(self) -> None:
        if self.sink is not None and not self.done:
            self.sink.abort()

    def _run(self, stack: ExitStack) -> int:
        o = self.options
        source = open_source(o.input, field=o.field, id_field=o.id_field, input_format=o.input_format)
        output = default_output(source, o)
        batch = source.format == "batch"
        bar = o.progress and not o.quiet
        rows = source.count() if bar or output_format(output) == "npy" else None
        flags, origins = flag_urls(o.redis_url, o.broker_url, o.cache_url)
        embedded = not (configured_redis() or flags)
        model = default_model(o.engine, o.model, os.environ) if embedded else o.model
        settings = Settings.from_env(origins=origins, model=model, **flags)
        if embedded:  # before anything starts: the private worker would refuse it
            check_engine_model(o.engine, settings.model)
        self.sink = open_sink(
            output,
            rows=rows,
            id_field=o.id_field,
            dim=o.dim,
            batch=batch,
            model=settings.model,
            input_path=source.path,
        )
        if rows == 0 or (rows is None and source.empty()):
            self.sink.commit()
            self.done = True
            self.say(f"{source.name} is empty: wrote {output} with no rows")
            return 0
        private = None
        if embedded:
            private = self.private = PrivateStack(embq_home(), engine=o.engine, model=settings.model, say=self.say)
            stack.callback(lambda: private.stop(fast=not self.done))
            settings = settings.with_overrides("embq embed's private Redis", **private.start())
        start_worker = private.start_worker if private is not None else None
        # No L1: a file's texts are each read once, and an L1 would only copy every vector and hold its bytes.
        settings = settings.with_overrides(l1_bytes=0)
        client = stack.enter_context(EmbeddingClient(settings=settings, before_first_task=start_worker))
        client.connect()  # a Redis that is not there fails before any progress is shown
        if private is not None:  # an unfinished job's worker goes before the client closes: one still loading
            stack.callback(lambda: None if self.done else private.stop_worker(fast=True))  # holds the client up
        progress = Progress(rows, say=self.say, shown=bar)
        streaming = time.monotonic()
        try:
            with logging_redirect_tqdm():
                summary = embed_rows(
                    client,
                    source,
                    self.sink,
                    dim=None if batch else o.dim,
                    instruction=o.instruction,
                    timeout=o.timeout,
                    on_rows=progress.rows,
                    priority=o.priority,
                    truncate=o.truncate,
                )
        finally:
            progress.close()
        self.sink.commit()
        self.done = True
        seconds = time.monotonic() - streaming
        split = ""
        if summary.cached + summary.computed:  # rows; a client that keeps no counters leaves them 0
            split = f", {summary.cached:,} cached, {summary.computed:,} computed"
        for where, why in summary.failures:
            log.error("%s failed: %s", where, why)
        self.say(
            f"{summary.rows:,} rows in {seconds:.1f}s ({summary.rows / max(seconds, 1e-9):,.0f} rows/s){split}, "
            f"{summary.failed:,} failed -> {output}"
        )
        if isinstance(self.sink, BatchSink):
            if self.sink.failed_requests:
                log.error(
                    "%d of %d requests failed; their lines in %s say why",
                    self.sink.failed_requests,
                    self.sink.requests,
                    output,
                )
                return EXIT_ROWS_FAILED
        elif summary.failed:
            where = (
                "their rows are NaN (the first ones' reasons are above)"
                if output_format(output) == "npy"
                else "their vectors are null, each with its reason in the error field"
            )
            log.error("%d of %d rows failed; in %s %s", summary.failed, summary.rows, output, where)
            return EXIT_ROWS_FAILED
        return 0


def run_embed_file(options: EmbedOptions) -> int:
    """Run ``embq embed``: 0, 1 when some rows failed, 128 + n after signal n; ``EmbqError`` for bad arguments."""
    job = Job(options)
    try:
        with interruptible(job.doing):
            return job.run()
    except Interrupted as e:
        sys.stderr.flush()
        os.write(2, f"embq: stopped {time.monotonic() - e.at:.1f}s after {e.name}; nothing left running\n".encode())
        return e.exit_code
