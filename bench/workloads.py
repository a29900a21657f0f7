"""The workloads: each returns rows of rates measured side by side, one value per run."""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import redis

from bench import stack
from bench.texts import make_texts
from embq.producer import EmbeddingClient, Settings, keys
from embq.producer.codec import pack
from embq.worker.engines import Engine

#: Threads of the "many small producers" workload, each sending one text per call.
SMALL_PRODUCERS = 64
#: Producer threads and texts per call when workers are scaled out.
SCALING_PRODUCERS, SCALING_CALL = 8, 500


@dataclass(frozen=True)
class Sizes:
    bulk: dict[str, int]  # texts per ETL run, by engine
    small: dict[str, int]  # texts sent one by one by the small producers, by engine
    hits: int  # cached vectors read per dimension
    scaling: int  # texts per scaling run
    million: int  # texts of the one-call workload
    runs: int


FULL = Sizes(
    bulk={"sentence-transformers": 20_000, "hash": 20_000},
    small={"sentence-transformers": 2_000, "hash": 20_000},
    hits=100_000,
    scaling=40_000,
    million=1_000_000,
    runs=3,
)
QUICK = Sizes(
    bulk={"sentence-transformers": 240, "hash": 4_000},
    small={"sentence-transformers": 128, "hash": 1_000},
    hits=5_000,
    scaling=4_000,
    million=100_000,
    runs=2,
)


@dataclass
class Row:
    workload: str
    engine: str
    name: str
    rates: list[float] = field(default_factory=list)
    unit: str = "texts/s"
    notes: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def note(self, name: str, value: float) -> None:
        self.notes.setdefault(name, []).append(value)


class Rows:
    """Rows keyed by (workload, engine, name), filled run after run."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}

    def get(self, workload: str, engine: str, name: str, unit: str = "texts/s") -> Row:
        key = (workload, engine, name)
        if key not in self.rows:
            self.rows[key] = Row(workload, engine, name, unit=unit)
        return self.rows[key]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows.values())


def timed(action: Callable[..., object], *args: object) -> float:
    """Seconds ``action(*args)`` takes."""
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


#: The baseline's row: what a user does instead of embq, at its best.
DIRECT = "model called directly"
#: Batch sizes the model called directly is tried at; the best is the baseline, as a user would tune it.
DIRECT_BATCH_SIZES = (8, 16, 32, 64, 128, 256)


def direct_rate(engine: Engine, texts: list[str]) -> float:
    """Texts/s of the model called directly on all the texts at once (``encode(all_texts)``, which sorts them
    all by length) at its best batch size, chosen on the first 500 texts; the hash engine in one call."""
    model = getattr(engine, "model", None)
    if model is None:
        return len(texts) / timed(engine.encode, texts)

    def encode(some: list[str], size: int) -> None:
        model.encode(some, batch_size=size, normalize_embeddings=True, convert_to_numpy=True)

    sample = texts[:500]
    best = min(DIRECT_BATCH_SIZES, key=lambda size: timed(encode, sample, size))
    return len(texts) / timed(encode, texts, best)


def etl_bulk(
    rows: Rows,
    url: str,
    engine: str,
    sizes: Sizes,
    raw: Engine,
    infinity: Callable[[list[str]], np.ndarray] | None,
    run: int,
) -> None:
    """Unique texts through each path, then the same texts again and a 50%-duplicate mix through embq."""
    n = sizes.bulk[engine]
    texts = make_texts(n, seed=1000 + run)
    rows.get("ETL bulk", engine, DIRECT).rates.append(direct_rate(raw, texts))
    client = stack.client(url, engine)
    embed = functools.partial(client.embed, truncate=True)  # texts over the context are cut, as every system cuts them
    before = stack.computed(url, engine)
    row = rows.get("ETL bulk", engine, "embq, 1 worker")
    row.rates.append(n / timed(embed, texts))
    row.note("reached engine", stack.computed(url, engine) - before)
    rows.get("ETL bulk", engine, "naive Celery, 1 task per text").rates.append(n / timed(stack.naive_embed, texts))
    mix = texts[: n // 2] + make_texts(n - n // 2, seed=5000 + run)
    if infinity is not None:
        rows.get("ETL bulk", engine, "Infinity server").rates.append(n / timed(infinity, texts))
        rows.get("Repeats", engine, "Infinity, 50% duplicates").rates.append(n / timed(infinity, mix))

    before = stack.computed(url, engine)
    row = rows.get("Repeats", engine, "embq, same texts again")
    row.rates.append(n / timed(embed, texts))
    row.note("reached engine", stack.computed(url, engine) - before)
    before = stack.computed(url, engine)
    row = rows.get("Repeats", engine, "embq, 50% duplicates")
    row.rates.append(n / timed(embed, mix))
    row.note("reached engine", stack.computed(url, engine) - before)
    row.note("new texts", n - n // 2)
    client.close()


def many_small_producers(
    rows: Rows, url: str, engine: str, sizes: Sizes, worker: stack.Worker, raw: Engine, run: int
) -> None:
    """Many producers, one text per call: what coalescing buys, and its latency."""
    texts = make_texts(sizes.small[engine], seed=9000 + run)
    client = stack.client(url, engine)
    latencies: list[float] = []
    lock = threading.Lock()

    def produce(mine: list[str]) -> None:
        for text in mine:
            started = time.perf_counter()
            client.embed([text], truncate=True)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=produce, args=(texts[i::SMALL_PRODUCERS],)) for i in range(SMALL_PRODUCERS)]
    calls, sent = worker.engine_calls()
    elapsed = timed(run_threads, threads)
    calls_after, sent_after = worker.engine_calls()
    client.close()
    row = rows.get("Small producers", engine, f"embq, {SMALL_PRODUCERS} producers x 1 text")
    row.rates.append(len(texts) / elapsed)
    row.note("p50 ms", 1000 * float(np.percentile(latencies, 50)))
    row.note("p99 ms", 1000 * float(np.percentile(latencies, 99)))
    row.note("texts per engine call", (sent_after - sent) / max(1.0, calls_after - calls))
    rows.get("Small producers", engine, DIRECT).rates.append(direct_rate(raw, texts))


def cache_hits(rows: Rows, url: str, sizes: Sizes, run: int) -> None:
    """Cached vectors read through ``embed`` against pipelined MGET + frombuffer of the same keys."""
    r = redis.Redis.from_url(url)
    for dim in (384, 1024, 2560):
        model, namespace = f"bench/hits-{dim}", f"hits-{run}"
        texts = [f"cached {run} {i}" for i in range(sizes.hits)]
        digests = keys.text_digests(model, namespace, "", texts)
        vectors = np.random.default_rng(run).standard_normal((1000, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        values = [pack(v, "float32") for v in vectors]
        for start in range(0, len(digests), 5000):
            pipe = r.pipeline(transaction=False)
            for i, d in enumerate(digests[start : start + 5000], start):
                pipe.set(keys.vector_key(d), values[i % len(values)], ex=3600)
            pipe.execute()
        client = EmbeddingClient(settings=Settings(redis_url=url, model=model, cache_namespace=namespace))
        names = [keys.vector_key(d) for d in digests]
        # One untimed pass of each first: whichever ran first would otherwise pay
        # alone for the process's first touch of that much memory.
        client.embed(texts)
        mget_ceiling(r, names, dim)
        name = f"embq embed, dim {dim}"
        rows.get("Cache hits", "-", name, "vectors/s").rates.append(len(texts) / timed(client.embed, texts))
        ceiling = len(texts) / timed(mget_ceiling, r, names, dim)
        rows.get("Cache hits", "-", f"raw MGET ceiling, dim {dim}", "vectors/s").rates.append(ceiling)
        if dim == 384:
            one = [texts[0]]
            latencies = [timed(client.embed, one) for _ in range(2000)]
            row = rows.get("Cache hits", "-", "single cached text", "calls/s")
            row.rates.append(len(latencies) / sum(latencies))
            row.note("p50 ms", 1000 * float(np.percentile(latencies, 50)))
            row.note("p99 ms", 1000 * float(np.percentile(latencies, 99)))
        client.close()
        for start in range(0, len(digests), 5000):  # up to 1 GB at dim 2560: free it for the next dim
            r.delete(*(keys.vector_key(d) for d in digests[start : start + 5000]))
    r.close()


def mget_ceiling(r: redis.Redis, names: list[str], dim: int) -> np.ndarray:
    out = np.empty((len(names), dim), dtype=np.float32)
    pipe = r.pipeline(transaction=False)
    for start in range(0, len(names), 2000):
        pipe.mget(names[start : start + 2000])
    row = 0
    for values in pipe.execute():
        for value in values:
            out[row] = np.frombuffer(value, dtype=np.float32, offset=8)
            row += 1
    return out


def scaling(rows: Rows, url: str, sizes: Sizes, run: int) -> None:
    """1, 2 and 4 hash workers on the same machine: where the queue's own cost goes."""
    for count in (1, 2, 4):
        with stack.workers(url, "hash", count):
            texts = make_texts(sizes.scaling, seed=20_000 + run * 10 + count, max_words=60)
            client = stack.client(url, "hash")
            calls = [texts[i : i + SCALING_CALL] for i in range(0, len(texts), SCALING_CALL)]
            threads = [
                threading.Thread(target=embed_each, args=(client, calls[i::SCALING_PRODUCERS]))
                for i in range(SCALING_PRODUCERS)
            ]
            elapsed = timed(run_threads, threads)
            rows.get("Scaling", "hash", f"{count} worker{'s' if count > 1 else ''}").rates.append(len(texts) / elapsed)
            client.close()


def embed_each(client: EmbeddingClient, calls: list[list[str]]) -> None:
    for texts in calls:
        client.embed(texts)


def run_threads(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
