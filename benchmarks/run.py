"""kvmscope benchmarks: the same work through kvmscope's public API and through a C program, in the same run.

    python benchmarks/run.py [--rounds 5] [--quick] [--json] [--only NAME ...] [--cpu N|none] [--no-profile]

Each figure runs C and Python alternately for several rounds and reports the medians and the ratio kvmscope/C (for
rates; for VM start, C time / kvmscope time, so above 1 is always faster). Model figures compare the model with the live
kernel, and the model under the 6.3 ruleset (no freeze check) with the 6.18 one. Each target is reported as met or
not. For every figure measured against C, the CPU time per operation is split into user time (the program: for kvmscope
the interpreter and the binding) and system time (the kernel: the same ioctls on both sides), which is the profile of
where the time goes. When a target is missed, the table is followed by the matching part of the profile from
benchmarks/where_time_goes.py (cost ladders next to C, the model's parts, perf), unless --no-profile. Both sides run
pinned to one CPU (--cpu, default the last one) so that they compete for the same core. docs/performance.md records
the latest table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import kvmscope
from kvmscope import guest
from kvmscope.api import IoExit, MsrBatch

sys.path.insert(0, str(Path(__file__).parent))  # the sibling modules, however this file is loaded
import where_time_goes  # noqa: E402
from common import BATCH_MSRS, PIO_GUEST, Sample, build_c, pin, run_c  # noqa: E402


def timed(fn: Callable[[], None], n: int) -> Sample:
    gc.disable()
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return Sample(n / elapsed, (r1.ru_utime - r0.ru_utime) / n * 1e6, (r1.ru_stime - r0.ru_stime) / n * 1e6)
    finally:
        gc.enable()


# --- the Python side: public API only ----------------------------------------------------------------------------


def py_pio(n: int) -> Sample:
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        run = vcpu.run

        def loop() -> None:
            for _ in range(n):
                e = run()
                if type(e) is not IoExit or e.port != 0x10:
                    raise RuntimeError(f"unexpected exit {e}")

        return timed(loop, n)


def py_pio_raw(n: int) -> Sample:
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        run_raw = vcpu.run_raw
        io = kvmscope.uapi.KVM_EXIT_IO

        def loop() -> None:
            for _ in range(n):
                if run_raw() != io or vcpu.io_port != 0x10:
                    raise RuntimeError(f"unexpected exit {vcpu.last_exit()}")

        return timed(loop, n)


def _msr_loop(system: kvmscope.System, op: str, count: int, n: int, after_run: bool = False) -> Sample:
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


def py_msrs(op: str, count: int, n: int) -> Sample:
    with kvmscope.open("linux") as kvm:
        return _msr_loop(kvm, op, count, n)


def model_msrs(kernel: str, count: int, n: int, after_run: bool = False) -> Sample:
    with kvmscope.open("model", kernel=kernel) as kvm:
        return _msr_loop(kvm, "set", count, n, after_run)


def py_vmstart(n: int) -> Sample:
    """Microseconds per VM start: create VM, memory, vCPU, registers, first run to HLT, close."""
    with kvmscope.open("linux") as kvm:

        def loop() -> None:
            for _ in range(n):
                with kvm.create_vm() as vm:
                    vm.add_memory(0, 0x10000)
                    vcpu = vm.create_vcpu(0)
                    guest.load_real_mode(vm, vcpu, guest.HLT)
                    if vcpu.run().reason != kvmscope.uapi.KVM_EXIT_HLT:
                        raise RuntimeError("no HLT")

        sample = timed(loop, n)
        return Sample(1e6 / sample.value, sample.user_us, sample.sys_us)


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
    # Median CPU time per operation, user and system, in microseconds: kvmscope's, then the baseline's.
    python_user_us: float = 0.0
    python_sys_us: float = 0.0
    reference_user_us: float = 0.0
    reference_sys_us: float = 0.0


def median_pair(py: Callable[[], Sample], ref: Callable[[], Sample], rounds: int) -> tuple[Sample, Sample]:
    ps, rs = [], []
    for _ in range(rounds):
        rs.append(ref())
        ps.append(py())
    return median_sample(ps), median_sample(rs)


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.value for s in samples), statistics.median(s.user_us for s in samples),
                  statistics.median(s.sys_us for s in samples))


def cpu_fields(p: Sample, r: Sample) -> dict[str, float]:
    return {"python_user_us": p.user_us, "python_sys_us": p.sys_us, "reference_user_us": r.user_us,
            "reference_sys_us": r.sys_us}


def figures(rounds: int, quick: bool, only: list[str]) -> list[Figure]:
    k = 10 if quick else 1
    out: list[Figure] = []

    def want(name: str) -> bool:
        return not only or any(o in name for o in only)

    def rate(name: str, py: Callable[[], Sample], ref: Callable[[], Sample], baseline: str, floor: float) -> None:
        if not want(name):
            return
        p, r = median_pair(py, ref, rounds)
        out.append(Figure(name, "per second", baseline, p.value, r.value, p.value / r.value, f">= {floor}x",
                          p.value / r.value >= floor, **cpu_fields(p, r)))

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
        out.append(Figure("VM start (create to first HLT, close)", "us", "C", p.value, r.value, r.value / p.value,
                          "<= 1.15x C time", p.value / r.value <= 1.15, **cpu_fields(p, r)))
    for count in (1, 32):
        rate(f"model set_msrs x{count} vs live kernel", lambda count=count: model_msrs("6.18", count, n_msr),
             lambda count=count: run_c(f"setmsr{count}", n_msr), "live kernel (C)", 2.0)
    for count in (1, 32):
        if want(f"freeze check x{count}"):
            p, r = median_pair(lambda count=count: model_msrs("6.18", count, n_msr, True),
                               lambda count=count: model_msrs("6.3", count, n_msr, True), max(rounds, 9))
            overhead = r.value / p.value - 1
            out.append(Figure(f"freeze check overhead x{count} after a run (6.18 vs 6.3)", "per second", "model 6.3",
                              p.value, r.value, p.value / r.value, "overhead <= 5%", overhead <= 0.05,
                              **cpu_fields(p, r)))
    if want("kvmscope check"):
        from check_replay import measure

        small, large = measure(10_000 // k), measure(100_000 // k)
        growth = large["peak_rss_kib"] - small["peak_rss_kib"]
        out.append(Figure(f"kvmscope check replay, {large['steps']} steps (steps/s)", "steps/s", "-",
                          large["steps_per_second"], small["steps_per_second"],
                          large["steps_per_second"] / small["steps_per_second"], "steady rate", True))
        out.append(Figure(f"kvmscope check peak RSS KiB, {small['steps']} -> {large['steps']} steps", "KiB",
                          f"{small['steps']} steps", large["peak_rss_kib"], small["peak_rss_kib"],
                          large["peak_rss_kib"] / small["peak_rss_kib"], "flat (growth <= 1 MiB)", growth <= 1024))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="10x fewer iterations (a smoke run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="*", default=[], help="run figures whose name contains one of these")
    ap.add_argument("--cpu", default="last", help="pin both sides to this CPU (default: the last allowed; 'none')")
    ap.add_argument("--no-profile", action="store_true",
                    help="do not follow a missed target with the profile of where its time goes")
    args = ap.parse_args()
    build_c()
    cpu = pin(args.cpu)
    figs = figures(args.rounds, args.quick, args.only)
    machine = {"kernel": os.uname().release, "python": platform.python_version(), "cpu": platform.processor() or
               platform.machine(), "nproc": os.cpu_count(), "pinned_to_cpu": cpu}
    profile = None if args.no_profile else profile_missed(figs, args.quick)
    if args.json:
        print(json.dumps({"machine": machine, "rounds": args.rounds, "figures": [asdict(f) for f in figs],
                          "profile": profile}, indent=2))
        return
    print(f"machine: {machine}  rounds: {args.rounds} (medians)")
    print(f"{'figure':52} {'kvmscope':>12} {'baseline':>12} {'ratio':>7}  {'target':17} {'met':4}"
          f" {'user/sys us per op: kvmscope':>26} {'baseline':>15}")
    for f in figs:
        cpu_split = ""
        if f.python_user_us or f.python_sys_us:
            cpu_split = (f" {f.python_user_us:12.3f} /{f.python_sys_us:8.3f}"
                         f" {f.reference_user_us:6.3f} /{f.reference_sys_us:7.3f}")
        print(f"{f.name:52} {f.python:12.1f} {f.reference:12.1f} {f.ratio:7.3f}  {f.target:17} "
              f"{'yes' if f.met else 'NO':4}{cpu_split}")
    if profile:
        print("\nTargets missed above; where their time goes (benchmarks/where_time_goes.py, docs/performance.md):")
        where_time_goes.print_profile(profile)


def profile_missed(figs: list[Figure], quick: bool) -> dict[str, object] | None:
    """For missed targets, the matching parts of the profile (ladders, the model's parts, perf), else None."""

    def part_of(name: str) -> str | None:
        if name.startswith(("model", "freeze")):
            return "model"
        if name.startswith("PIO"):
            return "run"
        return "msr" if "_msrs x" in name else None

    parts = tuple(p for p in ("run", "msr", "model") if p in {part_of(f.name) for f in figs if not f.met})
    if not parts:
        return None
    return where_time_goes.profile(20_000 if quick else 200_000, 3 if quick else 5, parts=parts)


if __name__ == "__main__":
    main()
