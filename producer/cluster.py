"""The vector cache on one Redis or on a Redis Cluster, found out from the URL's node (``INFO cluster``).

On a cluster the texts of a batch spread over every master, and one script
may only touch the keys of its own node. So the per-text work of
``embq.producer.protocol`` (CLAIM, RELEASE, the reads of cached vectors) runs as one
script call per node over the texts of that node's slots: a round trip per node
per batch, never one per text. Only the liveness of claims' owners lives on
other nodes: CLAIM answers ``{owner}`` for a claim whose owner it cannot judge,
and ``claim`` looks those owners up (one pipeline) and asks again, saying who
is alive. That second round happens only when two producers want one text.

A master that dies takes its slots away until its replica is promoted (the
cluster's node timeout plus an election: seconds). Work on those slots is
retried, on the new topology, for up to ``FAILOVER_WAIT`` seconds; everything
the protocol does may be done twice (a claim found ``OURS`` is sent if it was
not, a vector written again is the same vector), and what the old master had
not yet replicated is found again by the producers' ticks: a claim that
vanished is claimed again, a task lost with it is sent again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeGuard

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from embq.producer import keys, protocol
from embq.producer.backend import COMMAND_PACKER, RETRIES, ConnectionRetry, connect, connect_once

log = logging.getLogger(__name__)

CacheClient: TypeAlias = redis.Redis | RedisCluster

#: Seconds work on the slots of a dead master is retried: a replica is promoted after the cluster's
#: ``cluster-node-timeout`` (15 s by default) and an election.
FAILOVER_WAIT = 60.0
#: Longest pause between two tries while a cluster fails over.
RETRY_CAP = 2.0

#: What a node says while the cluster moves its slots, or a node that is gone: try again elsewhere.
_RETRIED = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # the cluster is down, a slot not covered yet
    redis.exceptions.AskError,  # MOVED, ASK
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a master demoted to replica
    redis.exceptions.RedisClusterException,  # a slot no node covers yet (not a RedisError)
)
#: A script's words for a key whose slot this node no longer serves.
_NOT_HERE = "non local key"


def is_cluster(client: Any) -> TypeGuard[RedisCluster]:
    return isinstance(client, RedisCluster)


def cluster_enabled(client: redis.Redis) -> bool:
    """Whether this Redis is a node of a Redis Cluster. Raises redis' errors when it does not answer;
    a Redis that refuses INFO (an ACL) is taken for a single one."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.exceptions.ResponseError:
        return False


def connect_cache(url: str) -> CacheClient:
    """A client of the cache at ``url``: the whole cluster when that Redis is a node of one. It asks
    the Redis (with ``embq.producer.backend.connect``'s retries), so it raises redis' errors when none answers."""
    single = connect(url)
    if not cluster_enabled(single):
        return single
    single.close()
    return connect_cluster(url)


def connect_cluster(url: str) -> RedisCluster:
    """A client of the whole Redis Cluster that the node at ``url`` belongs to."""
    return RedisCluster.from_url(
        url,
        retry=ConnectionRetry(ExponentialBackoff(cap=RETRY_CAP, base=0.05), 4 * RETRIES),
        health_check_interval=30,
        socket_keepalive=True,
        command_packer=COMMAND_PACKER,
    )


def connect_cache_once(url: str, timeout: float = 5.0) -> CacheClient:
    """``embq.producer.backend.connect_once`` for the cache: no retries, ``timeout`` seconds a command."""
    single = connect_once(url, timeout)
    if not cluster_enabled(single):
        return single
    single.close()
    return RedisCluster.from_url(
        url,
        retry=Retry(NoBackoff(), 1),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def pipeline(client: CacheClient, atomic: bool = False) -> Any:
    """A pipeline; ``atomic`` (MULTI/EXEC) on one Redis only: a cluster's keys of several slots cannot be."""
    return client.pipeline(transaction=atomic and not is_cluster(client))


# -- per-text work, one script call per node -------------------------------------------------------

_SCRIPTS = {
    "claim": protocol.CLAIM_ON_NODE,
    "release": protocol.RELEASE,
    "look": protocol.LOOK_ON_NODE,
}


def per_node(
    cluster: RedisCluster, names: Sequence[str], do: Callable[[redis.Redis, list[int]], list[Any]]
) -> list[Any]:
    """``do(node, indices)`` for the keys ``names`` of each master, its replies placed back in key
    order. The keys of a node that fails or no longer owns them are grouped again on a fresh look
    at the cluster and retried, until ``FAILOVER_WAIT`` seconds have passed."""
    out: list[Any] = [None] * len(names)
    todo = list(range(len(names)))
    deadline = time.monotonic() + FAILOVER_WAIT
    pause = 0.05
    while todo:
        failed: list[int] = []
        error: Exception | None = None
        for node, indices in _by_node(cluster, names, todo).items():
            try:
                replies = do(cluster.get_redis_connection(node), indices)
            except (redis.exceptions.ResponseError, *_RETRIED) as e:
                if not isinstance(e, _RETRIED) and _NOT_HERE not in str(e):
                    raise
                failed += indices
                error = e
                continue
            for i, reply in zip(indices, replies, strict=True):
                out[i] = reply
        if not failed:
            break
        if time.monotonic() + pause > deadline:
            if isinstance(error, redis.exceptions.RedisError):
                raise error
            raise redis.exceptions.ConnectionError(f"the cache cluster did not recover: {error}") from error
        log.info("cache cluster node failed (%s); retrying %d texts on a fresh view of the cluster", error, len(failed))
        time.sleep(pause)
        pause = min(RETRY_CAP, pause * 2)
        _refresh(cluster)
        todo = failed
    return out


def _by_node(cluster: RedisCluster, names: Sequence[str], indices: list[int]) -> dict[ClusterNode, list[int]]:
    groups: dict[ClusterNode, list[int]] = {}
    nodes = cluster.nodes_manager
    for i in indices:
        groups.setdefault(nodes.get_node_from_slot(cluster.keyslot(names[i])), []).append(i)
    return groups


def _refresh(cluster: RedisCluster) -> None:
    try:
        cluster.nodes_manager.initialize()
    except _RETRIED as e:  # no node answers yet: the next try looks again
        log.debug("cannot refresh the cluster's topology yet: %s", e)


def _evalsha(client: redis.Redis, source: str, args: list[Any]) -> Any:
    sha = hashlib.sha1(source.encode()).hexdigest()
    try:
        return client.evalsha(sha, 0, *args)
    except redis.exceptions.NoScriptError:  # a new or restarted Redis
        client.script_load(source)
        return client.evalsha(sha, 0, *args)


def _on_nodes(cluster: RedisCluster, name: str, head: list[Any], digests: Sequence[str], tail: list[Any]) -> list[Any]:
    """Script ``name`` per node, ARGV ``head``, the node's digests end to end, ``tail``; one reply per digest."""
    names = [keys.vector_key(d) for d in digests]

    def do(node: redis.Redis, indices: list[int]) -> list[Any]:
        reply = _evalsha(node, _SCRIPTS[name], [*head, "".join(digests[i] for i in indices), *tail])
        if name != "release":
            return list(reply)
        watchers: list[list[Any]] = [[] for _ in indices]  # RELEASE: {index, watcher, ...} -> per digest
        for k in range(0, len(reply), 2):
            watchers[int(reply[k]) - 1].append(reply[k + 1])
        return watchers

    return per_node(cluster, names, do)


def look(client: CacheClient, digests: Sequence[str]) -> list[bytes | None]:
    """The values of the texts' keys (a vector, a claim or None), in order."""
    if not digests:
        return []
    if isinstance(client, RedisCluster):
        return _on_nodes(client, "look", [], digests, [])
    return client.mget([keys.vector_key(d) for d in digests])  # type: ignore[return-value]


def claim(client: RedisCluster, args: list[Any], digests: Sequence[str]) -> list[Any]:
    """``protocol.CLAIM`` over a cluster (``args``: its ARGV before the digests); one item per digest."""
    token, hold, reply, watch_ttl, stats = args
    out: list[Any] = [None] * len(digests)
    todo = list(range(len(digests)))
    live: set[str] = set()
    dead: set[str] = set()
    for _ in range(3):  # owners met in a round are judged in the next; new ones rarely appear meanwhile
        items = _on_nodes(
            client,
            "claim",
            [token, hold, reply, watch_ttl, ""],
            [digests[i] for i in todo],
            [" ".join(live), " ".join(dead)],
        )
        unknown: dict[int, str] = {}
        for i, item in zip(todo, items, strict=True):
            if isinstance(item, list):
                unknown[i] = item[0].decode() if isinstance(item[0], bytes) else str(item[0])
            else:
                out[i] = item
        if not unknown:
            break
        owners = sorted(set(unknown.values()) - live - dead)
        pipe = client.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(keys.alive_key(owner))
        for owner, exists in zip(owners, pipe.execute(), strict=True):
            (live if exists else dead).add(owner)
        todo = list(unknown)
    for i in range(len(out)):
        if out[i] is None:  # claimed by yet another owner at each look: watch it from our ticks
            out[i] = protocol.WATCHING
    if stats:
        hits = sum(isinstance(item, bytes) for item in out)
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(stats, "hits", hits)
        pipe.hincrby(stats, "misses", len(out) - hits)
        pipe.expire(stats, keys.STATS_TTL)
        pipe.execute()
    return out


def release(client: CacheClient, token: str, digests: Sequence[str]) -> list[Any]:
    """``protocol.RELEASE``: its reply, ``{index, watcher, ...}`` over ``digests`` (1-based)."""
    if not digests:
        return []
    if not isinstance(client, RedisCluster):
        return _evalsha(client, protocol.RELEASE, [token, "".join(digests)])  # type: ignore[no-any-return]
    flat: list[Any] = []
    for i, watchers in enumerate(_on_nodes(client, "release", [token], digests, []), 1):
        for watcher in watchers:
            flat += [i, watcher]
    return flat


def read_stream(client: CacheClient, stream: str, last_id: Any, count: int, block_ms: int | None) -> Any:
    """XREAD of one stream. On a cluster it goes straight to the stream's node: redis-py's cluster client
    asks its default node (``COMMAND GETKEYS``) where an XREAD goes, and that node may be the one that died."""
    if not isinstance(client, RedisCluster):
        return client.xread({stream: last_id}, count=count, block=block_ms)

    def read(node: redis.Redis, indices: list[int]) -> list[Any]:
        return [node.xread({stream: last_id}, count=count, block=block_ms)]

    return per_node(client, [stream], read)[0]
