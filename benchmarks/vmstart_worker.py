"""The Python side of the VM-start figure, in a process of its own that imports kvmscope and nothing else.

    python benchmarks/vmstart_worker.py     (started by run.py: one line per chunk on stdin, "N" or "N bare")

Why a separate process: creating a VM costs the kernel time in proportion to the mappings of the calling process
(KVM_CREATE_VM registers an MMU notifier, which locks every mapping of the process: ``mm_take_all_locks``), and the
benchmark harness's own imports (subprocess, statistics, shutil with zlib/bz2/lzma...) add about 90 mappings that a
program using kvmscope does not have. Here the process holds what kvmscope needs, as the C side holds what kvm_bench
needs. Each line answers "WALL_NS CPU_NS MAPPINGS" for the timed loop (this thread's CPU time; the mapping count of the
process).

"N" times kvmscope's public API; "N bare" the same system calls as kvm_bench.c made straight from Python
(``fcntl.ioctl``, ``mmap.mmap``, ``os.close``, buffers made once), with no kvmscope object: Python's floor for VM start,
as the bare ``fcntl.ioctl`` loops are for the run loop and the MSR calls.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import mmap
import os
import sys
import time
from collections.abc import Callable

import kvmscope
from kvmscope import guest, uapi

MEMORY = 0x10000
CODE_AT = 0x1000


def bare_start(kvm_fd: int) -> Callable[[], None]:
    """One VM start as kvm_bench.c's ``vm_create`` + run + ``vm_destroy`` does it, in Python with no kvmscope object."""
    ioctl, close = fcntl.ioctl, os.close
    sregs, regs = uapi.kvm_sregs(), uapi.kvm_regs()
    region = uapi.kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=MEMORY)
    reason = uapi.KVM_RUN_EXIT_REASON_OFFSET

    def start() -> None:
        vm = ioctl(kvm_fd, uapi.KVM_CREATE_VM)
        mem = mmap.mmap(-1, MEMORY, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(mem)
        region.userspace_addr = ctypes.addressof(anchor)
        del anchor
        ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region, True)
        vcpu = ioctl(vm, uapi.KVM_CREATE_VCPU)
        run = mmap.mmap(vcpu, ioctl(kvm_fd, uapi.KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        mem[CODE_AT] = guest.HLT[0]
        ioctl(vcpu, uapi.KVM_GET_SREGS, sregs, True)
        sregs.cs.base, sregs.cs.selector = 0, 0
        ioctl(vcpu, uapi.KVM_SET_SREGS, sregs, True)
        ioctl(vcpu, uapi.KVM_GET_REGS, regs, True)
        regs.rip, regs.rflags = CODE_AT, 2
        ioctl(vcpu, uapi.KVM_SET_REGS, regs, True)
        ioctl(vcpu, uapi.KVM_RUN)
        if int.from_bytes(run[reason : reason + 4], "little") != uapi.KVM_EXIT_HLT:
            raise SystemExit("no HLT")
        run.close()
        close(vcpu)
        close(vm)
        mem.close()

    return start


def main() -> None:
    kvm = kvmscope.open("linux")

    def api_start() -> None:
        with kvm.create_vm() as vm:
            vm.add_memory(0, MEMORY)
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, guest.HLT, CODE_AT)
            if vcpu.run().reason != uapi.KVM_EXIT_HLT:
                raise SystemExit("no HLT")

    starts = {"api": api_start, "bare": bare_start(kvm.fd)}
    for line in sys.stdin:
        count, *mode = line.split()
        n, start = int(count), starts[mode[0] if mode else "api"]
        gc.disable()
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(n):
            start()
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        gc.enable()
        with open("/proc/self/maps") as maps:
            mappings = sum(1 for _ in maps)
        print(w1 - w0, c1 - c0, mappings, flush=True)
    kvm.close()


if __name__ == "__main__":
    main()
