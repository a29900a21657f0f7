"""``python -m bench.direct``: one embq worker against the same model called directly, in one run.

The baseline is what a user does instead, at its best: ``SentenceTransformer.encode``
of all the texts at once (it sorts them all by length), at each batch size of
``BATCH_SIZES``; the best is the reference. embq embeds the same texts through a
real Redis and one worker with its defaults, in one ``EmbeddingClient.embed`` call.
Printed: texts/s and tokens/s of each, the ratio to the best direct run, the
smallest cosine between the two sets of vectors, and the worker's own count of
padded against real tokens in its passes (``embq_pass_*`` metrics).

On this project's CPU machine: ``python -m bench.direct`` (MiniLM, 1,500 texts of
4 to 200 words). ``bench.gpu`` runs the same comparison on Qwen3-Embedding shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench import stack
from bench.texts import MINILM, make_texts
from embq.producer import EmbeddingClient, Settings
from embq.worker.local import LocalRedis

log = logging.getLogger("bench.direct")

#: Batch sizes the model called directly is timed at (the best one is its baseline).
BATCH_SIZES = (8, 16, 32, 64, 128, 256)


@dataclass
class Comparison:
    texts: int
    tokens: int
    #: Texts/s of the model called directly, by batch size.
    direct: dict[int, float] = field(default_factory=dict)
    embq: float = 0.0
    #: Smallest cosine between embq's vectors and the direct ones.
    min_cosine: float = 0.0
    #: Padded over real tokens in the worker's passes.
    padding: float = 0.0
    #: Share of the embq call's time with a pass in the engine.
    busy: float = 0.0
    #: Device utilisation sampled during each phase, where a sampler was given.
    utilisation: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> tuple[int, float]:
        return max(self.direct.items(), key=lambda item: item[1])

    @property
    def ratio(self) -> float:
        return self.embq / self.best[1]

    def lines(self) -> list[str]:
        per_token = self.tokens / self.texts
        out = [f"{self.texts:,} texts, {self.tokens:,} tokens ({per_token:.0f} per text)"]
        for size, rate in sorted(self.direct.items()):
            out.append(
                f"  encode(all texts, batch_size={size:<3}) {rate:9,.1f} texts/s {rate * per_token:11,.0f} tokens/s"
                + (f"  device busy {self.utilisation[str(size)]:.0f}%" if str(size) in self.utilisation else "")
            )
        out.append(
            f"  embq, 1 worker, defaults          {self.embq:9,.1f} texts/s {self.embq * per_token:11,.0f} tokens/s"
            f"  engine busy {self.busy:.0%}"
            + (f", device busy {self.utilisation['embq']:.0f}%" if "embq" in self.utilisation else "")
        )
        size, _ = self.best
        out.append(
            f"  embq / encode at its best batch size ({size}): {self.ratio:.2f}; padded / real tokens in embq's "
            f"passes: {self.padding:.3f}; smallest cosine: {self.min_cosine:.5f}"
        )
        return out


def compare(
    model: str,
    texts: list[str],
    *,
    device: str = "cpu",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    worker_env: dict[str, str] | None = None,
    sampler: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Comparison:
    """The comparison, on a private Redis and one worker of ``model`` on ``device``."""
    from sentence_transformers import SentenceTransformer

    from embq.worker.engines.sentence_transformers import resolve_model_path

    path = resolve_model_path(model)
    direct = SentenceTransformer(path, device=device)
    tokens = sum(
        len(ids) for ids in direct.tokenizer(texts, truncation=True, max_length=direct.max_seq_length)["input_ids"]
    )
    result = Comparison(len(texts), tokens)
    direct.encode(texts[:256], batch_size=64)  # warm-up
    reference: np.ndarray | None = None
    for size in batch_sizes:
        with sampler() if sampler else nullcontext() as samples:
            started = time.perf_counter()
            vectors = direct.encode(texts, batch_size=size, normalize_embeddings=True, convert_to_numpy=True)
            result.direct[size] = len(texts) / (time.perf_counter() - started)
        if getattr(samples, "mean", None) is not None:
            result.utilisation[str(size)] = float(samples.mean)  # type: ignore[union-attr]
        reference = vectors if reference is None else reference
        log.info("direct, batch %d: %.1f texts/s", size, result.direct[size])
    del direct
    env = {"EMBQ_DEVICE": device, **(worker_env or {})}
    with LocalRedis() as server, stack.workers(server.url, "sentence-transformers", 1, model=path, **env) as (worker,):
        client = EmbeddingClient(settings=Settings(redis_url=server.url, model=path))
        client.embed([f"warm-up {i} " + text for i, text in enumerate(texts[:256])], truncate=True)
        before = worker.metrics()
        with sampler() if sampler else nullcontext() as samples:
            started = time.perf_counter()
            vectors = client.embed(texts, truncate=True)
            seconds = time.perf_counter() - started
        after = worker.metrics()
        client.close()
    if getattr(samples, "mean", None) is not None:
        result.utilisation["embq"] = float(samples.mean)  # type: ignore[union-attr]
    result.embq = len(texts) / seconds

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    result.padding = grew("embq_pass_padded_tokens_total") / max(1.0, grew("embq_pass_tokens_total"))
    result.busy = grew("embq_engine_busy_seconds_total") / seconds
    assert reference is not None
    result.min_cosine = float((vectors * reference).sum(axis=1).min())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.direct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=1, help="repeat on new texts; each run is printed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for run in range(args.runs):
        texts = make_texts(args.texts, seed=70_000 + run, min_words=args.min_words, max_words=args.max_words)
        comparison = compare(args.model, texts, device=args.device)
        print("\n".join(comparison.lines()), flush=True)
        results.append({**asdict(comparison), "ratio": comparison.ratio})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
