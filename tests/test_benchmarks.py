"""The benchmark commands run from a fresh clone and report what docs/performance.md says they report (smoke runs:
tiny counts, so the figures themselves mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmscope.kernel.profile import shipped
from kvmscope.linux import LinuxSystem

ROOT = Path(__file__).resolve().parent.parent
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="the benchmarks build their C baseline with cc")


def run_json(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"{script} {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
    result: dict[str, object] = json.loads(done.stdout)
    return result


@needs_cc
def test_run_reports_paired_ratios_range_and_target(live: LinuxSystem) -> None:
    out = run_json("run.py", "--quick", "--rounds", "1", "--only", "set_msrs x1", "model set_msrs x1")
    figures = out["figures"]
    assert isinstance(figures, list)
    names = [f["name"] for f in figures]
    assert "set_msrs x1" in names and "model set_msrs x1 vs live kernel" in names, f"figures reported: {names}"
    for f in figures:
        assert f["python_us"] > 0 and f["reference_us"] > 0, f"{f['name']}: expected positive CPU times, got {f}"
        assert f["rounds"] == 1, f"{f['name']}: expected the one round asked for, got {f['rounds']}"
        # One round: the median of the paired ratios is that round's ratio, kvmscope's rate over the baseline's.
        assert abs(f["ratio"] - f["reference_us"] / f["python_us"]) < 1e-9, f"{f['name']}: ratio is not paired: {f}"
        assert f["ratio_low"] <= f["ratio"] <= f["ratio_high"], f"{f['name']}: ratio outside its range: {f}"
        assert f["wall_ratio"] > 0 and f["python_wall_us"] > 0, f"{f['name']}: wall time missing: {f}"
        assert (f["met"] is None) == (not f["target"]), f"{f['name']}: a target needs a verdict and back: {f}"
    index_list = out["batches"]["index list"]  # type: ignore[index]
    assert 0 < len(index_list) <= 32, f"index-list batch: {index_list}"
    assert isinstance(out["machine"], dict) and "pinned_to_cpu" in out["machine"], f"machine: {out['machine']}"
    # Any missed binding MSR figure (set_msrs x1, strict-set_msrs x1) brings the MSR part of the profile; a floor row
    # missing the target of the figure it stands beside does not (it is no miss of kvmscope's).
    missed_msr = any(f["met"] is False for f in figures
                     if "_msrs x" in f["name"] and not f["name"].startswith(("model", "freeze"))
                     and "floor" not in f["name"])
    profile = out["profile"]
    if missed_msr:  # a missed target is followed by the profile of where its time goes
        assert isinstance(profile, dict) and "set_msrs x1 (us per call)" in profile, f"profile: {profile}"
    else:
        assert profile is None or "set_msrs x1 (us per call)" not in profile, f"profile without a miss: {profile}"


@needs_cc
def test_where_time_goes_reports_ladders_and_model_parts(live: LinuxSystem) -> None:
    out = run_json("where_time_goes.py", "--n", "2000", "--rounds", "1", "--no-perf")
    ladder = out["run loop (us per exit)"]
    assert isinstance(ladder, list) and len(ladder) == 5, f"run-loop ladder: {ladder}"
    assert ladder[0][0].startswith("C:") and all(us > 0 for _, us in ladder), f"run-loop ladder: {ladder}"
    parts = dict(out["model set_msrs, index-list batch (us per call)"])  # type: ignore[call-overload]
    whole = [us for name, us in parts.items() if name.startswith("whole call: vcpu.set_msrs(batch)")]
    assert len(whole) == 1 and whole[0] > 0, f"model parts: {parts}"
    profiles = dict(out["model on each shipped profile, its own index-list batch (us per call)"])  # type: ignore[call-overload]
    assert len(profiles) == 2 * len(shipped()) and all(us > 0 for us in profiles.values()), f"profiles: {profiles}"
    assert out["perf"] == "skipped (--no-perf)", f"--no-perf still profiled: {out['perf']}"


@needs_cc
def test_where_time_goes_perf_splits_kernel_and_user_time(live: LinuxSystem) -> None:
    spec = importlib.util.spec_from_file_location("where_time_goes", ROOT / "benchmarks" / "where_time_goes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports common.py from there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    if module.perf_available() is None:
        pytest.skip("perf record does not work here (no perf, or perf_event_paranoid forbids it)")
    out = run_json("where_time_goes.py", "--n", "20000", "--rounds", "1")
    perf = out["perf"]
    assert isinstance(perf, dict) and set(perf) == {"kvmscope run()", "C"}, f"perf sides: {perf}"
    for side, summary in perf.items():
        objects = summary["objects_percent"]
        assert any(name.startswith("[kernel") for name in objects), f"{side}: no kernel samples in {objects}"
        assert 0 < summary["user_space_us_per_exit"] < summary["wall_us_per_exit"], f"{side}: {summary}"
    assert perf["kvmscope run()"]["top_user_symbols"], f"no user-space symbols sampled: {perf['kvmscope run()']}"


def test_binding_ab_prints_what_the_docs_quote(live: LinuxSystem) -> None:
    """benchmarks/binding_ab.py (the A/Bs docs/performance.md quotes), on tiny counts: every side and phase named."""
    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "binding_ab.py"), *args], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, f"binding_ab.py {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout

    out = run("exits", "--rounds", "1")
    for line in ("bare fcntl.ioctl", "run(), dataclass exit (before)", "run(), tuple exit (now)", "now - before"):
        assert line in out, f"expected a line for {line!r} in:\n{out}"
    out = run("vmstart", "--starts", "2")
    for phase in ("create VM", "memory", "vCPU", "registers and code", "run to HLT", "close", "whole start"):
        assert phase in out, f"expected a line for {phase!r} in:\n{out}"
