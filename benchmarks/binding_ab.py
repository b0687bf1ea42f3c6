"""Paired in-process A/B measurements behind docs/performance.md's binding sections (thread CPU time, alternating).

    python benchmarks/binding_ab.py exits [--rounds 61]       typed run() now vs the dataclass exit it replaced
    python benchmarks/binding_ab.py vmstart [--starts 1000]   VM start through the API vs the same calls bare, by phase

``exits``: three sides take turns in chunks of 3000 PIO exits on one vCPU: the bare ``fcntl.ioctl``, ``vcpu.run()``,
and a copy of ``run()`` as it was before exits became tuples (a slotted dataclass ``IoExit``, ``exit_reason`` read
from the u32 view, then the io members unpacked). Prints each side's median per exit, its paired excess over the bare
ioctl, and the paired difference new - old with the number of rounds in which the new one was faster.

``vmstart``: one start through kvmscope's API and one made bare (as vmstart_worker.py's ``bare`` mode), alternating,
each phase timed; prints the paired median excess of the API per phase. Pin it (``taskset -c 1``) as run.py pins.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import gc
import mmap
import os
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import kvmscope
from kvmscope import guest, uapi
from kvmscope.api import Exit, IoExit
from kvmscope.linux import LinuxVcpu

PIO_GUEST = bytes([0xE6, 0x10, 0xEB, 0xFC])  # out 0x10, al; jmp $-2 (as run.py and kvm_bench.c)
_thread_ns = time.thread_time_ns


@dataclasses.dataclass(slots=True)
class DataclassIoExit:
    """IoExit as it was: a slotted dataclass with a Python-level __init__."""

    direction: int
    size: int
    port: int
    count: int
    data: bytes
    reply: Callable[[bytes], None] | None = dataclasses.field(default=None, compare=False, repr=False)


def dataclass_run(vcpu: LinuxVcpu, mmap_size: int) -> tuple[Callable[[], Any], Callable[[], None]]:
    """run() before this change, on a mapping of ``vcpu``'s kvm_run of its own (as LinuxVcpu maps it), building
    DataclassIoExit; and the function that unmaps it."""
    ioctl, request, fd = fcntl.ioctl, uapi.KVM_RUN, vcpu.fd
    mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    u32 = memoryview(mapping).cast("I")
    reason_at, io_at = uapi.KVM_RUN_EXIT_REASON_OFFSET // 4, uapi.KVM_RUN_EXIT_OFFSET
    io = struct.Struct(uapi.struct_format(uapi.kvm_run_io, "direction", "size", "port", "count",
                                          "data_offset")).unpack_from

    def run() -> Any:
        ioctl(fd, request)
        reason = u32[reason_at]
        if reason == uapi.KVM_EXIT_IO:
            direction, size, port, count, offset = io(mapping, io_at)
            if direction == uapi.KVM_EXIT_IO_OUT:
                return DataclassIoExit(direction, size, port, count, mapping[offset : offset + size * count])
        return vcpu.last_exit()

    def unmap() -> None:
        u32.release()
        mapping.close()

    return run, unmap


def exits(rounds: int, n: int = 3000) -> None:
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        assert isinstance(vcpu, LinuxVcpu)
        fd, ioctl, request = vcpu.fd, fcntl.ioctl, uapi.KVM_RUN
        old_run, unmap = dataclass_run(vcpu, kvm.vcpu_mmap_size())
        new_run = vcpu.run

        def bare(k: int) -> None:
            for _ in range(k):
                ioctl(fd, request)

        def loop(run: Callable[[], Any], cls: Any) -> Callable[[int], None]:
            def typed(k: int) -> None:
                for _ in range(k):
                    e: Any = run()
                    if type(e) is not cls or e.port != 0x10:
                        raise RuntimeError(f"unexpected exit {e}")
            return typed

        sides = {"bare fcntl.ioctl": bare, "run(), dataclass exit (before)": loop(old_run, DataclassIoExit),
                 "run(), tuple exit (now)": loop(new_run, IoExit)}
        try:
            res = alternate(sides, n, rounds)
        finally:
            unmap()
    report(res, "bare fcntl.ioctl", "us per exit")
    old, new = res["run(), dataclass exit (before)"], res["run(), tuple exit (now)"]
    diff = [a - b for a, b in zip(new, old, strict=True)]
    print(f"now - before, paired median {statistics.median(diff):+.3f} us per exit; now faster in "
          f"{sum(d < 0 for d in diff)}/{len(diff)} rounds")


def alternate(sides: dict[str, Callable[[int], None]], n: int, rounds: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    gc.disable()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                t0 = _thread_ns()
                sides[name](n)
                res[name].append((_thread_ns() - t0) / n / 1e3)
    finally:
        gc.enable()
    return res


def report(res: dict[str, list[float]], base: str, unit: str) -> None:
    for name, values in res.items():
        over = statistics.median(a - b for a, b in zip(values, res[base], strict=True))
        print(f"{name:34s} median {statistics.median(values):8.3f} {unit}   paired over {base}: {over:+.3f}")


PHASES = ("create VM", "memory", "vCPU", "registers and code", "run to HLT", "close")


def vmstart(starts: int) -> None:
    with kvmscope.open("linux") as kvm:
        kfd, ioctl = kvm.fd, fcntl.ioctl
        sregs, regs = uapi.kvm_sregs(), uapi.kvm_regs()
        region = uapi.kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=0x10000)

        def bare(times: list[int]) -> None:
            times.append(_thread_ns())
            vm = ioctl(kfd, uapi.KVM_CREATE_VM)
            times.append(_thread_ns())
            mem = mmap.mmap(-1, 0x10000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(mem)
            region.userspace_addr = ctypes.addressof(anchor)
            del anchor
            ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region, True)
            times.append(_thread_ns())
            vcpu = ioctl(vm, uapi.KVM_CREATE_VCPU)
            run = mmap.mmap(vcpu, ioctl(kfd, uapi.KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
            times.append(_thread_ns())
            mem[0x1000] = guest.HLT[0]
            ioctl(vcpu, uapi.KVM_GET_SREGS, sregs, True)
            sregs.cs.base, sregs.cs.selector = 0, 0
            ioctl(vcpu, uapi.KVM_SET_SREGS, sregs, True)
            ioctl(vcpu, uapi.KVM_GET_REGS, regs, True)
            regs.rip, regs.rflags = 0x1000, 2
            ioctl(vcpu, uapi.KVM_SET_REGS, regs, True)
            times.append(_thread_ns())
            ioctl(vcpu, uapi.KVM_RUN)
            times.append(_thread_ns())
            run.close()
            os.close(vcpu)
            os.close(vm)
            mem.close()
            times.append(_thread_ns())

        def api(times: list[int]) -> None:
            times.append(_thread_ns())
            vm = kvm.create_vm()
            times.append(_thread_ns())
            vm.add_memory(0, 0x10000)
            times.append(_thread_ns())
            vcpu = vm.create_vcpu(0)
            times.append(_thread_ns())
            guest.load_real_mode(vm, vcpu, guest.HLT)
            times.append(_thread_ns())
            exit_: Exit = vcpu.run()
            times.append(_thread_ns())
            vm.close()
            times.append(_thread_ns())
            if exit_.reason != uapi.KVM_EXIT_HLT:
                raise RuntimeError(f"expected HLT, saw {exit_}")

        per: dict[str, list[list[int]]] = {"api": [], "bare": []}
        gc.disable()
        try:
            for i in range(starts):
                for side, start in ((("api", api), ("bare", bare)) if i % 2 else (("bare", bare), ("api", api))):
                    times: list[int] = []
                    start(times)
                    per[side].append([b - a for a, b in zip(times, times[1:], strict=False)])
        finally:
            gc.enable()
    for k, phase in enumerate(PHASES):
        a = [p[k] for p in per["api"]]
        b = [p[k] for p in per["bare"]]
        diff = statistics.median(x - y for x, y in zip(a, b, strict=True)) / 1e3
        print(f"{phase:20s} api {statistics.median(a) / 1e3:8.1f} us  bare {statistics.median(b) / 1e3:8.1f} us  "
              f"paired excess {diff:+7.1f} us")
    total = statistics.median(sum(x) - sum(y) for x, y in zip(per["api"], per["bare"], strict=True)) / 1e3
    print(f"{'whole start':20s} paired excess of the API {total:+.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("exits", "vmstart"))
    p.add_argument("--rounds", type=int, default=61, help="exits: paired rounds of 3000 exits per side")
    p.add_argument("--starts", type=int, default=1000, help="vmstart: starts per side")
    a = p.parse_args()
    if a.what == "exits":
        exits(a.rounds)
    else:
        vmstart(a.starts)


if __name__ == "__main__":
    main()
