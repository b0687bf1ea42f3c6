"""What the benchmark scripts share: the C baseline (``kvm_bench.c``, built here and driven chunk by chunk), the
batches of MSRs both sides send, the timed sample both sides report, and pinning to one CPU. ``run.py`` and
``where_time_goes.py`` import it; neither imports the other at load time."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import kvmscope
from kvmscope.api import MsrBatch, Vcpu

HERE = Path(__file__).parent
C_SOURCE = HERE / "kvm_bench.c"
C_BINARY = HERE / "bin" / "kvm_bench"
BATCH_MSRS = [0x8B, 0xCE, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000084, 0x34]  # the old store-only batch (profile)
PIO_GUEST = bytes([0xE6, 0x10, 0xEB, 0xFC])  # out 0x10, al; jmp $-2  (same as kvm_bench.c)

# The MSRs QEMU writes with KVM_SET_MSRS when it creates or resets a vCPU (target/i386/kvm/kvm.c, kvm_put_msrs at
# KVM_PUT_RESET_STATE and above), in its order, for a guest with MTRRs, an architectural PMU (3 fixed and 8
# general-purpose counters) and 10 MCE banks. QEMU leaves out what the host's KVM lacks: the benchmark keeps those
# the live kernel reads and takes back (``accepted``).
QEMU_CREATION_MSRS: list[int] = [
    0x174, 0x175, 0x176, 0x277,  # SYSENTER_CS/ESP/EIP, PAT
    0xC0000081, 0xC0010117, 0xC0000103, 0x3B, 0x1A0, 0x9E, 0x34,  # STAR, HSAVE_PA, TSC_AUX, TSC_ADJUST, MISC_ENABLE,
    0xD90, 0xDA0, 0x48, 0xC001011F,  # SMBASE, SMI_COUNT, BNDCFGS, XSS, SPEC_CTRL, VIRT_SSBD
    0xC0000083, 0xC0000102, 0xC0000084, 0xC0000082,  # CSTAR, KERNEL_GS_BASE, FMASK, LSTAR
    0x10A, 0xCF,  # ARCH_CAPABILITIES, CORE_CAPABILITY
    0x10, 0x4B564D01, 0x4B564D00, 0x4B564D02, 0x4B564D04, 0x4B564D03,  # TSC, kvmclock, async PF, PV EOI, steal time
    0x38D, 0x38F, 0x309, 0x30A, 0x30B,  # PMU: stop, fixed counters
    *[m for i in range(8) for m in (0xC1 + i, 0x186 + i)],  # PMU: general-purpose counters and event selects
    0x38E, 0x390, 0x38D, 0x38F,  # PMU: status, overflow control, start
    0x2FF, 0x250, 0x258, 0x259, *range(0x268, 0x270), *range(0x200, 0x210),  # MTRRs
    0x17A, 0x17B, *range(0x400, 0x400 + 10 * 4),  # MCG_STATUS, MCG_CTL, MC0-9 CTL/STATUS/ADDR/MISC
]


def takes_back(vcpu: Vcpu, index: int) -> bool:
    """Whether ``vcpu`` reads this MSR and takes the value it read back."""
    batch = MsrBatch([index])
    return vcpu.get_msrs(batch) == 1 and vcpu.set_msrs(MsrBatch([(index, batch[0][1])])) == 1


def batches() -> dict[str, list[int]]:
    """The realistic batches, on vCPUs given the supported CPUID: the first 32 index-list MSRs the live kernel reads
    and takes back (what a VMM saves and restores), and QEMU's vCPU-creation batch, kept to what both the live kernel
    and the 6.18 model take back (the model's misses are listed in ``dropped``)."""
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm, kvmscope.open("model", kernel="6.18") as model, \
            model.create_vm() as mvm:
        live, twin = vm.create_vcpu(0), mvm.create_vcpu(0)
        live.set_cpuid(kvm.get_supported_cpuid())  # as the benchmarks' vCPUs have it
        twin.set_cpuid(model.get_supported_cpuid())
        index_list = [i for i in kvm.get_msr_index_list() if takes_back(live, i)][:32]
        qemu_live = [i for i in QEMU_CREATION_MSRS if takes_back(live, i)]
        qemu = [i for i in qemu_live if takes_back(twin, i)]
        dropped = sorted({i for i in qemu_live if i not in qemu})
    return {"index list": index_list, "qemu": qemu, "qemu (live kernel)": qemu_live, "dropped": dropped}


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
    """One timed chunk, per operation, in microseconds: this thread's CPU time (the measure), its user/system split,
    and the wall time beside it."""

    cpu_us: float
    user_us: float  # the program: for kvmscope the interpreter and the binding
    sys_us: float  # the kernel: the same ioctls on both sides
    wall_us: float


def timed(fn: Callable[[int], None], n: int) -> Sample:
    """Run ``fn(n)`` (a loop of ``n`` operations) and time it on this thread, with the garbage collector off."""
    gc.disable()
    try:
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        fn(n)
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
    finally:
        gc.enable()
    return Sample((c1 - c0) / n / 1e3, (r1.ru_utime - r0.ru_utime) / n * 1e6, (r1.ru_stime - r0.ru_stime) / n * 1e6,
                  (w1 - w0) / n / 1e3)


class CBaseline:
    """``kvm_bench serve``, started once and asked for one chunk at a time, so that C and Python can take turns in
    short chunks. It inherits this process's CPU pinning."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(build_c()), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def chunk(self, mode: str, n: int, indices: Sequence[int] = ()) -> Sample:
        stdin, stdout = self._pipes()
        stdin.write(" ".join([mode, str(n), *(hex(i) for i in indices)]) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"kvm_bench {mode} {n} failed (exit {self.proc.wait()})")
        wall_ns, cpu_ns, user_us, sys_us = (float(x) for x in line.split())
        return Sample(cpu_ns / n / 1e3, user_us / n, sys_us / n, wall_ns / n / 1e3)

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.close()
        self.proc.wait(timeout=30)


def run_c(mode: str, n: int, indices: Sequence[int] = ()) -> Sample:
    """One chunk in a C process of its own (for the profile's ladders)."""
    c = CBaseline()
    try:
        return c.chunk(mode, n, indices)
    finally:
        c.close()


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
