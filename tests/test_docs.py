"""The README and docs/ as a reader uses them: the service quickstart runs as written, every Python block
compiles and imports what it names, every ``embq`` and ``python -m`` command in a shell block parses.

Commands that need what this machine lacks (docker, kubectl, helm, a GPU) are checked where the deployment
tests check their files (tests/test_deploy.py), not here."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embq.worker.cli import build_parser
from embq.worker.local import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def blocks(language: str) -> list[tuple[Path, str]]:
    return [(page, m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text()) if m.group(1) == language]


def commands(block: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments and prompts dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.append(line)
    return found


def quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run it as a service") :]
    return commands(FENCE.search(section).group(2))  # type: ignore[union-attr]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@pytest.mark.model
def test_the_service_quickstart_works_as_written(tmp_path: Path) -> None:
    """Line by line as a reader types them (each ``&`` server waited for before the next line), on free ports;
    the install line is what this environment already did."""
    ports = {"6379": str(free_port()), "8000": str(free_port())}
    lines = quickstart()
    assert lines[0].startswith("pip install") and "serve" in lines[0]
    script = ["set -e"]
    for line in lines[1:]:
        for default, port in ports.items():
            line = line.replace(f"--port {default}", f"--port {port}").replace(f":{default}", f":{port}")
        script.append(line)
        server = re.search(r"embq (?:redis|serve) .*--port (\d+) .*&", line)
        if server:
            script.append(f"{sys.executable} -c 'import tests.test_docs as t; t.wait_for_port({server[1]}, 120)'")
    env = {**os.environ, "EMBQ_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("EMBQ_REDIS_URL", "EMBQ_BROKER_URL", "EMBQ_CACHE_URL", "EMBQ_API_KEYS"):
        env.pop(name, None)
    process = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the last line left behind
        except ProcessLookupError:
            pass
    assert process.returncode == 0, out[-4000:]
    assert "\n384\n" in f"\n{out}", out[-4000:]
    assert "sentence-transformers/all-MiniLM-L6-v2" in out  # embq status's model row


def test_every_python_block_compiles_and_imports_what_it_names() -> None:
    python = blocks("python")
    assert python
    for page, code in python:
        compile(code, f"{page.name} block", "exec")
        for module, names in re.findall(r"^\s*from (embq[\w.]*) import \(?([\w, ]+)", code, re.M):
            imported = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",") if n.strip()):
                assert hasattr(imported, name), f"{page.name}: {module} has no {name}"


def shell_commands() -> list[tuple[Path, str]]:
    return [(page, line) for page, block in blocks("bash") + blocks("sh") for line in commands(block)]


def embq_invocations(line: str) -> list[list[str]]:
    """The argument lists of every ``embq ...`` in a command line (after env assignments, in && chains)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    found, words = [], []
    for token in [*lexer, ";"]:
        if token and set(token) <= set("&|;()<>"):  # a control operator ends a command
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words[:1] == ["embq"]:
                found.append(words[1:])
            words = []
        else:
            words.append(token)
    return found


def test_every_embq_command_in_the_docs_parses() -> None:
    parser = build_parser()
    seen = 0
    for page, line in shell_commands():
        for args in embq_invocations(line):
            seen += 1
            try:
                parser.parse_args(args)
            except SystemExit as e:
                if e.code != 0:  # --help and --version exit 0
                    raise AssertionError(f"{page.name}: `embq {' '.join(args)}` does not parse") from None
    assert seen >= 10


def test_every_python_module_the_docs_run_exists() -> None:
    """``python -m X`` anywhere in the docs, in code blocks or inline."""
    seen = 0
    for page in PAGES:
        for module in re.findall(r"python3? -m ([\w.]+)", page.read_text()):
            if module in {"venv", "pip", "pytest", "celery"}:
                continue
            seen += 1
            assert importlib.util.find_spec(module) is not None, f"{page.name}: python -m {module}"
    assert seen >= 3


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (those outside code blocks)."""
    text = FENCE.sub("", page.read_text())
    found = set()
    for heading in re.findall(r"^#+ +(.+?) *$", text, re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


def test_every_link_in_the_docs_leads_somewhere() -> None:
    """Relative links name a file that exists and, after ``#``, a heading of that file."""
    broken = []
    for page in [*PAGES, ROOT / "k8s" / "README.md"]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
