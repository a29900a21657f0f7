"""One hot cached text per ``EmbeddingClient.embed`` call, with the in-process L1 and without it.

``python -m bench.l1 [--hot 1000] [--calls 2000]``: a ``hash`` worker and a
private ``redis-server``; one client embeds ``--hot`` texts (so they are
cached), then asks ``--calls`` times for one of them, one text a call, and
prints the p50 and p99 of a call and the Redis commands those calls cost
(``INFO commandstats`` before and after, its own INFO left out). Run first with
``EMBQ_L1_BYTES=0`` (every call reads Redis), then with the default L1.

Not a test: it prints a table; the numbers go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import redis

from embq.producer import EmbeddingClient, Settings
from embq.worker.local import LocalRedis, LocalWorker

MODEL = "hash/bench-l1"


def commands(r: redis.Redis) -> int:
    """Commands Redis has run, INFO itself left out."""
    stats: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def run(url: str, l1_bytes: int, hot: list[str], calls: int) -> tuple[float, float, int]:
    r = redis.Redis.from_url(url)
    with EmbeddingClient(settings=Settings(redis_url=url, model=MODEL, l1_bytes=l1_bytes)) as client:
        client.embed(hot, timeout=120)
        for text in hot[:100]:  # warm: connections, code paths
            client.embed([text])
        before = commands(r)
        times = []
        for i in range(calls):
            one = [hot[(i * 7) % len(hot)]]
            start = time.perf_counter()
            client.embed(one)
            times.append(time.perf_counter() - start)
        spent = commands(r) - before
    r.close()
    times.sort()
    return statistics.median(times) * 1000, times[int(0.99 * len(times))] * 1000, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    hot = [f"a hot text that many callers ask for, number {i}" for i in range(args.hot)]
    with LocalRedis() as server, LocalWorker(server.url, engine="hash", model=MODEL):
        print(f"{'':<22} {'p50 ms':>8} {'p99 ms':>8} {'Redis commands':>15}")
        for label, size in (("Redis only (L1 off)", 0), ("L1 (default size)", Settings().l1_bytes)):
            p50, p99, spent = run(server.url, size, hot, args.calls)
            print(f"{label:<22} {p50:>8.3f} {p99:>8.3f} {spent:>15}")


if __name__ == "__main__":
    main()
