"""A CPU scheduler process for the real ``sglang.Engine``: the one part of SGLang that needs a GPU, replaced.

``Engine.run_scheduler_process_func`` is SGLang's own hook for this (its
docstring: "to allow people to override ... and launch processes for their
private forks"). The function below receives exactly what SGLang's
``run_scheduler_process`` receives, in a child that SGLang spawned, and speaks
SGLang's own IPC with SGLang's own objects:

- it binds, with SGLang's ``get_zmq_socket``, PULL on
  ``port_args.scheduler_input_ipc_name`` (requests from the tokenizer manager),
  DEALER on ``port_args.rpc_ipc_name`` and PUSH on ``port_args.detokenizer_ipc_name``;
- it answers the readiness handshake through ``pipe_writer`` with the keys
  ``Scheduler.get_init_info`` sends (``max_req_input_len`` computed as
  ``TpModelWorker.get_worker_info`` does: ``min(context - 1, pool - 1) - 5``);
- it receives ``TokenizedEmbeddingReqInput`` and ``BatchTokenizedEmbeddingReqInput``
  (``sock_recv``), applies SGLang's own ``validate_input_length`` (which truncates
  to ``max_req_input_len`` under ``allow_auto_truncate``), and answers with
  ``BatchEmbeddingOutput`` (``sock_send``), every field filled as
  ``SchedulerOutputStreamer._stream_output_embedding`` fills it;
- on any exception it does what ``run_scheduler_process`` does: log the
  traceback and SIGQUIT its parent.

What it replaces: the GPU forward pass (a ``transformers`` Qwen3 model on the
CPU, last-token pooling, L2-normalised, one request at a time) and SGLang's
batching policy (each drain of the socket is one "forward batch"). Everything
else a worker touches is SGLang's: ``ServerArgs`` and its validation, spawn and
pickling, signal handlers, logger setup, tokenizer manager, detokenizer process,
subprocess watchdog, context-length errors and ``shutdown``.

Faults for tests, read from the environment (children inherit the worker's):
``EMBQ_TEST_SCHEDULER_DELAY`` seconds per batch; ``..._POISON`` a substring
whose batch raises (the scheduler then SIGQUITs the worker, as SGLang's does on
any exception); ``..._OOM_ABOVE`` a batch of more requests raises
``torch.OutOfMemoryError`` (the same path: SGLang never returns a CUDA OOM to
the caller); ``..._HANG`` a substring never answered; ``..._DIE`` a substring
that makes the process exit at once (SGLang's watchdog then SIGQUITs the worker).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import psutil
import torch
import zmq
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.io_struct import (
    BatchEmbeddingOutput,
    BatchTokenizedEmbeddingReqInput,
    TokenizedEmbeddingReqInput,
    sock_recv,
    sock_send,
)
from sglang.srt.managers.schedule_batch import FINISH_LENGTH
from sglang.srt.managers.scheduler import configure_scheduler_process, resolve_spawn_dp_rank
from sglang.srt.managers.utils import validate_input_length
from sglang.srt.observability.startup_time import build_scheduler_startup_time
from sglang.srt.plugins import load_plugins
from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
from sglang.srt.utils.network import get_zmq_socket
from sglang.utils import get_exception_traceback
from transformers import AutoModel

logger = logging.getLogger(__name__)

FAULT = "EMBQ_TEST_SCHEDULER_"
#: Requests the KV pool of this scheduler "holds", as ``max_total_num_tokens`` in contexts.
POOL_CONTEXTS = 8


def run_scheduler_process(
    server_args: Any,
    port_args: Any,
    gpu_id: int,
    tp_rank: int,
    pp_rank: int,
    dp_rank: int | None,
    pipe_writer: Any,
    *_: Any,
    **__: Any,
) -> None:
    # The preamble of SGLang's own ``run_scheduler_process``, with its functions.
    load_plugins()
    dp_rank = resolve_spawn_dp_rank(dp_rank)
    world_rank = spawn_world_rank(server_args, tp_rank=tp_rank, pp_rank=pp_rank)
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=world_rank, dp_rank=dp_rank, gpu_id=gpu_id))
    configure_scheduler_process(server_args, gpu_id)
    parent = psutil.Process().parent()
    try:
        scheduler = CpuScheduler(server_args, port_args)
        pipe_writer.send(scheduler.init_info())
        scheduler.run()
    except Exception:
        logger.error("Scheduler hit an exception: %s", get_exception_traceback())
        parent.send_signal(signal.SIGQUIT)


class CpuScheduler:
    def __init__(self, server_args: Any, port_args: Any) -> None:
        started = time.perf_counter()
        torch.set_num_threads(1)
        self.server_args = server_args
        context = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(context, zmq.PULL, port_args.scheduler_input_ipc_name, False)
        self.recv_from_rpc = get_zmq_socket(context, zmq.DEALER, port_args.rpc_ipc_name, False)
        self.send_to_detokenizer = get_zmq_socket(context, zmq.PUSH, port_args.detokenizer_ipc_name, False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)

        loaded = time.perf_counter()
        self.model = AutoModel.from_pretrained(server_args.model_path, dtype=torch.float32).eval()
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[0]]))  # warm up, as a real scheduler's start does
        self.load_seconds = time.perf_counter() - loaded
        context_len = ModelConfig.from_server_args(server_args).context_len
        self.max_total_num_tokens = POOL_CONTEXTS * context_len
        self.max_req_input_len = min(context_len - 1, self.max_total_num_tokens - 1) - 5
        self.allow_auto_truncate = bool(server_args.allow_auto_truncate)
        self.started = started
        logger.info("CPU scheduler ready: context %d, max_req_input_len %d", context_len, self.max_req_input_len)

    def init_info(self) -> dict[str, Any]:
        return {
            "status": "ready",
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_req_input_len": self.max_req_input_len,
            "startup_time": build_scheduler_startup_time(
                target_load_weight=self.load_seconds,
                draft_load_weight=0.0,
                kv_cache_allocation=0.0,
                scheduler_e2e=time.perf_counter() - self.started,
                target_cuda_graph=None,
                draft_cuda_graph=None,
            ),
        }

    def run(self) -> None:
        while True:
            batch = self.receive()
            if batch:
                self.forward(batch)

    def receive(self) -> list[Any]:
        """Block for the first message, then take whatever else is already waiting."""
        requests: list[Any] = []
        timeout = None
        while self.poller.poll(timeout):
            message = sock_recv(self.recv_from_tokenizer, zmq.NOBLOCK)
            if isinstance(message, BatchTokenizedEmbeddingReqInput):
                requests.extend(message.batch)
            elif isinstance(message, TokenizedEmbeddingReqInput):
                requests.append(message)
            else:
                logger.warning("CPU scheduler ignores %s", type(message).__name__)
            timeout = 0
        return requests

    def forward(self, requests: list[Any]) -> None:
        self.inject_faults(requests)
        hang = os.environ.get(FAULT + "HANG")
        answered = [r for r in requests if not (hang and hang in (r.input_text or ""))]
        embeddings, prompt_tokens = [], []
        for request in answered:
            req = SimpleNamespace(origin_input_ids=list(request.input_ids))
            error = validate_input_length(req, self.max_req_input_len, self.allow_auto_truncate)
            if error:  # 0.5.23 queues such an embedding request and runs it as it is
                logger.warning("%s", error)
            with torch.inference_mode():
                hidden = self.model(input_ids=torch.tensor([req.origin_input_ids])).last_hidden_state[0, -1]
            embeddings.append(torch.nn.functional.normalize(hidden.float(), dim=0).tolist())
            prompt_tokens.append(len(request.input_ids))
        if not answered:
            return
        sock_send(
            self.send_to_detokenizer,
            BatchEmbeddingOutput(
                rids=[r.rid for r in answered],
                http_worker_ipcs=[r.http_worker_ipc for r in answered],
                time_stats=None,
                finished_reasons=[FINISH_LENGTH(length=0).to_json() for _ in answered],
                embeddings=embeddings,
                prompt_tokens=prompt_tokens,
                cached_tokens=[0 for _ in answered],
                cached_tokens_details=[None for _ in answered],
                placeholder_tokens_idx=None,
                placeholder_tokens_val=None,
                retraction_counts=[0 for _ in answered],
                pooled_hidden_states=None,
            ),
        )

    def inject_faults(self, requests: list[Any]) -> None:
        texts = [r.input_text or "" for r in requests]
        delay = float(os.environ.get(FAULT + "DELAY", "0") or 0)
        if delay:
            time.sleep(delay)
        die = os.environ.get(FAULT + "DIE")
        if die and any(die in t for t in texts):
            logger.error("test fault: scheduler process exits")
            os._exit(1)
        poison = os.environ.get(FAULT + "POISON")
        if poison and any(poison in t for t in texts):
            raise RuntimeError("test fault: a poison text crashed the forward pass")
        oom_above = int(os.environ.get(FAULT + "OOM_ABOVE", "0") or 0)
        if oom_above and len(requests) > oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test fault: {len(requests)} requests > {oom_above})")
