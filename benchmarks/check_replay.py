"""`kvmscope check` replay speed and memory on long generated scenarios.

    python benchmarks/check_replay.py [STEPS ...]      (default: 10000 100000)

Each size runs `kvmscope check` (model backend, streaming output) in its own process and reports steps per second and
the process's own peak resident memory (VmHWM from /proc/self/status, which a spawned child does not inherit, unlike
``ru_maxrss``); flat memory means the peak does not grow with the scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_CYCLE = [
    "  - set_msrs: {vcpu: 0, msrs: {UCODE_REV: %d, MSR_STAR: %d}}",
    "  - get_msrs: {vcpu: 0, msrs: [UCODE_REV, PLATFORM_INFO]}",
    "  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0x80000000}}\n    expect: accepted",
    "  - microcode_load: {vcpu: 0, revision: %d}",
    "  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0}}\n    expect: {refused: PLATFORM_INFO}",
]


def generate(path: Path, steps: int) -> None:
    with path.open("w") as f:
        f.write("scenario: 1\nname: generated\nsteps:\n  - create_vcpu: 0\n  - run: 0\n")
        for i in range(steps - 2):
            template = STEP_CYCLE[i % len(STEP_CYCLE)]
            f.write((template % ((i,) * template.count("%d"))) + "\n")


def measure(steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.yaml"
        generate(path, steps)
        code = ("import sys, time\nfrom kvmscope.cli import main\nt = time.perf_counter()\n"
                "try:\n    main(['check', sys.argv[1]])\nexcept SystemExit as e:\n    rc = e.code\n"
                "dt = time.perf_counter() - t\n"
                "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
                "print(rc, dt, hwm, file=sys.stderr)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
        rc, dt, peak = proc.stderr.strip().splitlines()[-1].split()
        if rc != "0":
            raise SystemExit(f"check of {steps} steps exited {rc}: {proc.stdout[-2000:]}")
        return {"steps": steps, "seconds": round(float(dt), 2), "steps_per_second": round(steps / float(dt)),
                "peak_kib": int(peak)}


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    t0 = time.perf_counter()
    rows = [measure(n) for n in sizes]
    for r in rows:
        print(f"{r['steps']:>8} steps  {r['seconds']:>7.2f} s  {r['steps_per_second']:>7} steps/s  "
              f"peak memory (VmHWM) {r['peak_kib']} KiB")
    growth = rows[-1]["peak_kib"] - rows[0]["peak_kib"]
    print(f"peak memory growth from {rows[0]['steps']} to {rows[-1]['steps']} steps: {growth} KiB")
    print(json.dumps({"rows": rows, "growth_kib": growth, "wall": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
