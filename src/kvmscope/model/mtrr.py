"""The vMTRRs and IA32_PAT (``arch/x86/kvm/mtrr.c`` and ``kvm_pat_valid`` in ``x86.h``), host and guest alike.

``kvm_mtrr_set_msr``/``kvm_mtrr_get_msr`` (mtrr.c:92-133 in 6.12, unchanged in 6.18): MTRRcap reads
``0x500 | KVM_NR_VAR_MTRR`` and is not writable (``kvm_set_msr_common`` has no case for it: unsupported); every other
index KVM routes here is either an MTRR or fails with 1 (``find_mtrr`` finds nothing), for host and guest alike and
whatever ``ignore_msrs`` says. MTRRs hold any valid value and start at 0.

What KVM routes here depends on the version (``routed``): 0x200-0x26F and 0x2FF from 6.5 (34a83deac31c); before,
0x200-0x2FF (6.1.192 x86.c:3649-3651), less the MCi_CTL2 banks 0x280-0x29F from 6.0 (281b52780b57). Before 6.11
(0a7b73559b39) a PHYSMASK was stored with the reserved GPA bits of the time set, and both halves of a variable MTRR
read with those of the vCPU's MAXPHYADDR now cleared (6.1.192 mtrr.c:357-361, 429; 5.10 the same).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import repeat
from operator import and_
from typing import TYPE_CHECKING

from ..api import find_cpuid
from ..kernel import emulated as E
from .msr_pv import MC_CTL2

if TYPE_CHECKING:
    from ..kernel.rulesets import Ruleset
    from .msr_rules import MsrRules

OK, FAIL, UNSUPPORTED = 0, 1, 2
MSR_MTRRCAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_PAT = 0x277
KVM_NR_VAR_MTRR = 8
MTRRCAP_VALUE = 0x500 | KVM_NR_VAR_MTRR  # WC and FIX supported, no SMRR
VARIABLE = range(0x200, 0x200 + 2 * KVM_NR_VAR_MTRR)
FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRRS = frozenset((*VARIABLE, *FIXED, MSR_MTRR_DEF_TYPE))
# kvm_set_msr_common from 6.5: MTRRphysBase_MSR(0) ... MSR_MTRRfix4K_F8000 and MSR_MTRRdefType go to kvm_mtrr_set_msr.
ROUTED = frozenset((*range(0x200, 0x270), MSR_MTRR_DEF_TYPE))
ALL_INDICES = frozenset((*range(0x200, 0x300), MSR_MTRRCAP, MSR_PAT))  # what any version routes here
PAT_RESET = 0x0007040600070406  # kvm_vcpu_reset: MSR_IA32_CR_PAT_DEFAULT


def routed(rs: Ruleset) -> frozenset[int]:
    """The indices ``kvm_set_msr_common`` and ``kvm_get_msr_common`` send to the MTRR code at version ``rs``."""
    if rs.mtrr_msr_ranges:
        return ROUTED
    return frozenset(range(0x200, 0x300)).difference(MC_CTL2 if rs.mci_ctl2 else ())


def valid_type(t: int) -> bool:
    """``valid_mtrr_type``: 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB)."""
    return t < 8 and bool((1 << t) & 0x73)


def maxphyaddr(rules: MsrRules) -> int:
    """``cpuid_query_maxphyaddr``: CPUID 0x80000008 EAX[7:0] when leaf 0x80000000 reaches it, else 36."""
    cpuid = rules.vcpu.cpuid
    top = find_cpuid(cpuid, 0x80000000)
    if top is None or top.eax < 0x80000008:
        return 36
    leaf = find_cpuid(cpuid, 0x80000008)
    return leaf.eax & 0xFF if leaf is not None else 36


def reserved_gpa_bits(rules: MsrRules) -> int:
    """``kvm_vcpu_reserved_gpa_bits_raw``: ``rsvd_bits(maxphyaddr, 63)``."""
    bits = maxphyaddr(rules)
    return 0 if bits > 63 else ((1 << 64) - 1) & ~((1 << bits) - 1)


_VALID_TYPES = frozenset({0, 1, 4, 5, 6})
_VALID_TYPE_BYTES = bytes(sorted(_VALID_TYPES))
# Each byte to bit 0 when it is not a valid MTRR memory type and bit 1 when it is not a valid PAT type (which adds 7,
# UC-): a batch checks the type bytes of its MTRR and PAT writes with one ``bytes.translate`` of its buffer, masked
# per byte (``write_check``, ``memory_types``, ``msr_plan.types_valid``). Every invalid PAT type is an invalid MTRR one.
MEMORY_TYPE_INVALID = bytes((t not in _VALID_TYPES) | (t not in _VALID_TYPES | {7}) << 1 for t in range(256))
_PAT_RESERVED, _PAT_TYPES = 0xF8F8F8F8F8F8F8F8, 0x0202020202020202  # kvm_pat_valid: bits 3-7 of each byte; 2 or 3
_DEF_TYPE_RESERVED = ((1 << 64) - 1) & ~0xCFF  # MTRRdefType: the type, FE (bit 10) and E (bit 11) alone
_CONSTANT: dict[int, int] = {}  # read_source of MTRRcap: never holds a key, so its default comes back


def mtrr_valid(rules: MsrRules, index: int, data: int, reserved: int | None = None) -> bool:
    """``kvm_mtrr_valid`` (``reserved``: the vCPU's reserved GPA bits, when the caller has them at hand)."""
    if index == MSR_MTRR_DEF_TYPE:
        return not data & _DEF_TYPE_RESERVED and valid_type(data & 0xFF)
    if index in FIXED:  # eight memory types, one per byte
        return _VALID_TYPES.issuperset(data.to_bytes(8, "little"))
    mask = reserved_gpa_bits(rules) if reserved is None else reserved
    if index % 2 == 0:  # PHYSBASE
        if not valid_type(data & 0xFF):
            return False
        mask |= 0xF00
    else:  # PHYSMASK
        mask |= 0x7FF
    return not data & mask


def pat_valid(data: int) -> bool:
    """``kvm_pat_valid``: each byte 0, 1, 4, 5, 6 or 7."""
    if data & 0xF8F8F8F8F8F8F8F8:
        return False
    return (data | ((data & 0x0202020202020202) << 1)) == data


class MtrrMsrs:
    """MTRRcap, the MTRRs and PAT of one vCPU (state in ``rules.stored``)."""

    def __init__(self, rules: MsrRules) -> None:
        self.rules = rules
        self.indices = routed(rules.rules) | {MSR_MTRRCAP, MSR_PAT}
        # Before 6.11 the variable MTRRs read back through MAXPHYADDR (module docstring): not stored values a batch
        # may read or write in bulk.
        self.as_written = rules.rules.mtrr_as_written
        self._bulk_variable = VARIABLE if self.as_written else range(0x200, 0x200 + 2 * KVM_NR_VAR_MTRR, 2)
        for index in MTRRS:
            rules.stored[index] = 0
        rules.stored[MSR_PAT] = PAT_RESET
        self._gpa_of: object = None  # the CPUID list _gpa was computed from: MAXPHYADDR is read from it
        self._gpa = 0

    def get(self, index: int, host: bool) -> tuple[int, int]:
        if index == MSR_MTRRCAP:
            return OK, MTRRCAP_VALUE
        if index == MSR_PAT:
            return OK, self.rules.stored[MSR_PAT]
        if index not in MTRRS:
            return self.rules.refuse(index, E.MTRR_UNKNOWN, FAIL), 0
        if index in VARIABLE and not self.as_written:
            return OK, self.rules.stored[index] & ~self._reserved()
        return OK, self.rules.stored[index]

    def _reserved(self) -> int:
        cpuid = self.rules.vcpu.cpuid
        if cpuid is not self._gpa_of:
            self._gpa_of, self._gpa = cpuid, reserved_gpa_bits(self.rules)
        return self._gpa

    # -- the fixed and variable MTRRs in bulk (msr_batch): each check of mtrr_valid over all values at once --
    def bulk_kind(self, index: int) -> str | None:
        if index in FIXED:
            return "fixed"
        if index == MSR_MTRR_DEF_TYPE:
            return "def_type"
        if index in self._bulk_variable:
            return "base" if index % 2 == 0 else "mask"
        return None

    def bulk_ok(self, kind: str, indices: Sequence[int], values: Sequence[int]) -> bool:
        # little-endian on the hosts the batches run in bulk on
        raw = array("Q", values).tobytes()
        if kind == "fixed":
            return not raw.translate(None, _VALID_TYPE_BYTES)  # every byte a valid type: nothing left once deleted
        reserved = _DEF_TYPE_RESERVED if kind == "def_type" else self._reserved() | (0xF00 if kind == "base" else 0x7FF)
        if any(map(and_, values, repeat(reserved))):
            return False
        # PHYSBASE and MTRRdefType: the type in each low byte
        return kind == "mask" or not raw[::8].translate(None, _VALID_TYPE_BYTES)

    def write_check(self, index: int) -> tuple[int, int, bool] | None:
        # the reserved bits; the memory types are in memory_types
        if index in self._bulk_variable:
            return 0, self._reserved() | (0x7FF if index % 2 else 0xF00), False
        if index in FIXED:
            return 0, 0, False
        if index == MSR_MTRR_DEF_TYPE:
            return 0, _DEF_TYPE_RESERVED, False
        if index == MSR_PAT:  # the reserved bits; the types (2 and 3 refused) are in memory_types
            return 0, _PAT_RESERVED, False
        return None

    def memory_types(self, index: int) -> int:
        if index in FIXED:  # eight types, one per byte
            return (1 << 64) - 1
        if index == MSR_PAT:
            return _PAT_TYPES
        return 0xFF if index == MSR_MTRR_DEF_TYPE or (index in VARIABLE and index % 2 == 0) else 0

    def bulk_read_kind(self, index: int) -> str | None:
        return None  # read_source covers every MTRR read

    def bulk_read_ok(self, kind: str, indices: Sequence[int]) -> bool:
        return False

    def read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        if index == MSR_MTRRCAP:
            return _CONSTANT, index, MTRRCAP_VALUE
        if index in VARIABLE and not self.as_written:
            return None
        return (self.rules.stored, index, 0) if index in MTRRS or index == MSR_PAT else None

    def set(self, index: int, data: int, host: bool) -> int:
        rules = self.rules
        if index == MSR_MTRRCAP:
            return rules.refuse(index, E.READ_ONLY, UNSUPPORTED)
        if index == MSR_PAT:
            if not pat_valid(data):
                return rules.refuse(index, E.PAT_VALID, FAIL)
        elif index not in MTRRS:
            return rules.refuse(index, E.MTRR_UNKNOWN, FAIL)
        elif not mtrr_valid(rules, index, data, self._reserved()):
            return rules.refuse(index, E.MTRR_VALID, FAIL)
        elif index in VARIABLE and index % 2 and not self.as_written:
            data |= self._reserved()  # PHYSMASK before 6.11: the reserved bits stored set, cleared when read
        rules.stored[index] = data
        return OK

