"""embq: a Redis-backed job queue that turns text into embedding vectors.

The one import root of the distribution. ``embq.producer`` is the light client
library and the contract the workers share (no torch); ``embq.worker`` hosts the
engines. The public client names are re-exported here::

    from embq import EmbeddingClient
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Installed, producer/ and worker/ lie inside this package. In a source checkout they lie beside it
# (the repository keeps the design's layout), so a checkout on sys.path imports as installed.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "producer").is_dir() and (_checkout / "producer" / "__init__.py").is_file():
    __path__.append(str(_checkout))

from embq.producer import (  # noqa: E402  (after the checkout path above)
    AsyncEmbeddingClient,
    BackendUnavailableError,
    ConfigurationError,
    EmbeddingClient,
    EmbedStream,
    EmbqError,
    EmbqTimeoutError,
    EngineError,
    InvalidInputError,
    ItemFailedError,
    ModelNotServedError,
    Settings,
)

try:
    __version__ = version("embq")
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"

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
    "__version__",
]
