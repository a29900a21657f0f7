"""``python -m bench.gateway``: single texts through ``embq serve`` against ``EmbeddingClient.embed`` called directly.

One private Redis, one hash-engine worker, one gateway process, all on this
machine. ``--callers`` concurrent callers each send one text per request and
wait for it: threads sharing one ``EmbeddingClient`` for the direct rows, one
asyncio loop posting what the ``openai`` client posts (``encoding_format:
base64``, a bearer key) over one keep-alive connection per caller for the
gateway rows.
"Cached" requests pick texts embedded beforehand; "uncached" ones are new texts,
so each reaches the worker. Prints requests/s and latency percentiles per row,
and the gateway's share of the direct figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import numpy as np

from embq.producer import EmbeddingClient, Settings
from embq.worker.local import LocalGateway, LocalRedis, LocalWorker

MODEL = "hash/bench"
KEY = "bench-key"


class Result:
    def __init__(self, latencies: list[float], seconds: float) -> None:
        self.latencies = sorted(latencies)
        self.rate = len(latencies) / seconds

    def percentile(self, p: float) -> float:
        return self.latencies[min(len(self.latencies) - 1, int(p * len(self.latencies)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000


def direct(client: EmbeddingClient, texts: Iterator[str], requests: int, callers: int) -> Result:
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []

    def caller() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued == requests:
                    return
                issued += 1
                text = next(texts)
            started = time.perf_counter()
            client.embed([text])
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Result(latencies, time.perf_counter() - started)


def through_gateway(url: str, texts: Iterator[str], requests: int, callers: int) -> Result:
    """Keep-alive HTTP/1.1 over asyncio streams, one connection per caller: a load generator that costs
    little CPU, so that the gateway, not the HTTP client, is what the 2 cores are spent on."""
    host, port = url.removeprefix("http://").split(":")

    def request(text: str) -> bytes:
        body = json.dumps({"model": MODEL, "input": [text], "encoding_format": "base64"}).encode()
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def run() -> Result:
        latencies: list[float] = []
        issued = 0

        async def caller() -> None:
            nonlocal issued
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                while issued < requests:
                    issued += 1
                    message = request(next(texts))
                    started = time.perf_counter()
                    writer.write(message)
                    status = await reader.readline()
                    length = 0
                    while (line := await reader.readline()) != b"\r\n":
                        name, _, value = line.partition(b":")
                        if name.lower() == b"content-length":
                            length = int(value)
                    data = await reader.readexactly(length)
                    latencies.append(time.perf_counter() - started)
                    if b" 200 " not in status:
                        raise RuntimeError(f"{status!r}: {data[:300]!r}")
            finally:
                writer.close()

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return Result(latencies, time.perf_counter() - started)

    return asyncio.run(run())


def fresh(tag: str) -> Iterator[str]:
    run = uuid.uuid4().hex[:8]
    return (f"{tag} {run} text number {i}: a short sentence to embed" for i in itertools.count())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--callers", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument("--cached", type=int, default=4000, help="cached requests per row")
    parser.add_argument("--uncached", type=int, default=1500, help="uncached requests per row")
    args = parser.parse_args(argv)

    with LocalRedis() as redis_server, LocalWorker(redis_server.url, engine="hash", model=MODEL):
        env = {"EMBQ_API_KEYS": KEY}
        with LocalGateway(redis_server.url, models=(MODEL,), env=env) as gateway:
            client = EmbeddingClient(settings=Settings(redis_url=redis_server.url, model=MODEL))
            warm = [f"cached text number {i}: a short sentence to embed" for i in range(1000)]
            client.embed(warm)
            rows: list[tuple[str, str, Result]] = []
            plan: list[tuple[str, str, Callable[[], Result]]] = [
                ("cached", "direct", lambda: direct(client, itertools.cycle(warm), args.cached, args.callers)),
                ("cached", "gateway", lambda: through_gateway(gateway.url, itertools.cycle(warm), args.cached, args.callers)),  # noqa: E501
                ("uncached", "direct", lambda: direct(client, fresh("direct"), args.uncached, args.callers)),
                ("uncached", "gateway", lambda: through_gateway(gateway.url, fresh("gateway"), args.uncached, args.callers)),  # noqa: E501
            ]  # fmt: skip
            # Warm both paths (connections, the gateway's client) before anything is timed.
            direct(client, fresh("warm-direct"), 200, args.callers)
            through_gateway(gateway.url, fresh("warm-gateway"), 200, args.callers)
            for workload, path, measure in plan:
                rows.append((workload, path, measure()))
            check = np.array(httpx.post(
                gateway.url + "/v1/embeddings", json={"model": MODEL, "input": [warm[0]], "encoding_format": "float"},
                headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            ).json()["data"][0]["embedding"], dtype=np.float32)  # fmt: skip
            assert np.array_equal(check, client.embed([warm[0]])[0]), "the gateway must return the client's vectors"
            client.close()

    print(f"single texts, {args.callers} concurrent callers, hash engine, 1 worker", file=sys.stderr)
    print(f"{'workload':<9} {'path':<8} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'vs direct':>10}")
    by_key = {(w, p): r for w, p, r in rows}
    for workload, path, result in rows:
        ratio = result.rate / by_key[(workload, "direct")].rate
        print(
            f"{workload:<9} {path:<8} {result.rate:>11,.0f} {result.p50:>8.2f} {result.percentile(0.99):>8.2f} "
            f"{ratio:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
