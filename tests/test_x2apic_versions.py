"""The x2APIC MSRs' rules that changed between the kernels the model knows (``rulesets``: X2APIC_*), on the model.

The live kernel here shows the 6.18 side of each (tests/conformance/test_conf_x2apic.py); the other side is read from
the kernel source at that version (5.10.13, 6.1.192 and 6.12.118 lapic.c) and the commits the rules name.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kvmscope import uapi
from kvmscope.api import MsrBatch, Vcpu
from kvmscope.errors import KvmError
from kvmscope.kernel import rulesets as R
from kvmscope.model import open_model

VCPU_ID = 3


@contextmanager
def x2apic_vcpu(kernel: str, profile: str = "intel-spr", page: dict[int, int] | None = None,
                x2apic: bool = True) -> Iterator[Vcpu]:
    """vCPU 3 of a VM with an in-kernel irqchip, CPUID set, the given page words (KVM_SET_LAPIC in xAPIC mode,
    SPIV software-enabled unless given), then in x2APIC mode."""
    with open_model(kernel, profile) as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(VCPU_ID)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        set_words(vcpu, {0xF0: 0x1FF, **(page or {})})
        if x2apic:
            assert vcpu.set_msrs({0x1B: vcpu.read_msr(0x1B) | 0x400}) == 1, "into x2APIC mode"
        yield vcpu


def set_words(vcpu: Vcpu, words: dict[int, int]) -> None:
    raw = bytearray(bytes(vcpu.get_lapic()))
    for offset, value in words.items():
        struct.pack_into("<I", raw, offset, value)
    vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))


def word(vcpu: Vcpu, offset: int) -> int:
    return int(struct.unpack_from("<I", bytes(vcpu.get_lapic()), offset)[0])


def read(vcpu: Vcpu, index: int) -> int | None:
    batch = MsrBatch([index])
    return batch[0][1] if vcpu.get_msrs(batch) else None


@pytest.mark.parametrize(("kernel", "profile", "high_at_304"), [
    ("5.17", "intel-spr", False), ("5.18", "intel-spr", True), ("6.18", "intel-spr", True),
    ("5.18", "amd-epyc", True), ("6.11", "amd-epyc", True), ("6.12", "amd-epyc", False), ("6.1", "amd-epyc", True),
    ("6.1.149", "amd-epyc", False), ("6.6.78", "amd-epyc", False), ("6.6", "amd-epyc", True),
])
def test_icr_high_half_by_version_and_vendor(kernel: str, profile: str, high_at_304: bool) -> None:
    """X2APIC_ICR_64BIT (5.18) and X2APIC_ICR_SPLIT_SVM (6.12; 6.1.149, 6.6.78): where an x2APIC ICR write keeps its
    destination, and so what it reads back after x2APIC mode is entered over an xAPIC ICR2."""
    with x2apic_vcpu(kernel, profile, {0x300: 0x4030, 0x304: 0xAABBCCDD, 0x310: 0x05000000}) as vcpu:
        before = read(vcpu, 0x830)
        expected = 0xAABBCCDD_00004030 if high_at_304 else 0x05000000_00004030
        assert before == expected, f"{kernel} {profile}: ICR read {before:#x}, expected {expected:#x}"
        assert vcpu.set_msrs({0x830: 0x7_00000030}) == 1
        at_304, at_310 = word(vcpu, 0x304), word(vcpu, 0x310)
        assert (at_304, at_310) == ((7, 7) if high_at_304 else (0xAABBCCDD, 7)), \
            f"{kernel} {profile}: after an ICR write of 0x7_00000030, 0x304 {at_304:#x} and ICR2 {at_310:#x}"
        assert read(vcpu, 0x830) == 0x7_00000030


@pytest.mark.parametrize(("kernel", "refused"), [("6.11", False), ("6.12", True), ("6.1", False), ("6.1.113", True)])
def test_icr_reserved_bits_by_version(kernel: str, refused: bool) -> None:
    """X2APIC_ICR_RESERVED (6.12; 6.1.113): bit 13 of an x2APIC ICR write."""
    with x2apic_vcpu(kernel) as vcpu:
        done = vcpu.set_msrs({0x830: 0x2031})
        assert done == (0 if refused else 1), f"{kernel}: an ICR write with bit 13 gave {done}"
        if not refused:
            assert read(vcpu, 0x830) == 0x2031, "stored as written, BUSY aside"


@pytest.mark.parametrize(("kernel", "refused"), [("6.2", False), ("6.3", True), ("6.1", False), ("6.1.16", True)])
def test_bits_63_32_of_a_register_by_version(kernel: str, refused: bool) -> None:
    """X2APIC_HIGH_BITS (6.3; 6.1.16): a TPR write with bit 32 set is refused, or taken as its low half."""
    with x2apic_vcpu(kernel) as vcpu:
        done = vcpu.set_msrs({0x808: 0x1_00000020})
        assert (done, read(vcpu, 0x808)) == ((0, 0) if refused else (1, 0x20)), f"{kernel}: TPR write gave {done}"


@pytest.mark.parametrize(("kernel", "refused"), [("6.2", False), ("6.3", True)])
def test_self_ipi_reserved_bits_by_version(kernel: str, refused: bool) -> None:
    """X2APIC_SELF_IPI_VECTOR (6.3): SELF_IPI 0x131 is refused, or vector 0x31 delivered."""
    with x2apic_vcpu(kernel) as vcpu:
        done = vcpu.set_msrs({0x83F: 0x131})
        irr1 = word(vcpu, 0x210)
        assert (done, irr1) == ((0, 0) if refused else (1, 1 << 17)), f"{kernel}: count {done}, IRR1 {irr1:#x}"


@pytest.mark.parametrize(("kernel", "icr"), [("5.17", 0x40031), ("5.17.7", 0), ("5.18", 0), ("5.10.115", 0)])
def test_self_ipi_and_the_icr_by_version(kernel: str, icr: int) -> None:
    """X2APIC_SELF_IPI_KEEPS_ICR (5.18; 5.10.115, 5.15.39, 5.17.7): before, a SELF_IPI write was an ICR write."""
    with x2apic_vcpu(kernel) as vcpu:
        assert vcpu.set_msrs({0x83F: 0x31}) == 1
        assert (read(vcpu, 0x830), word(vcpu, 0x210)) == (icr, 1 << 17), f"{kernel}: ICR after SELF_IPI"


@pytest.mark.parametrize(("kernel", "xapic_id"), [("6.2", VCPU_ID), ("6.3", VCPU_ID << 24)])
def test_leaving_x2apic_mode_by_version(kernel: str, xapic_id: int) -> None:
    """X2APIC_LEAVE_SETS_XAPIC_ID (6.3): back in xAPIC mode, the ID register holds the xAPIC ID again, or keeps the
    x2APIC one; the LDR keeps its x2APIC value in both."""
    with x2apic_vcpu(kernel) as vcpu:
        assert vcpu.set_msrs({0x1B: vcpu.read_msr(0x1B) & ~0x400}) == 1, "back to xAPIC mode"
        assert (word(vcpu, 0x20), word(vcpu, 0xD0)) == (xapic_id, 0x8), f"{kernel}: ID and LDR in xAPIC mode"


@pytest.mark.parametrize(("kernel", "x2apic_id"), [("6.10", 5), ("6.11", VCPU_ID), ("6.10.13", VCPU_ID),
                                                   ("6.1", 5), ("6.6.78", VCPU_ID)])
def test_set_lapic_id_in_x2apic_mode_by_version(kernel: str, x2apic_id: int) -> None:
    """X2APIC_ID_READONLY (6.11; 6.6.78, 6.10.13): KVM_SET_LAPIC's ID in x2APIC mode, shifted right 24, became the
    x2APIC ID the ID register and 0x802 show, with its LDR; physical IPIs went by the vCPU id all along (6.1.192
    lapic.c:146-149, 855-856); from 6.11 the vCPU id stays."""
    with x2apic_vcpu(kernel) as vcpu:
        set_words(vcpu, {0x20: 5 << 24})
        ldr = (x2apic_id >> 4) << 16 | 1 << (x2apic_id & 0xF)
        assert (read(vcpu, 0x802), read(vcpu, 0x80D), word(vcpu, 0x20)) == (x2apic_id, ldr, x2apic_id << 24), kernel
        assert vcpu.set_msrs({0x830: 5 << 32 | 0x31, 0x83F: 0x32}) == 2
        assert word(vcpu, 0x210) == 1 << 18, f"{kernel}: a fixed IPI to ID 5 missed the vCPU (interrupts go by its id)"
        assert vcpu.set_msrs({0x830: VCPU_ID << 32 | 0x33}) == 1
        assert word(vcpu, 0x210) == 3 << 18, f"{kernel}: a fixed IPI to its vCPU id reached it"


def test_every_x2apic_rule_is_known() -> None:
    names = {"X2APIC_ICR_64BIT", "X2APIC_ICR_SPLIT_SVM", "X2APIC_ICR_RESERVED", "X2APIC_HIGH_BITS",
             "X2APIC_SELF_IPI_VECTOR", "X2APIC_SELF_IPI_KEEPS_ICR", "X2APIC_LEAVE_SETS_XAPIC_ID", "X2APIC_ID_READONLY"}
    assert {getattr(R, n) for n in names} <= set(R.RULES.values()), "each x2APIC rule is in the rule table"


def test_cmci_adds_an_lvt() -> None:
    """kvm_apic_after_set_mcg_cap (6.12.118 lapic.c:607-623; CMCI_P from 6.0, 281b52780b57): KVM_X86_SETUP_MCE with
    CMCI_P gives the APIC a seventh LVT, masked, counted in the LVR; x2APIC MSR 0x82F then reads and writes it."""
    with x2apic_vcpu("6.18") as vcpu:
        assert (word(vcpu, 0x30), read(vcpu, 0x82F)) == (0x50014, None), "six LVTs, no LVTCMCI"
        vcpu.setup_mce(1 << 10 | 1)
        assert (word(vcpu, 0x30), word(vcpu, 0x2F0), read(vcpu, 0x82F)) == (0x60014, 0x10000, 0x10000)
        assert vcpu.set_msrs({0x82F: 0xFFFFFFFF}) == 1 and word(vcpu, 0x2F0) == 0x117FF, "LVTCMCI keeps 0x117FF"
        assert vcpu.set_msrs({0x80F: 0xFF}) == 1 and word(vcpu, 0x2F0) == 0x117FF, "masked with the others"


@pytest.mark.parametrize(("kernel", "left"), [("6.1", 0xDEAD), ("6.11", 0xDEAD), ("6.12", 0), ("6.18", 0)])
def test_a_refused_read_keeps_userspaces_value_before_6_12(kernel: str, left: int) -> None:
    """REFUSED_READ_ZEROED (6.12, 1cec2034980a): the entry KVM_GET_MSRS stops at. A handler's refusal (an x2APIC MSR
    without an in-kernel LAPIC returns 1) left userspace's value before 6.12; a refusal as unsupported (an unknown
    MSR) zeroes it at every version (6.1.192 x86.c:1945-1963)."""
    with open_model(kernel, "intel-spr") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        refused = MsrBatch([(0x174, 1), (0x808, 0xDEAD), (0x175, 7)])
        assert vcpu.get_msrs(refused) == 1
        assert [value for _, value in refused] == [0, left, 7], f"{kernel}: {list(refused)}"
        unknown = MsrBatch([(0x12345678, 0xBEEF)])
        assert (vcpu.get_msrs(unknown), unknown[0][1]) == (0, 0), f"{kernel}: an unknown MSR's entry is zeroed"


@pytest.mark.parametrize(("kernel", "flags"), [("6.12", 0x3), ("6.18", 0x3), ("6.18.16", 0x3), ("6.18.17", 0xF),
                                               ("6.18.44", 0xF)])
def test_suppress_eoi_broadcast_flags_by_version(kernel: str, flags: int) -> None:
    """X2APIC_SUPPRESS_EOI_FLAGS (6517dfbcc918, stable 6.18.17): KVM_CAP_X2APIC_API reports bits 2-3, and takes
    DISABLE (bit 3), from 6.18.17 in the 6.18 series; before, bits 0-1 only, and bit 3 is EINVAL (6.12.118
    x86.c:6111-6122). The host here (6.18.44) shows the newer side: tests/conformance/test_conf_x2apic.py."""
    with open_model(kernel, "pvm-6.18") as kvm, kvm.create_vm() as vm:
        assert kvm.check_extension(uapi.KVM_CAP_X2APIC_API) == flags, f"{kernel}: the host's report"
        assert vm.check_extension(uapi.KVM_CAP_X2APIC_API) == flags & ~4, f"{kernel}: a VM's, without a split IRQCHIP"
        if flags & 8:
            vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST)
            assert vm.suppress_eoi_broadcast == "disabled"  # type: ignore[attr-defined]
        else:
            with pytest.raises(KvmError) as refused:
                vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST)
            assert refused.value.errno == errno.EINVAL, f"{kernel}: DISABLE before the flags: {refused.value}"


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc", "pvm-6.18"])
def test_a_vm_never_reports_enable_suppress_eoi(profile: str) -> None:
    """A model VM has no split IRQCHIP, so its KVM_CAP_X2APIC_API leaves ENABLE (bit 2) out on every profile, as
    kvm_vm_ioctl_check_extension does for a VM without one (6.18.17's patch), while the host reports it."""
    with open_model("6.18.44", profile) as kvm, kvm.create_vm() as vm:
        assert (kvm.check_extension(uapi.KVM_CAP_X2APIC_API), vm.check_extension(uapi.KVM_CAP_X2APIC_API)) == (
            0xF, 0xB), f"{profile}: host and VM reports"
