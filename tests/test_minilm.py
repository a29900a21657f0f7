"""The real model on the CPU, through the queue, against the model's own output."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, ItemFailedError
from embq.producer.codec import unpack
from embq.producer.keys import DEFAULT_NAMESPACE, text_digest, vector_key
from embq.producer.settings import DEFAULT_MODEL
from embq.worker.engines.sentence_transformers import SentenceTransformersEngine, resolve_model_path
from embq.worker.local import LocalWorker

pytestmark = pytest.mark.model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Redis is an in-memory data structure store.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "A GPU worker drains the queue in large batches.",
    "",
    "  leading and trailing spaces  ",
    "Ünïcödé text, 中文, العربية, emoji 🚀",
    "short",
    " ".join(["a long text that will be truncated by the model's context"] * 60),
] + [f"sentence number {i} about topic {i % 7}" for i in range(40)]


@pytest.fixture(scope="module")
def reference() -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu")


def test_queue_vectors_equal_the_models_own(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], reference: object
) -> None:
    # TEXTS has one text over the model's 256 tokens: cut, as the model itself does, only when asked.
    start_worker(DEFAULT_MODEL, engine="sentence-transformers")
    client = make_client(model=DEFAULT_MODEL)
    out = client.embed(TEXTS, truncate=True, timeout=300)
    want = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)  # type: ignore[attr-defined]
    assert out.shape == (len(TEXTS), 384)
    cosine = (out * want).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()

    query = client.embed(TEXTS[:3], instruction="query: ", timeout=300)
    want_query = reference.encode(["query: " + t for t in TEXTS[:3]], normalize_embeddings=True)  # type: ignore[attr-defined]
    assert (query * want_query).sum(axis=1).min() >= 0.999

    small = client.embed(TEXTS, dim=128, truncate=True, timeout=300)
    head = want[:, :128] / np.linalg.norm(want[:, :128], axis=1, keepdims=True)
    assert (small * head).sum(axis=1).min() >= 0.999


#: About 400 tokens (one per word), and 1 MiB, the largest text a producer sends.
LONG = " ".join(f"word{i % 10}" for i in range(400))
HUGE = "x " * (1 << 19)
FITS = "a text well inside the model's context, " * 10


def test_a_text_over_the_context_fails_alone_with_its_token_count(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], reference: object
) -> None:
    start_worker(DEFAULT_MODEL, engine="sentence-transformers")
    texts = ["first", LONG, FITS, HUGE, FITS + LONG]
    with pytest.raises(ItemFailedError) as info:
        make_client(model=DEFAULT_MODEL).embed(texts, timeout=300)
    failures = info.value.failures
    assert set(failures) == {1, 3, 4}  # text-plus-more no longer gets the vector of its beginning
    tokenizer = reference.tokenizer  # type: ignore[attr-defined]
    for index in failures:
        count = len(tokenizer(texts[index], verbose=False)["input_ids"])
        assert f"({count} tokens)" in failures[index] and "(256 tokens)" in failures[index], failures[index]
        assert "truncate=True" in failures[index] and "--truncate" in failures[index], failures[index]
    want = reference.encode(["first", FITS], normalize_embeddings=True)  # type: ignore[attr-defined]
    assert (info.value.vectors[[0, 2]] * want).sum(axis=1).min() >= 0.999  # type: ignore[index]


def test_two_tasks_preparing_at_once_each_get_their_own_cut() -> None:
    """One task's thread cuts its texts while another's refuses long ones, on one engine: a fast tokenizer
    keeps its truncation in its backend, so on a shared one each thread's setting leaks into the other's
    call (a text to be cut came back at 257 or all of its tokens, seconds apart on two threads)."""
    engine = SentenceTransformersEngine(DEFAULT_MODEL, device="cpu")
    engine.load()
    limit = engine.max_tokens
    cut_wrong: list[int] = []
    refused_wrong: list[int] = []
    stop = time.monotonic() + 5

    def cutting() -> None:
        while time.monotonic() < stop:
            cut_wrong.extend(t for t in engine.prepare([LONG, FITS], truncate=True).tokens if t > limit)

    def refusing() -> None:
        while time.monotonic() < stop:
            errors = engine.prepare(["x " * 20_000, LONG], truncate=False).errors
            if sorted(errors) != [0, 1] or "(20002 tokens)" not in errors[0]:  # counted whole, specials too
                refused_wrong.append(len(errors))

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(cutting), pool.submit(refusing)]:
            done.result()
    assert cut_wrong == [] and refused_wrong == []


def test_one_worker_serves_calls_that_cut_and_calls_that_do_not_at_once(
    start_worker: Callable[..., LocalWorker],
    make_client: Callable[..., EmbeddingClient],
    reference: object,
    r: redis.Redis,
) -> None:
    """A worker started with no truncation flag: a call with ``truncate=True`` gets its long texts cut as
    ``SentenceTransformer.encode`` cuts them, while a call without it, at the same moment, sees them fail
    alone; the cut vectors live under keys of their own, never under the whole texts' keys. A second
    worker with another default (``EMBQ_TRUNCATE=1``, which no longer changes a worker) joins."""
    start_worker(DEFAULT_MODEL, engine="sentence-transformers")
    texts = ["first", LONG, LONG + " and more words past the cut", FITS, HUGE]
    client = make_client(model=DEFAULT_MODEL)
    with ThreadPoolExecutor(2) as pool:
        cutting = pool.submit(client.embed, texts, truncate=True, timeout=300)
        whole = pool.submit(client.embed, texts, timeout=300)
        out = cutting.result()
        with pytest.raises(ItemFailedError) as info:
            whole.result()
    want = reference.encode(texts, normalize_embeddings=True)  # type: ignore[attr-defined]
    assert (out * want).sum(axis=1).min() >= 0.999
    np.testing.assert_allclose(out[1], out[2], atol=1e-6)  # both cut at 256 tokens
    assert set(info.value.failures) == {1, 2, 4}
    assert all("truncate=True" in reason for reason in info.value.failures.values())
    np.testing.assert_allclose(info.value.vectors[[0, 3]], out[[0, 3]], atol=1e-6)  # type: ignore[index]

    assert r.get(vector_key(text_digest(DEFAULT_MODEL, DEFAULT_NAMESPACE, "", LONG))) is None
    cut = r.get(vector_key(text_digest(DEFAULT_MODEL, DEFAULT_NAMESPACE, "", LONG, truncate=True)))
    np.testing.assert_allclose(unpack(cut), out[1], atol=1e-6)  # type: ignore[arg-type]

    second = start_worker(DEFAULT_MODEL, engine="sentence-transformers", env={"EMBQ_TRUNCATE": "1"})
    assert "no longer changes a worker" in second.log_path.read_text()
    again = make_client(model=DEFAULT_MODEL).embed([LONG + " once more"], truncate=True, timeout=300)
    assert float(again[0] @ out[1]) >= 0.999  # cut at the same place, by whichever worker took it
