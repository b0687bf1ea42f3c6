"""Wall time of the QEMU corpus cases with and without `kvmscope trace` (docs/performance.md, "Tracing").

Runs each case RUNS times untraced and traced, alternating so that load from other users of the machine falls on
both; prints medians, spread (min-max) and the ratio of medians. A case's time is from QEMU's start to its exit after
the monitor's ``quit`` (SeaBIOS boot to "No bootable device", then the case's phases).

    .venv/bin/python benchmarks/trace_overhead.py --runs 5 qemu64 reset
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from kvmscope.trace.corpus import CASES, run_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["qemu64"], help="corpus case names (default: qemu64)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
