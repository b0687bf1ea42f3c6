"""The model's emulated-MSR rules name themselves when they refuse, on every shipped profile's vendor."""

from __future__ import annotations

import pytest

from kvmscope.api import MsrBatch
from kvmscope.errors import MsrWriteError
from kvmscope.kernel import emulated as E
from kvmscope.model import open_model

CASES = [
    (0x201, 1, E.MTRR_VALID),
    (0x210, 0, E.MTRR_UNKNOWN),
    (0x1B, 0xFEE00500, E.APIC_BASE_VALID),
    (0xC0000080, 1 << 12, E.EFER_RESERVED),
    (0xC0000082, 0x800000000000, E.CANONICAL),
    (0x400, 5, E.MCE),
    (0xC0010015, 2, E.HWCR),
    (0x4B564D05, 2, E.PV_MSR),
    (0x802, 0, E.X2APIC_NO_IRQCHIP),
]


@pytest.mark.parametrize(("msr", "value", "rule"), CASES, ids=[r.key for _, _, r in CASES])
def test_refusal_names_the_rule(msr: int, value: int, rule: E.Rule) -> None:
    with open_model(profile="pvm-6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs(MsrBatch([(msr, value)])) == 0, f"{msr:#x} = {value:#x} should be refused"
        assert vcpu.refusal_rule(msr) is rule, f"{msr:#x}: expected {rule.key}, got {vcpu.refusal_rule(msr)}"
        with pytest.raises(MsrWriteError) as info:
            vcpu.write_msr(msr, value)
        assert rule.title in str(info.value) and f"{value:#x}" in str(info.value), str(info.value)


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
def test_upstream_rules_where_pvm_differs(profile: str) -> None:
    # The vendor_msrs of pvm-6.18 are PVM's: on the VMX and SVM profiles PAT is validated (kvm_pat_valid) and SMBASE
    # works from userspace (CONFIG_KVM_SMM).
    with open_model(profile=profile) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs(MsrBatch([(0x277, 0x0808080808080808)])) == 0
        assert vcpu.refusal_rule(0x277) is E.PAT_VALID
        assert vcpu.try_read_msr(0x9E) == 0x30000 and vcpu.set_msrs(MsrBatch([(0x9E, 0x40000)])) == 1


def test_efer_svm_allows_svme() -> None:
    # svm_hardware_setup enables EFER.SVME (kvm_enable_efer_bits); VMX does not.
    for profile, count in (("amd-epyc", 1), ("intel-spr", 0)):
        with open_model(profile=profile) as kvm, kvm.create_vm() as vm:
            assert vm.create_vcpu(0).set_msrs(MsrBatch([(0xC0000080, 1 << 12)])) == count, profile


@pytest.mark.parametrize(("kernel", "count", "rule"), [("6.12", 1, None), ("6.18", 0, E.XSS_NEEDS_XSAVES)])
def test_xss_needs_xsaves_from_6_18(kernel: str, count: int, rule: E.Rule | None) -> None:
    # Before the 6.18 CET series userspace could write 0 (any bit KVM supports) to IA32_XSS whatever CPUID said.
    with open_model(profile="pvm-6.18", kernel=kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs(MsrBatch([(0xDA0, 0)])) == count, kernel
        assert vcpu.refusal_rule(0xDA0) is rule, kernel


@pytest.mark.parametrize(("profile", "kept"), [("amd-epyc", True), ("intel-spr", False)])
def test_vm_hsave_pa_on_svm(profile: str, kept: bool) -> None:
    # svm_set_msr/svm_get_msr handle VM_HSAVE_PA before common code (5.10.262 svm.c:2547, 2747-2757; 6.12.118
    # svm.c:2980, 3290-3300): stored page-aligned; a guest must write a legal page-aligned address. Elsewhere
    # kvm_set_msr_common ignores the write and a read gives 0.
    from kvmscope.program import GuestException, Halted, Program, Rdmsr, Wrmsr, run_program

    with open_model(profile=profile, kernel="6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert vcpu.set_msrs(MsrBatch([(0xC0010117, 0x12345678)])) == 1, "a host write takes any value"
        got = vcpu.try_read_msr(0xC0010117)
        assert got == (0x12345000 if kept else 0), f"{profile}: VM_HSAVE_PA read back {got:#x}"
        beyond = 1 << 52  # page-aligned, above any MAXPHYADDR the profiles give (kvm_vcpu_is_legal_aligned_gpa)
        events = run_program(vm, vcpu, Program().wrmsr(0xC0010117, 0x5008).wrmsr(0xC0010117, beyond)
                             .wrmsr(0xC0010117, 0x6000).rdmsr(0xC0010117).hlt())
        gp = GuestException(13, 0)
        expected = ([gp, gp, Wrmsr(0xC0010117), Rdmsr(0xC0010117, 0x6000)] if kept else
                    [Wrmsr(0xC0010117)] * 3 + [Rdmsr(0xC0010117, 0)])
        assert events == [*expected, Halted()], f"{profile}: guest VM_HSAVE_PA writes of 0x5008, 0x6000: {events}"
