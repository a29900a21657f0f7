"""``python -m bench.gpu --simulate 0.6b|4b``: the worker's feed at GPU rates, on any machine.

One hash worker at its defaults, given a simulated device
(``embq.worker.engines.device``: an H200's rates for Qwen3-Embedding-0.6B or
4B, padded or packed passes), drains the texts of 4 producer processes through
a real Redis. Reported, side by side from one run:

- the wall time, and the device's busy share (its device seconds over the wall);
- real over padded tokens in the worker's passes (its own counters, so the mode it really ran);
- the same pipeline with the device made infinitely fast: the host's own cost (producers, Redis,
  the worker's queue work), which no feed can beat;
- the model called directly, ``encode(all_texts, batch_size=256)``, on the same device model
  (a global length sort, padded batches, device time only: no host cost at all);
- embq's speed over that direct call, and over the larger of the two bounds.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import stack
from bench.texts import make_texts
from embq.producer import EmbeddingClient, Settings
from embq.worker.engines import estimate_tokens
from embq.worker.engines.device import DeviceModel, device_model
from embq.worker.local import LocalRedis

#: Texts per shape: seconds of device work each.
TEXTS = {"0.6b": 20_000, "4b": 8_000, "tiny": 600}
PRODUCERS = 4
DIRECT_BATCH = 256


@dataclass
class Run:
    """One pass of the texts through the queue."""

    wall: float
    device_seconds: float
    busy_seconds: float
    real_tokens: float
    padded_tokens: float

    @property
    def device_busy(self) -> float:
        return self.device_seconds / self.wall

    @property
    def real_over_padded(self) -> float:
        return self.real_tokens / max(1.0, self.padded_tokens)


@dataclass
class Simulation:
    device: str
    texts: int
    tokens: int
    embq: Run
    host_only: Run
    #: Device seconds of ``encode(all_texts, batch_size=256)`` on the same device model.
    direct: float

    @property
    def over_direct(self) -> float:
        return self.direct / self.embq.wall

    @property
    def over_bound(self) -> float:
        """embq's wall against the larger of its two bounds: 1.0 is a perfect overlap of host and device."""
        return max(self.direct, self.host_only.wall) / self.embq.wall

    def lines(self) -> list[str]:
        e, h = self.embq, self.host_only
        return [
            f"simulated {self.device}: {self.texts:,} texts, {self.tokens:,} tokens, 1 worker, {PRODUCERS} producers",
            f"  embq                  {e.wall:7.2f} s  device busy {e.device_busy:.2f}"
            f"  real/padded {e.real_over_padded:.2f}",
            f"  device infinitely fast {h.wall:6.2f} s  (the host's own cost)",
            f"  direct encode b{DIRECT_BATCH}      {self.direct:7.2f} s  (device time only)",
            f"  embq / direct {self.over_direct:.2f}; embq / max(host only, direct) {self.over_bound:.2f}",
        ]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "over_direct": self.over_direct, "over_bound": self.over_bound}


def direct_seconds(device: DeviceModel, tokens: list[int], batch_size: int = DIRECT_BATCH) -> float:
    """Device time of ``encode(all_texts, batch_size)``: sorted by length, padded batches."""
    padded = DeviceModel(device.name, device.tokens_per_second, device.pass_overhead, device.attention_tokens)
    ordered = sorted(tokens)
    return sum(padded.pass_seconds(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size))


def _produce(redis_url: str, model: str, texts: list[str], go: Any, ready: Any, out: Any) -> None:
    client = EmbeddingClient(settings=Settings(redis_url=redis_url, model=model))
    client.embed([f"warm-up {time.time_ns()}"])  # connections open, dispatcher started
    ready.put(True)
    go.wait()
    vectors = client.embed(texts)
    out.put((time.monotonic(), len(vectors)))
    client.close()


def run_once(device: str, texts: list[str], model: str, producers: int = PRODUCERS) -> Run:
    """``texts`` split over ``producers`` processes, through one fresh Redis and one hash worker on ``device``."""
    context = multiprocessing.get_context("spawn")
    with (
        LocalRedis() as server,
        stack.workers(server.url, "hash", 1, model=model, EMBQ_HASH_DEVICE=device) as (worker,),
    ):
        go, ready, out = context.Event(), context.Queue(), context.Queue()
        shares = [texts[i::producers] for i in range(producers)]
        processes = [
            context.Process(target=_produce, args=(server.url, model, share, go, ready, out)) for share in shares
        ]
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=120)
        before = worker.metrics()
        started = time.monotonic()
        go.set()
        ends = [out.get(timeout=3600) for _ in processes]
        wall = max(end for end, _ in ends) - started
        after = worker.metrics()
        for process in processes:
            process.join(timeout=30)
    assert sum(n for _, n in ends) == len(texts)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return Run(
        wall,
        grew("embq_device_seconds_total"),
        grew("embq_engine_busy_seconds_total"),
        grew("embq_pass_tokens_total"),
        grew("embq_pass_padded_tokens_total"),
    )


def simulate(shape: str, *, packed: bool = False, count: int | None = None, seed: int = 7) -> Simulation:
    suffix = "-packed" if packed else ""
    name = f"h200-{'0.6b' if shape == 'tiny' else shape}{suffix}"
    texts = make_texts(count or TEXTS[shape], seed=seed)
    tokens = [estimate_tokens(t) for t in texts]
    model = f"hash/simulated-{shape}"
    embq = run_once(name, texts, model)
    host_only = run_once(f"instant{suffix}", texts, model)
    return Simulation(name, len(texts), sum(tokens), embq, host_only, direct_seconds(device_model(name), tokens))


def report(simulations: list[Simulation]) -> str:
    return json.dumps([s.to_json() for s in simulations], indent=1)
