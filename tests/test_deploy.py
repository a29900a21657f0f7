"""Deployment files, validated offline.

docker-compose.yml and its override docker-compose.cluster.yml (the cache on a Redis
Cluster, whose creation script also runs here against real nodes on loopback) are checked
against the Compose specification; every kustomize
overlay under k8s/overlays is rendered with ``kubectl kustomize`` and what it renders
is validated: built-in kinds against Kubernetes' own schemas (unknown fields refused),
KEDA's objects against the CRD schemas in k8s/schemas. Then the settings embq relies
on are checked in the files as they would be applied: a queue name, a probe path or
an eviction policy that drifts from the code breaks production quietly, so it fails
here instead.

Needs ``kubectl`` (with its built-in kustomize), the PyPI packages
``check-jsonschema``, ``kubernetes-validate``, ``jsonschema`` and ``pyyaml``, and the
``redis-server`` the other tests use.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from embq.producer.cluster import FAILOVER_WAIT
from embq.producer.keys import BULK, queue_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
#: The override that puts the cache on a Redis Cluster: cache-1 ... cache-6 and cache-init.
CLUSTER_COMPOSE = ROOT / "docker-compose.cluster.yml"
#: The override that puts the broker behind Sentinel: broker, broker-replica, sentinel-1 ... sentinel-3.
SENTINEL_COMPOSE = ROOT / "docker-compose.sentinel.yml"
#: The network alias every cluster node carries in it: the host of its EMBQ_CACHE_URL.
CLUSTER_ALIAS = "cache-cluster"
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
#: Overlays that run without a GPU.
CPU_OVERLAYS = {"cpu-dev"}
#: Overlays whose cache is a Redis Cluster from the Bitnami chart redis-cluster (installed with
#: Helm, so not rendered here) instead of the base's one cache Redis.
CLUSTER_CACHE_OVERLAYS = {"cluster-cache", "ha-redis"}
#: Overlays whose broker is the Bitnami chart redis with Sentinel (installed with Helm) instead of the
#: base's one broker Redis; KEDA reads the queue through the sentinels.
SENTINEL_BROKER_OVERLAYS = {"ha-redis"}
SENTINEL_VALUES = K8S / "overlays" / "ha-redis" / "redis-sentinel-values.yaml"
SENTINEL_RELEASE = "embq-broker"
SENTINEL_POD_LABELS = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/instance": SENTINEL_RELEASE}
SENTINEL_PORT = 26379
SENTINEL_MASTER = "embq"
CLUSTER_VALUES = K8S / "overlays" / "cluster-cache" / "redis-cluster-values.yaml"
#: The chart's Helm release (k8s/README.md), hence its Service (the release name plus the chart's,
#: the host of the Secret's cache-url) and the labels of its pods.
CLUSTER_RELEASE = "embq-cache"
CLUSTER_SERVICE = f"{CLUSTER_RELEASE}-redis-cluster"
CLUSTER_POD_LABELS = {"app.kubernetes.io/name": "redis-cluster", "app.kubernetes.io/instance": CLUSTER_RELEASE}
REDIS_PORT = 6379
CLUSTER_BUS_PORT = REDIS_PORT + 10000
#: Oldest Kubernetes the manifests must work on (kubernetes-validate ships its schemas).
K8S_VERSION = "1.30.0"
NAMESPACE = "embq"
READY_FILE = "/tmp/embq-ready"
METRICS_PORT = 9808
GPU_MODEL = "Qwen/Qwen3-Embedding-4B"
CPU_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
GIB = 1024**3

Doc = dict[str, Any]


def require(module: str, package: str) -> ModuleType:
    """Import a test dependency, or fail saying what to install (a skip would hide a gap)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the Python package {package!r} is missing: pip install {package}", pytrace=False)


def load_yaml(path: Path) -> Any:
    return require("yaml", "pyyaml").safe_load(path.read_text())


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def split_image(image: str) -> tuple[str, str | None]:
    """(name, tag) of an image reference; the tag is None when the reference has none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        return name.rsplit(":", 1)[0], last.split(":", 1)[1]
    return name, None


def assert_pinned(image: str) -> None:
    """A floating tag lets two nodes run different code under one name."""
    if "@sha256:" in image:
        return
    _, tag = split_image(image)
    assert tag is not None, f"{image}: no tag (means latest)"
    assert tag != "latest", f"{image}: latest"


def embq_env_names() -> set[str]:
    """Every EMBQ_* variable the code reads, so a deployment file cannot set a misspelt one."""
    names: set[str] = set()
    for path in [*ROOT.glob("producer/**/*.py"), *ROOT.glob("worker/**/*.py")]:
        names.update(re.findall(r"\bEMBQ_[A-Z0-9_]+\b", path.read_text()))
    return names


# --------------------------------------------------------------------------- compose


def byte_value(value: str | int) -> int:
    """Byte values such as ``16gb`` or ``512m``, as binary multiples (Compose and Redis both read ``gb`` so)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", value.strip().lower())
    assert m, f"not a byte value: {value!r}"
    return int(float(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " "))


def compose_seconds(value: str) -> float:
    """Compose's durations (``600s``, ``5m``, ``1m30s``)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@functools.cache
def compose() -> Doc:
    return load_yaml(COMPOSE)


def service(name: str) -> Doc:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def redis_args(svc: Doc) -> list[str]:
    command = svc["command"]
    assert isinstance(command, list), 'Redis command as a list, so that --save "" stays one empty argument'
    assert command[0] == "redis-server"
    return command[1:]


def option(args: list[str], name: str) -> str:
    """Value of ``--name value`` in a redis-server command line."""
    assert f"--{name}" in args, f"redis-server without --{name}: {args}"
    return args[args.index(f"--{name}") + 1]


@pytest.mark.parametrize("path", [COMPOSE, CLUSTER_COMPOSE, SENTINEL_COMPOSE], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path) -> None:
    require("check_jsonschema", "check-jsonschema")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_broker_keeps_its_queue() -> None:
    broker = service("broker")
    args = redis_args(broker)
    assert option(args, "maxmemory-policy") == "noeviction"
    assert option(args, "appendonly") == "yes"
    assert any(str(v).endswith(":/data") for v in broker["volumes"]), "the append-only file needs a volume"


def test_compose_cache_is_a_bounded_lru() -> None:
    args = redis_args(service("cache"))
    assert option(args, "maxmemory-policy") == "allkeys-lru"
    assert byte_value(option(args, "maxmemory")) > 0
    assert option(args, "save") == "", "the cache is not persisted"


@pytest.mark.parametrize("name", ["broker", "cache"])
def test_compose_redis_health_is_a_ping(name: str) -> None:
    svc = service(name)
    assert svc["image"] == "redis:7.2"
    assert "redis-cli ping" in " ".join(svc["healthcheck"]["test"])
    assert "profiles" not in svc, f"{name} must start with every profile"


@pytest.mark.parametrize(
    ("name", "dockerfile", "model", "profile"),
    [("worker-gpu", "worker/Dockerfile", GPU_MODEL, "gpu"), ("worker-cpu", "worker/Dockerfile.cpu", CPU_MODEL, "cpu")],
)
def test_compose_worker(name: str, dockerfile: str, model: str, profile: str) -> None:
    svc = service(name)
    assert svc["profiles"] == [profile], "a machine without a GPU must be able to leave the GPU worker out"
    assert svc["build"]["dockerfile"] == dockerfile
    assert (ROOT / dockerfile).is_file()
    env = svc["environment"]
    assert env["EMBQ_BROKER_URL"] == "redis://broker:6379/0"
    assert env["EMBQ_CACHE_URL"] == "redis://cache:6379/0"
    assert env["EMBQ_READY_FILE"] == READY_FILE
    assert int(env["EMBQ_METRICS_PORT"]) == METRICS_PORT
    assert str(METRICS_PORT) in [str(p) for p in svc["expose"]]
    # --model on the command line wins over EMBQ_MODEL: both must name the same model.
    assert svc["command"] == ["--model", env["EMBQ_MODEL"]]
    assert model in env["EMBQ_MODEL"]
    health = svc["healthcheck"]
    assert health["test"] == ["CMD", "test", "-f", READY_FILE]
    assert svc["init"] is True
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    for dependency in ("broker", "cache"):
        assert svc["depends_on"][dependency]["condition"] == "service_healthy"
    assert any(str(v).endswith(":/models") for v in svc["volumes"])


def test_compose_gpu_worker_gets_a_gpu_shm_and_time() -> None:
    svc = service("worker-gpu")
    assert svc["environment"]["EMBQ_MODEL"] == "${EMBQ_MODEL:-" + GPU_MODEL + "}"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    assert byte_value(svc["shm_size"]) >= 16 * GIB, "SGLang needs 16 GiB of /dev/shm"
    assert compose_seconds(svc["healthcheck"]["start_period"]) >= 600, "first start downloads and loads the weights"
    assert compose_seconds(svc["stop_grace_period"]) >= 300, "warm shutdown finishes the batch in flight"


def test_compose_flower() -> None:
    svc = service("flower")
    assert "profiles" not in svc
    assert svc["build"]["dockerfile"] == "worker/Dockerfile.cpu"
    assert svc["entrypoint"] == ["embq", "flower", "--address", "0.0.0.0"]  # inside its container
    assert svc["env_file"] == "deploy/flower.env"
    assert svc["environment"]["EMBQ_BROKER_URL"] == "redis://broker:6379/0"
    assert any(str(p).endswith(":5555") for p in svc["ports"])
    assert "/healthcheck" in " ".join(svc["healthcheck"]["test"])
    assert svc["depends_on"]["broker"]["condition"] == "service_healthy"
    example = (ROOT / "deploy/flower.env.example").read_text()
    assert re.search(r"^FLOWER_BASIC_AUTH=[^:\s]+:\S+$", example, re.M), "the example documents user:password"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/flower.env" in ignored, "the real env file holds a password"


def test_compose_gateway() -> None:
    svc = service("gateway")
    assert "profiles" not in svc, "the gateway serves whichever workers run"
    assert svc["build"]["dockerfile"] == "producer/gateway/Dockerfile"
    assert svc["env_file"] == "deploy/gateway.env"
    env = svc["environment"]
    assert "EMBQ_API_KEYS" not in env, "keys come from the env file, not the compose file"
    assert env["EMBQ_BROKER_URL"] == "redis://broker:6379/0"
    assert env["EMBQ_CACHE_URL"] == "redis://cache:6379/0"
    assert svc["ports"] == ["127.0.0.1:8000:8000"], "bearer keys in clear: loopback only"
    assert "http://127.0.0.1:8000/health'" in " ".join(svc["healthcheck"]["test"])
    assert svc["init"] is True
    assert compose_seconds(svc["stop_grace_period"]) > float(env["EMBQ_REQUEST_TIMEOUT"]), "requests in flight finish"
    for dependency in ("broker", "cache"):
        assert svc["depends_on"][dependency]["condition"] == "service_healthy"
    example = (ROOT / "deploy/gateway.env.example").read_text()
    assert re.search(r"^EMBQ_API_KEYS=\S+$", example, re.M)
    assert "deploy/gateway.env" in (ROOT / ".gitignore").read_text().splitlines(), "the real env file holds keys"


def test_compose_images_are_pinned() -> None:
    version = project_version()
    for name, svc in compose()["services"].items():
        assert "image" in svc, f"{name}: name the image, or compose tags it latest"
        assert_pinned(svc["image"])
        if "build" in svc:
            assert split_image(svc["image"])[1] == version, f"{name}: built images carry the project version"


def test_compose_sets_only_variables_embq_reads() -> None:
    known = embq_env_names()
    for name, svc in compose()["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("EMBQ_"):
                assert var in known, f"{name}: {var} is read nowhere in producer/ or worker/"


# --------------------------------------------------------------------------- compose: the cache on a Redis Cluster


@functools.cache
def cluster_compose() -> Doc:
    return load_yaml(CLUSTER_COMPOSE)


def cluster_service(name: str) -> Doc:
    services = cluster_compose()["services"]
    assert name in services, f"docker-compose.cluster.yml has no service {name!r}"
    return services[name]


def cluster_nodes() -> dict[str, Doc]:
    return {name: svc for name, svc in cluster_compose()["services"].items() if re.fullmatch(r"cache-\d+", name)}


def cluster_init_script() -> str:
    """cache-init's shell script as the shell gets it: Compose turns ``$$`` into ``$``."""
    command = cluster_service("cache-init")["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    assert "$" not in command[2].replace("$$", ""), "Compose would interpolate a lone $ before the shell sees it"
    return command[2].replace("$$", "$")


def test_compose_cluster_nodes_are_bounded_lru() -> None:
    nodes = cluster_nodes()
    assert len(nodes) == 6, "3 masters and a replica each"
    for name, node in nodes.items():
        assert node["image"] == service("cache")["image"], f"{name}: the image of docker-compose.yml's cache"
        args = redis_args(node)
        assert option(args, "cluster-enabled") == "yes"
        assert option(args, "maxmemory-policy") == "allkeys-lru", f"{name}: a cache, on every node"
        assert byte_value(option(args, "maxmemory")) > 0
        assert option(args, "save") == "" and option(args, "appendonly") == "no", "a cache writes nothing to disk"
        # A replica serves a dead master's slots after the node timeout plus an election; embq retries
        # work on those slots for FAILOVER_WAIT seconds.
        assert 2 * int(option(args, "cluster-node-timeout")) / 1000 < FAILOVER_WAIT
        assert option(args, "cluster-replica-validity-factor") == "0", "a replica may always take over"
        assert node["networks"]["default"]["aliases"] == [CLUSTER_ALIAS]
        assert "redis-cli ping" in " ".join(node["healthcheck"]["test"])
        assert "ports" not in node, "nodes redirect clients to container addresses the host cannot reach"
        assert "profiles" not in node
    others = [name for name, svc in cluster_compose()["services"].items() if name not in nodes]
    assert not [name for name in others if "networks" in cluster_compose()["services"][name]], "the alias is the nodes'"


def test_compose_cluster_init_joins_every_node() -> None:
    init = cluster_service("cache-init")
    nodes = cluster_nodes()
    assert init["image"] == service("cache")["image"], "its redis-cli matches the nodes"
    assert init["environment"]["CACHE_NODES"].split() == [f"{name}:{REDIS_PORT}" for name in nodes]
    assert {name: dep["condition"] for name, dep in init["depends_on"].items()} == dict.fromkeys(
        nodes, "service_healthy"
    ), "it joins the nodes once every one answers"
    assert init.get("restart", "no") == "no", "a one-shot service"
    script = cluster_init_script()
    create = re.search(r"redis-cli --cluster create .*", script)
    assert create, "the nodes are joined by redis-cli --cluster create"
    assert "--cluster-replicas 1" in create.group(0) and "--cluster-yes" in create.group(0)


def test_compose_cluster_points_embq_at_the_cluster() -> None:
    services = cluster_compose()["services"]
    # An override cannot remove a service: the one cache gets a profile that nothing else uses.
    (profile,) = services["cache"]["profiles"]
    assert services["cache"] == {"profiles": [profile]}
    for name, svc in compose()["services"].items():
        assert profile not in svc.get("profiles", []) or name == "cache", f"--profile {profile} is the one cache's"
    readers = {name for name, svc in compose()["services"].items() if "EMBQ_CACHE_URL" in svc.get("environment", {})}
    waiting = {name for name, svc in compose()["services"].items() if "cache" in svc.get("depends_on", {})}
    assert readers and waiting <= readers
    for name in sorted(readers):
        assert name in services, f"{name} reads the cache: the override must point it at the cluster"
        svc = services[name]
        url = urlsplit(svc["environment"]["EMBQ_CACHE_URL"])
        assert (url.scheme, url.hostname, url.port) == ("redis", CLUSTER_ALIAS, REDIS_PORT)
        assert set(svc) == {"environment", "depends_on"}, f"{name}: the override changes only the cache"
        assert svc["depends_on"]["cache"]["required"] is False, "a dependency on the cache left out is dropped"
        assert svc["depends_on"]["cache-init"]["condition"] == "service_completed_successfully"


def test_compose_cluster_images_are_pinned() -> None:
    for name, svc in cluster_compose()["services"].items():
        if "image" in svc:
            assert_pinned(svc["image"])
        else:
            assert name in compose()["services"], f"{name}: name the image, or compose tags it latest"


def test_compose_cluster_sets_only_variables_embq_reads() -> None:
    known = embq_env_names()
    for name, svc in cluster_compose()["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("EMBQ_"):
                assert var in known, f"{name}: {var} is read nowhere in producer/ or worker/"


def test_compose_cluster_init_forms_a_cluster_embq_finds(tmp_path: Path) -> None:
    """cache-init's script against seven nodes started with the compose file's own flags, on
    loopback: it joins six into 3 masters with a replica each, which embq takes for a cluster; run
    again it leaves them be; a node outside the cluster makes it fail, saying how to start over."""
    redis = require("redis", "redis")
    from embq.producer.cluster import connect_cache
    from embq.worker.local import redis_server_binary, stop_process, wait_until
    from tests.topology import cluster_port, redis_cli

    flags = redis_args(next(iter(cluster_nodes().values())))
    ports = [cluster_port() for _ in range(7)]
    processes = []
    try:
        for port in ports:
            (tmp_path / str(port)).mkdir()
            processes.append(
                subprocess.Popen(
                    [redis_server_binary(), *flags, "--port", str(port), "--bind", "127.0.0.1"],
                    cwd=tmp_path / str(port),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            wait_until(lambda port=port: redis.Redis(port=port).ping(), 10, f"node {port}")
        path = f"{Path(redis_cli()).parent}:{os.environ['PATH']}"

        def init(nodes: list[int]) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "PATH": path, "CACHE_NODES": " ".join(f"127.0.0.1:{p}" for p in nodes)}
            script = cluster_init_script()
            return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)

        first = init(ports[:6])
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr
        roles = sorted(redis.Redis(port=port).execute_command("ROLE")[0] for port in ports[:6])
        assert roles == [b"master"] * 3 + [b"slave"] * 3
        for port in ports[:6]:
            policy = redis.Redis(port=port).config_get("maxmemory-policy")["maxmemory-policy"]
            assert policy == "allkeys-lru"
        cache = connect_cache(f"redis://127.0.0.1:{ports[5]}/0")
        try:
            assert type(cache).__name__ == "RedisCluster", "embq finds the whole cluster from any node"
            cache.set("embq:probe", "1")
            assert cache.get("embq:probe") == b"1"
        finally:
            cache.close()
        again = init(ports[:6])
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.strip() == "cache-init: the cluster is ok", "a cluster already formed is left as it is"
        stranger = init(ports)
        assert stranger.returncode == 1
        assert "1 of 7 nodes are outside the cluster" in stranger.stderr and " down, then up" in stranger.stderr
    finally:
        for process in processes:
            stop_process(process, grace=10)


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(steps: list[tuple[str, str]], name: str) -> list[str]:
    return [args for op, args in steps if op == name]


def test_cpu_dockerfile() -> None:
    steps = dockerfile("worker/Dockerfile.cpu")
    args = " ".join(instruction(steps, "ARG"))
    assert "python:3.11-slim" in args
    assert instruction(steps, "USER") == ["10001"]
    runs = instruction(steps, "RUN")
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    embq = next(i for i, r in enumerate(runs) if ".[cpu,flower]" in r)
    assert torch < embq, "torch from the CPU index first, or pip pulls the CUDA build"
    assert "useradd --uid 10001" in runs[embq]
    assert json.loads(instruction(steps, "ENTRYPOINT")[-1]) == ["embq", "worker", "--engine", "sentence-transformers"]
    assert json.loads(instruction(steps, "CMD")[-1]) == ["--model", CPU_MODEL]
    assert instruction(steps, "STOPSIGNAL") == ["SIGTERM"]


def test_gateway_dockerfile_is_light() -> None:
    steps = dockerfile("producer/gateway/Dockerfile")
    assert "python:3.11-slim" in " ".join(instruction(steps, "ARG"))
    runs = " ".join(instruction(steps, "RUN"))
    assert "'.[serve]'" in runs and "torch" not in runs and "[cpu" not in runs, "the producer side only"
    assert "useradd --uid 10001" in runs
    assert instruction(steps, "USER") == ["10001"]
    assert json.loads(instruction(steps, "ENTRYPOINT")[-1]) == ["embq", "serve", "--host", "0.0.0.0", "--port", "8000"]
    (health,) = instruction(steps, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health'" in health
    assert instruction(steps, "STOPSIGNAL") == ["SIGTERM"]


@pytest.mark.parametrize("path", ["worker/Dockerfile", "worker/Dockerfile.cpu"])
def test_dockerfile_health_is_the_ready_file(path: str) -> None:
    steps = dockerfile(path)
    env = " ".join(instruction(steps, "ENV"))
    assert f"EMBQ_READY_FILE={READY_FILE}" in env
    (health,) = instruction(steps, "HEALTHCHECK")
    assert health.endswith(f"CMD test -f {READY_FILE}")
    assert instruction(steps, "USER") == ["10001"], "the Kubernetes manifests run as uid 10001"


# --------------------------------------------------------------------------- Kubernetes


@functools.cache
def render(target: str) -> tuple[Doc, ...]:
    """What ``kubectl apply -k k8s/<target>`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: install kubectl 1.27 or newer (kustomize v5 is built in)", pytrace=False)
    result = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{result.stderr}"
    yaml = require("yaml", "pyyaml")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: Doc) -> Doc:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_ref(c: Doc, var: str) -> tuple[str, str]:
    ref = env_of(c)[var]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def quantity(value: str | int) -> float:
    """Kubernetes resource quantity (``16Gi``, ``500m``, ``2``) as a number."""
    if isinstance(value, int | float):
        return float(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert m and (m.group(2) in suffixes or not m.group(2)), f"not a quantity: {value!r}"
    return float(m.group(1)) * suffixes.get(m.group(2), 1)


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists its properties, as the API
    server's strict field validation does (it would otherwise prune them silently)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def keda_validators() -> dict[str, Any]:
    jsonschema = require("jsonschema", "jsonschema")
    validators = {}
    for kind, file in [
        ("ScaledObject", "keda-scaledobject.json"),
        ("TriggerAuthentication", "keda-triggerauthentication.json"),
    ]:
        schema = closed(json.loads((K8S / "schemas" / file).read_text()))
        validators[kind] = jsonschema.Draft202012Validator(schema)
    return validators


def validate(doc: Doc) -> None:
    """Built-in kinds against Kubernetes' schemas, KEDA's against its CRDs; unknown fields refused."""
    if doc["apiVersion"].startswith("keda.sh/"):
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        validator = keda_validators().get(doc["kind"])
        assert validator is not None, f"no schema for KEDA kind {doc['kind']}"
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: " + "; ".join(errors)
        return
    # Built-in kinds: kubernetes-validate's strict schemas, those `kubernetes-validate --strict` uses.
    kv = require("kubernetes_validate", "kubernetes-validate")
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        path = ".".join(map(str, e.path))
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}") from None
    except kv.SchemaNotFoundError:
        raise AssertionError(f"{doc['apiVersion']} {doc['kind']} is not a Kubernetes {K8S_VERSION} kind") from None


def worker_model(docs: tuple[Doc, ...]) -> str:
    args = container(find(docs, "Deployment", "embq-worker"))["args"]
    return args[args.index("--model") + 1]


def test_expected_overlays_exist() -> None:
    assert {"production", "scale-to-zero", "cpu-dev", "cluster-cache", "ha-redis"} <= set(OVERLAYS)
    assert CLUSTER_CACHE_OVERLAYS <= set(OVERLAYS)
    assert SENTINEL_BROKER_OVERLAYS <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    for doc in docs:
        validate(doc)
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    kinds = {d["kind"] for d in docs}
    # With both the cache and the broker from Helm charts, no StatefulSet is left to the manifests.
    both_charts = overlay in CLUSTER_CACHE_OVERLAYS and overlay in SENTINEL_BROKER_OVERLAYS
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert both_charts or "StatefulSet" in kinds
    assert {"ScaledObject", "TriggerAuthentication"} <= kinds


def test_validators_refuse_unknown_fields() -> None:
    """The validation above means something: a misspelt field fails, it is not dropped."""
    docs = render("overlays/production")
    deployment = copy.deepcopy(find(docs, "Deployment", "embq-worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 600
    with pytest.raises(AssertionError, match="terminationGracePeriod"):
        validate(deployment)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "embq-worker"))
    scaled["spec"]["minReplicas"] = 1
    with pytest.raises(AssertionError):
        validate(scaled)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "embq-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 32  # trigger metadata are strings
    with pytest.raises(AssertionError):
        validate(scaled)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pod(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    worker = find(docs, "Deployment", "embq-worker")
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    limits = c.get("resources", {}).get("limits", {})
    if overlay in CPU_OVERLAYS:
        assert "nvidia.com/gpu" not in json.dumps(pod), "a CPU pod must not wait for a GPU"
        assert worker_model(docs) == CPU_MODEL
    else:
        assert int(limits["nvidia.com/gpu"]) == 1, "one engine per GPU"
        assert worker_model(docs) == GPU_MODEL
        assert "embq-gpu" in c["image"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    if overlay not in CPU_OVERLAYS:
        assert quantity(shm["sizeLimit"]) >= 16 * GIB
        assert quantity(limits["memory"]) > quantity(shm["sizeLimit"]), "/dev/shm counts against the memory limit"

    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    pod_security = pod.get("securityContext", {})
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
    assert security.get("runAsUser", pod_security.get("runAsUser")) == 10001
    # The root filesystem is read-only: every path the worker writes is a volume.
    env = env_of(c)
    assert env["EMBQ_READY_FILE"]["value"] == READY_FILE
    assert "/tmp" in mounts
    assert env["HF_HOME"]["value"] in mounts

    probe = {"exec": {"command": ["test", "-f", READY_FILE]}}
    for name in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert c[name]["exec"] == probe["exec"], name
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load takes minutes"
    assert pod["terminationGracePeriodSeconds"] > 300, "warm shutdown finishes the batch in flight"
    assert pod.get("shareProcessNamespace") is True, "something must reap the engine's orphaned children"

    assert secret_ref(c, "EMBQ_BROKER_URL") == ("embq-redis", "broker-url")
    assert secret_ref(c, "EMBQ_CACHE_URL") == ("embq-redis", "cache-url")
    assert int(env["EMBQ_METRICS_PORT"]["value"]) == METRICS_PORT
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == METRICS_PORT
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT
    assert "replicas" not in worker["spec"], "KEDA owns the replica count; an apply must not reset it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_password_in_manifests(overlay: str) -> None:
    """Redis URLs and passwords come from Secrets; a generated dev Secret holds no password."""
    docs = render(f"overlays/{overlay}")
    for doc in docs:
        if doc["kind"] == "Secret":
            assert not doc.get("stringData")
            for key, value in doc.get("data", {}).items():
                if key.endswith("-password"):
                    assert value == "", f"{key} is written in a manifest"
            continue
        for text in re.findall(r"(?:rediss?|sentinel)://[^\s\"']*", json.dumps(doc)):
            assert "@" not in text, f"{doc['kind']}/{doc['metadata']['name']}: credentials in {text}"


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_variables_embq_reads(overlay: str) -> None:
    known = embq_env_names()
    for doc in render(f"overlays/{overlay}"):
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and node["name"].startswith("EMBQ_"):
                assert node["name"] in known, f"{node['name']} is read nowhere in producer/ or worker/"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    version = project_version()
    for doc in render(f"overlays/{overlay}"):
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("image"), str):
                assert_pinned(node["image"])
                name, tag = split_image(node["image"])
                if name.rsplit("/", 1)[-1].startswith("embq-"):
                    assert tag == version, f"{node['image']}: embq images carry the project version"
    if overlay == "production":
        worker = container(find(render(f"overlays/{overlay}"), "Deployment", "embq-worker"))
        assert "/" in split_image(worker["image"])[0], "production pulls from a registry"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_follows_the_queue(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    scaled = find(docs, "ScaledObject", "embq-worker")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    find(docs, "Deployment", target["name"])
    assert target["name"] == "embq-worker"

    trigger, bulk = spec["triggers"]
    scaler = "redis-sentinel" if overlay in SENTINEL_BROKER_OVERLAYS else "redis"
    assert trigger["type"] == bulk["type"] == scaler
    meta = trigger["metadata"]
    assert meta["listName"] == queue_name(worker_model(docs)), "KEDA must watch the lists the workers consume"
    assert bulk["metadata"]["listName"] == queue_name(worker_model(docs), lane=BULK)
    assert {k: v for k, v in bulk["metadata"].items() if k not in ("listName", "listLength")} == {
        k: v for k, v in meta.items() if k not in ("listName", "listLength")
    }
    assert bulk["authenticationRef"] == trigger["authenticationRef"]
    assert meta["databaseIndex"] == "0"
    assert int(meta["listLength"]) > 0
    if overlay in SENTINEL_BROKER_OVERLAYS:
        # The broker is the chart's, behind Sentinel: test_sentinel_trigger checks where KEDA asks.
        assert not [d for d in docs if d["metadata"]["name"] == "embq-broker" and d["kind"] != "TriggerAuthentication"]
    else:
        # KEDA connects from its own namespace: the broker's name must carry ours.
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"embq-broker.{NAMESPACE}.svc"
        broker = find(docs, "Service", "embq-broker")
        assert int(port) in [p["port"] for p in broker["spec"]["ports"]]

        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["name"], ref["key"]) == ("password", "embq-redis", "broker-password")
        assert secret_ref(container(find(docs, "StatefulSet", "embq-broker")), "REDIS_PASSWORD") == (
            "embq-redis",
            "broker-password",
        ), "KEDA authenticates with the password the broker requires"

    # KEDA's own bounds check: min <= max, and idle (when set) below min.
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    assert low <= high
    if "idleReplicaCount" in spec:
        assert spec["idleReplicaCount"] < low
    if overlay == "scale-to-zero":
        assert low == 0
    else:
        assert low >= 1
    if overlay == "production":
        assert high == 8


def test_base_renders_validates_and_keeps_one_worker() -> None:
    docs = render("base")
    for doc in docs:
        validate(doc)
    assert find(docs, "ScaledObject", "embq-worker")["spec"]["minReplicaCount"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    workloads = []
    if overlay in SENTINEL_BROKER_OVERLAYS:
        # The broker is the chart's (test_sentinel_broker_values checks noeviction and the
        # append-only file there): the one broker Redis must be gone, or tasks would split.
        assert not [d for d in docs if d["metadata"]["name"] == "embq-broker" and d["kind"] != "TriggerAuthentication"]
    else:
        broker = find(docs, "StatefulSet", "embq-broker")
        args = container(broker)["args"]
        assert args[0] == "redis-server", "args, not command: the image's entrypoint still runs"
        assert option(args[1:], "maxmemory-policy") == "noeviction"
        assert option(args[1:], "appendonly") == "yes"
        (claim,) = broker["spec"]["volumeClaimTemplates"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container(broker)["volumeMounts"]
        workloads.append(("embq-broker", broker))
    if overlay in CLUSTER_CACHE_OVERLAYS:
        # The cache is the chart's Redis Cluster, installed with Helm (test_cluster_cache_values):
        # the one cache Redis must be gone, or two caches would each miss the other's vectors.
        assert not [d for d in docs if d["metadata"]["name"] == "embq-cache"]
    else:
        cache = find(docs, "StatefulSet", "embq-cache")
        args = container(cache)["args"]
        assert option(args[1:], "maxmemory-policy") == "allkeys-lru"
        assert byte_value(option(args[1:], "maxmemory")) > 0
        assert option(args[1:], "save") == ""
        assert option(args[1:], "appendonly") == "no"
        assert "volumeClaimTemplates" not in cache["spec"]
        workloads.append(("embq-cache", cache))

    for name, workload in workloads:
        svc = find(docs, "Service", name)
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(workload))
        assert [p["port"] for p in svc["spec"]["ports"]] == [6379]
        assert workload["spec"]["serviceName"] == name
        c = container(workload)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "redis-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_only_embq_reach_redis(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    worker = pod_labels(find(docs, "Deployment", "embq-worker"))
    flower = pod_labels(find(docs, "Deployment", "embq-flower"))
    gateway = pod_labels(find(docs, "Deployment", "embq-gateway"))
    producer = {"embq.io/producer": "true"}
    stranger = {"app": "something-else"}
    if overlay in SENTINEL_BROKER_OVERLAYS:
        # Neither Redis of the base is left: the chart's pods have their own policies
        # (test_sentinel_broker_network_policy, test_cluster_cache_network_policy), and these two,
        # which selected only the base's pods, are gone rather than left selecting nothing.
        names = {d["metadata"]["name"] for d in of_kind(docs, "NetworkPolicy")}
        assert not names & {"embq-redis", "embq-broker-keda"}
        return
    # A cluster overlay's cache pods are the chart's, under their own policy
    # (test_cluster_cache_network_policy): this one keeps the broker.
    names = ("embq-broker",) if overlay in CLUSTER_CACHE_OVERLAYS else ("embq-broker", "embq-cache")
    redis = {name: pod_labels(find(docs, "StatefulSet", name)) for name in names}

    policy = find(docs, "NetworkPolicy", "embq-redis")
    spec = policy["spec"]
    assert all(selects(spec["podSelector"], labels) for labels in redis.values())
    assert not selects(spec["podSelector"], worker)
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", 6379)]
    peers = rule["from"]
    assert all(set(p) == {"podSelector"} for p in peers), "same-namespace pods only"
    assert [p["podSelector"] for p in peers] == [
        {"matchLabels": {"app": "embq-worker"}},
        {"matchLabels": producer},
        {"matchLabels": {"app": "embq-flower"}},
        {"matchLabels": {"app": "embq-gateway"}},
    ]
    for labels in (worker, flower, producer, gateway):
        assert any(selects(p["podSelector"], labels) for p in peers)
    assert not any(selects(p["podSelector"], stranger) for p in peers)

    # Every other policy on the Redis pods lets only KEDA's operator reach the broker.
    for other in of_kind(docs, "NetworkPolicy"):
        selector = other["spec"]["podSelector"]
        if other is policy or not any(selects(selector, labels) for labels in redis.values()):
            continue
        assert not selects(selector, redis.get("embq-cache", {"app": "embq-cache"}))
        assert selects(selector, redis["embq-broker"])
        for extra in other["spec"]["ingress"]:
            for peer in extra["from"]:
                assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}
                assert peer["podSelector"] == {"matchLabels": {"app": "keda-operator"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    pdb = find(docs, "PodDisruptionBudget", "embq-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selects(pdb["spec"]["selector"], pod_labels(find(docs, "Deployment", "embq-worker")))
    for other in of_kind(docs, "PodDisruptionBudget"):
        if other is not pdb:
            assert not selects(other["spec"]["selector"], pod_labels(find(docs, "Deployment", "embq-worker")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flower(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    flower = find(docs, "Deployment", "embq-flower")
    c = container(flower)
    assert c["command"] == ["embq", "flower", "--address", "0.0.0.0"]
    assert "args" not in c
    assert secret_ref(c, "FLOWER_BASIC_AUTH") == ("embq-flower", "basic-auth")
    assert secret_ref(c, "EMBQ_BROKER_URL") == ("embq-redis", "broker-url")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 5555
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthcheck"
    assert probe["port"] in ("http", 5555)
    svc = find(docs, "Service", "embq-flower")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(flower))
    assert [p["port"] for p in svc["spec"]["ports"]] == [5555]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    gateway = find(docs, "Deployment", "embq-gateway")
    assert "replicas" not in gateway["spec"], "the autoscaler owns the replica count"
    pod = gateway["spec"]["template"]["spec"]
    c = container(gateway)
    assert "embq-gateway" in c["image"]
    assert "nvidia.com/gpu" not in json.dumps(pod), "the gateway needs no GPU"
    args = c["args"]
    assert args[args.index("--model") + 1] == worker_model(docs), "the workers' model stays served while none is up"
    assert secret_ref(c, "EMBQ_API_KEYS") == ("embq-gateway", "api-keys")
    assert secret_ref(c, "EMBQ_BROKER_URL") == ("embq-redis", "broker-url")
    assert secret_ref(c, "EMBQ_CACHE_URL") == ("embq-redis", "cache-url")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live", "a Redis outage must not restart gateways"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    timeout = float(env_of(c)["EMBQ_REQUEST_TIMEOUT"]["value"])
    assert pod["terminationGracePeriodSeconds"] > timeout, "requests in flight finish on SIGTERM"
    assert "cpu" in c["resources"]["requests"], "the autoscaler's utilization is relative to the CPU request"
    assert "cpu" not in c["resources"].get("limits", {})
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"

    svc = find(docs, "Service", "embq-gateway")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(gateway))
    assert [p["port"] for p in svc["spec"]["ports"]] == [8000]

    hpa = find(docs, "HorizontalPodAutoscaler", "embq-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "embq-gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "production":
        assert hpa["spec"]["minReplicas"] >= 2, "one replica down must not take the API down"
    pdb = find(docs, "PodDisruptionBudget", "embq-gateway")
    assert selects(pdb["spec"]["selector"], pod_labels(gateway))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_clients_reach_the_gateway(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    gateway = pod_labels(find(docs, "Deployment", "embq-gateway"))
    policy = find(docs, "NetworkPolicy", "embq-gateway")
    spec = policy["spec"]
    assert selects(spec["podSelector"], gateway)
    for other in ("embq-worker", "embq-flower"):
        assert not selects(spec["podSelector"], pod_labels(find(docs, "Deployment", other)))
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", 8000)]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {}, "clients in any namespace"
    client = {"embq.io/client": "true"}
    assert selects(peer["podSelector"], client)
    assert not selects(peer["podSelector"], {"app": "something-else"})


# --------------------------------------------------------------------------- Kubernetes: the cache on a Redis Cluster


def redis_conf(text: str) -> dict[str, str]:
    """``directive value`` lines of a redis.conf fragment (the last one wins, as in Redis)."""
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {words[0].lower(): words[1].strip() if len(words) > 1 else "" for words in lines}


def helm_installs(text: str, chart: str = "redis-cluster") -> list[list[str]]:
    """The words of each ``helm install`` of the chart (redis-cluster unless told) in a file,
    continuation lines (and their comment marks) joined."""
    text = re.sub(r"\\\n\s*#?", " ", text)
    commands = [line.split("#", 1)[0].split() for line in re.findall(r"helm install [^\n]*", text)]
    return [words for words in commands if any(word.endswith(f"/{chart}") for word in words)]


def word_after(words: list[str], flag: str) -> str:
    assert flag in words, f"no {flag} in {' '.join(words)}"
    return words[words.index(flag) + 1]


# ha-redis builds on cluster-cache and changes the broker too: test_ha_redis_overlay_is_cluster_cache_with_sentinel.
@pytest.mark.parametrize("overlay", sorted(CLUSTER_CACHE_OVERLAYS - SENTINEL_BROKER_OVERLAYS))
def test_cluster_cache_overlay_is_production_without_the_one_cache(overlay: str) -> None:
    """Workers, gateway, Flower, KEDA: production's, unchanged; embq finds the cluster from the URL alone."""
    ours = {(d["kind"], d["metadata"]["name"]): d for d in render(f"overlays/{overlay}")}
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in render("overlays/production")}
    assert set(theirs) - set(ours) == {("StatefulSet", "embq-cache"), ("Service", "embq-cache")}
    assert set(ours) - set(theirs) == {("NetworkPolicy", "embq-cache-cluster")}
    assert {key for key in ours.keys() & theirs.keys() if ours[key] != theirs[key]} == {("NetworkPolicy", "embq-redis")}


@pytest.mark.parametrize("overlay", sorted(CLUSTER_CACHE_OVERLAYS))
def test_cluster_cache_network_policy(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    policy = find(docs, "NetworkPolicy", "embq-cache-cluster")
    spec = policy["spec"]
    assert selects(spec["podSelector"], {**CLUSTER_POD_LABELS, "helm.sh/chart": "redis-cluster-13.0.5"})
    for workload in [*of_kind(docs, "Deployment"), *of_kind(docs, "StatefulSet")]:
        assert not selects(spec["podSelector"], pod_labels(workload)), workload["metadata"]["name"]
    for other in of_kind(docs, "NetworkPolicy"):
        if other is not policy:
            assert not selects(other["spec"]["podSelector"], CLUSTER_POD_LABELS), "one policy guards the cluster"
    assert spec["policyTypes"] == ["Ingress"]
    clients, nodes = spec["ingress"]

    # embq's pods that read EMBQ_CACHE_URL, and producers, on the Redis port only.
    assert [(p.get("protocol", "TCP"), p["port"]) for p in clients["ports"]] == [("TCP", REDIS_PORT)]
    peers = clients["from"]
    assert all(set(p) == {"podSelector"} for p in peers), "same-namespace pods only"
    readers = [d for d in of_kind(docs, "Deployment") if "EMBQ_CACHE_URL" in env_of(container(d))]
    assert {d["metadata"]["name"] for d in readers} == {"embq-worker", "embq-gateway"}
    for labels in [*(pod_labels(d) for d in readers), {"embq.io/producer": "true"}]:
        assert any(selects(p["podSelector"], labels) for p in peers), labels
    flower = pod_labels(find(docs, "Deployment", "embq-flower"))
    assert not any(selects(p["podSelector"], flower) for p in peers), "Flower reads only the broker"
    assert not any(selects(p["podSelector"], {"app": "something-else"}) for p in peers)

    # The nodes with each other: replication and redirections on the Redis port, the cluster bus.
    assert nodes["from"] == [{"podSelector": {"matchLabels": CLUSTER_POD_LABELS}}]
    assert sorted((p.get("protocol", "TCP"), p["port"]) for p in nodes["ports"]) == [
        ("TCP", REDIS_PORT),
        ("TCP", CLUSTER_BUS_PORT),
    ]


def test_cluster_cache_values() -> None:
    """The chart's values: 3 masters with a replica each, the password of the Secret's cache-url, and on
    every node a bounded LRU cache that writes nothing but its place in the cluster to disk."""
    values = load_yaml(CLUSTER_VALUES)
    cluster = values["cluster"]
    assert (cluster["nodes"], cluster["replicas"]) == (6, 1)
    assert cluster["nodes"] // (1 + cluster["replicas"]) >= 3, "a cluster needs 3 masters to fail one over"

    assert values["usePassword"] is True and "password" not in values, "no password in the values"
    assert (values["existingSecret"], values["existingSecretPasswordKey"]) == ("embq-redis", "cache-password")

    redis = values["redis"]
    conf = redis_conf(redis["configmap"])
    assert conf["maxmemory-policy"] == "allkeys-lru"
    maxmemory = byte_value(conf["maxmemory"])
    resources = redis["resources"]
    limit = quantity(resources["limits"]["memory"])
    assert 0 < maxmemory <= 0.8 * limit, "room for Redis' overhead and a resync's fork"
    assert quantity(resources["requests"]["memory"]) == limit
    assert conf["save"] == '""' and conf["appendonly"] == "no", "a cache writes no snapshot, no append-only file"
    assert redis["useAOFPersistence"] == "no", "the image's own switch, a string: the chart passes it as is"
    assert {"name": "REDIS_RDB_POLICY_DISABLED", "value": "yes"} in redis["extraEnvVars"]
    assert 2 * int(conf["cluster-node-timeout"]) / 1000 < FAILOVER_WAIT, "a replica serves within embq's retries"
    assert conf["cluster-replica-validity-factor"] == "0"
    assert "cluster-enabled" not in conf, "the chart's image sets it"

    persistence = values["persistence"]
    assert persistence["enabled"] is True, "nodes.conf: a replaced pod must come back as the same node"
    assert quantity(persistence["size"]) >= maxmemory, "a replica lands a full resync on disk before loading it"
    assert values["networkPolicy"]["enabled"] is False, "the chart's policy admits every pod, and policies add up"


def test_cluster_cache_install_is_documented_alike() -> None:
    """One helm command, the same in the overlay, the values and k8s/README.md: the release that names the
    Service of cache-url and the pods' labels, a pinned chart version, this values file."""
    files = [K8S / "README.md", CLUSTER_VALUES, K8S / "overlays" / "cluster-cache" / "kustomization.yaml"]
    commands = {path.name: helm_installs(path.read_text()) for path in files}
    for name, found in commands.items():
        assert len(found) == 1, f"{name}: {found}"
    (readme,) = commands["README.md"]
    assert readme[2] == CLUSTER_RELEASE
    assert readme[3] == "oci://registry-1.docker.io/bitnamicharts/redis-cluster"
    assert re.fullmatch(r"\d+\.\d+\.\d+", word_after(readme, "--version")), "pin the chart's version"
    assert word_after(readme, "-n") == NAMESPACE
    assert (ROOT / word_after(readme, "-f")).resolve() == CLUSTER_VALUES
    assert all(found == [readme] for found in commands.values()), commands
    text = (K8S / "README.md").read_text()
    assert f'cache-url="redis://:$CACHE_PASSWORD@{CLUSTER_SERVICE}:{REDIS_PORT}/0"' in text


# --------------------------------------------------------------------------- Kubernetes: the broker behind Sentinel


@pytest.mark.parametrize("overlay", sorted(SENTINEL_BROKER_OVERLAYS))
def test_ha_redis_overlay_is_cluster_cache_with_sentinel(overlay: str) -> None:
    """Workers, gateway, Flower, the cache's policy: cluster-cache's, unchanged; the broker's objects go."""
    ours = {(d["kind"], d["metadata"]["name"]): d for d in render(f"overlays/{overlay}")}
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in render("overlays/cluster-cache")}
    assert set(theirs) - set(ours) == {
        ("StatefulSet", "embq-broker"),
        ("Service", "embq-broker"),
        ("NetworkPolicy", "embq-redis"),
        ("NetworkPolicy", "embq-broker-keda"),
    }
    assert set(ours) - set(theirs) == {("NetworkPolicy", "embq-broker-sentinel")}
    changed = {key for key in ours.keys() & theirs.keys() if ours[key] != theirs[key]}
    assert changed == {("ScaledObject", "embq-worker"), ("TriggerAuthentication", "embq-broker")}
    ours_spec = {k: v for k, v in ours[("ScaledObject", "embq-worker")]["spec"].items() if k != "triggers"}
    theirs_spec = {k: v for k, v in theirs[("ScaledObject", "embq-worker")]["spec"].items() if k != "triggers"}
    assert ours_spec == theirs_spec, "only the triggers change: bounds and scale-down stay production's"


@pytest.mark.parametrize("overlay", sorted(SENTINEL_BROKER_OVERLAYS))
def test_sentinel_trigger(overlay: str) -> None:
    """KEDA asks the chart's sentinels, by names carrying our namespace, for the master the values name,
    with the Secret's broker password for both the master and the sentinels."""
    docs = render(f"overlays/{overlay}")
    base = find(render("base"), "ScaledObject", "embq-worker")["spec"]["triggers"]
    triggers = find(docs, "ScaledObject", "embq-worker")["spec"]["triggers"]
    assert [(t["metadata"]["listName"], t["metadata"]["listLength"]) for t in triggers] == [
        (t["metadata"]["listName"], t["metadata"]["listLength"]) for t in base
    ], "both lanes' lists, as base/keda.yaml has them"
    values = load_yaml(SENTINEL_VALUES)
    nodes = values["replica"]["replicaCount"]
    headless = f"{SENTINEL_RELEASE}-redis-headless.{NAMESPACE}.svc"
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-sentinel"
        assert set(meta) == {"addresses", "sentinelMaster", "listName", "listLength", "databaseIndex"}
        assert meta["sentinelMaster"] == values["sentinel"]["masterSet"] == SENTINEL_MASTER
        assert meta["addresses"].split(",") == [
            f"{SENTINEL_RELEASE}-redis-node-{i}.{headless}:{SENTINEL_PORT}" for i in range(nodes)
        ], "every sentinel, by the chart's pod names"
        assert meta["databaseIndex"] == "0"
    auth = find(docs, "TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    refs = {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        ("password", "embq-redis", "broker-password"),
        ("sentinelPassword", "embq-redis", "broker-password"),
    }
    assert (values["auth"]["existingSecret"], values["auth"]["existingSecretPasswordKey"]) == (
        "embq-redis",
        "broker-password",
    ), "KEDA authenticates with the password the chart gives the master"
    assert values["auth"]["sentinel"] is True, "and the sentinels"


@pytest.mark.parametrize("overlay", sorted(SENTINEL_BROKER_OVERLAYS))
def test_sentinel_broker_network_policy(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    policy = find(docs, "NetworkPolicy", "embq-broker-sentinel")
    spec = policy["spec"]
    assert selects(spec["podSelector"], {**SENTINEL_POD_LABELS, "app.kubernetes.io/component": "node"})
    for workload in [*of_kind(docs, "Deployment"), *of_kind(docs, "StatefulSet")]:
        assert not selects(spec["podSelector"], pod_labels(workload)), workload["metadata"]["name"]
    assert not selects(spec["podSelector"], CLUSTER_POD_LABELS), "the cache cluster keeps its own policy"
    for other in of_kind(docs, "NetworkPolicy"):
        if other is not policy:
            assert not selects(other["spec"]["podSelector"], SENTINEL_POD_LABELS), "one policy guards the broker"
    assert spec["policyTypes"] == ["Ingress"]
    clients, keda, nodes = spec["ingress"]
    both = [("TCP", REDIS_PORT), ("TCP", SENTINEL_PORT)]
    for rule in (clients, keda, nodes):
        assert sorted((p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]) == both

    peers = clients["from"]
    assert all(set(p) == {"podSelector"} for p in peers), "same-namespace pods only"
    readers = [d for d in of_kind(docs, "Deployment") if "EMBQ_BROKER_URL" in env_of(container(d))]
    assert {d["metadata"]["name"] for d in readers} == {"embq-worker", "embq-gateway", "embq-flower"}
    for labels in [*(pod_labels(d) for d in readers), {"embq.io/producer": "true"}]:
        assert any(selects(p["podSelector"], labels) for p in peers), labels
    assert not any(selects(p["podSelector"], {"app": "something-else"}) for p in peers)

    assert keda["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
            "podSelector": {"matchLabels": {"app": "keda-operator"}},
        }
    ]
    assert nodes["from"] == [{"podSelector": {"matchLabels": SENTINEL_POD_LABELS}}]


def test_sentinel_broker_values() -> None:
    """The chart's values: 1 master + 2 replicas with a sentinel each, the password of the Secret's
    broker-url, and on every node the broker's rules: never evict, keep an append-only file."""
    values = load_yaml(SENTINEL_VALUES)
    assert values["architecture"] == "replication"
    sentinel = values["sentinel"]
    assert sentinel["enabled"] is True and sentinel["masterSet"] == SENTINEL_MASTER
    nodes = values["replica"]["replicaCount"]
    assert nodes == 3, "with Sentinel the chart's replicaCount counts every node, the master among them"
    assert nodes // 2 < sentinel["quorum"] <= nodes, "a majority of the sentinels decides"
    assert 2 * sentinel["downAfterMilliseconds"] / 1000 < FAILOVER_WAIT
    auth = values["auth"]
    assert auth["enabled"] is True and "password" not in auth, "no password in the values"
    conf = redis_conf(values["commonConfiguration"])
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["appendonly"] == "yes"
    replica = values["replica"]
    limit = quantity(replica["resources"]["limits"]["memory"])
    assert 0 < byte_value(conf["maxmemory"]) <= 0.5 * limit, "an append-only rewrite or a resync forks"
    assert replica["persistence"]["enabled"] is True, "the append-only file outlives the pod"
    assert values["networkPolicy"]["enabled"] is False, "the chart's policy admits every pod, and policies add up"


def test_sentinel_broker_install_is_documented_alike() -> None:
    files = [K8S / "README.md", SENTINEL_VALUES, K8S / "overlays" / "ha-redis" / "kustomization.yaml"]
    commands = {path.name: helm_installs(path.read_text(), chart="redis") for path in files}
    for name, found in commands.items():
        assert len(found) == 1, f"{name}: {found}"
    (readme,) = commands["README.md"]
    assert readme[2] == SENTINEL_RELEASE
    assert readme[3] == "oci://registry-1.docker.io/bitnamicharts/redis"
    assert re.fullmatch(r"\d+\.\d+\.\d+", word_after(readme, "--version")), "pin the chart's version"
    assert word_after(readme, "-n") == NAMESPACE
    assert (ROOT / word_after(readme, "-f")).resolve() == SENTINEL_VALUES
    assert all(found == [readme] for found in commands.values()), commands


def test_sentinel_broker_url_is_documented_in_embq_form() -> None:
    """The broker-url k8s/README.md gives: embq's parser reads the chart's sentinels and master from it."""
    from embq.producer.sentinel import parse

    text = (K8S / "README.md").read_text()
    urls = set(re.findall(r"sentinel://[^\s\"']*", text))
    assert urls, "k8s/README.md gives the Sentinel broker-url"
    headless = f"{SENTINEL_RELEASE}-redis-headless.{NAMESPACE}.svc"
    for url in urls:
        found = parse(url.replace("$BROKER_PASSWORD", "secret"))
        assert found.master == SENTINEL_MASTER and found.db == 0
        assert found.sentinels == [(f"{SENTINEL_RELEASE}-redis-node-{i}.{headless}", SENTINEL_PORT) for i in range(3)]
        assert found.password == found.sentinel_password == "secret"


# --------------------------------------------------------------------------- compose: the broker behind Sentinel


@functools.cache
def sentinel_compose() -> Doc:
    return load_yaml(SENTINEL_COMPOSE)


def sentinel_nodes() -> dict[str, Doc]:
    return {n: s for n, s in sentinel_compose()["services"].items() if re.fullmatch(r"sentinel-\d+", n)}


def sentinel_script(svc: Doc) -> str:
    command = svc["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    assert "$" not in command[2].replace("$$", ""), "Compose would interpolate a lone $ before the shell sees it"
    return command[2].replace("$$", "$")


def test_compose_sentinel_brokers_keep_the_queue() -> None:
    services = sentinel_compose()["services"]
    for name in ("broker", "broker-replica"):
        svc = {**compose()["services"].get(name, {}), **services[name]}
        assert svc["image"] == service("broker")["image"]
        args = redis_args(svc)
        assert option(args, "maxmemory-policy") == "noeviction", f"{name}: a replica promoted keeps the rule"
        assert option(args, "appendonly") == "yes"
        assert any(str(v).endswith(":/data") for v in svc["volumes"]), f"{name}: the append-only file needs a volume"
        assert option(args, "replica-announce-ip") == name, "the sentinels hand out names every container resolves"
    assert option(redis_args(services["broker-replica"]), "replicaof") == f"broker {REDIS_PORT}"
    assert "replicaof" not in " ".join(redis_args(services["broker"])), "the broker starts as the master"


def test_compose_sentinels_watch_the_broker() -> None:
    nodes = sentinel_nodes()
    assert len(nodes) == 3, "a majority survives one sentinel lost"
    for svc in nodes.values():
        assert svc["image"] == service("broker")["image"]
        script = sentinel_script(svc)
        assert f"sentinel monitor {SENTINEL_MASTER} broker {REDIS_PORT} 2" in script
        assert "sentinel resolve-hostnames yes" in script and "sentinel announce-hostnames yes" in script
        # Sentinel rewrites its config file (the master it follows after a failover): a writable
        # one, generated once in the container's volume and kept across restarts.
        assert "[ -f /data/sentinel.conf ] ||" in script
        assert script.rstrip().endswith("exec docker-entrypoint.sh redis-server /data/sentinel.conf --sentinel")
        assert f"redis-cli -p {SENTINEL_PORT} ping" in " ".join(svc["healthcheck"]["test"])
        assert svc["depends_on"]["broker"]["condition"] == "service_healthy"
        assert "ports" not in svc, "sentinels hand out container names the host cannot resolve"


def test_compose_sentinel_points_embq_at_the_sentinels() -> None:
    from embq.producer.sentinel import parse

    services = sentinel_compose()["services"]
    readers = {n for n, s in compose()["services"].items() if "EMBQ_BROKER_URL" in s.get("environment", {})}
    assert readers
    for name in sorted(readers):
        assert name in services, f"{name} reads the broker: the override must point it at the sentinels"
        svc = services[name]
        assert set(svc) == {"environment", "depends_on"}, f"{name}: the override changes only the broker"
        found = parse(svc["environment"]["EMBQ_BROKER_URL"])
        assert found.master == SENTINEL_MASTER and found.db == 0
        assert found.sentinels == [(n, SENTINEL_PORT) for n in sentinel_nodes()]
        for sentinel in sentinel_nodes():
            assert svc["depends_on"][sentinel]["condition"] == "service_healthy"


def test_compose_sentinel_images_are_pinned() -> None:
    for name, svc in sentinel_compose()["services"].items():
        if "image" in svc:
            assert_pinned(svc["image"])
        else:
            assert name in compose()["services"], f"{name}: name the image, or compose tags it latest"


def test_compose_sentinel_sets_only_variables_embq_reads() -> None:
    known = embq_env_names()
    for name, svc in sentinel_compose()["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("EMBQ_"):
                assert var in known, f"{name}: {var} is read nowhere in producer/ or worker/"
