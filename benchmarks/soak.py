"""Soak: VM create/run/close cycles on the live kernel, with open file descriptors and resident memory sampled.

    python benchmarks/soak.py [CYCLES]     (default 10000; prints a table and a JSON line)
"""

from __future__ import annotations

import json
import os
import sys
import time

import kvmscope
from kvmscope import guest


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main(cycles: int = 10_000) -> None:
    samples = []
    t0 = time.perf_counter()
    with kvmscope.open("linux") as kvm:
        for i in range(cycles + 1):
            if i % (cycles // 10 or 1) == 0:
                samples.append({"cycle": i, "fds": len(os.listdir("/proc/self/fd")), "rss_kib": rss_kib()})
            if i == cycles:
                break
            with kvm.create_vm() as vm:
                vcpu = vm.create_vcpu(0)
                if guest.run_to_hlt(vm, vcpu).name != "HltExit":
                    raise SystemExit(f"cycle {i}: no HLT")
    elapsed = time.perf_counter() - t0
    print(f"{cycles} VM create/run/close cycles in {elapsed:.1f} s ({elapsed / cycles * 1e6:.0f} us each)")
    print(f"{'cycle':>7} {'open fds':>9} {'RSS KiB':>9}")
    for s in samples:
        print(f"{s['cycle']:>7} {s['fds']:>9} {s['rss_kib']:>9}")
    print(json.dumps({"cycles": cycles, "seconds": round(elapsed, 2), "samples": samples}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
