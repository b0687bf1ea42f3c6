"""The MSRs KVM emulates in common code, one case per rule, on both backends (kernel/emulated.py names the rules).

Host cases write one value on a fresh vCPU (CPUID from KVM_GET_SUPPORTED_CPUID, or none) and read it back; guest cases
run a program. Sources are cited per case: ``x86.c``/``mtrr.c``/``lapic.c`` of the kernel (6.12 tree line numbers in
``model/msr_misc.py``, ``msr_pv.py``, ``mtrr.py``), and the live PVM host where its vendor module differs (the profile's
``vendor_msrs``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmscope import guest, uapi
from kvmscope.api import MsrBatch, System, find_cpuid
from kvmscope.model.cpuid import has_feature
from kvmscope.program import GuestException, Halted, Program, Rdmsr, UserMsr, Wrmsr, run_program

GP = GuestException(13, 0)
U64 = 2**64 - 1
NO = None  # the read fails

# (case, MSR, CPUID set, value written, KVM_SET_MSRS count, value read back afterwards (NO: the read fails))
HOST_CASES = [
    # mtrr.c kvm_mtrr_get_msr/kvm_mtrr_set_msr (MTRR_VALID, MTRR_UNKNOWN; MTRRcap READ_ONLY)
    ("mtrrcap reads 0x508, is not writable", 0xFE, False, 0x508, 0, 0x508),
    ("deftype: WB, enabled with fixed ranges", 0x2FF, False, 0xC06, 1, 0xC06),
    ("deftype: memory type 2 is invalid", 0x2FF, False, 0x802, 0, 0),
    ("deftype: bits 9:8 are reserved", 0x2FF, False, 0x906, 0, 0),
    ("fixed: every byte WB", 0x250, False, 0x0606060606060606, 1, 0x0606060606060606),
    ("fixed: a byte of type 8 is invalid", 0x268, False, 0x0806060606060606, 0, 0),
    ("physbase: bit 11 is reserved", 0x200, False, 0x80000806, 0, 0),
    ("physbase: above MAXPHYADDR 36 without CPUID", 0x200, False, 0x1000000006, 0, 0),
    ("physbase: within the host MAXPHYADDR with CPUID", 0x200, True, 0x1000000006, 1, 0x1000000006),
    ("physmask: valid bit and a mask", 0x201, False, 0xFFFFF800, 1, 0xFFFFF800),
    ("physmask: bits 10:0 are reserved", 0x201, False, 0xFFFFF801, 0, 0),
    ("0x210 is not an MTRR (find_mtrr fails)", 0x210, False, 0, 0, NO),
    # lapic.c kvm_apic_set_base (APIC_BASE_VALID)
    ("apic_base: x2APIC needs CPUID.X2APIC", 0x1B, False, 0xFEE00D00, 0, 0xFEE00900),
    ("apic_base: x2APIC with CPUID.X2APIC", 0x1B, True, 0xFEE00D00, 1, 0xFEE00D00),
    ("apic_base: x2APIC without enable is invalid", 0x1B, True, 0xFEE00500, 0, 0xFEE00900),
    ("apic_base: bit 0 is reserved", 0x1B, False, 0xFEE00901, 0, 0xFEE00900),
    ("apic_base: above MAXPHYADDR 36 without CPUID", 0x1B, False, 0x1000000900, 0, 0xFEE00900),
    ("apic_base: disabled", 0x1B, False, 0, 1, 0),
    # x86.c set_efer (EFER_RESERVED)
    ("efer: SCE|LME|NX allowed", 0xC0000080, False, 0x901, 1, 0x901),
    ("efer: LMA is kept from the vCPU, not written", 0xC0000080, False, 0x500, 1, 0x100),
    ("efer: SVME is reserved on this host", 0xC0000080, True, 0x1000, 0, 0),
    ("efer: FFXSR is reserved on this host", 0xC0000080, True, 0x4000, 0, 0),
    # x86.c __kvm_set_msr (CANONICAL; SYSENTER made canonical)
    ("lstar: non-canonical refused", 0xC0000082, False, 0x800000000000, 0, 0),
    ("lstar: canonical kernel address", 0xC0000082, False, 0xFFFF800000001000, 1, 0xFFFF800000001000),
    ("kernel_gs_base: non-canonical refused", 0xC0000102, False, 0x8000000000000001, 0, 0),
    ("cstar: canonical", 0xC0000083, False, 0x7FFFFFFFF000, 1, 0x7FFFFFFFF000),
    ("sysenter_eip: made canonical", 0x176, False, 0x800000000000, 1, 0xFFFF800000000000),
    ("sysenter_esp: made canonical", 0x175, False, 0x8000000000000001, 1, 1),
    # x86.c __kvm_set_msr MSR_TSC_AUX (TSC_AUX)
    ("tsc_aux: bits 63:32 refused for an Intel-compatible (no) CPUID", 0xC0000103, False, 0x123456789A, 0, 0),
    ("tsc_aux: bits 63:32 dropped for an AMD CPUID", 0xC0000103, True, 0x123456789A, 1, 0x3456789A),
    # x86.c set_msr_mce/get_msr_mce (MCE)
    ("mcg_cap: 32 banks, not writable", 0x179, False, 0x20, 0, 0x20),
    ("mcg_ctl: no MCG_CTL_P, userspace may write 0", 0x17B, False, 0, 1, 0),
    ("mcg_ctl: no MCG_CTL_P, not 1", 0x17B, False, U64, 0, 0),
    ("mcg_status: any value", 0x17A, False, 0x5, 1, 0x5),
    ("mc0_ctl: all ones", 0x400, False, U64, 1, U64),
    ("mc0_ctl: all ones but bits 10 and 0", 0x400, False, 0xFFFFFFFFFFFFFBFE, 1, 0xFFFFFFFFFFFFFBFE),
    ("mc0_ctl: neither 0 nor all ones", 0x400, False, 0x5, 0, 0),
    ("mc31_misc: the last bank", 0x47F, False, 0x1234, 1, 0x1234),
    ("mc0_ctl2: no CMCI_P, userspace may write 0", 0x280, False, 0, 1, 0),
    ("mc0_ctl2: no CMCI_P, not 1", 0x280, False, 1, 0, 0),
    # x86.c kvm_set_msr_common MSR_K7_HWCR (HWCR)
    ("hwcr: McStatusWrEn and TscFreqSel", 0xC0010015, False, 0x1040000, 1, 0x1040000),
    ("hwcr: bits 3, 6, 8 are ignored", 0xC0010015, False, 0x1000148, 1, 0x1000000),
    ("hwcr: other bits refused", 0xC0010015, False, 0x2, 0, 0),
    # x86.c KVM PV MSRs (PV_MSR), no in-kernel LAPIC
    ("poll_control: starts at 1, bit 0 only", 0x4B564D05, False, 2, 0, 1),
    ("steal_time: bits 5:1 reserved", 0x4B564D03, False, 0x1002, 0, 0),
    ("steal_time: an enabled 64-byte aligned area", 0x4B564D03, False, 0x1041, 1, 0x1041),
    ("pv_eoi: address not 4-byte aligned", 0x4B564D04, False, 0x1002, 0, 0),
    ("pv_eoi: enabled, inside guest memory", 0x4B564D04, False, 0x1001, 1, 0x1001),
    ("pv_eoi: enabled, outside guest memory", 0x4B564D04, False, 0x10000001, 0, 0),
    ("async_pf_en: non-zero needs an in-kernel LAPIC", 0x4B564D02, False, 0x1001, 0, 0),
    ("async_pf_int: needs an in-kernel LAPIC", 0x4B564D06, False, 0x20, 0, 0),
    ("async_pf_ack: reads 0, writes accepted", 0x4B564D07, False, 1, 1, 0),
    # lapic.c kvm_x2apic_msr_read/write (X2APIC_NO_IRQCHIP)
    ("x2apic id: no in-kernel LAPIC", 0x802, False, 0, 0, NO),
    # x86.c kvm_get_msr_common constants and ignored writes (READ_ONLY)
    ("fsb frequency 0xcd reads 3, write refused", 0xCD, False, 3, 0, 3),
    ("perf_status reads 1000 | 4 << 40", 0x198, False, 0, 0, 1000 | 4 << 40),
    ("k7_clk_ctl reads 0x20000000, writes ignored", 0xC001001B, False, 5, 1, 0x20000000),
    ("ucode_write: writes ignored, reads unsupported", 0x79, False, 5, 1, NO),
    ("mmio_conf_base: only 0", 0xC0010058, False, 1, 0, 0),
    ("legacy PMU (kvm.enable_pmu=N): reads 0, writes dropped", 0xC0010004, False, 0x55, 1, 0),
    # x86.c OSVW and XSS (NEEDS_CPUID_BIT)
    ("osvw_id_length: needs CPUID.OSVW", 0xC0010140, False, 4, 0, NO),
    ("xss: needs CPUID.XSAVES even from userspace (6.18)", 0xDA0, False, 0, 0, 0),
    # the PVM vendor module (profile vendor_msrs), unlike upstream
    ("PVM: PAT takes any value", 0x277, False, 0x0808080808080808, 1, 0x0808080808080808),
    ("PVM: PRED_CMD takes any value, never reads", 0x49, False, 0xFF, 1, NO),
    ("PVM: TSC_RATIO takes only 0 and its own value", 0xC0000104, False, 0x200000000, 0, 0x100000000),
    ("no CONFIG_KVM_SMM here: SMBASE fails", 0x9E, False, 0x30000, 0, NO),
]


@pytest.mark.parametrize(("case", "msr", "cpuid", "value", "count", "after"), HOST_CASES, ids=[c[0] for c in HOST_CASES])
def test_host_write(kvm: System, case: str, msr: int, cpuid: bool, value: int, count: int, after: int | None) -> None:
    with kvm.create_vm() as vm:
        guest.ensure_memory(vm, 0x200000)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid(kvm.get_supported_cpuid())
        got = vcpu.set_msrs(MsrBatch([(msr, value)]))
        assert got == count, f"{case}: KVM_SET_MSRS of {msr:#x} = {value:#x} should process {count}, processed {got}"
        read = vcpu.try_read_msr(msr)
        assert read == after, f"{case}: {msr:#x} should then read {after if after is None else hex(after)}, read " \
                              f"{read if read is None else hex(read)}"


def test_apic_base_and_fs_base_are_the_sregs(kvm: System) -> None:
    """MSR writes of APIC_BASE and FS_BASE change what KVM_GET_SREGS shows (they are one state)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs(MsrBatch([(0x1B, 0xFEE00800), (0xC0000100, 0x7F0000001000)])) == 2
        sregs = vcpu.get_sregs()
        assert (sregs.apic_base, sregs.fs.base) == (0xFEE00800, 0x7F0000001000), (hex(sregs.apic_base),
                                                                                   hex(sregs.fs.base))


def run(kvm: System, prog: Program, cpuid: bool = False, exits: int = 0, setup_msrs: list[tuple[int, int]] = ()  # type: ignore[assignment]
        ) -> list[object]:
    with kvm.create_vm() as vm:
        if exits:
            vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, exits)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid(kvm.get_supported_cpuid())
        if setup_msrs:
            assert vcpu.set_msrs(MsrBatch(setup_msrs)) == len(setup_msrs)
        return list(run_program(vm, vcpu, prog.hlt(), on_msr=lambda e: None))


def test_guest_mtrrs(kvm: System) -> None:
    # mtrr.c: the guest reads MTRRs (0 at reset) and writes valid values; an invalid one is #GP.
    prog = Program().rdmsr(0x201).rdmsr(0x250).wrmsr(0x2FF, 0xC06).rdmsr(0x2FF).wrmsr(0x201, 1).rdmsr(0xFE)
    assert run(kvm, prog) == [Rdmsr(0x201, 0), Rdmsr(0x250, 0), Wrmsr(0x2FF), Rdmsr(0x2FF, 0xC06), GP,
                              Rdmsr(0xFE, 0x508), Halted()]


def test_guest_apic_base_transitions(kvm: System) -> None:
    # lapic.c kvm_apic_set_base: a guest may enter x2APIC mode but not leave it for xAPIC; userspace may.
    prog = Program().wrmsr(0x1B, 0xFEE00D00).wrmsr(0x1B, 0xFEE00900).rdmsr(0x1B).wrmsr(0x1B, 0).rdmsr(0x1B)
    assert run(kvm, prog, cpuid=True) == [Wrmsr(0x1B), GP, Rdmsr(0x1B, 0xFEE00D00), Wrmsr(0x1B), Rdmsr(0x1B, 0),
                                          Halted()]


def test_guest_efer_needs_cpuid_bits(kvm: System) -> None:
    # x86.c __kvm_valid_efer: the guest's own EFER write needs the CPUID bit of each bit it sets (LM for the long-mode
    # EFER it runs with, NX), and reserved bits (SVME here) fail whatever CPUID says.
    events = run(kvm, Program().rdmsr(0xC0000080))
    efer = events[0].value  # type: ignore[attr-defined]
    assert efer & 0x500 == 0x500, f"the program runs in long mode: EFER {efer:#x}"
    assert run(kvm, Program().wrmsr(0xC0000080, efer)) == [GP, Halted()], "without CPUID.LM"
    prog = Program().wrmsr(0xC0000080, efer | 1 << 12).wrmsr(0xC0000080, efer | 1 << 11).rdmsr(0xC0000080)
    assert run(kvm, prog, cpuid=True) == [GP, Wrmsr(0xC0000080), Rdmsr(0xC0000080, efer | 1 << 11), Halted()]


def test_guest_tsc_aux_needs_rdtscp_or_rdpid(kvm: System) -> None:
    # x86.c __kvm_get_msr/__kvm_set_msr: without CPUID RDTSCP or RDPID (KVM_GET_SUPPORTED_CPUID has neither here).
    assert run(kvm, Program().rdmsr(0xC0000103).wrmsr(0xC0000103, 1), cpuid=True) == [GP, GP, Halted()]


def test_apic_base_same_value_is_taken_without_checks(kvm: System) -> None:
    # 6.13+ (a75b7bb46a83) kvm_apic_set_base returns at once for the current value: x2APIC mode set with CPUID.X2APIC
    # is taken back after a CPUID without it, where any other x2APIC value is now reserved (tests/test_kernel_versions.py
    # holds 6.12 to the checks). KVM_SET_SREGS goes the same way.
    supported = kvm.get_supported_cpuid()
    no_x2apic = [replace(e, ecx=e.ecx & ~(1 << 21)) if (e.function, e.index) == (1, 0) else e for e in supported]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)
        x2apic = vcpu.read_msr(0x1B) | 1 << 10
        assert vcpu.set_msrs({0x1B: x2apic}) == 1, "x2APIC mode with CPUID.X2APIC"
        vcpu.set_cpuid(no_x2apic)
        assert vcpu.set_msrs({0x1B: x2apic}) == 1, "the current x2APIC value again, CPUID.X2APIC now clear"
        vcpu.set_sregs(vcpu.get_sregs())  # its apic_base is the same value: no check either
        assert vcpu.set_msrs({0x1B: x2apic ^ 1 << 8}) == 0, "a changed x2APIC value without CPUID.X2APIC is reserved"
        assert vcpu.set_msrs({0x1B: x2apic & ~(1 << 10)}) == 1, "leaving x2APIC mode is a valid change"


# MSRs a guest reaches through a CPUID bit: (name, the bit, the MSR, the other bits that must be missing too)
CPUID_GATES = [("XFD", (0xD, 1, "eax", 4), 0x1C4, ()),
               ("RDTSCP", (0x80000001, 0, "edx", 27), 0xC0000103, ((7, 0, "ecx", 22),)),  # RDPID opens it too
               ("OSVW", (0x80000001, 0, "ecx", 9), 0xC0010140, ())]


def test_a_guest_cpuid_bit_kvm_does_not_support_opens_no_msr(kvm: System) -> None:
    # 6.14+ (8f2a27752e80) guest_cpu_cap_has: the guest's CPUID bit counts only where KVM supports the feature (before
    # 6.14 the bit alone opened the MSR: tests/test_kernel_versions.py). Each gate this host's KVM lacks is tried.
    supported = kvm.get_supported_cpuid()
    lacking = [(name, bit, msr) for name, bit, msr, also in CPUID_GATES
               if not any(has_feature(supported, *b) for b in (bit, *also))
               and find_cpuid(supported, bit[0], bit[1]) is not None]
    assert lacking, "this host's KVM supports every gate tried; the test needs one it lacks"
    for name, (function, index, reg, n), msr in lacking:
        cpuid = [replace(e, **{reg: getattr(e, reg) | 1 << n}) if (e.function, e.index) == (function, index) else e
                 for e in supported]
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(cpuid)
            events = run_program(vm, vcpu, Program().rdmsr(msr).hlt())
        assert events == [GP, Halted()], f"CPUID {name} set but not supported: guest RDMSR {msr:#x} gave {events}"


def test_guest_machine_check(kvm: System) -> None:
    # set_msr_mce: MCG_CTL and MCi_CTL2 fail for the guest without CTL_P/CMCI_P; a non-zero MCi_STATUS needs an
    # AMD-compatible CPUID and HWCR.McStatusWrEn (set by userspace here).
    prog = (Program().rdmsr(0x17B).rdmsr(0x280).wrmsr(0x17A, 1).rdmsr(0x17A).wrmsr(0x401, 5).rdmsr(0x401))
    assert run(kvm, prog) == [GP, GP, Wrmsr(0x17A), Rdmsr(0x17A, 1), GP, Rdmsr(0x401, 0), Halted()]
    assert run(kvm, Program().wrmsr(0x401, 5).rdmsr(0x401), cpuid=True, setup_msrs=[(0xC0010015, 1 << 18)]) == [
        Wrmsr(0x401), Rdmsr(0x401, 5), Halted()]


def test_guest_host_only_msrs(kvm: System) -> None:
    # kvm_set_msr_common: SMI_COUNT is written by userspace only; POLL_CONTROL takes bit 0 from the guest too.
    prog = Program().wrmsr(0x34, 1).rdmsr(0x34).wrmsr(0x4B564D05, 0).rdmsr(0x4B564D05).wrmsr(0x4B564D05, 2)
    assert run(kvm, prog) == [GP, Rdmsr(0x34, 0), Wrmsr(0x4B564D05), Rdmsr(0x4B564D05, 0), GP, Halted()]


INVAL, UNKNOWN = uapi.KVM_MSR_EXIT_REASON_INVAL, uapi.KVM_MSR_EXIT_REASON_UNKNOWN


def test_guest_failure_kinds_reach_userspace(kvm: System) -> None:
    # The code behind each failure, seen in the exit reason: 1 (INVAL) for a rule's refusal (0x210 is no MTRR, x2APIC
    # without LAPIC, MCG_CTL), KVM_MSR_RET_UNSUPPORTED (UNKNOWN) for an MSR no handler takes (MTRRcap writes).
    prog = Program().rdmsr(0x210).wrmsr(0xFE, 0).rdmsr(0x802).rdmsr(0x17B)
    assert run(kvm, prog, exits=INVAL | UNKNOWN) == [
        UserMsr(False, 0x210, 0, INVAL, "#GP"), GP, UserMsr(True, 0xFE, 0, UNKNOWN, "#GP"), GP,
        UserMsr(False, 0x802, 0, INVAL, "#GP"), GP, UserMsr(False, 0x17B, 0, INVAL, "#GP"), GP, Halted()]


@pytest.mark.parametrize("apic_base", [0xFEE00C00, 0xFEE00901, 0x1000000900, 0xFEE00500])
def test_set_sregs_checks_apic_base(kvm: System, apic_base: int) -> None:
    # __set_sregs_common: kvm_apic_set_base(host_initiated) refuses what the MSR write refuses, before anything changes.
    import errno

    from kvmscope.errors import KvmError

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.apic_base, sregs.cr4 = apic_base, 1 << 9
        with pytest.raises(KvmError) as info:
            vcpu.set_sregs(sregs)
        assert info.value.errno == errno.EINVAL, info.value
        after = vcpu.get_sregs()
        assert (after.apic_base, after.cr4) == (0xFEE00900, 0), (hex(after.apic_base), hex(after.cr4))


def test_set_sregs_does_not_check_efer(kvm: System) -> None:
    # KVM_SET_SREGS hands EFER to the vendor's set_efer without set_efer's reserved-bit check (SVME here).
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.efer = 1 << 12
        vcpu.set_sregs(sregs)
        assert vcpu.try_read_msr(0xC0000080) == 1 << 12
