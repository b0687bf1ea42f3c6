"""Guest programs on both backends: what the guest sees of its vCPU model (issue: guest-side MSR semantics)."""

from __future__ import annotations

import pytest

from kvmscope import uapi
from kvmscope.api import MsrExit, System, find_cpuid
from kvmscope.program import Cpuid, GuestException, Halted, In, Out, Program, Rdmsr, UserMsr, Wrmsr, run_program

UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO = 0x8B, 0x10A, 0x345, 0xCE
GP = GuestException(13, 0)


def run(kvm: System, program: Program, setup=None, vm_setup=None, on_msr=None):  # type: ignore[no-untyped-def]
    with kvm.create_vm() as vm:
        if vm_setup:
            vm_setup(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        if setup:
            setup(vcpu)
        events = run_program(vm, vcpu, program, on_msr=on_msr)
        return events, vcpu.get_cpuid()


def test_guest_reads_every_feature_msr_writes_each_and_runs_cpuid_7(kvm: System) -> None:
    prog = Program()
    for index in (UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO):
        prog.rdmsr(index).wrmsr(index, 0)
    prog.rdmsr(UCODE_REV).cpuid(7).hlt()
    events, stored = run(kvm, prog)
    leaf7 = find_cpuid(stored, 7, 0)
    assert leaf7 is not None
    assert events == [
        Rdmsr(UCODE_REV, 0), Wrmsr(UCODE_REV),  # guest writes to UCODE_REV are accepted and dropped
        GP, GP,  # ARCH_CAPABILITIES: no CPUID.7.0:EDX[29] on this host; guest writes always #GP
        GP, GP,  # PERF_CAPABILITIES: no PDCM; guest writes always #GP
        Rdmsr(PLATFORM_INFO, 0x80000000), GP,  # readable (KVM_CAP_MSR_PLATFORM_INFO on by default); not writable
        Rdmsr(UCODE_REV, 0),
        Cpuid(7, leaf7.eax, leaf7.ebx, leaf7.ecx, leaf7.edx),  # the CPUID the kernel stored (rewritten here)
        Halted(),
    ], events


def test_guest_sees_host_values_set_before_the_run(kvm: System) -> None:
    def setup(vcpu):  # type: ignore[no-untyped-def]
        vcpu.write_msrs({PLATFORM_INFO: 0x8000FF00, UCODE_REV: 0x42})

    events, _ = run(kvm, Program().rdmsr(PLATFORM_INFO).rdmsr(UCODE_REV).hlt(), setup)
    assert events == [Rdmsr(PLATFORM_INFO, 0x8000FF00), Rdmsr(UCODE_REV, 0x42), Halted()], events


def test_platform_info_read_needs_the_capability(kvm: System) -> None:
    # platform_info_test: the guest read #GPs once userspace disables KVM_CAP_MSR_PLATFORM_INFO.
    events, _ = run(kvm, Program().rdmsr(PLATFORM_INFO).hlt(),
                    vm_setup=lambda vm: vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 0))
    assert events == [GP, Halted()], events


def test_in_is_answered_by_the_host(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        events = run_program(vm, vcpu, Program().inb(0x60).inb(0x61).hlt(), on_in=lambda port: port + 1)
    assert events == [In(0x60, 0x61), In(0x61, 0x62), Halted()], events


def test_loop_and_out(kvm: System) -> None:
    events, _ = run(kvm, Program().loop(3, Program().out(0x20, 7).rdmsr(UCODE_REV)).cpuid(0).hlt())
    assert events[:6] == [Out(0x20, 7), Rdmsr(UCODE_REV, 0)] * 3
    assert isinstance(events[6], Cpuid) and events[6].leaf == 0 and events[-1] == Halted()


ALL_REASONS = uapi.KVM_MSR_EXIT_REASON_FILTER | uapi.KVM_MSR_EXIT_REASON_UNKNOWN | uapi.KVM_MSR_EXIT_REASON_INVAL


def userspace_msrs(reasons: int, deny: int | None = None):  # type: ignore[no-untyped-def]
    def setup(vm):  # type: ignore[no-untyped-def]
        vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, reasons)
        if deny is not None:
            both = uapi.KVM_MSR_FILTER_READ | uapi.KVM_MSR_FILTER_WRITE
            vm.set_msr_filter(uapi.KVM_MSR_FILTER_DEFAULT_ALLOW, [(both, deny, 1, b"\0")])
    return setup


def test_filtered_msr_is_answered_by_a_python_handler(kvm: System) -> None:
    seen: list[tuple[int, int]] = []

    def handler(e: MsrExit) -> int | None:
        seen.append((e.index, e.msr_reason))
        return 0x1234

    prog = Program().rdmsr(PLATFORM_INFO).wrmsr(PLATFORM_INFO, 5).rdmsr(UCODE_REV).hlt()
    events, _ = run(kvm, prog, vm_setup=userspace_msrs(ALL_REASONS, deny=PLATFORM_INFO), on_msr=handler)
    assert events == [
        UserMsr(False, PLATFORM_INFO, 0, uapi.KVM_MSR_EXIT_REASON_FILTER, "value 0x1234"), Rdmsr(PLATFORM_INFO, 0x1234),
        UserMsr(True, PLATFORM_INFO, 5, uapi.KVM_MSR_EXIT_REASON_FILTER, "ok"), Wrmsr(PLATFORM_INFO),
        Rdmsr(UCODE_REV, 0), Halted(),
    ], events
    assert seen == [(PLATFORM_INFO, 4), (PLATFORM_INFO, 4)]


def test_unknown_and_invalid_accesses_reach_userspace(kvm: System) -> None:
    prog = Program().rdmsr(ARCH_CAP).rdmsr(0x12345678).wrmsr(PLATFORM_INFO, 1).hlt()
    events, _ = run(kvm, prog, vm_setup=userspace_msrs(ALL_REASONS),
                    on_msr=lambda e: None if e.index == 0x12345678 else 7)
    assert events == [
        UserMsr(False, ARCH_CAP, 0, uapi.KVM_MSR_EXIT_REASON_UNKNOWN, "value 0x7"), Rdmsr(ARCH_CAP, 7),
        UserMsr(False, 0x12345678, 0, uapi.KVM_MSR_EXIT_REASON_UNKNOWN, "#GP"), GP,
        UserMsr(True, PLATFORM_INFO, 1, uapi.KVM_MSR_EXIT_REASON_INVAL, "ok"), Wrmsr(PLATFORM_INFO),
        Halted(),
    ], events


@pytest.mark.parametrize("reasons", [0, uapi.KVM_MSR_EXIT_REASON_FILTER], ids=["none", "filter-only"])
def test_without_the_reason_the_guest_gets_gp(kvm: System, reasons: int) -> None:
    events, _ = run(kvm, Program().rdmsr(ARCH_CAP).wrmsr(PLATFORM_INFO, 1).hlt(), vm_setup=userspace_msrs(reasons))
    assert events == [GP, GP, Halted()], events
