"""embq's client library and the contract its workers share. Light: no torch, no engines."""

from producer.aio import AsyncEmbeddingClient
from producer.client import EmbeddingClient
from producer.errors import (
    BackendUnavailableError,
    ConfigurationError,
    EmbqError,
    EmbqTimeoutError,
    EngineError,
    InvalidInputError,
    ItemFailedError,
    ModelNotServedError,
)
from producer.settings import Settings
from producer.stream import EmbedStream

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
