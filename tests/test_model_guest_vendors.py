"""Guest-side rules the live kernel here cannot show, on the model with the derived Intel profile:
the guest parts of vmx_pmu_caps_test and platform_info_test."""

from __future__ import annotations

import kvmscope
from kvmscope import uapi
from kvmscope.program import GuestException, Halted, Program, Rdmsr, run_program

PERF_CAP, PLATFORM_INFO, ARCH_CAP = 0x345, 0xCE, 0x10A
GP = GuestException(13, 0)


def intel() -> kvmscope.System:
    return kvmscope.open("model", profile="intel-spr", kernel="6.18")


def test_guest_wrmsr_perf_capabilities() -> None:
    # vmx_pmu_caps_test guest_wrmsr_perf_capabilities: the host sets the full caps; the guest reads them and gets #GP
    # writing the current value, 0, and each single-bit flip.
    with intel() as kvm, kvm.create_vm() as vm:
        caps = kvm.read_feature_msrs([PERF_CAP])[PERF_CAP]
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        vcpu.write_msr(PERF_CAP, caps)
        prog = Program().rdmsr(PERF_CAP).wrmsr(PERF_CAP, caps).wrmsr(PERF_CAP, 0)
        for bit in range(64):
            prog.wrmsr(PERF_CAP, caps ^ 1 << bit)
        events = run_program(vm, vcpu, prog.hlt())
        assert events[0] == Rdmsr(PERF_CAP, caps), f"the guest reads the host's PERF_CAPABILITIES, saw {events[0]}"
        assert events[1:-1] == [GP] * 66, "every guest WRMSR of PERF_CAPABILITIES #GPs"
        assert events[-1] == Halted()
        # After the run: same value accepted, 0 and every single-bit flip refused (host side).
        assert vcpu.set_msrs({PERF_CAP: caps}) == 1
        assert vcpu.set_msrs({PERF_CAP: 0}) == 0
        for bit in range(64):
            assert vcpu.set_msrs({PERF_CAP: caps ^ 1 << bit}) == 0, f"PERF_CAP bit {bit} flipped after KVM_RUN"


def test_platform_info_guest_read() -> None:
    with intel() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        vcpu.write_msr(PLATFORM_INFO, 0x80000000 | 0xFF00)
        assert run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt()) == [Rdmsr(PLATFORM_INFO, 0x8000FF00),
                                                                               Halted()]
        vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 0)
        assert run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt()) == [GP, Halted()]


def test_guest_reads_arch_capabilities_with_the_cpuid_bit() -> None:
    with intel() as kvm, kvm.create_vm() as vm:
        value = kvm.read_feature_msrs([ARCH_CAP])[ARCH_CAP]
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        events = run_program(vm, vcpu, Program().rdmsr(ARCH_CAP).wrmsr(ARCH_CAP, value).hlt())
        assert events == [Rdmsr(ARCH_CAP, value), GP, Halted()], events


def test_guest_perf_cap_write_reasons_by_kernel() -> None:
    # kvm_set_msr_common: a guest write is "host only": UNSUPPORTED (exit reason UNKNOWN) since 6.13, 1 (INVAL)
    # before; vmx_set_msr's PEBS/LBR format checks come first and give 1 on every version.
    from kvmscope.program import UserMsr

    for kernel, value, reason in (("6.18", 0x2000, uapi.KVM_MSR_EXIT_REASON_UNKNOWN),
                                  ("6.10", 0x2000, uapi.KVM_MSR_EXIT_REASON_INVAL),
                                  ("6.18", 0x100, uapi.KVM_MSR_EXIT_REASON_INVAL)):  # PEBS format 1: wrong
        with kvmscope.open("model", profile="intel-spr", kernel=kernel) as kvm, kvm.create_vm() as vm:
            vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN |
                          uapi.KVM_MSR_EXIT_REASON_INVAL)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            events = run_program(vm, vcpu, Program().wrmsr(PERF_CAP, value).hlt(), on_msr=lambda e: None)
            assert events[0] == UserMsr(True, PERF_CAP, value, reason, "#GP"), (kernel, hex(value), events)


def test_guest_cpuid_out_of_range_leaf_on_intel() -> None:
    # get_out_of_range_cpuid_entry: an Intel guest's leaf above the maximum basic leaf reads as that maximum leaf.
    from dataclasses import replace

    from kvmscope.program import Cpuid

    with intel() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        entries = [replace(e, eax=0xD) if e.function == 0 else e for e in kvm.get_supported_cpuid()]
        vcpu.set_cpuid(entries)
        events = run_program(vm, vcpu, Program().cpuid(0x15).cpuid(0xD).hlt())
        assert isinstance(events[0], Cpuid) and isinstance(events[1], Cpuid)
        assert (events[0].eax, events[0].ebx, events[0].edx) == (events[1].eax, events[1].ebx, events[1].edx) != (
            0, 0, 0), f"leaf 0x15 above the maximum 0xd should read as leaf 0xd: {events[:2]}"


def test_guest_de_cfg_writes_by_kernel() -> None:
    # AMD DE_CFG from the guest: any supported subset (svm_set_msr), except on 6.12.0 where 74a0e79df68a allowed only
    # the current value (4d5163cba43f restored subsets after Windows guests #GP'd).
    from kvmscope.program import Wrmsr

    for kernel, expected in (("6.10", [Wrmsr(0xC0011029), Rdmsr(0xC0011029, 2), GP]),
                             ("6.12", [GP, Rdmsr(0xC0011029, 0), GP]),
                             ("6.18", [Wrmsr(0xC0011029), Rdmsr(0xC0011029, 2), GP])):
        with kvmscope.open("model", profile="amd-epyc", kernel=kernel) as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            prog = Program().wrmsr(0xC0011029, 2).rdmsr(0xC0011029).wrmsr(0xC0011029, 4).hlt()
            events = run_program(vm, vcpu, prog)
            assert events == [*expected, Halted()], (kernel, events)
