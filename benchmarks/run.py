"""kvmscope benchmarks: the same work through kvmscope's public API and through a C program, in the same run.

    python benchmarks/run.py [--rounds 21] [--quick] [--json] [--save FILE] [--only NAME ...] [--cpu N|none]
                             [--no-profile]

How it measures, so that the figures hold on a busy machine:
- The measure is CPU time per operation of the working thread on both sides (CLOCK_THREAD_CPUTIME_ID: user plus
  system), not wall time: time the thread spends waiting for the CPU while other work runs is not counted on either
  side. Wall time is printed beside it.
- The C program (kvm_bench.c) runs as a server started once; the sides of a figure take turns in short chunks (tens of
  milliseconds), in alternating order from round to round, both pinned to the same CPU (--cpu, default the last one).
- Each round gives one paired ratio per figure (the sides' chunks ran back to back, under the same conditions); a
  figure is the median of its paired ratios, with their range (lowest-highest) as the spread.
Ratios are kvmscope's rate over the baseline's (above 1 is faster), except VM start: kvmscope's time over C's (below
1.10 is the target). Model figures compare the model with the live kernel on the same batch. When a target is missed,
the table is followed by the matching part of benchmarks/where_time_goes.py's profile, unless --no-profile.
docs/performance.md records the latest table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import kvmscope
from kvmscope import guest, uapi
from kvmscope.api import IoExit, MsrBatch
from kvmscope.model.msr_compiled import compile_direct
from kvmscope.model.msr_plan import last_wins

sys.path.insert(0, str(Path(__file__).parent))  # the sibling modules, however this file is loaded
import where_time_goes  # noqa: E402
from common import PIO_GUEST, QEMU_CREATION_MSRS, CBaseline, Sample, batches, build_c, pin, timed  # noqa: E402

Chunk = Callable[[int], Sample]


# --- the Python side: public API only, one chunk of n operations per call -----------------------------------------------


def pio_sides() -> tuple[dict[str, Chunk], Callable[[], None]]:
    kvm = kvmscope.open("linux")
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    guest.load_real_mode(vm, vcpu, PIO_GUEST)
    run, run_raw, io, fd, ioctl, req = vcpu.run, vcpu.run_raw, uapi.KVM_EXIT_IO, vcpu.fd, fcntl.ioctl, uapi.KVM_RUN

    def bare(n: int) -> None:
        for _ in range(n):
            ioctl(fd, req)

    # What the C loop does, bare: KVM_RUN, then exit_reason and io.port read from the mapping (kvm_bench.c checks both)
    u32, u16 = vcpu.kvm_run.cast("I"), vcpu.kvm_run.cast("H")
    reason_at, port_at = uapi.KVM_RUN_EXIT_REASON_OFFSET // 4, (uapi.KVM_RUN_EXIT_OFFSET + uapi.kvm_run_io.port.offset) // 2

    def checked(n: int) -> None:
        for _ in range(n):
            ioctl(fd, req)
            if u32[reason_at] != io or u16[port_at] != 0x10:
                raise RuntimeError("unexpected exit")

    def one_call() -> int:  # the least any method returning exit_reason does: one Python call around the ioctl
        ioctl(fd, req)
        return u32[reason_at]

    def method(n: int) -> None:
        for _ in range(n):
            if one_call() != io or u16[port_at] != 0x10:
                raise RuntimeError("unexpected exit")

    def raw(n: int) -> None:
        for _ in range(n):
            if run_raw() != io or vcpu.io_port != 0x10:
                raise RuntimeError(f"unexpected exit {vcpu.last_exit()}")

    def typed(n: int) -> None:
        for _ in range(n):
            e = run()
            if type(e) is not IoExit or e.port != 0x10:
                raise RuntimeError(f"unexpected exit {e}")

    def close() -> None:
        u32.release()
        u16.release()
        vm.close()
        kvm.close()

    loops = {"bare": bare, "checked": checked, "method": method, "raw": raw, "typed": typed}
    return {name: (lambda n, loop=loop: timed(loop, n)) for name, loop in loops.items()}, close


def msr_side(backend: str, op: str, indices: Sequence[int], kernel: str = "6.18", after_run: bool = False,
             strict: bool = False, bare: bool = False, floor: bool = False, one_call: bool = False,
             array_floor: bool = False, checked_floor: bool = False) -> tuple[Chunk, Callable[[], None]]:
    """A chunk of ``op`` ("get" or "set") of the batch of ``indices``, written back with the values read. ``bare``:
    the ioctl by ``fcntl.ioctl`` alone; ``one_call``: the same in one Python function call; ``floor``: no rules at all,
    the batch's values stored in (or read from) one dict by its plan, the least a model in Python does.
    ``array_floor``: no rules, the values copied into (or out of) an array in one strided copy, as if the model kept
    its MSRs in slots laid out in this batch's order: the least any store does; ``checked_floor`` (a write): the same
    after every check the model's plan for this batch makes (its one pass, the memory types and the families' group
    checks: the least a model that checks what the kernel checks does, whatever its store)."""
    kvm = kvmscope.open(backend, kernel=kernel) if backend == "model" else kvmscope.open(backend)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.get_supported_cpuid())  # as a VMM does before it restores MSRs (and kvm_bench.c)
    if after_run:  # the freeze check only runs once the vCPU has run
        guest.run_to_hlt(vm, vcpu)
    batch = MsrBatch(list(indices))
    vcpu.get_msrs(batch, strict=True)
    call = vcpu.get_msrs if op == "get" else vcpu.set_msrs

    def loop(n: int) -> None:
        for _ in range(n):
            call(batch, strict)

    # A floor knows the batch as the model does: by comparing its indices with those of the batch it last saw.
    seen = memoryview(batch.indices32.tobytes()).cast("I")
    if floor:  # the least any pure-Python model does per call: know the batch, then one pass over one dict
        stored = dict.fromkeys(indices, 0)
        # a write: the model's own compiled stores, with no check; a read: one itemgetter (it makes a tuple, which
        # array takes faster than an iterator)
        keys, positions = last_wins(indices, range(len(indices)))
        store = compile_direct(((), None, (), frozenset(), {}, tuple(zip(keys, positions, strict=True)), stored, None))
        read = itemgetter(*indices) if len(indices) > 1 else (lambda d, k=indices[0]: (d[k],))
        raw, refusals = batch.raw, dict[int, Any]()

        def loop(n: int) -> None:
            for _ in range(n):
                if not batch.indices32 == seen:
                    raise RuntimeError("another batch")
                if op == "set":
                    store(raw, batch.words64, refusals)
                else:
                    batch.words64[2::2] = array("Q", read(stored))

    if array_floor or checked_floor:
        slots = memoryview(array("Q", bytes(8 * len(indices))))
        check: Any = None
        if checked_floor:  # the model's own checks of this batch, as its compiled direct path runs them
            vcpu.set_msrs(batch, strict=True)  # makes its plan
            direct = vcpu.msr_rules.plans[batch.indices32.tobytes()][9]  # type: ignore[attr-defined]
            if direct is None:
                raise RuntimeError(f"the model writes {len(indices)} MSRs without its direct path: no checked floor")
            check = compile_direct(direct[1], checks_only=True)
        raw, count = batch.raw, len(indices)

        def loop(n: int) -> None:
            for _ in range(n):
                if not batch.indices32 == seen:
                    raise RuntimeError("another batch")
                if op == "get":
                    batch.words64[2::2] = slots[:count]
                    continue
                if check is not None and not check(raw, batch.words64, None):
                    raise RuntimeError("the batch fails the model's checks")
                slots[:count] = batch.words64[2::2]

    if bare or one_call:
        fd, req, buf, ioctl = vcpu.fd, uapi.KVM_GET_MSRS if op == "get" else uapi.KVM_SET_MSRS, batch.raw, fcntl.ioctl

        def loop(n: int) -> None:
            for _ in range(n):
                ioctl(fd, req, buf, True)

    if one_call:  # the least any method taking the batch does: one Python call around the ioctl

        def method(b: MsrBatch, strict: bool = False) -> int:
            done: int = ioctl(fd, req, b.raw, True)
            return done

        def loop(n: int) -> None:
            for _ in range(n):
                method(batch, strict)

    def close() -> None:
        vm.close()
        kvm.close()

    return (lambda n: timed(loop, n)), close


class VmStartWorker:
    """benchmarks/vmstart_worker.py: the Python side of VM start, in a process that imports kvmscope only (see its
    docstring: VM creation costs kernel time in proportion to the process's mappings)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "vmstart_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.mappings = 0

    def chunk(self, n: int, mode: str = "api") -> Sample:
        """``n`` starts through kvmscope's API ("api"), or the same system calls made bare from Python ("bare")."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n} {mode}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vmstart_worker.py failed (exit {self.proc.wait()})")
        wall_ns, cpu_ns, mappings = (int(x) for x in line.split())
        self.mappings = mappings
        return Sample(cpu_ns / n / 1e3, 0.0, 0.0, wall_ns / n / 1e3)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- rounds and figures ------------------------------------------------------------------------------------------------


def alternate(sides: dict[str, Chunk], n: int, rounds: int) -> dict[str, list[Sample]]:
    """Each round runs one chunk of every side, back to back, in an order that reverses from round to round."""
    out: dict[str, list[Sample]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(sides[name](n))
    return out


@dataclass
class Figure:
    name: str
    baseline: str
    python_us: float  # median CPU time per operation: kvmscope's side
    reference_us: float  # and the baseline's
    ratio: float  # median of the paired per-round ratios (rates: baseline time / kvmscope time; VM start: inverse)
    ratio_low: float  # their range across rounds
    ratio_high: float
    wall_ratio: float  # the same ratio from wall time, for comparison
    target: str
    met: bool | None  # None: a figure without a target
    python_user_us: float
    python_sys_us: float
    reference_user_us: float
    reference_sys_us: float
    python_wall_us: float
    reference_wall_us: float
    rounds: int


def figure(name: str, baseline: str, py: list[Sample], ref: list[Sample], target: str = "",
           check: Callable[[float], bool] | None = None, time_ratio: bool = False) -> Figure:
    def ratios(attr: str) -> list[float]:
        pairs = [(getattr(p, attr), getattr(r, attr)) for p, r in zip(py, ref, strict=True)]
        return [p / r if time_ratio else r / p for p, r in pairs]

    cpu = ratios("cpu_us")
    median = statistics.median(cpu)

    def med(samples: list[Sample], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    return Figure(name, baseline, med(py, "cpu_us"), med(ref, "cpu_us"), median, min(cpu), max(cpu),
                  statistics.median(ratios("wall_us")), target, None if check is None else check(median),
                  med(py, "user_us"), med(py, "sys_us"), med(ref, "user_us"), med(ref, "sys_us"), med(py, "wall_us"),
                  med(ref, "wall_us"), len(py))


class Bench:
    def __init__(self, rounds: int, quick: bool, only: list[str]) -> None:
        self.rounds, self.k, self.only = rounds, 10 if quick else 1, only
        self.c = CBaseline()
        self.figures: list[Figure] = []
        self.batches = batches()

    def want(self, *names: str) -> bool:
        return not self.only or any(o in name for o in self.only for name in names)

    def add(self, f: Figure) -> None:
        if self.want(f.name):
            self.figures.append(f)

    def run_loop(self) -> None:
        names = ("PIO exits: bare fcntl.ioctl loop (Python's floor)", "PIO exits: run_raw() loop",
                 "PIO exits: run() loop, typed exits",
                 "PIO exits: bare, exit_reason and io.port checked as C does",
                 "PIO exits: bare in one Python call returning exit_reason (floor of any method)")
        if not self.want(*names):
            return
        sides, close = pio_sides()
        try:
            s = alternate({"C": lambda n: self.c.chunk("pio", n), **sides}, 3000 // self.k, self.rounds)
        finally:
            close()
        bare = figure(names[0], "C", s["bare"], s["C"])
        self.add(bare)
        self.add(figure(names[3], "C", s["checked"], s["C"]))
        self.add(figure(names[4], "C", s["method"], s["C"], f">= bare - 0.02 ({bare.ratio - 0.02:.3f})",
                        lambda r: r >= bare.ratio - 0.02))
        self.add(figure(names[1], "C", s["raw"], s["C"], f">= bare - 0.02 ({bare.ratio - 0.02:.3f})",
                        lambda r: r >= bare.ratio - 0.02))
        self.add(figure(names[2], "C", s["typed"], s["C"], ">= 0.90", lambda r: r >= 0.90))

    def binding_msrs(self) -> None:
        index_list = self.batches["index list"]
        for op in ("set", "get"):
            for label, indices in (("x1", index_list[:1]), (f"x{len(index_list)} index-list", index_list)):
                name = f"{op}_msrs {label}"
                if not self.want(name, f"strict {name}", f"bare {name}", f"bare {name} in one Python call"):
                    continue
                sides, closers = {"C": lambda n, op=op, indices=indices: self.c.chunk(op, n, indices)}, []
                for side, kw in (("bare", {"bare": True}), ("method", {"one_call": True}), ("api", {}),
                                 ("strict", {"strict": True})):
                    sides[side], close = msr_side("linux", op, indices, **kw)
                    closers.append(close)
                try:
                    s = alternate(sides, 4000 // self.k, self.rounds)
                finally:
                    for close in closers:
                        close()
                binding = op == "set" and label == "x1"
                self.add(figure(f"bare fcntl.ioctl {name} (Python's floor)", "C", s["bare"], s["C"]))
                self.add(figure(f"bare {name} in one Python call (floor of any method)", "C", s["method"], s["C"],
                                ">= 0.94" if binding else "", (lambda r: r >= 0.94) if binding else None))
                self.add(figure(name, "C", s["api"], s["C"], ">= 0.94" if binding else "",
                                (lambda r: r >= 0.94) if binding else None))
                self.add(figure(f"strict {name}", "C", s["strict"], s["C"]))

    def vm_start(self) -> None:
        name = "VM start: create, memory, vCPU, registers, run to HLT, close"
        bare_name = "VM start: the same system calls, bare from Python (Python's floor)"
        if not self.want(name, bare_name):
            return
        worker = VmStartWorker()
        try:
            s = alternate({"C": lambda n: self.c.chunk("vmstart", n), "bare": lambda n: worker.chunk(n, "bare"),
                           "py": worker.chunk}, max(20 // self.k, 2), self.rounds)
        finally:
            worker.close()
        self.add(figure(bare_name, "C", s["bare"], s["C"], time_ratio=True))
        self.add(figure(f"{name} ({worker.mappings} mappings)", "C", s["py"], s["C"], "<= 1.10x C time",
                        lambda r: r <= 1.10, time_ratio=True))

    def model(self) -> None:
        index_list, qemu = self.batches["index list"], self.batches["qemu"]
        cases = [("x1", index_list[:1], 20000, True), (f"x{len(index_list)} index-list", index_list, 4000, True),
                 (f"x{len(qemu)} QEMU vCPU creation", qemu, 2000, False)]
        for op in ("set", "get"):
            for label, indices, n, targeted in cases:
                name = f"model {op}_msrs {label} vs live kernel"
                if not self.want(name):
                    continue
                sides, closes = {}, []
                try:
                    for side_name, how in (("model", {}), ("floor", {"floor": True}), ("array", {"array_floor": True}),
                                           ("checked", {"checked_floor": True})):
                        if side_name == "checked" and (op == "get" or len(indices) == 1):
                            continue  # reads check nothing; one MSR is plain (no check)
                        sides[side_name], close = msr_side("model", op, indices, **how)
                        closes.append(close)
                    s = alternate({"C": lambda n, op=op, indices=indices: self.c.chunk(op, n, indices), **sides},
                                  n // self.k, self.rounds)
                finally:
                    for close in closes:
                        close()
                self.add(figure(f"model {op}_msrs {label}: no rules, one dict pass (Python's floor)", "live kernel (C)",
                                s["floor"], s["C"]))
                self.add(figure(f"model {op}_msrs {label}: no rules, one array copy (any store's floor)",
                                "live kernel (C)", s["array"], s["C"]))
                if "checked" in s:
                    self.add(figure(f"model {op}_msrs {label}: the model's checks, one array copy (a checking model's "
                                    "floor)", "live kernel (C)", s["checked"], s["C"]))
                self.add(figure(name, "live kernel (C)", s["model"], s["C"], ">= 4x" if targeted else "",
                                (lambda r: r >= 4.0) if targeted else None))
        for label, indices in (("x1", index_list[:1]), (f"x{len(index_list)} index-list", index_list)):
            # The same rules (6.18) on a vCPU that has run (its immutable MSRs frozen) and on one that has not: the
            # difference is the freeze check alone.
            name = f"freeze check: model set_msrs {label}, 6.18 after a run vs before"
            if not self.want(name):
                continue
            after, close_after = msr_side("model", "set", indices, "6.18", after_run=True)
            before, close_before = msr_side("model", "set", indices, "6.18")
            try:
                s = alternate({"before": before, "after": after}, (20000 if label == "x1" else 4000) // self.k,
                              self.rounds)
            finally:
                close_after()
                close_before()
            self.add(figure(name, "model, before a run", s["after"], s["before"], "overhead <= 5%",
                            lambda r: 1 / r - 1 <= 0.05))

    def check_replay(self) -> None:
        if not self.want("kvmscope check"):
            return
        from check_replay import measure

        small, large = measure(10_000 // self.k), measure(100_000 // self.k)
        growth = large["peak_kib"] - small["peak_kib"]
        rate = large["steps_per_second"] / small["steps_per_second"]
        flat = Figure(f"kvmscope check peak memory (VmHWM KiB), {small['steps']} -> {large['steps']} steps",
                      f"{small['steps']} steps", large["peak_kib"], small["peak_kib"], large["peak_kib"] /
                      small["peak_kib"], 0, 0, 0, "flat (growth <= 1 MiB)", growth <= 1024, 0, 0, 0, 0, 0, 0, 1)
        steady = Figure(f"kvmscope check steps/s, {large['steps']} vs {small['steps']} steps", f"{small['steps']} "
                        "steps", large["steps_per_second"], small["steps_per_second"], rate, 0, 0, 0, "", None, 0, 0,
                        0, 0, 0, 0, 1)
        self.figures += [steady, flat]

    def close(self) -> None:
        self.c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21, help="rounds of alternating chunks (default 21)")
    ap.add_argument("--quick", action="store_true", help="10x shorter chunks (a smoke run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", metavar="FILE", help="also write the JSON result to FILE (with the printed table)")
    ap.add_argument("--only", nargs="*", default=[], help="run figures whose name contains one of these")
    ap.add_argument("--cpu", default="last", help="pin both sides to this CPU (default: the last allowed; 'none')")
    ap.add_argument("--no-profile", action="store_true",
                    help="do not follow a missed target with the profile of where its time goes")
    args = ap.parse_args()
    build_c()
    cpu = pin(args.cpu)
    bench = Bench(args.rounds, args.quick, args.only)
    try:
        for part in (bench.run_loop, bench.binding_msrs, bench.vm_start, bench.model, bench.check_replay):
            part()
    finally:
        bench.close()
    figs = bench.figures
    machine = {"kernel": os.uname().release, "python": platform.python_version(), "cpu": platform.processor() or
               platform.machine(), "nproc": os.cpu_count(), "pinned_to_cpu": cpu, "loadavg": os.getloadavg()}
    profile = None if args.no_profile else profile_missed(figs, args.quick)
    result = json.dumps({"machine": machine, "rounds": args.rounds, "batches": bench.batches,
                         "figures": [asdict(f) for f in figs], "profile": profile}, indent=2)
    if args.save:
        Path(args.save).write_text(result + "\n")
    if args.json:
        print(result)
        return
    print_table(machine, args.rounds, bench.batches, figs)
    if profile:
        print("\nTargets missed above; where their time goes (benchmarks/where_time_goes.py, docs/performance.md):")
        where_time_goes.print_profile(profile)


def print_table(machine: dict[str, object], rounds: int, batches: dict[str, list[int]], figs: list[Figure]) -> None:
    print(f"machine: {machine}")
    print(f"rounds: {rounds}; ratio = median of paired per-round CPU-time ratios [lowest-highest]; wall = the same "
          "from wall time")
    print(f"index-list batch ({len(batches['index list'])}): {' '.join(hex(i) for i in batches['index list'])}")
    print(f"QEMU creation batch: {len(batches['qemu'])} MSRs both backends take back, of "
          f"{len(batches['qemu (live kernel)'])} the live kernel takes ({len(QEMU_CREATION_MSRS)} in QEMU's list); "
          f"the model does not yet take: {' '.join(hex(i) for i in batches['dropped']) or 'none'}")
    print(f"\n{'figure':66} {'ratio':>6} {'[range]':>13} {'wall':>6}  {'target':22} {'met':4} "
          f"{'CPU us/op: kvmscope':>19} {'baseline':>9} {'wall us/op: kvmscope':>21} {'baseline':>9}")
    for f in figs:
        met = "-" if f.met is None else "yes" if f.met else "NO"
        if f.name.startswith("kvmscope check"):  # plain values (KiB, steps/s), not timed rounds
            print(f"{f.name:66} {f.ratio:6.3f} {'':13} {'':6}  {f.target:22} {met:4} {f.python_us:19.0f} "
                  f"{f.reference_us:9.0f}")
            continue
        print(f"{f.name:66} {f.ratio:6.3f} [{f.ratio_low:5.3f}-{f.ratio_high:5.3f}] {f.wall_ratio:6.3f}  "
              f"{f.target:22} {met:4} {f.python_us:19.3f} {f.reference_us:9.3f} {f.python_wall_us:21.3f} "
              f"{f.reference_wall_us:9.3f}")


def profile_missed(figs: list[Figure], quick: bool) -> dict[str, object] | None:
    """For missed targets, the matching parts of the profile (ladders, the model's parts, perf), else None."""

    def part_of(name: str) -> str | None:
        if name.startswith(("model", "freeze")):
            return "model"
        if name.startswith("PIO"):
            return "run"
        return "msr" if "_msrs x" in name else None

    # a floor row's target is the figure's it stands beside: it shows whether even the floor meets it, and is not
    # kvmscope's own miss to profile
    missed = {part_of(f.name) for f in figs if f.met is False and "floor" not in f.name}
    parts = tuple(p for p in ("run", "msr", "model") if p in missed)
    if not parts:
        return None
    return where_time_goes.profile(20_000 if quick else 200_000, 3 if quick else 5, parts=parts)


if __name__ == "__main__":
    main()
