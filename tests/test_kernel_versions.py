"""The model across kernel versions the live kernel here cannot show: LTS (5.10, 5.15, 6.1, 6.6), stable backports
(5.10.137, 5.16.3, 6.12.7, 6.12.78) and mainline boundaries, one case on each side of each boundary.

Sources are cited per test: Debian's linux-source 5.10.262, 6.1.192 and 6.12.118 trees (arch/x86/kvm/...), mainline
commits, and the upstream selftests (tools/testing/selftests/kvm/x86/).
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import replace

import pytest

import kvmscope
import kvmscope.guest
import kvmscope.model.cpuid
from kvmscope import uapi
from kvmscope.errors import KvmError
from kvmscope.kernel import rulesets as R
from kvmscope.kernel.profile import Profile, shipped
from kvmscope.kernel.profile import load as load_profile
from kvmscope.probe import FROZEN, WRITABLE, probe
from kvmscope.program import GuestException, Halted, Program, Rdmsr, Wrmsr, run_program

PLATFORM_INFO, UCODE_REV, ARCH_CAP, PERF_CAP, DE_CFG, MISC_FEATURES = 0xCE, 0x8B, 0x10A, 0x345, 0xC0011029, 0x140
MISC_ENABLE = 0x1A0
TRUE_PINBASED = 0x48D
STUFF = uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS
GP = GuestException(13, 0)


def model(profile: str, kernel: str) -> kvmscope.System:
    return kvmscope.open("model", profile=profile, kernel=kernel)


# --- probe: the verdict follows the rules on every ruleset and shipped profile ---------------------------------------
@pytest.mark.parametrize("profile", shipped())
@pytest.mark.parametrize("kernel", R.KNOWN)
def test_probe_verdict_follows_the_rules(profile: str, kernel: str) -> None:
    rules = R.resolve(kernel)
    immutable = frozenset(range(0x480, 0x492)) | rules.immutable_generic
    with model(profile, kernel) as kvm:
        report = probe(kvm)
    for m in report.msrs:
        if not m.before_run_changed_ok:
            continue
        expect = FROZEN if rules.freeze and m.index in immutable else WRITABLE
        assert m.verdict == expect, f"{profile} on {kernel}: {m.name} expected {expect!r}, probe saw {m.verdict!r}"
    changeable = [m for m in report.msrs if m.before_run_changed_ok and m.index != UCODE_REV]
    if changeable:
        assert report.freeze_enforced is rules.freeze, (
            f"{profile} on {kernel}: the freeze is {'' if rules.freeze else 'not '}in force, probe concluded "
            f"{report.conclusion!r}")
    if rules.freeze and changeable:
        assert f"since {R.FREEZE.since}, {R.FREEZE.commit}" in report.conclusion or (
            f"since {R.PLATFORM_INFO_IMMUTABLE.since}" in report.conclusion), report.conclusion


# --- feature-MSR list: PLATFORM_INFO from 6.13 only (bc2ca3680b30, not in 6.12.118 x86.c:439-444) --------------------
def test_platform_info_is_a_feature_msr_from_6_13() -> None:
    for kernel, listed, system_read in (("6.1", False, 0), ("6.12.118", False, 1), ("6.13", True, 1)):
        with model("intel-spr", kernel) as kvm:
            assert (PLATFORM_INFO in kvm.get_msr_feature_index_list()) is listed, (
                f"{kernel}: PLATFORM_INFO {'should' if listed else 'should not'} be a feature MSR")
            batch = kvmscope.MsrBatch([PLATFORM_INFO])
            done = kvm.get_feature_msrs(batch)
            # 6.12: not a feature MSR, but advertised: the zero rule (64a5d7a1091f) gives 0; 6.1 fails the entry.
            assert done == system_read, f"{kernel}: system KVM_GET_MSRS of PLATFORM_INFO gave {done} entries"
            if done:
                assert batch[0][1] == (0x80000000 if listed else 0), f"{kernel}: value {batch[0][1]:#x}"


# --- KVM_CAP_DISABLE_QUIRKS2 by version --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "reported"), [("5.15", 0), ("5.17", 0), ("5.18", 0x7F), ("6.1", 0x7F),
                                                  ("6.6", 0x7F), ("6.11", 0x7F), ("6.12", 0xFF), ("6.12.77", 0xFF),
                                                  ("6.12.78", 0x3FF), ("6.18", 0x3FF)])
def test_disable_quirks2_reports_the_quirks_of_the_version(kernel: str, reported: int) -> None:
    # 5.10/5.15: no such capability; 6.1.192 kvm_host.h:2134-2141 (0x7F); 6.12.0 adds SLOT_ZAP_ALL; 6.12.78
    # (6.12.118 kvm_host.h:2397-2408) the quirk series. intel-spr's own kernel reports 0x3FF.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        got = kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
        assert got == reported, f"{kernel}: DISABLE_QUIRKS2 expected {reported:#x}, saw {got:#x}"
        assert vm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2) == reported
        if not reported & STUFF:
            with pytest.raises(KvmError) as info:
                vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, STUFF)
            assert info.value.errno == errno.EINVAL, f"{kernel}: disabling an unknown quirk must be EINVAL"
        else:
            vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, STUFF)
            vcpu = vm.create_vcpu(0)
            assert vcpu.try_read_msr(ARCH_CAP) == 0, f"{kernel}: quirk off, ARCH_CAP starts at 0"


def test_stuff_feature_msrs_reached_6_12_78() -> None:
    # dcb988cdac85 in 6.12.78 (Stable-dep-of e2ffe85b6d2b); before it the quirk does not exist, KVM always stuffs.
    for kernel, stuffs_when_disabled in (("6.12.77", True), ("6.12.78", False)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            with contextlib.suppress(KvmError):
                vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, STUFF)
            vcpu = vm.create_vcpu(0)
            ucode = vcpu.try_read_msr(UCODE_REV)
            assert (ucode == 0x100000000) is stuffs_when_disabled, f"{kernel}: UCODE_REV reset {ucode:#x}"


# --- KVM_SET_CPUID2 after KVM_RUN: free, forbidden (5.16.0-5.16.2), identical only (5.16.3, 5.17) -------------------
@pytest.mark.parametrize(("kernel", "same_ok", "changed_ok"), [("5.10", True, True), ("5.15", True, True),
                                                               ("5.16", False, False), ("5.16.2", False, False),
                                                               ("5.16.3", True, False), ("5.17", True, False),
                                                               ("6.18", True, False)])
def test_set_cpuid_after_run_by_version(kernel: str, same_ok: bool, changed_ok: bool) -> None:
    # 5.10.262 cpuid.c:281-311 (no has-run check); feb627e8d6f6 (5.16); c6617c61e8fe (5.17, 5.16.3);
    # selftest cpuid_test.c test_cpuid_set_after_run (6.1.192 tools/testing/selftests/kvm/x86_64/cpuid_test.c).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        kvmscope.guest.run_to_hlt(vm, vcpu)
        current = vcpu.get_cpuid()
        changed = [replace(e, ebx=e.ebx ^ 1) if e.function == 0x80000001 else e for e in current]
        for entries, ok, what in ((current, same_ok, "the same CPUID"), (changed, changed_ok, "a changed CPUID")):
            try:
                vcpu.set_cpuid(entries)
                took = True
            except KvmError as e:
                assert e.errno == errno.EINVAL
                took = False
            assert took is ok, f"{kernel}: KVM_SET_CPUID2 of {what} after KVM_RUN expected {ok}, saw {took}"


# --- the freeze and its same-value write ------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "frozen"), [("5.10", False), ("6.1", False), ("6.3", False), ("6.4", True),
                                                ("6.6", True)])
def test_freeze_starts_in_6_4(kernel: str, frozen: bool) -> None:
    # 0094f62c7eaa (6.4); 6.1.192 x86.c:2225-2228 has no check; feature_msrs_test.c (6.12.118 selftests).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        kvmscope.guest.run_to_hlt(vm, vcpu)
        assert (vcpu.set_msrs({ARCH_CAP: 0}) == 0) is frozen, f"{kernel}: ARCH_CAP change after the run"


# --- MISC_FEATURES_ENABLES: kvm_set_msr_common on every version (5.10.262 x86.c:3418, 6.12.118 x86.c:3695) ----------
@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.12", "6.18"])
def test_misc_features_enables_is_validated(profile: str, kernel: str) -> None:
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({MISC_FEATURES: 2}) == 0, "a reserved bit is refused"
        assert vcpu.set_msrs({PLATFORM_INFO: 0}) == 1
        assert vcpu.set_msrs({MISC_FEATURES: 1}) == 0, "CPUID_FAULT needs PLATFORM_INFO.CPUID_FAULT"
        assert vcpu.set_msrs({PLATFORM_INFO: 0x80000000, MISC_FEATURES: 1}) == 2, "with it, CPUID faulting is on"
        assert vcpu.try_read_msr(MISC_FEATURES) == 1
        events = run_program(vm, vcpu, Program().wrmsr(MISC_FEATURES, 4).rdmsr(MISC_FEATURES).hlt())
        assert events == [GP, Rdmsr(MISC_FEATURES, 1), Halted()], f"the guest gets the same rule: {events}"


# --- DE_CFG from the guest: exact value (<6.12), current value (6.12.0-6.12.6), any subset (6.12.7, 6.13) ----------
@pytest.mark.parametrize(("kernel", "expected"), [
    ("6.1", [Wrmsr(DE_CFG), GP]),  # 6.1.192 svm.c:3095-3111: data ^ supported
    ("6.11", [Wrmsr(DE_CFG), GP]),
    ("6.12", [GP, Wrmsr(DE_CFG)]),  # 74a0e79df68a: only the current value (0)
    ("6.12.6", [GP, Wrmsr(DE_CFG)]),
    ("6.12.7", [Wrmsr(DE_CFG), Wrmsr(DE_CFG)]),  # 4d5163cba43f (6.12.118 svm.c:3307-3318)
    ("6.13", [Wrmsr(DE_CFG), Wrmsr(DE_CFG)]),
])
def test_guest_de_cfg_by_version(kernel: str, expected: list[object]) -> None:
    with model("amd-epyc", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        events = run_program(vm, vcpu, Program().wrmsr(DE_CFG, 2).wrmsr(DE_CFG, 0).hlt())
        assert events == [*expected, Halted()], f"{kernel}: guest DE_CFG writes of 2 then 0 gave {events}"


# --- VMX MSR restore: against current values before 5.10.137 ----------------------------------------------------------
@pytest.mark.parametrize(("kernel", "widen_ok"), [("5.10", False), ("5.10.136", False), ("5.10.137", True),
                                                  ("5.15.60", False), ("5.15.61", True), ("6.1", True)])
def test_vmx_restore_reference_by_version(kernel: str, widen_ok: bool) -> None:
    # "KVM: nVMX: Let userspace set nVMX MSR to any _host_ supported value" (5.10.137; 5.10.262 nested.c:1248).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        full = vcpu.read_msr(TRUE_PINBASED)
        allowed = full >> 32 & ~full & 0xFFFFFFFF
        bit = 1 << (allowed.bit_length() - 1)
        assert vcpu.set_msrs({TRUE_PINBASED: full & ~(bit << 32)}) == 1, "restricting is always allowed"
        assert (vcpu.set_msrs({TRUE_PINBASED: full}) == 1) is widen_ok, f"{kernel}: widening back"


# --- PERF_CAPABILITIES needs a PMU (vmx_set_msr, c646236344e9; absent in 5.10.262) --------------------------------
@pytest.mark.parametrize(("kernel", "ok"), [("5.10", True), ("5.11", True), ("5.12", False), ("6.12", False),
                                            ("6.13", True)])
def test_perf_cap_needs_a_pmu_by_version(kernel: str, ok: bool) -> None:
    # vmx_pmu_caps_test.c: a non-zero PERF_CAPABILITIES with no vPMU; a1039111192b removed the check in 6.13.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        cpuid = [replace(e, eax=0) if e.function == 0xA else e for e in kvm.get_supported_cpuid()]
        vcpu.set_cpuid(cpuid)
        assert (vcpu.set_msrs({PERF_CAP: 0x2000}) == 1) is ok, f"{kernel}: PERF_CAP FW_WRITES without a PMU"


# --- the MSRs KVM sends to the MTRR code: 0x200-0x2FF before 6.5, less the MCi_CTL2 banks from 6.0 -----------------
# 5.10.13 x86.c `case 0x200 ... 0x2ff` (set and get); 281b52780b57 (6.0) carves out MSR_IA32_MC0_CTL2 ...
# MSR_IA32_MCx_CTL2(KVM_MAX_MCE_BANKS) - 1 (6.1.192 x86.c:3649-3651, 4058-4060); 34a83deac31c (6.5) sends only
# MTRRphysBase_MSR(0) ... MSR_MTRRfix4K_F8000 and MSR_MTRRdefType (6.12.118 x86.c:3464-3466). mtrr.c fails an index it
# does not know with 1 (6.1.192 mtrr.c:376-377, 409-410), which ignore_msrs does not forgive: kvm_msr_ignored_check
# runs for KVM_MSR_RET_INVALID alone (6.1.192 x86.c:318-333).
EDGES = (0x270, 0x27F, 0x280, 0x29F, 0x2A0, 0x2FE)  # the gap after the MTRRs, the MCi_CTL2 banks, the rest to 0x2FE
_OLD, _SPLIT, _NEW = ("mtrr",) * 6, ("mtrr", "mtrr", "mce", "mce", "mtrr", "mtrr"), ("unknown", "unknown", "mce", "mce",
                                                                                    "unknown", "unknown")
ROUTING = {"5.10": _OLD, "5.15": _OLD, "6.0": _SPLIT, "6.1": _SPLIT, "6.4": _SPLIT, "6.5": _NEW, "6.18": _NEW}


@pytest.mark.parametrize("ignore_msrs", [False, True])
@pytest.mark.parametrize("kernel", list(ROUTING))
def test_mtrr_range_routing_by_version(kernel: str, ignore_msrs: bool) -> None:
    from kvmscope.api import MsrBatch
    from kvmscope.kernel import emulated as E
    from kvmscope.kernel.profile import load
    from kvmscope.model import open_model

    with open_model(kernel, replace(load("intel-spr"), ignore_msrs=ignore_msrs)) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for index, where in zip(EDGES, ROUTING[kernel], strict=True):
            # host write of 0 and read: the MCE code takes both (no CMCI_P needed for a host 0); the MTRR code fails
            # both; an unknown MSR is taken with ignore_msrs (the read gives 0)
            ok = where == "mce" or (where == "unknown" and ignore_msrs)
            wrote, read = vcpu.set_msrs(MsrBatch([(index, 0)])), vcpu.get_msrs(batch := MsrBatch([index]))
            assert (wrote, read) == (int(ok), int(ok)), (
                f"{kernel} ignore_msrs={ignore_msrs}: {index:#x} goes to the {where} code; expected the write and "
                f"the read {'taken' if ok else 'refused'}, saw {wrote} written and {read} read")
            # the rule is on record for an ignored access too (what kvmscope check reports as ignored)
            expected_rule = {"mtrr": E.MTRR_UNKNOWN, "unknown": R.UNKNOWN_MSR}.get(where)
            assert vcpu.refusal_rule(index) is expected_rule, (
                f"{kernel}: {index:#x} refused by {vcpu.refusal_rule(index)}, expected {expected_rule}")
            assert not ok or batch[0] == (index, 0), f"{kernel}: {index:#x} read back {batch[0]}"
            # the guest alike: #GP from the MTRR code, ignored with ignore_msrs when unknown
            events = run_program(vm, vcpu, Program().wrmsr(index, 0).rdmsr(index).hlt())
            # (the MCE code without CMCI_P in MCG_CAP: get_msr_mce/set_msr_mce fail a guest access)
            guest = [Wrmsr(index), Rdmsr(index, 0)] if ok and where != "mce" else [GP, GP]
            assert events == [*guest, Halted()], f"{kernel} ignore_msrs={ignore_msrs}: guest {index:#x}: {events}"


def test_cmci_needs_6_0() -> None:
    # KVM_X86_SETUP_MCE takes CMCI_P on VMX from 6.0 (6.1.192 vmx.c:8531-8532), with the MCi_CTL2 MSRs it enables.
    for kernel, ok in (("5.15", False), ("6.0", True)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            try:
                vcpu.setup_mce(1 << 10 | 4)
                took = True
            except KvmError as e:
                assert e.errno == errno.EINVAL, e
                took = False
            assert took is ok, f"{kernel}: KVM_X86_SETUP_MCE with CMCI_P expected {ok}, saw {took}"
            if ok:
                assert vcpu.set_msrs({0x280: 1 << 30 | 5}) == 1, f"{kernel}: MC0_CTL2 with CMCI_P"


# --- variable MTRRs across a MAXPHYADDR change: read through it before 6.11 (0a7b73559b39) ---------------------------
def _maxphyaddr(cpuid: list[kvmscope.CpuidEntry], bits: int) -> list[kvmscope.CpuidEntry]:
    return [replace(e, eax=e.eax & ~0xFF | bits) if e.function == 0x80000008 else e for e in cpuid]


@pytest.mark.parametrize(("kernel", "as_written"), [("5.10", False), ("6.1", False), ("6.6", False), ("6.10", False),
                                                    ("6.11", True), ("6.18", True)])
def test_variable_mtrr_read_back_by_version(kernel: str, as_written: bool) -> None:
    # 6.1.192 mtrr.c:357-361: a PHYSMASK is stored with the reserved GPA bits (above MAXPHYADDR) set; mtrr.c:429: a
    # PHYSBASE or PHYSMASK reads with those of the MAXPHYADDR now cleared. 6.12.118 mtrr.c:92-133: stored as written.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        cpuid = kvm.get_supported_cpuid()
        vcpu.set_cpuid(_maxphyaddr(cpuid, 36))
        assert vcpu.set_msrs({0x201: 0x800}) == 1, f"{kernel}: PHYSMASK0 0x800 under MAXPHYADDR 36"
        vcpu.set_cpuid(_maxphyaddr(cpuid, 46))
        assert vcpu.set_msrs({0x202: 1 << 45 | 6}) == 1, f"{kernel}: PHYSBASE1 with bit 45 under MAXPHYADDR 46"
        mask = vcpu.read_msr(0x201)
        expected = 0x800 if as_written else 0x3FF000000800  # bits 36-45 come back set
        assert mask == expected, f"{kernel}: PHYSMASK0 after MAXPHYADDR 36 -> 46: {mask:#x}, expected {expected:#x}"
        vcpu.set_cpuid(_maxphyaddr(cpuid, 36))
        base = vcpu.read_msr(0x202)
        expected = 1 << 45 | 6 if as_written else 6
        assert base == expected, f"{kernel}: PHYSBASE1 after MAXPHYADDR 46 -> 36: {base:#x}, expected {expected:#x}"
        # a batch reads the same (and a batch write stores the same) as one MSR at a time
        batch = kvmscope.MsrBatch([0x200, 0x201, 0x202, 0x203, 0x2FF])
        assert vcpu.get_msrs(batch) == 5 and batch[1][1] == 0x800 and batch[2][1] == base, f"{kernel}: {list(batch)}"
        assert vcpu.set_msrs(kvmscope.MsrBatch([(0x201, 0x800), (0x2FF, 0x6)])) == 2
        vcpu.set_cpuid(_maxphyaddr(cpuid, 40))
        mask = vcpu.read_msr(0x201)
        expected = 0x800 if as_written else 0xF000000800
        assert mask == expected, f"{kernel}: PHYSMASK0 after a batch write, MAXPHYADDR 36 -> 40: {mask:#x}"
        # the guest reads through the same code (kvm_mtrr_get_msr)
        events = run_program(vm, vcpu, Program().rdmsr(0x201).hlt())
        assert events == [Rdmsr(0x201, expected), Halted()], f"{kernel}: guest RDMSR of PHYSMASK0: {events}"


# --- canonical MSR addresses: the host's width from 6.13 and 6.12.41, the guest's CR4.LA57 before --------------------
@pytest.mark.parametrize(("kernel", "host_width"), [("6.1", False), ("6.12", False), ("6.12.40", False),
                                                    ("6.12.41", True), ("6.13", True), ("6.18", True)])
def test_canonical_width_by_version(kernel: str, host_width: bool) -> None:
    # 6.1.192 x86.c:1872 (SYSENTER made canonical with vcpu_virt_addr_bits: CR4.LA57) and is_noncanonical_address;
    # 6.12.118 x86.c:1439, 1456 (max_host_virt_addr_bits), in 6.12.y from 6.12.41 (Debian changelog). intel-spr's host
    # has LA57; the vCPU's CR4.LA57 is 0, so 1 << 55 is canonical only with the host's 57 bits.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        lstar = vcpu.set_msrs({0xC0000082: 1 << 55})
        assert lstar == int(host_width), f"{kernel}: LSTAR 1 << 55 with CR4.LA57 0: {lstar} written"
        assert vcpu.set_msrs({0x175: 1 << 55, 0x176: 1 << 55 | 0x1000}) == 2
        esp, eip = vcpu.read_msr(0x175), vcpu.read_msr(0x176)
        expected = (1 << 55, 1 << 55 | 0x1000) if host_width else (0, 0x1000)
        assert (esp, eip) == expected, f"{kernel}: SYSENTER_ESP/EIP made canonical: {esp:#x} {eip:#x}, expected " \
            f"{expected[0]:#x} {expected[1]:#x}"


# --- the MSRs KVM knows: XFD from 5.17 (820a6ee944e7), the CET MSRs from 6.18 ------------------------------------------
XFD_MSRS, CET_MSRS = (0x1C4, 0x1C5), (0x6A0, 0x6A2, 0x6A4, 0x6A5, 0x6A6, 0x6A7, 0x6A8)


@pytest.mark.parametrize("ignore_msrs", [False, True])
@pytest.mark.parametrize(("kernel", "xfd", "cet"), [("5.10", False, False), ("5.15", False, False),
                                                    ("5.17", True, False), ("6.12", True, False),
                                                    ("6.18", True, True)])
def test_msr_inventory_by_version(kernel: str, xfd: bool, cet: bool, ignore_msrs: bool) -> None:
    # 5.10.262 x86.c has no MSR_IA32_XFD; 6.12.118 arch/x86/kvm has no MSR_IA32_U_CET; CachyOS x86.c (6.18+) emulates
    # both. intel-spr's inventory was taken on 6.18: on an older kernel those MSRs are unknown (not listed; a host access
    # fails, unless ignore_msrs takes it).
    from kvmscope.api import MsrBatch
    from kvmscope.kernel.profile import load
    from kvmscope.model import open_model

    with open_model(kernel, replace(load("intel-spr"), ignore_msrs=ignore_msrs)) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        listed = set(kvm.get_msr_index_list())
        for indices, known in ((XFD_MSRS, xfd), (CET_MSRS, cet)):
            for index in indices:
                assert (index in listed) is known, f"{kernel}: {index:#x} in KVM_GET_MSR_INDEX_LIST: expected {known}"
                took = vcpu.set_msrs(MsrBatch([(index, 0)])), vcpu.get_msrs(MsrBatch([index]))
                expected = (1, 1) if known or ignore_msrs else (0, 0)
                assert took == expected, f"{kernel} ignore_msrs={ignore_msrs}: {index:#x} write/read of 0 took {took}"
                rule = vcpu.refusal_rule(index)
                assert (rule is R.UNKNOWN_MSR) is (not known), f"{kernel}: {index:#x} refused by {rule}"


@pytest.mark.parametrize(("profile", "bit", "since"), [
    ("intel-spr", (0xD, 1, "eax", 4), "5.17"),  # XFD (6.1.192 cpuid.c:585; none in 5.10.262)
    ("intel-spr", (7, 0, "edx", 24), "5.17"),  # AMX_TILE (6.1.192 cpuid.c:659)
    ("intel-spr", (7, 0, "edx", 28), "6.4"),  # FLUSH_L1D (6.12.118 cpuid.c:707; none in 6.1.192)
    ("intel-spr", (7, 0, "ecx", 7), "6.18"),  # SHSTK (the CET series)
    ("amd-epyc", (0x80000021, 0, "eax", 8), "6.3"),  # AutoIBRS (6.12.118 cpuid.c:818; none in 6.1.192)
])
def test_supported_cpuid_offers_a_feature_from_its_version(profile: str, bit: tuple[int, int, str, int],
                                                           since: str) -> None:
    from kvmscope.api import find_cpuid

    function, index, reg, n = bit
    for kernel in R.KNOWN:
        with model(profile, kernel) as kvm:
            leaf = find_cpuid(kvm.get_supported_cpuid(), function, index)
            offered = leaf is not None and bool(getattr(leaf, reg) >> n & 1)
            expected = R.parse_version(kernel) >= R.parse_version(since)
            assert offered is expected, f"{profile} {kernel}: CPUID {function:#x}.{index} {reg}[{n}] offered: {offered}"


@pytest.mark.parametrize("profile", ["intel-spr", "pvm-6.18"])
@pytest.mark.parametrize(("kernel", "known"), [("6.1", False), ("6.3", False), ("6.4", True), ("6.18", True)])
def test_flush_cmd_from_6_4(profile: str, kernel: str, known: bool) -> None:
    # da3db168fb67 (6.4): 6.1.192 x86.c, vmx.c and svm.c have no MSR_IA32_FLUSH_CMD case, so a host write is an unknown
    # MSR's and a guest WRMSR gets #GP; 6.12.118 x86.c:3422. It is in no index list: pvm-6.18 has it in vendor_msrs.
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        took = vcpu.set_msrs({0x10B: 1})
        assert took == int(known), f"{profile} {kernel}: FLUSH_CMD L1D_FLUSH from the host: {took} written"
        assert (vcpu.refusal_rule(0x10B) is R.UNKNOWN_MSR) is not known, f"{kernel}: {vcpu.refusal_rule(0x10B)}"
        if not known:
            events = run_program(vm, vcpu, Program().wrmsr(0x10B, 1).hlt())
            assert events == [GP, Halted()], f"{profile} {kernel}: guest WRMSR of FLUSH_CMD: {events}"


@pytest.mark.parametrize("irqchip", [False, True])
@pytest.mark.parametrize(("profile", "kernel", "forced"), [("intel-spr", "5.10", True), ("amd-epyc", "5.10", True),
                                                           ("intel-spr", "5.15", False), ("amd-epyc", "6.18", False)])
def test_apic_base_bsp_forced_before_5_15(profile: str, kernel: str, forced: bool, irqchip: bool) -> None:
    # 5.10.262 lapic.c:2274-2282 (kvm_lapic_set_base: no in-kernel LAPIC, BSP set), vmx.c:4527-4533 (VMX resets
    # through it), svm.c:1272-1275 (SVM sets the reset value itself); removed by 01913c57c225 (5.15).
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        if irqchip:
            vm.create_irqchip()
        vcpu = vm.create_vcpu(1)  # not the BSP
        bsp = 1 << 8 if forced and not irqchip else 0
        reset = 0xFEE00800 | (bsp if profile == "intel-spr" else 0)
        assert vcpu.read_msr(0x1B) == reset, f"{profile} {kernel}: vCPU 1 resets to {vcpu.read_msr(0x1B):#x}"
        assert vcpu.set_msrs({0x1B: 0xFEE00800}) == 1
        got, sregs = vcpu.read_msr(0x1B), vcpu.get_sregs().apic_base
        assert got == sregs == 0xFEE00800 | bsp, f"{profile} {kernel} irqchip={irqchip}: wrote 0xfee00800, read {got:#x}"
        sr = vcpu.get_sregs()
        sr.apic_base = 0xFEE00800
        vcpu.set_sregs(sr)
        assert vcpu.get_sregs().apic_base == 0xFEE00800 | bsp, f"{kernel}: KVM_SET_SREGS: {vcpu.get_sregs().apic_base:#x}"


@pytest.mark.parametrize(("kernel", "ok"), [("5.10", False), ("6.1", False), ("6.3", True), ("6.18", True)])
def test_efer_autoibrs_from_6_3(kernel: str, ok: bool) -> None:
    # 8c19b6f257fa (6.3): svm_hardware_setup enables EFER_AUTOIBRS on a host with it (6.12.118 svm.c:5518-5519);
    # 6.1.192 svm.c:5063-5105 enables no such bit, so set_efer refuses bit 21. amd-epyc's host has Automatic IBRS.
    with model("amd-epyc", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        took = vcpu.set_msrs({0xC0000080: 0x500 | 1 << 21})  # LME, LMA, AUTOIBRS
        assert took == int(ok), f"{kernel}: EFER.AUTOIBRS from the host: {took} written, expected {int(ok)}"


@pytest.mark.parametrize("kernel", ["5.10", "6.18"])
def test_misc_enable_reset_of_a_vendor_entry(kernel: str) -> None:
    # pvm-6.18 lists MISC_ENABLE in vendor_msrs (PVM keeps its own): its reset is the captured 1 on every version, not
    # kvm_vcpu_reset's (also on the live kernel here: tests/conformance).
    with model("pvm-6.18", kernel) as kvm, kvm.create_vm() as vm:
        assert vm.create_vcpu(0).read_msr(MISC_ENABLE) == 1, f"{kernel}: pvm-6.18's MISC_ENABLE at reset"


@pytest.mark.parametrize(("kernel", "stored"), [("5.10", True), ("5.15", True), ("5.16", False), ("6.18", False)])
def test_pv_eoi_failed_write_by_version(kernel: str, stored: bool) -> None:
    # 5.10.262 lapic.c:2868-2887: kvm_lapic_enable_pv_eoi stores msr_val before kvm_gfn_to_hva_cache_init fails;
    # afd67ee3cbbd (5.16) stores it only on success (6.1.192 lapic.c:3097-3121).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert vcpu.set_msrs({0x4B564D04: 0x7FFF0001}) == 0, f"{kernel}: PV_EOI_EN enabled outside guest memory"
        got = vcpu.read_msr(0x4B564D04)
        assert got == (0x7FFF0001 if stored else 0), f"{kernel}: PV_EOI_EN after the failed write: {got:#x}"


# --- MISC_ENABLE: reset 0x1800, guest may not change 12:11 and EMON is ignored, from 6.0 (9fc222967a39) -------------
@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
@pytest.mark.parametrize(("kernel", "from_6_0"), [("5.10", False), ("5.15", False), ("6.0", True), ("6.1", True),
                                                  ("6.18", True)])
def test_misc_enable_by_version(profile: str, kernel: str, from_6_0: bool) -> None:
    # 5.10.262 x86.c:3224-3233: only the MWAIT rule, no reset value (0); 6.1.192 x86.c:3672-3694 (guest: 12:11
    # read-only, EMON ignored) and 12235 (kvm_vcpu_reset: PEBS_UNAVAIL | BTS_UNAVAIL). Host writes take any value.
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        reset = 0x1800 if from_6_0 else 0
        assert vcpu.read_msr(MISC_ENABLE) == reset, f"{kernel}: MISC_ENABLE at reset {vcpu.read_msr(MISC_ENABLE):#x}"
        flipped, emon = reset ^ 1 << 12, reset | 1 << 7
        events = run_program(vm, vcpu, Program().wrmsr(MISC_ENABLE, flipped).rdmsr(MISC_ENABLE)
                             .wrmsr(MISC_ENABLE, emon).rdmsr(MISC_ENABLE).hlt())
        expected = ([GP, Rdmsr(MISC_ENABLE, reset), Wrmsr(MISC_ENABLE), Rdmsr(MISC_ENABLE, reset)] if from_6_0 else
                    [Wrmsr(MISC_ENABLE), Rdmsr(MISC_ENABLE, flipped), Wrmsr(MISC_ENABLE), Rdmsr(MISC_ENABLE, emon)])
        assert events == [*expected, Halted()], f"{kernel}: guest MISC_ENABLE writes of {flipped:#x}, {emon:#x}: {events}"
        assert vcpu.set_msrs({MISC_ENABLE: 0x1081}) == 1 and vcpu.read_msr(MISC_ENABLE) == 0x1081, "host: any value"


# --- SYSENTER on SVM and TSC_AUX: the vendor module (< 5.13), a GenuineIntel CPUID (5.13-6.9), not AMD (6.10) -------
GENUINE_INTEL = (0x756E6547, 0x49656E69, 0x6C65746E)  # CPUID.0 EBX, EDX, ECX
KADDR, AUX = 0xFFFFFE0000001000, 1 << 32 | 5


def _vendor(cpuid: list[kvmscope.CpuidEntry], regs: tuple[int, int, int]) -> list[kvmscope.CpuidEntry]:
    return [replace(e, ebx=regs[0], edx=regs[1], ecx=regs[2]) if e.function == 0 else e for e in cpuid]


@pytest.mark.parametrize(("profile", "kernel", "cpuid", "sysenter", "tsc_aux"), [
    # 5.10.262 svm.c:2513-2517, 2707-2729 (64 bits kept), vmx.c:2290-2297 (bits 63:32 refused for any guest)
    ("amd-epyc", "5.10", "own", KADDR, AUX), ("amd-epyc", "5.10", "none", KADDR, AUX),
    ("intel-spr", "5.10", "own", KADDR, None), ("intel-spr", "5.10", "none", KADDR, None),
    # 6.1.192 svm.c:2783-2791, 3015-3028, x86.c:1874-1896: guest_cpuid_is_intel
    ("amd-epyc", "6.1", "own", 0x1000, 5), ("amd-epyc", "6.1", "none", 0x1000, 5),
    ("amd-epyc", "6.1", "intel", KADDR, None), ("intel-spr", "6.1", "own", KADDR, None),
    ("intel-spr", "6.1", "none", KADDR, 5),
    # 6.12.118 svm.c:2952-2960, 3192-3196, x86.c:1458-1478: guest_cpuid_is_intel_compatible (no CPUID included)
    ("amd-epyc", "6.10", "own", 0x1000, 5), ("amd-epyc", "6.10", "none", KADDR, None),
    ("amd-epyc", "6.18", "intel", KADDR, None), ("intel-spr", "6.18", "none", KADDR, None),
])
def test_sysenter_and_tsc_aux_high_bits_by_version(profile: str, kernel: str, cpuid: str, sysenter: int,
                                                    tsc_aux: int | None) -> None:
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        if cpuid != "none":
            supported = kvm.get_supported_cpuid()
            vcpu.set_cpuid(_vendor(supported, GENUINE_INTEL) if cpuid == "intel" else supported)
        assert vcpu.set_msrs({0x175: KADDR}) == 1
        got = vcpu.read_msr(0x175)
        assert got == sysenter, f"{profile} {kernel} CPUID {cpuid}: SYSENTER_ESP read back {got:#x}, expected {sysenter:#x}"
        took = vcpu.set_msrs({0xC0000103: AUX})
        assert took == (tsc_aux is not None), f"{profile} {kernel} CPUID {cpuid}: TSC_AUX {AUX:#x} written: {took}"
        if tsc_aux is not None:
            assert vcpu.read_msr(0xC0000103) == tsc_aux, f"{profile} {kernel}: TSC_AUX {vcpu.read_msr(0xC0000103):#x}"


@pytest.mark.parametrize(("kernel", "kept"), [("5.10", True), ("6.1", False), ("6.18", False)])
def test_svm_sysenter_high_half_is_decided_at_the_write(kernel: str, kept: bool) -> None:
    # 6.1.192 svm.c:3015-3028: svm_set_msr keeps sysenter_esp_hi only for an Intel guest at the write; the read adds it
    # only for one at the read. Written under an AMD CPUID, read under GenuineIntel: the high half is gone (5.10.262
    # svm.c:2707-2712 keeps all 64 bits).
    with model("amd-epyc", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.get_supported_cpuid()
        vcpu.set_cpuid(supported)
        assert vcpu.set_msrs({0x175: KADDR}) == 1
        vcpu.set_cpuid(_vendor(supported, GENUINE_INTEL))
        got = vcpu.read_msr(0x175)
        assert got == (KADDR if kept else 0x1000), f"{kernel}: SYSENTER_ESP written as AMD, read as Intel: {got:#x}"


@pytest.mark.parametrize(("kernel", "rdpid_enough"), [("5.10", False), ("5.13", True), ("6.18", True)])
def test_guest_tsc_aux_with_rdpid_alone(kernel: str, rdpid_enough: bool) -> None:
    # 5.10.262 vmx.c:2021-2024: RDTSCP alone opens TSC_AUX to the guest; 61a05d444d2c (5.13): RDTSCP or RDPID.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([replace(e, edx=e.edx & ~(1 << 27)) if e.function == 0x80000001 else e
                        for e in kvm.get_supported_cpuid()])  # no RDTSCP; RDPID (CPUID.7.0:ECX[22]) stays
        events = run_program(vm, vcpu, Program().rdmsr(0xC0000103).hlt())
        expected = [Rdmsr(0xC0000103, 0)] if rdpid_enough else [GP]
        assert events == [*expected, Halted()], f"{kernel}: guest RDMSR of TSC_AUX with RDPID alone: {events}"


# --- Intel UCODE_REV: the revision in the upper 32 bits ---------------------------------------------------------------
def test_intel_ucode_rev_layout() -> None:
    with model("intel-spr", "6.18") as kvm, kvm.create_vm() as vm:
        feature = kvm.read_feature_msrs([UCODE_REV])[UCODE_REV]
        assert feature >> 32 == 0x2B0000C0 and feature & 0xFFFFFFFF == 0, f"feature value {feature:#x}"
        assert vm.create_vcpu(0).try_read_msr(UCODE_REV) == 0x100000000, "vCPU reset: revision 1 (upper half)"


# --- versions as users write them -------------------------------------------------------------------------------------
def test_a_newer_kernel_is_used_with_a_warning() -> None:
    with model("intel-spr", "7.3") as kvm:
        info = kvm.host_info()
        assert info["ruleset"] == R.NEWEST and R.NEWEST in str(info.get("ruleset_warning")), info
    with model("intel-spr", "6.18.44") as kvm:
        assert "ruleset_warning" not in kvm.host_info()


def test_a_yaml_float_kernel_is_refused(tmp_path: object) -> None:
    from pathlib import Path

    from kvmscope.errors import KvmscopeError
    from kvmscope.scenario import load

    path = Path(str(tmp_path)) / "s.yaml"
    path.write_text("scenario: 1\nname: x\nkernel: 6.10\nsteps:\n  - create_vcpu: 0\n")
    with pytest.raises(KvmscopeError, match=r"s.yaml:3: kernel: .*read as a number.*quote it"):
        load(str(path))
    path.write_text("scenario: 1\nname: x\nkernel: '6.10'\nsteps:\n  - create_vcpu: 0\n")
    assert load(str(path)).kernel == "6.10"


# --- guest_cpu_cap_has (6.14, 8f2a27752e80): a guest CPUID bit opens its MSR only where KVM supports the feature -------
def with_bits(cpuid: list[kvmscope.CpuidEntry], *bits: tuple[int, int, str, int], on: bool = True
              ) -> list[kvmscope.CpuidEntry]:
    out = list(cpuid)
    for function, index, reg, n in bits:
        at = next(i for i, e in enumerate(out) if (e.function, e.index) == (function, index))
        value = getattr(out[at], reg)
        out[at] = replace(out[at], **{reg: value | 1 << n if on else value & ~(1 << n)})
    return out


XFD_BIT, PDCM_BIT, OSVW_BIT = (0xD, 1, "eax", 4), (1, 0, "ecx", 15), (0x80000001, 0, "ecx", 9)
RDTSCP_BIT, RDPID_BIT = (0x80000001, 0, "edx", 27), (7, 0, "ecx", 22)
CAPS_EDGE = [("6.1", False), ("6.12.118", False), ("6.13", False), ("6.14", True), ("6.18", True)]


@pytest.mark.parametrize(("profile", "bit", "msr"), [("amd-epyc", XFD_BIT, 0x1C4), ("amd-epyc", PDCM_BIT, PERF_CAP),
                                                     ("intel-spr", OSVW_BIT, 0xC0010140)])
@pytest.mark.parametrize(("kernel", "caps"), CAPS_EDGE)
def test_a_guest_cpuid_bit_kvm_lacks_opens_its_msr_only_before_6_14(profile: str, bit: tuple[int, int, str, int],
                                                                     msr: int, kernel: str, caps: bool) -> None:
    # The profile's supported CPUID lacks the bit (AMD: no XFD, no PDCM; Intel: no OSVW); the guest's CPUID sets it.
    # Before 6.14 guest_cpuid_has decides (6.12.118 x86.c:4060-4070 XFD, 4037-4045 OSVW; 6.13's PERF_CAP check,
    # d75cac366f44); from 6.14 guest_cpu_cap_has (8f2a27752e80, e592ec657d84), which also needs KVM's support. The live
    # 6.18 kernel here shows the same for XFD (tests/conformance/test_conf_emulated_msrs.py).
    if kernel == "6.1" and msr == PERF_CAP:
        kernel = "6.13"  # PERF_CAP's PDCM check itself came in 6.13
    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        supported = kvm.get_supported_cpuid()
        assert not kvmscope.model.cpuid.has_feature(supported, *bit), f"{profile}: the premise, no {bit} supported"
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(with_bits(supported, bit))
        events = run_program(vm, vcpu, Program().rdmsr(msr).hlt())
        expected = [GP if caps else Rdmsr(msr, 0), Halted()]
        assert events == expected, f"{profile} {kernel}: guest RDMSR {msr:#x} with CPUID {bit} set: {events}"


@pytest.mark.parametrize(("kernel", "caps"), CAPS_EDGE)
def test_osvw_from_the_host_follows_the_guest_caps(kernel: str, caps: bool) -> None:
    # OSVW has no host_initiated exception (6.12.118 x86.c:3678-3686): KVM_SET_MSRS follows the same gate.
    from kvmscope.kernel import emulated as E

    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(with_bits(kvm.get_supported_cpuid(), OSVW_BIT))
        took = vcpu.set_msrs({0xC0010140: 4})
        assert took == int(not caps), f"{kernel}: KVM_SET_MSRS of OSVW_ID_LENGTH on an Intel host: {took} written"
        assert vcpu.try_read_msr(0xC0010140) == (None if caps else 4), f"{kernel}: read {vcpu.try_read_msr(0xC0010140)}"
        assert vcpu.refusal_rule(0xC0010140) is (E.CPUID_GATED if caps else None), vcpu.refusal_rule(0xC0010140)


def spr_without_rdpid(host_rdtscp: bool) -> Profile:
    """``intel-spr`` on a host without RDPID (before Ice Lake), and without RDTSCP unless ``host_rdtscp``."""
    from kvmscope.kernel.profile import load

    spr = load("intel-spr")
    host = with_bits(spr.supported_cpuid, RDPID_BIT, on=False)
    if not host_rdtscp:
        host = with_bits(host, RDTSCP_BIT, on=False)
    return replace(spr, supported_cpuid=host)


@pytest.mark.parametrize("host_rdtscp", [True, False])
@pytest.mark.parametrize("guest_bit", ["rdpid", "rdtscp"])
@pytest.mark.parametrize(("kernel", "caps"), CAPS_EDGE)
def test_tsc_aux_with_emulated_rdpid(kernel: str, caps: bool, guest_bit: str, host_rdtscp: bool) -> None:
    # A host without RDPID (before Ice Lake): KVM emulates RDPID where the host has RDTSCP (cpuid_func_emulated), so from
    # 6.14 a guest's RDPID still opens TSC_AUX there; a guest bit the host lacks entirely opens it only before 6.14.
    # 6.12.118 x86.c:1458-1465 (guest RDTSCP or RDPID, from 5.13).
    from kvmscope.model import open_model

    with open_model(kernel, spr_without_rdpid(host_rdtscp)) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        cpuid = with_bits(kvm.get_supported_cpuid(), RDTSCP_BIT, RDPID_BIT, on=False)
        vcpu.set_cpuid(with_bits(cpuid, RDPID_BIT if guest_bit == "rdpid" else RDTSCP_BIT))
        events = run_program(vm, vcpu, Program().rdmsr(0xC0000103).hlt())
        opens = not caps or host_rdtscp
        expected = [Rdmsr(0xC0000103, 0) if opens else GP, Halted()]
        assert events == expected, (
            f"{kernel}, host RDTSCP {host_rdtscp}, guest {guest_bit}: guest RDMSR of TSC_AUX gave {events}")


# --- EFER on SVM: SVME and LMSLE with kvm_amd nested=1 (svm_hardware_setup) ---------------------------------------------
@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.12.118", "6.18"])
@pytest.mark.parametrize("nested", ["1", "0"])
def test_svm_efer_svme_and_lmsle_need_nested(kernel: str, nested: str) -> None:
    # 6.1.192 svm.c:5104-5105, 6.12.118 svm.c:5529-5531: `if (nested) kvm_enable_efer_bits(EFER_SVME | EFER_LMSLE)`;
    # LMSLE follows the host's EferLmsleUnsupported only from 6.19 (c53c632592a4). FFXSR follows the host (5502-5503).
    from kvmscope.kernel.profile import load
    from kvmscope.model import open_model

    epyc = load("amd-epyc")
    profile = replace(epyc, module_parameters={**epyc.module_parameters, "kvm_amd.nested": nested})
    with open_model(kernel, profile) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        for name, bit in (("SVME", 1 << 12), ("LMSLE", 1 << 13)):
            took = vcpu.set_msrs({0xC0000080: 0xD01 | bit})
            assert took == int(nested == "1"), f"{kernel} nested={nested}: EFER.{name} from the host: {took} written"
        assert vcpu.set_msrs({0xC0000080: 0xD01 | 1 << 14}) == 1, f"{kernel}: EFER.FFXSR on a host with FFXSR"
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({0xC0000080: 0xD01 | 1 << 13}) == 0, f"{kernel}: EFER.LMSLE on VMX is reserved"


@pytest.mark.parametrize(("kernel", "short_circuit"), [("6.1", False), ("6.12.118", False), ("6.13", True),
                                                       ("6.18", True)])
def test_apic_base_same_value_short_circuits_from_6_13(kernel: str, short_circuit: bool) -> None:
    # a75b7bb46a83 (6.13): kvm_apic_set_base returns 0 for the current value before the reserved-bit check; 6.12.118
    # lapic.c:2687-2705 checks it (x2APIC without CPUID.X2APIC is reserved). The live 6.18 kernel: conformance.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.get_supported_cpuid()
        vcpu.set_cpuid(supported)
        x2apic = vcpu.read_msr(0x1B) | 1 << 10
        assert vcpu.set_msrs({0x1B: x2apic}) == 1, f"{kernel}: x2APIC mode with CPUID.X2APIC"
        vcpu.set_cpuid(with_bits(supported, (1, 0, "ecx", 21), on=False))
        took = vcpu.set_msrs({0x1B: x2apic})
        assert took == int(short_circuit), f"{kernel}: the same x2APIC value without CPUID.X2APIC: {took} written"
        sregs = vcpu.get_sregs()
        if short_circuit:
            vcpu.set_sregs(sregs)
        else:
            with pytest.raises(KvmError):
                vcpu.set_sregs(sregs)


@pytest.mark.parametrize(("kernel", "checked"), [("6.1", False), ("6.12.111", False), ("6.12.112", True),
                                                 ("6.12.118", True), ("6.13", False), ("6.18", False)])
def test_set_sregs_checks_efer_from_6_12_112(kernel: str, checked: bool) -> None:
    # "KVM: x86: Check EFER validity on KVM_SET_SREGS*" (2026, Cc: stable): 6.12.118 regs.c:538-561 ends
    # kvm_is_valid_sregs with kvm_valid_efer (x86.c:1327-1332: reserved bits, then __kvm_valid_efer's guest CPUID
    # bits); in 6.12.112 by Debian's changelog; 6.1.192 and the live 6.18.44 take any EFER.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        for efer, why in ((1 << 11, "NX before CPUID"), (1 << 13, "LMSLE, reserved on VMX")):
            sregs.efer = efer
            if checked:
                with pytest.raises(KvmError) as e:
                    vcpu.set_sregs(sregs)
                assert e.value.errno == errno.EINVAL, f"{kernel}: {why}: {e.value}"
            else:
                vcpu.set_sregs(sregs)
                assert vcpu.get_sregs().efer == efer, f"{kernel}: {why}: EFER {vcpu.get_sregs().efer:#x} kept"
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        sregs.efer = 1 << 11
        vcpu.set_sregs(sregs)  # NX with CPUID.NX: valid everywhere
        assert vcpu.get_sregs().efer == 1 << 11, f"{kernel}: NX after CPUID"


@pytest.mark.parametrize(("kernel", "caps"), CAPS_EDGE)
@pytest.mark.parametrize("host_rdtscp", [True, False])
def test_nested_enable_rdtscp_follows_the_guest_caps(kernel: str, caps: bool, host_rdtscp: bool) -> None:
    # vmx_vcpu_after_set_cpuid with the STUFF quirk: PROCBASED_CTLS2 (0x48B) allows ENABLE_RDTSCP (bit 3) when the
    # guest has RDTSCP or RDPID: the raw bits before 6.14 (6.12.118 vmx.c:4687-4694), guest_cpu_cap_has from 6.14
    # (8f2a27752e80), where RDPID is emulated on a host with RDTSCP. A host without RDPID (before Ice Lake).
    from kvmscope.model import open_model

    with open_model(kernel, spr_without_rdpid(host_rdtscp)) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest = with_bits(with_bits(kvm.get_supported_cpuid(), RDTSCP_BIT, on=False), RDPID_BIT)
        vcpu.set_cpuid(guest)
        allowed = vcpu.read_msr(0x48B) >> 32 >> 3 & 1
        expected = int(not caps or host_rdtscp)
        assert allowed == expected, (f"{kernel}, host RDTSCP {host_rdtscp}, guest RDPID only: ENABLE_RDTSCP allowed "
                                     f"{allowed}, expected {expected}")


SBPB_BIT, SPEC_CTRL_BIT, AMD_IBPB_BIT = (0x80000021, 0, "eax", 27), (7, 0, "edx", 26), (0x80000008, 0, "ebx", 12)


@pytest.mark.parametrize(("kernel", "sbpb"), [("6.1", False), ("6.6", False), ("6.7", True), ("6.18", True)])
def test_pred_cmd_sbpb_and_ibpb_less_hosts_from_6_7(kernel: str, sbpb: bool) -> None:
    # e47d86083c66 (6.7) "KVM: x86: Add SBPB support"; before: `if (!boot_cpu_has(X86_FEATURE_IBPB) || (data &
    # ~PRED_CMD_IBPB)) return 1` (6.4's common code, 903358c7eddb; 6.1.192 vmx.c:2254-2266 and svm.c:2964-2977 alike),
    # and a guest needs SPEC_CTRL or AMD_IBPB. An AMD host with SBPB (Zen 4 microcode or later), and one without IBPB.
    from kvmscope.kernel.profile import load
    from kvmscope.model import open_model

    epyc = load("amd-epyc")
    with open_model(kernel, replace(epyc, supported_cpuid=with_bits(epyc.supported_cpuid, SBPB_BIT))) as kvm, \
            kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({0x49: 1}) == 1, f"{kernel}: IBPB from the host"
        assert vcpu.set_msrs({0x49: 0x80}) == int(sbpb), f"{kernel}: SBPB from the host of a host with SBPB"
        guest = with_bits(kvm.get_supported_cpuid(), SPEC_CTRL_BIT, AMD_IBPB_BIT, on=False)
        vcpu.set_cpuid(with_bits(guest, SBPB_BIT))  # SBPB alone (from 6.7 the host's SBPB is offered)
        events = run_program(vm, vcpu, Program().wrmsr(0x49, 0).hlt())
        assert events == [Wrmsr(0x49) if sbpb else GP, Halted()], f"{kernel}: guest with SBPB alone: {events}"
    no_ibpb = with_bits(epyc.supported_cpuid, SPEC_CTRL_BIT, AMD_IBPB_BIT, on=False)
    with open_model(kernel, replace(epyc, supported_cpuid=no_ibpb)) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({0x49: 0}) == int(sbpb), f"{kernel}: a write of 0 on a host without IBPB"
        assert vcpu.set_msrs({0x49: 1}) == 0, f"{kernel}: IBPB on a host without it"


@pytest.mark.parametrize(("kernel", "passes"), [("5.10", True), ("6.1", True), ("6.2", False), ("6.18", False)])
def test_smbase_without_smm_by_version(kernel: str, passes: bool) -> None:
    # pvm-6.18 has no SMM (KVM_CAP_X86_SMM 0, as the live kernel here). 4b8e1b32013d (6.2) fails a host access then
    # (6.12.118 x86.c:3511-3513, 3905-3907); 6.1.192 x86.c:3696-3700, 4092-4096 checks host_initiated alone.
    with model("pvm-6.18", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        read = kvmscope.MsrBatch([0x9E])
        assert vcpu.get_msrs(read) == int(passes), f"{kernel}: host read of SMBASE, expected it to pass: {passes}"
        assert read[0][1] == (0x30000 if passes else 0), f"{kernel}: SMBASE read {read[0][1]:#x}"
        assert vcpu.set_msrs({0x9E: 0x40000}) == int(passes), f"{kernel}: host write of SMBASE, expected {passes}"
        if not passes:
            rule = vcpu.refusal_rule(0x9E)
            assert rule is R.SMBASE_NEEDS_SMM, f"{kernel}: SMBASE refused by {rule}, expected smbase_needs_smm"


def test_smbase_with_smm_built_in_but_not_reported() -> None:
    # KVM_CAP_X86_SMM is 0 with SMM built in on VMX without unrestricted guest (6.12.118 vmx.c:7049-7056), and the
    # host's SMBASE access still passes there (x86.c:3511-3513 checks CONFIG_KVM_SMM alone): a capture that found
    # SMBASE readable is the evidence the model takes, whatever the capability says.
    from kvmscope.kernel.profile import MsrBehaviour, load

    base = load("intel-spr")
    caps = {**base.capabilities, uapi.KVM_CAP_X86_SMM: 0}
    for readable, passes in ((True, True), (False, False)):
        behaviour = {**base.msr_behaviour, 0x9E: MsrBehaviour("other", 0, readable)}
        prof = replace(base, capabilities=caps, msr_behaviour=behaviour)
        with kvmscope.open("model", profile=prof, kernel="6.12") as kvm, kvm.create_vm() as vm:
            got = vm.create_vcpu(0).get_msrs(kvmscope.MsrBatch([0x9E]))
            assert got == int(passes), f"SMBASE captured readable={readable}: host read took {got}, expected {passes}"


@pytest.mark.parametrize(("kernel", "checked"), [("5.10", False), ("6.1", False), ("6.1.43", True), ("6.4", False),
                                                 ("6.4.8", True), ("6.5", True), ("6.18", True)])
def test_set_sregs_cr0_checked_by_version(kernel: str, checked: bool) -> None:
    # 26a0652cb453 (6.5; stable 6.1.43 and 6.4.8, inferred; 6.1.192 x86.c:11645-11646 has it; the 5.10 backport
    # failed): KVM_SET_SREGS refuses an invalid CR0 (PG without PE here).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cr0 = 1 << 31
        try:
            vcpu.set_sregs(sregs)
            refused = False
        except KvmError as e:
            refused = e.errno == errno.EINVAL
        assert refused == checked, f"{kernel}: CR0 PG without PE refused: {refused}, expected {checked}"


@pytest.mark.parametrize(("kernel", "reported"), [("5.10", 1), ("6.1", 1), ("6.3", 1), ("6.4", 2), ("6.18", 2)])
def test_kvm_get_vcpu_events_counts_pending_nmis_from_6_4(kernel: str, reported: int) -> None:
    """ab2ee212a57b (6.4): KVM_GET_VCPU_EVENTS reports how many NMIs are pending (two, unmasked); before, whether
    any is (6.1.192 x86.c:5143)."""
    with model("pvm-6.18", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        events = vcpu.get_vcpu_events()
        events.flags, events.nmi.pending = uapi.KVM_VCPUEVENT_VALID_NMI_PENDING, 2
        vcpu.set_vcpu_events(events)
        got = vcpu.get_vcpu_events().nmi.pending
        assert got == reported, f"{kernel}: two NMIs pending reported as {got}, expected {reported}"


# --- the feature MSRs' values by version (rulesets.FEATURE_ARRIVALS) -------------------------------------------------
# intel-spr's values were derived for 6.18. The same host under an earlier kernel reports what that kernel's KVM
# advertises (nested_vmx_setup_ctls_msrs, kvm_get_arch_capabilities): /work/notes/vmx-bits-by-version.md and
# archcap-by-version.md derive these from 5.10.262, 6.1.192 and 6.12.118 (vmx/nested.c, x86.c) and the commits named in
# the rules. 5.10 has no wait-for-SIPI (nested.c:6615-6622), no TSC scaling and VMCS_ENUM 0x2e (vmcs12.h:210).
SPR_VMX = {  # kernel: (BASIC, MISC, VMCS_ENUM, PROCBASED2, TRUE_EXIT, TRUE_ENTRY)
    "5.10.262": (0x00D8100011E57ED0, 0x20000065, 0x2E, 0x00137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "5.15.80": (0x00D8100011E57ED0, 0x20000165, 0x32, 0x02137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "5.15.87": (0x00D8100011E57ED0, 0x20000165, 0x32, 0x06137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "6.1.3": (0x00D8100011E57ED0, 0x20000165, 0x32, 0x02137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "6.1.192": (0x00D8100011E57ED0, 0x20000165, 0x32, 0x06137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "6.12.118": (0x00D8100011E57ED0, 0x20000165, 0x32, 0x06137BFF00000000, 0x007FFFFF00036DFB, 0x0000F3FF000011FB),
    "6.18": (0x01D8100011E57ED0, 0x20000165, 0x32, 0x06137BFF00000000, 0x107FFFFF00036DFB, 0x0010F3FF000011FB),
}


@pytest.mark.parametrize("kernel", list(SPR_VMX))
def test_vmx_feature_msrs_by_version(kernel: str) -> None:
    with model("intel-spr", kernel) as kvm:
        features = kvm.read_feature_msrs()
        got = tuple(features[i] for i in (0x480, 0x485, 0x48A, 0x48B, 0x48F, 0x490))
        want = SPR_VMX[kernel]
        assert got == want, f"{kernel}: VMX BASIC, MISC, VMCS_ENUM, PROCBASED2, TRUE_EXIT, TRUE_ENTRY expected " \
                            f"{[hex(v) for v in want]}, saw {[hex(v) for v in got]}"
        # the non-true controls carry their TRUE twins' allowed-1 bits (CET's load bits from 6.18)
        cet = kernel == "6.18"
        assert bool(features[0x483] >> 60 & 1) is cet and bool(features[0x484] >> 52 & 1) is cet, (
            f"{kernel}: EXIT/ENTRY_CTLS {features[0x483]:#x}/{features[0x484]:#x}, LOAD_CET_STATE expected {cet}")
        with kvm.create_vm() as vm:  # a new vCPU starts with them (the STUFF quirk's values)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())  # VMX in guest CPUID: the host may read the VMX MSRs
            assert vcpu.read_msr(0x48F) == want[4], f"{kernel}: vCPU TRUE_EXIT {vcpu.read_msr(0x48F):#x}"


@pytest.mark.parametrize(("kernel", "taken"), [("6.12.118", False), ("6.18", True)])
def test_vmx_state_with_nested_cet_restores_only_from_6_18(kernel: str, taken: bool) -> None:
    # A VMM migrating a vCPU saved on 6.18 restores TRUE_EXIT with LOAD_CET_STATE: vmx_restore_control_msr refuses an
    # allowed-1 bit KVM does not advertise (6.12.118 nested.c:1336-1361), on the same CPU.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        saved_on_6_18 = SPR_VMX["6.18"][4]
        done = vcpu.set_msrs({0x48F: saved_on_6_18})
        assert done == int(taken), f"{kernel}: TRUE_EXIT {saved_on_6_18:#x} (LOAD_CET_STATE) taken {done}, expected {taken}"


@pytest.mark.parametrize(("kernel", "taken"), [("5.10", True), ("5.10.262", False), ("6.1.3", False), ("6.1.4", True),
                                             ("6.2", True)])
def test_usr_wait_pause_of_a_waitpkg_vcpu_restores_from_6_1_4(kernel: str, taken: bool) -> None:
    # Before 31de69f4eea7 (6.2; 6.1.4, 5.15.87) only the CPUID adjustment gave a WAITPKG vCPU PROCBASED2's
    # USR_WAIT_PAUSE (6.1.192 vmx.c:4498-4503 stuffs it whatever KVM advertises), and from 6.0 a restore is checked
    # against KVM's value (5.10.137 by backport), so the vCPU's own value is refused. 5.10.0 checks against the vCPU's
    # current value (vmx_restore_current): taken.
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.get_supported_cpuid()
        assert kvmscope.model.cpuid.has_feature(supported, 7, 0, "ecx", 5), "intel-spr's supported CPUID has WAITPKG"
        vcpu.set_cpuid(supported)
        own = vcpu.read_msr(0x48B)
        assert own >> 58 & 1, f"{kernel}: a WAITPKG vCPU's PROCBASED2 {own:#x} has USR_WAIT_PAUSE (bit 58)"
        done = vcpu.set_msrs({0x48B: own})
        assert done == int(taken), f"{kernel}: writing the vCPU's own PROCBASED2 {own:#x} back took {done}, expected " \
                                   f"{int(taken)}"


@pytest.mark.parametrize(("profile", "kernel", "value"), [
    ("intel-spr", "6.1", 0x8E0EB),  # the mask (6.0), nothing synthesized yet
    ("intel-spr", "6.1.44", 0x408E0EB),  # + GDS_NO (81ac7e5d7417)
    ("intel-spr", "6.1.82", 0xC08E0EB),  # + RFDS_NO (2a0180129d72)
    ("intel-spr", "6.1.139", 0x400000000C08E0EB),  # + ITS_NO (159013a7ca18)
    ("intel-spr", "5.10.240", 0x400000000C08E0EB),
    ("intel-spr", "6.12.28", 0xC08E0EB),
    ("intel-spr", "6.12.29", 0x400000000C08E0EB),
    ("amd-epyc", "6.8", 0x4000069),
    ("amd-epyc", "6.18", 0x400000000C000069),
])
def test_arch_capabilities_synthesized_bits_by_version(profile: str, kernel: str, value: int) -> None:
    # kvm_get_arch_capabilities sets GDS_NO, RFDS_NO and ITS_NO for a host the bug does not affect, from the release
    # (or stable backport) that added each (archcap-by-version.md; 6.1.192 x86.c:1631-1693, 6.12.118 x86.c:1219-1276).
    with model(profile, kernel) as kvm:
        got = kvm.read_feature_msrs()[ARCH_CAP]
        assert got == value, f"{profile} {kernel}: ARCH_CAPABILITIES expected {value:#x}, saw {got:#x}"
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())  # from 6.13 a host read needs the ARCH_CAPABILITIES bit
            assert vcpu.read_msr(ARCH_CAP) == value, f"{profile} {kernel}: a new vCPU's ARCH_CAPABILITIES"


# What vmx_get_perf_capabilities takes from a Sapphire Rapids host's PERF_CAPABILITIES (assumed raw: PEBS format 4 with
# TRAP, ARCH_REG and BASELINE, FULL_WIDTH_WRITES, arch LBR whose LBR format reads 0x3f), by release: FULL_WIDTH_WRITES
# alone in 5.10 (5.10.262 vmx/capabilities.h:372-379); + the LBR format from 5.12 (be635e34c284) until an arch-LBR
# host stops passing it on (098f4c061ea1: 6.4, 6.1.29; 6.1.192 vmx.c:7784); + PEBS where perf has pebs_ept, on SPR
# from 6.3 (13738a364736, in no 6.1.y); without BASELINE from 6.9 (9e985cbf2942: 6.1.88, 6.6.29; 6.12.118 vmx.c:7930).
SPR_PERF_CAP = [("5.10.262", 0x2000), ("5.12", 0x203F), ("6.1", 0x203F), ("6.1.28", 0x203F), ("6.1.29", 0x2000),
                ("6.1.192", 0x2000), ("6.2", 0x203F), ("6.3", 0x64FF), ("6.4", 0x64C0), ("6.6.28", 0x64C0),
                ("6.6.29", 0x24C0), ("6.8", 0x64C0), ("6.8.8", 0x24C0), ("6.9", 0x24C0), ("6.12.118", 0x24C0), ("6.18", 0x24C0)]


@pytest.mark.parametrize(("kernel", "value"), SPR_PERF_CAP)
def test_perf_capabilities_of_sapphire_rapids_by_version(kernel: str, value: int) -> None:
    with model("intel-spr", kernel) as kvm:
        got = kvm.read_feature_msrs()[PERF_CAP]
        assert got == value, f"intel-spr {kernel}: PERF_CAPABILITIES expected {value:#x}, saw {got:#x}"
        supported = kvm.get_supported_cpuid()
        ds = [kvmscope.model.cpuid.has_feature(supported, 1, 0, reg, b) for reg, b in (("edx", 21), ("ecx", 2))]
        pebs = bool(value & 0x4FC0)
        assert ds == [pebs, pebs], f"intel-spr {kernel}: CPUID DS, DTES64 offered {ds}, expected {pebs} (with PEBS)"
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(supported)
            assert vcpu.read_msr(PERF_CAP) == value, f"intel-spr {kernel}: a new vCPU's PERF_CAPABILITIES"
            # a snapshot from 6.12 (PEBS without BASELINE) restores only where this kernel offers the same PEBS: a
            # subset of KVM's value, PEBS fields equal to KVM's (6.12.118 vmx.c:2498, 6.1.192 vmx.c:2412), so not on
            # 6.3-6.8, which keep BASELINE
            taken = value & 0x24C0 == 0x24C0 and value & 0x4FC0 == 0x4C0
            done = vcpu.set_msrs({PERF_CAP: 0x24C0})
            assert done == int(taken), (
                f"intel-spr {kernel}: PERF_CAPABILITIES 0x24c0 from a 6.12 host taken {done}, expected {int(taken)} "
                f"where KVM offers {value:#x}")


@pytest.mark.parametrize("kernel", ["5.10", "6.1.192", "6.3", "6.12.118", "6.18"])
def test_perf_capabilities_follow_a_profiles_own_history(kernel: str) -> None:
    # the arrivals are intel-spr's own ("history"): the same host without them keeps its captured 0x24c0 everywhere,
    # and AMD reports 0 on every version (5.10.262 svm.c:2479, 6.12.118 x86.c:1288)
    from kvmscope.kernel.profile import load as load_profile

    bare = replace(load_profile("intel-spr"), history=[])
    with kvmscope.model.open_model(kernel=kernel, profile=bare) as kvm:
        got = kvm.read_feature_msrs()[PERF_CAP]
        assert got == 0x24C0, f"intel-spr without its history on {kernel}: PERF_CAPABILITIES {got:#x}, expected 0x24c0"
    with model("amd-epyc", kernel) as kvm:
        got = kvm.read_feature_msrs()[PERF_CAP]
        assert got == 0, f"amd-epyc {kernel}: PERF_CAPABILITIES expected 0, saw {got:#x}"


# --- IA32_DEBUGCTL (model/msr_debugctl.py; /work/notes/debugctl.md) ---------------------------------------------------
# Host writes of 0, 1 (LBR), 2 (BTF), 4 (BUS_LOCK_DETECT), 0x3F, 0x40, 0x8000 (RTM_DEBUG), one after the other on a
# vCPU given the supported CPUID: (taken, value read back after it).
DEBUGCTL_WRITES = (0x0, 0x1, 0x2, 0x4, 0x3F, 0x40, 0x8000)
DEBUGCTL_HOST = {
    # VMX before 5.12: the common code takes 0 and LBR/BTF alone and keeps nothing (5.10.262 x86.c:3190-3201, 3479).
    ("intel-spr", "5.10.262"): ((1, 0), (1, 0), (1, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    # VMX from 5.12: SPR supports BUS_LOCK_DETECT only (arch LBR: no LBR format; no RTM); LBR and BTF are dropped.
    ("intel-spr", "6.1.192"): ((1, 0), (1, 0), (1, 0), (1, 4), (0, 4), (0, 4), (0, 4)),
    ("intel-spr", "6.18"): ((1, 0), (1, 0), (1, 0), (1, 4), (0, 4), (0, 4), (0, 4)),
    # SVM with LBRV: bits 0-5 stored as written (5.10.262 svm.c:2731-2745), until ee89e8013383 drops 5:2 (6.1.131)
    # and d0eac42f5cec BTF (6.12.19; not in 6.1.y).
    ("amd-epyc", "5.10.262"): ((1, 0), (1, 1), (1, 2), (1, 4), (1, 0x3F), (0, 0x3F), (0, 0x3F)),
    ("amd-epyc", "6.1.130"): ((1, 0), (1, 1), (1, 2), (1, 4), (1, 0x3F), (0, 0x3F), (0, 0x3F)),
    ("amd-epyc", "6.1.192"): ((1, 0), (1, 1), (1, 2), (1, 0), (1, 3), (0, 3), (0, 3)),
    ("amd-epyc", "6.12.19"): ((1, 0), (1, 1), (1, 0), (1, 0), (1, 1), (0, 1), (0, 1)),
}


@pytest.mark.parametrize(("profile", "kernel"), list(DEBUGCTL_HOST))
def test_debugctl_host_writes_by_vendor_and_version(profile: str, kernel: str) -> None:
    from kvmscope.api import MsrBatch

    with model(profile, kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        seen = []
        for value in DEBUGCTL_WRITES:
            taken = vcpu.set_msrs(MsrBatch([(0x1D9, value)]))
            batch = MsrBatch([0x1D9])
            assert vcpu.get_msrs(batch) == 1, f"{profile} {kernel}: a host read of DEBUGCTL is taken"
            seen.append((taken, list(batch)[0][1]))
        want = DEBUGCTL_HOST[(profile, kernel)]
        assert tuple(seen) == want, f"{profile} {kernel}: writes {[hex(v) for v in DEBUGCTL_WRITES]} expected " \
                                    f"(taken, read back) {want}, saw {tuple(seen)}"


@pytest.mark.parametrize(("kernel", "host_taken"), [("6.0", False), ("6.0.8", True), ("6.18", True)])
def test_debugctl_bus_lock_needs_the_guest_model(kernel: str, host_taken: bool) -> None:
    # A guest write of BUS_LOCK_DETECT needs it in the guest CPUID at every version from 5.12; a host write needed it
    # too until b333b8ebb85d (6.1; 6.0.8).
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([replace(e, ecx=e.ecx & ~(1 << 24)) if e.key == (7, 0) else e
                        for e in kvm.get_supported_cpuid()])
        assert vcpu.set_msrs({0x1D9: 4}) == int(host_taken), f"{kernel}: host BUS_LOCK_DETECT taken {host_taken}"
        events = run_program(vm, vcpu, Program().wrmsr(0x1D9, 4).hlt())
        assert events == [GP, Halted()], f"{kernel}: a guest write of BUS_LOCK_DETECT without it in CPUID: {events}"


# --- KVM_GET_SUPPORTED_CPUID: the bits a later KVM offered (rulesets.CPUID_ARRIVALS) ----------------------------------
# Each bit as the same host reports it just before and at the release (or stable backport) whose KVM offered it:
# 5.10.262, 6.1.192 and 6.12.118 cpuid.c (kvm_set_cpu_caps) against 6.18's.
SUPPORTED_CPUID_ARRIVALS = [
    ("intel-spr", (7, 0, "edx", 23), "5.10.262", "5.11"),  # AVX512_FP16, 2224fc9efb2d
    ("intel-spr", (7, 1, "eax", 4), "5.11", "5.12"),  # AVX_VNNI, 1085a6b585d7
    ("intel-spr", (7, 0, "ecx", 24), "5.12", "5.13"),  # BUS_LOCK_DETECT, 76ea438b4afc
    ("amd-epyc", (0x80000008, 0, "ebx", 28), "5.15", "5.16"),  # AMD_PSFD, b73a54321ad8
    ("intel-spr", (7, 0, "ebx", 13), "5.16.9", "5.16.10"),  # ZERO_FCS_FDS, e3bcfda012ed (stable)
    ("amd-epyc", (0x80000021, 0, "eax", 0), "5.10.239", "5.10.240"),  # leaf 0x80000021, 58b3d12c0a86 (stable)
    ("amd-epyc", (0x80000021, 0, "eax", 0), "5.17", "5.18"),
    ("amd-epyc", (0x80000021, 0, "eax", 9), "6.1", "6.2"),  # NO_SMM_CTL_MSR, 74bee0cad8dc
    ("amd-epyc", (0x80000021, 0, "eax", 9), "6.1.152", "6.1.153"),  # its 6.1.y backport
    ("amd-epyc", (0x80000021, 0, "eax", 9), "5.10.262", "6.2"),  # not with 5.10.240's leaf (masked to 0, 2, 5, 6)
    ("intel-spr", (1, 0, "ecx", 2), "6.2", "6.3"),  # DTES64, cf8e55fe50df (6.0) where perf has pebs_ept: SPR 6.3
    ("intel-spr", (1, 0, "edx", 21), "6.1.192", "6.3"),  # DS: no 6.1.y has SPR's pebs_ept (13738a364736)
    ("intel-spr", (7, 1, "eax", 10), "6.2", "6.3"),  # FZRM, 2a4209d6a9cb
    ("amd-epyc", (0x80000022, 0, "eax", 0), "6.4", "6.5"),  # PERFMON_V2, 4a2771895ca6
    ("intel-spr", (7, 2, "edx", 0), "6.1.83", "6.1.84"),  # 7.2 EDX, eefe5e668209 (stable)
    ("intel-spr", (7, 2, "edx", 0), "6.7", "6.8"),
    ("intel-spr", (1, 0, "ecx", 24), "6.12.118", "6.14"),  # TSC_DEADLINE_TIMER, 9be4ec35d668
    ("intel-spr", (1, 0, "ecx", 31), "6.13", "6.14"),  # HYPERVISOR, 9aa470f5ddb2
    ("intel-spr", (0xD, 1, "ecx", 11), "6.17", "6.18"),  # CET_U in XSS, the CET series
]


@pytest.mark.parametrize(("profile", "bit", "before", "at"), SUPPORTED_CPUID_ARRIVALS)
def test_supported_cpuid_bit_arrives_with_its_release(profile: str, bit: tuple[int, int, str, int], before: str,
                                                       at: str) -> None:
    from kvmscope.api import find_cpuid

    function, index, reg, n = bit
    for kernel, offered in ((before, False), (at, True)):
        with model(profile, kernel) as kvm:
            leaf = find_cpuid(kvm.get_supported_cpuid(), function, index)
            got = leaf is not None and bool(getattr(leaf, reg) >> n & 1)
        assert got is offered, f"{profile} {kernel}: CPUID {function:#x}.{index} {reg}[{n}] offered {got}, " \
                               f"expected {offered}"


# --- KVM_GET_SUPPORTED_CPUID: the leaves a later KVM lists (rulesets.CPUID_LIMITS, leaf 0xD from the bits) -----------
# (profile, kernel, leaf 0 EAX, 0x80000000 EAX, 7.0 EAX, the leaves 7, 0xD and 0x8000002x listed, 0xD.0 EBX=ECX,
# 0xD.1 EBX): 5.10.262, 6.1.192 and 6.12.118 cpuid.c __do_cpuid_func against the 6.18 profiles.
SUPPORTED_CPUID_LEAVES = [
    # 5.10: basic leaves to 0x1f, leaf 7 to sub-leaf 1, no AMX (5.17) or CET (6.18) state; extended to 0x8000001f
    # before the 0x80000021 backport (5.10.240)
    ("intel-spr", "5.10", 0x1F, 0x80000008, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9", 0xA88, 0x988),
    ("amd-epyc", "5.10", 0x10, 0x8000001F, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9", 0x988, 0x988),
    ("amd-epyc", "5.10.240", 0x10, 0x80000021, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9 80000021.0", 0x988, 0x988),
    # 6.1: XTILE_CFG without the guest permission for XTILE_DATA (not filtered before 6.4), 7.2 from 6.1.84
    ("intel-spr", "6.1", 0x1F, 0x80000008, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9 d.17", 0xB00, 0xA00),
    ("intel-spr", "6.1.84", 0x1F, 0x80000008, 2, "7.0 7.1 7.2 d.0 d.1 d.2 d.5 d.6 d.7 d.9 d.17", 0xB00, 0xA00),
    # 6.4 filters XTILE_CFG (55cd57b596e8): no 0xD.17, sizes without it; 6.5 lists 0x80000022 (PerfMonV2)
    ("intel-spr", "6.4", 0x1F, 0x80000008, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9", 0xA88, 0x988),
    ("amd-epyc", "6.4", 0x10, 0x80000021, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9 80000021.0", 0x988, 0x988),
    ("amd-epyc", "6.5", 0x10, 0x80000022, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9 80000021.0 80000022.0", 0x988,
     0x988),
    # 6.12 raises the basic limit to 0x24 (1c450ffef589); 6.18 offers CET's XSS bits (sub-leaves 11 and 12)
    ("intel-spr", "6.11", 0x1F, 0x80000008, 2, "7.0 7.1 7.2 d.0 d.1 d.2 d.5 d.6 d.7 d.9", 0xA88, 0x988),
    ("intel-spr", "6.12", 0x20, 0x80000008, 2, "7.0 7.1 7.2 d.0 d.1 d.2 d.5 d.6 d.7 d.9", 0xA88, 0x988),
    ("intel-spr", "6.18", 0x20, 0x80000008, 2, "7.0 7.1 7.2 d.0 d.1 d.2 d.5 d.6 d.7 d.9 d.11 d.12", 0xA88, 0x9B0),
    ("amd-epyc", "6.18", 0x10, 0x80000022, 1, "7.0 7.1 d.0 d.1 d.2 d.5 d.6 d.7 d.9 d.11 d.12 80000021.0 80000022.0",
     0x988, 0x9B0),
]


@pytest.mark.parametrize(("profile", "kernel", "basic", "extended", "leaf7", "leaves", "size", "compacted"),
                         SUPPORTED_CPUID_LEAVES)
def test_supported_cpuid_lists_the_leaves_of_its_release(profile: str, kernel: str, basic: int, extended: int,
                                                         leaf7: int, leaves: str, size: int, compacted: int) -> None:
    from kvmscope.api import find_cpuid

    with model(profile, kernel) as kvm:
        entries = kvm.get_supported_cpuid()
    got = {e.function: e.eax for e in entries if e.index == 0 and e.function in (0, 0x80000000, 7)}
    assert (got[0], got[0x80000000], got[7]) == (basic, extended, leaf7), (
        f"{profile} {kernel}: leaf 0, 0x80000000 and 7.0 EAX: expected {basic:#x}, {extended:#x}, {leaf7}, saw "
        f"{got[0]:#x}, {got[0x80000000]:#x}, {got[7]}")
    assert all(e.function <= basic or e.function >= 0x40000000 for e in entries), f"{profile} {kernel}: a leaf above"
    assert all(e.function < 0x80000000 or e.function <= extended for e in entries), f"{profile} {kernel}: above ext"
    listed = " ".join(f"{e.function:x}.{e.index}" for e in entries if e.function in (7, 0xD) or e.function > 0x80000020)
    assert listed == leaves, f"{profile} {kernel}: expected leaves {leaves}, saw {listed}"
    d0, d1 = find_cpuid(entries, 0xD, 0), find_cpuid(entries, 0xD, 1)
    assert d0 is not None and d1 is not None
    assert (d0.ebx, d0.ecx, d1.ebx) == (size, size, compacted), (
        f"{profile} {kernel}: 0xD.0 EBX/ECX and 0xD.1 EBX: expected {size:#x}/{size:#x}/{compacted:#x}, saw "
        f"{d0.ebx:#x}/{d0.ecx:#x}/{d1.ebx:#x}")


# --- KVM_CHECK_EXTENSION: the capabilities a later KVM reports (rulesets.CAP_ARRIVALS) --------------------------------
# (capability, the release before, the release that reports it): each commit's release from the KVM pull requests,
# mainline pushes and header syncs (/work/notes/cap-pins.md), against the 5.10.262, 6.1.192, 6.12.118 and 6.18 switches.
CAPABILITY_ARRIVALS = [
    (192, "5.10.262", "5.11"), (193, "5.11", "5.12"), (195, "5.12", "5.13"), (197, "5.12", "5.13"),
    (200, "5.13", "5.14"), (201, "5.13", "5.14"), (203, "5.13", "5.14"), (204, "5.13", "5.14"), (127, "5.15", "5.16"),
    (206, "5.15", "5.16"), (54, "5.16", "5.17"), (208, "5.16", "5.17"), (209, "5.16", "5.17"), (213, "5.17", "5.18"),
    (215, "5.17", "5.18"), (214, "5.18", "5.19"), (218, "5.19", "6.0"), (220, "5.19", "6.0"), (223, "6.0", "6.1"),
    (226, "6.2", "6.3"), (89, "6.7", "6.8"), (231, "6.7", "6.8"), (232, "6.7", "6.8"), (235, "6.7", "6.8"),
    (237, "6.10", "6.11"), (238, "6.10", "6.11"), (70, "6.17", "6.18"), (244, "6.17", "6.18"),
    (234, "6.7", "6.18"),  # on the VM too from 6.18 (test_guest_memfd_on_a_default_vm_from_6_18)
    (191, "5.10", "5.11"), (196, "5.12", "5.13"), (199, "5.13", "5.14"), (212, "5.17", "5.18"), (219, "5.19", "6.0"),
    (236, "6.10", "6.11"),
]
# A 6.18 host reporting every one of them (intel-spr lacks the Hyper-V and SGX ones, which its config decides), so
# each row shows the capability come.
_EVERY_CAP = replace(load_profile("intel-spr"), capabilities={
    **load_profile("intel-spr").capabilities, **{c: 7 for c, _, _ in CAPABILITY_ARRIVALS if c != 213}})


def test_every_capability_arrival_is_tested() -> None:
    from kvmscope.kernel.rulesets import CAP_ARRIVALS

    table = {c for caps in CAP_ARRIVALS.values() for c in caps}
    tested = {c for c, _, _ in CAPABILITY_ARRIVALS}
    assert table == tested, f"untested or unknown: {sorted(table ^ tested)}"


@pytest.mark.parametrize(("cap", "before", "at"), CAPABILITY_ARRIVALS)
def test_a_capability_is_reported_from_its_release(cap: int, before: str, at: str) -> None:
    reported = _EVERY_CAP.capability(cap)  # the 6.18 host's own answer
    assert reported, f"capability {cap}: the test profile must report it"
    for kernel, want in ((before, 0), (at, reported)):
        with kvmscope.open("model", profile=_EVERY_CAP, kernel=kernel) as kvm, kvm.create_vm() as vm:
            got = (kvm.check_extension(cap), vm.check_extension(cap))
        if cap == uapi.KVM_CAP_DISABLE_QUIRKS2 and want:  # the quirks of that release: Ruleset.supported_quirks
            want = R.resolve(kernel).supported_quirks(want)
        assert got == (want, want), f"{kernel}: capability {cap} on /dev/kvm and the VM: expected {want}, saw {got}"


def test_a_template_needing_a_later_capability_fails_on_an_older_kernel() -> None:
    """Firecracker checks a template's kvm_capabilities before any vCPU exists: XSAVE2 (208) came with 5.17."""
    from kvmscope.template import parse
    from kvmscope.template_apply import apply

    t = parse('{"kvm_capabilities": ["208", "!56", "!208", "208", "!238"]}', "t.json")
    for kernel, failures in (("5.16", ["KVM capability 208 (KVM_CAP_XSAVE2) is not supported (this kernel's KVM does "
                                       "not report it yet: caps_5_17"]), ("5.17", [])):
        with model("intel-spr", kernel) as kvm:
            rep = apply(kvm, t, 1)
        got = [f.split(", KVM_CHECK")[0] for f in rep.failures]
        assert got == failures, f"{kernel}: expected {failures}, saw {rep.failures}"
        assert rep.notes[:3] == ["KVM capability 56 (KVM_CAP_XCRS) is removed from Firecracker's checks",
                                 "KVM capability 208 (KVM_CAP_XSAVE2) is removed from Firecracker's checks",
                                 "KVM capability 238 (KVM_CAP_X86_GUEST_MODE): removed, but Firecracker's checks "
                                 "do not have it"], rep.notes


@pytest.mark.parametrize(("profile", "kernel", "vapic"), [("intel-spr", "5.17", 0), ("intel-spr", "5.18", 1),
                                                          ("amd-epyc", "5.10", 1)])
def test_vapic_on_a_vmx_host_before_5_18(profile: str, kernel: str, vapic: int) -> None:
    # 5.10.262 x86.c:3903 `r = !kvm_x86_ops.cpu_has_accelerated_tpr()`: 0 on VMX with flexpriority; 8a2897853c53 (5.18)
    with model(profile, kernel) as kvm:
        assert kvm.check_extension(uapi.KVM_CAP_VAPIC) == vapic, f"{profile} {kernel}: expected VAPIC {vapic}"


def test_enabling_a_later_capability_on_an_older_kernel_is_einval() -> None:
    # DIRTY_LOG_RING (192, 5.11) with a size the kernel takes: EINVAL before it; from it the kernel takes it, which the
    # model (it keeps no ring) reports as a ModelLimitation
    from kvmscope.model.vcpu import ModelLimitation

    for kernel, taken in (("5.10", False), ("5.11", True)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            try:
                vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, 0x10000)
                got = "taken"
            except ModelLimitation:
                got = "taken"
            except KvmError as e:
                assert e.errno == errno.EINVAL, f"{kernel}: expected EINVAL, saw {e}"
                assert "caps_5_11" in str(e), f"{kernel}: expected the rule named, saw {e}"
                got = "EINVAL"
        assert got == ("taken" if taken else "EINVAL"), f"{kernel}: KVM_ENABLE_CAP(DIRTY_LOG_RING) {got}"


def test_guest_memfd_on_a_default_vm_from_6_18() -> None:
    # 6.8-6.17: `!kvm || kvm_arch_has_private_mem(kvm)` (6.12.118 kvm_main.c:4999-5002), 0 on a default VM; 6.18: 1
    for kernel, want in (("6.7", (0, 0)), ("6.8", (1, 0)), ("6.17", (1, 0)), ("6.18", (1, 1))):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            got = (kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD), vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD))
        assert got == want, f"{kernel}: GUEST_MEMFD on /dev/kvm and a default VM: expected {want}, saw {got}"


def test_leaf_limits_keep_centaurs_leaves_and_drop_those_above() -> None:
    """A host with leaves 0x20 and 0x24 and Centaur's 0xC0000000 range: before 6.12 the basic leaves stop at 0x1f
    (6.1.192 cpuid.c:908), and before 6.5 the extended ones at 0x80000021; 0xC000000x has its own limit (0xC0000004)."""
    from kvmscope.api import CpuidEntry

    spr = load_profile("intel-spr")
    extra = [CpuidEntry(0x20, 0), CpuidEntry(0x24, 0), CpuidEntry(0xC0000000, 0, eax=0xC0000001),
             CpuidEntry(0xC0000001, 0)]
    host = replace(spr, supported_cpuid=[*spr.supported_cpuid, *extra])
    for kernel, listed in (("6.11", ["0xc0000000", "0xc0000001"]), ("6.12", ["0x20", "0x24", "0xc0000000",
                                                                            "0xc0000001"])):
        with kvmscope.open("model", profile=host, kernel=kernel) as kvm:
            got = [hex(e.function) for e in kvm.get_supported_cpuid() if e.function >= 0x20 and e.function != 0x40000000
                   and e.function != 0x40000001 and not 0x80000000 <= e.function <= 0x8FFFFFFF]
        assert got == listed, f"{kernel}: expected leaves {listed}, saw {got}"


@pytest.mark.parametrize(("kernel", "leaf", "rule"), [
    ("6.1", (7, 2), "cpuid_7_2_edx"), ("6.11", (0x20, 0), "cpuid_avx10"), ("5.10", (0xD, 17), "xfd_msrs"),
    ("6.12", (0xD, 11), "cet_msrs"), ("6.4", (0x80000022, 0), "cpuid_perfmon_v2"), ("6.18", (7, 2), None),
    ("5.10", (0xC0000001, 0), None)])
def test_a_leaf_a_kernel_does_not_list_names_its_arrival(kernel: str, leaf: tuple[int, int], rule: str | None) -> None:
    got = R.resolve(kernel).leaf_arrival(*leaf)
    assert (got.key if got else None) == rule, f"{kernel} leaf {leaf}: expected {rule}, saw {got}"


def test_kvm_get_xsave2_comes_with_its_capability() -> None:
    # 5.10.262 has no KVM_GET_XSAVE2: an unknown vCPU ioctl is EINVAL (kvm_arch_vcpu_ioctl's default)
    for kernel, ok in (("5.16", False), ("5.17", True)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            try:
                got = len(vcpu.get_xsave2(4096)) == 4096
            except KvmError as e:
                assert e.errno == errno.EINVAL, f"{kernel}: expected EINVAL, saw {e}"
                got = False
        assert got is ok, f"{kernel}: KVM_GET_XSAVE2 worked {got}, expected {ok}"


def test_xtile_data_without_permission_is_eperm_from_5_17() -> None:
    """kvm_check_cpuid: 6.1.192 cpuid.c:159-171 asks the guest permission for XTILE_DATA (EPERM without it); 5.10.262
    cpuid.c:73-89 checks the address width alone."""
    from kvmscope.api import CpuidEntry

    spr = load_profile("intel-spr")
    assert not spr.guest_xfd_permitted, "the test needs a host process without the AMX permission"
    for kernel, err in (("5.10", 0), ("6.1", errno.EPERM)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            cpuid = [e if (e.function, e.index) != (0xD, 0) else replace(e, eax=e.eax | 3 << 17)
                     for e in kvm.get_supported_cpuid()]
            if all(e.key != (0xD, 0) for e in cpuid):
                cpuid.append(CpuidEntry(0xD, 0, flags=1, eax=3 | 3 << 17))
            try:
                vm.create_vcpu(0).set_cpuid(cpuid)
                got = 0
            except KvmError as e:
                got = e.errno or 0
        assert got == err, f"{kernel}: KVM_SET_CPUID2 with XTILE_DATA: expected errno {err}, saw {got}"


def test_vapic_follows_flexpriority_before_5_18() -> None:
    spr = load_profile("intel-spr")
    off = replace(spr, module_parameters={**spr.module_parameters, "kvm_intel.flexpriority": "N"})
    with kvmscope.open("model", profile=off, kernel="5.10") as kvm:
        assert kvm.check_extension(uapi.KVM_CAP_VAPIC) == 1, "5.10 without flexpriority: !cpu_has_accelerated_tpr"


def test_max_vcpu_id_can_be_enabled_from_6_0() -> None:
    # KVM_CHECK_EXTENSION reported it all along (5.10.262 x86.c:3912); KVM_ENABLE_CAP took it from 35875316384b (6.0)
    from kvmscope.model.vcpu import ModelLimitation

    for kernel, taken in (("5.19", False), ("6.0", True)):
        with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
            assert vm.check_extension(uapi.KVM_CAP_MAX_VCPU_ID), f"{kernel}: MAX_VCPU_ID is reported"
            try:
                vm.enable_cap(uapi.KVM_CAP_MAX_VCPU_ID, 8)
                got = True
            except ModelLimitation:  # taken by the kernel; the model does not implement it
                got = True
            except KvmError as e:
                assert e.errno == errno.EINVAL and "enable_max_vcpu_id" in str(e), f"{kernel}: {e}"
                got = False
        assert got is taken, f"{kernel}: KVM_ENABLE_CAP(MAX_VCPU_ID) taken {got}, expected {taken}"



@pytest.mark.parametrize(("kernel", "nr_vcpus", "max_vcpus", "max_id", "slots"), [
    ("5.10", 240, 288, 1023, 509), ("5.12", 240, 288, 1023, 32764), ("5.15", 710, 1024, 4096, 32764),
    ("5.16", 72, 1024, 4096, 32764), ("6.18", 72, 1024, 4096, 32764)])
def test_vcpu_and_memslot_limits_by_version(kernel: str, nr_vcpus: int, max_vcpus: int, max_id: int,
                                            slots: int) -> None:
    """5.10.262 x86.c:3906-3913 (KVM_SOFT_MAX_VCPUS 240, KVM_MAX_VCPUS 288, KVM_MAX_VCPU_ID 1023, KVM_USER_MEM_SLOTS
    509); 32764 slots from 4fc096a99e01 (5.12); 1024 vCPUs and ids 4 x that from 074c82c8f7cf and 4ddacd525a2f (5.15),
    NR_VCPUS 710 there (1dbaf04cb91b) and the online CPUs from 5.16 (da1bfd52b930, 2845e7353bc3: 72 on this profile)."""
    with model("intel-spr", kernel) as kvm, kvm.create_vm() as vm:
        got = tuple(kvm.check_extension(c) for c in (uapi.KVM_CAP_NR_VCPUS, uapi.KVM_CAP_MAX_VCPUS,
                                                     uapi.KVM_CAP_MAX_VCPU_ID, uapi.KVM_CAP_NR_MEMSLOTS))
        assert got == (nr_vcpus, max_vcpus, max_id, slots), f"{kernel}: NR_VCPUS, MAX_VCPUS, MAX_VCPU_ID, NR_MEMSLOTS {got}"
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(max_id)
        assert e.value.errno == errno.EINVAL, f"{kernel}: vCPU id {max_id}: {e.value}"
        vm.create_vcpu(max_id - 1)
        with pytest.raises(KvmError) as e:
            vm.add_memory(0x100000, 0x1000, slot=slots)
        assert e.value.errno == errno.EINVAL, f"{kernel}: memslot {slots}: {e.value}"
        vm.add_memory(0x100000, 0x1000, slot=slots - 1)


def test_probe_names_what_a_later_kernel_brings() -> None:
    """probe on the model: the capabilities, feature MSRs and MSRs the profile's host has that the kernel chosen does
    not yet, each with its release; none on the profile's own kernel."""
    from kvmscope.probe import probe

    with model("intel-spr", "5.10") as kvm:
        later = probe(kvm).later
    want = {"KVM_CAP_XSAVE2": "5.17", "KVM_CAP_SREGS2": "5.14", "MSR_PLATFORM_INFO (feature MSR)": "6.13",
            "MSR_IA32_XFD (MSR)": "5.17", "MSR_IA32_U_CET (MSR)": "6.18", "KVM_CAP_ONE_REG": "6.18"}
    got = {k: later[k]["since"] for k in want if k in later}
    assert got == want, f"5.10: expected {want}, saw {got} (all: {list(later)})"
    assert [v["since"] for v in later.values()] == sorted((v["since"] for v in later.values()),
                                                         key=R.parse_version), "by release"
    # the supported-CPUID leaves and bits and the feature-MSR bits too, with the oldest rule that brings each
    want = {"CPUID 0x7.2 (leaf)": ("6.8", "cpuid_7_2_edx"), "CPUID 0xd.17 (leaf)": ("5.17", "xfd_msrs"),
            "CPUID 0x7.0 edx bit(s) 23": ("5.11", "cpuid_avx512_fp16"),
            "CPUID 0x1.0 edx bit(s) 21": ("6.3", "pebs_ept_spr"),
            "MSR_IA32_PERF_CAPABILITIES bit(s) 6, 7, 10 (feature MSR)": ("6.3", "pebs_ept_spr"),
            "MSR_IA32_ARCH_CAPABILITIES bit(s) 26 (feature MSR)": ("6.5", "arch_cap_gds_no"),
            "MSR_IA32_VMX_PROCBASED_CTLS2 bit(s) 57 (feature MSR)": ("5.14", "vmx_tsc_scaling")}
    got2 = {k: (later[k]["since"], later[k]["rule"]) for k in want if k in later}
    assert got2 == want, f"5.10: expected {want}, saw {got2} (all: {list(later)})"
    with model("intel-spr", "6.18") as kvm:
        assert probe(kvm).later == {}, "nothing is later than the profile's own kernel"


def test_288_vcpus_at_most_before_5_15() -> None:
    # 5.10.262 kvm_main.c kvm_vm_ioctl_create_vcpu: created_vcpus >= KVM_MAX_VCPUS (288, kvm_host.h:40) is EINVAL
    with model("intel-spr", "5.10") as kvm, kvm.create_vm() as vm:
        for i in range(288):
            vm.create_vcpu(i)
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(288)
        assert e.value.errno == errno.EINVAL, f"the 289th vCPU: {e.value}"


@pytest.mark.parametrize(("kernel", "taken", "disabled"), [("6.12", True, 0b1110), ("6.14", False, None)])
def test_disable_exits_with_an_mwait_the_host_cannot(kernel: str, taken: bool, disabled: int | None) -> None:
    """6.12.118 x86.c:6123-6147 takes any valid exit (0xF) and ignores MWAIT where the host cannot disable it;
    c829ccd4d9dc (6.14) refuses it (pvm-6.18 allows 0b1110)."""
    with model("pvm-6.18", kernel) as kvm, kvm.create_vm() as vm:
        try:
            vm.enable_cap(uapi.KVM_CAP_X86_DISABLE_EXITS, 0xF)
            got = True
        except KvmError as e:
            assert e.errno == errno.EINVAL, f"{kernel}: expected EINVAL, saw {e}"
            got = False
        assert got is taken, f"{kernel}: disabling exits 0xF taken {got}, expected {taken}"
        if taken:
            from kvmscope.model.vm import ModelVm

            assert isinstance(vm, ModelVm) and vm.disabled_exits == disabled, f"{kernel}: MWAIT should be ignored"

