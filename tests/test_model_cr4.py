"""CR4 on KVM_SET_SREGS in the model, for the hosts this machine cannot show (upstream VMX and SVM, each kernel
version): the bits KVM knows, the host's features (the supported CPUID), the guest's (after KVM_SET_CPUID2). The
kernel source is the oracle (6.1.192 and 6.12.118 kvm_host.h CR4_RESERVED_BITS, x86.h ``__cr4_reserved_bits``,
x86.c ``__kvm_is_valid_cr4``, cpuid.c ``kvm_vcpu_after_set_cpuid``); the live kernel's own rule is in
``tests/conformance/test_conf_cr4.py``."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence

import pytest

from kvmscope import guest, uapi
from kvmscope.api import CpuidEntry, Vcpu
from kvmscope.capture import cr4_accepted
from kvmscope.errors import KvmError
from kvmscope.kernel import rulesets
from kvmscope.kernel.profile import Profile, load
from kvmscope.model import open_model

OSXSAVE, SMEP, SMAP, FSGSBASE, PKE, LA57, UMIP, VMXE, PCIDE = (1 << b for b in (18, 20, 21, 16, 22, 12, 11, 13, 17))
CET, LAM_SUP = 1 << 23, 1 << 28
NEVER = 1 << 14 | 1 << 15 | 1 << 19 | 1 << 24 | 1 << 25 | 1 << 26 | 1 << 27 | ((1 << 64) - (1 << 29))  # SMXE, KL, PKS..
# Each feature-gated bit and one CPUID bit that opens it (CET: SHSTK).
FEATURES = {OSXSAVE: (1, 0, "ecx", 26), SMEP: (7, 0, "ebx", 7), SMAP: (7, 0, "ebx", 20), FSGSBASE: (7, 0, "ebx", 0),
            PKE: (7, 0, "ecx", 3), LA57: (7, 0, "ecx", 16), UMIP: (7, 0, "ecx", 2), VMXE: (1, 0, "ecx", 5),
            PCIDE: (1, 0, "ecx", 17), CET: (7, 0, "ecx", 7), LAM_SUP: (7, 1, "eax", 26)}
IBT = (7, 0, "edx", 20)
VERSIONS = ["5.10", "5.10.137", "6.1", "6.6", "6.8", "6.12", "6.14", "6.18"]


def has(entries: Sequence[CpuidEntry], feature: tuple[int, int, str, int]) -> bool:
    function, index, register, bit = feature
    return any(e.function == function and e.index == index and getattr(e, register) >> bit & 1 for e in entries)


def without(entries: Sequence[CpuidEntry], feature: tuple[int, int, str, int]) -> list[CpuidEntry]:
    function, index, register, bit = feature
    return [dataclasses.replace(e, **{register: getattr(e, register) & ~(1 << bit)})
            if (e.function, e.index) == (function, index) else e for e in entries]


def takes(vcpu: Vcpu, cr4: int) -> bool:
    sregs = vcpu.get_sregs()
    sregs.cr4 = cr4
    try:
        vcpu.set_sregs(sregs)
    except KvmError as e:
        assert e.errno == errno.EINVAL, f"CR4 {cr4:#x}: expected EINVAL or success, saw {e}"
        return False
    return True


def version_at_least(version: str, least: tuple[int, ...]) -> bool:
    return tuple(map(int, version.split("."))) >= least


def with_cpuid(profile: Profile, change: Callable[[CpuidEntry], CpuidEntry]) -> Profile:
    return dataclasses.replace(profile, supported_cpuid=[change(e) for e in profile.supported_cpuid])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["intel-spr", "amd-epyc"])
def test_host_part_follows_known_bits_and_supported_cpuid(name: str, version: str) -> None:
    """With the supported CPUID set (the guest has what the host has), a gated bit is taken exactly when the supported
    CPUID has its feature and the version knows the bit; SMXE, KL, PKS and bits 25-27, 29-63 never."""
    with open_model(profile=name, kernel=version) as kvm, kvm.create_vm() as vm:
        supported = kvm.get_supported_cpuid()
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)
        for bit, feature in FEATURES.items():
            known = {CET: version_at_least(version, (6, 18)), LAM_SUP: version_at_least(version, (6, 8))}.get(bit, True)
            expected = known and (has(supported, feature) or bit == CET and has(supported, IBT))
            assert takes(vcpu, bit) == expected, (f"{name} {version}: CR4 {bit:#x} with the host's feature "
                                                   f"{'present' if has(supported, feature) else 'absent'}: expected "
                                                   f"{'taken' if expected else 'EINVAL'}")
        for b in range(64):
            if NEVER >> b & 1:
                assert not takes(vcpu, 1 << b), f"{name} {version}: CR4 bit {b} is never a bit KVM knows"
        assert takes(vcpu, 0x7FF), f"{name} {version}: VME through OSXMMEXCPT are always taken"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["intel-spr", "amd-epyc"])
def test_a_new_vcpu_reserves_by_its_cpuid_from_6_14(name: str, version: str) -> None:
    """Until 6.14 a vCPU never given KVM_SET_CPUID2 reserves nothing for the guest's sake: it takes what the host
    takes. From 6.14 (85e5ba83c016) its empty CPUID reserves every gated bit at creation: only bits 0-10."""
    with open_model(profile=name, kernel=version) as kvm, kvm.create_vm() as vm:
        host = vm.create_vcpu(0)
        host.set_cpuid(kvm.get_supported_cpuid())
        fresh = vm.create_vcpu(1)
        for bit in FEATURES:
            if bit == VMXE and not rulesets.resolve(version).has(rulesets.CR4_VENDOR_HOOK):
                continue  # VMXE without VMX in the guest's CPUID, dropped in silence: the next test
            expected = takes(host, bit) and not version_at_least(version, (6, 14))
            assert takes(fresh, bit) == expected, (f"{name} {version}: CR4 {bit:#x} on a vCPU never given CPUID: "
                                                   f"expected {'taken' if expected else 'EINVAL'}")


@pytest.mark.parametrize(("version", "outcome"), [("5.10", "dropped"), ("5.10.136", "dropped"), ("5.10.137", "taken"),
                                                  ("6.1", "taken"), ("6.18", "EINVAL")])
def test_vmxe_without_vmx_in_the_guests_cpuid(version: str, outcome: str) -> None:
    """On VMX with nested VMX, a vCPU never given CPUID: before 5.11 (and 5.10.137) vmx_set_cr4 refused VMXE and
    KVM_SET_SREGS ignored that, taking the other registers and keeping the old CR4 (5.10.13 __set_sregs); then
    the masks alone decide (the guest reserves nothing yet), until 6.14 reserves it at creation."""
    with open_model(profile="intel-spr", kernel=version) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cr4, sregs.cr2 = VMXE, 0x1234
        try:
            vcpu.set_sregs(sregs)
        except KvmError as e:
            got = errno.errorcode[e.errno]
        else:
            after = vcpu.get_sregs()
            assert after.cr2 == 0x1234, f"{version}: the other registers are taken"
            got = "taken" if after.cr4 == VMXE else "dropped" if after.cr4 == 0 else f"CR4 {after.cr4:#x}"
        assert got == outcome, f"{version}: CR4.VMXE on a vCPU without CPUID: expected {outcome}, saw {got}"
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        sregs.cr4 = VMXE
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cr4 == VMXE, f"{version}: VMXE with VMX in the guest's CPUID"


@pytest.mark.parametrize(("version", "gated"), [("5.10", False), ("5.10.22", False), ("5.10.23", True), ("5.11", False),
                                                ("5.12", True), ("6.12", True)])
def test_pcide_needs_pcid_from_5_12(version: str, gated: bool) -> None:
    """__cr4_reserved_bits tests PCID from 4683d758f48e (5.12; 5.10.23): before, CR4.PCIDE is taken on a host and
    a guest without PCID."""
    profile = with_cpuid(load("amd-epyc"), lambda e: dataclasses.replace(e, ecx=e.ecx & ~(1 << 17))
                         if e.function == 1 else e)
    with open_model(profile=profile, kernel=version) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert takes(vcpu, PCIDE) == (not gated), f"{version}: CR4.PCIDE without PCID"


@pytest.mark.parametrize("version", ["6.1", "6.12", "6.18"])
@pytest.mark.parametrize("name", ["intel-spr", "amd-epyc"])
def test_guest_cpuid_reserves_its_missing_features(name: str, version: str) -> None:
    """After KVM_SET_CPUID2 a bit whose feature the guest's CPUID lacks is refused (cr4_guest_rsvd_bits); a feature
    the guest has and the host lacks opens nothing."""
    with open_model(profile=name, kernel=version) as kvm, kvm.create_vm() as vm:
        supported = kvm.get_supported_cpuid()
        opened = 0
        for bit, feature in FEATURES.items():
            vcpu = vm.create_vcpu(len(vm.vcpus))
            vcpu.set_cpuid(supported)
            if not takes(vcpu, bit):
                continue  # the host refuses it: the guest cannot open it
            opened += 1
            vcpu.set_cpuid(without(supported, feature) if bit != CET else
                           without(without(supported, feature), (7, 0, "edx", 20)))
            assert not takes(vcpu, bit), f"{name} {version}: CR4 {bit:#x} taken with the guest's feature removed"
        assert opened >= 7, f"{name} {version}: only {opened} gated CR4 bits open with the supported CPUID"
        empty = vm.create_vcpu(len(vm.vcpus))
        empty.set_cpuid([])
        assert not any(takes(empty, bit) for bit in FEATURES), f"{name} {version}: an empty CPUID reserves every gated bit"
        assert takes(empty, 0x7FF), f"{name} {version}: an empty CPUID leaves VME through OSXMMEXCPT"
        if not has(supported, FEATURES[VMXE]):  # AMD: VMX in the guest's CPUID does not open VMXE
            vmx = vm.create_vcpu(len(vm.vcpus))
            vmx.set_cpuid([dataclasses.replace(e, ecx=e.ecx | 1 << 5) if e.function == 1 else e for e in supported])
            assert not takes(vmx, VMXE), f"{name} {version}: VMXE taken with VMX in the guest's CPUID only"


def test_lam_sup_needs_6_8_and_lam() -> None:
    """CR4.LAM_SUP (bit 28) joins the known bits in 6.8, and needs LAM (CPUID.7.1:EAX[26]) in host and guest."""
    base = load("intel-spr")
    lam = dataclasses.replace(base, supported_cpuid=[dataclasses.replace(e, eax=e.eax | 1 << 26)
                                                     if (e.function, e.index) == (7, 1) else e
                                                     for e in base.supported_cpuid])
    assert any((e.function, e.index) == (7, 1) for e in base.supported_cpuid), "intel-spr lists leaf 7.1"
    for version, expected in (("6.6", False), ("6.8", True), ("6.18", True)):
        with open_model(profile=lam, kernel=version) as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            assert takes(vcpu, LAM_SUP) == expected, f"{version}: LAM_SUP with LAM in the supported CPUID"
    with open_model(profile=base, kernel="6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert not takes(vcpu, LAM_SUP), "6.18: LAM_SUP without LAM"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["intel-spr", "amd-epyc"])
def test_a_capture_of_an_upstream_host_measures_the_supported_cpuids_bits(name: str, version: str) -> None:
    """What ``kvmscope probe --save`` records on an upstream host (each bit alone, the supported CPUID set): bits
    0-10 and each gated bit whose feature the supported CPUID has, among those the version knows; nothing else."""
    with open_model(profile=name, kernel=version) as kvm:
        supported = kvm.get_supported_cpuid()
        measured = cr4_accepted(kvm, supported)
    known = {CET: version_at_least(version, (6, 18)), LAM_SUP: version_at_least(version, (6, 8))}
    expected = 0x7FF | sum(bit for bit, feature in FEATURES.items() if known.get(bit, True) and (
        has(supported, feature) or bit == CET and has(supported, IBT)))
    assert measured == expected, f"{name} {version}: measured {measured:#x}, expected {expected:#x}"


def test_a_refused_cr4_changes_nothing() -> None:
    with open_model(profile="intel-spr") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([])
        before = bytes(vcpu.get_sregs())
        sregs = uapi.kvm_sregs.from_buffer_copy(before)
        sregs.cr4, sregs.cr0, sregs.apic_base = SMEP, sregs.cr0 | 1, sregs.apic_base ^ 1 << 11
        with pytest.raises(KvmError, match="CR4 0x100000 refused"):
            vcpu.set_sregs(sregs)
        assert bytes(vcpu.get_sregs()) == before, "a refused CR4 left the registers as they were"


@pytest.mark.parametrize(("shstk", "ibt"), [(True, True), (True, False), (False, True), (False, False)])
def test_cet_needs_shstk_or_ibt(shstk: bool, ibt: bool) -> None:
    """CR4.CET (6.18, b3744c59ebc5) is reserved only when both SHSTK and IBT are missing."""
    def keep(e: CpuidEntry) -> CpuidEntry:
        if (e.function, e.index) != (7, 0):
            return e
        return dataclasses.replace(e, ecx=e.ecx & ~(0 if shstk else 1 << 7), edx=e.edx & ~(0 if ibt else 1 << 20))
    profile = with_cpuid(load("intel-spr"), keep)
    with open_model(profile=profile, kernel="6.18") as kvm, kvm.create_vm() as vm:
        supported = kvm.get_supported_cpuid()
        assert (has(supported, FEATURES[CET]), has(supported, IBT)) == (shstk, ibt), "the profile's CET bits"
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)
        assert takes(vcpu, CET) == (shstk or ibt), f"6.18: CR4.CET with SHSTK {shstk}, IBT {ibt}"


def test_an_upstream_profile_derives_its_host_part_at_each_version() -> None:
    """A set recorded on an upstream host does not stand for the host's part: the supported CPUID decides it at each
    version. A capture of a PCID-less host on 6.18 holds no PCIDE, yet 5.10.0-5.10.22 take CR4.PCIDE there (no PCID
    test yet), and one holding CET changes nothing on 6.12, which does not know CET."""
    base = load("amd-epyc")
    nopcid = with_cpuid(base, lambda e: dataclasses.replace(e, ecx=e.ecx & ~(1 << 17)) if e.function == 1 else e)
    with open_model(profile=nopcid, kernel="6.18") as kvm:
        measured = cr4_accepted(kvm, kvm.get_supported_cpuid())
    assert not measured & PCIDE and measured & CET, f"the 6.18 capture {measured:#x}: no PCIDE, CET"
    recorded = dataclasses.replace(nopcid, cr4_accepted=measured | LAM_SUP)
    for version, pcide in (("5.10", True), ("5.10.23", False), ("6.12", False)):
        for profile in (nopcid, recorded):
            with open_model(profile=profile, kernel=version) as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu(0)
                vcpu.set_cpuid(kvm.get_supported_cpuid())
                assert takes(vcpu, PCIDE) == pcide, f"{version}: CR4.PCIDE on a PCID-less host"
                assert not takes(vcpu, CET) and not takes(vcpu, LAM_SUP), f"{version}: CET and LAM_SUP"


@pytest.mark.parametrize("version", ["6.1", "6.12", "6.18"])
def test_only_a_kvm_set_cpuid2_that_takes_a_new_cpuid_moves_the_guest_part(version: str) -> None:
    """A refused KVM_SET_CPUID2 leaves the guest's CR4 reserved bits as they were, and so does one after KVM_RUN that
    repeats the vCPU's CPUID (kvm_set_cpuid returns before kvm_vcpu_after_set_cpuid)."""
    with open_model(profile="intel-spr", kernel=version) as kvm, kvm.create_vm() as vm:
        supported = kvm.get_supported_cpuid()
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)
        bad = [dataclasses.replace(e, eax=(e.eax & ~0xFF00) | 50 << 8) if e.function == 0x80000008 else e
               for e in without(supported, FEATURES[SMEP])]  # no SMEP, and a virtual-address width of 50: refused
        with pytest.raises(KvmError):
            vcpu.set_cpuid(bad)
        assert takes(vcpu, SMEP), f"{version}: SMEP after a refused KVM_SET_CPUID2 without it"
        fresh = vm.create_vcpu(1)
        guest.run_to_hlt(vm, fresh)
        fresh.set_cpuid([])  # the CPUID it has: taken after the run, and nothing recomputed
        assert takes(fresh, SMEP) == (not version_at_least(version, (6, 14))), \
            f"{version}: SMEP on a vCPU whose only KVM_SET_CPUID2 repeated its empty CPUID after a run"
