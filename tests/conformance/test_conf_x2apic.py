"""The x2APIC MSRs 0x800-0x8FF through KVM_GET_MSRS/KVM_SET_MSRS with an in-kernel LAPIC, on both backends.

Sources: lapic.c of 6.12.118 (``kvm_x2apic_msr_read``/``write`` 3366-3391, ``kvm_lapic_readable_reg_mask``
1634-1669, ``kvm_lapic_reg_write`` 2299-2445, ``kvm_apic_state_fixup`` 3093-3143, ``kvm_lapic_set_base``
2639-2679, ``kvm_apic_send_ipi`` 1530-1552, ``__apic_accept_irq`` 1317-1412); the expected values below were read
against that code and are what the live kernel here returns. The vCPU is number 3, so that its x2APIC ID (3) and
logical ID (cluster 0, bit 3: LDR 0x8) differ from the xAPIC ones.
"""

from __future__ import annotations

import errno
import struct

import pytest

from kvmscope import guest, uapi
from kvmscope.api import MsrBatch, System, Vcpu, Vm
from kvmscope.errors import KvmError
from kvmscope.model import ModelLimitation

VCPU_ID = 3
# The page after x2APIC mode is entered and KVM_SET_LAPIC gives SPIV 0x1FF (software-enabled), TPR 0x10 and vector
# 0x25 in service, as KVM_GET_LAPIC shows it (every non-zero 32-bit word): the ID shows as an xAPIC ID (id << 24),
# the LDR is the x2APIC one, and the PPR is stale (TPR): KVM_SET_LAPIC updates it before it recounts the ISR.
START = {0x20: 0x3000000, 0x30: 0x50014, 0x80: 0x10, 0xA0: 0x10, 0xD0: 0x8, 0xE0: 0xFFFFFFFF, 0xF0: 0x1FF,
         0x110: 0x20, 0x320: 0x10000, 0x330: 0x10000, 0x340: 0x10000, 0x350: 0x10000, 0x360: 0x10000, 0x370: 0x10000}
# Registers an x2APIC read reaches (MSR - 0x800 = offset >> 4): ID, LVR, TPR, PPR, LDR, SPIV, ISR, TMR, IRR, ESR, ICR,
# the six LVTs, TMICT, TMCCT, TDCR. Not ARBPRI, DFR, ICR2 (xAPIC only), EOI, SELF_IPI (write-only), LVTCMCI (no
# CMCI_P here), reserved offsets, 0x840 and up.
READABLE = {0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, *range(0x810, 0x828), 0x828, 0x830, *range(0x832, 0x83A), 0x83E}

# (what, MSR, value written, KVM_SET_MSRS count, the page words that change (offset: new value))
WRITES = [
    ("TPR keeps its low byte; PPR follows", 0x808, 0x1234, 1, {0x80: 0x34, 0xA0: 0x34}),
    ("TPR: bits 63:32 refuse the write", 0x808, 0x1_00000010, 0, {}),
    ("EOI retires vector 0x25", 0x80B, 0, 1, {0x110: 0}),
    ("EOI takes any value", 0x80B, 0x55, 1, {0x110: 0}),
    ("SPIV keeps bits 9:0", 0x80F, 0x3FF, 1, {0xF0: 0x3FF}),
    ("SPIV software-disabled: the LVTs are masked already", 0x80F, 0xFF, 1, {0xF0: 0xFF}),
    ("SPIV: no directed EOI with an in-kernel IOAPIC", 0x80F, 0x10FF, 1, {0xF0: 0xFF}),
    ("ESR takes 0 and changes nothing", 0x828, 0, 1, {}),
    ("ESR refuses non-zero", 0x828, 1, 0, {}),
    ("ID is read-only", 0x802, 3, 0, {}),
    ("LDR is read-only", 0x80D, 0x80000, 0, {}),
    ("DFR does not exist", 0x80E, 0xFFFFFFFF, 0, {}),
    ("ICR2 does not exist", 0x831, 0, 0, {}),
    ("LVR is read-only", 0x803, 0x50014, 0, {}),
    ("PPR is read-only", 0x80A, 0, 0, {}),
    ("ISR is read-only", 0x810, 0, 0, {}),
    ("TMCCT is read-only", 0x839, 0, 0, {}),
    ("LVTT: vector, delivery status, mask and the timer modes CPUID allows", 0x832, 0xFFFFFFFF, 1, {0x320: 0x710FF}),
    ("LVTTHMR", 0x833, 0xFFFFFFFF, 1, {0x330: 0x117FF}),
    ("LVTPC", 0x834, 0xFFFFFFFF, 1, {0x340: 0x117FF}),
    ("LVT0", 0x835, 0xFFFFFFFF, 1, {0x350: 0x1F7FF}),
    ("LVT1", 0x836, 0xFFFFFFFF, 1, {0x360: 0x1F7FF}),
    ("LVTERR", 0x837, 0xFFFFFFFF, 1, {0x370: 0x110FF}),
    ("LVTCMCI needs MCG_CAP.CMCI_P", 0x82F, 0, 0, {}),
    ("TMICT 0", 0x838, 0, 1, {}),
    ("TDCR keeps bits 3, 1, 0", 0x83E, 0xFFFFFFFF, 1, {0x3E0: 0xB}),
    ("SELF_IPI sets the vector's IRR bit", 0x83F, 0x31, 1, {0x210: 0x20000}),
    ("SELF_IPI takes a vector alone", 0x83F, 0x131, 0, {}),
    ("ICR: fixed IPI to x2APIC ID 3; BUSY cleared; the high half at 0x304, shown as ICR2", 0x830, 0x3_00001031, 1,
     {0x210: 0x20000, 0x300: 0x31, 0x304: 0x3, 0x310: 0x3}),
    ("ICR: to x2APIC ID 4, not this vCPU", 0x830, 0x4_00000031, 1, {0x300: 0x31, 0x304: 0x4, 0x310: 0x4}),
    ("ICR: self shorthand", 0x830, 0x40031, 1, {0x210: 0x20000, 0x300: 0x40031}),
    ("ICR: all-but-self shorthand", 0x830, 0xC0031, 1, {0x300: 0xC0031}),
    ("ICR: broadcast", 0x830, 0xFFFFFFFF_00000031, 1, {0x210: 0x20000, 0x300: 0x31, 0x304: 0xFFFFFFFF,
                                                     0x310: 0xFFFFFFFF}),
    ("ICR: logical, another cluster", 0x830, 0x80000_00000832, 1, {0x300: 0x832, 0x304: 0x80000, 0x310: 0x80000}),
    ("ICR: logical, cluster 0 bit 3", 0x830, 0x8_00000832, 1, {0x210: 0x40000, 0x300: 0x832, 0x304: 0x8,
                                                              0x310: 0x8}),
    ("ICR: reserved bit 20", 0x830, 0x100031, 0, {}),
    ("ICR: reserved bit 13", 0x830, 0x2031, 0, {}),
    ("ICR: level-triggered deassert is dropped", 0x830, 0x3_00008031, 1, {0x300: 0x8031, 0x304: 0x3, 0x310: 0x3}),
    ("ICR: level-triggered assert sets TMR and IRR", 0x830, 0x3_0000C031, 1,
     {0x190: 0x20000, 0x210: 0x20000, 0x300: 0xC031, 0x304: 0x3, 0x310: 0x3}),
    ("ICR: ExtINT does nothing", 0x830, 0x3_00000731, 1, {0x300: 0x731, 0x304: 0x3, 0x310: 0x3}),
    ("0x800 is reserved", 0x800, 0, 0, {}),
    ("0x840 is beyond the APIC", 0x840, 0, 0, {}),
    ("0x8FF", 0x8FF, 0, 0, {}),
]


def words(lapic: uapi.kvm_lapic_state) -> dict[int, int]:
    raw = bytes(lapic)
    return {o: v for o in range(0, len(raw), 4) if (v := struct.unpack_from("<I", raw, o)[0])}


def set_words(vcpu: Vcpu, changes: dict[int, int]) -> None:
    """KVM_SET_LAPIC of the vCPU's page with these 32-bit words changed."""
    raw = bytearray(bytes(vcpu.get_lapic()))
    for offset, value in changes.items():
        struct.pack_into("<I", raw, offset, value)
    vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))


def irqchip_vcpu(kvm: System, vcpu_id: int = VCPU_ID) -> tuple[Vm, Vcpu]:
    """A vCPU with an in-kernel LAPIC (xAPIC mode) and the supported CPUID."""
    vm = kvm.create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(vcpu_id)
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    return vm, vcpu


def x2apic_vcpu(kvm: System, vcpu_id: int = VCPU_ID) -> tuple[Vm, Vcpu]:
    """A vCPU in x2APIC mode with the page of ``START``."""
    vm, vcpu = irqchip_vcpu(kvm, vcpu_id)
    assert vcpu.set_msrs({0x1B: vcpu.read_msr(0x1B) | 0xC00}) == 1, "APIC_BASE: x2APIC mode"
    set_words(vcpu, {0xF0: 0x1FF, 0x80: 0x10, 0x110: 0x20})
    return vm, vcpu


def read(vcpu: Vcpu, index: int) -> tuple[int, int]:
    batch = MsrBatch([(index, 0xDEAD)])
    return vcpu.get_msrs(batch), batch[0][1]


def test_entering_x2apic_mode_sets_id_and_ldr(kvm: System) -> None:
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        page = words(vcpu.get_lapic())
        assert page == START, f"expected the page {START}, saw {page}"
    finally:
        vm.close()


def test_which_registers_read(kvm: System) -> None:
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        readable = {index for index in range(0x800, 0x900) if read(vcpu, index)[0] == 1}
        assert readable == READABLE, f"missing {sorted(map(hex, READABLE - readable))}, extra " \
                                     f"{sorted(map(hex, readable - READABLE))}"
        values = {index: read(vcpu, index)[1] for index in (0x802, 0x803, 0x80D, 0x80F, 0x811, 0x830, 0x839, 0x831)}
        expected = {0x802: VCPU_ID, 0x803: 0x50014, 0x80D: 0x8, 0x80F: 0x1FF, 0x811: 0x20, 0x830: 0, 0x839: 0,
                    0x831: 0}  # a refused read leaves 0 (6.12+)
        assert values == expected, f"expected {expected}, saw {values}"
    finally:
        vm.close()


def test_reading_ppr_recomputes_it(kvm: System) -> None:
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        assert words(vcpu.get_lapic())[0xA0] == 0x10, "PPR stale after KVM_SET_LAPIC (TPR)"
        assert read(vcpu, 0x80A) == (1, 0x20), "PPR read: vector 0x25's class"
        assert words(vcpu.get_lapic())[0xA0] == 0x20, "the read left the page's PPR updated"
    finally:
        vm.close()


@pytest.mark.parametrize(("what", "index", "value", "count", "changes"), WRITES, ids=[w[0] for w in WRITES])
def test_write(kvm: System, what: str, index: int, value: int, count: int, changes: dict[int, int]) -> None:
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        before = words(vcpu.get_lapic())
        done = vcpu.set_msrs(MsrBatch([(index, value)]))
        after = words(vcpu.get_lapic())
        changed = {o: after.get(o, 0) for o in before.keys() | after.keys() if before.get(o, 0) != after.get(o, 0)}
        assert (done, changed) == (count, changes), \
            f"{what}: expected count {count} and changes {changes}, saw {done} and {changed}"
    finally:
        vm.close()


def test_xapic_icr2_hides_under_the_64_bit_icr(kvm: System) -> None:
    """A 64-bit ICR keeps its high half at 0x304; the xAPIC ICR2 stays at 0x310 and comes back in xAPIC mode."""
    vm, vcpu = irqchip_vcpu(kvm)
    try:
        set_words(vcpu, {0x300: 0x4030, 0x304: 0xAABBCCDD, 0x310: 0x05000000})
        xapic = vcpu.read_msr(0x1B)
        assert vcpu.set_msrs({0x1B: xapic | 0x400}) == 1, "into x2APIC mode"
        page = words(vcpu.get_lapic())
        shown = {o: page.get(o) for o in (0x20, 0x300, 0x304, 0x310, 0xD0)}
        assert shown == {0x20: 0x3000000, 0x300: 0x4030, 0x304: 0xAABBCCDD, 0x310: 0xAABBCCDD, 0xD0: 0x8}, shown
        assert read(vcpu, 0x830) == (1, 0xAABBCCDD_00004030), "ICR: the high half from 0x304"
        assert read(vcpu, 0x802) == (1, VCPU_ID), "the x2APIC ID"
        assert vcpu.set_msrs({0x1B: xapic}) == 1, "back to xAPIC mode (a host write may)"
        page = words(vcpu.get_lapic())
        shown = {o: page.get(o) for o in (0x20, 0x304, 0x310, 0xD0)}
        assert shown == {0x20: 0x3000000, 0x304: 0xAABBCCDD, 0x310: 0x05000000, 0xD0: 0x8}, \
            f"ICR2 back, the xAPIC ID set again (6.3+), the x2APIC LDR kept: {shown}"
    finally:
        vm.close()


def test_xapic_mode_refuses_every_x2apic_msr(kvm: System) -> None:
    vm, vcpu = irqchip_vcpu(kvm, 0)
    try:
        taken = [hex(i) for i in range(0x800, 0x900) if read(vcpu, i)[0] or vcpu.set_msrs(MsrBatch([(i, 0)]))]
        assert not taken, f"xAPIC mode: every x2APIC MSR refused, taken: {taken}"
    finally:
        vm.close()


def test_software_disabled_apic_masks_lvt_writes_and_drops_ipis(kvm: System) -> None:
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        assert vcpu.set_msrs({0x80F: 0xFF}) == 1, "SPIV: software-disable"
        assert vcpu.set_msrs({0x835: 0x700, 0x83F: 0x31, 0x830: 0x40031}) == 3, "LVT0, SELF_IPI, ICR"
        page = words(vcpu.get_lapic())
        assert (page.get(0x350), page.get(0x210)) == (0x10700, None), \
            f"LVT0 written masked, no IRR bit: saw LVT0 {page.get(0x350, 0):#x}, IRR1 {page.get(0x210, 0):#x}"
    finally:
        vm.close()


def test_ppr_takes_the_tpr_low_byte(kvm: System) -> None:
    """apic_update_ppr: PPR = TPR & 0xFF when TPR's class is at least the in-service one (a restored TPR may hold
    more bits)."""
    vm, vcpu = x2apic_vcpu(kvm)
    try:
        set_words(vcpu, {0x80: 0x1FF})
        assert read(vcpu, 0x80A) == (1, 0xFF), "PPR read after a TPR of 0x1FF was restored"
    finally:
        vm.close()


def test_set_lapic_keeps_kvms_version_and_no_count(kvm: System) -> None:
    """kvm_apic_set_state: the LVR is KVM's own (kvm_apic_set_version) and the page's TMCCT is 0, whatever was given."""
    vm, vcpu = irqchip_vcpu(kvm)
    try:
        set_words(vcpu, {0x30: 0x12345, 0x390: 0x777})
        page = words(vcpu.get_lapic())
        assert (page.get(0x30), page.get(0x390)) == (0x50014, None), f"LVR {page.get(0x30)}, TMCCT {page.get(0x390)}"
    finally:
        vm.close()


@pytest.mark.parametrize("quirk_off", [False, True])
def test_msi_to_an_x2apic_vcpu(kvm: System, quirk_off: bool) -> None:
    """KVM_SIGNAL_MSI (physical, fixed) reaches an x2APIC-mode APIC by its x2APIC ID; 0xFF is a broadcast unless
    KVM_CAP_X2APIC_API disabled that quirk (kvm_apic_mda, 6.12.118 lapic.c:1077-1091)."""
    taken = {}
    for dest in (0, VCPU_ID, 0xFF, 5):
        vm = kvm.create_vm()
        try:
            if quirk_off:
                vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)
            vm.create_irqchip()
            vcpu = vm.create_vcpu(VCPU_ID)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            assert vcpu.set_msrs({0x1B: 0xFEE00C00, 0x80F: 0x1FF}) == 2, "x2APIC mode, software-enabled"
            taken[dest] = (vm.signal_msi(0xFEE00000 | dest << 12, 0x31), words(vcpu.get_lapic()).get(0x210))
        finally:
            vm.close()
    expected = {0: (0, None), VCPU_ID: (1, 0x20000), 0xFF: (0, None) if quirk_off else (1, 0x20000), 5: (0, None)}
    assert taken == expected, f"APICs that took the MSI, and IRR1, by destination: expected {expected}, saw {taken}"


def test_32_bit_x2apic_ids_in_the_lapic_page(kvm: System) -> None:
    """KVM_CAP_X2APIC_API with USE_32BIT_IDS: in x2APIC mode KVM_GET_LAPIC shows the x2APIC ID unshifted, and
    KVM_SET_LAPIC refuses any other ID (kvm_apic_state_fixup, 6.12.118 lapic.c:3102-3104), after it has set the
    page's SPIV (apic_set_spiv comes first: lapic.c:3167-3173)."""
    vm = kvm.create_vm()
    try:
        vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_API_USE_32BIT_IDS)
        vm.create_irqchip()
        vcpu = vm.create_vcpu(VCPU_ID)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert vcpu.set_msrs({0x1B: 0xFEE00C00}) == 1
        page = vcpu.get_lapic()
        assert words(page)[0x20] == VCPU_ID, f"ID shown {words(page)[0x20]:#x}"
        vcpu.set_lapic(page)  # its own ID: taken
        raw = bytearray(bytes(page))
        struct.pack_into("<I", raw, 0x20, VCPU_ID << 24)
        spiv = words(page)[0xF0] ^ 0x100 ^ 0x20  # software enable toggled, a vector bit changed
        struct.pack_into("<I", raw, 0xF0, spiv)
        with pytest.raises(KvmError) as refused:
            vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))
        assert refused.value.errno == errno.EINVAL, f"expected EINVAL for an xAPIC-style ID, saw {refused.value}"
        after = words(vcpu.get_lapic())
        assert after[0x20] == VCPU_ID, "the refused page left the ID"
        assert after[0xF0] == spiv, f"the refused page's SPIV is set first (apic_set_spiv): expected {spiv:#x}, " \
                                    f"saw {after[0xF0]:#x}"
    finally:
        vm.close()


def test_msi_broadcast_no_apic_takes_is_eperm(kvm: System) -> None:
    """A broadcast MSI takes kvm_irq_delivery_to_apic's slow path, which returns -1 (EPERM) when no present APIC
    matches: here the only APIC is hardware-disabled. Another destination takes the fast path: 0."""
    vm, vcpu = irqchip_vcpu(kvm)
    try:
        assert vcpu.set_msrs({0x1B: 0xFEE00000}) == 1, "APIC hardware-disabled"
        assert vm.signal_msi(0xFEE00000 | VCPU_ID << 12, 0x31) == 0, "to its ID: no APIC took it"
        with pytest.raises(KvmError) as refused:
            vm.signal_msi(0xFEE00000 | 0xFF << 12, 0x31)
        assert refused.value.errno == errno.EPERM, f"broadcast: expected EPERM, saw {refused.value}"
    finally:
        vm.close()


def test_suppress_eoi_broadcast_flags(kvm: System) -> None:
    """KVM_CAP_X2APIC_API's suppress-EOI-broadcast flags (6517dfbcc918; in 6.18.17, so on the live 6.18.44): the
    host reports bits 0-3, a VM without a split IRQCHIP all but ENABLE (bit 2). ENABLE is EINVAL there, and so is
    ENABLE with DISABLE; DISABLE is taken. With the in-kernel IOAPIC the LVR shows no directed EOI and SPIV does not
    take bit 12, with DISABLE as without it (what DISABLE changes is the EOI: test_eoi_to_the_in_kernel_ioapic)."""
    assert kvm.check_extension(uapi.KVM_CAP_X2APIC_API) == 0xF, "the host's report: bits 0-3"
    outcome = {}
    for flags in (0, 4, 8, 0xC, 0x9, 0x10):
        vm = kvm.create_vm()
        try:
            vm.create_irqchip()
            outcome["vm report"] = vm.check_extension(uapi.KVM_CAP_X2APIC_API)
            try:
                vm.enable_cap(uapi.KVM_CAP_X2APIC_API, flags)
                outcome[flags] = 0
            except KvmError as e:
                outcome[flags] = e.errno
            if flags == 8:  # DISABLE taken: a vCPU in x2APIC mode with CPUID.X2APIC
                vcpu = vm.create_vcpu(VCPU_ID)
                vcpu.set_cpuid(kvm.get_supported_cpuid())
                assert vcpu.set_msrs({0x1B: 0xFEE00C00, 0x80F: 0x11FF}) == 2, "x2APIC mode, then SPIV with bit 12"
                page = words(vcpu.get_lapic())
                outcome["lvr, spiv"] = (page[0x30], page[0xF0])
        finally:
            vm.close()
    expected = {"vm report": 0xB, 0: 0, 4: errno.EINVAL, 8: 0, "lvr, spiv": (0x50014, 0x1FF), 0xC: errno.EINVAL,
                0x9: 0, 0x10: errno.EINVAL}
    assert outcome == expected, f"expected {expected}, saw {outcome}"


@pytest.mark.parametrize("disable", [False, True])
@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("ran", [False, True])
def test_eoi_to_the_in_kernel_ioapic(kvm: System, ran: bool, directed: bool, disable: bool) -> None:
    """An x2APIC EOI of a level-triggered vector (in ISR and TMR, restored by KVM_SET_LAPIC) whose IOAPIC pin has
    remote IRR set (KVM_SET_IRQCHIP). It reaches the IOAPIC only for a vector the scan at a VM entry found (so not
    before a run), and not when SPIV's directed-EOI bit suppresses it, unless KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST
    (6.18.17: kvm_lapic_suppress_eoi_broadcast; before, ioapic.c checked the SPIV bit alone). Reaching it clears the
    pin's remote IRR. The model answers where no scan decides, and raises ModelLimitation where one does."""
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        if disable:
            vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert vcpu.set_msrs({0x1B: 0xFEE00C00}) == 1, "x2APIC mode"
        ioapic = vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC)
        ioapic.chip.ioapic.redirtbl[0] = 0x40 | 1 << 15 | 1 << 14  # vector 0x40, level, remote IRR, to APIC 0
        vm.set_irqchip(ioapic)
        raw = bytearray(bytes(vcpu.get_lapic()))
        struct.pack_into("<I", raw, 0xF0, 0x1FF | (0x1000 if directed else 0))  # KVM_SET_LAPIC keeps bit 12
        struct.pack_into("<I", raw, 0x120, 1)  # 0x40 in service
        struct.pack_into("<I", raw, 0x1A0, 1)  # ... and level-triggered
        vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))
        if ran:
            guest.load_real_mode(vm, vcpu, b"\xe6\x10\xf4")  # out 0x10, al; hlt
            assert vcpu.run(timeout=5).port == 0x10, "the run is expected to stop at the OUT"  # type: ignore[union-attr]
        reaches = ran and (disable or not directed)
        try:
            taken = vcpu.set_msrs({0x80B: 0})
        except ModelLimitation:
            assert kvm.backend == "model" and reaches, "only the model, and only where the scan decides, may refuse"
            return
        remote_irr = vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[0] >> 14 & 1
        in_service = words(vcpu.get_lapic()).get(0x120, 0)
        assert (taken, in_service, remote_irr) == (1, 0, 0 if reaches else 1), (
            f"EOI taken, ISR word 2, remote IRR: expected (1, 0, {0 if reaches else 1}), saw {(taken, in_service, remote_irr)}")
    finally:
        vm.close()
