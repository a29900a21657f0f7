"""Real Redis topologies for the tests, from the very ``redis-server`` the tests already use: a Redis
Cluster of three masters and three replicas, and a master with a replica watched by three sentinels.

Every process is started here, owned by this one (it gets a signal when the thread that started it
dies, so none outlives a crashed test run: start them from a thread that outlives them, as pytest's
main thread does) and stopped by its own PID; nothing else is touched.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis

from embq.producer.errors import EmbqError
from embq.worker.local import LocalRedis, child_options, free_port, redis_server_binary, stop_process, wait_until

#: A cluster node listens for its peers on its port plus this.
BUS_OFFSET = 10000
#: Hash slots of a Redis Cluster; all must be served for ``cluster_state:ok``.
CLUSTER_SLOTS = 16384
#: Masters of a ``LocalCluster``; each gets one replica.
MASTERS = 3
#: Seconds a node or sentinel has between SIGTERM and SIGKILL in ``stop``: nothing here persists.
STOP_GRACE = 5.0


def redis_cli() -> str:
    """``redis-cli`` from beside ``redis-server``: the same build, so ``--cluster create`` speaks its dialect."""
    return str(Path(redis_server_binary()).with_name("redis-cli"))


def ask(port: int, *command: str | int) -> Any:
    """One command to ``127.0.0.1:port`` on a connection of its own, closed at once. RESP2, and multi-word
    commands as separate words: redis-py then leaves most replies as Redis sent them (``SENTINEL MASTER`` a
    flat list, ``CLUSTER NODES`` text), whatever protocol a newer redis-py would pick. ``INFO`` still
    comes back as a dict."""
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True, protocol=2) as client:
        return client.execute_command(*command)


def cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``port``, field by field."""
    fields = (line.split(":", 1) for line in str(ask(port, "CLUSTER", "INFO")).split() if ":" in line)
    return {name: value for name, value in fields}


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (``port + 10000``) is valid and free too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET < 65536 and port_is_free(port + BUS_OFFSET):
            return port


def distinct_ports(count: int, pick: Callable[[], int] = free_port) -> list[int]:
    """``count`` different free ports: two quick ``free_port`` calls may hand out the same one."""
    ports: list[int] = []
    while len(ports) < count:
        port = pick()
        if port not in ports and port + BUS_OFFSET not in ports and port - BUS_OFFSET not in ports:
            ports.append(port)
    return ports


@dataclass(frozen=True)
class ClusterNode:
    """One line of ``CLUSTER NODES``: who a node is, as the node asked sees it."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a master
    slots: tuple[str, ...]  # ranges such as "0-5460"; empty for a replica or a master that lost its slots

    @classmethod
    def parse(cls, line: str) -> ClusterNode:
        fields = line.split()
        address = fields[1].split("@")[0]  # ip:port@bus-port
        return cls(
            fields[0], int(address.rsplit(":", 1)[1]), frozenset(fields[2].split(",")), fields[3], tuple(fields[8:])
        )

    @property
    def serving(self) -> bool:
        """A master with slots that nobody has marked failed."""
        return "master" in self.flags and bool(self.slots) and not {"fail", "fail?"} & self.flags


class Started:
    """A context manager that starts its processes and stops them all, also when starting fails."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster(Started):
    """Three masters and three replicas on loopback ports, each its own ``redis-server`` and temporary
    directory. ``cluster-replica-validity-factor 0`` lets a replica fail over however stale it is, so a
    killed master's slots always come back."""

    def __init__(self, node_timeout_ms: int = 1000) -> None:
        self.node_timeout_ms = node_timeout_ms
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        # LocalRedis adds --bind 127.0.0.1, --save "" and --appendonly no; ``private``: they die with us.
        self.nodes = {
            port: LocalRedis(*args, port=port, private=True) for port in distinct_ports(2 * MASTERS, cluster_port)
        }

    @property
    def url(self) -> str:
        """A master that serves now (the first by port); any node would do, a client follows redirects."""
        return f"redis://127.0.0.1:{self.masters()[0][0]}/0"

    def live_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.process is not None and node.process.poll() is None]

    def pid(self, port: int) -> int:
        process = self.nodes[port].process
        assert process is not None, f"node {port} was never started"
        return process.pid

    def start(self, timeout: float = 60.0) -> LocalCluster:
        for node in self.nodes.values():
            node.start()
        create = [redis_cli(), "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.nodes)]
        created = subprocess.run(
            [*create, "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=timeout
        )
        if created.returncode != 0:
            raise EmbqError(
                f"redis-cli --cluster create failed ({created.returncode}):\n{created.stdout}{created.stderr}"
            )
        wait_until(self._formed, timeout, "every cluster node ok, every slot served, every replica in sync")
        return self

    def nodes_seen(self) -> list[ClusterNode]:
        """``CLUSTER NODES`` as the first live node that answers sees it."""
        return [ClusterNode.parse(line) for line in self.cluster_nodes().splitlines() if line.strip()]

    def cluster_nodes(self) -> str:
        for port in self.live_ports():
            try:
                return str(ask(port, "CLUSTER", "NODES"))
            except redis.exceptions.RedisError:
                continue
        raise EmbqError("no cluster node answers")

    def masters(self) -> list[tuple[int, int]]:
        """``(port, pid)`` of the live nodes that are masters now, by port."""
        live = self.live_ports()
        return sorted((n.port, self.pid(n.port)) for n in self.nodes_seen() if "master" in n.flags and n.port in live)

    def replicas(self) -> list[tuple[int, int]]:
        """``(port, pid)`` of the live nodes that are replicas now, by port."""
        live = self.live_ports()
        return sorted((n.port, self.pid(n.port)) for n in self.nodes_seen() if "slave" in n.flags and n.port in live)

    def keys_per_master(self) -> dict[int, int]:
        return {port: int(ask(port, "DBSIZE")) for port, _ in self.masters()}

    def ok(self) -> bool:
        """Every live node says ``cluster_state:ok`` with every slot served by a master nobody suspects."""
        try:
            for port in self.live_ports():
                info = cluster_info(port)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                    return False
            return True
        except redis.exceptions.RedisError:
            return False

    def _formed(self) -> bool:
        """``ok``, every node knows the other five, and each master has a replica whose link is up: only
        then can ``kill_master`` count on a promotion, and keys written before it on their copy."""
        if not self.ok():
            return False
        try:
            if any(cluster_info(port).get("cluster_known_nodes") != str(len(self.nodes)) for port in self.nodes):
                return False
            seen = self.nodes_seen()
            replicas = [n for n in seen if "slave" in n.flags]
            if sum(n.serving for n in seen) != MASTERS or len({n.master_id for n in replicas}) != MASTERS:
                return False
            return all(ask(n.port, "INFO", "replication").get("master_link_status") == "up" for n in replicas)
        except redis.exceptions.RedisError:
            return False

    def kill_master(self, port: int, timeout: float = 30.0) -> float:
        """SIGKILL the master on ``port``, as a crash would; return the seconds until one of its replicas
        serves its slots and the cluster is ok again. The node stays dead."""
        seen = self.nodes_seen()
        master = next((n for n in seen if n.port == port and "master" in n.flags), None)
        if master is None:
            raise EmbqError(f"{port} is no master:\n{self.cluster_nodes()}")
        heirs = {n.port for n in seen if n.master_id == master.id}
        process = self.nodes[port].process
        assert process is not None and process.poll() is None, f"node {port} is not running"
        started = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait()

        def promoted() -> bool:
            try:
                return any(n.port in heirs and n.serving for n in self.nodes_seen()) and self.ok()
            except (redis.exceptions.RedisError, EmbqError):
                return False

        try:
            wait_until(promoted, timeout, f"a replica of {port} ({sorted(heirs)}) promoted and the cluster ok")
        except EmbqError as e:
            raise EmbqError(f"{e}; CLUSTER NODES says:\n{self.cluster_nodes()}") from e
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every node started here (SIGTERM, then SIGKILL); killed ones are only reaped. Idempotent."""
        for node in self.nodes.values():
            node.stop(grace=STOP_GRACE)  # also removes its directory


class LocalSentinel(Started):
    """A master, its replica and three sentinels (quorum 2) that fail the master over within seconds."""

    def __init__(self, master_name: str = "embq") -> None:
        self.master_name = master_name
        master, replica, *sentinel_ports = distinct_ports(5)
        self.servers = {
            master: LocalRedis(port=master, private=True),
            replica: LocalRedis("--replicaof", "127.0.0.1", str(master), port=replica, private=True),
        }
        self.first_master = master
        self.sentinels: list[tuple[str, int]] = [("127.0.0.1", port) for port in sentinel_ports]
        #: Sentinel configuration files, one directory per sentinel: Sentinel rewrites its file.
        self.dir = Path(tempfile.mkdtemp(prefix="embq-sentinel-"))
        self.sentinel_processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Kombu's sentinel URL, with the ``master_name`` that embq's settings require of it."""
        hosts = ";".join(f"sentinel://{host}:{port}" for host, port in self.sentinels)
        return f"{hosts}/0?master_name={self.master_name}"

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        for server in self.servers.values():
            server.start()
        for _, port in self.sentinels:
            self.sentinel_processes[port] = self._start_sentinel(port)
        wait_until(self._watching, timeout, "three sentinels that see the master, its replica and each other")
        return self

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        home = self.dir / str(port)
        home.mkdir()
        name = self.master_name
        conf = home / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {home}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.first_master} 2\n"  # before the lines that name it
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        return subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"],  # the file must come first
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **child_options(True, signal.SIGKILL),
        )

    def _watching(self) -> bool:
        for port, process in self.sentinel_processes.items():
            if process.poll() is not None:
                raise EmbqError(f"sentinel on {port} exited with {process.returncode}")
            try:
                reply = ask(port, "SENTINEL", "MASTER", self.master_name)  # a flat list: name, value, ...
            except redis.exceptions.RedisError:
                return False
            state = dict(zip(reply[::2], reply[1::2], strict=True))
            if int(state["num-other-sentinels"]) != 2 or int(state["num-slaves"]) != 1:
                return False
        return True

    def addresses(self) -> list[tuple[str, int]]:
        """The master's address as each sentinel that answers reports it."""
        found = []
        for _, port in self.sentinels:
            try:
                reply = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except redis.exceptions.RedisError:
                continue
            if reply:
                found.append((str(reply[0]), int(reply[1])))
        return found

    def master_address(self) -> tuple[str, int]:
        """``(host, port)`` of the master, as the first sentinel that answers says."""
        found = self.addresses()
        if not found:
            raise EmbqError(f"no sentinel knows master {self.master_name!r}")
        return found[0]

    def kill_master(self, timeout: float = 30.0) -> float:
        """SIGKILL the current master, as a crash would; return the seconds until every sentinel names
        another master and that one answers ``ROLE`` as a master. The old one stays dead."""
        _, old = self.master_address()
        process = self.servers[old].process
        assert process is not None and process.poll() is None, f"master {old} is not running"
        started = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait()

        def promoted() -> bool:
            found = set(self.addresses())
            if len(found) != 1 or next(iter(found))[1] == old:
                return False
            try:
                return bool(ask(next(iter(found))[1], "ROLE")[0] == "master")
            except redis.exceptions.RedisError:
                return False

        wait_until(promoted, timeout, f"the sentinels to promote a replica of {old}")
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop the sentinels first (so none fails anything over meanwhile), then the servers. Idempotent."""
        processes, self.sentinel_processes = self.sentinel_processes, {}
        for process in processes.values():
            stop_process(process, grace=STOP_GRACE)
        for server in self.servers.values():
            server.stop(grace=STOP_GRACE)
        shutil.rmtree(self.dir, ignore_errors=True)
