"""A simulated accelerator: what a pass would cost on a GPU, without one.

On a CPU the model is so slow that it hides every cost of the queue around
it; on a GPU it does not, and a worker that feeds its engine poorly (short
passes, padding, idle gaps between task bursts) loses half the device. The
hash engine given a ``DeviceModel`` (``EMBQ_HASH_DEVICE``) makes that visible
on any machine: each pass takes the device time the cost model gives it, on
one in-order timeline shared by the passes in flight (a CUDA stream: a pass
queued behind another starts when that one ends, and its caller gets its
vectors when its own kernels are done), with the GIL released while it "runs".
The host's work (the vectors, the queue) stays real.

The cost of a pass: a fixed overhead (launches, the copies, the pooling) plus
its tokens at the model's rate, each token dearer as its sequence grows
(attention). Padded passes pay their longest text for every text; packed
passes pay each text's own length.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from embq.producer.errors import ConfigurationError


@dataclass(frozen=True)
class DeviceModel:
    """Seconds a pass of texts of given token counts takes on the simulated device."""

    name: str
    #: Tokens per second of a short sequence's forward pass.
    tokens_per_second: float
    #: Seconds every pass pays whatever its size.
    pass_overhead: float
    #: Sequence length at which a token costs twice a short sequence's token (attention's share grows).
    attention_tokens: float
    #: Packed passes (each text its own length) rather than padded ones (the longest for every text).
    packed: bool = False
    #: Most tokens a pass may compute (padding included) before the device runs out of memory; 0: no limit.
    memory_tokens: int = 0

    def pass_seconds(self, tokens: Sequence[int]) -> float:
        if not tokens:
            return 0.0
        if self.packed:
            work = sum(t * (1.0 + t / self.attention_tokens) for t in tokens)
        else:
            longest = max(tokens)
            work = len(tokens) * longest * (1.0 + longest / self.attention_tokens)
        return self.pass_overhead + work / self.tokens_per_second

    def padded_tokens(self, tokens: Sequence[int]) -> int:
        """The tokens the device computes for a pass: padding included unless packed."""
        return sum(tokens) if self.packed else max(tokens, default=0) * len(tokens)

    def check_memory(self, tokens: Sequence[int]) -> None:
        """Raise as CUDA does when a pass needs more memory than the device has."""
        needed = self.padded_tokens(tokens)
        if self.memory_tokens and needed > self.memory_tokens:
            raise OutOfMemoryError(
                f"CUDA out of memory (simulated): a pass of {needed} tokens, room for {self.memory_tokens}"
            )


class OutOfMemoryError(RuntimeError):
    """What the simulated device raises; named as torch's, which the batcher recognises by name."""


#: Qwen3-Embedding-class models on an H200 in bf16 (rates of the first measurements there), and a device
#: infinitely fast, which leaves the host's own cost alone. ``-packed`` after a name packs its passes.
DEVICES: dict[str, DeviceModel] = {
    "h200-0.6b": DeviceModel("h200-0.6b", tokens_per_second=400_000, pass_overhead=0.004, attention_tokens=8192),
    "h200-4b": DeviceModel("h200-4b", tokens_per_second=90_000, pass_overhead=0.008, attention_tokens=8192),
    "instant": DeviceModel("instant", tokens_per_second=float("inf"), pass_overhead=0.0, attention_tokens=8192),
}


def device_model(spec: str) -> DeviceModel:
    """A preset by name (``h200-0.6b``, ``h200-4b``, ``instant``; ``-packed`` appended packs its passes), or
    ``rate=TOKENS_PER_S,overhead=S[,attention=TOKENS][,packed=1][,memory=TOKENS]``."""
    packed = spec.endswith("-packed")
    name = spec.removesuffix("-packed")
    if name in DEVICES:
        preset = DEVICES[name]
        return DeviceModel(spec, preset.tokens_per_second, preset.pass_overhead, preset.attention_tokens, packed)
    try:
        fields = dict(part.split("=", 1) for part in spec.split(","))
        model = DeviceModel(
            spec,
            tokens_per_second=float(fields.pop("rate")),
            pass_overhead=float(fields.pop("overhead", 0.0)),
            attention_tokens=float(fields.pop("attention", 8192)),
            packed=fields.pop("packed", "0") in {"1", "true", "yes"},
            memory_tokens=int(fields.pop("memory", 0)),
        )
        if fields:
            raise ValueError(f"unknown fields {', '.join(sorted(fields))}")
        return model
    except (KeyError, ValueError) as e:
        raise ConfigurationError(
            f"EMBQ_HASH_DEVICE={spec!r} is neither a preset ({', '.join(DEVICES)}, each with an optional "
            f"-packed) nor rate=TOKENS_PER_S,overhead=SECONDS[,attention=TOKENS][,packed=1][,memory=TOKENS] ({e})"
        ) from e


class Timeline:
    """One in-order queue of device work, as a CUDA stream: work submitted while the device is busy starts
    when the work ahead of it ends. Counts the device's busy seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.busy_seconds = 0.0

    def submit(self, seconds: float) -> float:
        """Queue ``seconds`` of device work; returns the monotonic time at which it is done."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            self.busy_seconds += seconds
            return self._free_at

    @staticmethod
    def wait(done_at: float) -> None:
        """Sleep (the GIL released) until the work ending at ``done_at`` is done."""
        left = done_at - time.monotonic()
        if left > 0:
            time.sleep(left)
