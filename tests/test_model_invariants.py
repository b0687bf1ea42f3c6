"""Invariants of the model, as hypothesis stateful tests, for every shipped profile and several kernels.

After a run no host write changes an immutable feature MSR; UCODE_REV always takes a new value; partial counts are
exact (the entries before the count took effect, the rest did not); CPUID after a run changes nothing.
"""

from __future__ import annotations

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmscope import guest
from kvmscope.api import MsrBatch
from kvmscope.errors import KvmError
from kvmscope.kernel.profile import load, shipped
from kvmscope.model import open_model, vmx

U64 = (1 << 64) - 1
UCODE_REV = 0x8B


class ModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.system = None

    @rule(profile=st.sampled_from(shipped()), kernel=st.sampled_from(["6.4", "6.10", "6.13", "6.18"]))
    @precondition(lambda self: self.system is None)
    def start(self, profile: str, kernel: str) -> None:
        self.system = open_model(kernel=kernel, profile=load(profile))
        self.rules = self.system.rules
        self.vm = self.system.create_vm()
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(self.system.get_supported_cpuid())
        self.features = self.system.get_msr_feature_index_list()
        self.others = sorted(i for i, b in self.system.profile.msr_behaviour.items() if b.kind == "store")[:4]
        self.ran = False

    def immutable(self, index: int) -> bool:
        return 0x480 <= index <= 0x491 or index in self.rules.immutable_generic

    @rule()
    @precondition(lambda self: self.system is not None and not self.ran)
    def run(self) -> None:
        assert guest.run_to_hlt(self.vm, self.vcpu).name == "HltExit"
        self.ran = True
        self.cpuid_after_run = self.vcpu.get_cpuid()

    @rule(data=st.data())
    @precondition(lambda self: self.system is not None)
    def write_batch(self, data: st.DataObject) -> None:
        pool = self.features + self.others
        picks = data.draw(st.lists(st.tuples(st.sampled_from(pool), st.integers(0, U64)), min_size=1, max_size=6))
        before = {i: self.vcpu.try_read_msr(i) for i, _ in picks}
        count = self.vcpu.set_msrs(MsrBatch(picks))
        assert 0 <= count <= len(picks)
        # Partial counts are exact: what the first `count` entries wrote is in place (last write wins), and
        # nothing from the refused entry or after it took effect.
        last: dict[int, int] = {}
        for index, value in picks[:count]:
            last[index] = value
        # A VMX control MSR and its TRUE_ twin share one slot (vmx_get_control_msr): writing one changes both.
        written_slots = {vmx.TRUE_OF.get(i, i) for i in last}
        for index in {i for i, _ in picks}:
            got = self.vcpu.try_read_msr(index)
            if vmx.TRUE_OF.get(index, index) not in written_slots:
                assert got == before[index], f"0x{index:x} was not written (count {count}) yet changed"
            elif self.ran and self.immutable(index):
                assert got == before[index], f"immutable 0x{index:x} changed after the run: {before[index]} -> {got}"
            elif index == UCODE_REV or index in self.others:
                assert got == last[index], f"0x{index:x} should read 0x{last[index]:x} after an accepted write"
        if count < len(picks):
            assert self.vcpu.refusal_rule(picks[count][0]), "a refusal names its rule"

    @rule(value=st.integers(0, U64))
    @precondition(lambda self: self.system is not None)
    def microcode_load(self, value: int) -> None:
        assert self.vcpu.set_msrs({UCODE_REV: value}) == 1, "UCODE_REV is always writable"
        assert self.vcpu.try_read_msr(UCODE_REV) == value

    @rule(pos=st.integers(0, 300), reg=st.sampled_from(["eax", "ebx", "ecx", "edx"]), bit=st.integers(0, 31))
    @precondition(lambda self: self.system is not None and self.ran)
    def cpuid_change_after_run(self, pos: int, reg: str, bit: int) -> None:
        from dataclasses import replace

        entries = list(self.cpuid_after_run)
        i = pos % len(entries)
        entries[i] = replace(entries[i], **{reg: getattr(entries[i], reg) ^ 1 << bit})
        try:
            self.vcpu.set_cpuid(entries)
        except KvmError as e:
            assert e.errno == errno.EINVAL
        assert self.vcpu.get_cpuid() == self.cpuid_after_run, "CPUID changed after the run"

    @invariant()
    def cpuid_frozen(self) -> None:
        if self.system is not None and self.ran:
            assert self.vcpu.get_cpuid() == self.cpuid_after_run, "CPUID after the run is what the kernel stored"


TestModelInvariants = ModelMachine.TestCase
TestModelInvariants.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
