"""The test topologies themselves: a real 3+3 Redis Cluster and a real master, replica and three sentinels
start, serve, and fail over when a master is killed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from embq.worker.local import wait_until
from tests.topology import LocalCluster, LocalSentinel

#: Seconds a client may take to find the new master after a failover.
RECONNECT = 20.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    started = time.monotonic()
    with LocalCluster() as running:
        print(f"cluster up in {time.monotonic() - started:.1f}s")
        yield running


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    started = time.monotonic()
    with LocalSentinel() as running:
        print(f"sentinels watching in {time.monotonic() - started:.1f}s")
        yield running


def test_a_cluster_serves_and_a_killed_master_is_replaced_by_its_replica(cluster: LocalCluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and len(cluster.replicas()) == 3
    client = RedisCluster.from_url(cluster.url)
    try:
        client.set("topology", "kept")
        assert client.get("topology") == b"kept"
        owner = client.get_node_from_key("topology").port
        assert owner in dict(masters)
        # The copy must reach the replica before its master dies: replication is asynchronous.
        seen = cluster.nodes_seen()
        owner_id = next(n.id for n in seen if n.port == owner)
        replica = next(n.port for n in seen if n.master_id == owner_id)
        with redis.Redis(port=replica) as copy:
            copy.execute_command("READONLY")
            wait_until(lambda: copy.dbsize() == 1, 5, "the key on the replica")

        took = cluster.kill_master(owner)
        print(f"cluster failover {took:.1f}s")

        assert cluster.ok() and owner not in dict(cluster.masters())
        assert len(cluster.masters()) == 3 and replica in dict(cluster.masters())
        deadline = time.monotonic() + RECONNECT
        while True:
            try:
                assert client.get("topology") == b"kept"
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert sum(cluster.keys_per_master().values()) == 1
    finally:
        client.close()


def test_sentinels_fail_the_master_over_to_its_replica(sentinel: LocalSentinel) -> None:
    watcher = Sentinel(sentinel.sentinels, socket_timeout=1)
    master = watcher.master_for(sentinel.master_name, socket_timeout=1)
    try:
        old = sentinel.master_address()
        assert master.set("topology", "kept") and master.get("topology") == b"kept"
        assert master.wait(1, 2000) == 1  # on the replica before its master dies

        took = sentinel.kill_master()
        print(f"sentinel failover {took:.1f}s")

        assert sentinel.master_address() != old
        deadline = time.monotonic() + RECONNECT
        while True:
            try:
                assert master.get("topology") == b"kept"
                assert master.set("after", "failover") and master.get("after") == b"failover"
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert master.connection_pool.get_master_address() == sentinel.master_address()
    finally:
        master.close()
        for client in watcher.sentinels:
            client.close()
