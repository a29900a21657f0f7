"""The distribution as a user installs it: one import root, ``embq``, and a light client side."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("embq-*.whl")
    yield built


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"embq"}
    assert {"embq/__init__.py", "embq/producer/client.py", "embq/worker/cli.py"} <= set(names)
    assert "embq/worker/engines/hash.py" in names and "embq/producer/gateway/app.py" in names
    (top_level,) = (n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["embq"]


def test_installed_embq_imports_without_torch_and_runs_its_command(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import sys, embq\n"
        "from embq import EmbeddingClient, AsyncEmbeddingClient, InvalidInputError\n"
        "assert embq.__file__.startswith(sys.argv[1]), embq.__file__\n"
        "assert 'torch' not in sys.modules and 'embq.worker' not in sys.modules, 'the client side stays light'\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('producer') is None and importlib.util.find_spec('worker') is None\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", probe, str(target)], env=env, cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    version = subprocess.run([sys.executable, "-m", "embq", "--version"], env=env, cwd=tmp_path, capture_output=True)
    assert version.returncode == 0, version.stderr.decode()
    assert version.stdout.decode().startswith("embq ")
