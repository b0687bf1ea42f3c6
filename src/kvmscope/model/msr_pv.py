"""Machine-check, KVM paravirtual and x2APIC MSRs, host-initiated (``host``) and guest alike.

``set_msr_mce``/``get_msr_mce`` (x86.c:3060, 3734 in the extracted 6.12 tree; unchanged in 6.18): MCG_CAP starts at
``KVM_MAX_MCE_BANKS`` (32 banks, no CTL_P, no CMCI_P; only KVM_X86_SETUP_MCE changes it: ``ModelVcpu.setup_mce``).
The MCi_CTL2 banks exist from 6.0 (``Ruleset.mci_ctl2``). The KVM PV MSRs (x86.c:3551-3617): ``guest_pv_has`` is
true for every feature unless userspace enabled KVM_CAP_ENFORCE_PV_FEATURE_CPUID (not modelled). The kvmclock MSRs
(0x11, 0x12, 0x4B564D00/01) store any value and stay with ``msr_rules``.

Without an in-kernel LAPIC (no KVM_CREATE_IRQCHIP on the VM) the rules that need one refuse: ASYNC_PF_EN of a
non-zero value (``kvm_pv_enable_async_pf``), ASYNC_PF_INT (``kvm_pv_enable_async_pf_int``), and every x2APIC MSR
0x800-0x8FF (``kvm_x2apic_msr_read``/``write``: no LAPIC, or not in x2APIC mode; with one in x2APIC mode, ``x2apic``).
With an irqchip the vCPU's own setters take ASYNC_PF_EN/INT over (``vcpu_state``, ``take_rules``): ASYNC_PF_EN then
needs its address in guest memory when enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..kernel import emulated as E
from ..kernel import rulesets as R
from . import x2apic
from .msr_family import FAIL, OK, U64, UNSUPPORTED, Family, Getter, Setter, WriteCheck

if TYPE_CHECKING:
    from .msr_rules import MsrRules

MCG_CTL_P, MCG_CMCI_P = 1 << 8, 1 << 10
MCI_CTL2_MASK = 1 << 30 | 0x7FFF  # MCI_CTL2_CMCI_EN | MCI_CTL2_CMCI_THRESHOLD_MASK
KVM_STEAL_RESERVED_MASK = 0x3E  # ((1 << KVM_STEAL_ALIGNMENT_BITS) - 1) << 1
MSR_MCG_CAP, MSR_MCG_STATUS, MSR_MCG_CTL = 0x179, 0x17A, 0x17B
MSR_P5_MC_ADDR, MSR_P5_MC_TYPE = 0x0, 0x1
MSR_HWCR = 0xC0010015
_MC_CTL_OK = frozenset({0, U64, U64 ^ 1, U64 ^ 1 << 10, U64 ^ (1 << 10 | 1)})  # (data | 1 << 10 | 1) == U64, or 0
MC_CTL = range(0x400, 0x480)  # MSR_IA32_MC0_CTL ... MSR_IA32_MCx_CTL(KVM_MAX_MCE_BANKS) - 1
MC_CTL2 = range(0x280, 0x2A0)  # MSR_IA32_MC0_CTL2 ... MSR_IA32_MCx_CTL2(KVM_MAX_MCE_BANKS) - 1
PV_ASYNC_PF_EN, PV_STEAL_TIME, PV_EOI_EN, PV_POLL_CONTROL, PV_ASYNC_PF_INT, PV_ASYNC_PF_ACK = range(0x4B564D02, 0x4B564D08)
X2APIC_MSRS = range(0x800, 0x900)
MCE_MSRS = (MSR_MCG_CAP, MSR_MCG_STATUS, MSR_MCG_CTL, MSR_P5_MC_ADDR, MSR_P5_MC_TYPE, *MC_CTL, *MC_CTL2)
ALL_INDICES = frozenset((*MCE_MSRS, *range(PV_ASYNC_PF_EN, PV_ASYNC_PF_ACK + 1), *X2APIC_MSRS))


class PvMceMsrs(Family):
    """MCG_*, MCi_* banks, KVM PV MSRs and x2APIC MSRs of one vCPU (state in ``rules.stored``)."""

    def __init__(self, rules: MsrRules) -> None:
        super().__init__(rules)
        # A profile whose vendor module takes MCG_CAP writes (``vendor_msrs``) lets a batch change it: the rules that
        # read it must then run entry by entry, with no check or group decided before the batch's writes.
        self.cap_fixed = MSR_MCG_CAP not in rules.profile.vendor_msrs
        stored = rules.stored
        # Before 6.0 (281b52780b57) KVM has no MCi_CTL2: 0x280-0x29F are the MTRR code's (mtrr.routed).
        mce = MCE_MSRS if rules.rules.mci_ctl2 else tuple(i for i in MCE_MSRS if i not in MC_CTL2)
        for index in (MSR_MCG_STATUS, MSR_MCG_CTL, PV_ASYNC_PF_EN, PV_STEAL_TIME, PV_EOI_EN, *MC_CTL,
                      *(MC_CTL2 if rules.rules.mci_ctl2 else ())):
            stored.setdefault(index, 0)
        stored.setdefault(MSR_MCG_CAP, 0x20)  # kvm_arch_vcpu_create: mcg_cap = KVM_MAX_MCE_BANKS
        stored.setdefault(PV_POLL_CONTROL, 1)  # kvm_arch_vcpu_create: msr_kvm_poll_control = 1
        handlers: dict[int, tuple[Getter, Setter]] = {index: (self._get_mce, self._set_mce) for index in mce}
        handlers.update({
            PV_ASYNC_PF_EN: (self._get_stored, self._set_async_pf_en),
            PV_ASYNC_PF_INT: (self._get_zero, self._set_no_lapic),
            PV_ASYNC_PF_ACK: (self._get_zero, self._set_ignored),
            PV_STEAL_TIME: (self._get_stored, self._set_steal_time),
            PV_EOI_EN: (self._get_stored, self._set_pv_eoi),
            PV_POLL_CONTROL: (self._get_stored, self._set_poll_control),
        })
        for index in X2APIC_MSRS:
            handlers[index] = (self._get_x2apic, self._set_x2apic)
        self.install(handlers)

    # -- machine check (x86.c:3060 set_msr_mce, 3734 get_msr_mce) --
    def _get_mce(self, index: int, host: bool) -> tuple[int, int]:
        stored = self.rules.stored
        cap = stored[MSR_MCG_CAP]
        banks = cap & 0xFF
        if index in (MSR_P5_MC_ADDR, MSR_P5_MC_TYPE):
            return OK, 0
        if index == MSR_MCG_CTL and not cap & MCG_CTL_P and not host:
            return self.refuse(index, E.MCE, FAIL), 0
        if index in MC_CTL2 and (index >= 0x280 + banks or (not cap & MCG_CMCI_P and not host)):
            return self.refuse(index, E.MCE, FAIL), 0
        if index in MC_CTL and index >= 0x400 + 4 * banks:
            return self.refuse(index, E.MCE, FAIL), 0
        return OK, stored[index]

    def _set_mce(self, index: int, data: int, host: bool) -> int:
        stored = self.rules.stored
        cap = stored[MSR_MCG_CAP]
        banks = cap & 0xFF
        if index in (MSR_MCG_CAP, MSR_P5_MC_ADDR, MSR_P5_MC_TYPE):  # not in kvm_set_msr_common's switch
            return self.refuse(index, E.READ_ONLY, UNSUPPORTED)
        if index == MSR_MCG_CTL:
            if (not cap & MCG_CTL_P and (data or not host)) or data not in (0, U64):
                return self.refuse(index, E.MCE, FAIL)
        elif index in MC_CTL2:
            if index >= 0x280 + banks or (not cap & MCG_CMCI_P and (data or not host)) or data & ~MCI_CTL2_MASK:
                return self.refuse(index, E.MCE, FAIL)
        elif index in MC_CTL:
            if index >= 0x400 + 4 * banks:
                return self.refuse(index, E.MCE, FAIL)
            if index % 4 == 0 and data and (data | 1 << 10 | 1) != U64:  # MCi_CTL: 0 or all ones
                return self.refuse(index, E.MCE, FAIL)
            if not host and index % 4 == 1 and data and not (self.amd_compatible() and stored[MSR_HWCR] >> 18 & 1):
                return self.refuse(index, E.MCE, FAIL)  # can_set_mci_status
        stored[index] = data
        return OK

    # -- the MCi banks in bulk (msr_batch): host writes of MCi_STATUS/ADDR/MISC take any value, MCi_CTL 0 or all ones
    # (bits 0 and 10 aside), within the banks MCG_CAP gives --
    def bulk_kind(self, index: int) -> str | None:
        if index in MC_CTL and self.cap_fixed:
            return "mc_ctl" if index % 4 == 0 else "mc_bank"
        return "any" if index == MSR_MCG_STATUS else None  # set_msr_mce stores any host write of MCG_STATUS

    def bulk_ok(self, kind: str, indices: Sequence[int], values: Sequence[int]) -> bool:
        if max(indices) >= 0x400 + 4 * (self.rules.stored[MSR_MCG_CAP] & 0xFF):
            return False
        return kind == "mc_bank" or _MC_CTL_OK.issuperset(values)

    def write_check(self, index: int) -> WriteCheck | None:
        setter = self.handlers[index][1]
        if setter == self._set_steal_time:
            return 0, KVM_STEAL_RESERVED_MASK, False
        if setter == self._set_async_pf_en:  # bits 4-5 reserved; with no in-kernel LAPIC only 0 is taken
            return 0, 0x30 if self.lapic_in_kernel() else U64, False
        if setter == self._set_pv_eoi:  # aligned, and when enabled the address in guest memory
            return 0, 2, True
        if setter == self._set_poll_control:
            return 0, U64 ^ 1, False
        if not self.cap_fixed:
            return None
        if index == MSR_MCG_CTL:  # host: 0 or all ones with MCG_CTL_P, else 0 alone
            return (1, U64 ^ 1, False) if self.rules.stored[MSR_MCG_CAP] & MCG_CTL_P else (0, U64, False)
        if index in MC_CTL and index % 4 and index < 0x400 + 4 * (self.rules.stored[MSR_MCG_CAP] & 0xFF):
            return 0, 0, False  # MCi_STATUS/ADDR/MISC within MCG_CAP's banks: any host write
        return None

    def read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        if index in (MSR_MCG_STATUS, MSR_MCG_CTL):  # a host read gives the stored value (get_msr_mce)
            return self.rules.stored, index, 0
        return super().read_source(index)

    def bulk_read_kind(self, index: int) -> str | None:
        return "mc_bank" if index in MC_CTL and self.cap_fixed else None

    def bulk_read_ok(self, kind: str, indices: Sequence[int]) -> bool:
        return indices[-1] < 0x400 + 4 * (self.rules.stored[MSR_MCG_CAP] & 0xFF)  # sorted: the last is the highest

    # -- KVM PV MSRs (x86.c:3551-3617, 3132 kvm_pv_enable_async_pf; lapic.c kvm_lapic_set_pv_eoi) --
    def _set_async_pf_en(self, index: int, data: int, host: bool) -> int:
        if data & 0x30 or (data and not self.lapic_in_kernel()):
            return self.refuse(index, E.PV_MSR, FAIL)
        self.rules.stored[index] = data
        return OK

    def _set_no_lapic(self, index: int, data: int, host: bool) -> int:
        return self.refuse(index, E.PV_MSR, FAIL)  # ASYNC_PF_INT: reserved bits 63:8, then no in-kernel LAPIC

    def _set_steal_time(self, index: int, data: int, host: bool) -> int:
        if data & KVM_STEAL_RESERVED_MASK:
            return self.refuse(index, E.PV_MSR, FAIL)
        self.rules.stored[index] = data
        return OK

    def _set_pv_eoi(self, index: int, data: int, host: bool) -> int:
        addr = data & ~1
        if addr % 4:
            return self.refuse(index, E.PV_MSR, FAIL)
        if data & 1 and not self.rules.vm.has_memory(addr, 1):  # kvm_gfn_to_hva_cache_init fails
            if self.rules.rules.has(R.PV_EOI_STORED_ON_FAILURE):  # before 5.16 the value was stored first
                self.rules.stored[index] = data
            return self.refuse(index, E.PV_MSR, FAIL)
        self.rules.stored[index] = data
        return OK

    def _set_poll_control(self, index: int, data: int, host: bool) -> int:
        if data & ~1:
            return self.refuse(index, E.PV_MSR, FAIL)
        self.rules.stored[index] = data
        return OK

    # -- x2APIC MSRs: refused without an in-kernel LAPIC in x2APIC mode; with one, its registers (``x2apic``) --
    def _get_x2apic(self, index: int, host: bool) -> tuple[int, int]:
        return x2apic.read(self, index)

    def _set_x2apic(self, index: int, data: int, host: bool) -> int:
        return x2apic.write(self, index, data)
