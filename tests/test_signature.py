"""One kind of vectors per model: workers whose vectors cannot match the cached ones refuse to start."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, ItemFailedError, keys
from embq.producer.settings import DEFAULT_MODEL, Settings
from embq.worker.engines.checkpoint import fingerprint, local_model_dir
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalWorker, wait_until
from tests.files_support import clean_env, embq

Start = Callable[..., LocalWorker]
Client = Callable[..., EmbeddingClient]


def refused(worker: LocalWorker, timeout: float = 60) -> list[str]:
    """Wait for a worker to exit 3; its CRITICAL lines."""
    assert worker.process is not None
    assert worker.process.wait(timeout) == 3, worker.log_tail()
    log = worker.log_path.read_text()
    assert "Traceback" not in log
    return [line for line in log.splitlines() if "CRITICAL" in line]


def signature(r: redis.Redis, model: str) -> dict[str, object]:
    raw = r.get(keys.signature_key(Settings().cache_namespace, model))
    assert raw is not None
    return dict(json.loads(raw))


@pytest.mark.model
def test_the_hash_engine_never_serves_a_real_models_name(
    start_worker: Start, make_client: Client, r: redis.Redis, tmp_path: Path
) -> None:
    """Pseudo-vectors live under ``hash/`` model ids only: whichever worker starts first, a real
    model's queue and keys get real vectors, and a misnamed worker stops in one line before loading."""
    fake = start_worker(DEFAULT_MODEL, engine="hash", wait=False)
    [line] = refused(fake)
    assert "the hash engine makes pseudo-vectors" in line and "--model hash/NAME" in line
    assert not r.exists(keys.signature_key(Settings().cache_namespace, DEFAULT_MODEL))
    start_worker(DEFAULT_MODEL, engine="sentence-transformers")
    [line] = refused(start_worker(DEFAULT_MODEL, engine="hash", wait=False))  # and after the real one
    assert "pseudo-vectors" in line
    texts = [f"real first {i}" for i in range(40)]
    vectors = make_client(model=DEFAULT_MODEL).embed(texts, timeout=120)
    assert not any(np.allclose(v, hash_vector(t, 384), atol=1e-3) for v, t in zip(vectors, texts, strict=True))
    stored = signature(r, DEFAULT_MODEL)
    assert stored["engine"] == "sentence-transformers" and stored["dim"] == 384
    assert stored["checkpoint"] == fingerprint(local_model_dir(DEFAULT_MODEL))  # type: ignore[arg-type]
    [line] = refused(start_worker("hash/minilm", engine="sentence-transformers", wait=False))
    assert "belong to the hash engine" in line
    # The embedded `embq embed` refuses the same mistake before it starts a Redis or a worker.
    source = tmp_path / "in.txt"
    source.write_text("one\n", encoding="utf-8")
    home = tmp_path / "home"
    done = embq("embed", str(source), "--engine", "hash", "--model", DEFAULT_MODEL, env=clean_env(EMBQ_HOME=str(home)))
    assert done.returncode == 2 and "pseudo-vectors" in done.stderr and "Traceback" not in done.stderr
    assert not home.exists() and not (tmp_path / "in.npy").exists()


def test_the_same_engine_with_another_dimension_is_refused(start_worker: Start) -> None:
    start_worker("hash/dims", env={"EMBQ_HASH_DIM": "384"})
    narrow = start_worker("hash/dims", env={"EMBQ_HASH_DIM": "256"}, wait=False)
    [line] = refused(narrow)
    assert "hash engine, dim 384" in line and "hash engine, dim 256" in line and "differ in dim" in line
    assert narrow.log_path.read_text().count("\n") == 1  # before Celery's banner: the one line alone


def test_identical_workers_share_the_model_and_keep_its_signature_alive(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    first, second = start_worker("hash/shared"), start_worker("hash/shared")
    texts = [f"shared {i}" for i in range(300)]
    np.testing.assert_array_equal(
        make_client(model="hash/shared", task_max_texts=5).embed(texts, timeout=60), hashes(texts)
    )
    assert first.process is not None and second.process is not None
    assert first.process.poll() is None and second.process.poll() is None
    key = keys.signature_key(Settings().cache_namespace, "hash/shared")
    assert Settings().cache_ttl - 60 < r.ttl(key) <= Settings().cache_ttl
    r.delete(key)  # what `embq cache clear` does: a running worker puts it back with its heartbeat
    wait_until(lambda: r.exists(key), 30, "a heartbeat to put the signature back")
    assert signature(r, "hash/shared")["engine"] == "hash"


def test_workers_that_differ_only_in_their_truncation_default_share_the_model(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    """Truncation is the call's, not the worker's: a worker started with ``EMBQ_TRUNCATE=1`` joins one started
    without it, and one whose model's signature was stored by an older worker that cut texts; both serve
    calls that cut and calls that do not, under their own keys."""
    key = keys.signature_key(Settings().cache_namespace, "hash/cuts")
    older = {"engine": "hash", "dim": 384, "checkpoint": "", "template": "{instruction}{text}"}
    r.set(key, json.dumps({**older, "truncates": True, "truncate_at": 8192, "by": "older:1"}))
    start_worker("hash/cuts", env={"EMBQ_HASH_MAX_TOKENS": "20"})
    second = start_worker("hash/cuts", env={"EMBQ_HASH_MAX_TOKENS": "20", "EMBQ_TRUNCATE": "1"})
    assert "no longer changes a worker" in second.log_path.read_text()
    long = "a text of more than twenty estimated tokens, eighty characters or more in all"
    client = make_client(model="hash/cuts")
    cut_vectors = client.embed(["short", long], truncate=True, timeout=60)
    np.testing.assert_array_equal(cut_vectors, hashes(["short", long[:72]]))
    with pytest.raises(ItemFailedError) as info:
        client.embed(["short", long], timeout=60)
    assert list(info.value.failures) == [1] and "truncate=True" in info.value.failures[1]
    np.testing.assert_array_equal(info.value.vectors[:1], hashes(["short"]))
    whole = keys.vector_key(keys.text_digest("hash/cuts", Settings().cache_namespace, "", long))
    cut = keys.vector_key(keys.text_digest("hash/cuts", Settings().cache_namespace, "", long, truncate=True))
    assert r.get(whole) is None and r.get(cut) is not None
    stats = keys.stats_key("hash/cuts")
    computed = int(r.hget(stats, "texts") or 0)
    np.testing.assert_array_equal(client.embed(["short", long], truncate=True, timeout=60), cut_vectors)
    assert int(r.hget(stats, "texts") or 0) == computed, "both cached: short under its whole key, long cut"


def test_a_running_worker_that_lost_its_model_to_another_kind_stops(start_worker: Start, r: redis.Redis) -> None:
    key = keys.signature_key(Settings().cache_namespace, "hash/taken")
    wide = start_worker("hash/taken", env={"EMBQ_HASH_DIM": "384"})
    r.delete(key)
    narrow = start_worker("hash/taken", env={"EMBQ_HASH_DIM": "256"}, wait=False)
    # Whichever claims the empty key first keeps serving; the other exits 3 with the conflict.
    assert wide.process is not None and narrow.process is not None
    wait_until(lambda: wide.process.poll() is not None or narrow.process.poll() is not None, 60, "one to stop")  # type: ignore[union-attr]
    loser, winner = (wide, narrow) if wide.process.poll() is not None else (narrow, wide)
    [line] = refused(loser)
    assert "hash engine, dim 384" in line and "hash engine, dim 256" in line
    assert winner.process is not None and winner.process.poll() is None
    assert signature(r, "hash/taken")["dim"] == (256 if winner is narrow else 384)


def test_the_fingerprint_names_what_computes_the_vectors(tmp_path: Path) -> None:
    original = local_model_dir(DEFAULT_MODEL)
    assert original is not None
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "onnx").mkdir()  # another format beside it, and a model card: the same checkpoint
    (copy / "onnx" / "model.onnx").write_bytes(b"\0" * 100)
    (copy / "README.md").write_text("another card", encoding="utf-8")
    assert fingerprint(copy) == fingerprint(original)
    config = json.loads((copy / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    config["pooling_mode_mean_tokens"], config["pooling_mode_cls_token"] = False, True
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert fingerprint(copy) != fingerprint(original)


def hashes(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])
