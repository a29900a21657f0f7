"""The SGLang test environment: a virtualenv with sglang 0.5.23 layered over the project's own.

``python -m tests.sglang_cpu.environment`` builds ``.venv-sglang`` at the root
of the checkout (again only when ``requirements.txt`` or this environment's
base changed). Its own site-packages hold sglang (``--no-deps``) and the pinned
modules of ``requirements.txt``; a ``.pth`` then adds the site-packages of the
interpreter that built it, so torch (the CPU build), Celery, Redis and embq
itself come from the project's environment and are never installed twice. A
second ``.pth`` installs ``torchvision_unavailable``, because PyPI's
torchvision links CUDA libraries that the CPU torch does not have.

Worker processes of the SGLang tests run with this environment's Python.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENV = ROOT / ".venv-sglang"
REQUIREMENTS = HERE / "requirements.txt"
HOOK = HERE / "torchvision_unavailable.py"
STAMP = ENV / "embq-environment.sha256"


def python() -> Path:
    return ENV / "bin" / "python"


def fingerprint() -> str:
    base = sysconfig.get_paths()["purelib"]
    parts = [REQUIREMENTS.read_bytes(), HOOK.read_bytes(), base.encode(), importlib.metadata.version("torch").encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages"))
    if not found:
        raise RuntimeError(f"no site-packages in {env}")
    return found[0]


def pip(*args: str) -> None:
    """pip's own output only when it fails: it lists every unmet requirement of sglang's, on purpose unmet."""
    command = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"failed: {' '.join(command)}")


def build(force: bool = False) -> Path:
    """The environment's Python, built or rebuilt when needed."""
    wanted = fingerprint()
    if not force and STAMP.exists() and STAMP.read_text() == wanted and python().exists():
        return python()
    if ENV.exists():
        shutil.rmtree(ENV)
    print(f"building the SGLang test environment in {ENV} (a few minutes, once)", file=sys.stderr)
    venv.create(ENV, with_pip=True)
    site = site_packages(ENV)
    base = sysconfig.get_paths()["purelib"]
    (site / "embq_base.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    shutil.copy(HOOK, site / HOOK.name)
    (site / "embq_torchvision.pth").write_text("import torchvision_unavailable; torchvision_unavailable.install()\n")
    requirements = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    sglang = next(r for r in requirements if r.startswith("sglang=="))
    pip("--no-deps", sglang)
    constraints = ENV / "constraints.txt"
    constraints.write_text(f"torch=={importlib.metadata.version('torch')}\n")
    pip("-c", str(constraints), *[r for r in requirements if r and r != sglang])
    subprocess.run(
        [str(python()), "-W", "ignore", "-c", "import sglang.srt.entrypoints.engine, tests.sglang_cpu.engine"],
        cwd=ROOT,
        check=True,
    )
    STAMP.write_text(wanted)
    return python()


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
