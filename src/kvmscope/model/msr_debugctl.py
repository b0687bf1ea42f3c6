"""IA32_DEBUGCTL (0x1D9) on VMX and SVM, host-initiated and guest.

Every version KVM handles the MSR (it was never "unknown"): a write of 0 is taken on both vendors. What else a write
may hold, and what a read gives, by vendor and version:

- VMX before 5.12 (``kvm_set_msr_common``, 5.10.262 x86.c:3190-3201, 3479): 0 and LBR/BTF alone are taken and
  ignored, any other bit fails; reads are 0.
- VMX from 5.12 (the guest LBR series moved the MSR into ``vmx_set_msr``; 6.1.192 vmx.c:2078-2108, 2177-2195; 6.12.118
  vmx.c:2195-2224, 2294-2311): the value KVM supports is BUS_LOCK_DETECT where the host has it, LBR and
  FREEZE_LBRS_ON_PMI where KVM's PERF_CAPABILITIES has an LBR format, RTM_DEBUG where the host has RTM (6.17); a guest
  write also needs each in the guest (its CPUID, or its PERF_CAPABILITIES' LBR format), and so did a host write until
  b333b8ebb85d (6.1). Unsupported LBR and BTF are dropped; any other unsupported bit fails. The value reads back.
- SVM (5.10.262 svm.c:2731-2745; 6.1.192 svm.c:3044-3076; 6.12.118 svm.c:3222-3256): without LBR virtualization any
  value is taken and ignored (reads 0). With it, bits 6 and up fail and bits 0-5 are stored as written; from
  ee89e8013383 (6.14) bits 5:2 are dropped and only BTF and LBR kept; from d0eac42f5cec (6.14) BTF is dropped too.
  Host and guest writes alike.

A profile whose vendor module handles the MSR itself (PVM's, recorded in the profile) keeps its own behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kernel import rulesets as R
from .msr_family import FAIL, OK, Family

if TYPE_CHECKING:
    from .msr_rules import MsrRules

MSR_IA32_DEBUGCTLMSR = 0x1D9
ALL_INDICES = frozenset({MSR_IA32_DEBUGCTLMSR})
LBR, BTF, BUS_LOCK_DETECT, FREEZE_LBRS_ON_PMI, RTM_DEBUG = 1 << 0, 1 << 1, 1 << 2, 1 << 11, 1 << 15
BUS_LOCK_DETECT_BIT = (7, 0, "ecx", 24)
RTM_BIT = (7, 0, "ebx", 11)
LBRV_BIT = (0x8000000A, 0, "edx", 1)
PERF_CAP_LBR_FMT = 0x3F
MSR_IA32_PERF_CAPABILITIES = 0x345


class DebugctlMsrs(Family):
    """DEBUGCTL of one vCPU (its value in ``rules.stored``), for VMX and SVM profiles."""

    def __init__(self, rules: MsrRules) -> None:
        super().__init__(rules)
        vendor = rules.profile.vendor
        if vendor in ("vmx", "svm"):
            rules.stored.setdefault(MSR_IA32_DEBUGCTLMSR, 0)
            self.install({MSR_IA32_DEBUGCTLMSR: (self._get, self._set_vmx if vendor == "vmx" else self._set_svm)})

    def _get(self, index: int, host: bool) -> tuple[int, int]:
        return OK, self.rules.stored[index]

    def _set_vmx(self, index: int, data: int, host: bool) -> int:
        rs = self.rules.rules
        if not rs.has(R.DEBUGCTL_VMX):  # the common handler: taken and ignored, or failed
            return self.refuse(index, R.DEBUGCTL_COMMON, FAIL) if data & ~(LBR | BTF) else OK
        supported = 0
        if self.supported(BUS_LOCK_DETECT_BIT):
            supported |= BUS_LOCK_DETECT
        if self.rules.profile.supported_perf_cap & PERF_CAP_LBR_FMT:
            supported |= LBR | FREEZE_LBRS_ON_PMI
        if rs.has(R.DEBUGCTL_RTM_DEBUG) and self.supported(RTM_BIT):
            supported |= RTM_DEBUG
        if not host or not rs.has(R.DEBUGCTL_HOST_IGNORES_CPUID):  # the guest's model too
            if not self.cpuid_has(BUS_LOCK_DETECT_BIT):
                supported &= ~BUS_LOCK_DETECT
            if not self.rules.stored.get(MSR_IA32_PERF_CAPABILITIES, 0) & PERF_CAP_LBR_FMT:  # intel_pmu_lbr_is_enabled
                supported &= ~(LBR | FREEZE_LBRS_ON_PMI)
            if not self.cpuid_has(RTM_BIT):
                supported &= ~RTM_DEBUG
        invalid = data & ~supported
        if invalid & (LBR | BTF):  # unsupported LBR and BTF are dropped, with a log line
            data &= ~(LBR | BTF)
            invalid &= ~(LBR | BTF)
        if invalid:
            return self.refuse(index, R.DEBUGCTL_VMX, FAIL)
        self.rules.stored[index] = data
        return OK

    def _set_svm(self, index: int, data: int, host: bool) -> int:
        if not self.supported(LBRV_BIT):  # lbrv off: logged and ignored
            return OK
        rs = self.rules.rules
        if rs.has(R.DEBUGCTL_SVM_PINS_DROPPED):
            data &= ~0x3C  # bits 5:2 (the old performance-monitoring/breakpoint pin controls)
            if rs.has(R.DEBUGCTL_SVM_BTF_DROPPED):
                data &= ~BTF
            reserved = ~(LBR | BTF)
        else:
            reserved = ~0x3F
        if data & reserved:
            return self.refuse(index, R.DEBUGCTL_SVM, FAIL)
        self.rules.stored[index] = data
        return OK
