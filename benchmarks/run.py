"""pykvm benchmarks: the same work through pykvm's public API and through a C program, in the same run.

    python benchmarks/run.py [--rounds 5] [--quick] [--json] [--only NAME ...]

Each figure runs C and Python alternately for several rounds and reports the medians and the ratio pykvm/C (for
rates; for times, C/pykvm is shown as "speed" and the raw ratio as "time ratio"). Model figures compare the model with
the live kernel, and the model under the 6.3 ruleset (no freeze check) with the 6.18 one. Each target is reported as
met or not. docs/performance.md records the latest table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pykvm
from pykvm import guest
from pykvm.api import IoExit, MsrBatch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
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


def run_c(mode: str, n: int) -> float:
    out = subprocess.run([str(C_BINARY), mode, str(n)], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def timed(fn: Callable[[], None], n: int) -> float:
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)
    finally:
        gc.enable()


# --- the Python side: public API only ----------------------------------------------------------------------------


def py_pio(n: int) -> float:
    with pykvm.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        run = vcpu.run

        def loop() -> None:
            for _ in range(n):
                e = run()
                if type(e) is not IoExit or e.port != 0x10:
                    raise RuntimeError(f"unexpected exit {e}")

        return timed(loop, n)


def py_pio_raw(n: int) -> float:
    with pykvm.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        run_raw = vcpu.run_raw
        io = pykvm.uapi.KVM_EXIT_IO

        def loop() -> None:
            for _ in range(n):
                if run_raw() != io or vcpu.io_port != 0x10:
                    raise RuntimeError(f"unexpected exit {vcpu.last_exit()}")

        return timed(loop, n)


def _msr_loop(system: pykvm.System, op: str, count: int, n: int, after_run: bool = False) -> float:
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        batch = MsrBatch([(BATCH_MSRS[i % 8], 0) for i in range(count)])
        if after_run:  # the freeze check only runs once the vCPU has run: write back the values it holds
            guest.run_to_hlt(vm, vcpu)
            vcpu.get_msrs(batch, strict=True)
        call = vcpu.get_msrs if op.endswith("get") else vcpu.set_msrs
        strict = op.startswith("strict")

        def loop() -> None:
            for _ in range(n):
                call(batch, strict)

        return timed(loop, n)


def py_msrs(op: str, count: int, n: int) -> float:
    with pykvm.open("linux") as kvm:
        return _msr_loop(kvm, op, count, n)


def model_msrs(kernel: str, count: int, n: int, after_run: bool = False) -> float:
    with pykvm.open("model", kernel=kernel) as kvm:
        return _msr_loop(kvm, "set", count, n, after_run)


def py_vmstart(n: int) -> float:
    """Microseconds per VM start: create VM, memory, vCPU, registers, first run to HLT, close."""
    with pykvm.open("linux") as kvm:

        def loop() -> None:
            for _ in range(n):
                with kvm.create_vm() as vm:
                    vm.add_memory(0, 0x10000)
                    vcpu = vm.create_vcpu(0)
                    guest.load_real_mode(vm, vcpu, guest.HLT)
                    if vcpu.run().reason != pykvm.uapi.KVM_EXIT_HLT:
                        raise RuntimeError("no HLT")

        return 1e6 / timed(loop, n)


# --- figures -----------------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    unit: str
    baseline: str  # what the Python side is compared with
    python: float
    reference: float
    ratio: float  # python/reference for rates; reference/python for times (so >1 is always "faster")
    target: str
    met: bool


def median_pair(py: Callable[[], float], ref: Callable[[], float], rounds: int) -> tuple[float, float]:
    ps, rs = [], []
    for _ in range(rounds):
        rs.append(ref())
        ps.append(py())
    return statistics.median(ps), statistics.median(rs)


def figures(rounds: int, quick: bool, only: list[str]) -> list[Figure]:
    k = 10 if quick else 1
    out: list[Figure] = []

    def want(name: str) -> bool:
        return not only or any(o in name for o in only)

    def rate(name: str, py: Callable[[], float], ref: Callable[[], float], baseline: str, floor: float) -> None:
        if not want(name):
            return
        p, r = median_pair(py, ref, rounds)
        out.append(Figure(name, "per second", baseline, p, r, p / r, f">= {floor}x", p / r >= floor))

    n_pio, n_msr = 200_000 // k, 200_000 // k
    rate("PIO exits (run loop, typed exits)", lambda: py_pio(n_pio), lambda: run_c("pio", n_pio), "C", 0.95)
    rate("PIO exits (run_raw loop)", lambda: py_pio_raw(n_pio), lambda: run_c("pio", n_pio), "C", 0.95)
    for op, c_mode in (("set", "setmsr"), ("get", "getmsr"), ("strict-set", "setmsr"), ("strict-get", "getmsr")):
        for count in (1, 32):
            rate(f"{op}_msrs x{count}", lambda op=op, count=count: py_msrs(op, count, n_msr),
                 lambda c_mode=c_mode, count=count: run_c(f"{c_mode}{count}", n_msr), "C", 0.95)
    if want("VM start"):
        n = 1000 // k
        p, r = median_pair(lambda: py_vmstart(n), lambda: run_c("vmstart", n), rounds)
        out.append(Figure("VM start (create to first HLT, close)", "us", "C", p, r, r / p, "<= 1.15x C time",
                          p / r <= 1.15))
    for count in (1, 32):
        rate(f"model set_msrs x{count} vs live kernel", lambda count=count: model_msrs("6.18", count, n_msr),
             lambda count=count: run_c(f"setmsr{count}", n_msr), "live kernel (C)", 2.0)
    for count in (1, 32):
        if want(f"freeze check x{count}"):
            p, r = median_pair(lambda count=count: model_msrs("6.18", count, n_msr, True),
                               lambda count=count: model_msrs("6.3", count, n_msr, True), max(rounds, 9))
            overhead = r / p - 1
            out.append(Figure(f"freeze check overhead x{count} after a run (6.18 vs 6.3)", "per second", "model 6.3",
                              p, r, p / r, "overhead <= 5%", overhead <= 0.05))
    if want("pykvm check"):
        from check_replay import measure

        small, large = measure(10_000 // k), measure(100_000 // k)
        growth = large["peak_rss_kib"] - small["peak_rss_kib"]
        out.append(Figure(f"pykvm check replay, {large['steps']} steps (steps/s)", "steps/s", "-",
                          large["steps_per_second"], small["steps_per_second"],
                          large["steps_per_second"] / small["steps_per_second"], "steady rate", True))
        out.append(Figure(f"pykvm check peak RSS KiB, {small['steps']} -> {large['steps']} steps", "KiB",
                          f"{small['steps']} steps", large["peak_rss_kib"], small["peak_rss_kib"],
                          large["peak_rss_kib"] / small["peak_rss_kib"], "flat (growth <= 1 MiB)", growth <= 1024))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="10x fewer iterations (a smoke run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="*", default=[], help="run figures whose name contains one of these")
    args = ap.parse_args()
    build_c()
    figs = figures(args.rounds, args.quick, args.only)
    machine = {"kernel": os.uname().release, "python": platform.python_version(), "cpu": platform.processor() or
               platform.machine(), "nproc": os.cpu_count()}
    if args.json:
        print(json.dumps({"machine": machine, "rounds": args.rounds, "figures": [asdict(f) for f in figs]}, indent=2))
        return
    print(f"machine: {machine}  rounds: {args.rounds} (medians)")
    print(f"{'figure':52} {'pykvm':>12} {'baseline':>12} {'ratio':>7}  target            met")
    for f in figs:
        print(f"{f.name:52} {f.python:12.1f} {f.reference:12.1f} {f.ratio:7.3f}  {f.target:17} {'yes' if f.met else 'NO'}")


if __name__ == "__main__":
    main()
