"""Real Redis topologies for the tests, from the same ``redis-server`` binary: a Redis Cluster, and a
master with a replica watched by three sentinels."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from worker.local import free_port, redis_server_binary, stop_process, wait_until

#: Where a cluster node listens for its peers: its port plus this.
BUS_OFFSET = 10000


def redis_cli() -> str:
    return str(Path(redis_server_binary()).with_name("redis-cli"))


def cluster_port() -> int:
    """A free port whose cluster bus port (``port + 10000``) is free and valid too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET < 65536 and port_is_free(port + BUS_OFFSET):
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """Three masters and three replicas on loopback ports; a replica may always fail over."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.size = masters
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="embq-cluster-"))
        self.ports = [cluster_port() for _ in range(2 * masters)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.live_ports()[0]}/0"

    def live_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        for port in self.ports:
            home = self.dir / str(port)
            home.mkdir()
            self.processes[port] = subprocess.Popen(
                [
                    redis_server_binary(),
                    "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-replica-validity-factor", "0",
                    "--save", "", "--appendonly", "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            wait_until(lambda port=port: self._answers(port), 10, f"cluster node {port}")
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        wait_until(self._ok, timeout, "the cluster's state ok on every node")
        return self

    def _answers(self, port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.exceptions.RedisError:
            return False

    def _info(self, port: int) -> dict[str, str]:
        info = redis.Redis(port=port, socket_timeout=2, decode_responses=True).execute_command("CLUSTER INFO")
        return {name: str(value) for name, value in info.items()}

    def _ok(self) -> bool:
        try:
            return (
                all(
                    self._info(p).get("cluster_state") == "ok" and self._info(p).get("cluster_slots_ok") == "16384"
                    for p in self.live_ports()
                )
                and len(self.masters()) == self.size
            )
        except redis.exceptions.RedisError:
            return False

    def _nodes(self) -> list[tuple[int, list[str]]]:
        """``(port, flags)`` of every node as a live node sees the cluster."""
        seen = redis.Redis(port=self.live_ports()[0], socket_timeout=2, decode_responses=True).execute_command(
            "CLUSTER NODES"
        )
        return [
            (int(address.split("@")[0].rsplit(":", 1)[1]), node["flags"].split(",")) for address, node in seen.items()
        ]

    def masters(self) -> list[tuple[int, int]]:
        """``(port, pid)`` of the masters serving now."""
        live = set(self.live_ports())
        return sorted(
            (port, self.processes[port].pid)
            for port, flags in self._nodes()
            if "master" in flags and "fail" not in flags and port in live
        )

    def replicas(self) -> list[tuple[int, int]]:
        live = set(self.live_ports())
        return sorted(
            (port, self.processes[port].pid) for port, flags in self._nodes() if "slave" in flags and port in live
        )

    def keys_per_master(self) -> dict[int, int]:
        return {port: int(redis.Redis(port=port).dbsize()) for port, _ in self.masters()}

    def kill_master(self, port: int, timeout: float = 30.0) -> float:
        """SIGKILL the master on ``port``; returns the seconds until its replica serves its slots."""
        started = time.monotonic()
        os.kill(self.processes[port].pid, signal.SIGKILL)
        self.processes[port].wait()
        try:
            wait_until(self._ok, timeout, "a replica promoted and the cluster ok")
        except Exception as e:
            raise AssertionError(f"no failover after {timeout}s: {self._nodes()}") from e
        return time.monotonic() - started

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                stop_process(process, grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalSentinel:
    """A master, its replica and three sentinels (quorum 2) that fail it over within a few seconds."""

    def __init__(self, master_name: str = "embq") -> None:
        self.master_name = master_name
        self.dir = Path(tempfile.mkdtemp(prefix="embq-sentinel-"))
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinel_processes: list[subprocess.Popen[bytes]] = []
        self.sentinels: list[tuple[str, int]] = []

    @property
    def url(self) -> str:
        """The broker URL embq takes: Kombu's sentinel URL with the master's name."""
        parts = [f"sentinel://127.0.0.1:{port}" for _, port in self.sentinels]
        return ";".join(parts) + f"/0?master_name={self.master_name}"

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        master, replica = free_port(), free_port()
        self._server(master)
        self._server(replica, "--replicaof", "127.0.0.1", str(master))
        for _ in range(3):
            port = free_port()
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 5000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinel_processes.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.sentinels.append(("127.0.0.1", port))
        wait_until(self._watching, timeout, "three sentinels that see the master, its replica and each other")
        return self

    def _server(self, port: int, *extra: str) -> None:
        home = self.dir / str(port)
        home.mkdir()
        args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home)]
        args += ["--save", "", "--appendonly", "no", *extra]
        self.servers[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _ask(self, port: int, *command: str) -> object:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True).execute_command(*command)

    def _watching(self) -> bool:
        try:
            for _, port in self.sentinels:
                seen = self._ask(port, "SENTINEL", "MASTER", self.master_name)
                state = dict(zip(seen[::2], seen[1::2], strict=True)) if isinstance(seen, list) else dict(seen)  # type: ignore[arg-type]
                if int(state["num-other-sentinels"]) != 2 or int(state["num-slaves"]) != 1:
                    return False
            return True
        except (redis.exceptions.RedisError, KeyError):
            return False

    def master_address(self) -> tuple[str, int]:
        for _, port in self.sentinels:
            try:
                host, master = self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)  # type: ignore[misc]
                return str(host), int(master)
            except redis.exceptions.RedisError:
                continue
        raise AssertionError("no sentinel answers")

    def kill_master(self, timeout: float = 30.0) -> float:
        """SIGKILL the master; returns the seconds until the sentinels name another that says it is one."""
        started = time.monotonic()
        _, old = self.master_address()
        os.kill(self.servers[old].pid, signal.SIGKILL)
        self.servers[old].wait()

        def promoted() -> bool:
            _, port = self.master_address()
            try:
                return port != old and self._ask(port, "ROLE")[0] == "master"  # type: ignore[index]
            except redis.exceptions.RedisError:
                return False

        wait_until(promoted, timeout, "the sentinels to promote the replica")
        return time.monotonic() - started

    def stop(self) -> None:
        for process in [*self.sentinel_processes, *self.servers.values()]:
            if process.poll() is None:
                stop_process(process, grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
