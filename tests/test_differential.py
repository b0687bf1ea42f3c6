"""Differential property test: random sequences of vCPU-model operations on the live kernel and on the model.

Every observable result (counts, errnos, values read back, exits, CPUID) must be identical. A divergence is shrunk by
hypothesis and reported as a runnable Python reproducer. ``KVMSCOPE_DIFF_EXAMPLES=5000 pytest tests/test_differential.py``
runs more sequences than the default 500.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kvmscope import guest
from kvmscope.api import MsrBatch, System, Vcpu, Vm
from kvmscope.errors import KvmError
from kvmscope.kernel.profile import load
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model
from kvmscope.program import Program, run_program

PROFILE = load("pvm-6.18")
SUPPORTED = PROFILE.supported_cpuid
FEATURE = [0x8B, 0x10A, 0x345, 0xCE]
ORDINARY = sorted(i for i, b in PROFILE.msr_behaviour.items() if b.kind in ("store", "drop", "zero_only", "refuse"))
MSRS = [*FEATURE, *ORDINARY, 0x12345678]
EXAMPLES = int(os.environ.get("KVMSCOPE_DIFF_EXAMPLES", "500"))

# --- operations ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    vcpu: int


@dataclass(frozen=True)
class CreateVcpu(Op):
    pass


@dataclass(frozen=True)
class SetCpuid(Op):
    variant: str  # supported | stored | empty
    flip: tuple[int, str, int] | None  # (entry position, register, bit) to flip


@dataclass(frozen=True)
class SetMsrs(Op):
    entries: tuple[tuple[int, str, int], ...]  # (msr, kind: value|same|zero, value)


@dataclass(frozen=True)
class GetMsrs(Op):
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Run(Op):
    immediate: bool


@dataclass(frozen=True)
class GetCpuid(Op):
    pass


@dataclass(frozen=True)
class SetCr4(Op):
    cr4: int


@dataclass(frozen=True)
class Guest(Op):
    """A guest program reading and writing feature MSRs and running CPUID."""

    accesses: tuple[tuple[str, int, int], ...]  # (rdmsr|wrmsr|cpuid, msr or leaf, value)


vcpu_ids = st.integers(0, 1)
values = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 0x80000000, 0x8000FF00, 0x1000065, 2**64 - 1]))
# Feature MSRs are what the rules are about: draw them half the time.
msr_index = st.one_of(st.sampled_from(FEATURE), st.sampled_from(MSRS))
msr_entry = st.tuples(msr_index, st.sampled_from(["value", "same", "zero"]), values)
flip = st.one_of(st.none(), st.tuples(st.integers(0, len(SUPPORTED) - 1), st.sampled_from(["eax", "ebx", "ecx", "edx"]),
                                      st.integers(0, 31)))
ops = st.one_of(
    st.builds(CreateVcpu, vcpu_ids),
    st.builds(SetCpuid, vcpu_ids, st.sampled_from(["supported", "stored", "empty"]), flip),
    st.builds(SetMsrs, vcpu_ids, st.lists(msr_entry, min_size=1, max_size=6).map(tuple)),
    st.builds(GetMsrs, vcpu_ids, st.lists(msr_index, min_size=1, max_size=6).map(tuple)),
    st.builds(Run, vcpu_ids, st.booleans()),
    st.builds(GetCpuid, vcpu_ids),
    st.builds(SetCr4, vcpu_ids, st.sampled_from([0, 1 << 18, 1 << 22, 1 << 18 | 1 << 22])),
    st.builds(Guest, vcpu_ids, st.lists(st.tuples(st.sampled_from(["rdmsr", "wrmsr", "cpuid"]),
                                                  st.sampled_from([*FEATURE, 0, 1, 7]), values),
                                        min_size=1, max_size=5).map(tuple)),
)


# --- execution -----------------------------------------------------------------------------------------------------------


def apply(vm: Vm, vcpus: dict[int, Vcpu], op: Op) -> Any:
    """Run one operation; return everything observable about it."""
    vcpu = vcpus.get(op.vcpu)
    if isinstance(op, CreateVcpu):
        if vcpu is not None:
            return "exists"
        vcpus[op.vcpu] = vm.create_vcpu(op.vcpu)
        guest.setup_real_mode(vcpus[op.vcpu])
        return "created"
    if vcpu is None:
        return "no vcpu"
    try:
        if isinstance(op, SetCpuid):
            entries = {"supported": SUPPORTED, "stored": vcpu.get_cpuid(), "empty": []}[op.variant]
            entries = list(entries)
            if op.flip and entries:
                pos, reg, bit = op.flip
                pos %= len(entries)
                entries[pos] = replace(entries[pos], **{reg: getattr(entries[pos], reg) ^ 1 << bit})
            vcpu.set_cpuid(entries)
            return "ok"
        if isinstance(op, SetMsrs):
            pairs = []
            for index, kind, value in op.entries:
                pairs.append((index, (vcpu.try_read_msr(index) or 0) if kind == "same" else 0 if kind == "zero" else value))
            batch = MsrBatch(pairs)
            return (pairs, vcpu.set_msrs(batch))
        if isinstance(op, GetMsrs):
            batch = MsrBatch(list(op.indices))
            return (vcpu.get_msrs(batch), list(batch))
        if isinstance(op, Run):
            vcpu.immediate_exit = op.immediate
            guest.setup_real_mode(vcpu)
            return vcpu.run().name
        if isinstance(op, GetCpuid):
            return [e.to_dict() for e in vcpu.get_cpuid()]
        if isinstance(op, Guest):
            prog = Program()
            for kind, target, value in op.accesses:
                if kind == "cpuid":
                    prog.cpuid(target)
                elif kind == "rdmsr":
                    prog.rdmsr(target if target in FEATURE else FEATURE[target % 4])
                else:
                    prog.wrmsr(target if target in FEATURE else FEATURE[target % 4], value)
            vcpu.immediate_exit = False
            return run_program(vm, vcpu, prog.hlt())
        if isinstance(op, SetCr4):
            sregs = vcpu.get_sregs()
            sregs.cr4 = op.cr4
            vcpu.set_sregs(sregs)
            return "ok"
    except KvmError as e:
        return ("KvmError", e.errno, e.ioctl)
    raise AssertionError(op)


def play(system: System, sequence: list[Op]) -> list[Any]:
    with system.create_vm() as vm:
        guest.ensure_memory(vm, 0x200000)
        vm.write_memory(guest.DEFAULT_ENTRY, guest.HLT)
        vcpus: dict[int, Vcpu] = {}
        return [apply(vm, vcpus, op) for op in sequence]


def reproducer(sequence: list[Op]) -> str:
    """A script that replays ``sequence`` on both backends and prints where they differ (run it from anywhere)."""
    lines = [
        "# Reproducer: replays the sequence on the live kernel and on the model, and prints both results.",
        "import sys",
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
        "import kvmscope",
        "from kvmscope.model import open_model",
        "from test_differential import *",
        "sequence = [",
        *(f"    {op!r}," for op in sequence),
        "]",
        "live = play(kvmscope.open('linux'), sequence)",
        f"model = play(open_model(profile={PROFILE.name!r}), sequence)",
        "for i, (a, b) in enumerate(zip(live, model)):",
        "    print(i, 'same' if a == b else 'DIFFERS', sequence[i], a, b if a != b else '')",
    ]
    return "\n".join(lines)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=os.environ.get("KVMSCOPE_DIFF_RANDOM") is None)
@given(st.lists(ops, min_size=1, max_size=14).map(lambda seq: [CreateVcpu(0), *seq]))
def _check(live: LinuxSystem, sequence: list[Op]) -> None:
    model = open_model(profile=PROFILE)
    got_live = play(live, sequence)
    got_model = play(model, sequence)
    if got_live != got_model:
        script = reproducer(sequence)
        note(script)
        for i, (a, b) in enumerate(zip(got_live, got_model, strict=True)):
            if a != b:
                raise AssertionError(
                    f"step {i} ({sequence[i]!r}) differs:\n  live : {a}\n  model: {b}\nreproducer:\n{script}")


def test_model_matches_live_kernel_on_random_sequences(live: LinuxSystem) -> None:
    _check(live)


def test_reproducer_runs_and_compares(live: LinuxSystem, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "repro.py"
    script.write_text(reproducer([CreateVcpu(0), Run(0, False), SetMsrs(0, ((0xCE, "zero", 0),))]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd="/", check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 3 and all(" same " in line for line in lines), out
    assert "([(206, 0)], 0)" in lines[2], f"the changed PLATFORM_INFO after the run is refused on both: {out}"
