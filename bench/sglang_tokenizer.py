"""CPU per text in a worker's own process around the real SGLang tokenizer manager, batch encode off and on.

Run with the SGLang test environment (``python -m tests.sglang_cpu.environment``
builds it): ``.venv-sglang/bin/python -m bench.sglang_tokenizer``. It hosts the
worker's ``SGLangEngine`` on the real ``sglang.Engine`` with the CPU scheduler of
``tests/sglang_cpu`` and measures, with ``psutil``, the CPU time of this process
alone (its threads: the tokenizer manager's event loop, our engine calls), which
on a GPU machine is the process that also runs the queue. The scheduler child's
own CPU (the forward pass, here on the CPU) is reported apart and is not the point.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import psutil

from bench.texts import make_texts
from tests.sglang_cpu.model import build_model
from worker.engines.sglang import SGLangEngine

ENGINE_CLASS = "tests.sglang_cpu.engine:CpuSchedulerEngine"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(model: Path, texts: list[str], batch: int, batch_encode: bool) -> tuple[float, float, float]:
    """(µs of this process's CPU per text, µs of the children's, texts/s)."""
    engine = SGLangEngine(
        str(model),
        context_length=512,
        engine_class=ENGINE_CLASS,
        concurrent_calls=1,
        sglang_args={"device": "cpu", "enable_tokenizer_batch_encode": batch_encode},
    )
    engine.load()
    try:
        me = psutil.Process()
        children = me.children(recursive=True)
        engine.encode(texts[:batch])  # warm
        mine, theirs = cpu_seconds(me), sum(cpu_seconds(c) for c in children)
        started = time.perf_counter()
        for start in range(0, len(texts), batch):
            engine.encode(texts[start : start + batch])
        wall = time.perf_counter() - started
        mine = cpu_seconds(me) - mine
        theirs = sum(cpu_seconds(c) for c in children) - theirs
    finally:
        engine.close()
    return mine / len(texts) * 1e6, theirs / len(texts) * 1e6, len(texts) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=512, help="texts per engine call (EMBQ_BATCH_MAX_TEXTS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = make_texts(args.texts, seed=11, max_words=60)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "tiny-qwen3")
        rows = [(on, *measure(model, texts, args.batch, on)) for on in (False, True)]
    print(f"{args.texts} texts, {args.batch} per engine call, median {sorted(map(len, texts))[len(texts) // 2]} chars")
    print(f"{'enable_tokenizer_batch_encode':<32}{'worker µs/text':>16}{'scheduler µs/text':>19}{'texts/s':>10}")
    for on, mine, theirs, rate in rows:
        print(f"{on!s:<32}{mine:>16.1f}{theirs:>19.1f}{rate:>10.0f}")


if __name__ == "__main__":
    main()
