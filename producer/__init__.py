"""embq's client library and the contract its workers share. Light: no torch, no engines."""

from embq.producer.aio import AsyncEmbeddingClient
from embq.producer.client import EmbeddingClient
from embq.producer.errors import (
    BackendUnavailableError,
    ConfigurationError,
    EmbqError,
    EmbqTimeoutError,
    EngineError,
    InvalidInputError,
    ItemFailedError,
    ModelNotServedError,
)
from embq.producer.settings import Settings
from embq.producer.stream import EmbedStream

__all__ = [
    "AsyncEmbeddingClient",
    "BackendUnavailableError",
    "ConfigurationError",
    "EmbedStream",
    "EmbeddingClient",
    "EmbqError",
    "EmbqTimeoutError",
    "EngineError",
    "InvalidInputError",
    "ItemFailedError",
    "ModelNotServedError",
    "Settings",
]
