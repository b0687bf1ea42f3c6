"""The Python side of the VM-start figure, in a process of its own that imports kvmscope and nothing else.

    python benchmarks/vmstart_worker.py     (started by run.py: one iteration count per line on stdin)

Why a separate process: creating a VM costs the kernel time in proportion to the mappings of the calling process
(KVM_CREATE_VM registers an MMU notifier, which locks every mapping of the process), and the benchmark harness's own
imports (subprocess, statistics, shutil with zlib/bz2/lzma...) add about 90 mappings that a program using kvmscope does
not have. Here the process holds what kvmscope needs, as the C side holds what kvm_bench needs. Each line answers
"WALL_NS CPU_NS MAPPINGS" for the timed loop (this thread's CPU time; the mapping count of the process).
"""

from __future__ import annotations

import gc
import sys
import time

import kvmscope
from kvmscope import guest, uapi


def main() -> None:
    kvm = kvmscope.open("linux")
    for line in sys.stdin:
        n = int(line)
        gc.disable()
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(n):
            with kvm.create_vm() as vm:
                vm.add_memory(0, 0x10000)
                vcpu = vm.create_vcpu(0)
                guest.load_real_mode(vm, vcpu, guest.HLT)
                if vcpu.run().reason != uapi.KVM_EXIT_HLT:
                    raise SystemExit("no HLT")
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        gc.enable()
        with open("/proc/self/maps") as maps:
            mappings = sum(1 for _ in maps)
        print(w1 - w0, c1 - c0, mappings, flush=True)
    kvm.close()


if __name__ == "__main__":
    main()
