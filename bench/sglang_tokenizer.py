"""CPU per text in a worker's own process around the real SGLang engine: hosted in the worker's process,
or in a host process of its own (the worker's way, ``embq.worker.engines.sglang_host``).

Run with the SGLang test environment (``python -m tests.sglang_cpu.environment``
builds it): ``.venv-sglang/bin/python -m bench.sglang_tokenizer``. Both ways run
the real ``sglang.Engine`` with the CPU scheduler of ``tests/sglang_cpu``; ``psutil``
measures the CPU time of this process alone (on a GPU machine, the process that
also runs the queue), of the host process when there is one (SGLang's tokenizer
manager), and of SGLang's scheduler and detokenizer (here the forward pass on
the CPU, which is not the point).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from bench.texts import make_texts
from embq.worker.engines.sglang import SGLangEngine
from embq.worker.engines.sglang_host import SGLangHostEngine
from tests.sglang_cpu.model import build_model

ENGINE_CLASS = "tests.sglang_cpu.engine:CpuSchedulerEngine"
#: What SGLang's scheduler and detokenizer processes are named (``sglang::scheduler``, ...).
SGLANG_CHILDREN = ("schedul", "detoken")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(model: Path, texts: list[str], batch: int, fronts: int) -> tuple[float, float, float, float]:
    """(µs of CPU per text of this process, of SGLang's front ends, of SGLang's scheduler and detokenizer;
    texts/s). ``fronts`` 0 hosts SGLang in this process; otherwise in a host process with that many fronts.
    Calls are made as the worker makes them: ``concurrent_calls`` at once."""
    options: dict[str, Any] = {"context_length": 512, "engine_class": ENGINE_CLASS, "sglang_args": {"device": "cpu"}}
    if fronts > 1:
        options["sglang_args"]["tokenizer_worker_num"] = fronts
    engine = SGLangHostEngine(str(model), **options) if fronts else SGLangEngine(str(model), **options)
    engine.load()
    try:
        me = psutil.Process()
        processes = me.children(recursive=True)
        sglang = [p for p in processes if any(n in p.name() for n in SGLANG_CHILDREN)]
        front_ends = [p for p in processes if p not in sglang]
        batches = [texts[start : start + batch] for start in range(0, len(texts), batch)]
        engine.encode(batches[0])  # warm
        before = [cpu_seconds(me), sum(map(cpu_seconds, front_ends)), sum(map(cpu_seconds, sglang))]
        started = time.perf_counter()
        with ThreadPoolExecutor(max(1, engine.concurrent_calls)) as calls:
            list(calls.map(engine.encode, batches))
        wall = time.perf_counter() - started
        after = [cpu_seconds(me), sum(map(cpu_seconds, front_ends)), sum(map(cpu_seconds, sglang))]
    finally:
        engine.close()
    mine, fronts_cpu, theirs = ((b - a) * 1e6 / len(texts) for a, b in zip(before, after, strict=True))
    return mine, fronts_cpu, theirs, len(texts) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=512, help="texts per engine call (EMBQ_BATCH_MAX_TEXTS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = make_texts(args.texts, seed=11, max_words=60)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "tiny-qwen3")
        rows = [(fronts, *measure(model, texts, args.batch, fronts)) for fronts in (0, 1, 2)]
    print(f"{args.texts} texts, {args.batch} per engine call, median {sorted(map(len, texts))[len(texts) // 2]} chars")
    print(
        f"{'SGLang hosted in':<32}{'worker µs/text':>16}{'fronts µs/text':>16}{'scheduler µs/text':>19}{'texts/s':>10}"
    )
    for fronts, mine, front_ends, theirs, rate in rows:
        where = f"a host process, {fronts} front{'s' if fronts > 1 else ''}" if fronts else "the worker's process"
        print(f"{where:<32}{mine:>19.1f}{front_ends:>19.1f}{theirs:>19.1f}{rate:>19.0f}")


if __name__ == "__main__":
    main()
