"""The nested VMX capability MSRs 0x480-0x491: KVM's restore rules for host writes and how reads are formed.

From ``vmx_set_vmx_msr``/``vmx_restore_*``/``vmx_get_vmx_msr`` in ``arch/x86/kvm/vmx/nested.c`` (linux-next
@16d18d8a97ea) and ``vmx_set_msr``/``vmx_get_msr`` in ``vmx/vmx.c``. ``kvm`` is ``vmcs_config.nested``: the values
the host reports as feature MSRs.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..api import CpuidEntry
from .cpuid import RDPID, RDTSCP, has_feature

if TYPE_CHECKING:
    from ..kernel.rulesets import Ruleset

EINVAL = -errno.EINVAL
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# Non-true controls read as the TRUE value plus the default-1 bits (*_ALWAYSON_WITHOUT_TRUE_MSR).
TRUE_OF = {0x481: 0x48D, 0x482: 0x48E, 0x483: 0x48F, 0x484: 0x490}
DEFAULT1 = {0x481: 0x16, 0x482: 0x0401E172, 0x483: 0x36DFF, 0x484: 0x11FF}
CONTROLS = (0x48D, 0x48E, 0x48F, 0x490, 0x48B)
SLOTS = (0x480, 0x485, 0x486, 0x487, 0x488, 0x489, 0x48A, 0x48B, 0x48C, 0x48D, 0x48E, 0x48F, 0x490, 0x491)

PIN_BASED_VMX_PREEMPTION_TIMER = 1 << 6


def bitwise_subset(superset: int, subset: int, mask: int) -> bool:
    """``is_bitwise_subset``: every bit of ``subset`` under ``mask`` is also set in ``superset``."""
    superset &= mask
    subset &= mask
    return (superset | subset) == superset


def slots_from(values: dict[int, int]) -> dict[int, int]:
    """The stored form (one slot per control pair) of a set of MSR values such as the host's feature MSRs."""
    return {s: values.get(s, 0) for s in SLOTS}


def read(slots: dict[int, int], index: int) -> int | None:
    """``vmx_get_vmx_msr``: the value a read of ``index`` returns, or None for an index outside the range."""
    if index in TRUE_OF:
        return slots[TRUE_OF[index]] | DEFAULT1[index]
    return slots.get(index)


def _gen(hi: int, lo: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


def restore_basic(kvm: int, data: int) -> bool:
    feature = 1 << 49 | 1 << 54 | 1 << 55 | 1 << 56
    reserved = _gen(63, 57) | _gen(47, 45) | 1 << 31
    if not bitwise_subset(kvm, data, feature | reserved):
        return False
    if data & 1 << 48:
        return False
    if kvm & 0x7FFFFFFF != data & 0x7FFFFFFF:
        return False
    return not (kvm >> 32 & 0x1FFF) > (data >> 32 & 0x1FFF)


def restore_control(kvm: int, data: int) -> bool:
    if not bitwise_subset(data, kvm, U32):
        return False
    return bitwise_subset(kvm, data, U32 << 32)


def restore_misc(kvm: int, data: int, current_pinbased: int) -> bool:
    feature = 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 14 | 1 << 15 | 1 << 28 | 1 << 29 | 1 << 30
    reserved = 1 << 31 | _gen(13, 9)
    if not bitwise_subset(kvm, data, feature | reserved):
        return False
    if current_pinbased >> 32 & PIN_BASED_VMX_PREEMPTION_TIMER and (data & 0x1F) != (kvm & 0x1F):
        return False
    if (data >> 16 & 0x1FF) > (kvm >> 16 & 0x1FF):
        return False
    if (data >> 25 & 0x7) > (kvm >> 25 & 0x7):
        return False
    return data >> 32 == kvm >> 32


def write(slots: dict[int, int], kvm: dict[int, int], index: int, data: int) -> int:
    """``vmx_set_vmx_msr``: store ``data`` in ``slots`` and return 0, or return -EINVAL and change nothing."""
    k = kvm.get(index, 0)
    if index == 0x480:
        ok = restore_basic(k, data)
    elif index in CONTROLS:
        ok = restore_control(k, data)
    elif index == 0x485:
        ok = restore_misc(k, data, slots[0x48D])
    elif index in (0x486, 0x488):
        ok = bitwise_subset(data, k, U64)
    elif index == 0x48C:
        ok = bitwise_subset(k, data, U64)
    elif index == 0x48A:
        ok = True
    elif index == 0x491:
        ok = not data & ~k
    else:  # 0x481-0x484 (non-true controls), 0x487 and 0x489 (CR0/CR4_FIXED1, derived from CPUID)
        ok = False
    if not ok:
        return EINVAL
    slots[index] = data
    return 0


# --- facts vmx.c derives from guest CPUID (vmx_vcpu_after_set_cpuid, vmx_set_msr) ---------------------------------

MSR_IA32_FEAT_CTL = 0x3A
# KVM_SUPPORTED_FEATURE_CONTROL (vmx.c): LOCKED | VMX inside/outside SMX | SGX_LC | SGX | LMCE.
KVM_SUPPORTED_FEATURE_CONTROL = 0x160007


def feature_control_valid_bits(cpuid: Sequence[CpuidEntry], nested: bool) -> int:
    """``msr_ia32_feature_control_valid_bits`` before 6.2 (6.1.192 vmx.c:4789, 7723-7730, 7756-7766, 8059-8064):
    LOCKED, the VMX bits when nested and guest CPUID has VMX, SGX and SGX_LC with their CPUID bits. LMCE needs
    MCG_CAP.LMCE_P from KVM_X86_SETUP_MCE, which the model does not offer."""
    bits = 1
    if nested and has_feature(cpuid, 1, 0, "ecx", 5):
        bits |= 0x6
    if has_feature(cpuid, 7, 0, "ebx", 2):
        bits |= 1 << 18
    if has_feature(cpuid, 7, 0, "ecx", 30):
        bits |= 1 << 17
    return bits

# nested_vmx_cr_fixed1_bits_update: guest CPUID bit -> CR4 bits it allows.
CR4_FIXED1_MAP: tuple[tuple[tuple[int, int, str, int], int], ...] = (
    ((1, 0, "edx", 1), 1 << 0 | 1 << 1),  # VME -> VME, PVI
    ((1, 0, "edx", 4), 1 << 2),  # TSC -> TSD
    ((1, 0, "edx", 2), 1 << 3),  # DE
    ((1, 0, "edx", 3), 1 << 4),  # PSE
    ((1, 0, "edx", 6), 1 << 5),  # PAE
    ((1, 0, "edx", 7), 1 << 6),  # MCE
    ((1, 0, "edx", 13), 1 << 7),  # PGE
    ((1, 0, "edx", 24), 1 << 9),  # FXSR -> OSFXSR
    ((1, 0, "edx", 25), 1 << 10),  # XMM -> OSXMMEXCPT
    ((1, 0, "ecx", 5), 1 << 13),  # VMX -> VMXE
    ((1, 0, "ecx", 6), 1 << 14),  # SMX -> SMXE
    ((1, 0, "ecx", 17), 1 << 17),  # PCID -> PCIDE
    ((1, 0, "ecx", 26), 1 << 18),  # XSAVE -> OSXSAVE
    ((7, 0, "ebx", 0), 1 << 16),  # FSGSBASE
    ((7, 0, "ebx", 7), 1 << 20),  # SMEP
    ((7, 0, "ebx", 20), 1 << 21),  # SMAP
    ((7, 0, "ecx", 3), 1 << 22),  # PKU -> PKE
    ((7, 0, "ecx", 2), 1 << 11),  # UMIP
    ((7, 0, "ecx", 16), 1 << 12),  # LA57
    ((7, 0, "ecx", 7), 1 << 23),  # SHSTK -> CET
    ((7, 0, "edx", 20), 1 << 23),  # IBT -> CET
    ((7, 1, "eax", 26), 1 << 28),  # LAM -> LAM_SUP
)
# vmx_secondary_exec_control adjustments of PROCBASED_CTLS2 (allowed-1 bit) by guest CPUID, with the quirk on.
SECONDARY_ADJUST: tuple[tuple[int, tuple[tuple[int, int, str, int], ...]], ...] = (
    (20, ((0xD, 1, "eax", 3),)),  # ENABLE_XSAVES <- XSAVES
    (3, ((0x80000001, 0, "edx", 27), (7, 0, "ecx", 22))),  # ENABLE_RDTSCP <- RDTSCP or RDPID
    (12, ((7, 0, "ebx", 10),)),  # ENABLE_INVPCID <- INVPCID
    (11, ((1, 0, "ecx", 30),)),  # RDRAND_EXITING <- RDRAND
    (16, ((7, 0, "ebx", 18),)),  # RDSEED_EXITING <- RDSEED
    (26, ((7, 0, "ecx", 5),)),  # ENABLE_USR_WAIT_PAUSE <- WAITPKG
)


def after_set_cpuid(slots: dict[int, int], hardware: int, raw: Sequence[CpuidEntry],
                    supported: Sequence[CpuidEntry], rules: Ruleset, adjust: bool) -> None:
    """``vmx_vcpu_after_set_cpuid`` on the vCPU's VMX MSRs ``slots`` (``raw``: the CPUID as the VMM gave it, before
    the vendor's rewriting): with the STUFF quirk on (``adjust``) the PROCBASED_CTLS2 allowed-1 bits follow guest
    CPUID; with guest VMX, CR0_FIXED1 and CR4_FIXED1 are rebuilt. ``hardware``: the PROCBASED_CTLS2 the CPU offers
    nested VMX, which decides (``cpu_has_vmx_*``), even for a bit this KVM does not advertise yet (USR_WAIT_PAUSE
    before 6.2: ``vmx_usr_wait_pause``); from 6.13 KVM's own value decides too, and holds every such bit it has."""
    if adjust:
        high = slots[0x48B]
        for bit, sources in SECONDARY_ADJUST:
            if hardware >> 32 >> bit & 1:
                # from 6.14 guest_cpu_cap_has: the guest's bit and KVM's support (RDPID emulated where the host has
                # RDTSCP); before, the guest's bit alone (6.12.118 vmx.c:4604-4616, 4687-4694), but for XSAVES, a
                # governed feature that needs the host's too
                host = rules.guest_cpu_caps or bit == 20
                on = any(has_feature(raw, *s) and (not host or has_feature(supported, *s) or (
                    s == RDPID and has_feature(supported, *RDTSCP))) for s in sources)
                if bit == 20:  # vmx_vcpu_after_set_cpuid drops XSAVES from the guest caps without XSAVE first
                    on = on and has_feature(raw, 1, 0, "ecx", 26)
                high = high | 1 << (32 + bit) if on else high & ~(1 << (32 + bit))
        slots[0x48B] = high
    if has_feature(raw, 1, 0, "ecx", 5):
        slots[0x487] = 0xFFFFFFFF
        cr4 = 1 << 8  # PCE is always allowed
        for source, allowed in CR4_FIXED1_MAP:
            if allowed == 1 << 28 and not rules.cr4_fixed1_lam:
                continue
            if allowed == 1 << 23 and not rules.cr4_fixed1_cet:
                continue
            if has_feature(raw, *source):
                cr4 |= allowed
        slots[0x489] = cr4
