"""Settings both sides share, read from the environment once, at the edge.

Every knob is here with its default and how to tune it, so a user can read the
whole configuration in one place. Library code receives a ``Settings`` object
and never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from embq.producer import keys, sentinel
from embq.producer.errors import ConfigurationError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Workers refuse tasks of more texts (``embq.producer.contract.MAX_TASK_TEXTS``).
TASK_TEXTS_LIMIT = 4096

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What producers and workers must agree on."""

    #: One Redis for broker and cache; ``broker_url``/``cache_url`` override it.
    redis_url: str = DEFAULT_REDIS_URL
    #: Broker Redis. In production: ``noeviction``, persistence on.
    broker_url: str | None = None
    #: Cache Redis. In production: an LRU policy with a memory cap.
    cache_url: str | None = None
    #: Model id; it names the queue and enters every cache key.
    model: str = DEFAULT_MODEL
    #: Seconds a vector stays cached. Longer saves GPU time, costs Redis memory.
    cache_ttl: int = 30 * 24 * 3600
    #: Enters every cache key: change it to invalidate the whole cache at once.
    cache_namespace: str = keys.DEFAULT_NAMESPACE
    #: Seconds before an unacknowledged batch of a dead worker is redelivered.
    #: Must exceed the longest batch a worker can take, or live batches are
    #: delivered twice.
    visibility_timeout: int = 3600
    #: Seconds a producer's claims outlive it: each producer process renews one
    #: liveness key every lease / 4; if it dies, others take its texts over after
    #: at most this long. Shorter means faster takeover, at one Redis command per tick.
    lease_seconds: float = 30.0
    #: Largest accepted text, in UTF-8 bytes. Far above any model context;
    #: it only stops accidents (a whole file passed as one text).
    max_text_bytes: int = 1 << 20
    #: Producer-side task size: at most this many texts ...
    task_max_texts: int = 1024
    #: ... and at most this many characters per task. Each task costs a worker
    #: a few Celery round trips and events, so larger tasks cost less per text;
    #: how tasks spread over workers depends on their concurrency (each holds up
    #: to EMBQ_CONCURRENCY tasks), not on the task size.
    task_max_chars: int = 256 * 1024
    #: Texts one client resolves at once (claimed, queued, embedded, not yet
    #: returned). Larger calls are admitted window by window, so memory holds the
    #: result plus this window. To keep a fleet busy from one producer, make it
    #: exceed workers x EMBQ_CONCURRENCY x EMBQ_TASK_MAX_TEXTS; each text in flight
    #: costs the producer a few hundred bytes.
    inflight_texts: int = 65536
    #: Milliseconds a small call waits for others from the same process while
    #: texts are already in flight, so that concurrent callers share one round
    #: trip and one task. A lone caller never waits; 0 turns it off.
    coalesce_ms: float = dataclasses.field(default=2.0, metadata={"zero_means": "no coalescing"})
    #: ``embed`` calls of at most this many texts go in the interactive lane, ahead of bulk work
    #: (larger calls, ``embed_iter``, ``embq embed``); a call's ``priority`` overrides it.
    interactive_max_texts: int = 128
    #: Engine seconds a bulk task should take on the model's slowest worker: tasks shrink to what
    #: its workers embed in that time (they publish their rate), so that none runs for a minute.
    task_seconds: float = 2.0
    #: Seconds a call for a model no worker has ever served (no signature, no worker online, not
    #: even one loading) waits for one to appear before it fails; 0 waits as long as it takes.
    unknown_model_grace: float = dataclasses.field(default=10.0, metadata={"zero_means": "wait for ever"})
    #: Seconds without progress (none of ours answered, no worker of the model embedding) before a
    #: producer says so in its log.
    stall_warning_seconds: float = 60.0
    #: Where each setting was given, for messages: ``EMBQ_REDIS_URL``, ``--redis-url``, ``the redis_url
    #: argument``... A setting absent from it was given in code, or is the default (``origin``).
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("redis_url", "broker_url", "cache_url"):
            url = getattr(self, name)
            if url:
                check_redis_url(name, url, self.origin(name))
        for name in ("model", "cache_namespace"):
            value = getattr(self, name)
            if not value or keys.QUEUE_NAMESPACE_SEPARATOR in value:
                raise ConfigurationError(
                    f"{name} ({ENV_NAMES[name]}) must be a non-empty name without "
                    f"{keys.QUEUE_NAMESPACE_SEPARATOR!r} (it separates the two in queue names), got {value!r}"
                )
        if self.task_max_texts > TASK_TEXTS_LIMIT:
            raise ConfigurationError(
                f"EMBQ_TASK_MAX_TEXTS={self.task_max_texts} exceeds {TASK_TEXTS_LIMIT}, the most a worker accepts"
            )

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def cache(self) -> str:
        return self.cache_url or self.redis_url

    def origin(self, name: str) -> str:
        """Where setting ``name`` came from, as its user set it: ``EMBQ_CACHE_URL``, ``--redis-url``, ``the
        redis_url argument``; for the broker's or the cache's URL (``broker``, ``cache``), the one in use."""
        if name in ("broker", "cache"):
            name = f"{name}_url" if getattr(self, f"{name}_url") else "redis_url"
        found = self.origins.get(name)
        if found:
            return found
        default = next(f.default for f in fields(self) if f.name == name)
        if getattr(self, name) == default:
            return f"the default; set {ENV_NAMES[name]}" + (" or --redis-url" if name == "redis_url" else "")
        return name

    @property
    def queue(self) -> str:
        """The interactive queue of this model and cache namespace (``keys.queue_name``)."""
        return keys.queue_name(self.model, self.cache_namespace)

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue of this model and namespace, the interactive one first (``keys.LANES``)."""
        return tuple(keys.queue_name(self.model, self.cache_namespace, lane) for lane in keys.LANES)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, origins: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Read ``EMBQ_*`` variables; explicit ``overrides`` win over the environment. ``origins`` says where
        overrides came from (``{"redis_url": "--redis-url"}``), for messages."""
        env = os.environ if environ is None else environ
        values = read_env(cls, env, ENV_NAMES)
        given = {k: v for k, v in overrides.items() if v is not None}
        found = {name: ENV_NAMES[name] for name in values if name in ENV_NAMES}
        found.update({name: (origins or {}).get(name, "") for name in given})
        values.update(given)
        return cls(**values, origins={k: v for k, v in found.items() if v})

    def with_overrides(self, origin: str = "", **overrides: Any) -> Settings:
        """These settings with ``overrides`` (None: unchanged), which came from ``origin`` (for messages)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        origins = {k: v for k, v in self.origins.items() if k not in given}
        if origin:
            origins.update(dict.fromkeys(given, origin))
        return replace(self, **given, origins=origins)

    @classmethod
    def for_client(
        cls,
        redis_url: str | None,
        *,
        model: str | None,
        broker_url: str | None,
        cache_url: str | None,
        settings: Settings | None,
    ) -> Settings:
        """A client's settings: ``redis_url`` replaces broker and cache of ``settings`` (or the
        environment) unless ``broker_url``/``cache_url`` name their own."""
        base = settings or cls.from_env()
        if redis_url is not None:
            base = base.with_overrides("the redis_url argument", redis_url=redis_url, broker_url="", cache_url="")
        base = base.with_overrides("the broker_url argument", broker_url=broker_url)
        return base.with_overrides("the cache_url argument", model=model, cache_url=cache_url)


ENV_NAMES: dict[str, str] = {
    "redis_url": "EMBQ_REDIS_URL",
    "broker_url": "EMBQ_BROKER_URL",
    "cache_url": "EMBQ_CACHE_URL",
    "model": "EMBQ_MODEL",
    "cache_ttl": "EMBQ_CACHE_TTL",
    "cache_namespace": "EMBQ_CACHE_NAMESPACE",
    "visibility_timeout": "EMBQ_VISIBILITY_TIMEOUT",
    "lease_seconds": "EMBQ_LEASE_SECONDS",
    "max_text_bytes": "EMBQ_MAX_TEXT_BYTES",
    "task_max_texts": "EMBQ_TASK_MAX_TEXTS",
    "task_max_chars": "EMBQ_TASK_MAX_CHARS",
    "inflight_texts": "EMBQ_INFLIGHT_TEXTS",
    "coalesce_ms": "EMBQ_COALESCE_MS",
    "interactive_max_texts": "EMBQ_INTERACTIVE_MAX_TEXTS",
    "task_seconds": "EMBQ_TASK_SECONDS",
    "unknown_model_grace": "EMBQ_UNKNOWN_MODEL_GRACE",
    "stall_warning_seconds": "EMBQ_STALL_WARNING_SECONDS",
}


def flag_urls(
    redis_url: str | None, broker_url: str | None, cache_url: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Redis URLs given as flags (``--redis-url``...), as overrides of ``Settings.from_env`` and their origins:
    ``--redis-url`` is both broker and cache unless ``--broker-url`` or ``--cache-url`` name their own, over
    ``EMBQ_BROKER_URL`` and ``EMBQ_CACHE_URL`` too (as the ``redis_url`` argument of a client)."""
    given = {"redis_url": redis_url, "broker_url": broker_url, "cache_url": cache_url}
    overrides = {name: url for name, url in given.items() if url}
    if redis_url:
        overrides = {"broker_url": "", "cache_url": "", **overrides}
    return overrides, {name: "--" + name.replace("_", "-") for name, url in overrides.items() if url}


#: The forms a Redis URL may take, for error messages.
URL_FORMS = "redis://[[user]:password@]host[:port][/db], rediss://... for TLS, or unix:///path/to/redis.sock[?db=N]"
#: What a broker may be besides.
SENTINEL_FORM = (
    "sentinel://[[user]:password@]host:port[/db][;sentinel://host:port...]?master_name=NAME[&sentinel_password=P]"
)


def check_redis_url(name: str, url: str, origin: str = "") -> None:
    """Raise ``ConfigurationError`` naming where ``url`` came from (``origin``, else setting ``name``) unless it
    is a Redis URL redis-py and kombu both take.

    Checked here, where settings are made, so that a scheme-less ``localhost:6379``
    fails with the expected form rather than deep inside redis-py or kombu."""
    setting = f"{name} ({origin})" if origin and origin != name else name
    shown = _without_password(url)
    if sentinel.is_sentinel(url):
        if name != "broker_url":
            raise ConfigurationError(f"{setting}={shown!r}: only the broker may be behind Sentinel ({SENTINEL_FORM})")
        try:
            sentinel.parse(url)
        except ValueError as e:
            raise ConfigurationError(f"{setting}={shown!r} is not a Sentinel URL: {e}; expected {SENTINEL_FORM}") from e
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing the port raises for a non-number)
    except ValueError as e:
        raise ConfigurationError(f"{setting}={shown!r} is not a Redis URL ({e}); expected {URL_FORMS}") from e
    if parts.scheme not in ("redis", "rediss", "unix"):
        if "://" in url:  # a scheme, of something else: an HTTP gateway's URL, say
            sentinel_too = " (sentinel:// for a broker behind Sentinel)" if name == "broker_url" else ""
            raise ConfigurationError(
                f"{setting}={shown!r} is not a Redis URL: its scheme {parts.scheme + '://'!r} is not one of Redis's, "
                f"redis://, rediss:// (TLS) or unix://{sentinel_too}; expected {URL_FORMS}"
            )
        raise ConfigurationError(f"{setting}={shown!r} is not a Redis URL: it needs a scheme; expected {URL_FORMS}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigurationError(f"{setting}={shown!r} names no socket path; expected {URL_FORMS}")
        db = parse_qs(parts.query).get("db", ["0"])[-1]
    else:
        if not parts.hostname:
            raise ConfigurationError(f"{setting}={shown!r} names no host; expected {URL_FORMS}")
        db = parts.path.lstrip("/") or parse_qs(parts.query).get("db", ["0"])[-1]
    if not db.isdigit():
        raise ConfigurationError(f"{setting}={shown!r}: database {db!r} is not a number; expected {URL_FORMS}")


#: ``[scheme://]user:password@`` at the start of a URL, with or without its scheme.
_CREDENTIALS = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?[^/@:]*):[^/@]*@")


def _without_password(url: str) -> str:
    """``url`` with its password masked, even when the URL is malformed (it is shown in the error); each
    part of a ``sentinel://`` URL's, and the sentinels' own."""
    return ";".join(_CREDENTIALS.sub(r"\1:***@", sentinel.hide_password(part)) for part in url.split(";"))


def read_env(cls: type, env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, Any]:
    """Parse the variables of ``names`` into the types of ``cls``'s fields.

    Numbers must be positive, or at least 0 for fields whose metadata says
    ``zero_means`` (what 0 turns off)."""
    parsers: dict[str, Callable[[str], Any]] = {"int": _positive(int), "float": _positive(float), "bool": _flag}
    values: dict[str, Any] = {}
    for field in fields(cls):
        name = names.get(field.name)
        raw = env.get(name, "").strip() if name else ""
        if not raw:
            continue
        type_name = str(field.type).split("|")[0].strip()
        parse = parsers.get(type_name, str)
        if "zero_means" in field.metadata and type_name in ("int", "float"):
            parse = _non_negative(int if type_name == "int" else float)
        try:
            values[field.name] = parse(raw)
        except ValueError as e:
            raise ConfigurationError(f"{name}={raw!r}: {e}") from e
    return values


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if not value > 0:  # type: ignore[operator]
            raise ValueError("must be a positive number")
        return value

    return parse


def _non_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if not value >= 0:  # type: ignore[operator]
            raise ValueError("must be 0 or more")
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")
