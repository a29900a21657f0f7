"""Redis CPU per text with the cache on one Redis and on a 3-master Redis Cluster, side by side.

``python -m bench.cluster_cost [--texts N] [--runs R]``: a ``hash`` worker (the
model costs nothing, so Redis's own work shows) and a producer embed N new short
texts, then read them again (all cached), first with the cache on one
``redis-server``, then on a cluster of 3 masters and 3 replicas started here
(the broker is its own Redis in both; the single Redis has a replica, as each
master of the cluster has, since feeding a replica is part of every write's
cost). Redis CPU is read with ``psutil`` from
each server process around the call: per text for the single Redis, per master
(and for the replicas together) on the cluster. Then the two ways of claiming on
a cluster that were considered, without a worker: one CLAIM script call per node
per batch (what embq does) against one script call per text in per-node
pipelines (claims grouped by slot, one text a slot in practice).

Not a test: it prints a table; the numbers go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from redis.cluster import RedisCluster

from bench.texts import make_texts
from embq.producer import EmbeddingClient, Settings, keys, protocol
from embq.producer.cluster import claim
from embq.worker.local import LocalRedis, LocalWorker
from tests.topology import LocalCluster

MODEL = "hash/bench-cluster"
SHORT_WORDS = 12
#: Texts per claim round trip, as the producer's ``CLAIM_CHUNK``.
CHUNK = 1000


def cpu(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


@contextmanager
def serving(broker: LocalRedis, cache_url: str) -> Iterator[EmbeddingClient]:
    env = {"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache_url}
    with LocalWorker(broker.url, engine="hash", model=MODEL, env=env):
        client = EmbeddingClient(settings=Settings(broker_url=broker.url, cache_url=cache_url, model=MODEL))
        try:
            client.embed(["warm up"], timeout=60)
            yield client
        finally:
            client.close()


def per_text(groups: dict[str, list[psutil.Process]], run: Any, count: int) -> dict[str, float]:
    """Redis CPU µs per text of each group of server processes while ``run()`` runs."""
    before = {name: cpu(ps) for name, ps in groups.items()}
    run()
    return {name: (cpu(ps) - before[name]) / count * 1e6 for name, ps in groups.items()}


def embed_costs(client: EmbeddingClient, groups: dict[str, list[psutil.Process]], texts: list[str]) -> dict[str, Any]:
    new = per_text(groups, lambda: client.embed(texts, timeout=600), len(texts))
    cached = per_text(groups, lambda: client.embed(texts, timeout=600), len(texts))
    return {"new": new, "cached": cached}


def claim_ways(cluster: RedisCluster, groups: dict[str, list[psutil.Process]], count: int, run: int) -> dict[str, Any]:
    """Master CPU per text of claiming ``count`` new texts: per node per batch, and per text."""
    digests = [hashlib.blake2b(f"{run} {i}".encode(), digest_size=32).hexdigest() for i in range(2 * count)]
    args: list[Any] = ["bench", 600_000, keys.reply_key("bench"), 60_000, ""]

    def per_node() -> None:
        for start in range(0, count, CHUNK):
            claim(cluster, args, digests[start : start + CHUNK])

    for node in cluster.get_primaries():
        source_sha = cluster.get_redis_connection(node).script_load(protocol.CLAIM_ON_NODE)

    def per_key() -> None:
        for start in range(count, 2 * count, CHUNK):
            by_node: dict[Any, list[str]] = {}
            for digest in digests[start : start + CHUNK]:
                node = cluster.get_node_from_key(keys.vector_key(digest))
                by_node.setdefault(node, []).append(digest)
            for node, part in by_node.items():
                pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
                for digest in part:
                    pipe.evalsha(source_sha, 0, *args, digest, "", "")
                pipe.execute()

    masters = {"masters": groups["masters"]}
    return {
        "per node": per_text(masters, per_node, count)["masters"],
        "per text": per_text(masters, per_key, count)["masters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    rows: dict[str, list[float]] = {}

    def add(label: str, value: float) -> None:
        rows.setdefault(label, []).append(value)

    with LocalRedis() as broker, LocalRedis() as single, LocalCluster() as cluster:
        assert single.process is not None
        # A replica as the cluster's masters have: feeding it is part of every write's cost.
        replica = LocalRedis("--replicaof", "127.0.0.1", str(single.port)).start()
        assert replica.process is not None
        one = {"redis": [psutil.Process(single.process.pid)], "replica": [psutil.Process(replica.process.pid)]}
        masters = [psutil.Process(pid) for _, pid in cluster.masters()]
        replicas = [psutil.Process(pid) for _, pid in cluster.replicas()]
        on_cluster = {
            "masters": masters,
            "replicas": replicas,
            **{f"master {i + 1}": [p] for i, p in enumerate(masters)},
        }
        for run in range(options.runs):
            texts = make_texts(options.texts, seed=70_000 + run, max_words=SHORT_WORDS)
            with serving(broker, single.url) as client:
                costs = embed_costs(client, one, texts)
            for kind in ("new", "cached"):
                add(f"one Redis, {kind} texts: the master", costs[kind]["redis"])
                add(f"one Redis, {kind} texts: its replica", costs[kind]["replica"])
            texts = make_texts(options.texts, seed=80_000 + run, max_words=SHORT_WORDS)
            with serving(broker, cluster.url) as client:
                costs = embed_costs(client, on_cluster, texts)
            for kind in ("new", "cached"):
                add(f"cluster, {kind} texts: masters together", costs[kind]["masters"])
                for i in range(len(masters)):
                    add(f"cluster, {kind} texts: master {i + 1}", costs[kind][f"master {i + 1}"])
                add(f"cluster, {kind} texts: replicas together", costs[kind]["replicas"])
            client_of_cluster = RedisCluster.from_url(cluster.url)
            ways = claim_ways(client_of_cluster, on_cluster, options.texts, run)
            client_of_cluster.close()
            add("cluster claims, one script call per node per batch", ways["per node"])
            add("cluster claims, one script call per text", ways["per text"])
            time.sleep(0.5)
        replica.stop()
    print(f"Redis CPU µs per text, {options.texts:,} short texts, median of {options.runs} runs (min-max)\n")
    print("| | µs/text |\n| --- | ---: |")
    for label, values in rows.items():
        print(f"| {label} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")


if __name__ == "__main__":
    main()
