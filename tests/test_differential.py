"""Differential property test: random sequences of vCPU-model operations on the live kernel and on the model.

Every observable result (counts, errnos, values read back, exits, CPUID, guest program events) must be identical. The
MSRs are every MSR this host's KVM lists (KVM_GET_MSR_INDEX_LIST, KVM_GET_MSR_FEATURE_INDEX_LIST) and every MSR
``kvm_set_msr_common``/``kvm_get_msr_common`` and the vendor code emulate outside those lists (``EMULATED``), from the
host (KVM_GET/SET_MSRS) and from guest programs (RDMSR/WRMSR), with random values, with CPUID set or not, quirks on or
off, before and after a run. The one MSR left out is IA32_TSC (0x10): its value changes by itself, and a guest TSC
write moves TSC_ADJUST with it. A divergence is shrunk by hypothesis and reported as a runnable Python reproducer.
``KVMSCOPE_DIFF_EXAMPLES=20000 pytest tests/test_differential.py`` runs more sequences than the default 500.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kvmscope import guest, uapi
from kvmscope.api import MsrBatch, System, Vcpu, Vm
from kvmscope.errors import KvmError
from kvmscope.kernel.profile import load
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model
from kvmscope.program import Program, run_program
from vcpu_setup import set_rflags, set_shadow

PROFILE = load("pvm-6.18")
SUPPORTED = PROFILE.supported_cpuid
FEATURE = [0x8B, 0x10A, 0x345, 0xCE]
TSC = 0x10  # changes by itself: left out
# The MSRs kvm_set_msr_common/kvm_get_msr_common (x86.c), __kvm_set_msr, set_msr_mce, kvm_mtrr_*, the KVM PV and
# x2APIC handlers and the vendor set_msr hooks know, written out from the kernel's switch statements (not from the
# model), with a few neighbours that are none of these (0x210, 0x251, 0x2A0, 0x12345678).
EMULATED = sorted({
    0x0, 0x1, 0x11, 0x12, 0x17, 0x1B, 0x2A, 0x2C, 0x34, 0x3A, 0x3B, 0x48, 0x49, 0x79, 0x8B, 0x9E, 0xC1, 0xC2, 0xCD,
    0xCE, 0xFE, 0x10A, 0x10B, 0x11E, 0x122, 0x140, 0x174, 0x175, 0x176, 0x179, 0x17A, 0x17B, 0x186, 0x187, 0x198,
    0x199, 0x1A0, 0x1C4, 0x1C5, 0x1D9, 0x1DB, 0x1DC, 0x1DD, 0x1DE, 0x1FC, *range(0x200, 0x211), 0x24F, 0x250, 0x251,
    0x258, 0x259, *range(0x268, 0x270), 0x277, 0x280, 0x281, 0x29F, 0x2A0, 0x2FF, 0x345, *range(0x400, 0x408),
    0x47C, 0x47D, 0x47E, 0x47F, 0x480, 0x4D0, 0x606, 0x611, 0x619, 0x639, 0x641, 0x6A0, 0x6A2, 0x6A4, 0x6A8, 0x6E0,
    0x800, 0x802, 0x808, 0x830, 0xDA0, *range(0xC0000080, 0xC0000085), *range(0xC0000100, 0xC0000105),
    *range(0xC0010000, 0xC0010008), 0xC0010010, 0xC0010015, 0xC001001B, 0xC001001F, 0xC0010020, 0xC0010055,
    0xC0010058, 0xC0010112, 0xC0010113, 0xC0010117, 0xC001011F, 0xC0010140, 0xC0010141, 0xC0011022, 0xC0011023,
    0xC0011029, 0xC001102A, 0xC001102C, *range(0x4B564D00, 0x4B564D09), 0x12345678,
    # vendor and PMU MSRs (vmx_set_msr, svm_set_msr, the PMU code; Hyper-V when built in)
    0xE1, 0x107, 0x1C9, 0x38D, 0x38F, 0x390, 0x3F1, 0x560, 0x570, 0x571, 0x600, 0x680, 0x6C0, 0xD90, 0xC0000300,
    0xC0010114, 0xC0010131, 0xC0010200, 0x40000000, 0x40000001,
})
LISTED = sorted(set(PROFILE.msr_index_list) | set(PROFILE.feature_msrs))
MSRS = sorted((set(EMULATED) | set(LISTED) | set(PROFILE.behaviours)) - {TSC})
QUIRKS = [0, uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS, uapi.KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT,
          uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS | uapi.KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT]
EXAMPLES = int(os.environ.get("KVMSCOPE_DIFF_EXAMPLES", os.environ.get("PYKVM_DIFF_EXAMPLES", "500")))
RUN_EXAMPLES = int(os.environ.get("KVMSCOPE_DIFF_RUN_EXAMPLES", "300"))

# --- operations ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    vcpu: int


@dataclass(frozen=True)
class CreateVcpu(Op):
    pass


@dataclass(frozen=True)
class DisableQuirks(Op):
    """KVM_CAP_DISABLE_QUIRKS2 on the VM, before any vCPU exists (``vcpu`` is unused)."""

    quirks: int


@dataclass(frozen=True)
class SetCpuid(Op):
    variant: str  # supported | stored | empty
    flip: tuple[int, str, int] | None  # (entry position, register, bit) to flip


@dataclass(frozen=True)
class SetMsrs(Op):
    entries: tuple[tuple[int, str, int], ...]  # (msr, kind: value|same|zero|flip, value; flip: the bit to flip)


@dataclass(frozen=True)
class GetMsrs(Op):
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Run(Op):
    immediate: bool
    cr8: int | None = None  # kvm_run.cr8 written before the run (the vCPU's own otherwise)
    window: bool = False  # kvm_run.request_interrupt_window
    flags: int = 2  # RFLAGS for the guest (IF or not)
    code: bytes = b"\xf4"  # the real-mode guest at the entry point (an IN's exit is answered with 0x5a)


@dataclass(frozen=True)
class Resume(Op):
    """KVM_RUN again where the guest stopped, no register set in between (an IN's exit answered with 0x5a)."""

    immediate: bool


@dataclass(frozen=True)
class SetFlags(Op):
    """KVM_SET_REGS of RFLAGS, the rest as read."""

    rflags: int


@dataclass(frozen=True)
class SetShadow(Op):
    """KVM_SET_VCPU_EVENTS of the interrupt shadow alone."""

    shadow: int


@dataclass(frozen=True)
class ChangeSregs(Op):
    """KVM_SET_SREGS with one field changed: CR0.TS, CR3, CR4.PAE or EFER.SCE (an MMU reset), or CR2."""

    field: str


@dataclass(frozen=True)
class GetCpuid(Op):
    pass


@dataclass(frozen=True)
class SetCr4(Op):
    cr4: int


@dataclass(frozen=True)
class SetSregs(Op):
    """KVM_SET_SREGS with one field changed: MSR-backed (``efer``, ``apic_base``) or ``cr8``."""

    field: str
    value: int


@dataclass(frozen=True)
class Guest(Op):
    """A guest program reading and writing MSRs and running CPUID."""

    accesses: tuple[tuple[str, int, int], ...]  # (rdmsr|wrmsr|cpuid, msr or leaf, value)


vcpu_ids = st.integers(0, 1)
# No interrupt window: PVM opens it at any exit it handles itself, a host interrupt included, so with IF set a run may
# end there at any instruction (tests/conformance/test_conf_irq_window.py, which retries).
NO_WINDOW = st.just(False)
# real-mode guests: halt, port accesses (an IN left waiting across the next operations), cli/sti and their shadows
GUESTS = [b"\xf4", b"\xe6\x10\xf4", b"\xe4\x20\xf4", b"\xfb\xe4\x20\xf4", b"\xfa\xf4", b"\xfb\xf4", b"\xe6\x7e\xf4",
          b"\x90\xfb\x90\xf4"]
# ... for runs resumed where they stopped: each ends in a HLT it jumps back to
LOOPING_GUESTS = [code + b"\xeb\xfd" for code in GUESTS] + [b"\xfb\xe4\x20\xfa\xe6\x21\xfb\xf4\xeb\xfd",
                                                         b"\xe4\x20\xe4\x21\xf4\xeb\xfd"]
_type = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8])  # memory types, valid (0, 1, 4-7) and not
values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2, 3, 6, 0x80000000, 0x8000FF00, 0x1000065, 2**64 - 1, 0xFEE00900, 0xFEE00D00, 0xFEE00100,
                     0xFEE00C00, 0xFEE00400, 0x800, 0xC00, 0xD01, 0x501, 0x401, 0x1000, 0x4000, 0x7FFFFFFFFFFF,
                     0x800000000000, 0xFFFF800000000000, 0xFFFF7FFFFFFFFFFF, 0x0007040600070406, 0xFFFFFFFFFFFFFBFE,
                     0x40000, 0x1000000, 0x1000001, 0x3E, 0x41, 0x1001, 0xC06, 0x806, 0x4000000000, 0x7F0000000000]),
    st.integers(0, 63).map(lambda b: 1 << b),
    st.integers(0, 0xFFF),
    st.lists(_type, min_size=8, max_size=8).map(lambda bs: sum(b << (8 * i) for i, b in enumerate(bs))),
    st.tuples(st.integers(12, 52), _type, st.booleans()).map(lambda t: (1 << t[0]) | t[1] | t[2] << 11),
    # an address with a few flags (APIC_BASE, MTRR bases, PV MSR areas): reserved bits above MAXPHYADDR, alignment
    st.tuples(st.integers(0, 2**57 - 1), st.sampled_from([0, 1, 2, 4, 6, 0x800, 0x900, 0xC00, 0xD00, 0x100])).map(
        lambda t: (t[0] >> (t[0] & 31)) & ~0xFFF | t[1]),
)
# The rules are about particular MSRs: each sequence picks up to three MSRs to work on (spread evenly over MSRS, so the
# default budget reaches every one), and draws the others, and the feature MSRs, now and then.
# CR4: the bits the runtime CPUID follows (OSXSAVE, PKE), any single bit, any combination of the low 24 (every bit
# KVM knows up to CET) and any 64-bit value (model/cr4.py)
cr4_values = st.one_of(st.sampled_from([0, 1 << 18, 1 << 22, 1 << 18 | 1 << 22]), st.integers(0, 63).map(lambda b: 1 << b),
                       st.integers(0, (1 << 24) - 1), st.integers(0, 2**64 - 1))
focus_msrs = st.lists(st.integers(0, 2**32 - 1).map(lambda i: MSRS[i % len(MSRS)]), min_size=1, max_size=3)
flip = st.one_of(st.none(), st.tuples(st.integers(0, len(SUPPORTED) - 1), st.sampled_from(["eax", "ebx", "ecx", "edx"]),
                                      st.integers(0, 31)))


def ops_for(focus: list[int], msr_ops: int = 1) -> st.SearchStrategy[Op]:
    """Operations on MSRs drawn from ``focus`` half the time; ``msr_ops`` weighs the MSR operations up."""
    msr_index = st.one_of(st.sampled_from(focus), st.sampled_from(focus), st.sampled_from(MSRS),
                          st.sampled_from(FEATURE))
    msr_entry = st.one_of(st.tuples(msr_index, st.sampled_from(["value", "same", "zero"]), values),
                          st.tuples(msr_index, st.just("flip"), st.integers(0, 63)))
    msr_ops_ = [
        st.builds(SetMsrs, vcpu_ids, st.lists(msr_entry, min_size=1, max_size=6).map(tuple)),
        st.builds(GetMsrs, vcpu_ids, st.lists(msr_index, min_size=1, max_size=6).map(tuple)),
        st.builds(Guest, vcpu_ids, st.lists(st.tuples(st.sampled_from(["rdmsr", "wrmsr", "wrmsr", "cpuid"]),
                                                      msr_index, values),
                                            min_size=1, max_size=5).map(tuple)),
    ] * (msr_ops - 1)
    return st.one_of(*msr_ops_,
        st.builds(CreateVcpu, vcpu_ids),
        st.builds(SetCpuid, vcpu_ids, st.sampled_from(["supported", "stored", "empty"]), flip),
        st.builds(SetMsrs, vcpu_ids, st.lists(msr_entry, min_size=1, max_size=6).map(tuple)),
        st.builds(GetMsrs, vcpu_ids, st.lists(msr_index, min_size=1, max_size=6).map(tuple)),
        st.builds(Run, vcpu_ids, st.booleans(), st.one_of(st.none(), st.integers(0, 17), st.integers(0, 2**64 - 1)),
                  NO_WINDOW, st.sampled_from([2, 0x202]), st.sampled_from(GUESTS)),
        st.builds(GetCpuid, vcpu_ids),
        st.builds(SetCr4, vcpu_ids, cr4_values),
        st.builds(SetSregs, vcpu_ids, st.sampled_from(["efer", "apic_base"]), values),
        st.builds(SetSregs, vcpu_ids, st.just("cr8"), st.one_of(st.integers(0, 17), st.integers(0, 2**64 - 1))),
        st.builds(Guest, vcpu_ids, st.lists(st.tuples(st.sampled_from(["rdmsr", "wrmsr", "wrmsr", "cpuid"]),
                                                      msr_index, values),
                                            min_size=1, max_size=5).map(tuple)),
    )


sequences = st.tuples(st.sampled_from(QUIRKS), focus_msrs.flatmap(lambda f: st.lists(ops_for(f), min_size=1,
                                                                                      max_size=14))).map(
    lambda t: [DisableQuirks(0, t[0]), CreateVcpu(0), *t[1]])


# --- execution -----------------------------------------------------------------------------------------------------------


def after_run(vcpu: Vcpu, exit_: Any) -> list[Any]:
    """What a run left: its exit (an IN's answered with 0x5a), RIP, AL, RFLAGS, the shadow and kvm_run's fields."""
    if getattr(exit_, "direction", None) == uapi.KVM_EXIT_IO_IN:
        exit_.reply(b"\x5a")
    regs = vcpu.get_regs()
    return [exit_.name, vcpu.get_sregs().cr8, vcpu.run_cr8, vcpu.if_flag, vcpu.ready_for_interrupt_injection,
            vcpu.run_apic_base, vcpu.run_flags, regs.rip, regs.rax & 0xFF, regs.rflags,
            vcpu.get_vcpu_events().interrupt.shadow]


SREGS_CHANGES: dict[str, Any] = {
    "cr0": lambda s: setattr(s, "cr0", s.cr0 ^ 8), "cr3": lambda s: setattr(s, "cr3", s.cr3 ^ 0x5000),
    "cr4": lambda s: setattr(s, "cr4", s.cr4 ^ 0x20), "efer": lambda s: setattr(s, "efer", s.efer ^ 1),
    "cr2": lambda s: setattr(s, "cr2", s.cr2 ^ 0x5000)}


def apply(vm: Vm, vcpus: dict[int, Vcpu], op: Op) -> Any:
    """Run one operation; return everything observable about it."""
    vcpu = vcpus.get(op.vcpu)
    if isinstance(op, DisableQuirks):
        if op.quirks:
            vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, op.quirks)
        return "quirks"
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
                current = vcpu.try_read_msr(index) or 0 if kind in ("same", "flip") else 0
                pairs.append((index, current if kind == "same" else current ^ 1 << value if kind == "flip"
                              else 0 if kind == "zero" else value))
            batch = MsrBatch(pairs)
            return (pairs, vcpu.set_msrs(batch))
        if isinstance(op, GetMsrs):
            batch = MsrBatch(list(op.indices))
            return (vcpu.get_msrs(batch), list(batch))
        if isinstance(op, Run):
            vcpu.immediate_exit = op.immediate
            vm.write_memory(guest.DEFAULT_ENTRY, op.code)
            guest.setup_real_mode(vcpu)
            if op.cr8 is not None:
                vcpu.run_cr8 = op.cr8
            regs = vcpu.get_regs()
            regs.rflags, regs.rax = op.flags, 0x1100  # RAX as a guest program leaves it is the model's to ignore
            vcpu.set_regs(regs)
            vcpu.request_interrupt_window = op.window
            return after_run(vcpu, vcpu.run(timeout=1))
        if isinstance(op, Resume):
            vcpu.immediate_exit = op.immediate
            return after_run(vcpu, vcpu.run(timeout=1))
        if isinstance(op, SetFlags):
            set_rflags(vcpu, op.rflags)
            return vcpu.get_regs().rflags
        if isinstance(op, SetShadow):
            set_shadow(vcpu, op.shadow)
            return vcpu.get_vcpu_events().interrupt.shadow
        if isinstance(op, ChangeSregs):
            sregs = vcpu.get_sregs()
            SREGS_CHANGES[op.field](sregs)
            vcpu.set_sregs(sregs)
            return bytes(vcpu.get_sregs())
        if isinstance(op, GetCpuid):
            return [e.to_dict() for e in vcpu.get_cpuid()]
        if isinstance(op, Guest):
            prog = Program()
            for kind, target, value in op.accesses:
                if kind == "cpuid":
                    prog.cpuid(target % 8)
                elif kind == "rdmsr":
                    prog.rdmsr(target)
                else:
                    prog.wrmsr(target, value)
            vcpu.immediate_exit = False
            return run_program(vm, vcpu, prog.hlt())
        if isinstance(op, SetSregs):
            sregs = vcpu.get_sregs()
            setattr(sregs, op.field, op.value)
            vcpu.set_sregs(sregs)
            return [vcpu.try_read_msr(0xC0000080), vcpu.try_read_msr(0x1B), vcpu.get_sregs().cr8]
        if isinstance(op, SetCr4):
            sregs = vcpu.get_sregs()
            sregs.cr4 = op.cr4
            vcpu.set_sregs(sregs)
            return vcpu.get_sregs().cr4
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


def compare(live: LinuxSystem, sequence: list[Op]) -> None:
    """Play ``sequence`` on both backends; raise AssertionError (with a reproducer) at the first step that differs."""
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


DERANDOMIZE = os.environ.get("KVMSCOPE_DIFF_RANDOM") is None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=DERANDOMIZE)
@given(sequences)
def _check(live: LinuxSystem, sequence: list[Op]) -> None:
    compare(live, sequence)


# Runs resumed where they stopped, with what a VMM does between them: a port access left waiting, RFLAGS, the
# interrupt shadow, SREGS that reset the MMU or not, the interrupt window, immediate exits.
def _runs_of(code: bytes) -> st.SearchStrategy[list[Op]]:
    """A sequence on one guest (a new one written under a waiting port access would run from the middle of it)."""
    run = st.builds(Run, st.just(0), st.booleans(), st.none(), NO_WINDOW, st.sampled_from([2, 0x202]), st.just(code))
    return st.tuples(run, st.lists(st.one_of(
        run, st.builds(Resume, st.just(0), st.booleans()), st.builds(Resume, st.just(0), st.just(False)),
        st.builds(SetFlags, st.just(0), st.sampled_from([2, 0x202, 0x246, 0x2 | 1 << 10])),
        st.builds(SetShadow, st.just(0), st.sampled_from([0, 1, 2, 3, 0x80, 0x8F])),
        st.builds(ChangeSregs, st.just(0), st.sampled_from(sorted(SREGS_CHANGES)))), min_size=1, max_size=10)).map(
        lambda t: [DisableQuirks(0, 0), CreateVcpu(0), t[0], *t[1]])


run_sequences = st.sampled_from(LOOPING_GUESTS).flatmap(_runs_of)


@settings(max_examples=RUN_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=DERANDOMIZE)
@given(run_sequences)
def _check_runs(live: LinuxSystem, sequence: list[Op]) -> None:
    compare(live, sequence)


def test_model_matches_live_kernel_on_resumed_runs(live: LinuxSystem) -> None:
    _check_runs(live)


# --- every MSR, every value: a sweep with fixed and random values, host side and guest side --------------------------

SWEEP_VALUES = [
    0, 1, 2, 6, 7, 0x3E, 0x40, 0x41, 0x80, 0x81, 0x100, 0x101, 0x400, 0x401, 0x500, 0x606, 0x800, 0x801, 0x806, 0x900,
    0xC00, 0xC06, 0xCFF, 0xD00, 0xD01, 0x1000, 0x1001, 0x4000, 0x40000, 0x1000000, 0x1000065, 0x80000000,
    0xFEE00100, 0xFEE00900, 0xFEE00C00, 0xFEE00D00, 0xFEE01900, 0x1000000900, 0x800000000900, 0xFFFFF000,
    0x7FFFFFFFF000, 0x7FFFFFFFFFFF, 0x800000000000, 0x8000000000000001, 0xFFFF800000000000, 0xFFFF7FFFFFFFFFFF,
    0x1FFFFFFFFFFFF, 0x0007040600070406, 0x0606060606060606, 0x0202020202020202, 0x0808080808080808,
    0xFFFFFFFFFFFFFBFE, 0x100000000, 0x123456789A, 2**64 - 1,
]


def sweep_values() -> list[int]:
    """The fixed values and eight random ones (a new draw each run with KVMSCOPE_DIFF_RANDOM set)."""
    import random

    rng = random.Random(None if not DERANDOMIZE else 19)
    return SWEEP_VALUES + [rng.getrandbits(64) for _ in range(4)] + [rng.getrandbits(rng.randint(8, 52)) for _ in range(4)]


def sweep_one(system: System, msr: int, cpuid: bool, vals: list[int]) -> tuple[list[Any], list[Any]]:
    """On a fresh vCPU (CPUID from KVM_GET_SUPPORTED_CPUID or none): the host's read, then each value written and read
    back; on another, a guest program doing the same with RDMSR/WRMSR."""
    host: list[Any] = []
    with system.create_vm() as vm:
        guest.ensure_memory(vm, 0x200000)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid(SUPPORTED)
        host.append(vcpu.try_read_msr(msr))
        for value in vals:
            host.append((vcpu.set_msrs(MsrBatch([(msr, value)])), vcpu.try_read_msr(msr)))
    with system.create_vm() as vm:
        guest.ensure_memory(vm, 0x200000)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid(SUPPORTED)
        prog = Program().rdmsr(msr)
        for value in vals:
            prog.wrmsr(msr, value).rdmsr(msr)
        events: list[Any] = run_program(vm, vcpu, prog.hlt())
    # Once more with failed accesses sent to userspace, whose exit reason tells KVM_MSR_RET_UNSUPPORTED (UNKNOWN) from
    # other failures (INVAL); userspace answers with #GP.
    with system.create_vm() as vm:
        guest.ensure_memory(vm, 0x200000)
        vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN | uapi.KVM_MSR_EXIT_REASON_INVAL)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid(SUPPORTED)
        prog = Program().rdmsr(msr)
        for value in vals[:16]:
            prog.wrmsr(msr, value).rdmsr(msr)
        events += run_program(vm, vcpu, prog.hlt(), on_msr=lambda exit_: None)
    return host, events


def _sweep(live: LinuxSystem) -> None:
    vals = sweep_values()
    for msr in MSRS:
        for cpuid in (False, True):
            model = open_model(profile=PROFILE)
            (lh, lg), (mh, mg) = sweep_one(live, msr, cpuid, vals), sweep_one(model, msr, cpuid, vals)
            where = f"MSR {msr:#x}, CPUID {'supported' if cpuid else 'not set'}"
            for i, (a, b) in enumerate(zip(lh, mh, strict=True)):
                step = "the first read" if i == 0 else f"KVM_SET_MSRS of {vals[i - 1]:#x}, then a read"
                assert a == b, f"{where}: host side differs at {step}:\n  live : {a}\n  model: {b}"
            for i, (a, b) in enumerate(zip(lg, mg, strict=False)):  # a length difference is checked below
                assert a == b, (f"{where}: guest side differs at event {i} (values {[hex(v) for v in vals]}):\n"
                                f"  live : {lg[max(0, i - 2):i + 3]}\n  model: {mg[max(0, i - 2):i + 3]}")
            assert len(lg) == len(mg), f"{where}: guest events differ in number:\n  live : {lg}\n  model: {mg}"


def test_model_matches_live_kernel_on_random_sequences(live: LinuxSystem) -> None:
    _check(live)


def test_model_matches_live_kernel_on_every_msr_and_value(live: LinuxSystem) -> None:
    _sweep(live)


def test_reproducer_runs_and_compares(live: LinuxSystem, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "repro.py"
    script.write_text(reproducer([DisableQuirks(0, 0), CreateVcpu(0), Run(0, False), SetMsrs(0, ((0xCE, "zero", 0),))]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd="/", check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 4 and all(" same " in line for line in lines), out
    assert "([(206, 0)], 0)" in lines[3], f"the changed PLATFORM_INFO after the run is refused on both: {out}"


# --- the differential finds a missing rule ----------------------------------------------------------------------------


def _accept_any_mtrr(rules: object, index: int, data: int, reserved: int | None = None) -> bool:
    return True


def _efer_without_reserved_bits(self: Any, index: int, data: int, host: bool) -> int:
    self.vcpu.sregs.efer = data
    return 0


def _store_without_canonical_check(self: Any, index: int, data: int, host: bool) -> int:
    self.rules.stored[index] = data
    return 0


def _no_reserved_gpa_bits(rules: object) -> int:
    return 0


def _poll_control_any(self: Any, index: int, data: int, host: bool) -> int:
    self.rules.stored[index] = data
    return 0


# One rule each (kernel function in brackets), taken out of the model the way a regression would: the default budget of
# the differential above must find the difference.
REMOVED_RULES = {
    "mtrr_valid (mtrr.c kvm_mtrr_valid)": ("kvmscope.model.mtrr", None, "mtrr_valid", _accept_any_mtrr),
    "efer_reserved (x86.c set_efer)": ("kvmscope.model.msr_misc", "MiscMsrs", "_set_efer", _efer_without_reserved_bits),
    "canonical_msr (x86.c __kvm_set_msr)": ("kvmscope.model.msr_misc", "MiscMsrs", "_set_canonical",
                                            _store_without_canonical_check),
    "apic_base_valid: MAXPHYADDR (lapic.c kvm_apic_set_base)": ("kvmscope.model.msr_misc", None, "reserved_gpa_bits",
                                                                 _no_reserved_gpa_bits),
    "kvm_pv_msr: POLL_CONTROL (x86.c kvm_set_msr_common)": ("kvmscope.model.msr_pv", "PvMceMsrs", "_set_poll_control",
                                                            _poll_control_any),
}


@pytest.mark.parametrize("rule", list(REMOVED_RULES))
def test_differential_fails_without_a_rule(live: LinuxSystem, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module_name, cls, attr, replacement = REMOVED_RULES[rule]
    target = importlib.import_module(module_name)
    monkeypatch.setattr(getattr(target, cls) if cls else target, attr, replacement)
    with pytest.raises(AssertionError) as info:
        _sweep(live)
        _check(live)
    assert "differ" in str(info.value), f"without {rule} the differential should report a step that differs, " \
                                         f"it raised: {str(info.value)[:300]}"
