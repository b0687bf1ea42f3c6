"""Where the time goes on kvmscope's hot paths: cost ladders, and perf profiles of the run loop.

    python benchmarks/where_time_goes.py [--n 200000] [--rounds 5] [--no-perf] [--json]

1. Ladders. Each hot path is timed step by step in one process pinned to one CPU, next to the C program doing the
   same ioctls: the C loop, the bare ``fcntl.ioctl`` call from Python, then kvmscope's public call, so each step's cost
   is the difference to the one before. The rungs take turns in every round; the best of the rounds is shown, in
   microseconds of the thread's CPU time per operation. Differences under about 0.1 us are within this machine's
   noise.
2. Model ``set_msrs`` of the index-list batch (the first 32 MSRs of KVM_GET_MSR_INDEX_LIST that read and write
   back), broken into its parts (CPU time, microseconds per call).
3. perf (when ``perf record`` works here): the typed run loop and the C loop sampled with ``cpu-clock``; the samples
   are split into the kernel and each user-space object, and the top user-space symbols are given in microseconds
   per exit. The Python process enables sampling only around its loop (perf's control FIFO), so start-up is left out.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvmscope
from kvmscope import guest, uapi
from kvmscope.api import IoExit, MsrBatch
from kvmscope.kernel.profile import load, shipped
from kvmscope.model import open_model
from kvmscope.model.msr_compiled import compile_direct

sys.path.insert(0, str(Path(__file__).parent))  # the sibling modules, however this file is loaded
from common import BATCH_MSRS, C_BINARY, PIO_GUEST, batches, build_c, pin, run_c, timed  # noqa: E402

Rung = tuple[str, "tuple[str, list[int]] | Callable[[int], None]"]


def ladder(rungs: list[Rung], n: int, rounds: int) -> list[tuple[str, float]]:
    """Best time per operation of each rung (a C mode or a Python loop), the rungs taken in turn in every round so
    that a slow spell of the machine hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name, _ in rungs}
    for _ in range(rounds):
        for name, rung in rungs:
            sample = run_c(rung[0], n, rung[1]) if isinstance(rung, tuple) else timed(rung, n)
            times[name].append(sample.cpu_us)
    return [(name, min(times[name])) for name, _ in rungs]


def run_ladder(n: int, rounds: int) -> list[tuple[str, float]]:
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, PIO_GUEST)
        fd, kvm_run, ioctl = vcpu.fd, uapi.KVM_RUN, fcntl.ioctl
        run, run_raw, io = vcpu.run, vcpu.run_raw, uapi.KVM_EXIT_IO

        def bare(n: int) -> None:
            for _ in range(n):
                ioctl(fd, kvm_run)

        def raw_reason(n: int) -> None:
            for _ in range(n):
                if run_raw() != io:
                    raise RuntimeError("not an IO exit")

        def raw_port(n: int) -> None:
            for _ in range(n):
                if run_raw() != io or vcpu.io_port != 0x10:
                    raise RuntimeError("not an OUT to 0x10")

        def typed(n: int) -> None:
            for _ in range(n):
                e = run()
                if type(e) is not IoExit or e.port != 0x10:
                    raise RuntimeError(f"unexpected {e}")

        return ladder([
            ("C: ioctl(KVM_RUN), check reason and port", ("pio", [])),
            ("Python: fcntl.ioctl(fd, KVM_RUN), nothing read", bare),
            ("kvmscope: run_raw(), check the reason", raw_reason),
            ("kvmscope: run_raw(), check reason and io_port", raw_port),
            ("kvmscope: run(), typed IoExit, check type and port", typed),
        ], n, rounds)


def msr_ladder(n: int, rounds: int) -> list[tuple[str, float]]:
    with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        batch = MsrBatch([(BATCH_MSRS[0], 0)])
        fd, req, buf, ioctl = vcpu.fd, uapi.KVM_SET_MSRS, batch.buffer, fcntl.ioctl
        set_msrs = vcpu.set_msrs

        def bare(n: int) -> None:
            for _ in range(n):
                ioctl(fd, req, buf, True)

        def api(n: int) -> None:
            for _ in range(n):
                set_msrs(batch)

        def strict(n: int) -> None:
            for _ in range(n):
                set_msrs(batch, True)

        return ladder([
            ("C: ioctl(KVM_SET_MSRS), 1 MSR", ("set", [BATCH_MSRS[0]])),
            ("Python: fcntl.ioctl(fd, KVM_SET_MSRS, buf, True)", bare),
            ("kvmscope: set_msrs(batch)", api),
            ("kvmscope: set_msrs(batch, strict=True)", strict),
        ], n, rounds)


def model_parts(n: int, rounds: int, batch_name: str = "index list") -> list[tuple[str, float]]:
    """The model's set_msrs of a benchmark batch ("index list": what a VMM saves and restores; "qemu": QEMU's write at
    vCPU creation), part by part, in CPU time."""
    indices = batches()[batch_name]
    with kvmscope.open("model", kernel="6.18") as kvm, kvm.create_vm() as vm:
        vcpu: Any = vm.create_vcpu(0)  # its MSR rules' parts are timed one by one below
        vcpu.set_cpuid(kvm.get_supported_cpuid())  # as benchmarks/run.py's batches (and kvm_bench.c)
        batch = MsrBatch(indices)
        vcpu.get_msrs(batch, strict=True)
        vcpu.set_msrs(batch)
        words = batch.words64
        key = batch.indices32.tobytes()
        seen = memoryview(key).cast("I")
        msrs = vcpu.msr_rules
        ruled, stores, zero, _, _, _, _, quick, checked, direct = msrs.plans[key]
        plans = msrs.plans
        refusals = msrs.refusals
        names: dict[str, Callable[[], object]] = {
            "empty loop (subtracted from nothing: the floor of a timed call)": lambda: None,
            f"whole call: vcpu.set_msrs(batch), {len(indices)} entries": lambda: vcpu.set_msrs(batch),
            "the batch's indices compared with the last batch's (a hit: its plan)": lambda: batch.indices32 == seen,
            "a miss: the indices, packed, as the plan's key": lambda: batch.indices32.tobytes(),
            "a miss: find the batch's cached plan (with the key)": lambda: plans.get(batch.indices32.tobytes()),
        }
        if direct is not None:  # the path the batch takes: the plan's compiled direct path (msr_compiled)
            write, spec = direct
            raw = batch.raw
            checks_only = compile_direct(spec, checks_only=True)
            stores_only = compile_direct(((), None, (), spec[3], spec[4], *spec[5:]))
            names.update({
                f"its compiled direct path, whole ({len(spec[0])} checks, {len(spec[5])} stores)":
                    lambda: write(raw, words, refusals),
                "... its checks alone (one unpack, one integer expression, memory types, groups)":
                    lambda: checks_only(raw, words, refusals),
                "... its refusals and stores alone (one unpack, a dict assignment each)":
                    lambda: stores_only(raw, words, refusals),
            })
        else:  # the quick path: handlers called one by one, group checks, then the stores
            calls = [(fn, index, words[2 + 2 * pos], form) for pos, index, fn, form in (quick[0] if quick else ())]
            groups = quick[6] if quick else ()

            def run_calls() -> None:
                for fn, index, data, form in calls:
                    fn(data) if form == 0 else fn(index, data, True) if form == 1 else fn(index, data)

            def check_groups() -> None:
                for ok, kind, group, pick in groups:
                    ok(kind, group, pick(words))

            names.update({
                "check the ZERO MSRs' values (one itemgetter)": lambda: zero is not None and any(zero(words)),
                f"{len(calls)} of the {len(ruled)} entries with rules, their handlers one by one": run_calls,
                f"{len(groups)} group checks": check_groups,
                f"the plain entries stored ({len(stores)} dict updates)": lambda: [
                    store.update(zip(keys, pick(words))) for store, keys, pick in stores],  # noqa: B905
            })
        names["get_msrs(batch): the same batch read"] = lambda: vcpu.get_msrs(batch)
        read = msrs.read_plans[key][7]
        if read is not None:
            names["... its compiled read alone (one itemgetter, the VM-wide lookups, one strided copy)"] = (
                lambda: read(words, refusals))

        def each(fn: Callable[[], object]) -> Callable[[int], None]:
            def loop(n: int) -> None:
                for _ in range(n):
                    fn()
            return loop

        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name, fn in names.items():
                times[name].append(timed(each(fn), n).cpu_us)
        out = [(name, min(t)) for name, t in times.items()]
        kernel = min(run_c("set", n, indices).cpu_us for _ in range(rounds))
        out.append((f"live kernel, C: KVM_SET_MSRS of the same {len(indices)} entries", kernel))
        out.append(("4x the kernel's rate needs a whole call under", kernel / 4))
        kernel = min(run_c("get", n, indices).cpu_us for _ in range(rounds))
        out.append((f"live kernel, C: KVM_GET_MSRS of the same {len(indices)} entries", kernel))
        out.append(("4x the kernel's rate needs a whole read under", kernel / 4))
        return out


def profile_parts(n: int, rounds: int) -> list[tuple[str, float]]:
    """The model's set_msrs and get_msrs on each shipped profile (6.18 rules, the supported CPUID set), of the batch
    a VMM saves and restores there: the first 32 MSRs of that profile's KVM_GET_MSR_INDEX_LIST that read and write
    back. No live kernel runs these hosts' rules, so there is no ratio: CPU time per call, best of the rounds."""
    out = []
    for name in shipped():
        system = open_model(kernel="6.18", profile=load(name))
        vcpu = system.create_vm().create_vcpu(0)
        vcpu.set_cpuid(system.get_supported_cpuid())
        indices = []
        for index in system.get_msr_index_list():
            one = MsrBatch([index])
            if vcpu.get_msrs(one) == 1 and vcpu.set_msrs(MsrBatch([(index, one[0][1])])) == 1:
                indices.append(index)
        batch = MsrBatch(indices[:32])
        vcpu.get_msrs(batch, strict=True)
        for op, call in (("set_msrs", vcpu.set_msrs), ("get_msrs", vcpu.get_msrs)):
            def loop(n: int, call: Callable[[MsrBatch], int] = call, batch: MsrBatch = batch) -> None:
                for _ in range(n):
                    call(batch)
            out.append((f"{name}: {op}(batch), {len(batch)} entries", min(timed(loop, n).cpu_us for _ in range(rounds))))
    return out


# --- perf --------------------------------------------------------------------------------------------------------------

PERF_LOOP = textwrap.dedent("""
    import sys, time
    import kvmscope
    from kvmscope import guest
    from kvmscope.api import IoExit

    def control(ctl, ack, cmd):
        with open(ctl, "w") as c:
            c.write(cmd + "\\n")
        with open(ack) as a:
            a.readline()

    def main(ctl, ack, n):  # a function, as in run.py: its names are fast locals, not module globals
        with kvmscope.open("linux") as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10, 0xEB, 0xFC]))
            run = vcpu.run
            run()
            control(ctl, ack, "enable")
            t0 = time.perf_counter()
            for _ in range(n):
                e = run()
                if type(e) is not IoExit or e.port != 0x10:
                    raise SystemExit(f"unexpected {e}")
            elapsed = time.perf_counter() - t0
            control(ctl, ack, "disable")
            print(n / elapsed)

    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
""")


def perf_available() -> str | None:
    perf = shutil.which("perf")
    if perf is None:
        return None
    probe = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "true"], capture_output=True)
    return perf if probe.returncode == 0 else None


def perf_profile(perf: str, n: int) -> dict[str, object]:
    """Sample the typed run loop and the C loop; split samples by object, and name the top user-space symbols."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack = os.path.join(tmp, "ctl"), os.path.join(tmp, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        for side, cmd, data in (
            ("kvmscope run()", [sys.executable, "-c", PERF_LOOP, ctl, ack, str(n)], os.path.join(tmp, "py.data")),
            ("C", [str(C_BINARY), "pio", str(n)], os.path.join(tmp, "c.data")),
        ):
            control = ["-D", "-1", "--control", f"fifo:{ctl},{ack}"] if side != "C" else []
            done = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-F", "10000", *control, "-o", data,
                                   "--", *cmd], check=True, capture_output=True, text=True)
            first = float(done.stdout.split()[0])  # Python prints exits per second, C its wall time in ns
            rate = n / (first / 1e9) if side == "C" else first
            out[side] = summarize(perf, data, 1e6 / rate)
    return out


def summarize(perf: str, data: str, wall_us: float) -> dict[str, object]:
    """Shares of the samples by object and by user-space symbol; a share times the wall time per exit (measured
    under perf, so a little slower than without) gives microseconds per exit."""
    def report(*sort: str) -> list[tuple[float, list[str]]]:
        text = subprocess.run([perf, "report", "-i", data, "--stdio", "--sort", ",".join(sort), "-F",
                               "overhead,sample," + ",".join(sort)], check=True, capture_output=True, text=True).stdout
        rows = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            rows.append((float(parts[0].rstrip("%")), [parts[1], *parts[2:]]))
        return rows

    by_dso = report("dso")
    samples = sum(int(r[1][0]) for r in by_dso)
    objects = {r[1][1]: round(r[0], 2) for r in sorted(by_dso, key=lambda r: -r[0])}
    symbols = []
    for share, rest in sorted(report("dso", "sym"), key=lambda r: -r[0]):
        dso = rest[1]
        if dso.startswith("[kernel"):
            continue
        symbols.append({"object": dso, "symbol": " ".join(rest[3:]) if rest[2] == "[.]" else " ".join(rest[2:]),
                        "share_percent": share, "us_per_exit": round(share / 100 * wall_us, 4)})
    user = sum(share for name, share in objects.items() if not name.startswith("[kernel"))
    return {"samples": samples, "wall_us_per_exit": round(wall_us, 3), "objects_percent": objects,
            "user_space_us_per_exit": round(user / 100 * wall_us, 3), "top_user_symbols": symbols[:15]}


def profile(n: int, rounds: int, with_perf: bool = True, parts: tuple[str, ...] = ("run", "msr", "model")
            ) -> dict[str, object]:
    """The ladders, the model's parts and (``with_perf``) the perf profiles, as one result."""
    result: dict[str, object] = {}
    if "run" in parts:
        result["run loop (us per exit)"] = run_ladder(n, rounds)
    if "msr" in parts:
        result["set_msrs x1 (us per call)"] = msr_ladder(n, rounds)
    if "model" in parts:
        result["model set_msrs, index-list batch (us per call)"] = model_parts(max(n // 10, 1000), rounds)
        result["model set_msrs, QEMU's vCPU-creation batch (us per call)"] = model_parts(
            max(n // 40, 250), rounds, "qemu")
        result["model on each shipped profile, its own index-list batch (us per call)"] = profile_parts(
            max(n // 10, 1000), rounds)
    if "run" in parts:
        perf = perf_available() if with_perf else None
        if not with_perf:
            result["perf"] = "skipped (--no-perf)"
        else:
            result["perf"] = perf_profile(perf, n) if perf else "perf record is not available here"
    return result


def print_profile(result: dict[str, object]) -> None:
    for title, rows in result.items():
        print(f"\n{title}")
        if isinstance(rows, list):
            previous = None
            for name, us in rows:
                step = f"  (+{us - previous:.3f})" if previous is not None and "C:" not in name else ""
                print(f"  {name:72} {us:8.3f}{step}")
                previous = us if not title.startswith("model") else None
        elif isinstance(rows, dict):
            for side, summary in rows.items():
                assert isinstance(summary, dict)
                print(f"  {side}: {summary['wall_us_per_exit']} us per exit under perf, "
                      f"{summary['user_space_us_per_exit']} us of it in user space; by object (%): "
                      f"{summary['objects_percent']}")
                for s in summary["top_user_symbols"]:
                    print(f"      {s['us_per_exit']:7.4f} us  {s['share_percent']:5.2f}%  {s['object']}  {s['symbol']}")
        else:
            print(f"  {rows}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="operations per timed run (default 200000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-perf", action="store_true", help="skip the perf profiles")
    ap.add_argument("--cpu", default="last", help="pin to this CPU (default: the last allowed; 'none')")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    build_c()
    pin(args.cpu)
    result = profile(args.n, args.rounds, not args.no_perf)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_profile(result)


if __name__ == "__main__":
    main()
