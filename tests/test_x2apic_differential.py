"""Differential property test of the in-kernel LAPIC's x2APIC MSRs: random LAPIC pages and random sequences of
KVM_GET_MSRS/KVM_SET_MSRS of every x2APIC MSR (0x800-0x8FF) with random values, mode changes through APIC_BASE,
KVM_GET_LAPIC/KVM_SET_LAPIC and KVM_SIGNAL_MSI (fixed, physical), on the live kernel and on the model. Counts, values
read and every page word must agree.

Where the model says it cannot answer (:class:`ModelLimitation`: an APIC timer's current count, an IPI of another
delivery mode than Fixed, Lowest or ExtINT) the sequence is compared up to that step. The timer's current count in
KVM_GET_LAPIC (0x390) is time-dependent on the live kernel and left out.
``KVMSCOPE_X2APIC_EXAMPLES=2000 pytest tests/test_x2apic_differential.py`` runs more than the default 150.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kvmscope import uapi
from kvmscope.api import MsrBatch, System
from kvmscope.errors import KvmError
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model
from kvmscope.model.vcpu import ModelLimitation

EXAMPLES = int(os.environ.get("KVMSCOPE_X2APIC_EXAMPLES", "150"))
TMCCT = 0x390
# Page words a test may set through KVM_SET_LAPIC: TPR, SPIV, ISR/TMR/IRR, ESR, ICR, ICR2, the LVTs, TMICT, TDCR
# (the ID, LVR, LDR and DFR follow the mode; an APIC timer started by TMICT makes only TMCCT time-dependent).
PAGE_WORDS = [0x80, 0xF0, *range(0x100, 0x280, 0x10), 0x280, 0x300, 0x304, 0x310, *range(0x320, 0x380, 0x10),
              0x380, 0x3E0]
u32 = st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 0x1FF, 0xFF, 0x10000, 0x700]))
u64 = st.one_of(u32, st.integers(0, 2**64 - 1), st.builds(lambda lo, hi: hi << 32 | lo, u32, st.sampled_from(
    [0, 1, 3, 8, 0xFFFFFFFF, 0x10008])))
msr = st.one_of(st.integers(0x800, 0x83F), st.integers(0x800, 0x8FF))
step = st.one_of(
    st.tuples(st.just("read"), msr),
    st.tuples(st.just("write"), msr, u64),
    st.tuples(st.just("write"), st.sampled_from([0x830, 0x83F, 0x80B, 0x808, 0x80F]), u64),
    st.tuples(st.just("base"), st.sampled_from([0xFEE00900, 0xFEE00D00, 0xFEE00000, 0])),
    st.tuples(st.just("page"), st.dictionaries(st.sampled_from(PAGE_WORDS), u32, max_size=6)),
    st.tuples(st.just("lapic")),
    st.tuples(st.just("msi"), st.one_of(st.sampled_from([0, 1, 3, 17, 0xFF]), st.integers(0, 0xFF)),
              st.integers(0, 0xFF)),
)
case = st.fixed_dictionaries({
    "vcpu_id": st.sampled_from([0, 1, 3, 17]),
    "x2apic": st.booleans(),
    "page": st.dictionaries(st.sampled_from(PAGE_WORDS), u32, max_size=8),
    "steps": st.lists(step, min_size=1, max_size=10),
})


def shown(kvm_lapic: uapi.kvm_lapic_state) -> dict[int, int]:
    raw = bytes(kvm_lapic)
    return {o: v for o in range(0, len(raw), 4) if o != TMCCT and (v := struct.unpack_from("<I", raw, o)[0])}


def set_words(system: Any, vcpu: Any, words: dict[int, int]) -> None:
    raw = bytearray(bytes(vcpu.get_lapic()))
    for offset, value in words.items():
        struct.pack_into("<I", raw, offset, value)
    vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))


def replay(system: System, c: dict[str, Any]) -> list[Any]:
    """The observable results of case ``c`` on ``system``, up to a ModelLimitation (recorded as its step)."""
    out: list[Any] = []
    vm = system.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(c["vcpu_id"])
        vcpu.set_cpuid(system.get_supported_cpuid())
        if c["x2apic"]:
            out.append(("x2apic", vcpu.set_msrs({0x1B: 0xFEE00D00 | (0x100 if c["vcpu_id"] == 0 else 0)})))
        try:
            set_words(system, vcpu, c["page"])
            out.append(("start", shown(vcpu.get_lapic())))
            for s in c["steps"]:
                if s[0] == "read":
                    batch = MsrBatch([(s[1], 0xDEAD)])
                    out.append((s, vcpu.get_msrs(batch), batch[0][1]))
                elif s[0] == "write":
                    out.append((s, vcpu.set_msrs(MsrBatch([(s[1], s[2])]))))
                elif s[0] == "base":
                    out.append((s, vcpu.set_msrs({0x1B: s[1] | (0x100 if c["vcpu_id"] == 0 else 0)})))
                elif s[0] == "msi":  # fixed, physical destination s[1], vector s[2]
                    try:
                        out.append((s, vm.signal_msi(0xFEE00000 | s[1] << 12, s[2])))
                    except KvmError as e:
                        out.append((s, e.errno))
                elif s[0] == "page":
                    try:
                        set_words(system, vcpu, s[1])
                        out.append((s, "set"))
                    except KvmError as e:
                        out.append((s, e.errno))
                else:
                    try:
                        out.append((s, shown(vcpu.get_lapic())))
                    except KvmError as e:
                        out.append((s, e.errno))
        except ModelLimitation as e:
            out.append(("limitation", len(out), str(e)))
    finally:
        vm.close()
    return out


def compare(live: LinuxSystem, model: System, c: dict[str, Any]) -> None:
    theirs = replay(model, c)
    ours = replay(live, c)
    if theirs and theirs[-1][0] == "limitation":
        ours = ours[: theirs[-1][1]]
        theirs = theirs[:-1]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"step {i}: live kernel {a!r}, model {b!r}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
@given(case)
def check_cases(live: LinuxSystem, c: dict[str, Any]) -> None:
    note(f"case: {c}")
    model = open_model(profile="pvm-6.18")
    try:
        compare(live, model, c)
    finally:
        model.close()


def test_model_matches_live_kernel_on_x2apic_msrs(live: LinuxSystem) -> None:
    check_cases(live)


@pytest.mark.parametrize(("removed", "case"), [
    ("update_ppr", {"vcpu_id": 3, "x2apic": True, "page": {0x110: 0x20, 0xF0: 0x1FF}, "steps": [("read", 0x80A)]}),
    ("set_bit", {"vcpu_id": 0, "x2apic": True, "page": {0xF0: 0x1FF}, "steps": [("write", 0x83F, 0x40), ("lapic",)]}),
])
def test_differential_fails_without_the_x2apic_rules(live: LinuxSystem, monkeypatch: pytest.MonkeyPatch,
                                                      removed: str, case: dict[str, Any]) -> None:
    """Without the model's PPR recomputation on read, or its IPI delivery, a case disagrees."""
    from kvmscope.model import x2apic

    monkeypatch.setattr(x2apic, removed, lambda *args: None)
    model = open_model(profile="pvm-6.18")
    try:
        with pytest.raises(AssertionError, match="live kernel"):
            compare(live, model, case)
    finally:
        model.close()
