"""``AsyncEmbeddingClient``: ``EmbeddingClient``'s contract for asyncio services."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from producer.client import EmbeddingClient
from producer.settings import Settings


class AsyncEmbeddingClient:
    """Same arguments, errors and guarantees as ``EmbeddingClient``; ``embed`` is awaitable."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        broker_url: str | None = None,
        cache_url: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._client = EmbeddingClient(
            redis_url, model=model, broker_url=broker_url, cache_url=cache_url, settings=settings
        )
        self.settings = self._client.settings
        self.model = self._client.model

    async def embed(
        self, texts: Any, *, dim: int | None = None, instruction: str = "", timeout: float | None = None
    ) -> np.ndarray:
        """Vectors for ``texts``: float32, shape ``(len(texts), d)``, row i for text i."""
        return await asyncio.to_thread(self._client.embed, texts, dim=dim, instruction=instruction, timeout=timeout)

    async def aclose(self) -> None:
        self._client.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
