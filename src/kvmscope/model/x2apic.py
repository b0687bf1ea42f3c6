"""The local APIC in x2APIC mode, with an in-kernel irqchip (lapic.c): host KVM_GET_MSRS/KVM_SET_MSRS of the x2APIC
MSRs 0x800-0x8FF (``kvm_x2apic_msr_read``/``kvm_x2apic_msr_write``, which take no host-initiated flag: host and guest
get the same software semantics), what entering and leaving x2APIC mode does to the page (``kvm_lapic_set_base``),
and what KVM_GET_LAPIC shows and KVM_SET_LAPIC takes in x2APIC mode (``kvm_apic_state_fixup``).

Line numbers are 6.12.118's lapic.c unless a rule says otherwise; 6.1.192 and 6.18 differ only where a rule in
``rulesets`` says so. The vCPU's ``lapic`` is the kernel's internal page (``apic->regs``): in x2APIC mode its ID
register holds the full x2APIC ID and, where the ICR is one 64-bit register, 0x304 holds the ICR's high half while
0x310 keeps the xAPIC ICR2, hidden until the vCPU leaves x2APIC mode (seen on the live kernel).

The model runs no APIC timer and delivers no interrupt to another vCPU: a current-count read while a timer may run,
and an IPI that can reach another vCPU's APIC or is not Fixed, Lowest-priority or ExtINT, raise a model limitation.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from ..errors import KvmError
from ..kernel import emulated as E
from ..kernel import rulesets as R
from . import cpuid as C

if TYPE_CHECKING:
    from .msr_pv import PvMceMsrs
    from .vcpu import ModelVcpu

X2APIC_MODE = 1 << 10  # APIC_BASE EXTD
ID, LVR, TPR, PPR, EOI, LDR, SPIV = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xF0
ISR, TMR, IRR, ESR, LVTCMCI, ICR, ICR2 = 0x100, 0x180, 0x200, 0x280, 0x2F0, 0x300, 0x310
LVTT, LVTTHMR, LVTPC, LVT0, LVT1, LVTERR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
TMICT, TMCCT, TDCR, SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MASKED, SPIV_ENABLED, LVR_DIRECTED_EOI, ICR_BUSY = 1 << 16, 1 << 8, 1 << 24, 1 << 12
LVT_MASK, LINT_MASK, MODE_MASK = 0x110FF, 0x1F7FF, 0x700
# apic_lvt_mask (lapic.c:626-634): what each LVT keeps of a write; the timer's mode bits are added per vCPU.
LVT_KEEPS = {LVTT: LVT_MASK, LVTTHMR: LVT_MASK | MODE_MASK, LVTPC: LVT_MASK | MODE_MASK, LVT0: LINT_MASK,
             LVT1: LINT_MASK, LVTERR: LVT_MASK, LVTCMCI: LVT_MASK | MODE_MASK}
ICR_RESERVED = 0xFFF32000  # X2APIC_ICR_RESERVED_BITS: 31:20, 17:16, 13 (lapic.c:2489-2493)
# kvm_lapic_readable_reg_mask (lapic.c:1634-1669) in x2APIC mode: ARBPRI, DFR and ICR2 exist in xAPIC mode only;
# EOI and SELF_IPI are write-only; LVTCMCI only with MCG_CAP.CMCI_P.
READABLE = frozenset({ID, LVR, TPR, PPR, LDR, SPIV, *range(ISR, IRR + 0x80, 0x10), ESR, ICR, LVTT, LVTTHMR, LVTPC,
                      LVT0, LVT1, LVTERR, TMICT, TMCCT, TDCR})
MCG_CAP, MCG_CMCI_P = 0x179, 1 << 10
APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_EXTINT = 0, 1, 7
SHORT_NONE, SHORT_SELF, SHORT_ALL, SHORT_OTHERS = range(4)
X2APIC_BROADCAST = 0xFFFFFFFF


def reg32(page: bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", page, offset)[0])


def set_reg32(page: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", page, offset, value & 0xFFFFFFFF)


def in_x2apic_mode(vcpu: ModelVcpu) -> bool:
    """``apic_x2apic_mode``: an in-kernel LAPIC with APIC_BASE bit 10 set (the software enable is not looked at)."""
    return vcpu.lapic is not None and bool(vcpu.sregs.apic_base & X2APIC_MODE)


def x2apic_ldr(x2apic_id: int) -> int:
    """``kvm_apic_calc_x2apic_ldr``: the cluster (ID bits 31:4) in bits 31:16, one bit for ID bits 3:0."""
    return ((x2apic_id >> 4) << 16 | 1 << (x2apic_id & 0xF)) & 0xFFFFFFFF


def icr_split(vcpu: ModelVcpu) -> bool:
    """Whether an x2APIC ICR write is kept as ICR (0x300) and ICR2 (0x310), not one 64-bit register at 0x300
    (``kvm_x86_ops.x2apic_icr_is_split``: SVM from 73b42dc69be8; every vendor before the 64-bit register,
    a57a31684d7b)."""
    if not vcpu.rules.has(R.X2APIC_ICR_64BIT):
        return True
    return vcpu.profile.vendor == "svm" and vcpu.rules.has(R.X2APIC_ICR_SPLIT_SVM)


def x2apic_id(vcpu: ModelVcpu) -> int:
    """The x2APIC ID as the ID register shows it: the vCPU id from 6.11 (4b7c3f6d04bd); before, the page's ID register,
    which KVM_SET_LAPIC could set (interrupts still went by the vCPU id, ``kvm_x2apic_id``: 6.1.192 lapic.c:146-149)."""
    assert vcpu.lapic is not None
    return vcpu.id if vcpu.rules.has(R.X2APIC_ID_READONLY) else reg32(vcpu.lapic, ID)


# -- APIC_BASE, KVM_GET_LAPIC, KVM_SET_LAPIC --
def base_changed(vcpu: ModelVcpu, old: int, new: int) -> None:
    """``kvm_lapic_set_base`` (lapic.c:2639-2679): hardware-enabling the APIC sets the xAPIC ID from the vCPU id;
    entering x2APIC mode sets the x2APIC ID and its LDR; leaving it for xAPIC mode sets the xAPIC ID (from 6.3)."""
    page = vcpu.lapic
    if page is None:
        return
    enable = 1 << 11
    if (old ^ new) & (enable | X2APIC_MODE):  # the map is rebuilt (apic_map_dirty), in the format of now
        vcpu.vm.apic_map_format = vcpu.vm.x2apic_format
    if (old ^ new) & enable and new & enable:
        set_reg32(page, ID, (vcpu.id & 0xFF) << 24)
    if (old ^ new) & X2APIC_MODE:
        if new & X2APIC_MODE:
            set_reg32(page, ID, vcpu.id)
            set_reg32(page, LDR, x2apic_ldr(vcpu.id))
        elif new & enable and vcpu.rules.has(R.X2APIC_LEAVE_SETS_XAPIC_ID):
            set_reg32(page, ID, (vcpu.id & 0xFF) << 24)


def shown(vcpu: ModelVcpu, page: bytearray) -> None:
    """``kvm_apic_state_fixup(set=false)`` on a copy of the page for KVM_GET_LAPIC: in x2APIC mode the ID shows as
    an xAPIC ID (shifted left 24, truncated), and a 64-bit ICR's high half shows as ICR2. The current count is read
    as the register is (``kvm_apic_get_state``): 0 unless a timer may run, which the model does not do."""
    set_reg32(page, TMCCT, current_count(vcpu))
    if not in_x2apic_mode(vcpu):
        return
    set_reg32(page, ID, x2apic_id(vcpu) if vcpu.vm.x2apic_format else x2apic_id(vcpu) << 24)
    if not icr_split(vcpu):
        set_reg32(page, ICR2, reg32(page, ICR + 4))


def taken(vcpu: ModelVcpu, page: bytearray) -> None:
    """``kvm_apic_state_fixup(set=true)`` on the page KVM_SET_LAPIC was given, in x2APIC mode: the ID is the vCPU id
    (from 6.12; before, the given ID shifted right 24), the LDR follows it, and a 64-bit ICR is made of the given
    ICR and ICR2 (the given 0x304 is lost)."""
    if not in_x2apic_mode(vcpu):
        return
    if vcpu.vm.x2apic_format:  # KVM_CAP_X2APIC_API's 32-bit IDs: the given ID must be the vCPU's
        if reg32(page, ID) != vcpu.id:
            # kvm_apic_set_state sets SPIV first (apic_set_spiv), so the refused page leaves its SPIV; a software-
            # enable toggle rebuilds the APIC map (6.12.118 lapic.c:3167-3173)
            assert vcpu.lapic is not None
            if (reg32(page, SPIV) ^ reg32(vcpu.lapic, SPIV)) & SPIV_ENABLED:
                vcpu.vm.apic_map_format = vcpu.vm.x2apic_format
            set_reg32(vcpu.lapic, SPIV, reg32(page, SPIV))
            raise KvmError(errno.EINVAL, "KVM_SET_LAPIC", "the x2APIC ID is not the vCPU's (32-bit IDs)")
        new_id = vcpu.id
    else:
        new_id = vcpu.id if vcpu.rules.has(R.X2APIC_ID_READONLY) else reg32(page, ID) >> 24
    set_reg32(page, ID, new_id)
    set_reg32(page, LDR, x2apic_ldr(new_id))
    if not icr_split(vcpu):
        set_reg32(page, ICR + 4, reg32(page, ICR2))


def msi_reaches(vcpu: ModelVcpu, dest: int, broadcast_quirk_disabled: bool) -> bool:
    """Whether an MSI to the 8-bit physical ``dest`` reaches this vCPU's APIC (``kvm_apic_match_physical_addr`` via
    ``kvm_apic_mda``, lapic.c:1019-1091): an x2APIC-mode APIC by its x2APIC ID, or 0xFF as a broadcast unless
    KVM_CAP_X2APIC_API disabled that quirk; an xAPIC-mode one by its xAPIC ID or 0xFF. Not a hardware-disabled one."""
    page = vcpu.lapic
    if page is None or not vcpu.sregs.apic_base & 1 << 11:
        return False
    if in_x2apic_mode(vcpu):
        return dest == vcpu.id or (dest == 0xFF and not broadcast_quirk_disabled)
    return dest in (0xFF, reg32(page, ID) >> 24)


def msi_is_broadcast(vcpus: list[ModelVcpu], dest: int, broadcast_quirk_disabled: bool) -> bool:
    """``kvm_apic_is_broadcast_dest`` for an MSI (lapic.c:1142-1160): 0xFF, unless the quirk is disabled and every
    software-enabled APIC with a logical ID is in x2APIC mode (the map's logical mode, lapic.c:306-345). A broadcast
    takes the slow path, which fails (EPERM) when no present APIC matches; any other destination the fast one."""
    if dest != 0xFF:
        return False
    if not broadcast_quirk_disabled:
        return True
    modes = {in_x2apic_mode(v) for v in vcpus if v.lapic is not None and v.sregs.apic_base & 1 << 11
             and reg32(v.lapic, SPIV) & SPIV_ENABLED and reg32(v.lapic, LDR)}
    return modes != {True}


def physical_ids_aliased(vcpus: list[ModelVcpu]) -> bool:
    """Whether two present (hardware-enabled) APICs share a physical ID: the x2APIC ID in x2APIC mode, else the
    xAPIC ID (kvm_recalculate_phys_map without 32-bit IDs)."""
    ids = [v.id if in_x2apic_mode(v) else reg32(v.lapic, ID) >> 24 for v in vcpus
           if v.lapic is not None and v.sregs.apic_base & 1 << 11]
    return len(ids) != len(set(ids))


# -- the MSRs --
def read(family: PvMceMsrs, index: int) -> tuple[int, int]:
    """``kvm_x2apic_msr_read``: (0, value), or a refusal by its rule."""
    vcpu = family.vcpu
    page = vcpu.lapic
    if page is None or not in_x2apic_mode(vcpu):
        return family.refuse(index, E.X2APIC_NO_IRQCHIP, 1), 0
    reg = (index - 0x800) << 4
    if reg == ICR:  # kvm_lapic_msr_read: the ICR is always readable
        high = reg32(page, ICR2) if icr_split(vcpu) else reg32(page, ICR + 4)
        return 0, reg32(page, ICR) | high << 32
    if reg not in READABLE and not (reg == LVTCMCI and cmci(vcpu)):
        return family.refuse(index, E.X2APIC_NOT_READABLE, 1), 0
    if reg == TMCCT:
        return 0, current_count(vcpu)
    if reg == PPR:  # kvm_lapic_reg_read recomputes it first (stale after KVM_SET_LAPIC: see set_lapic)
        update_ppr(page)
    return 0, reg32(page, reg)


def current_count(vcpu: ModelVcpu) -> int:
    """``apic_get_tmcct``: 0 in TSC-deadline mode or with no initial count; otherwise the timer runs, which the model
    does not do."""
    assert vcpu.lapic is not None
    if vcpu.tsc_deadline_mode or not reg32(vcpu.lapic, TMICT):
        return 0
    raise vcpu.limitation("the APIC timer's current count (x2APIC MSR 0x839) while a timer may run: the model runs "
                          "no APIC timer")


def run_blocker(vcpu: ModelVcpu) -> str | None:
    """What an in-kernel LAPIC would have KVM_RUN do that the model does not: deliver an interrupt pending in its IRR
    (live: even with the APIC disabled in software), or run its one-shot or periodic timer (TMICT set)."""
    page = vcpu.lapic
    if page is None or not vcpu.sregs.apic_base & 1 << 11:
        return None
    # Enabling async PF as an interrupt queues a "wakeup all" (kvm_pv_enable_async_pf): at a run with the APIC enabled
    # and the token slot free, KVM writes the token and raises the vector (6.12.118 x86.c:3132-3169, 12710-12733).
    apf = vcpu.msr_rules.stored.get(MSR_KVM_ASYNC_PF_EN, 0)
    if apf & 0x9 == 0x9 and reg32(page, SPIV) & SPIV_ENABLED and vcpu.vm.read_memory((apf & ~0x3F) + 4, 4) == bytes(4):
        return "async page faults were enabled as interrupts: KVM would deliver a 'wakeup all' (the model does not)"
    if highest_bit(page, IRR) >= 0:
        return "an interrupt is pending in the LAPIC's IRR (the model does not deliver interrupts into the guest)"
    if not vcpu.tsc_deadline_mode and reg32(page, TMICT):
        return "the APIC timer is armed (TMICT; the model runs no APIC timer)"
    return None


def mcg_cap_changed(vcpu: ModelVcpu) -> None:
    """``kvm_apic_after_set_mcg_cap`` (lapic.c:607-623): with MCG_CAP.CMCI_P the APIC has a seventh LVT (CMCI), set
    masked when it appears, and the LVR counts the LVTs (``kvm_apic_set_version``)."""
    page = vcpu.lapic
    if page is None:
        return
    lvr = reg32(page, LVR)
    old, new = (lvr >> 16 & 0xFF) + 1, 7 if cmci(vcpu) else 6
    if old == new:
        return
    if new > old:
        set_reg32(page, LVTCMCI, MASKED)
    set_reg32(page, LVR, lvr & ~0xFF0000 | (new - 1) << 16)
    set_version(vcpu)


def set_version(vcpu: ModelVcpu) -> None:
    """``kvm_apic_set_version`` (6.12.118 lapic.c:584-605, at KVM_SET_CPUID2 and an MCG_CAP change): the LVR advertises
    directed EOI to a guest with x2APIC when no IOAPIC is in the kernel (a split irqchip), and from 6.18.17 not after
    KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST (``kvm_lapic_advertise_suppress_eoi_broadcast``)."""
    page = vcpu.lapic
    if page is None:
        return
    vm = vcpu.vm
    directed = (vm.split_irqchip and vm.suppress_eoi_broadcast != "disabled"
                and C.has_feature(vcpu.cpuid, 1, 0, "ecx", 21))
    set_reg32(page, LVR, reg32(page, LVR) & ~LVR_DIRECTED_EOI | (LVR_DIRECTED_EOI if directed else 0))


def cmci(vcpu: ModelVcpu) -> bool:
    """``kvm_lapic_lvt_supported(LVT_CMCI)``: the LVT exists when MCG_CAP has CMCI_P."""
    return bool((vcpu.msr_rules.stored.get(MCG_CAP) or 0) & MCG_CMCI_P)


def write(family: PvMceMsrs, index: int, data: int) -> int:
    """``kvm_x2apic_msr_write``: 0, or a refusal by its rule (nothing changed)."""
    vcpu = family.vcpu
    page = vcpu.lapic
    if page is None or not in_x2apic_mode(vcpu):
        return family.refuse(index, E.X2APIC_NO_IRQCHIP, 1)
    reg = (index - 0x800) << 4
    rules = vcpu.rules
    if reg == ICR:
        if data & ICR_RESERVED and rules.has(R.X2APIC_ICR_RESERVED):
            return family.refuse(index, R.X2APIC_ICR_RESERVED, 1)
        data &= ~ICR_BUSY
        send_ipi(vcpu, data & 0xFFFFFFFF, data >> 32)
        set_reg32(page, ICR, data)
        set_reg32(page, ICR2 if icr_split(vcpu) else ICR + 4, data >> 32)
        return 0
    if data >> 32:
        if rules.has(R.X2APIC_HIGH_BITS):
            return family.refuse(index, R.X2APIC_HIGH_BITS, 1)
        data &= 0xFFFFFFFF
    sw_enabled = bool(reg32(page, SPIV) & SPIV_ENABLED)
    if reg == TPR:
        set_reg32(page, TPR, data & 0xFF)
        update_ppr(page)
    elif reg == EOI:
        highest = highest_bit(page, ISR)
        if highest >= 0:
            if ioapic_may_take_eoi(vcpu, page, highest):
                raise vcpu.limitation(f"an EOI of vector {highest:#x}, level-triggered, after a run: the in-kernel "
                                      "IOAPIC takes it if its last scan at a VM entry found the vector, which the "
                                      "model does not track (it would clear the pin's remote IRR)")
            clear_bit(page, ISR, highest)
            update_ppr(page)
    elif reg == SPIV:
        set_reg32(page, SPIV, data & (0x3FF | (0x1000 if reg32(page, LVR) & LVR_DIRECTED_EOI else 0)))
        if bool(data & SPIV_ENABLED) != sw_enabled:  # apic_set_spiv: a software-enable change rebuilds the map
            vcpu.vm.apic_map_format = vcpu.vm.x2apic_format
        if not data & SPIV_ENABLED:  # every LVT masked, even when the APIC was already disabled
            for lvt in LVT_KEEPS:
                if lvt != LVTCMCI or cmci(vcpu):
                    set_reg32(page, lvt, reg32(page, lvt) | MASKED)
            vcpu.update_lvtt(page)
    elif reg == ESR:
        if data:
            return family.refuse(index, E.X2APIC_ESR_NONZERO, 1)
    elif reg in LVT_KEEPS:
        if reg == LVTCMCI and not cmci(vcpu):
            return family.refuse(index, E.X2APIC_NOT_WRITABLE, 1)
        keeps = LVT_KEEPS[reg] | (timer_mode_mask(vcpu) if reg == LVTT else 0)
        set_reg32(page, reg, (data | (0 if sw_enabled else MASKED)) & keeps)
        if reg == LVTT:
            vcpu.update_lvtt(page)
    elif reg == TMICT:
        if not vcpu.tsc_deadline_mode:  # ignored in TSC-deadline mode
            set_reg32(page, TMICT, data)
    elif reg == TDCR:
        set_reg32(page, TDCR, data & 0xB)
    elif reg == SELF_IPI:
        if data & ~0xFF and rules.has(R.X2APIC_SELF_IPI_VECTOR):
            return family.refuse(index, R.X2APIC_SELF_IPI_VECTOR, 1)
        if not rules.has(R.X2APIC_SELF_IPI_KEEPS_ICR):  # an ICR write of a self IPI, which the ICR keeps
            return write(family, 0x830, SHORT_SELF << 18 | data & 0xFF | (reg32(page, ICR2) << 32))
        send_ipi(vcpu, SHORT_SELF << 18 | data & 0xFF, 0)
    else:  # ID, LDR, DFR, ICR2, LVR, PPR, ISR/TMR/IRR, TMCCT, and the reserved offsets
        return family.refuse(index, E.X2APIC_NOT_WRITABLE, 1)
    return 0


def ioapic_may_take_eoi(vcpu: ModelVcpu, page: bytearray, vector: int) -> bool:
    """Whether an EOI of ``vector`` could change the in-kernel IOAPIC (``kvm_ioapic_send_eoi``,
    ``kvm_ioapic_update_eoi_one``; 6.12.118 lapic.c:1463-1490, ioapic.c:531-590, x86.c:10408). It reaches the IOAPIC only for a
    vector in ``ioapic_handled_vectors``, which the scan at a VM entry fills (so never before the first run), and
    changes a pin only when the vector is level-triggered in TMR and not suppressed: SPIV's directed-EOI bit keeps
    it from the in-kernel IOAPIC unless KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST (6.18.17's
    ``kvm_lapic_suppress_eoi_broadcast``). Then a pin of that vector loses its remote IRR, and one whose line is
    still asserted is served again."""
    chips = vcpu.vm.chips
    if not vcpu.has_run or not chips or not reg32(page, TMR + 0x10 * (vector >> 5)) >> (vector & 31) & 1:
        return False
    if reg32(page, SPIV) & 0x1000 and vcpu.vm.suppress_eoi_broadcast != "disabled":
        return False
    ioapic = chips[2].chip.ioapic
    return any(entry & 0xFF == vector and (entry >> 14 & 1 or (not entry >> 16 & 1 and ioapic.irr >> pin & 1))
               for pin, entry in enumerate(ioapic.redirtbl))


def timer_mode_mask(vcpu: ModelVcpu) -> int:
    """``lapic_timer.timer_mode_mask``: 0 until a KVM_SET_CPUID with leaf 1, then periodic (bit 17), and
    TSC-deadline (bit 18) with CPUID.1:ECX[24] (cpuid.c:397-405)."""
    leaf = next((e for e in vcpu.cpuid if e.function == 1), None)
    if leaf is None:
        return 0
    return 3 << 17 if leaf.ecx >> 24 & 1 else 1 << 17


def highest_bit(page: bytearray, base: int) -> int:
    """The highest vector set in the 256-bit register at ``base`` (ISR, TMR, IRR), or -1."""
    for word in range(7, -1, -1):
        value = reg32(page, base + 0x10 * word)
        if value:
            return 32 * word + value.bit_length() - 1
    return -1


def clear_bit(page: bytearray, base: int, vector: int) -> None:
    offset = base + 0x10 * (vector >> 5)
    set_reg32(page, offset, reg32(page, offset) & ~(1 << (vector & 31)))


def set_bit(page: bytearray, base: int, vector: int) -> None:
    offset = base + 0x10 * (vector >> 5)
    set_reg32(page, offset, reg32(page, offset) | 1 << (vector & 31))


def update_ppr(page: bytearray) -> None:
    """``apic_update_ppr`` (lapic.c:968-988): TPR when its class is at least the highest in-service vector's, else
    that vector's class."""
    tpr, isrv = reg32(page, TPR), max(highest_bit(page, ISR), 0)
    set_reg32(page, PPR, tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0)


def send_ipi(vcpu: ModelVcpu, low: int, dest: int) -> None:
    """``kvm_apic_send_ipi`` from an x2APIC-mode APIC, as it reaches this vCPU (``kvm_apic_match_dest``,
    ``__apic_accept_irq``): a Fixed or Lowest-priority interrupt sets the vector's IRR bit and sets or clears its
    TMR bit by the trigger mode, when the APIC is software-enabled and the interrupt is not a level-triggered
    deassert. An IPI that another vCPU's APIC could take, or of another delivery mode than those and ExtINT (which
    does nothing), is a model limitation."""
    page = vcpu.lapic
    assert page is not None
    vector, mode, logical = low & 0xFF, low >> 8 & 7, bool(low & 1 << 11)
    level, trigger, shorthand = bool(low & 1 << 14), bool(low & 1 << 15), low >> 18 & 3
    others = [v for v in vcpu.vm.vcpus if v is not vcpu and v.lapic is not None and v.sregs.apic_base & 1 << 11]
    if shorthand != SHORT_SELF and others:
        raise vcpu.limitation("an IPI another vCPU's APIC could take: the model delivers no interrupt between vCPUs")
    if shorthand == SHORT_NONE:
        if dest == X2APIC_BROADCAST:
            mine = True
        elif logical:
            ldr = reg32(page, LDR)
            mine = ldr >> 16 == dest >> 16 and bool(ldr & dest & 0xFFFF)
        else:  # kvm_apic_match_physical_addr: the vCPU id in x2APIC mode, whatever the ID register says
            mine = dest == vcpu.id
    else:
        mine = shorthand in (SHORT_SELF, SHORT_ALL)
    if not mine or mode == APIC_DM_EXTINT:
        return
    if mode not in (APIC_DM_FIXED, APIC_DM_LOWEST):
        raise vcpu.limitation(f"an IPI of delivery mode {mode} to the vCPU itself (SMI, remote read, NMI, INIT or "
                              "SIPI): the model keeps no state for it")
    if (trigger and not level) or not reg32(page, SPIV) & SPIV_ENABLED:
        return
    (set_bit if trigger else clear_bit)(page, TMR, vector)
    set_bit(page, IRR, vector)
