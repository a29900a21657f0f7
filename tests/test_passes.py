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
from embq.worker.engines.sentence_transformers import (
    SentenceTransformersEngine,
    activation_bytes,
    pass_budget,
    resolve_model_path,
)
from embq.worker.local import LocalWorker, free_port
from tests.sglang_cpu.model import build_sentence_transformer
from tests.test_status import status

pytestmark = pytest.mark.model


def samples(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}


def pass_tokens(port: int) -> tuple[float, float]:
    """(real, padded) tokens of the worker's passes so far, from its /metrics."""
    found = samples(port)
    return found["embq_pass_tokens_total"], found["embq_pass_padded_tokens_total"]


def worker_calls(port: int) -> float:
    """Engine passes of the worker so far, from its /metrics."""
    return samples(port)["embq_engine_batch_texts_count"]


def build_cross_attending_model(directory: Path) -> Path:
    """A tiny random-weight DeBERTa-v2 behind MiniLM's tokenizer, mean pooled and normalised. DeBERTa-v2
    builds its attention mask from ``attention_mask`` alone, not from positions, so in a packed pass its
    texts attend to each other: its packed vectors differ from its padded ones (weights wide enough,
    ``initializer_range``, that attention moves the vectors)."""
    import json

    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    DebertaV2Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    (directory / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (directory / "2_Normalize").mkdir()
    return directory


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
    client = make_client(model=path, task_max_texts=64)
    vectors = client.embed(texts, truncate=True, timeout=600)
    real, padded = (after - was for after, was in zip(pass_tokens(port), before, strict=True))
    assert real > 0 and padded == real, (real, padded)
    model = SentenceTransformer(path, device="cpu")
    want = model.encode(texts, batch_size=32, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999
    # A text alone in its pass (a one-text packed pass takes no packed-sequence mask): the padded path's vector.
    calls = worker_calls(port)
    alone = "a text that comes alone, in a pass of its own"
    [vector] = client.embed([alone], timeout=600)
    assert worker_calls(port) == calls + 1
    assert float(vector @ model.encode([alone], normalize_embeddings=True)[0]) >= 0.999


def test_a_failed_packed_probe_pads_warns_and_shows_in_status(
    start_worker: Callable[..., LocalWorker],
    make_client: Callable[..., EmbeddingClient],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A model whose packed passes give other vectors than its padded path as it normally runs (texts attend
    across each other when packed): the worker pads, says why in a WARNING and in ``embq status``, and its
    vectors are ``SentenceTransformer.encode``'s."""
    from sentence_transformers import SentenceTransformer

    path = str(build_cross_attending_model(tmp_path / "deberta"))
    port = free_port()
    env = {"EMBQ_METRICS_PORT": str(port), "EMBQ_PACKED_PASSES": "1"}
    worker = start_worker(path, engine="sentence-transformers", env=env)
    [warning] = [line for line in worker.log_path.read_text().splitlines() if "packed probe failed" in line]
    assert "WARNING" in warning and "padded passes: packed probe failed: cos " in warning, warning
    shown = status(redis_url)
    assert "padded passes: packed probe failed: cos " in shown, shown
    texts = make_texts(60, seed=4444, min_words=2, max_words=40)
    before = pass_tokens(port)
    vectors = make_client(model=path).embed(texts, timeout=600)
    real, padded = (after - was for after, was in zip(pass_tokens(port), before, strict=True))
    assert padded > real > 0, (real, padded)  # padded passes: texts of several lengths in a pass
    want = SentenceTransformer(path, device="cpu").encode(texts, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999


class FlexOnThisDevice(SentenceTransformersEngine):
    """The engine with the CUDA choice of packed passes, flex attention and a block mask of its own, taken on
    the CPU (run with ``torch.compiler.set_stance("force_eager")``: inductor cannot build flex for a CPU)."""

    def _packs_with_flex(self) -> bool:
        return True


@pytest.mark.parametrize("model", ["minilm", "qwen3-shaped"])
def test_flex_packed_passes_give_the_padded_vectors_of_the_models_own_attention(
    model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The flex-attention path of packed passes (the CUDA one), run eagerly on the CPU: the probe compares
    with padded passes on the model's own sdpa attention, computed before the switch; then passes of one
    text and of several, their length padded up to a flex block, give those vectors (MiniLM attends both ways,
    Qwen3 causally); and the model it falls back to still runs its own attention."""
    import torch

    path = (
        resolve_model_path(DEFAULT_MODEL)
        if model == "minilm"
        else str(build_sentence_transformer(Path(tmp_path_factory.mktemp("qwen3")), "tiny"))
    )
    padded = SentenceTransformersEngine(path, device="cpu")
    padded.load()
    assert padded.passes_note.startswith("padded passes (")
    texts = ["alone", "a text of a few more words than the first one", "long " * 200]
    ids = padded.prepare(texts).inputs
    want = padded.encode_prepared(ids)
    with torch.compiler.set_stance("force_eager"):
        packed = FlexOnThisDevice(path, device="cpu", packed=True)
        packed.load()
        assert not packed.pads
        assert packed.passes_note.startswith("packed passes: flex_attention attention, cos 1.0000"), packed.passes_note
        assert packed.passes_note.endswith("to sdpa padded")
        for rows in ([0], [2], [0, 1, 2]):
            vectors = packed.encode_prepared([ids[row] for row in rows])
            assert (vectors * want[rows]).sum(axis=1).min() >= 0.9999, (rows, vectors @ want.T)


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
