"""LangChain's ``Embeddings`` on embq's cache and workers: ``EmbqEmbeddings``.

Needs the extra ``embq[langchain]`` (``langchain-core``)::

    from embq.producer.langchain import EmbqEmbeddings

    embeddings = EmbqEmbeddings(model="Qwen/Qwen3-Embedding-4B", redis_url="redis://localhost:6379/0",
                                query_instruction="Given a web search query, retrieve relevant passages")
    vectors = embeddings.embed_documents(["first passage", "second passage"])
    query = embeddings.embed_query("what is embq?")
"""

from __future__ import annotations

import asyncio

try:
    from langchain_core.embeddings import Embeddings
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"embq.producer.langchain needs langchain-core: pip install 'embq[langchain]' ({e})") from e

from embq.producer.aio import AsyncEmbeddingClient
from embq.producer.client import EmbeddingClient
from embq.producer.keys import INTERACTIVE

__all__ = ["EmbqEmbeddings"]


class EmbqEmbeddings(Embeddings):
    """Documents and queries embedded through embq; vectors come back as lists of Python floats.

    ``model`` and ``redis_url`` default to ``EMBQ_MODEL`` and ``EMBQ_REDIS_URL``
    (``EMBQ_BROKER_URL``/``EMBQ_CACHE_URL`` apply too). ``dim`` serves a
    Matryoshka prefix, re-normalised. ``query_instruction`` is given to queries
    only (``embed_query``), as instruction-tuned models such as Qwen3-Embedding
    expect; documents are embedded without one. ``timeout`` (seconds) bounds
    each call's wait for workers; ``embq``'s errors (``EmbqTimeoutError``,
    ``ItemFailedError``, ``ModelNotServedError`` for a model no worker serves, ...)
    reach the caller unchanged. Queries go in the interactive lane, ahead of bulk
    work; documents by their number (``EMBQ_INTERACTIVE_MAX_TEXTS``).

    Safe to share between threads and event loops. Nothing connects before the
    first call.
    """

    def __init__(
        self,
        model: str | None = None,
        redis_url: str | None = None,
        *,
        dim: int | None = None,
        query_instruction: str = "",
        timeout: float | None = None,
        truncate: bool = False,
    ) -> None:
        self._client = EmbeddingClient(redis_url, model=model)
        self.model = self._client.model
        self.redis_url = redis_url
        self.dim = dim
        self.query_instruction = query_instruction
        self.timeout = timeout
        #: Cut texts over the model's context instead of failing them (``embed``'s ``truncate``).
        self.truncate = truncate
        # An asyncio connection belongs to the loop that opened it: one async client per running loop,
        # dropped once its loop is closed (a client refers to its loop, so weak keys would never go).
        self._async: dict[asyncio.AbstractEventLoop, AsyncEmbeddingClient] = {}

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._client.embed(texts, dim=self.dim, timeout=self.timeout, truncate=self.truncate).tolist()  # type: ignore[no-any-return]

    def embed_query(self, text: str) -> list[float]:
        vectors = self._client.embed(
            [text],
            dim=self.dim,
            instruction=self.query_instruction,
            timeout=self.timeout,
            truncate=self.truncate,
            priority=INTERACTIVE,
        )
        return vectors[0].tolist()  # type: ignore[no-any-return]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors = await self._async_client().embed(texts, dim=self.dim, timeout=self.timeout, truncate=self.truncate)
        return vectors.tolist()  # type: ignore[no-any-return]

    async def aembed_query(self, text: str) -> list[float]:
        client = self._async_client()
        vectors = await client.embed(
            [text],
            dim=self.dim,
            instruction=self.query_instruction,
            timeout=self.timeout,
            truncate=self.truncate,
            priority=INTERACTIVE,
        )
        return vectors[0].tolist()  # type: ignore[no-any-return]

    def _async_client(self) -> AsyncEmbeddingClient:
        loop = asyncio.get_running_loop()
        for other in list(self._async):  # a snapshot: other threads may add their loops meanwhile
            if other.is_closed():
                self._async.pop(other, None)
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = AsyncEmbeddingClient(settings=self._client.settings)
        return client

    def close(self) -> None:
        """Release the connections of synchronous calls."""
        self._client.close()

    async def aclose(self) -> None:
        """Release the connections of asynchronous calls made on the running loop."""
        client = self._async.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"EmbqEmbeddings(model={self.model!r}, dim={self.dim!r}, query_instruction={self.query_instruction!r})"
