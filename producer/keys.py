"""Every Redis key embq touches, built by pure functions. Producers and workers import this module.

=========================  ==========  ===================  =====================  ======================
key                        type        TTL                  written by             read by
=========================  ==========  ===================  =====================  ======================
``embq:v:{digest}``        string      ``cache_ttl``        worker (SET EX GET)    producers (CLAIM)
                           (vector)
``embq:v:{digest}``        string      visibility timeout   the producer that      producers (CLAIM);
                           (claim)                          claims it (CLAIM)      the worker replaces it
``embq:alive:{token}``     string      ``lease_seconds``,   the producer process   producers meeting its
                                       renewed every tick   that owns the token    claims (CLAIM)
``embq:watch:{embq:v:D}``  set         2 x lease, renewed   producers waiting for  worker (after SET GET),
                                                            another's claim        owner (RELEASE)
``embq:reply:{token}``     stream      2 x lease, renewed   its producer creates   its producer (XREAD
                                                            it; workers XADD       BLOCK)
                                                            NOMKSTREAM
``embq:stats:{model}``     hash        7 days, renewed      workers (tasks, texts, ``embq status``, tests
                                                            failed); producers
                                                            (hits, misses)
``embq:attempts:{task_id}`` hash       1 day                workers: starts,       the worker that runs
                                                            deaths, and the rows   the task again (its
                                                            of each pass in the    suspects of an engine
                                                            engine (``in:*``)      death)
``embq:worker:{host:pid}`` hash        3 x heartbeat        the worker, every      ``embq status``,
                                                            10 s                   ``embq serve``
``embq:workers``           sorted set  3 x heartbeat,       every worker at each   ``embq serve`` (which
                                       renewed              beat: name, scored by  workers to read, without
                                                            its expiry time        a SCAN of the keyspace)
``embq:signature:{ns}:{model}`` string ``cache_ttl``,       the first worker of    every worker at start
                                       renewed by every     the model (SET NX):    and at each heartbeat
                                       heartbeat            JSON, see below
``embq.{model}``           list        none (broker key)    producers (Celery):    workers (Celery),
``embq.{model}@{ns}``                                       interactive tasks      first
                                                            (``@{ns}``: another
                                                            cache namespace)
``embq.{model}@{ns}@bulk`` list        none (broker key)    producers: bulk tasks  workers, up to their
                                                                                   bulk share of slots
``unacked``                hash        none (broker key)    workers (kombu: what   kombu; producers look
                                                            they took, not acked)  there for lost tasks
=========================  ==========  ===================  =====================  ======================

``embq:watch:{embq:v:D}``: ``D`` is the digest, and the vector key in braces is
the hash tag, so that a text's watch set shares its slot on a Redis Cluster.

The scripts that read and write these keys, and why one call per batch is
enough to compute each text once, are in ``embq.producer.protocol``.

``digest`` is the hex blake2b-256 of everything that changes a vector: model id,
cache namespace, instruction and the exact text, each length-prefixed so that no
two different tuples frame to the same bytes. Nothing is stripped or
lower-cased: "a b" and "a  b" are different texts with different vectors.

**Cut texts have keys of their own.** A call with ``truncate=True`` asks for the
vector of what the engine keeps of a text over its context; its digest frames
``CUT_MARKER`` between the instruction and the text. A call without it has the
digest above, unchanged, so caches written before calls could ask for a cut stay
valid, and every worker of a model serves both kinds of call. A text that fits
has two keys then (one vector each, equal): the cost of never storing a cut
vector where a whole text's vector is expected. Where a text is cut is the
engine's context: the checkpoint's for sentence-transformers (which the
signature compares); for SGLang, the lower of ``context_length`` and what its KV
pool admits, which may differ by a few tokens between GPUs, and so may the cut
vectors of texts that long (by far less than any two checkpoints).

The cache keys live in the cache Redis; the queue list lives in the broker
Redis. Only cache-side keys carry a TTL.

**One kind of vectors per model id and namespace.** The digest names the model
id, not the engine that computes its vectors: a ``hash`` worker and a
``sentence-transformers`` worker started with the same ``--model`` would both
serve its queue and write under the same keys, and producers would read either
kind for 30 days. embq could have put the engine into the digest instead, but
producers do not know which engine serves a model (that is the point of the
queue), and a different checkpoint or dimension under one engine name would
still collide. So a worker whose vectors cannot match the cached ones refuses
to start. What produces the vectors is its *signature* (``embq.worker.signature``):
the engine, the dimension, a fingerprint of the checkpoint (the hash of its
configuration and tokenizer files and of its weights' names and sizes, plus
options that change what it computes, such as quantisation or random weights),
and the instruction format. The first
worker stores it at ``signature_key`` (SET NX, TTL ``cache_ttl``) and running
workers renew it with their heartbeat, so it outlives every vector it vouches
for. A worker that finds another signature there exits (status 3) naming both:
serve the other engine under another model id or ``EMBQ_CACHE_NAMESPACE``, or
empty the cache with ``embq cache clear``, which removes the signature with the
vectors. Numeric precision (``EMBQ_DTYPE``, float16 storage) is not part of
it: it moves vectors by ~1e-3, not to other vectors.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

PREFIX = "embq"
VECTOR = f"{PREFIX}:v:"
ALIVE = f"{PREFIX}:alive:"
WATCH = f"{PREFIX}:watch:"
REPLY = f"{PREFIX}:reply:"
STATS = f"{PREFIX}:stats:"
QUEUE_PREFIX = f"{PREFIX}."
#: Separates a queue's model from its cache namespace; neither may contain it.
QUEUE_NAMESPACE_SEPARATOR = "@"
#: Model ids of the ``hash`` engine's pseudo-vectors begin with this, and only theirs do: a hash
#: worker can then never serve a real model's queue nor write under its keys (``embq.worker.settings``).
HASH_MODEL_PREFIX = "hash/"
#: The hash engine's model when none is named.
HASH_DEFAULT_MODEL = HASH_MODEL_PREFIX + "default"
#: The cache namespace of a default install; its queues keep the plain ``embq.{model}`` name.
DEFAULT_NAMESPACE = "v1"
#: Lanes of a model's work: someone waits for an interactive text now (a query, a gateway request);
#: bulk work (a backfill, a file) takes what the engine has left, never less than a share of it.
INTERACTIVE = "interactive"
BULK = "bulk"
LANES = (INTERACTIVE, BULK)

ATTEMPTS = f"{PREFIX}:attempts:"
WORKER = f"{PREFIX}:worker:"
#: Index of the heartbeat hashes: readers fetch O(workers) keys, never SCAN millions of vectors.
WORKERS = f"{PREFIX}:workers"
SIGNATURE = f"{PREFIX}:signature:"
#: What ``embq cache clear`` removes: the vectors and what says which engine made them.
CACHE_PATTERNS = (VECTOR + "*", SIGNATURE + "*")

#: Seconds the worker's statistics hash lives after its last update.
STATS_TTL = 7 * 24 * 3600
#: Seconds a task's delivery count is remembered.
ATTEMPTS_TTL = 24 * 3600
#: Seconds between a worker's heartbeats, and how long one lasts without the next.
HEARTBEAT_SECONDS = 10
HEARTBEAT_TTL = 3 * HEARTBEAT_SECONDS


#: Characters of a hex digest (blake2b-256).
DIGEST_HEX = 64


_LENGTH = struct.Struct("<Q")


def _framed(part: str) -> bytes:
    data = part.encode("utf-8")
    return _LENGTH.pack(len(data)) + data


#: Framed after the instruction in the digest of a text the engine cuts at its context (``truncate=True``).
#: An uncut text's digest has no such part, so it is what it was before calls could ask for a cut, and
#: the framing keeps the two kinds apart: no text frames to this marker followed by another text.
CUT_MARKER = "cut-at-context"


def text_digests(
    model: str, namespace: str, instruction: str, texts: Iterable[str], *, truncate: bool = False
) -> list[str]:
    """Hex digests identifying the vectors of ``texts`` (valid UTF-8) under one model,
    namespace and instruction: the common prefix is hashed once, a copy per text. ``truncate``:
    the vectors of the texts as the engine cuts them at its context (``CUT_MARKER``)."""
    prefix = hashlib.blake2b(digest_size=32, person=b"embq-key-v1")
    prefix.update(_framed(model) + _framed(namespace) + _framed(instruction))
    if truncate:
        prefix.update(_framed(CUT_MARKER))
    digests = []
    for text in texts:
        h = prefix.copy()
        h.update(_framed(text))
        digests.append(h.hexdigest())
    return digests


def text_digest(model: str, namespace: str, instruction: str, text: str, *, truncate: bool = False) -> str:
    """Hex digest identifying one vector. ``text`` must already be valid UTF-8."""
    return text_digests(model, namespace, instruction, [text], truncate=truncate)[0]


def vector_key(digest: str) -> str:
    return VECTOR + digest


def alive_key(token: str) -> str:
    return ALIVE + token


def watch_key(digest: str) -> str:
    """The text's vector key is the hash tag: on a Redis Cluster both keys share a slot, so the scripts
    that flag a claim and add its watcher change one node."""
    return f"{WATCH}{{{VECTOR}{digest}}}"


def reply_key(call_id: str) -> str:
    return REPLY + call_id


def stats_key(model: str) -> str:
    return STATS + model


def attempts_key(task_id: str) -> str:
    return ATTEMPTS + task_id


def worker_key(name: str) -> str:
    return WORKER + name


def signature_key(namespace: str, model: str) -> str:
    """Which engine, dimension and checkpoint wrote the vectors of ``model`` under ``namespace``."""
    return f"{SIGNATURE}{namespace}:{model}"


def queue_name(model: str, namespace: str = DEFAULT_NAMESPACE, lane: str = INTERACTIVE) -> str:
    """One Celery queue (one Redis list) per model, cache namespace and lane: a worker takes only work
    it can answer, since it writes under the namespace whose signature it checked. The interactive
    lane of the default namespace keeps the plain ``embq.{model}``; the bulk lane always names its
    namespace (``embq.{model}@{namespace}@bulk``), so that no model and namespace can spell it."""
    if lane == BULK:
        return f"{QUEUE_PREFIX}{model}{QUEUE_NAMESPACE_SEPARATOR}{namespace}{QUEUE_NAMESPACE_SEPARATOR}{BULK}"
    if namespace == DEFAULT_NAMESPACE:
        return QUEUE_PREFIX + model
    return f"{QUEUE_PREFIX}{model}{QUEUE_NAMESPACE_SEPARATOR}{namespace}"


def queue_lane(queue: str) -> tuple[str, str]:
    """``(model as a queue names it, lane)`` of a queue list's name (without ``QUEUE_PREFIX``)."""
    suffix = QUEUE_NAMESPACE_SEPARATOR + BULK
    if queue.endswith(suffix) and queue.count(QUEUE_NAMESPACE_SEPARATOR) == 2:
        model, namespace = queue[: -len(suffix)].split(QUEUE_NAMESPACE_SEPARATOR)
        return (model if namespace == DEFAULT_NAMESPACE else f"{model}{QUEUE_NAMESPACE_SEPARATOR}{namespace}"), BULK
    return queue, INTERACTIVE
