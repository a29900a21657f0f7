"""``python -m bench.lanes``: one-text queries while a backfill runs, and the share of the engine the backfill keeps.

One MiniLM worker with its defaults on a private Redis, three phases in one run:

1. idle: one-text ``EmbeddingClient.embed`` calls at a steady rate (a new text each): p50 / p99;
2. the same queries while ``embq embed`` (distributed mode, its default bulk lane) embeds a file
   of ``--rows`` rows: p50 / p99, and the backfill's rows/s;
3. the backfill alone, on other rows: rows/s. Its rate with queries over its rate alone is the
   share of the engine bulk work kept under that query load.

The acceptance line: p99 during the backfill at most max(5 x the idle p99, 3 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import stack
from bench.texts import MINILM, make_texts
from embq.producer import EmbeddingClient
from embq.worker.local import LocalRedis

log = logging.getLogger("bench.lanes")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    backfill_seconds: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def query_until(client: EmbeddingClient, stop: threading.Event, rate: float, phase: Phase, prefix: str) -> None:
    """One-text calls every ``1 / rate`` seconds (or right after the last, when it took longer)."""
    i = 0
    while not stop.is_set():
        started = time.monotonic()
        client.embed([f"{prefix} query {i}: how long does a question wait behind a backfill?"], timeout=600)
        phase.latencies.append(time.monotonic() - started)
        i += 1
        stop.wait(max(0.0, 1 / rate - (time.monotonic() - started)))


def backfill(redis_url: str, rows: list[str], work: Path, name: str) -> float:
    """``embq embed`` of ``rows`` against the running worker; returns its seconds."""
    source = work / f"{name}.txt"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    env = {**os.environ, "EMBQ_REDIS_URL": redis_url, "EMBQ_MODEL": MINILM, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "embq", "embed", str(source), "-o", str(work / f"{name}.npy"), "--no-progress", "-q"],
        env=env,
        check=True,
        cwd=ROOT,
    )
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of each backfill")
    parser.add_argument("--rate", type=float, default=4.0, help="queries per second")
    parser.add_argument("--idle-queries", type=int, default=100)
    parser.add_argument("--max-words", type=int, default=60, help="longest backfill row, in words")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    idle, busy = Phase(), Phase()
    with (
        LocalRedis() as server,
        stack.workers(server.url, "sentence-transformers", 1),
        tempfile.TemporaryDirectory() as tmp,
    ):
        work = Path(tmp)
        client = EmbeddingClient(server.url, model=MINILM)
        client.embed(["warm up"], timeout=600)
        for i in range(args.idle_queries):
            started = time.monotonic()
            client.embed([f"idle query {i}: how long does a question wait when nothing else runs?"], timeout=600)
            idle.latencies.append(time.monotonic() - started)
            time.sleep(max(0.0, 1 / args.rate - (time.monotonic() - started)))
        stop = threading.Event()
        asking = threading.Thread(target=query_until, args=(client, stop, args.rate, busy, "busy"))
        asking.start()
        try:
            rows = make_texts(args.rows, seed=11, max_words=args.max_words)
            busy.backfill_seconds = backfill(server.url, rows, work, "with-queries")
        finally:
            stop.set()
            asking.join()
        alone = backfill(server.url, make_texts(args.rows, seed=12, max_words=args.max_words), work, "alone")
        client.close()
    with_queries, without = args.rows / busy.backfill_seconds, args.rows / alone
    limit = max(5 * idle.percentile(99), 3.0)
    print(f"one-text queries at {args.rate:g}/s; backfills of {args.rows:,} rows (embq embed, bulk lane), MiniLM, CPU")
    print(f"  idle:               p50 {idle.percentile(50) * 1000:7.0f} ms  p99 {idle.percentile(99) * 1000:7.0f} ms")
    print(
        f"  during a backfill:  p50 {busy.percentile(50) * 1000:7.0f} ms  p99 {busy.percentile(99) * 1000:7.0f} ms"
        f"  ({len(busy.latencies)} queries; limit {limit * 1000:.0f} ms: "
        f"{'met' if busy.percentile(99) <= limit else 'MISSED'})"
    )
    print(
        f"  backfill with the queries {with_queries:7.1f} rows/s, alone {without:7.1f} rows/s: "
        f"bulk kept {with_queries / without:.0%} of the engine"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
