"""embq's client library and the contract its workers share. Light: no torch, no engines."""

from producer.client import EmbeddingClient
from producer.errors import (
    BackendUnavailableError,
    ConfigurationError,
    EmbqError,
    EmbqTimeoutError,
    EngineError,
    InvalidInputError,
    ItemFailedError,
)
from producer.settings import Settings

__all__ = [
    "BackendUnavailableError",
    "ConfigurationError",
    "EmbeddingClient",
    "EmbqError",
    "EmbqTimeoutError",
    "EngineError",
    "InvalidInputError",
    "ItemFailedError",
    "Settings",
]
