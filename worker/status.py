"""``embq status``: queue depth per model, workers online, cache size and hit rate, in one screen.

The hit rate per model is embq's own: the share of texts producers asked for
that were already cached (producers count ``hits`` and ``misses`` into the
model's stats hash, and ``l1_hits``, the texts their in-process L1 answered,
reported with their next round trip: within a few seconds while they are busy,
and when they close). Redis's keyspace counter is shown too, named as what it is:
every lookup of that Redis, embq's markers and queues included.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, cast

import msgpack

from embq.producer import keys
from embq.producer.backend import backend_errors, connect, probe
from embq.producer.cluster import CacheClient, connect_cache, is_cluster, pipeline
from embq.producer.settings import Settings


def _name(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def cache_info(cache: CacheClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """INFO's stats and memory sections; a cluster's summed over its masters."""
    nodes: list[Any] = [cache]
    if is_cluster(cache):
        nodes = [cache.get_redis_connection(n) for n in cache.get_primaries()]
    stats = [cast(dict, node.info("stats")) for node in nodes]
    memory = [cast(dict, node.info("memory")) for node in nodes]
    if len(nodes) == 1:
        return stats[0], memory[0]
    summed = {name: sum(int(s.get(name, 0)) for s in stats) for name in ("keyspace_hits", "keyspace_misses")}
    used = sum(int(m.get("used_memory", 0)) for m in memory) / 2**20
    return summed, {**memory[0], "used_memory_human": f"{used:.2f}M over {len(nodes)} masters"}


def _hashes(cache: CacheClient, *prefixes: str) -> list[dict[str, dict[str, str]]]:
    """Every hash under each prefix, by the rest of its key; SCAN, never KEYS. The hashes are read in one
    transaction (on one Redis), so that the model rows and the worker rows are counts of one moment."""
    found: list[tuple[str, str]] = [
        (prefix, _name(key)) for prefix in prefixes for key in cache.scan_iter(match=prefix + "*", _type="hash")
    ]
    pipe = pipeline(cache, atomic=True)
    for _, key in found:
        pipe.hgetall(key)
    read = pipe.execute() if found else []
    out: list[dict[str, dict[str, str]]] = [{} for _ in prefixes]
    for (prefix, key), fields in zip(found, read, strict=True):
        if fields:  # gone between the SCAN and the read
            out[prefixes.index(prefix)][key[len(prefix) :]] = {_name(k): _name(v) for k, v in fields.items()}
    return out


def served(worker: dict[str, str]) -> str:
    """A worker's model as its queue names it: ``model``, or ``model@namespace`` off the default namespace."""
    queue = keys.queue_name(worker.get("model", "?"), worker.get("namespace", keys.DEFAULT_NAMESPACE))
    return queue[len(keys.QUEUE_PREFIX) :]


def hit_rate(counts: dict[str, Any]) -> str:
    """``hits / (hits + misses)``, or ``n/a`` before the first lookup; hits of both levels, the producers'
    in-process L1 (``l1_hits``) and Redis."""
    hits, misses = int(counts.get("hits", 0)) + int(counts.get("l1_hits", 0)), int(counts.get("misses", 0))
    return f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"


def oldest_sent(message: bytes | None) -> float | None:
    """When the producer sent a queued task (its payload's ``sent``), from kombu's message in the list."""
    if not message:
        return None
    try:
        envelope = json.loads(message)
        body = msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)
        sent = body[0][0].get("sent")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, msgpack.UnpackException):
        return None
    return float(sent) if isinstance(sent, int | float) else None


def lanes_of(broker: Any) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Tasks queued per model (as its queue names it) and lane, and the age of each model's oldest
    interactive task (the list's tail: producers push at the head)."""
    depth: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    now = time.time()
    for key in broker.scan_iter(match=keys.QUEUE_PREFIX + "*", _type="list"):
        model, lane = keys.queue_lane(_name(key)[len(keys.QUEUE_PREFIX) :])
        depth.setdefault(model, dict.fromkeys(keys.LANES, 0))[lane] += cast(int, broker.llen(key))
        if lane == keys.INTERACTIVE:
            sent = oldest_sent(broker.lindex(key, -1))
            if sent is not None:
                oldest[model] = max(0.0, now - sent)
    return depth, oldest


def render_status(settings: Settings) -> str:
    """One screen of text; SCANs only embq's own queue, stats and worker keys, never the vectors."""
    probe("cache", settings.cache, settings.origin("cache"))  # nothing listens: say so now, not after retries
    if settings.broker != settings.cache:
        probe("broker", settings.broker, settings.origin("broker"))
    broker = connect(settings.broker)
    with backend_errors("cache", settings.cache, settings.origin("cache")):
        cache = connect_cache(settings.cache)
    with backend_errors("broker", settings.broker, settings.origin("broker")):
        queues, oldest = lanes_of(broker)
    with backend_errors("cache", settings.cache, settings.origin("cache")):
        stats, workers = _hashes(cache, keys.STATS, keys.WORKER)
        info, memory = cache_info(cache)
        size = cast(int, cache.dbsize())
    online: dict[str, int] = {}
    for worker in workers.values():
        label = served(worker)
        online[label] = online.get(label, 0) + 1
    lines = [
        f"{'model':<44} {'queries':>8} {'oldest':>7} {'bulk':>6} {'workers':>8} {'tasks':>9} {'texts':>11} "
        f"{'bulk texts':>11} {'failed':>7} {'dropped':>8} {'hit rate':>9}"
    ]
    unserved = []
    for model in sorted(set(queues) | set(stats) | set(online)):
        s = stats.get(model, {})
        depth = queues.get(model, dict.fromkeys(keys.LANES, 0))
        age = f"{oldest[model]:.1f}s" if model in oldest else "-"
        serving = str(online.get(model, 0))
        if not online.get(model) and any(depth.values()):
            serving = "0 (!)"
            unserved.append(model)
        lines.append(
            f"{model:<44} {depth[keys.INTERACTIVE]:>8} {age:>7} {depth[keys.BULK]:>6} {serving:>8} "
            f"{s.get('tasks', '0'):>9} {s.get('texts', '0'):>11} {s.get('texts_bulk', '0'):>11} "
            f"{s.get('failed', '0'):>7} {s.get('abandoned', '0'):>8} {hit_rate(s):>9}"
        )
    lines.append(
        "  queries/bulk: tasks queued per lane (queries go first); oldest: the oldest queued query's age; "
        "dropped: texts skipped because nobody waited for them any more"
    )
    for model in unserved:
        lines.append(f"  (!) {model}: tasks queued and no worker online")
    for model in sorted(stats):
        l1_hits = int(stats[model].get("l1_hits", 0))
        if l1_hits:
            hits = l1_hits + int(stats[model].get("hits", 0))
            lines.append(
                f"  {model}: {l1_hits:,} of {hits:,} hits answered from producers' own memory (L1), "
                "without a Redis command"
            )
    lines += ["", f"workers online: {len(workers)}"]
    now = time.time()
    for name, w in sorted(workers.items()):
        up = now - float(w.get("started", now))
        port = w.get("metrics_port", "0")
        lines.append(
            f"  {name:<32} {served(w):<40} {w.get('engine', '?'):<22} "
            f"{'ready' if w.get('ready') == '1' else 'not ready':<9} {w.get('stored', '0'):>10} texts  up {up:,.0f}s  "
            + (f"metrics :{port}" if port not in ("", "0") else "no metrics")
        )
        if w.get("passes"):  # the engine's own word on its passes: packed, or padded and why
            lines.append(f"    {w['passes']}")
        if "texts_per_s" in w:  # over its last heartbeat interval
            padding = f", padded/real tokens {w['padding']}" if w.get("padding") else ""
            waiting = int(w.get("waiting") or 0)
            lines.append(
                f"    now: {float(w['texts_per_s']):,.1f} texts/s, {float(w.get('tokens_per_s', 0)):,.0f} tokens/s, "
                f"engine busy {float(w.get('busy', 0)):.0%}{padding}"
                + (f", {waiting:,} texts waiting for a pass" if waiting else "")
            )
        if w.get("pass_budget"):
            lines.append(f"    passes of at most {w.get('pass_tokens', '?')} tokens: {w['pass_budget']}")
    keyspace = {"hits": info.get("keyspace_hits", 0), "misses": info.get("keyspace_misses", 0)}
    lines += [
        "",
        f"cache: {size:,} keys (vectors, claims, embq's own), {memory.get('used_memory_human', '?')} used, "
        f"policy {memory.get('maxmemory_policy', '?')}, Redis keyspace hit rate {hit_rate(keyspace)} "
        "(every key lookup of this Redis, not only vectors)",
        "",
    ]
    broker.close()
    cache.close()
    return "\n".join(lines)
