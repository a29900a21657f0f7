"""A cache Redis that is full and may not evict: the worker says why, and logs no payload."""

from __future__ import annotations

import uuid

import redis

from embq.producer import Settings, keys
from embq.producer.codec import MAGIC
from embq.producer.contract import TASK_EMBED, make_celery, make_payload
from embq.worker.local import LocalRedis, LocalWorker, wait_until


def test_a_full_cache_is_named_in_the_worker_log_without_vectors_or_commands() -> None:
    model = "hash/full"
    with LocalRedis() as broker, LocalRedis() as cache:  # the cache is noeviction, as LocalRedis starts it
        env = {"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache.url, "EMBQ_BATCH_WAIT_MS": "4000"}
        with LocalWorker(broker.url, engine="hash", model=model, env=env) as worker:
            settings = Settings(broker_url=broker.url, cache_url=cache.url, model=model)
            app = make_celery(settings)
            task_id = uuid.uuid4().hex
            queue = keys.queue_name(model)
            texts = [f"never stored {i}" for i in range(3)]
            app.send_task(
                TASK_EMBED,
                # No reply stream: nobody's claims to look at, so the worker embeds every text.
                args=[make_payload(settings, "", texts, "")],
                task_id=task_id,
                queue=queue,
                exchange="",
                routing_key=queue,
            )
            app.close()
            full = redis.Redis.from_url(cache.url)
            # The task counted its delivery and now waits in the batcher (4 s) before its engine call.
            wait_until(lambda: full.exists(keys.attempts_key(task_id)), 30, "the worker to start the task")
            full.set("ballast", b"\0" * (4 << 20))
            full.config_set("maxmemory", str(int(full.info("memory")["used_memory"]) // 2))
            wait_until(lambda: f"{task_id}] raised" in worker.log_path.read_text(), 30, "the task to fail")
            full.close()
            log = worker.log_path.read_text(errors="replace")
    assert "out of memory: command not allowed" in log and "maxmemory-policy allkeys-lru" in log
    assert keys.VECTOR not in log and "of pipeline caused error" not in log and "SET " not in log
    assert MAGIC.decode() + "\\x01" not in log and "\x01\x01" not in log  # no packed vector, raw or escaped
