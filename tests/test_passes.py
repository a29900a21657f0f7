"""Passes formed by real token counts across every task a worker holds, on the real engine and model code."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.texts import make_texts
from embq.producer import EmbeddingClient
from embq.producer.settings import DEFAULT_MODEL
from embq.worker.engines.sentence_transformers import activation_bytes, pass_budget, resolve_model_path
from embq.worker.local import LocalWorker, free_port
from tests.sglang_cpu.model import build_sentence_transformer

pytestmark = pytest.mark.model


def pass_tokens(port: int) -> tuple[float, float]:
    """(real, padded) tokens of the worker's passes so far, from its /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    return samples["embq_pass_tokens_total"], samples["embq_pass_padded_tokens_total"]


@pytest.mark.parametrize("model", ["minilm", "qwen3-shaped"])
def test_mixed_lengths_cost_little_padding_and_give_the_models_own_vectors(
    model: str,
    start_worker: Callable[..., LocalWorker],
    make_client: Callable[..., EmbeddingClient],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """1,000 texts of 4 to 200 words in one call: the worker's passes hold texts of near-equal token counts
    (padded within 10% of real), and every vector equals ``SentenceTransformer.encode``'s (padded on the
    tokenizer's side: right for MiniLM, left for Qwen3-Embedding, whose pooling reads the last token)."""
    from sentence_transformers import SentenceTransformer

    path = (
        resolve_model_path(DEFAULT_MODEL)
        if model == "minilm"
        else str(build_sentence_transformer(Path(tmp_path_factory.mktemp("qwen3")), "tiny"))
    )
    port = free_port()
    start_worker(path, engine="sentence-transformers", env={"EMBQ_METRICS_PORT": str(port)})
    texts = make_texts(1000, seed=4242, min_words=4, max_words=200)
    before = pass_tokens(port)
    client = make_client(model=path, task_max_texts=256, task_seconds=3600)
    vectors = client.embed(texts, truncate=True, timeout=600)  # 4 tasks
    real, padded = (after - was for after, was in zip(pass_tokens(port), before, strict=True))
    assert real > 0 and padded <= 1.1 * real, (real, padded)
    want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999
    assert np.isfinite(vectors).all()


@pytest.mark.parametrize("model", ["minilm", "qwen3-shaped"])
def test_packed_passes_pad_nothing_and_give_the_padded_paths_vectors(
    model: str,
    start_worker: Callable[..., LocalWorker],
    make_client: Callable[..., EmbeddingClient],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``EMBQ_PACKED_PASSES=1``: each pass is one sequence of its texts' tokens (transformers' packed-sequence
    masks; flex attention on CUDA, a dense mask on this CPU), pooled per text (mean for MiniLM, last token for
    Qwen3-Embedding): not one padded token, and ``SentenceTransformer.encode``'s vectors."""
    from sentence_transformers import SentenceTransformer

    path = (
        resolve_model_path(DEFAULT_MODEL)
        if model == "minilm"
        else str(build_sentence_transformer(Path(tmp_path_factory.mktemp("qwen3")), "tiny"))
    )
    port = free_port()
    env = {"EMBQ_METRICS_PORT": str(port), "EMBQ_PACKED_PASSES": "1"}
    worker = start_worker(path, engine="sentence-transformers", env=env)
    assert "packed passes:" in worker.log_path.read_text() and "packed passes\n" in worker.log_path.read_text()
    texts = make_texts(300, seed=4343, min_words=4, max_words=200)
    before = pass_tokens(port)
    vectors = make_client(model=path, task_max_texts=64).embed(texts, truncate=True, timeout=600)
    real, padded = (after - was for after, was in zip(pass_tokens(port), before, strict=True))
    assert real > 0 and padded == real, (real, padded)
    want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999


def test_gpu_passes_grow_with_the_memory_the_weights_leave() -> None:
    """Qwen3-Embedding shapes in bf16 (hidden, intermediate): on an H200 with the weights loaded, the widest
    passes; on a 24 GB card holding the 4B model, narrower ones; never under the GPU defaults."""
    gib = 2**30
    small, large = activation_bytes(1024, 3072, 2), activation_bytes(2560, 9728, 2)
    assert pass_budget(138 * gib, small) == (131072, 2048)
    assert pass_budget(130 * gib, large) == (131072, 2048)
    assert pass_budget(14 * gib, large) == (32768, 1024)
    assert pass_budget(80 * gib, large) == (65536, 1024)
    assert pass_budget(1 * gib, large) == (32768, 1024)
