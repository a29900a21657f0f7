"""Helpers for tests that run workers on the sglang stand-in (``tests/standins/sglang``)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from producer.settings import DEFAULT_MODEL
from worker.engines.sentence_transformers import resolve_model_path
from worker.local import LocalWorker

STANDINS = Path(__file__).parent / "standins"
ROOT = Path(__file__).resolve().parent.parent
#: A model directory with a real tokenizer and config; the stand-in reads both.
MODEL = resolve_model_path(DEFAULT_MODEL)

_spec = importlib.util.spec_from_file_location("sglang_standin", STANDINS / "sglang" / "__init__.py")
assert _spec is not None and _spec.loader is not None
standin: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def expected(prompts: list[str]) -> np.ndarray:
    """What the stand-in engine returns for these prompts."""
    return np.stack([standin.standin_embedding(tokenizer()(p)["input_ids"], 384) for p in prompts]).astype(np.float32)


def sglang_env(**extra: str) -> dict[str, str]:
    """Environment of a worker that imports the stand-in as ``sglang``."""
    path = os.pathsep.join([str(STANDINS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "EMBQ_CONTEXT_LENGTH": "128", **extra}


def alias(tmp_path: Path, name: str) -> str:
    """Another model id (and so another queue) for the same model directory."""
    link = tmp_path / name
    link.symlink_to(MODEL, target_is_directory=True)
    return str(link)


def pids_in_log(worker: LocalWorker) -> list[int]:
    """The engine's child processes, as the worker logged them at start."""
    found = re.search(r"SGLang children: \[([\d, ]*)\]", worker.log_path.read_text())
    assert found, worker.log_tail()
    return [int(p) for p in found.group(1).split(",") if p.strip()]
