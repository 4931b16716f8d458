"""The machine a benchmark ran on, recorded beside its figures in ``benchmarks/results/``.

The benchmark scripts import this sibling module (``python benchmarks/bench_*.py`` puts
``benchmarks/`` on the path).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def proc_field(path: str, key: str) -> str:
    """The value of the first ``key: value`` line of a /proc file ("" if absent)."""
    lines = Path(path).read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def host() -> dict[str, object]:
    """CPU model, core count, total memory and Python version."""
    mem_kb = int(proc_field("/proc/meminfo", "MemTotal").split()[0])
    return {"cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cores": os.cpu_count(), "mem_total_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version()}
