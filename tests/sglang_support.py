"""The ``sglang`` fixture: workers that host the real ``sglang.Engine`` with a CPU scheduler process.

Workers run with the Python of the SGLang test environment
(``tests/sglang_cpu/environment.py``, built on first use) and the engine class
``tests.sglang_cpu.engine:CpuSchedulerEngine``: SGLang's own code everywhere
but the forward pass, which a tiny random-weight Qwen3 model does on the CPU.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from embq.worker.local import LocalWorker
from tests.sglang_cpu import environment, model

ROOT = environment.ROOT
#: The context every test worker is started with (``EMBQ_CONTEXT_LENGTH``).
CONTEXT = 128
ENGINE_CLASS = "tests.sglang_cpu.engine:CpuSchedulerEngine"


@dataclass(frozen=True)
class SGLangCpu:
    python: Path
    model: Path

    def env(self, sglang_args: dict[str, object] | None = None, **extra: str) -> dict[str, str]:
        """Environment of a worker that hosts ``CpuSchedulerEngine`` (SGLang's ``device`` is ``cpu``)."""
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {
            "PYTHONPATH": path,
            "EMBQ_SGLANG_ENGINE_CLASS": ENGINE_CLASS,
            "EMBQ_SGLANG_ARGS": json.dumps({"device": "cpu", **(sglang_args or {})}),
            "EMBQ_CONTEXT_LENGTH": str(CONTEXT),
            **extra,
        }

    def expected(self, prompts: list[str]) -> np.ndarray:
        return model.expected(self.model, prompts)

    def token_ids(self, text: str) -> list[int]:
        return model.token_ids(self.model, text)

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        return model.embed_ids(self.model, ids)

    def alias(self, tmp_path: Path, name: str) -> str:
        """Another model id (and so another queue and key space) for the same model directory."""
        link = tmp_path / name
        link.symlink_to(self.model, target_is_directory=True)
        return str(link)


@pytest.fixture(scope="session")
def sglang(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SGLangCpu]:
    python = environment.build()
    yield SGLangCpu(python=python, model=model.build_model(tmp_path_factory.mktemp("tiny-qwen3")))


def logged_pids(worker: LocalWorker, label: str) -> list[int] | None:
    """The PIDs the worker's log lists after ``label`` (``label: [1, 2]`` or ``label: 1``); None if not logged."""
    found = re.search(re.escape(label) + r": \[?([\d, ]*)\]?", worker.log_path.read_text())
    return None if found is None else [int(p) for p in found.group(1).split(",") if p.strip()]


def pids_in_log(worker: LocalWorker) -> list[int]:
    """The engine's processes, as the worker logged them at start: its host, SGLang's children, and the
    fronts that joined the host's engine, if any."""
    host, children = logged_pids(worker, "SGLang host process"), logged_pids(worker, "SGLang children")
    assert host and children is not None, worker.log_tail()
    return host + children + (logged_pids(worker, "SGLang front processes") or [])


def front_pids(worker: LocalWorker) -> list[int]:
    """The processes that joined the host's engine as SGLang tokenizer workers (``tokenizer_worker_num``)."""
    fronts = logged_pids(worker, "SGLang front processes")
    assert fronts is not None, worker.log_tail()
    return fronts
