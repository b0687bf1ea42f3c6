"""CPUID on both backends: what KVM_SET_CPUID2 stores on this host, and the after-run rule (cpuid_test)."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from kvmscope import guest
from kvmscope.api import CpuidEntry, HltExit, System, Vcpu, Vm, find_cpuid
from kvmscope.errors import KvmError

CR4_OSXSAVE, CR4_PKE = 1 << 18, 1 << 22


def ran_with(kvm: System, entries: list[CpuidEntry]) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(entries)
    assert isinstance(guest.run_to_hlt(vm, vcpu), HltExit)
    return vm, vcpu


def einval(vcpu: Vcpu, entries: list[CpuidEntry], what: str) -> None:
    with pytest.raises(KvmError) as info:
        vcpu.set_cpuid(entries)
    assert info.value.errno == errno.EINVAL, f"KVM_SET_CPUID2 after KVM_RUN with {what}: expected EINVAL, saw {info.value}"


def test_supported_cpuid_is_rewritten_as_on_this_host(kvm: System) -> None:
    supported = kvm.get_supported_cpuid()
    assert len(supported) == 75
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.get_cpuid() == [], "a fresh vCPU has no CPUID"
        vcpu.set_cpuid(supported)
        got = vcpu.get_cpuid()
    assert [e.key for e in got] == [e.key for e in supported], "same entries, same order"
    leaf1, leaf7 = find_cpuid(got, 1), find_cpuid(got, 7, 0)
    assert leaf1 and (leaf1.ecx, leaf1.edx) == (0xF7F83203, 0x178BFBFF), leaf1
    assert leaf7 and (leaf7.ebx, leaf7.ecx, leaf7.edx) == (0xF1BF03AB, 0x5F46, 0x10), (
        f"PVM replaces leaf 7.0 (ARCH_CAPABILITIES bit 29 of EDX disappears): {leaf7}")


def test_leaf_1_brings_xsave_leaves_and_leaf_7_depends_on_them(kvm: System) -> None:
    supported = kvm.get_supported_cpuid()
    leaf1, leaf7 = find_cpuid(supported, 1), find_cpuid(supported, 7, 0)
    assert leaf1 and leaf7
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([leaf7, leaf1])
        got = vcpu.get_cpuid()
        assert [e.key for e in got] == [(7, 0), (1, 0), (0xD, 0), (0xD, 1), (0xD, 2), (0xD, 5), (0xD, 6), (0xD, 7)]
        assert got[0].ebx == 0xF1BF03AB
        vcpu.set_cpuid([leaf7])
        assert vcpu.get_cpuid()[0].ebx == 0x219C038B, "leaf 7.0 without leaf 0xD.0 in the list"


XSAVE_LEAVES = [(0xD, 0), (0xD, 1), (0xD, 2), (0xD, 5), (0xD, 6), (0xD, 7)]


@pytest.mark.parametrize(("keep", "appended"), [
    ([(1, 0), (0xD, 1)], True), ([(1, 0), (0xD, 2), (0xD, 7)], True), ([(1, 0), (0xD, 0)], False),
    ([(0xD, 1)], False), ([(7, 0)], False)])
def test_leaf_1_without_leaf_0xd_0_brings_every_xsave_leaf(kvm: System, keep: list[tuple[int, int]],
                                                          appended: bool) -> None:
    """PVM appends all of 0xD.0, 1, 2, 5, 6, 7 when the list has leaf 1 and not 0xD.0, those already listed too,
    which then appear twice; with 0xD.0 listed, or without leaf 1, nothing. (The values of a second copy are
    ``test_a_second_appended_copy_keeps_the_appended_values``'.)"""
    supported = kvm.get_supported_cpuid()
    by_key = {e.key: e for e in supported}
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([by_key[k] for k in keep])
        got = [e.key for e in vcpu.get_cpuid()]
        expected = keep + (XSAVE_LEAVES if appended else [])
        assert got == expected, f"KVM_SET_CPUID2 of {keep}: expected {expected}, saw {got}"


def test_a_second_appended_copy_keeps_the_appended_values(kvm: System) -> None:
    # Leaf 1 and 0xD.1 without 0xD.0: the appended 0xD.1 follows the given one, so the rewrite (which edits the entry
    # kvm_find_cpuid_entry_index finds, the first) leaves it as PVM appends it: the host CPU's 0xD.1 here (XSAVEOPT,
    # XSAVEC, XGETBV1, XSAVES; 0x9A8 bytes; XSS bits 11-12), where the given one is rewritten.
    by_key = {e.key: e for e in kvm.get_supported_cpuid()}
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([by_key[1, 0], by_key[0xD, 1]])
        copies = [e for e in vcpu.get_cpuid() if e.key == (0xD, 1)]
    raw = CpuidEntry(0xD, 1, 1, eax=0xF, ebx=0x9A8, ecx=0x1800)
    assert len(copies) == 2 and copies[1] == raw and copies[0] != raw, (
        f"expected the given 0xD.1 rewritten and the appended one {raw}, saw {copies}")


@pytest.mark.parametrize(
    "entries",
    [[], [CpuidEntry(0x12345678, 5, 0xFF, 1, 2, 3, 4)], [CpuidEntry(0), CpuidEntry(0)],
     [CpuidEntry(0x40000100 + i) for i in range(256)]],
    ids=["empty", "arbitrary", "duplicate", "256"],
)
def test_any_list_before_a_run(kvm: System, entries: list[CpuidEntry]) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(entries)
        assert vcpu.get_cpuid() == entries


def test_set_cpuid_limits_and_checks(kvm: System) -> None:
    supported = kvm.get_supported_cpuid()
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(KvmError) as info:
            vcpu.set_cpuid([CpuidEntry(0x40000100 + i) for i in range(257)])
        assert info.value.errno == errno.E2BIG
        amx = [replace(e, eax=e.eax | 1 << 18) if e.key == (0xD, 0) else e for e in supported]
        with pytest.raises(KvmError) as info:
            vcpu.set_cpuid(amx)
        assert info.value.errno == errno.EPERM, "XTILE_DATA in 0xD.0 without guest permission (kvm_check_cpuid)"
        bad_va = [replace(e, eax=(e.eax & ~0xFF00) | 40 << 8) if e.function == 0x80000008 else e for e in supported]
        with pytest.raises(KvmError) as info:
            vcpu.set_cpuid(bad_va)
        assert info.value.errno == errno.EINVAL, "virtual address width 40 (kvm_check_cpuid wants 48 or 57)"
        vcpu.set_cpuid(supported)
        with pytest.raises(KvmError) as info:
            vcpu.get_cpuid(max_entries=74)
        assert info.value.errno == errno.E2BIG


def test_runtime_bits_follow_sregs(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        sregs = vcpu.get_sregs()
        sregs.cr4 |= CR4_OSXSAVE | CR4_PKE
        vcpu.set_sregs(sregs)
        got = vcpu.get_cpuid()
        leaf1, leaf7 = find_cpuid(got, 1), find_cpuid(got, 7, 0)
        assert leaf1 and leaf1.ecx >> 27 & 1, "CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE"
        assert leaf7 and leaf7.ecx >> 4 & 1, "CPUID.7.0:ECX.OSPKE follows CR4.PKE"
        sregs.apic_base &= ~(1 << 11)
        vcpu.set_sregs(sregs)
        leaf1 = find_cpuid(vcpu.get_cpuid(), 1)
        assert leaf1 and not leaf1.edx >> 9 & 1, "CPUID.1:EDX.APIC follows APIC_BASE.EN"


def test_the_vendor_rewrite_edits_the_entry_kvms_lookup_finds(kvm: System) -> None:
    # kvm_find_cpuid_entry_index: the first entry of the function whose index matches or that has no
    # KVM_CPUID_FLAG_SIGNIFCANT_INDEX. On this PVM host KVM_SET_CPUID2 rewrites leaf 1; on upstream VMX/SVM nothing.
    supported = kvm.get_supported_cpuid()
    at = next(i for i, e in enumerate(supported) if e.key == (1, 0))
    given = supported[at]

    def stored(entries: list[CpuidEntry], key: tuple[int, int]) -> list[CpuidEntry]:
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(entries)
            return [e for e in vcpu.get_cpuid() if e.key == key]

    [alone] = stored(supported, (1, 0))
    twice = stored([*supported[:at], given, *supported[at:]], (1, 0))
    assert twice == [alone, given], f"leaf 1 twice: expected the first as it is alone {alone}, the second as given " \
                                    f"{given}; saw {twice}"
    indexed = stored([*supported[:at], replace(given, index=1), *supported[at + 1:]], (1, 1))
    assert indexed == [replace(alone, index=1)], f"leaf 1 given index 1 (no flag) is still leaf 1: saw {indexed}"


def _xsave_size(supported: list[CpuidEntry], xcr0: int) -> int:
    """The standard-format XSAVE size of ``xcr0``'s components: the legacy area and header, then each component's end
    (0xD.i: EBX its offset, EAX its size)."""
    ends = [e.ebx + e.eax for e in supported if e.function == 0xD and e.index >= 2 and xcr0 >> e.index & 1]
    return max([512 + 64, *ends])


def test_xsave_sizes_follow_xcr0(kvm: System) -> None:
    # __kvm_set_xcr updates the runtime CPUID when XCR0's extended bits change (6.12.118 x86.c:1109-1112): 0xD.0 EBX is
    # the size XSAVE needs for XCR0 now, and 0xD.1 EBX (with XSAVEC or XSAVES) the compacted one.
    supported = kvm.get_supported_cpuid()
    leaf = find_cpuid(supported, 0xD, 0)
    assert leaf is not None, "the supported CPUID has leaf 0xD"
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)
        for xcr0 in (0x7, 0x3, leaf.eax & 0x7 | 1, leaf.eax | leaf.edx << 32, 0x1):
            xcrs = vcpu.get_xcrs()
            xcrs.xcrs[0].value = xcr0
            vcpu.set_xcrs(xcrs)
            d0 = find_cpuid(vcpu.get_cpuid(), 0xD, 0)
            want = _xsave_size(supported, xcr0)
            assert d0 is not None and d0.ebx == want, (
                f"XCR0 {xcr0:#x}: expected CPUID 0xD.0 EBX {want:#x}, saw {d0}")


def test_after_run_only_what_the_kernel_stored(kvm: System) -> None:
    supported = kvm.get_supported_cpuid()
    vm, vcpu = ran_with(kvm, supported)
    with vm:
        stored = vcpu.get_cpuid()
        vcpu.set_cpuid(stored)  # cpuid_test: re-setting the unmodified CPUID succeeds
        einval(vcpu, supported, "the list originally passed (PVM rewrote it)")
        leaf7 = [replace(e, ebx=e.ebx - 1) if e.key == (7, 0) else e for e in stored]
        einval(vcpu, leaf7, "CPUID.7.0:EBX decremented")
        maxphy = [replace(e, eax=e.eax - 1) if e.function == 0x80000008 else e for e in stored]
        einval(vcpu, maxphy, "MAXPHYADDR decremented")
        einval(vcpu, stored[:-1], "one entry fewer")
        einval(vcpu, [stored[1], stored[0], *stored[2:]], "two entries swapped")
        einval(vcpu, [replace(stored[0], flags=stored[0].flags ^ 1), *stored[1:]], "a flag changed")
        einval(vcpu, [], "nent 0")
        osxsave = [replace(e, ecx=e.ecx ^ 1 << 27) if e.key == (1, 0) else e for e in stored]
        vcpu.set_cpuid(osxsave)  # a runtime bit is recomputed before the comparison
        # cpuid_test: dirty the dynamic bits through KVM_SET_SREGS, then re-set the unmodified CPUID.
        sregs = vcpu.get_sregs()
        sregs.cr4 |= CR4_OSXSAVE | CR4_PKE
        vcpu.set_sregs(sregs)
        vcpu.set_cpuid(stored)
        vcpu.set_cpuid(vcpu.get_cpuid())


def test_a_flagless_xsave_leaf_is_the_kernels_or_a_model_limitation(kvm: System) -> None:
    from kvmscope.model import ModelLimitation

    entries = [replace(e, flags=0) if e.key == (0xD, 1) else e for e in kvm.get_supported_cpuid()]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid(entries)
        except ModelLimitation:
            assert kvm.backend == "model", "only the model may refuse"
        else:
            assert kvm.backend == "linux", "the model should say it does not reproduce PVM's rewrite of this list"
