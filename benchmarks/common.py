"""What the benchmark scripts share: the C baseline (building and running ``kvm_bench.c``), the workloads it and the
Python side both run, and pinning to one CPU. ``run.py`` and ``where_time_goes.py`` import it; neither imports the
other at load time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
C_SOURCE = HERE / "kvm_bench.c"
C_BINARY = HERE / "bin" / "kvm_bench"
BATCH_MSRS = [0x8B, 0xCE, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000084, 0x34]  # same as kvm_bench.c
PIO_GUEST = bytes([0xE6, 0x10, 0xEB, 0xFC])  # out 0x10, al; jmp $-2  (same as kvm_bench.c)


def build_c() -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("benchmarks need a C compiler (cc) to build the C baseline")
    C_BINARY.parent.mkdir(exist_ok=True)
    if not C_BINARY.exists() or C_BINARY.stat().st_mtime < C_SOURCE.stat().st_mtime:
        subprocess.run([cc, "-O2", "-o", str(C_BINARY), str(C_SOURCE)], check=True)
    return C_BINARY


@dataclass
class Sample:
    """One timed run: a rate (or, for VM start, microseconds per start) and CPU time per operation."""

    value: float
    user_us: float  # user CPU time per operation
    sys_us: float  # system (kernel) CPU time per operation


def run_c(mode: str, n: int) -> Sample:
    out = subprocess.run([str(C_BINARY), mode, str(n)], check=True, capture_output=True, text=True).stdout
    value, user, system = (float(x) for x in out.split())
    return Sample(value, user, system)


def pin(cpu: str) -> int | None:
    """Pin this process, and so the C runs it starts, to one CPU: both sides then run on the same core."""
    if cpu == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu == "last" else int(cpu)
    if chosen not in allowed:
        sys.exit(f"--cpu {cpu}: this process may run on CPUs {allowed} only")
    os.sched_setaffinity(0, {chosen})
    return chosen
