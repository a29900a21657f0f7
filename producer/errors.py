"""The exceptions embq raises: one root, a few subclasses a caller can catch by meaning."""

from __future__ import annotations

from collections.abc import Mapping


class EmbqError(Exception):
    """Root of every error embq raises on purpose."""


class ConfigurationError(EmbqError):
    """Raised when a setting is missing, malformed or contradicts another one."""


class InvalidInputError(EmbqError, ValueError, TypeError):
    """Raised before anything is enqueued when some input items cannot be embedded.

    Also a ``ValueError`` and a ``TypeError``, so generic handlers of either catch it.

    ``problems`` maps every offending index to what is wrong with it, so a caller
    can drop exactly those items and resubmit the rest.
    """

    def __init__(self, message: str, problems: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.problems: dict[int, str] = dict(problems or {})

    @property
    def index(self) -> int | None:
        """The first offending index, or None when the problem is not one item."""
        return min(self.problems) if self.problems else None


class BackendUnavailableError(EmbqError):
    """Raised when Redis (broker or cache) cannot be reached or refuses a command."""


class ModelNotServedError(EmbqError, LookupError):
    """Raised when no worker has ever served the model asked for (a mistyped name, most often).

    ``served`` lists the models that workers serve now, for the message and for a caller that
    wants to offer them."""

    def __init__(self, model: str, served: list[str], waited: float) -> None:
        listed = ", ".join(repr(m) for m in served) if served else "none: start a worker"
        super().__init__(
            f"no worker serves model {model!r} nor has served it (none online, no vectors of it), "
            f"after waiting {waited:.0f}s; models served now: {listed}"
        )
        self.model = model
        self.served = served


class EmbqTimeoutError(EmbqError, TimeoutError):
    """Raised when vectors did not arrive within the caller's timeout."""

    def __init__(self, message: str, missing: int, total: int) -> None:
        super().__init__(message)
        self.missing = missing
        self.total = total


class ItemFailedError(EmbqError):
    """Raised when a worker could not embed some items; the other rows are in ``vectors``.

    ``failures`` maps input index to the worker's reason; rows of ``vectors`` at
    those indices are NaN. The good items are cached, so resubmitting only them
    costs nothing.
    """

    def __init__(self, message: str, failures: Mapping[int, str], vectors: object) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures)
        self.vectors = vectors


class EngineError(EmbqError):
    """Raised by a worker engine that cannot load or cannot embed."""
