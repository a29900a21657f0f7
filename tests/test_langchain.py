"""``embq.producer.langchain.EmbqEmbeddings`` under LangChain's own standard suites, on a real Redis and worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from embq.producer import EmbeddingClient, EmbqTimeoutError
from embq.producer.langchain import EmbqEmbeddings
from embq.producer.settings import DEFAULT_MODEL
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalRedis, LocalWorker
from tests.conftest import HASH_MODEL

#: Nothing listens there: the unit suite must construct the class without touching Redis.
NOWHERE = "redis://127.0.0.1:9/0"


class TestEmbqEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[EmbqEmbeddings]:
        return EmbqEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": HASH_MODEL, "redis_url": NOWHERE}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"EMBQ_MODEL": "hash/from-env", "EMBQ_REDIS_URL": NOWHERE}, {}, {"model": "hash/from-env"}


class TestEmbqEmbeddingsHash(EmbeddingsIntegrationTests):
    """The standard integration suite against the hash engine."""

    @pytest.fixture(autouse=True)
    def _embq(self, redis_url: str, hash_worker: LocalWorker) -> None:
        self.redis_url = redis_url

    @property
    def embeddings_class(self) -> type[EmbqEmbeddings]:
        return EmbqEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": HASH_MODEL, "redis_url": self.redis_url, "timeout": 60}


@pytest.fixture(scope="class")
def minilm_worker(redis_server: LocalRedis) -> Iterator[LocalWorker]:
    with LocalWorker(redis_server.url, engine="sentence-transformers", model=DEFAULT_MODEL) as worker:
        yield worker


@pytest.mark.model
class TestEmbqEmbeddingsMiniLM(EmbeddingsIntegrationTests):
    """The standard integration suite against the real MiniLM model."""

    @pytest.fixture(autouse=True)
    def _embq(self, redis_url: str, minilm_worker: LocalWorker) -> None:
        self.redis_url = redis_url

    @property
    def embeddings_class(self) -> type[EmbqEmbeddings]:
        return EmbqEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": DEFAULT_MODEL, "redis_url": self.redis_url, "timeout": 120}


@pytest.mark.model
def test_minilm_vectors_match_the_client_and_rank_meaning(
    redis_url: str, minilm_worker: LocalWorker, make_client: Callable[..., EmbeddingClient]
) -> None:
    embeddings = EmbqEmbeddings(DEFAULT_MODEL, redis_url, timeout=120)
    docs = ["Redis is an in-memory data store.", "A cat sleeps on the warm windowsill."]
    vectors = np.array(embeddings.embed_documents(docs), dtype=np.float32)
    np.testing.assert_array_equal(vectors, make_client(DEFAULT_MODEL).embed(docs))
    query = np.array(embeddings.embed_query("Which database keeps data in memory?"))
    assert int(np.argmax(vectors @ query)) == 0
    embeddings.close()


def test_documents_and_queries_equal_the_clients_vectors(
    redis_url: str, hash_worker: LocalWorker, make_client: Callable[..., EmbeddingClient]
) -> None:
    embeddings = EmbqEmbeddings(HASH_MODEL, redis_url, dim=64, query_instruction="query: ", timeout=60)
    docs = ["alpha", "beta", "alpha"]
    got = embeddings.embed_documents(docs)
    assert all(type(x) is float for row in got for x in row)
    np.testing.assert_array_equal(np.array(got, dtype=np.float32), make_client().embed(docs, dim=64))
    query = embeddings.embed_query("alpha")
    np.testing.assert_array_equal(
        np.array(query, dtype=np.float32), make_client().embed(["alpha"], dim=64, instruction="query: ")[0]
    )
    full = hash_vector("query: alpha", 384)  # the hash engine prefixes the instruction
    np.testing.assert_allclose(query, full[:64] / np.linalg.norm(full[:64]), rtol=1e-6)
    assert embeddings.embed_documents([]) == []
    embeddings.close()


async def test_async_methods_equal_the_sync_ones(redis_url: str, hash_worker: LocalWorker) -> None:
    embeddings = EmbqEmbeddings(HASH_MODEL, redis_url, query_instruction="query: ", timeout=60)
    docs = [f"async document {i}" for i in range(20)]
    assert await embeddings.aembed_documents(docs) == embeddings.embed_documents(docs)
    assert await embeddings.aembed_query("q") == embeddings.embed_query("q")
    await embeddings.aclose()
    embeddings.close()


def test_embq_errors_reach_the_caller(redis_url: str) -> None:
    embeddings = EmbqEmbeddings("hash/no-worker", redis_url, timeout=0.5)
    with pytest.raises(EmbqTimeoutError):
        embeddings.embed_documents(["nobody serves this model"])
    embeddings.close()
