"""The real ``sglang.Engine`` with its scheduler process replaced by the CPU one of ``scheduler``."""

from __future__ import annotations

from sglang.srt.entrypoints.engine import Engine

from tests.sglang_cpu.scheduler import run_scheduler_process


class CpuSchedulerEngine(Engine):
    """Everything is SGLang's but the scheduler process, through the hook SGLang made for that."""

    run_scheduler_process_func = staticmethod(run_scheduler_process)
