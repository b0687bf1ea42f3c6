"""The KVM selftests' feature-MSR assertions, run against the model with the derived VMX and SVM host profiles.

Ports of ``tools/testing/selftests/kvm/x86/feature_msrs_test.c`` (@946661e3), ``vmx_msrs_test.c`` (@b2128290),
``vmx_pmu_caps_test.c`` (@210b09fa; the host-side parts only: the model does not execute guest WRMSR), plus the DE_CFG
rules of ``svm_set_msr`` and the after-run freeze of the VMX MSRs (0094f62c7eaa, v6.4; 1d294dfaba8c, v6.10).
The profiles are ``intel-spr`` (Sapphire Rapids, nested VMX) and ``amd-epyc`` (Genoa, SVM), both derived, not captured
(docs/profiles-derived.md). Helpers mirror the selftest library: ``vcpu_set_msr`` insists that KVM_SET_MSRS wrote the
entry and reads it back; ``_vcpu_set_msr`` returns the count. Every assertion says what it wanted and what it got.
"""

from __future__ import annotations

import dataclasses

import pytest

import kvmscope
from kvmscope import msrs as M
from kvmscope import uapi
from kvmscope.api import CpuidEntry, HltExit, MsrBatch, Vcpu
from kvmscope.guest import run_to_hlt
from kvmscope.kernel import profile as profiles

SPR = "intel-spr"
AMD = "amd-epyc"

BASIC, PINBASED, PROCBASED, EXIT, ENTRY, MISC = 0x480, 0x481, 0x482, 0x483, 0x484, 0x485
CR0_FIXED0, CR0_FIXED1, CR4_FIXED0, CR4_FIXED1, VMCS_ENUM = 0x486, 0x487, 0x488, 0x489, 0x48A
PROCBASED_CTLS2, EPT_VPID_CAP, VMFUNC = 0x48B, 0x48C, 0x491
TRUE_PINBASED, TRUE_PROCBASED, TRUE_EXIT, TRUE_ENTRY = 0x48D, 0x48E, 0x48F, 0x490
UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO, DE_CFG = 0x8B, 0x10A, 0x345, 0xCE, 0xC0011029
FEAT_CTL = 0x3A

HIDDEN_VMX = (PINBASED, PROCBASED, EXIT, ENTRY)  # is_hidden_vmx_msr(): only the TRUE_* twins are settable
KVM_CONTROLLED = (CR0_FIXED1, CR4_FIXED1)  # is_kvm_controlled_msr(): rebuilt from guest CPUID
U64 = (1 << 64) - 1

# union perf_capabilities in vmx_pmu_caps_test.c
LBR_FMT = 0x3F
PEBS_FMT = 0xF00
FULL_WIDTH_WRITE = 1 << 13
# immutable_caps: lbr_format, pebs_trap, pebs_arch_reg, pebs_format, pebs_baseline, pebs_timing_info
IMMUTABLE_CAPS = LBR_FMT | 1 << 6 | 1 << 7 | PEBS_FMT | 1 << 14 | 1 << 17
FORMAT_CAPS = LBR_FMT | PEBS_FMT

FEAT_CTL_SUPPORTED = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 17 | 1 << 18 | 1 << 20  # KVM_SUPPORTED_FEATURE_CONTROL


# --- selftest-library equivalents ----------------------------------------------------------------------------------


def open_kvm(profile: str | profiles.Profile, kernel: str | None = None) -> kvmscope.System:
    return kvmscope.open("model", profile=profile, kernel=kernel)


def vm_create_with_one_vcpu(kvm: kvmscope.System, quirk_disabled: bool = False) -> tuple[object, Vcpu]:
    """``vm_create_with_one_vcpu``: a VM and vCPU 0 with KVM_GET_SUPPORTED_CPUID set (as the selftests do).
    ``quirk_disabled``: disable KVM_X86_QUIRK_STUFF_FEATURE_MSRS before the vCPU is created."""
    vm = kvm.create_vm()
    if quirk_disabled:
        vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    return vm, vcpu


def _vcpu_set_msr(vcpu: Vcpu, index: int, value: int) -> int:
    """``_vcpu_set_msr``: KVM_SET_MSRS of one entry; the number of entries written (0 or 1)."""
    return vcpu.set_msrs([(index, value)])


def vcpu_get_msr(vcpu: Vcpu, index: int) -> int:
    batch = MsrBatch([index])
    r = vcpu.get_msrs(batch)
    assert r == 1, f"KVM_GET_MSRS of MSR 0x{index:x}: wanted 1 entry read, got {r} (rule: {vcpu.refusal_rule(index)})"
    return batch[0][1]


def vcpu_set_msr(vcpu: Vcpu, index: int, value: int) -> None:
    """``vcpu_set_msr``: the write must go through and read back (the selftests' "durable" MSR check)."""
    r = _vcpu_set_msr(vcpu, index, value)
    assert r == 1, (f"KVM_SET_MSRS of MSR 0x{index:x} = 0x{value:x}: wanted 1 entry written, got {r} "
                    f"(rule: {vcpu.refusal_rule(index)})")
    got = vcpu_get_msr(vcpu, index)
    assert got == value, f"MSR 0x{index:x}: wrote 0x{value:x}, read back 0x{got:x}"


def vcpu_set_msr_fails(vcpu: Vcpu, index: int, value: int, why: str) -> None:
    r = _vcpu_set_msr(vcpu, index, value)
    assert r == 0, f"{why}: wanted KVM_SET_MSRS of MSR 0x{index:x} = 0x{value:x} to write 0 entries, got {r}"


def kvm_get_feature_msr(kvm: kvmscope.System, index: int) -> int:
    batch = MsrBatch([index])
    r = kvm.get_feature_msrs(batch)
    assert r == 1, f"system KVM_GET_MSRS of feature MSR 0x{index:x}: wanted 1 entry read, got {r}"
    return batch[0][1]


def cpuid_edit(entries: list[CpuidEntry], function: int, index: int, register: str, bit: int,
               on: bool) -> list[CpuidEntry]:
    """Set or clear one CPUID bit (``vcpu_{set,clear}_cpuid_feature``)."""
    out = []
    for e in entries:
        if e.function == function and e.index == index:
            v = getattr(e, register)
            e = dataclasses.replace(e, **{register: v | 1 << bit if on else v & ~(1 << bit)})
        out.append(e)
    return out


def run_guest_to_hlt(vm: object, vcpu: Vcpu) -> None:
    exit_ = run_to_hlt(vm, vcpu)  # type: ignore[arg-type]
    assert isinstance(exit_, HltExit), f"wanted the one-byte guest to exit with HLT, got {exit_!r}"


def feature_list(name: str) -> list[int]:
    return list(profiles.load(name).feature_msrs)


def bit_list(mask: int) -> list[int]:
    return [b for b in range(64) if mask >> b & 1]


# --- the profiles themselves -----------------------------------------------------------------------------------------


def test_profiles_load_and_are_derived() -> None:
    for name, vendor in ((SPR, "vmx"), (AMD, "svm")):
        p = profiles.load(name)
        assert p.vendor == vendor, f"profile {name}: wanted vendor {vendor}, got {p.vendor}"
        assert p.ruleset == "6.18", f"profile {name}: wanted ruleset 6.18, got {p.ruleset}"
        assert p.source.get("kind") == "derived", f"profile {name}: wanted source.kind 'derived', got {p.source!r}"
        assert p.source.get("references") and p.source.get("assumptions"), \
            f"profile {name}: wanted source.references and source.assumptions, got keys {sorted(p.source)}"


def test_feature_list_order_and_capabilities() -> None:
    """kvm_init_msr_lists(): the VMX range 0x480..0x491 first, then msr_based_features_all_except_vmx in order, each
    kept only if the vendor's get_feature_msr succeeds (DE_CFG only on SVM, the VMX range only on VMX with nested)."""
    want = {
        SPR: [*range(0x480, 0x492), UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO],
        AMD: [DE_CFG, UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO],
    }
    for name, expected in want.items():
        kvm = open_kvm(name)
        got = kvm.get_msr_feature_index_list()
        assert got == expected, f"{name}: wanted feature list {[hex(i) for i in expected]}, got {[hex(i) for i in got]}"
        assert kvm.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES) == 1, \
            f"{name}: wanted KVM_CAP_GET_MSR_FEATURES 1, got {kvm.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES)}"
        quirks = kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
        assert quirks & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS, \
            f"{name}: wanted KVM_CAP_DISABLE_QUIRKS2 to include STUFF_FEATURE_MSRS (0x100), got 0x{quirks:x}"


def test_index_lists() -> None:
    """emulated_msrs_all holds 12 VMX MSRs (BASIC, TRUE_*, MISC, CR0/CR4_FIXED0, VMCS_ENUM, PROCBASED_CTLS2,
    EPT_VPID_CAP, VMFUNC), kept only when vmx_has_emulated_msr() says nested; svm_has_emulated_msr() drops them all.
    DE_CFG is in neither msrs_to_save nor emulated_msrs."""
    twelve = {BASIC, TRUE_PINBASED, TRUE_PROCBASED, TRUE_EXIT, TRUE_ENTRY, MISC, CR0_FIXED0, CR4_FIXED0, VMCS_ENUM,
              PROCBASED_CTLS2, EPT_VPID_CAP, VMFUNC}
    for name, vmx in ((SPR, twelve), (AMD, set())):
        index = open_kvm(name).get_msr_index_list()
        got = {i for i in index if M.VMX_FIRST <= i <= M.VMX_LAST}
        assert got == vmx, f"{name}: wanted VMX MSRs {sorted(hex(i) for i in vmx)} in the index list, " \
                           f"got {sorted(hex(i) for i in got)}"
        for msr in (UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO):
            assert msr in index, f"{name}: wanted emulated MSR 0x{msr:x} in KVM_GET_MSR_INDEX_LIST, it is missing"
        assert DE_CFG not in index, f"{name}: wanted DE_CFG absent from KVM_GET_MSR_INDEX_LIST, found it"
        assert len(index) == len(set(index)), f"{name}: wanted no duplicate index-list entries, got {len(index)} " \
                                              f"entries for {len(set(index))} MSRs"


# --- feature_msrs_test.c ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "msr"), [(n, m) for n in (SPR, AMD) for m in feature_list(n)],
                         ids=lambda v: v if isinstance(v, str) else f"0x{v:x}")
def test_feature_msr(name: str, msr: int) -> None:
    """test_feature_msr(): the system value is the supported mask; a fresh vCPU reads it (quirked MSRs), 0 (DE_CFG)
    or the vendor's arbitrary microcode revision; writing the mask succeeds (except the hidden VMX controls); with
    the STUFF_FEATURE_MSRS quirk disabled before vCPU creation, every non-hidden MSR reads 0."""
    kvm = open_kvm(name)
    supported_mask = kvm_get_feature_msr(kvm, msr)
    quirked = msr != DE_CFG
    reset_value = supported_mask if quirked else 0

    if msr in KVM_CONTROLLED:
        return
    if msr == UCODE_REV:
        reset_value = 0x100000000 if name == SPR else 0x01000065

    vm, vcpu = vm_create_with_one_vcpu(kvm)
    got = vcpu_get_msr(vcpu, msr)
    assert got == reset_value, (f"Wanted 0x{reset_value:x} for {'' if quirked else 'non-'}quirked MSR 0x{msr:x}, "
                                f"got 0x{got:x}")
    if msr not in HIDDEN_VMX:
        vcpu_set_msr(vcpu, msr, supported_mask)
    vm.close()

    if msr in HIDDEN_VMX:
        return
    caps = kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
    assert caps & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS, \
        f"{name}: wanted DISABLE_QUIRKS2 to offer STUFF_FEATURE_MSRS, got 0x{caps:x}"
    vm, vcpu = vm_create_with_one_vcpu(kvm, quirk_disabled=True)
    got = vcpu_get_msr(vcpu, msr)
    assert got == 0, f"Quirk disabled, wanted '0' for MSR 0x{msr:x}, got 0x{got:x}"
    vm.close()


def test_hidden_vmx_controls_never_writable() -> None:
    """vmx_set_vmx_msr(): 0x481-0x484 and CR0/CR4_FIXED1 are -EINVAL even for their current value."""
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    for msr in (*HIDDEN_VMX, *KVM_CONTROLLED):
        vcpu_set_msr_fails(vcpu, msr, vcpu_get_msr(vcpu, msr), "hidden/KVM-controlled VMX MSR, same value, before run")


def test_vmx_msrs_need_guest_vmx() -> None:
    """vmx_{get,set}_msr(): without CPUID.1:ECX.VMX the VMX MSRs return 1, not KVM_MSR_RET_UNSUPPORTED, so even a
    host read fails (no "advertised MSR reads 0" rule) and so does a write of 0."""
    kvm = open_kvm(SPR)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid_edit(kvm.get_supported_cpuid(), 1, 0, "ecx", 5, False))
    for msr in (BASIC, TRUE_PINBASED, VMCS_ENUM, VMFUNC):
        r = vcpu.get_msrs(MsrBatch([msr]))
        assert r == 0, f"CPUID.VMX=0: wanted KVM_GET_MSRS of 0x{msr:x} to read 0 entries, got {r}"
        vcpu_set_msr_fails(vcpu, msr, 0, "CPUID.VMX=0, write of 0")


# --- vmx_msrs_test.c -------------------------------------------------------------------------------------------------


def vmx_fixed1_msr_test(vcpu: Vcpu, msr: int, mask: int) -> None:
    val = vcpu_get_msr(vcpu, msr)
    for bit in bit_list(mask & val):
        vcpu_set_msr(vcpu, msr, val & ~(1 << bit))
        vcpu_set_msr(vcpu, msr, val)


def vmx_fixed0_msr_test(vcpu: Vcpu, msr: int, mask: int) -> None:
    val = vcpu_get_msr(vcpu, msr)
    for bit in bit_list(~(~mask | val) & U64):
        vcpu_set_msr(vcpu, msr, val | 1 << bit)
        vcpu_set_msr(vcpu, msr, val)


def vmx_fixed0and1_msr_test(vcpu: Vcpu, msr: int) -> None:
    vmx_fixed0_msr_test(vcpu, msr, 0xFFFFFFFF)
    vmx_fixed1_msr_test(vcpu, msr, 0xFFFFFFFF << 32)


def test_vmx_save_restore_msrs() -> None:
    """vmx_save_restore_msrs_test(): VMCS_ENUM takes any value; clearing any one set feature bit of BASIC (49, 54, 55),
    MISC (5, 6-8, 14, 15, 28-30), EPT_VPID_CAP, VMFUNC and the allowed-1 half of the TRUE_* / PROCBASED_CTLS2 controls
    is restorable, and so is setting any clear bit in the must-be-1 (low) half."""
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    vcpu_set_msr(vcpu, VMCS_ENUM, 0)
    vcpu_set_msr(vcpu, VMCS_ENUM, U64)
    vmx_fixed1_msr_test(vcpu, BASIC, 1 << 49 | 1 << 54 | 1 << 55)
    vmx_fixed1_msr_test(vcpu, MISC, 1 << 5 | 0b111 << 6 | 1 << 14 | 1 << 15 | 1 << 28 | 1 << 29 | 1 << 30)
    vmx_fixed0and1_msr_test(vcpu, PROCBASED_CTLS2)
    vmx_fixed1_msr_test(vcpu, EPT_VPID_CAP, U64)
    for msr in (TRUE_PINBASED, TRUE_PROCBASED, TRUE_EXIT, TRUE_ENTRY):
        vmx_fixed0and1_msr_test(vcpu, msr)
    vmx_fixed1_msr_test(vcpu, VMFUNC, U64)


def test_vmx_restore_refuses_supersets() -> None:
    """The other side of vmx_restore_*(): bits KVM does not offer are refused (allowed-1 outside KVM's, a cleared
    must-be-1 bit, a larger EPT/VMFUNC set, a different VMCS revision, BASIC bit 48)."""
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    true_pin = vcpu_get_msr(vcpu, TRUE_PINBASED)
    clear_hi = next(b for b in range(32, 64) if not true_pin >> b & 1)
    vcpu_set_msr_fails(vcpu, TRUE_PINBASED, true_pin | 1 << clear_hi, "allowed-1 bit outside KVM's")
    vcpu_set_msr_fails(vcpu, TRUE_PINBASED, true_pin & ~(1 << 1), "must-be-1 bit 1 cleared")
    vcpu_set_msr_fails(vcpu, VMFUNC, 0b10, "VMFUNC bit KVM does not offer")
    basic = vcpu_get_msr(vcpu, BASIC)
    vcpu_set_msr_fails(vcpu, BASIC, basic ^ 1, "different VMCS revision id")
    vcpu_set_msr_fails(vcpu, BASIC, basic | 1 << 48, "32-bit-physical-address-only bit")
    ept = vcpu_get_msr(vcpu, EPT_VPID_CAP)
    extra = next(b for b in range(64) if not ept >> b & 1)
    vcpu_set_msr_fails(vcpu, EPT_VPID_CAP, ept | 1 << extra, "EPT/VPID bit outside KVM's")


def test_feature_control_accepts_supported_bits_regardless_of_cpuid() -> None:
    """ia32_feature_control_msr_test(): with each gating CPUID feature cleared, host writes of every
    KVM_SUPPORTED_FEATURE_CONTROL bit (with LOCKED) still succeed (is_vmx_feature_control_msr_valid: host-initiated
    writes are checked against the supported mask only)."""
    kvm = open_kvm(SPR)
    vm, vcpu = vm_create_with_one_vcpu(kvm)
    gates = (
        (1 << 1, (1, 0, "ecx", 6)),  # VMX_ENABLED_INSIDE_SMX <- SMX
        (1 << 1, (1, 0, "ecx", 5)),  # VMX_ENABLED_INSIDE_SMX <- VMX
        (1 << 2, (1, 0, "ecx", 5)),  # VMX_ENABLED_OUTSIDE_SMX <- VMX
        (1 << 17, (0x7, 0, "ecx", 30)),  # SGX_LC_ENABLED <- SGX_LC
        (1 << 17, (0x7, 0, "ebx", 2)),  # SGX_LC_ENABLED <- SGX
        (1 << 18, (0x7, 0, "ebx", 2)),  # SGX_ENABLED <- SGX
        (1 << 20, (1, 0, "edx", 7)),  # LMCE_ENABLED <- MCE
    )
    supported = kvm.get_supported_cpuid()
    for msr_bit, (fn, idx, reg, bit) in gates:
        vcpu.set_cpuid(cpuid_edit(supported, fn, idx, reg, bit, False))
        val = vcpu_get_msr(vcpu, FEAT_CTL)
        for v in (val | msr_bit | 1, (val & ~msr_bit) | 1, val | msr_bit | 1, (val & ~msr_bit) | 1, val):
            vcpu_set_msr(vcpu, FEAT_CTL, v)
        vcpu.set_cpuid(supported)
    vm.close()


def test_feature_control_rejects_reserved_bits() -> None:
    """ia32_feature_control_msr_test(): 'Setting reserved bit %d in IA32_FEATURE_CONTROL should fail'."""
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    for bit in bit_list(~FEAT_CTL_SUPPORTED & U64):
        r = _vcpu_set_msr(vcpu, FEAT_CTL, 1 << bit)
        assert r == 0, f"Setting reserved bit {bit} in IA32_FEATURE_CONTROL should fail: wanted 0 written, got {r}"


# --- vmx_pmu_caps_test.c ---------------------------------------------------------------------------------------------


@pytest.fixture
def host_cap() -> int:
    """main(): PMU enabled, PDCM and PMU version > 0 in the supported CPUID; the feature value has full-width
    writes."""
    kvm = open_kvm(SPR)
    supported = kvm.get_supported_cpuid()
    leaf1 = next(e for e in supported if e.function == 1)
    leaf_a = next(e for e in supported if e.function == 0xA)
    assert leaf1.ecx >> 15 & 1, f"wanted PDCM in the supported CPUID.1:ECX, got 0x{leaf1.ecx:08x}"
    assert leaf_a.eax & 0xFF > 0, f"wanted PMU version > 0 in CPUID.0xA:EAX, got 0x{leaf_a.eax:08x}"
    cap = kvm_get_feature_msr(kvm, PERF_CAP)
    assert cap & FULL_WIDTH_WRITE, f"Full-width writes should always be supported: PERF_CAPABILITIES 0x{cap:x}"
    return cap


def test_guest_wrmsr_perf_capabilities_host_side(host_cap: int) -> None:
    """guest_wrmsr_perf_capabilities, after KVM_RUN: the host value reads back; a same-value write succeeds (a real
    write since 6.10, so the PEBS checks pass again); writing 0 or any single-bit flip is refused."""
    vm, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    vcpu_set_msr(vcpu, PERF_CAP, host_cap)
    run_guest_to_hlt(vm, vcpu)

    got = vcpu_get_msr(vcpu, PERF_CAP)
    assert got == host_cap, f"after KVM_RUN: wanted PERF_CAPABILITIES 0x{host_cap:x}, got 0x{got:x}"
    vcpu_set_msr(vcpu, PERF_CAP, host_cap)
    r = _vcpu_set_msr(vcpu, PERF_CAP, 0)
    assert r == 0, f"Post-KVM_RUN write '0' didn't fail: wanted 0 entries written, got {r}"
    for i in range(64):
        r = _vcpu_set_msr(vcpu, PERF_CAP, host_cap ^ 1 << i)
        assert r == 0, f"Post-KVM_RUN write '0x{host_cap ^ 1 << i:x}' didn't fail: wanted 0 entries written, got {r}"
    got = vcpu_get_msr(vcpu, PERF_CAP)
    assert got == host_cap, f"after the refused writes: wanted PERF_CAPABILITIES 0x{host_cap:x}, got 0x{got:x}"


def test_basic_perf_capabilities(host_cap: int) -> None:
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    vcpu_set_msr(vcpu, PERF_CAP, 0)
    vcpu_set_msr(vcpu, PERF_CAP, host_cap)


def test_fungible_perf_capabilities(host_cap: int) -> None:
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    fungible = host_cap & ~IMMUTABLE_CAPS
    assert fungible, f"wanted at least one fungible PERF_CAPABILITIES bit in 0x{host_cap:x}, got none"
    for bit in bit_list(fungible):
        vcpu_set_msr(vcpu, PERF_CAP, 1 << bit)
        vcpu_set_msr(vcpu, PERF_CAP, host_cap & ~(1 << bit))
    vcpu_set_msr(vcpu, PERF_CAP, host_cap)


def test_immutable_perf_capabilities(host_cap: int) -> None:
    _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR))
    reserved = (~host_cap | IMMUTABLE_CAPS) & ~FORMAT_CAPS & U64
    for bit in bit_list(reserved):
        r = _vcpu_set_msr(vcpu, PERF_CAP, host_cap ^ 1 << bit)
        assert r == 0, (f"{'Setting' if not host_cap >> bit & 1 else 'Clearing'} immutable feature 0x{1 << bit:x} "
                        f"(bit {bit}) didn't fail: wanted 0 written, got {r}")
    host_lbr = host_cap & LBR_FMT
    for fmt in range(1, 64):
        if fmt == host_lbr:
            continue
        r = _vcpu_set_msr(vcpu, PERF_CAP, (host_cap & ~LBR_FMT) | fmt)
        assert r == 0, f"Bad LBR FMT = 0x{fmt:x} didn't fail, host = 0x{host_lbr:x}: wanted 0 written, got {r}"
    host_pebs = (host_cap & PEBS_FMT) >> 8
    for fmt in range(1, 16):
        if fmt == host_pebs:
            continue
        r = _vcpu_set_msr(vcpu, PERF_CAP, (host_cap & ~PEBS_FMT) | fmt << 8)
        assert r == 0, f"Bad PEBS FMT = 0x{fmt:x} didn't fail, host = 0x{host_pebs:x}: wanted 0 written, got {r}"


def test_lbr_perf_capabilities_not_applicable_on_spr(host_cap: int) -> None:
    """lbr_perf_capabilities returns early when the host LBR format is 0. On Sapphire Rapids (arch LBR) KVM does not
    pass the LBR format through (vmx_get_perf_capabilities), so the selftest's LBR_TOS part never runs there; the LBR
    format rules are exercised on a non-arch-LBR variant below."""
    assert host_cap & LBR_FMT == 0, f"arch-LBR host: wanted LBR format 0 in 0x{host_cap:x}, got 0x{host_cap & LBR_FMT:x}"


def test_perf_capabilities_unsupported(host_cap: int) -> None:
    """perf_capabilities_unsupported (d75cac366f44, 6.13): without PDCM the host reads 0, may write 0 (advertised
    MSR), and every single bit is refused."""
    kvm = open_kvm(SPR)
    _, vcpu = vm_create_with_one_vcpu(kvm)
    vcpu_set_msr(vcpu, PERF_CAP, host_cap)
    vcpu.set_cpuid(cpuid_edit(kvm.get_supported_cpuid(), 1, 0, "ecx", 15, False))
    got = vcpu_get_msr(vcpu, PERF_CAP)
    assert got == 0, f"PDCM cleared: wanted PERF_CAPABILITIES to read 0, got 0x{got:x}"
    vcpu_set_msr(vcpu, PERF_CAP, 0)
    for i in range(64):
        r = _vcpu_set_msr(vcpu, PERF_CAP, 1 << i)
        assert r == 0, f"Setting PERF_CAPABILITIES bit {i} (= 0x{1 << i:x}) should fail without PDCM: got {r} written"


def test_perf_capabilities_pebs_needs_ds_dtes64_and_consistent_model(host_cap: int) -> None:
    """vmx_set_msr(PERF_CAPABILITIES): a non-zero PEBS format needs guest DS and DTES64 and a guest CPUID model equal
    to the host's (cpuid_model_is_consistent); the same value without PEBS format bits is still accepted."""
    kvm = open_kvm(SPR)
    supported = kvm.get_supported_cpuid()
    for what, cpuid in (
        ("DS cleared", cpuid_edit(supported, 1, 0, "edx", 21, False)),
        ("DTES64 cleared", cpuid_edit(supported, 1, 0, "ecx", 2, False)),
        ("guest model 0xCF (Emerald Rapids signature 0xC06F2) != host 0x8F",
         [dataclasses.replace(e, eax=0x000C06F2) if e.function == 1 else e for e in supported]),
    ):
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(cpuid)
        vcpu_set_msr_fails(vcpu, PERF_CAP, host_cap, f"PEBS format with {what}")
        vcpu_set_msr(vcpu, PERF_CAP, host_cap & ~IMMUTABLE_CAPS)
        vm.close()


def lbr_variant(lbr_fmt: int = 5) -> profiles.Profile:
    """intel-spr as if it were a non-arch-LBR host (Ice Lake-SP style, LBR format 5): supported_perf_cap gains the host
    LBR format (vmx_get_perf_capabilities: !ARCH_LBR && has_callstack && nr). A what-if, not a real host."""
    p = profiles.load(SPR)
    features = dict(p.feature_msrs)
    features[PERF_CAP] |= lbr_fmt
    return dataclasses.replace(p, name="intel-spr+lbr5", feature_msrs=features)


def test_lbr_format_rules_on_non_arch_lbr_variant() -> None:
    """vmx_set_msr(PERF_CAPABILITIES): a non-zero LBR format must equal the host's and needs a consistent guest model;
    format 0 (LBR off) is always allowed."""
    kvm = open_kvm(lbr_variant(5))
    cap = kvm_get_feature_msr(kvm, PERF_CAP)
    assert cap & LBR_FMT == 5, f"variant: wanted LBR format 5 in the feature value, got 0x{cap:x}"
    vm, vcpu = vm_create_with_one_vcpu(kvm)
    vcpu_set_msr(vcpu, PERF_CAP, cap)
    vcpu_set_msr(vcpu, PERF_CAP, cap & ~LBR_FMT)
    for fmt in (1, 4, 6, 0x3F):
        vcpu_set_msr_fails(vcpu, PERF_CAP, (cap & ~LBR_FMT) | fmt, f"LBR format {fmt} on an LBR-format-5 host")
    vm.close()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid([dataclasses.replace(e, eax=0x000606A6) if e.function == 1 else e
                    for e in kvm.get_supported_cpuid()])
    vcpu_set_msr_fails(vcpu, PERF_CAP, 5 | FULL_WIDTH_WRITE, "host LBR format with an inconsistent guest model")
    vcpu_set_msr(vcpu, PERF_CAP, FULL_WIDTH_WRITE)


# --- ARCH_CAPABILITIES and PLATFORM_INFO / UCODE_REV on the VMX profile ---------------------------------------------


@pytest.mark.parametrize("name", [SPR, AMD])
def test_arch_capabilities_needs_cpuid_bit(name: str) -> None:
    """a5d563890b8f (6.13): ARCH_CAPABILITIES needs CPUID.7.0:EDX[29]; without it the host reads 0 and may write only 0.
    With it, any u64 is stored (no bit validation)."""
    kvm = open_kvm(name)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid_edit(kvm.get_supported_cpuid(), 7, 0, "edx", 29, False))
    got = vcpu_get_msr(vcpu, ARCH_CAP)
    assert got == 0, f"{name}, CPUID.7.0:EDX[29]=0: wanted ARCH_CAPABILITIES to read 0, got 0x{got:x}"
    vcpu_set_msr(vcpu, ARCH_CAP, 0)
    vcpu_set_msr_fails(vcpu, ARCH_CAP, 1, "ARCH_CAPABILITIES without its CPUID bit")
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    vcpu_set_msr(vcpu, ARCH_CAP, U64)


@pytest.mark.parametrize("name", [SPR, AMD])
def test_platform_info_frozen_ucode_rev_mutable_after_run(name: str) -> None:
    """bc2ca3680b30 (6.13): PLATFORM_INFO is immutable after KVM_RUN; UCODE_REV never is (userspace emulates patch
    loads)."""
    vm, vcpu = vm_create_with_one_vcpu(open_kvm(name))
    run_guest_to_hlt(vm, vcpu)
    vcpu_set_msr_fails(vcpu, PLATFORM_INFO, 0, "PLATFORM_INFO changed after KVM_RUN")
    vcpu_set_msr(vcpu, PLATFORM_INFO, 0x80000000)
    vcpu_set_msr(vcpu, UCODE_REV, 0x1234_0000_0000)


# --- AMD: DE_CFG and no VMX ------------------------------------------------------------------------------------------


def test_de_cfg_subset_rule() -> None:
    """svm_set_msr(DE_CFG): the value must be a subset of svm_get_feature_msr()'s (LFENCE_SERIALIZE, bit 1, on a host
    with LFENCE_RDTSC), else 1; the stored value reads back; it starts at 0 (not quirked)."""
    kvm = open_kvm(AMD)
    supported = kvm_get_feature_msr(kvm, DE_CFG)
    assert supported == 0x2, f"wanted DE_CFG feature value 0x2 (LFENCE_SERIALIZE), got 0x{supported:x}"
    _, vcpu = vm_create_with_one_vcpu(kvm)
    got = vcpu_get_msr(vcpu, DE_CFG)
    assert got == 0, f"wanted DE_CFG 0 at vCPU creation (not quirk-stuffed), got 0x{got:x}"
    vcpu_set_msr(vcpu, DE_CFG, 0x2)
    vcpu_set_msr(vcpu, DE_CFG, 0)
    for value in (0x1, 0x3, 1 << 9, 1 << 63):
        vcpu_set_msr_fails(vcpu, DE_CFG, value, "DE_CFG bit outside the supported mask")
    got = vcpu_get_msr(vcpu, DE_CFG)
    assert got == 0, f"after refused writes: wanted DE_CFG 0, got 0x{got:x}"


def test_de_cfg_frozen_after_run() -> None:
    """kvm_is_immutable_feature_msr(DE_CFG): after KVM_RUN a different value is refused, the same value accepted."""
    vm, vcpu = vm_create_with_one_vcpu(open_kvm(AMD))
    vcpu_set_msr(vcpu, DE_CFG, 0x2)
    run_guest_to_hlt(vm, vcpu)
    vcpu_set_msr_fails(vcpu, DE_CFG, 0, "DE_CFG changed after KVM_RUN")
    vcpu_set_msr(vcpu, DE_CFG, 0x2)
    got = vcpu_get_msr(vcpu, DE_CFG)
    assert got == 0x2, f"after KVM_RUN: wanted DE_CFG 0x2 kept, got 0x{got:x}"


def test_de_cfg_unsupported_on_intel() -> None:
    """vmx_get_feature_msr/kvm_*_msr_common: DE_CFG is KVM_MSR_RET_UNSUPPORTED on VMX and not advertised, so the system
    read, the vCPU read and even a write of 0 fail."""
    kvm = open_kvm(SPR)
    r = kvm.get_feature_msrs(MsrBatch([DE_CFG]))
    assert r == 0, f"VMX host: wanted system KVM_GET_MSRS of DE_CFG to read 0 entries, got {r}"
    _, vcpu = vm_create_with_one_vcpu(kvm)
    r = vcpu.get_msrs(MsrBatch([DE_CFG]))
    assert r == 0, f"VMX host: wanted vCPU KVM_GET_MSRS of DE_CFG to read 0 entries, got {r}"
    vcpu_set_msr_fails(vcpu, DE_CFG, 0, "DE_CFG on a VMX host")


def test_no_vmx_msrs_on_svm() -> None:
    """svm_get_feature_msr and svm_has_emulated_msr drop 0x480..0x491: no system value, no vCPU access."""
    kvm = open_kvm(AMD)
    for msr in (BASIC, TRUE_PINBASED, VMFUNC):
        r = kvm.get_feature_msrs(MsrBatch([msr]))
        assert r == 0, f"SVM host: wanted system read of 0x{msr:x} to fail, got {r} entries read"
    _, vcpu = vm_create_with_one_vcpu(kvm)
    for msr in (BASIC, TRUE_PINBASED, VMFUNC):
        r = vcpu.get_msrs(MsrBatch([msr]))
        assert r == 0, f"SVM host: wanted vCPU read of 0x{msr:x} to fail, got {r} entries read"
        vcpu_set_msr_fails(vcpu, msr, 0, "VMX MSR on an SVM host")


def test_perf_capabilities_on_amd() -> None:
    """SVM never sets kvm_caps.supported_perf_cap and the CPUID has no PDCM: reads give 0, only 0 may be written."""
    kvm = open_kvm(AMD)
    assert kvm_get_feature_msr(kvm, PERF_CAP) == 0, "wanted PERF_CAPABILITIES feature value 0 on SVM"
    _, vcpu = vm_create_with_one_vcpu(kvm)
    got = vcpu_get_msr(vcpu, PERF_CAP)
    assert got == 0, f"SVM: wanted PERF_CAPABILITIES to read 0, got 0x{got:x}"
    vcpu_set_msr(vcpu, PERF_CAP, 0)
    vcpu_set_msr_fails(vcpu, PERF_CAP, FULL_WIDTH_WRITE, "PERF_CAPABILITIES bit on SVM (no PDCM)")


# --- the VMX MSRs after KVM_RUN, across kernel versions ------------------------------------------------------------


KERNELS = ["6.4", "6.9", "6.10", "6.13", "6.18"]


def _ge(kernel: str, version: str) -> bool:
    return tuple(int(x) for x in kernel.split(".")) >= tuple(int(x) for x in version.split("."))


@pytest.mark.parametrize("kernel", KERNELS)
def test_vmx_changed_value_refused_after_run(kernel: str) -> None:
    """0094f62c7eaa (6.4): once the vCPU has run, a different value for a VMX MSR is -EINVAL, even one the restore
    rules would accept before the run (a cleared allowed-1 bit, any VMCS_ENUM)."""
    vm, vcpu = vm_create_with_one_vcpu(open_kvm(SPR, kernel))
    true_pin = vcpu_get_msr(vcpu, TRUE_PINBASED)
    vmcs_enum = vcpu_get_msr(vcpu, VMCS_ENUM)
    run_guest_to_hlt(vm, vcpu)
    vcpu_set_msr_fails(vcpu, TRUE_PINBASED, true_pin & ~(1 << 38), f"{kernel}: TRUE_PINBASED changed after KVM_RUN")
    vcpu_set_msr_fails(vcpu, VMCS_ENUM, vmcs_enum + 2, f"{kernel}: VMCS_ENUM changed after KVM_RUN")
    got = vcpu_get_msr(vcpu, TRUE_PINBASED)
    assert got == true_pin, f"{kernel}: wanted TRUE_PINBASED 0x{true_pin:x} kept after the refusal, got 0x{got:x}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_vmx_same_value_after_run(kernel: str) -> None:
    """Same-value writes after KVM_RUN: 6.4-6.9 return 0 without calling the setter (0094f62c7eaa), so even the
    never-writable 0x481 and 0x487 are "accepted"; 6.10+ go through vmx_set_vmx_msr() (1d294dfaba8c), which refuses
    them. Restorable MSRs (BASIC, TRUE_PINBASED, VMCS_ENUM) are accepted on every version."""
    vm, vcpu = vm_create_with_one_vcpu(open_kvm(SPR, kernel))
    values = {msr: vcpu_get_msr(vcpu, msr) for msr in (BASIC, TRUE_PINBASED, VMCS_ENUM, PINBASED, CR0_FIXED1)}
    for msr in (PINBASED, CR0_FIXED1):
        vcpu_set_msr_fails(vcpu, msr, values[msr], f"{kernel}: 0x{msr:x} same value before KVM_RUN (the setter)")
    run_guest_to_hlt(vm, vcpu)
    for msr in (BASIC, TRUE_PINBASED, VMCS_ENUM):
        vcpu_set_msr(vcpu, msr, values[msr])
    for msr in (PINBASED, CR0_FIXED1):
        r = _vcpu_set_msr(vcpu, msr, values[msr])
        if _ge(kernel, "6.10"):
            assert r == 0, f"{kernel}: same-value write of 0x{msr:x} after KVM_RUN is a real write since " \
                           f"1d294dfaba8c and must be refused; wanted 0 written, got {r}"
        else:
            assert r == 1, f"{kernel}: same-value write of 0x{msr:x} after KVM_RUN is ignored (returns 0) before " \
                           f"1d294dfaba8c; wanted 1 written, got {r}"
        got = vcpu_get_msr(vcpu, msr)
        assert got == values[msr], f"{kernel}: wanted 0x{msr:x} unchanged 0x{values[msr]:x}, got 0x{got:x}"


def test_vmx_msrs_writable_before_run_on_every_version() -> None:
    """Before the first KVM_RUN nothing is frozen: a restorable change goes through on every ruleset."""
    for kernel in KERNELS:
        _, vcpu = vm_create_with_one_vcpu(open_kvm(SPR, kernel))
        true_pin = vcpu_get_msr(vcpu, TRUE_PINBASED)
        vcpu_set_msr(vcpu, TRUE_PINBASED, true_pin & ~(1 << 38))
        vcpu_set_msr(vcpu, VMCS_ENUM, 0)


# --- KVM_SET_CPUID2 side effects on the VMX MSRs (vmx_vcpu_after_set_cpuid) -----------------------------------------


def test_secondary_controls_follow_guest_cpuid() -> None:
    """vmx_adjust_secondary_exec_control(): with the STUFF_FEATURE_MSRS quirk on, PROCBASED_CTLS2's allowed-1 bits for
    INVPCID (44) and RDRAND exiting (43) follow guest CPUID on every KVM_SET_CPUID2; with the quirk off nothing is
    adjusted (the MSR stays 0 until userspace writes it)."""
    kvm = open_kvm(SPR)
    supported = kvm.get_supported_cpuid()
    kvm_value = kvm_get_feature_msr(kvm, PROCBASED_CTLS2)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    cpuid = cpuid_edit(cpuid_edit(supported, 7, 0, "ebx", 10, False), 1, 0, "ecx", 30, False)
    vcpu.set_cpuid(cpuid)
    got = vcpu_get_msr(vcpu, PROCBASED_CTLS2)
    want = kvm_value & ~(1 << 44 | 1 << 43)
    assert got == want, f"guest without INVPCID/RDRAND: wanted PROCBASED_CTLS2 0x{want:x}, got 0x{got:x}"
    vcpu.set_cpuid(supported)
    got = vcpu_get_msr(vcpu, PROCBASED_CTLS2)
    assert got == kvm_value, f"full CPUID again: wanted PROCBASED_CTLS2 0x{kvm_value:x}, got 0x{got:x}"
    _, vcpu = vm_create_with_one_vcpu(kvm, quirk_disabled=True)
    got = vcpu_get_msr(vcpu, PROCBASED_CTLS2)
    assert got == 0, f"quirk disabled: wanted PROCBASED_CTLS2 0 (no adjustment), got 0x{got:x}"


def test_xsaves_control_needs_guest_xsave() -> None:
    kvm = open_kvm(SPR)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid_edit(kvm.get_supported_cpuid(), 1, 0, "ecx", 26, False))
    got = vcpu_get_msr(vcpu, PROCBASED_CTLS2)
    assert not got >> 52 & 1, f"guest XSAVES without XSAVE: wanted ENABLE_XSAVES (bit 52) clear, got 0x{got:x}"


def test_cr_fixed1_rebuilt_from_guest_cpuid() -> None:
    """nested_vmx_cr_fixed1_bits_update() (not quirk-gated): CR0_FIXED1 becomes 0xffffffff and CR4_FIXED1 is rebuilt
    from guest CPUID, starting from PCE; clearing LA57 and UMIP drops CR4 bits 12 and 11."""
    kvm = open_kvm(SPR)
    supported = kvm.get_supported_cpuid()
    _, full = vm_create_with_one_vcpu(kvm)
    cr4_full = vcpu_get_msr(full, CR4_FIXED1)
    assert cr4_full & 1 << 8, f"wanted CR4_FIXED1 to allow PCE (bit 8), got 0x{cr4_full:x}"
    assert vcpu_get_msr(full, CR0_FIXED1) == 0xFFFFFFFF, "wanted CR0_FIXED1 0xffffffff after KVM_SET_CPUID2 with VMX"
    for quirk_disabled in (False, True):
        vm = kvm.create_vm()
        if quirk_disabled:
            vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(cpuid_edit(cpuid_edit(supported, 7, 0, "ecx", 16, False), 7, 0, "ecx", 2, False))
        got = vcpu_get_msr(vcpu, CR4_FIXED1)
        want = cr4_full & ~(1 << 12 | 1 << 11)
        assert got == want, f"quirk {'off' if quirk_disabled else 'on'}, no LA57/UMIP: wanted CR4_FIXED1 0x{want:x}, " \
                            f"got 0x{got:x}"


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
def test_compacted_xsave_size_follows_xss(profile: str) -> None:
    # Every XSS write updates the runtime CPUID (6.12.118 x86.c:3539-3540): 0xD.1 EBX is the compacted size of
    # XCR0 | XSS. This host offers no XSAVES, so only these profiles show it.
    from kvmscope.api import find_cpuid

    with kvmscope.open("model", profile=profile) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.get_supported_cpuid()
        vcpu.set_cpuid(supported)
        before = find_cpuid(vcpu.get_cpuid(), 0xD, 1)
        xss = next(e.ecx for e in supported if e.function == 0xD and e.index == 1)  # the XSS bits KVM supports
        assert xss and vcpu.set_msrs(MsrBatch([(0xDA0, xss)])) == 1, f"{profile}: XSS {xss:#x} should be taken"
        after = find_cpuid(vcpu.get_cpuid(), 0xD, 1)
        sizes = [e.eax for e in supported if e.function == 0xD and e.index >= 2 and xss >> e.index & 1]
        assert before and after and after.ebx == before.ebx + sum(sizes), (
            f"{profile}: XSS {xss:#x} adds components of {sizes} bytes to 0xD.1 EBX {before}: saw {after}")
