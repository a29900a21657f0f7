"""``python -m bench [--quick]``: every workload side by side, one table of medians, then the targets."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench import stack
from bench.queue_cost import million, queue_cost
from bench.workloads import DIRECT, FULL, QUICK, Row, Rows, Sizes, cache_hits, etl_bulk, many_small_producers, scaling
from embq.worker.engines.sentence_transformers import resolve_model_path
from embq.worker.local import LocalRedis
from embq.worker.settings import WorkerSettings

log = logging.getLogger("bench")

ENGINES = ("sentence-transformers", "hash")
#: (what, row measured, row it is compared with, the least ratio aimed for)
TARGETS = [
    ("ETL bulk: embq vs the model called directly", ("ETL bulk", "sentence-transformers", "embq, 1 worker"), ("ETL bulk", "sentence-transformers", DIRECT), 0.90),  # noqa: E501
    ("ETL bulk: embq vs naive Celery", ("ETL bulk", "sentence-transformers", "embq, 1 worker"), ("ETL bulk", "sentence-transformers", "naive Celery, 1 task per text"), 2.5),  # noqa: E501
    ("ETL bulk: embq vs Infinity", ("ETL bulk", "sentence-transformers", "embq, 1 worker"), ("ETL bulk", "sentence-transformers", "Infinity server"), 0.95),  # noqa: E501
    ("50% duplicates: embq vs Infinity", ("Repeats", "sentence-transformers", "embq, 50% duplicates"), ("Repeats", "sentence-transformers", "Infinity, 50% duplicates"), 1.8),  # noqa: E501
    *[(f"cache hits dim {d}: embed vs MGET", ("Cache hits", "-", f"embq embed, dim {d}"), ("Cache hits", "-", f"raw MGET ceiling, dim {d}"), 0.5) for d in (384, 1024, 2560)],  # noqa: E501
    ("small producers: embq vs the model called directly", ("Small producers", "sentence-transformers", "embq, 64 producers x 1 text"), ("Small producers", "sentence-transformers", DIRECT), 0.85),  # noqa: E501
    ("bulk short texts: embq vs the model called directly", ("Bulk short", "hash", "embq, 1 worker"), ("Bulk short", "hash", DIRECT), 0.5),  # noqa: E501
]  # fmt: skip
#: (what, row, its note or None for the median, "<=" or ">=", bound): absolute aims.
LIMITS = [
    ("queue CPU per text (worker + producer + Redis)", ("Queue CPU", "hash", "queue total"), None, "<=", 30.0),
    ("64 single-text callers, texts/s", ("Small producers", "hash", "embq, 64 producers x 1 text"), None, ">=", 3000.0),
    ("64 single-text callers, p50 ms", ("Small producers", "hash", "embq, 64 producers x 1 text"), "p50 ms", "<=", 20.0),  # noqa: E501
    ("1M texts in one call: first task, s", ("Million", "hash", "1,000,000 texts, uncached"), "first task s", "<=", 1.0),  # noqa: E501
    ("1M texts in one call: total, s", ("Million", "hash", "1,000,000 texts, uncached"), None, "<=", 60.0),
    ("1M texts in one call: peak RSS, MB", ("Million", "hash", "1,000,000 texts, uncached"), "peak RSS MB", "<=", 1024.0),  # noqa: E501
    ("1M cached texts in one call: total, s", ("Million", "hash", "1,000,000 texts, cached"), None, "<=", 8.0),
    ("1M cached texts in one call: peak RSS, MB", ("Million", "hash", "1,000,000 texts, cached"), "peak RSS MB", "<=", 1229.0),  # noqa: E501
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 runs: a few minutes")
    parser.add_argument("--runs", type=int, help="repeat every workload this often (medians are reported)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--no-infinity", action="store_true", help="skip the Infinity server rows")
    parser.add_argument(
        "--infinity-venv",
        type=Path,
        default=Path(os.environ.get("EMBQ_BENCH_INFINITY_VENV", Path.home() / ".cache/embq-bench/infinity-venv")),
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    sizes = QUICK if args.quick else FULL
    runs = args.runs or sizes.runs
    rows = Rows()
    with LocalRedis("--maxmemory-policy", "noeviction") as server:
        url = server.url
        for engine in args.engines:
            assert server.process is not None
            infinity_venv = None if args.no_infinity else args.infinity_venv
            measure_engine(rows, url, server.process.pid, engine, sizes, runs, infinity_venv=infinity_venv)
        for run in range(runs):
            log.info("cache hits, run %d/%d", run + 1, runs)
            cache_hits(rows, url, sizes, run)
            log.info("scaling, run %d/%d", run + 1, runs)
            scaling(rows, url, sizes, run)
    sys.stdout.write(render(rows, runs))
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return 0


def measure_engine(
    rows: Rows, url: str, redis_pid: int, engine: str, sizes: Sizes, runs: int, infinity_venv: Path | None
) -> None:
    raw = stack.load_engine(engine)
    with ExitStack() as stack_of:
        (worker,) = stack_of.enter_context(stack.workers(url, engine, 1))
        # Same engine, same thread pool: the naive worker differs only in sending one text per task.
        stack_of.enter_context(stack.naive_worker(url, engine, WorkerSettings().concurrency))
        infinity: Callable[[list[str]], np.ndarray] | None = None
        if engine == "sentence-transformers" and infinity_venv is not None:
            from bench.infinity import InfinityServer, embed_concurrently, ensure_venv

            ensure_venv(infinity_venv)
            server = stack_of.enter_context(InfinityServer(Path(resolve_model_path(stack.MINILM)), venv=infinity_venv))
            infinity = lambda texts: embed_concurrently(server.url, server.model, texts)  # noqa: E731
        for run in range(runs):
            log.info("%s: ETL bulk and repeats, run %d/%d", engine, run + 1, runs)
            etl_bulk(rows, url, engine, sizes, raw, infinity, run)
            log.info("%s: small producers, run %d/%d", engine, run + 1, runs)
            many_small_producers(rows, url, engine, sizes, worker, raw, run)
            if engine == "hash":
                log.info("hash: queue CPU per text, run %d/%d", run + 1, runs)
                queue_cost(rows, url, redis_pid, worker, run)
        if engine == "hash":
            log.info("hash: %d texts in one call", sizes.million)
            million(rows, url, sizes.million, 0)


def render(rows: Rows, runs: int) -> str:
    by_key = {(row.workload, row.engine, row.name): row for row in rows}
    lines = [
        f"embq benchmarks: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; medians of {runs} runs",
        "",
        f"{'workload':<16} {'engine':<22} {'row':<34} {'median':>14}  {'ratio':>6}  notes",
    ]
    for row in rows:
        reference = reference_of(row, by_key)
        ratio = f"{row.median / reference.median:.2f}" if reference is not None else ""
        notes = ", ".join(f"{name} {format_number(np.median(values))}" for name, values in row.notes.items())
        lines.append(
            f"{row.workload:<16} {row.engine:<22} {row.name:<34} "
            f"{format_number(row.median):>8} {row.unit:<5}  {ratio:>6}  {notes}"
        )
    lines += ["", "targets (ratios of medians measured in this run):"]
    for what, measured, against, least in TARGETS:
        if measured in by_key and against in by_key:
            value = by_key[measured].median / by_key[against].median
            lines.append(f"  {what:<40} {value:6.2f}  (aim >= {least}) {'met' if value >= least else 'MISSED'}")
    for what, key, note, sense, bound in LIMITS:
        if key in by_key:
            row = by_key[key]
            value = float(np.median(row.notes[note])) if note else row.median
            met = value <= bound if sense == "<=" else value >= bound
            lines.append(
                f"  {what:<48} {format_number(value):>8}  (aim {sense} {bound:g}) {'met' if met else 'MISSED'}"
            )
    return "\n".join(lines) + "\n"


def reference_of(row: Row, by_key: dict[tuple[str, str, str], Row]) -> Row | None:
    """Ratios are to the model called directly in its workload, and to the MGET ceiling of the same dim for hits."""
    if row.workload == "Cache hits" and row.name.startswith("embq embed"):
        return by_key.get((row.workload, row.engine, row.name.replace("embq embed", "raw MGET ceiling")))
    found = by_key.get((row.workload, row.engine, DIRECT))
    if found is not None:
        return found
    if row.workload == "Repeats":
        return by_key.get(("ETL bulk", row.engine, DIRECT))
    return None


def format_number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


if __name__ == "__main__":
    sys.exit(main())
