"""The upstream KVM selftests that touch the vCPU-model rules, translated into model cases on the derived profiles.

Each case names the selftest file and the lines it translates, at the version read:

* ``6.1``: Debian linux-source 6.1.192, tools/testing/selftests/kvm/x86_64/
* ``6.12``: Debian linux-source 6.12.118, tools/testing/selftests/kvm/x86_64/
* ``upstream``: torvalds/linux tools/testing/selftests/kvm/x86/ (the directory was renamed in 6.13) at the commit named.

The facts come from the selftests; the code is ours. Each selftest runs at the kernel versions where its expectation
differs (the selftest at that version against that ruleset), on ``intel-spr`` and ``amd-epyc`` where the selftest
applies to that vendor. Where the model disagrees with the selftest the case is a strict xfail naming the difference,
and /work/notes/issue-12-selftests.md lists it. What this PVM host can also show is in
tests/conformance/test_conf_selftests.py on both backends.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

import kvmscope
from kvmscope import uapi
from kvmscope.api import CpuidEntry, Vcpu, Vm
from kvmscope.errors import KvmError
from kvmscope.program import Cpuid, GuestException, Halted, Program, Rdmsr, run_program

PLATFORM_INFO, UCODE_REV, ARCH_CAP, PERF_CAP, DE_CFG, FEAT_CTL = 0xCE, 0x8B, 0x10A, 0x345, 0xC0011029, 0x3A
VMX_BASIC, VMX_MISC, VMX_CR0_FIXED1, VMX_CR4_FIXED1, VMX_VMCS_ENUM = 0x480, 0x485, 0x487, 0x489, 0x48A
VMX_PROCBASED_CTLS2, VMX_EPT_VPID_CAP, VMX_VMFUNC = 0x48B, 0x48C, 0x491
VMX_TRUE_PINBASED, VMX_TRUE_PROCBASED, VMX_TRUE_EXIT, VMX_TRUE_ENTRY = 0x48D, 0x48E, 0x48F, 0x490
HIDDEN_VMX = {0x481, 0x482, 0x483, 0x484}  # PINBASED/PROCBASED/EXIT/ENTRY_CTLS: only the TRUE_ variants are settable
STUFF = uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS
GP = GuestException(13, 0)
PROFILES = ["intel-spr", "amd-epyc"]


def model(profile: str, kernel: str) -> kvmscope.System:
    return kvmscope.open("model", profile=profile, kernel=kernel)


@contextmanager
def one_vcpu(profile: str, kernel: str) -> Iterator[tuple[kvmscope.System, Vm, Vcpu]]:
    """vm_create_with_one_vcpu: a VM and vCPU 0 with KVM's supported CPUID (what the selftest library sets)."""
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        yield kvm, vm, vcpu


def model_differs(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"model differs: {reason}")


def without_feature(entries: list[CpuidEntry], leaf: int, reg: str, bit: int) -> list[CpuidEntry]:
    """vcpu_clear_cpuid_feature: the same CPUID with one feature bit cleared."""
    return [replace(e, **{reg: getattr(e, reg) & ~(1 << bit)}) if e.function == leaf and e.index == 0 else e
            for e in entries]


# --- get_msr_index_features.c (6.1 and 6.12 x86_64/get_msr_index_features.c:28-34) -----------------------------------
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_get_msr_index_features(profile: str, kernel: str) -> None:
    """Every MSR in KVM_GET_MSR_FEATURE_INDEX_LIST reads with a system KVM_GET_MSRS of one entry (kvm_get_feature_msr
    asserts r == 1); KVM_GET_MSR_INDEX_LIST works (line 30)."""
    with model(profile, kernel) as kvm:
        assert kvm.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES), "line 28: TEST_REQUIRE(KVM_CAP_GET_MSR_FEATURES)"
        assert kvm.get_msr_index_list(), "line 30: KVM_GET_MSR_INDEX_LIST should list MSRs"
        for index in kvm.get_msr_feature_index_list():
            batch = kvmscope.MsrBatch([index])
            got = kvm.get_feature_msrs(batch)
            assert got == 1, f"{kernel}: feature MSR {index:#x} should read (1 entry), KVM_GET_MSRS gave {got}"


# --- feature_msrs_test.c (upstream 946661e3bef8 x86/feature_msrs_test.c:42-94) ---------------------------------------
def host_cpu_is_intel(kvm: kvmscope.System) -> bool:
    """The selftests' host_cpu_is_intel: the vendor string of CPUID leaf 0 is GenuineIntel."""
    leaf0 = next(e for e in kvm.get_supported_cpuid() if e.function == 0)
    return (leaf0.ebx, leaf0.edx, leaf0.ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)


def feature_reset_value(kvm: kvmscope.System, index: int, supported: int) -> int:
    """feature_msrs_test.c:45 and 61-62: the supported value for a quirked MSR, 0 for DE_CFG; UCODE_REV's reset value
    is fixed (Intel: revision 1 in the upper half; AMD: 0x01000065)."""
    if index == UCODE_REV:
        return 0x100000000 if host_cpu_is_intel(kvm) else 0x01000065
    return 0 if index == DE_CFG else supported


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(("kernel", "has_quirk"), [("6.1.192", False), ("6.12", False), ("6.12.78", True),
                                                   ("6.13", True), ("6.18", True)])
def test_feature_msrs(profile: str, kernel: str, has_quirk: bool) -> None:
    """Reset value, a write of the supported value, and with KVM_X86_QUIRK_STUFF_FEATURE_MSRS disabled a reset to 0.

    The quirk half (lines 82-93) runs only where KVM_CAP_DISABLE_QUIRKS2 reports the quirk, as in the selftest; the
    reset and write half (lines 54-77) holds at every version (the stuffing predates the quirk that names it).
    """
    with model(profile, kernel) as kvm:
        supported = kvm.read_feature_msrs()
        quirks = kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
        assert bool(quirks & STUFF) is has_quirk, f"{kernel}: DISABLE_QUIRKS2 {quirks:#x}, STUFF expected {has_quirk}"
        for index, mask in supported.items():
            if index in (VMX_CR0_FIXED1, VMX_CR4_FIXED1):  # lines 54-55: KVM-controlled, only the read is checked
                continue
            with kvm.create_vm() as vm:
                vcpu = vm.create_vcpu(0)
                vcpu.set_cpuid(kvm.get_supported_cpuid())
                want = feature_reset_value(kvm, index, mask)
                got = vcpu.read_msr(index)
                assert got == want, f"{kernel} lines 70-74: MSR {index:#x} reset expected {want:#x}, saw {got:#x}"
                if index not in HIDDEN_VMX:
                    assert vcpu.set_msrs({index: mask}) == 1, f"{kernel} line 76: writing {index:#x}={mask:#x}"
            if index in HIDDEN_VMX or not has_quirk:
                continue
            with kvm.create_vm() as vm:
                vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, STUFF)
                vcpu = vm.create_vcpu(0)
                vcpu.set_cpuid(kvm.get_supported_cpuid())
                got = vcpu.read_msr(index)
                assert got == 0, f"{kernel} lines 86-92: quirk disabled, MSR {index:#x} expected 0, saw {got:#x}"


# --- platform_info_test.c ---------------------------------------------------------------------------------------------
def platform_info_flow(profile: str, kernel: str) -> tuple[list[object], int]:
    """The selftest's flow: host sets PLATFORM_INFO | MAX_TURBO_RATIO; with the capability on, the guest reads it;
    with it off, the guest's RDMSR #GPs. Returns the guest events and the result of restoring the original value."""
    with one_vcpu(profile, kernel) as (_, vm, vcpu):
        original = vcpu.read_msr(PLATFORM_INFO)
        vcpu.write_msr(PLATFORM_INFO, original | 0xFF00)
        vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 1)
        events: list[object] = list(run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt()))
        vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 0)
        events += run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt())
        return events, vcpu.set_msrs({PLATFORM_INFO: original})


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(("kernel", "restore_ok"), [("5.10", True), ("6.1", True), ("6.12", True), ("6.13", False),
                                                   ("6.18", False)])
def test_platform_info(profile: str, kernel: str, restore_ok: bool) -> None:
    """5.10 x86_64/platform_info_test.c:27-78 and 97-102; 6.1 x86_64/platform_info_test.c:26-67 and 82-87; 6.12
    x86_64/platform_info_test.c:24-39 and 52-75; upstream b2128290c299 x86/platform_info_test.c:24-38 and 50-74.

    The guest reads MAX_TURBO_RATIO with the capability on and #GPs with it off (5.10 and 6.1: the unhandled #GP is
    a SHUTDOWN, 6.1 line 63; our runner reports the #GP). The 5.10, 6.1 and 6.12 selftests restore the original
    value after KVM_RUN (5.10 line 102, 6.1 line 87, 6.12 line 75); upstream dropped that line because from 6.13
    PLATFORM_INFO is immutable after KVM_RUN (bc2ca3680b30): the restore succeeds through 6.12, is refused from 6.13.
    """
    events, restored = platform_info_flow(profile, kernel)
    on = events[0]
    assert isinstance(on, Rdmsr) and on.value & 0xFF00 == 0xFF00, f"{kernel}: guest read with the cap on: {on}"
    assert events[1:] == [Halted(), GP, Halted()], f"{kernel}: with the cap off the guest RDMSR should #GP: {events}"
    assert restored == int(restore_ok), f"{kernel}: restoring PLATFORM_INFO after KVM_RUN gave {restored}"


# --- vmx_pmu_caps_test.c ----------------------------------------------------------------------------------------------
FW_WRITES, LBR_FMT = 1 << 13, 0x3F
IMMUTABLE_612 = LBR_FMT | 1 << 6 | 1 << 7 | 0xF << 8 | 1 << 14  # 6.12 lines 41-47: LBR fmt, PEBS trap/arch/fmt/baseline
IMMUTABLE_UPSTREAM = IMMUTABLE_612 | 1 << 17  # upstream 210b09fa428c lines 41-48 add pebs_timing_info
FORMATS = LBR_FMT | 0xF << 8


def test_vmx_pmu_caps_6_1() -> None:
    """6.1 x86_64/vmx_pmu_caps_test.c:49-52 and 64-105: FW_WRITES is taken and kept across a run in which the guest's
    WRMSR of PERF_CAPABILITIES faults; after the run 0 and the host's LBR format are taken (no freeze before 6.4);
    every other LBR format is refused."""
    with one_vcpu("intel-spr", "6.1") as (kvm, vm, vcpu):
        host = kvm.read_feature_msrs([PERF_CAP])[PERF_CAP] & (FW_WRITES | LBR_FMT)
        assert vcpu.set_msrs({PERF_CAP: FW_WRITES}) == 1, "line 79: FW_WRITES"
        assert vcpu.read_msr(PERF_CAP) == FW_WRITES, "line 82"
        events = run_program(vm, vcpu, Program().wrmsr(PERF_CAP, LBR_FMT).hlt())
        assert events == [GP, Halted()], f"line 51: the guest's WRMSR should #GP, saw {events}"
        assert vcpu.read_msr(PERF_CAP) == FW_WRITES, "line 86: the guest did not change it"
        assert vcpu.set_msrs({PERF_CAP: 0}) == 1, "line 89: 0 after KVM_RUN (6.1 has no freeze)"
        assert vcpu.read_msr(PERF_CAP) == 0, "line 90"
        assert vcpu.set_msrs({PERF_CAP: host & LBR_FMT}) == 1, "line 92: the host's LBR format"
        for fmt in range(1, LBR_FMT + 1):
            if fmt != host & LBR_FMT:
                assert vcpu.set_msrs({PERF_CAP: fmt}) == 0, f"lines 99-105: LBR format {fmt:#x} should be refused"


@pytest.mark.parametrize("kernel", ["6.12", "6.18"])
def test_vmx_pmu_caps_guest_wrmsr(kernel: str) -> None:
    """6.12 x86_64/vmx_pmu_caps_test.c:54-74 and 83-117 (upstream 210b09fa428c lines 84-118): every guest WRMSR #GPs,
    the value is kept, and after KVM_RUN only the same value is taken."""
    with one_vcpu("intel-spr", kernel) as (kvm, vm, vcpu):
        caps = kvm.read_feature_msrs([PERF_CAP])[PERF_CAP]
        assert caps & FW_WRITES, "main: full-width writes should always be supported"
        vcpu.write_msr(PERF_CAP, caps)
        prog = Program().wrmsr(PERF_CAP, caps).wrmsr(PERF_CAP, 0)
        for bit in range(64):
            prog.wrmsr(PERF_CAP, caps ^ 1 << bit)
        events = run_program(vm, vcpu, prog.hlt())
        assert events == [GP] * 66 + [Halted()], f"{kernel}: every guest WRMSR should #GP: {events}"
        assert vcpu.read_msr(PERF_CAP) == caps, "line 103"
        assert vcpu.set_msrs({PERF_CAP: caps}) == 1, "line 106: the same value after KVM_RUN"
        assert vcpu.set_msrs({PERF_CAP: 0}) == 0, "line 108: 0 after KVM_RUN"
        for bit in range(64):
            assert vcpu.set_msrs({PERF_CAP: caps ^ 1 << bit}) == 0, f"lines 111-116: bit {bit} after KVM_RUN"


@pytest.mark.parametrize(("kernel", "immutable"), [("6.12", IMMUTABLE_612), ("6.18", IMMUTABLE_UPSTREAM)])
def test_vmx_pmu_caps_host_writes(kernel: str, immutable: int) -> None:
    """basic (6.12 lines 123-127), fungible (129-140) and immutable (148-186) PERF_CAPABILITIES; upstream 210b09fa428c
    lines 124-187 adds pebs_timing_info (bit 17) to the immutable set (lines 41-48). lbr_perf_capabilities (194-208)
    returns early: intel-spr's KVM reports LBR format 0."""
    with one_vcpu("intel-spr", kernel) as (kvm, _, vcpu):
        host = kvm.read_feature_msrs([PERF_CAP])[PERF_CAP]
        assert host & LBR_FMT == 0, "lbr_perf_capabilities would run: translate lines 194-208 too"
        assert vcpu.set_msrs({PERF_CAP: 0}) == 1 and vcpu.set_msrs({PERF_CAP: host}) == 1, "basic: 0 and the host value"
        fungible = host & ~immutable
        assert fungible, f"intel-spr's PERF_CAPABILITIES {host:#x} should have fungible bits"
        for bit in range(64):
            if fungible >> bit & 1:
                assert vcpu.set_msrs({PERF_CAP: 1 << bit}) == 1, f"fungible: bit {bit} alone"
                assert vcpu.set_msrs({PERF_CAP: host & ~(1 << bit)}) == 1, f"fungible: all but bit {bit}"
        assert vcpu.set_msrs({PERF_CAP: host}) == 1
        reserved = (~host & (1 << 64) - 1 | immutable) & ~FORMATS
        for bit in range(64):
            if reserved >> bit & 1:
                assert vcpu.set_msrs({PERF_CAP: host ^ 1 << bit}) == 0, f"immutable: flipping bit {bit} of {host:#x}"
        for fmt in range(1, 0x40):
            if fmt != host & LBR_FMT:
                assert vcpu.set_msrs({PERF_CAP: host & ~LBR_FMT | fmt}) == 0, f"LBR format {fmt:#x}"
        for fmt in range(1, 0x10):
            if fmt != host >> 8 & 0xF:
                assert vcpu.set_msrs({PERF_CAP: host & ~(0xF << 8) | fmt << 8}) == 0, f"PEBS format {fmt:#x}"


@pytest.mark.parametrize(("kernel", "without_pdcm"), [("6.12", "kept"), ("6.13", "unsupported"),
                                                      ("6.18", "unsupported")])
def test_vmx_pmu_caps_without_pdcm(kernel: str, without_pdcm: str) -> None:
    """upstream 210b09fa428c x86/vmx_pmu_caps_test.c:211-232 (perf_capabilities_unsupported, not in 6.12): with PDCM
    cleared from CPUID the host reads 0, may write 0, and any set bit is refused (d75cac366f44, 6.13). In 6.12
    (x86.c kvm_get_msr_common/kvm_set_msr_common check PDCM only for guest accesses) the host still reads the value it
    set and may still write supported bits."""
    with one_vcpu("intel-spr", kernel) as (kvm, _, vcpu):
        host = kvm.read_feature_msrs([PERF_CAP])[PERF_CAP]
        vcpu.write_msr(PERF_CAP, host)
        assert vcpu.read_msr(PERF_CAP) == host, "line 218"
        vcpu.set_cpuid(without_feature(kvm.get_supported_cpuid(), 1, "ecx", 15))  # CPUID.1:ECX.PDCM
        got = vcpu.read_msr(PERF_CAP)
        assert vcpu.set_msrs({PERF_CAP: 0}) == 1, f"{kernel} line 225: writing 0 without PDCM"
        taken = [bit for bit in range(64) if vcpu.set_msrs({PERF_CAP: 1 << bit}) == 1]
        if without_pdcm == "unsupported":
            assert got == 0, f"{kernel} line 223: without PDCM the host reads 0, saw {got:#x}"
            assert taken == [], f"{kernel} lines 227-231: without PDCM every bit is refused, took {taken}"
        else:
            assert got == host, f"{kernel}: without PDCM the host still reads {host:#x}, saw {got:#x}"
            # vmx_set_msr still checks the PEBS format as a whole (bit 10 alone is refused); FW_WRITES alone is taken.
            assert 13 in taken, f"{kernel}: without PDCM the host may still set FW_WRITES, took {taken}"


# --- vmx_msrs_test.c ---------------------------------------------------------------------------------------------------
def fixed1_test(vcpu: Vcpu, index: int, mask: int) -> None:
    """vmx_fixed1_msr_test (6.1/6.12 lines 15-27): clearing each allowed-1 bit in mask, and restoring, is taken."""
    value = vcpu.read_msr(index)
    for bit in range(64):
        if mask & value >> bit & 1:
            assert vcpu.set_msrs({index: value & ~(1 << bit)}) == 1, f"{index:#x}: clearing bit {bit} of {value:#x}"
            assert vcpu.set_msrs({index: value}) == 1, f"{index:#x}: restoring {value:#x} after clearing bit {bit}"


def fixed0_test(vcpu: Vcpu, index: int, mask: int) -> None:
    """vmx_fixed0_msr_test (lines 29-41): setting each allowed-0 (clear) bit in mask, and restoring, is taken."""
    value = vcpu.read_msr(index)
    clear = mask & ~value
    for bit in range(64):
        if clear >> bit & 1:
            assert vcpu.set_msrs({index: value | 1 << bit}) == 1, f"{index:#x}: setting bit {bit} of {value:#x}"
            assert vcpu.set_msrs({index: value}) == 1, f"{index:#x}: restoring {value:#x} after setting bit {bit}"


@pytest.mark.parametrize("kernel", ["6.1.192", "6.12", "6.18"])
def test_vmx_save_restore_msrs(kernel: str) -> None:
    """vmx_save_restore_msrs_test (6.1 and 6.12 x86_64/vmx_msrs_test.c:49-68, upstream b2128290c299 unchanged): any
    VMCS_ENUM; each allowed-1 bit of BASIC, MISC, the secondary and TRUE controls, EPT/VPID and VMFUNC may be cleared
    and restored; each fixed-0 bit of the controls' low half may be set and restored."""
    with one_vcpu("intel-spr", kernel) as (kvm, _, vcpu):
        assert kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2), "main: TEST_REQUIRE(KVM_CAP_DISABLE_QUIRKS2)"
        assert vcpu.set_msrs({VMX_VMCS_ENUM: 0}) == 1 and vcpu.set_msrs({VMX_VMCS_ENUM: (1 << 64) - 1}) == 1, (
            "lines 51-52: VMCS_ENUM takes 0 and ~0")
        fixed1_test(vcpu, VMX_BASIC, 1 << 49 | 1 << 54 | 1 << 55)
        fixed1_test(vcpu, VMX_MISC, 1 << 5 | 0x7 << 6 | 1 << 14 | 1 << 15 | 1 << 28 | 1 << 29 | 1 << 30)
        for index in (VMX_PROCBASED_CTLS2, VMX_TRUE_PINBASED, VMX_TRUE_PROCBASED, VMX_TRUE_EXIT, VMX_TRUE_ENTRY):
            fixed0_test(vcpu, index, 0xFFFFFFFF)
            fixed1_test(vcpu, index, 0xFFFFFFFF << 32)
        fixed1_test(vcpu, VMX_EPT_VPID_CAP, (1 << 64) - 1)
        fixed1_test(vcpu, VMX_VMFUNC, (1 << 64) - 1)


# FEAT_CTL bits: LOCKED, VMX inside SMX, VMX outside SMX, SGX_LC, SGX, LMCE; CPUID bits that grant them.
LOCKED, VMX_IN_SMX, VMX_OUT_SMX, SGX_LC, SGX_ON, LMCE = 1, 1 << 1, 1 << 2, 1 << 17, 1 << 18, 1 << 20
FEAT_CTL_CASES = [(VMX_IN_SMX, (1, "ecx", 6)), (VMX_IN_SMX, (1, "ecx", 5)), (VMX_OUT_SMX, (1, "ecx", 5)),
                  (SGX_LC, (7, "ecx", 30)), (SGX_LC, (7, "ebx", 2)), (SGX_ON, (7, "ebx", 2)), (LMCE, (1, "edx", 7))]


def has(entries: list[CpuidEntry], leaf: int, reg: str, bit: int) -> bool:
    return any(e.function == leaf and e.index == 0 and getattr(e, reg) >> bit & 1 for e in entries)


def valid_bits_6_1(entries: list[CpuidEntry]) -> int:
    """6.1.192 vmx.c:4789, 7723-7730, 7756-7766, 8059-8064: LOCKED; VMX bits with VMX; SGX/SGX_LC with their CPUID
    bits; LMCE only with MCG_LMCE_P in mcg_cap (not set without KVM_X86_SETUP_MCE)."""
    bits = LOCKED
    if has(entries, 1, "ecx", 5):
        bits |= VMX_IN_SMX | VMX_OUT_SMX
    if has(entries, 7, "ebx", 2):
        bits |= SGX_ON
    if has(entries, 7, "ecx", 30):
        bits |= SGX_LC
    return bits


@pytest.mark.parametrize("kernel", [
    "6.1", "6.2", "6.12", "6.18"])  # d2a00af2061d (6.2): host writes checked against KVM_SUPPORTED_FEATURE_CONTROL
def test_ia32_feature_control(kernel: str) -> None:
    """ia32_feature_control_msr_test (6.12 x86_64/vmx_msrs_test.c:70-114; upstream b2128290c299 unchanged; not in the
    6.1 selftest): with the granting CPUID feature cleared, host writes of the bit (and LOCKED) are still taken
    (6.12.118 vmx.c:2009-2012: host writes are checked against KVM_SUPPORTED_FEATURE_CONTROL), and each bit outside
    the supported set is refused. At 6.1 the kernel checked host writes against the CPUID-derived valid bits
    (valid_bits_6_1): the writes of a bit the cleared CPUID feature withdrew are refused there, as asserted for 6.1."""
    with one_vcpu("intel-spr", kernel) as (kvm, _, vcpu):
        supported = kvm.get_supported_cpuid()
        for bit, (leaf, reg, cpuid_bit) in FEAT_CTL_CASES:
            vcpu.set_cpuid(without_feature(supported, leaf, reg, cpuid_bit))
            value = vcpu.read_msr(FEAT_CTL)
            took = [vcpu.set_msrs({FEAT_CTL: v}) for v in (value | bit | LOCKED, value & ~bit | LOCKED,
                                                           value | bit | LOCKED, value & ~bit | LOCKED, value)]
            expect = [1] * 5
            if kernel == "6.1":  # the first and third writes need the bit in the CPUID-derived valid bits
                expect[0] = expect[2] = int(not bit & ~valid_bits_6_1(vcpu.get_cpuid()))
            assert took == expect, (f"{kernel} lines 78-83: FEAT_CTL bit {bit:#x} without CPUID "
                                    f"{leaf:#x}.{reg}[{cpuid_bit}]: expected {expect}, saw {took}")
        vcpu.set_cpuid(supported)
        allowed = LOCKED | VMX_IN_SMX | VMX_OUT_SMX | SGX_LC | SGX_ON | LMCE
        for bit in range(64):
            if not allowed >> bit & 1:
                assert vcpu.set_msrs({FEAT_CTL: 1 << bit}) == 0, f"lines 109-113: reserved FEAT_CTL bit {bit}"


# --- cpuid_test.c ------------------------------------------------------------------------------------------------------
MANGLED = {(0xD, 0), (0xD, 1)}  # cpuid_test.c:19-26: depend on XCR0 and IA32_XSS


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kernel", ["6.1", "6.12", "6.18"])
def test_cpuid(profile: str, kernel: str) -> None:
    """6.12 x86_64/cpuid_test.c:28-57, 72-101, 138-183 and 192-205 (6.1 the same without test_get_cpuid2; upstream
    6574f01ef95d adds the CR4.OSXSAVE/PKE toggle before the second identical KVM_SET_CPUID2).

    KVM_GET_CPUID2 equals what was set, the guest's CPUID of every entry equals it, the KVM leaf's maximum is
    0x40000001; after KVM_RUN the identical CPUID is taken (also after toggling CR4 bits that update CPUID at run
    time), a changed 7.EBX or MAXPHYADDR is refused; KVM_GET_CPUID2 with too few entries is E2BIG.
    """
    with one_vcpu(profile, kernel) as (kvm, vm, vcpu):
        supported = kvm.get_supported_cpuid()
        current = vcpu.get_cpuid()
        assert [(e.function, e.index, e.flags) for e in current] == [
            (e.function, e.index, e.flags) for e in supported], f"{kernel} lines 78-89: entries differ"
        for a, b in zip(current, supported, strict=True):
            if (a.function, a.index) not in MANGLED:
                assert a == b, f"{kernel} lines 94-99: {a} vs {b}"
        prog = Program()
        for e in current:
            prog.cpuid(e.function, e.index)
        events = run_program(vm, vcpu, prog.cpuid(0x40000000).hlt())
        seen = vcpu.get_cpuid()  # what KVM now holds, runtime updates included
        assert len(events) == len(seen) + 2 and all(isinstance(ev, Cpuid) for ev in events[:-1]), events[-3:]
        for e, ev in zip(seen, events, strict=False):
            assert isinstance(ev, Cpuid)
            if (e.function, e.index) not in MANGLED:
                assert (ev.eax, ev.ebx, ev.ecx, ev.edx) == (e.eax, e.ebx, e.ecx, e.edx), (
                    f"{kernel} lines 33-42: guest CPUID {e.function:#x}.{e.index} gave {ev}, KVM holds {e}")
        kvm_leaf = events[len(seen)]
        assert isinstance(kvm_leaf, Cpuid) and kvm_leaf.eax == 0x40000001, f"line 54: KVM's maximum leaf {kvm_leaf}"
        vcpu.set_cpuid(seen)  # lines 144-146: identical after KVM_RUN
        sregs = vcpu.get_sregs()
        sregs.cr4 ^= 1 << 18  # upstream: toggle CR4.OSXSAVE (XSAVE is supported on both profiles)
        vcpu.set_sregs(sregs)
        vcpu.set_cpuid(seen)
        for what, changed in (
                ("7.EBX - 1 (lines 148-154)", [replace(e, ebx=e.ebx - 1) if (e.function, e.index) == (7, 0) else e
                                               for e in seen]),
                ("MAXPHYADDR - 1 (lines 156-163)", [replace(e, eax=e.eax & ~0xFF | (e.eax & 0xFF) - 1)
                                                    if e.function == 0x80000008 else e for e in seen])):
            with pytest.raises(KvmError) as info:
                vcpu.set_cpuid(changed)
            assert info.value.errno == errno.EINVAL, f"{kernel}: {what} after KVM_RUN: {info.value}"
        assert len(vcpu.get_cpuid(len(seen))) == len(seen), "lines 171-174: nent entries suffice"
        for n in (0, len(seen) // 2, len(seen) - 1):
            with pytest.raises(KvmError) as info:
                vcpu.get_cpuid(n)
            assert info.value.errno == errno.E2BIG, f"lines 176-181: KVM_GET_CPUID2 with {n} entries: {info.value}"


# --- hwcr_msr_test.c (6.12 x86_64/hwcr_msr_test.c:11-42; not in the 6.1 tree) -----------------------------------------
HWCR = 0xC0010015
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kernel", ["6.7", "6.12", "6.18"])  # 8b0e00fba934, 598a790fc20f (6.7)
def test_hwcr(profile: str, kernel: str) -> None:
    """Each single bit: 3, 6 and 8 are taken and dropped (read 0), 18 (McStatusWrEn) and 24 (TscFreqSel) are taken
    and read back, the rest are refused (6.12.118 x86.c:3436-3451; unchanged upstream)."""
    with one_vcpu(profile, kernel) as (_, _, vcpu):
        ignored, valid = 1 << 3 | 1 << 6 | 1 << 8, 1 << 18 | 1 << 24
        for bit in range(64):
            value = 1 << bit
            took = vcpu.set_msrs({HWCR: value})
            assert took == int(not value & ~(ignored | valid)), f"{kernel} lines 20-23: HWCR {value:#x} gave {took}"
            got = vcpu.read_msr(HWCR)
            assert got == value & valid, f"{kernel} lines 25-28: bit {bit} reads {got:#x}, expected {value & valid:#x}"
            assert vcpu.set_msrs({HWCR: 0}) == 1, "line 30"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kernel", ["6.1", "6.6"])
def test_hwcr_before_6_7(profile: str, kernel: str) -> None:
    """The other side of the boundary (6.1.192 x86.c:3630-3642, 4240-4241): only McStatusWrEn alone is stored, bit
    24 is refused, and a later write of 0 is taken without clearing it (the write of 0 stores nothing)."""
    with one_vcpu(profile, kernel) as (_, _, vcpu):
        assert vcpu.set_msrs({HWCR: 1 << 24}) == 0, "6.1: TscFreqSel is refused"
        assert vcpu.set_msrs({HWCR: 1 << 18 | 1 << 3}) == 1, "6.1: McStatusWrEn (with an ignored bit) is taken"
        assert vcpu.read_msr(HWCR) == 1 << 18
        assert vcpu.set_msrs({HWCR: 0}) == 1 and vcpu.read_msr(HWCR) == 1 << 18, "6.1: writing 0 keeps McStatusWrEn"


# --- kvm_pv_test.c test_pv_unhalt (6.12 x86_64/kvm_pv_test.c:136-171) ---------------------------------------------------
KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT, PV_UNHALT = 143, 1 << 1, 1 << 7  # uapi kvm.h, kvm_para.h


@pytest.mark.parametrize("profile", PROFILES)
def test_pv_unhalt_6_12(profile: str) -> None:
    """As the 6.12 selftest does it: set PV_UNHALT, change the KVM signature (so KVM forgets its KVM leaf), enable
    HLT-in-guest after the vCPU exists (6.12 has no created_vcpus check), restore the signature: PV_UNHALT is gone."""
    with one_vcpu(profile, "6.12") as (kvm, vm, vcpu):
        entries = [replace(e, eax=e.eax | PV_UNHALT) if e.function == 0x40000001 else e for e in vcpu.get_cpuid()]
        vcpu.set_cpuid(entries)
        assert any(e.function == 0x40000001 and e.eax & PV_UNHALT for e in vcpu.get_cpuid()), "lines 149-152"
        sig = [replace(e, ebx=0xDEADBEEF) if e.function == 0x40000000 else e for e in entries]
        vcpu.set_cpuid(sig)
        vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT)
        vcpu.set_cpuid(entries)
        leaf = [e for e in vcpu.get_cpuid() if e.function == 0x40000001]
        assert leaf and not leaf[0].eax & PV_UNHALT, f"lines 165-166: PV_UNHALT with HLT in guest: {leaf}"


@pytest.mark.parametrize(("kernel", "after_vcpu_ok"), [("6.13", True), ("6.14", False), ("6.18", False)])
def test_disable_exits_after_vcpu_creation(kernel: str, after_vcpu_ok: bool) -> None:
    """04cd8f8628d8 (6.14, upstream kvm_pv_test.c @7b2658cb33c7 enables the cap before creating the vCPU): once a vCPU
    exists, KVM_CAP_X86_DISABLE_EXITS is EINVAL; 6.12.118 x86.c:6123-6149 has no such check."""
    from kvmscope.errors import KvmError

    with one_vcpu("intel-spr", kernel) as (_, vm, _vcpu):
        try:
            vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT)
            took = True
        except KvmError:
            took = False
        assert took is after_vcpu_ok, f"{kernel}: DISABLE_EXITS after vCPU creation expected {after_vcpu_ok}"


# --- xss_msr_test.c (5.10 x86_64/xss_msr_test.c:47-73; 6.1 and 6.12 x86_64/xss_msr_test.c:24-51) ------------------
XSS = 0xDA0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.12"])
def test_xss_msr(profile: str, kernel: str) -> None:
    """The selftest's own assertions: with XSAVES, IA32_XSS resets to 0 and takes 0; a single-bit write either fails
    or IA32_XSS is in KVM_GET_MSR_INDEX_LIST (6.12 lines 28-32 and 40-51)."""
    with one_vcpu(profile, kernel) as (kvm, _, vcpu):
        assert any(e.function == 0xD and e.index == 1 and e.eax & 1 << 3 for e in kvm.get_supported_cpuid()), (
            "line 26: TEST_REQUIRE(XSAVES)")
        assert vcpu.read_msr(XSS) == 0, "lines 28-30: IA32_XSS starts at 0"
        assert vcpu.set_msrs({XSS: 0}) == 1, "line 32"
        listed = XSS in kvm.get_msr_index_list()
        for bit in range(64):
            took = vcpu.set_msrs({XSS: 1 << bit})
            assert took == 0 or listed, f"lines 48-50: XSS bit {bit} was taken but XSS is not in the MSR index list"


@pytest.mark.parametrize("profile", PROFILES)  # supported_xss is 0 before the CET series (vmx.c:7995, svm.c:5397)
@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.12"])
def test_xss_msr_takes_only_zero(profile: str, kernel: str) -> None:
    """What the selftest's comment says KVM does (6.12 lines 34-39: only a guest IA32_XSS of 0 is supported), from the
    source of each version: 5.10.262 x86.c:3252-3265 with vmx.c:7479 / svm.c:894; 6.1.192 x86.c:3713-3726 with
    vmx.c:7854 / svm.c:4997; 6.12.118 x86.c:3528-3541 with vmx.c:7995 / svm.c:5397."""
    with one_vcpu(profile, kernel) as (_, _, vcpu):
        taken = [bit for bit in range(64) if vcpu.set_msrs({XSS: 1 << bit}) == 1]
        assert taken == [], f"{kernel}: supported_xss is 0, no IA32_XSS bit can be set; took bits {taken}"


# --- xcr0_cpuid_test.c (6.12 x86_64/xcr0_cpuid_test.c:18-80; not in the 6.1 tree) ------------------------------------
def assert_xcr0_is_usable(supported_xcr0: int, where: str) -> None:
    """The architectural bundles of lines 62-80 on the XCR0 the guest sees in CPUID 0xD.0 (EDX:EAX)."""
    sse, ymm, bnd, avx512, xtile = 1 << 1, 1 << 2, 0x3 << 3, 0x7 << 5, 0x3 << 17

    def depends(features: int, deps: int, what: str) -> None:  # ASSERT_XFEATURE_DEPENDENCIES, lines 22-30
        have = supported_xcr0 & (features | deps)
        assert have & features != features or have == features | deps, f"{where}: {what} {supported_xcr0:#x}"

    def all_or_none(features: int, what: str) -> None:  # ASSERT_ALL_OR_NONE_XFEATURE, lines 40-47
        have = supported_xcr0 & features
        assert not have or have == features, f"{where}: {what} all or none: {supported_xcr0:#x}"

    assert supported_xcr0 & 1, f"{where}: x87 is always in XCR0: {supported_xcr0:#x}"
    depends(ymm, sse, "AVX needs SSE (lines 62-65)")
    all_or_none(bnd, "MPX (lines 67-69)")
    depends(avx512, sse | ymm, "AVX-512 needs SSE and AVX (lines 71-74)")
    all_or_none(avx512, "AVX-512 (lines 75-76)")
    all_or_none(xtile, "AMX (lines 78-80)")


def supported_xcr0(entries: list[CpuidEntry]) -> int:
    leaf = next(e for e in entries if (e.function, e.index) == (0xD, 0))
    return leaf.edx << 32 | leaf.eax


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
@pytest.mark.parametrize("kernel", ["6.4", "6.12", "6.18"])  # 55cd57b596e8 (6.4) filters XTILE_CFG
def test_xcr0_cpuid(profile: str, kernel: str) -> None:
    """The XCR0 KVM offers (supported CPUID 0xD.0, and what the guest reads there) is usable as-is."""
    with one_vcpu(profile, kernel) as (kvm, vm, vcpu):
        assert_xcr0_is_usable(supported_xcr0(kvm.get_supported_cpuid()), f"{profile} {kernel} supported")
        events = run_program(vm, vcpu, Program().cpuid(0xD, 0).hlt())
        seen = events[0]
        assert isinstance(seen, Cpuid), events
        assert_xcr0_is_usable(seen.edx << 32 | seen.eax, f"{profile} {kernel} guest CPUID 0xD.0")


def test_xcr0_6_1_offers_xtile_cfg_alone() -> None:
    """The other side: 6.1.192 cpuid.c:1016 filters only by the guest permission (XTILE_DATA is dynamic, XTILE_CFG
    is not), so an SPR host without the permission offers XTILE_CFG alone, the XCR0 xcr0_cpuid_test (not in the 6.1
    tree) was written to catch."""
    with model("intel-spr", "6.1") as kvm:
        xcr0 = supported_xcr0(kvm.get_supported_cpuid())
        assert xcr0 & (0x3 << 17) == 1 << 17, f"6.1: XTILE_CFG without XTILE_DATA expected, saw {xcr0:#x}"
