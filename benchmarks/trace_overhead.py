"""Wall time of the QEMU corpus cases with and without `kvmscope trace` (docs/performance.md, "Tracing").

Runs each case RUNS times untraced and traced, alternating so that load from other users of the machine falls on
both; prints medians, spread (min-max) and the ratio of medians. A case's time is from QEMU's start to its exit after
the monitor's ``quit`` (SeaBIOS boot to "No bootable device", then the case's phases).

    .venv/bin/python benchmarks/trace_overhead.py --runs 5 qemu64 reset
    .venv/bin/python benchmarks/trace_overhead.py --per-call 20000   # the cost of one trapped ioctl, of one other syscall
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmscope.trace.corpus import CASES, run_case
from kvmscope.trace.recorder import record

# A loop of N calls in a child Python: a KVM ioctl (KVM_GET_API_VERSION, trapped) or getppid (not trapped); it
# writes its own loop time to the file named by argv[3].
LOOP = """
import fcntl, os, sys, time
n, kind = int(sys.argv[1]), sys.argv[2]
fd = os.open("/dev/kvm", os.O_RDWR)
t = time.perf_counter()
for _ in range(n):
    fcntl.ioctl(fd, 0xAE00) if kind == "kvm" else os.getppid()
open(sys.argv[3], "w").write(str(time.perf_counter() - t))
"""


def per_call(n: int, runs: int) -> dict[str, object]:
    """Microseconds per call inside the child, untraced and traced (medians of ``runs``, alternating)."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        took = Path(tmp) / "took"
        for kind in ("kvm", "getppid"):
            times: dict[str, list[float]] = {"untraced": [], "traced": []}
            argv = [sys.executable, "-c", LOOP, str(n), kind, str(took)]
            for _ in range(runs):
                subprocess.run(argv, timeout=300, check=True)
                times["untraced"].append(float(took.read_text()) / n)
                with open(Path(tmp) / "rec.yaml", "w") as rec:
                    result = record(argv, rec, timeout=300)
                if result.exit_code != 0:
                    raise SystemExit(f"traced loop: {result.ended}")
                times["traced"].append(float(took.read_text()) / n)
            med = {m: statistics.median(t) for m, t in times.items()}
            out[kind] = {"calls": n, "runs": runs, "untraced_us": round(med["untraced"] * 1e6, 2),
                         "traced_us": round(med["traced"] * 1e6, 2),
                         "added_us": round((med["traced"] - med["untraced"]) * 1e6, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["qemu64"], help="corpus case names (default: qemu64)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--per-call", type=int, metavar="N", help="instead: N trapped ioctls, N getppid, per call")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.per_call:
        figures = per_call(args.per_call, args.runs)
        print(json.dumps(figures, indent=2))
        return
    by_name = {c.name: c for c in CASES}
    out = {}
    for name in args.cases:
        case = by_name[name]
        times: dict[str, list[float]] = {"untraced": [], "traced": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):
                for mode in ("untraced", "traced"):
                    seconds, _, drove = run_case(case, Path(tmp), Path(tmp) / "rec.yaml" if mode == "traced" else None)
                    if drove.error:
                        raise SystemExit(f"{name} ({mode}): {drove.error}")
                    times[mode].append(seconds)
        med = {m: statistics.median(t) for m, t in times.items()}
        out[name] = {"runs": args.runs, **{f"{m}_median_s": round(v, 3) for m, v in med.items()},
                     **{f"{m}_range_s": [round(min(t), 3), round(max(t), 3)] for m, t in times.items()},
                     "ratio": round(med["traced"] / med["untraced"], 3)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, r in out.items():
        print(f"{name}: untraced median {r['untraced_median_s']} s (range {r['untraced_range_s']}), traced median "
              f"{r['traced_median_s']} s (range {r['traced_range_s']}), ratio {r['ratio']} over {r['runs']} runs")


if __name__ == "__main__":
    main()
