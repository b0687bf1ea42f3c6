"""KVM_SET_SREGS and CR4 on both backends: which bits the kernel refuses (``kvm_is_valid_cr4``; ``model/cr4.py``),
under every kind of guest CPUID, and that a refusal changes nothing."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Sequence

import pytest

from kvmscope import uapi
from kvmscope.api import CpuidEntry, System, Vcpu
from kvmscope.errors import KvmError

# What this machine's PVM takes, whatever the guest's CPUID: VME through OSXMMEXCPT and UMIP (0-11), FSGSBASE (16),
# OSXSAVE (18), SMEP, SMAP, PKE (20-22). Not LA57, VMXE, SMXE, PCIDE, KL, CET, PKS, LAM_SUP, nor any bit above.
PVM_ACCEPTED = 0x750FFF


def every_feature(supported: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """The supported CPUID with every bit of leaves 1 and 7 set: features KVM does not offer, too."""
    return [dataclasses.replace(e, ecx=0xFFFFFFFF, edx=0xFFFFFFFF, **({"eax": 0xFFFFFFFF, "ebx": 0xFFFFFFFF}
                                                                     if e.function == 7 else {}))
            if e.function in (1, 7) else e for e in supported]


def accepted_bits(vcpu: Vcpu) -> int:
    """Each of CR4's 64 bits set alone over the vCPU's CR4: the bits KVM_SET_SREGS takes. A refused call must leave
    the registers as they were."""
    base = vcpu.get_sregs()
    accepted = 0
    for bit in range(64):
        sregs = uapi.kvm_sregs.from_buffer_copy(base)
        sregs.cr4 |= 1 << bit
        try:
            vcpu.set_sregs(sregs)
        except KvmError as e:
            assert e.errno == errno.EINVAL, f"CR4 bit {bit}: expected EINVAL or success, saw {e}"
            after = vcpu.get_sregs()
            assert bytes(after) == bytes(base), f"CR4 bit {bit}: refused, yet KVM_GET_SREGS changed"
            continue
        accepted |= 1 << bit
        assert vcpu.get_sregs().cr4 == sregs.cr4, f"CR4 bit {bit}: taken, expected to read back {sregs.cr4:#x}"
        vcpu.set_sregs(base)
    return accepted


@pytest.mark.parametrize("cpuid", ["none", "empty", "supported", "every feature"])
def test_cr4_bits_kvm_set_sregs_takes(kvm: System, cpuid: str) -> None:
    supported = kvm.get_supported_cpuid()
    entries = {"none": None, "empty": [], "supported": supported, "every feature": every_feature(supported)}[cpuid]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        if entries is not None:
            vcpu.set_cpuid(entries)
        got = accepted_bits(vcpu)
    assert got == PVM_ACCEPTED, (f"guest CPUID {cpuid}: expected KVM_SET_SREGS to take CR4 bits {PVM_ACCEPTED:#x}, "
                                 f"it took {got:#x} (differing: {got ^ PVM_ACCEPTED:#x})")


def test_cr4_bits_together_and_in_long_mode(kvm: System) -> None:
    """Every accepted bit at once is taken; one refused bit beside them refuses the whole call."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        sregs = vcpu.get_sregs()
        sregs.cr4 = PVM_ACCEPTED
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cr4 == PVM_ACCEPTED, "every accepted CR4 bit at once"
        for bit in (12, 13, 17, 63):
            sregs.cr4 = PVM_ACCEPTED | 1 << bit
            try:
                vcpu.set_sregs(sregs)
                got = "success"
            except KvmError as e:
                got = errno.errorcode[e.errno]
            assert got == "EINVAL", f"CR4 bit {bit} beside every accepted bit: expected EINVAL, saw {got}"
        assert vcpu.get_sregs().cr4 == PVM_ACCEPTED, "the refused calls left CR4 as it was"
        sregs = vcpu.get_sregs()  # long mode: PG, PE and PAE with EFER.LME and LMA, every accepted CR4 bit
        sregs.cr0, sregs.efer, sregs.cr3, sregs.cs.l = 0x80050033, 0x500, 0x1000, 1
        vcpu.set_sregs(sregs)
        got = vcpu.get_sregs()
        assert (got.cr4, got.cr0, got.efer) == (PVM_ACCEPTED, 0x80050033, 0x500), \
            f"long mode with every accepted CR4 bit: read back CR4 {got.cr4:#x}, CR0 {got.cr0:#x}, EFER {got.efer:#x}"
        sregs.cr4 |= 1 << 12  # LA57 in long mode: refused as outside it
        with pytest.raises(KvmError) as refused:
            vcpu.set_sregs(sregs)
        assert refused.value.errno == errno.EINVAL, f"LA57 in long mode: expected EINVAL, saw {refused.value}"
