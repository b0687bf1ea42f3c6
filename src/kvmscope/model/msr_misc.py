"""The MSRs KVM emulates in common code beyond the feature MSRs: the rules of ``kvm_set_msr_common``,
``kvm_get_msr_common``, ``__kvm_set_msr``/``__kvm_get_msr``, ``set_efer``, ``set_msr_mce``/``get_msr_mce``, the KVM PV
MSRs and ``kvm_apic_set_base`` (lapic.c), host-initiated (``host``) and guest alike.

Sources: ``arch/x86/kvm/x86.c`` of the extracted 6.12 tree (line numbers below) and ``CachyOS/linux`` x86.c
@4703912f5e30 (6.18+), the same rules except where a comment names 6.18. The vendor module (``vmx_set_msr``/
``svm_set_msr``/``pvm_set_msr``) runs first; where it stores a value differently the profile's vendor says so
(SYSENTER_ESP/EIP on SVM). Machine-check, KVM PV and x2APIC MSRs are in ``msr_pv``; MTRRs and PAT in ``mtrr``.
Without an in-kernel LAPIC TSC_DEADLINE reads 0 and drops writes (``kvm_set_lapic_tscdeadline_msr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..api import find_cpuid
from ..kernel import emulated as E
from ..kernel import rulesets as R
from . import cpuid as C
from .msr_family import _NOTHING, FAIL, OK, U64, UNSUPPORTED, Bit, Family, Getter, Setter, WriteCheck, canonical
from .msr_fixed import LEGACY_PMU, READ_ONLY, WRITE_IGNORED
from .mtrr import reserved_gpa_bits

if TYPE_CHECKING:
    from .msr_rules import MsrRules


# CPUID bits (function, index, register, bit) the rules consult.
X2APIC, SSE3 = (1, 0, "ecx", 21), (1, 0, "ecx", 0)
LM, NX = (0x80000001, 0, "edx", 29), (0x80000001, 0, "edx", 20)
SVM, FFXSR = (0x80000001, 0, "ecx", 2), (0x80000001, 0, "edx", 25)
RDTSCP, RDPID, MSR_VM_HSAVE_PA = C.RDTSCP, C.RDPID, 0xC0010117
TSC_ADJUST, OSVW = (7, 0, "ebx", 1), (0x80000001, 0, "ecx", 9)
XSAVES, XFD = (0xD, 1, "eax", 3), (0xD, 1, "eax", 4)
FLUSH_L1D: Bit = (7, 0, "edx", 28)
SPEC_CTRL, AMD_IBPB, SBPB = (7, 0, "edx", 26), (0x80000008, 0, "ebx", 12), (0x80000021, 0, "eax", 27)
AUTOIBRS, LA57 = (0x80000021, 0, "eax", 8), (7, 0, "ecx", 16)

EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1, 1 << 8, 1 << 10, 1 << 11
EFER_SVME, EFER_LMSLE, EFER_FFXSR, EFER_AUTOIBRS = 1 << 12, 1 << 13, 1 << 14, 1 << 21
# __kvm_valid_efer (x86.c:1306): the CPUID bit each EFER bit needs, for a guest (and KVM_SET_SREGS: sregs_efer_checked)
EFER_NEEDS = ((EFER_AUTOIBRS, AUTOIBRS), (EFER_FFXSR, FFXSR), (EFER_SVME, SVM), (EFER_LME | EFER_LMA, LM), (EFER_NX, NX))
APIC_BSP, X2APIC_ENABLE, APIC_ENABLE = 1 << 8, 1 << 10, 1 << 11
MISC_ENABLE_EMON, MISC_ENABLE_MWAIT = 1 << 7, 1 << 18
MISC_ENABLE_PMU_RO = 1 << 11 | 1 << 12  # BTS_UNAVAIL | PEBS_UNAVAIL
KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT, PRED_CMD_IBPB, PRED_CMD_SBPB = 1 << 4, 1, 1 << 7

KVM_CAP_X86_SMM, MSR_APIC_BASE, MSR_EFER = 117, 0x1B, 0xC0000080
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0xC0000083
CANONICAL_MSRS = frozenset({MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR})
MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_PRED_CMD, MSR_FLUSH_CMD = 0x175, 0x176, 0x49, 0x10B
MSR_TSC_AUX, MSR_TSC_ADJUST, MSR_TSC_DEADLINE = 0xC0000103, 0x3B, 0x6E0
MSR_MISC_ENABLE, MSR_SMBASE, MSR_SMI_COUNT, MSR_POWER_CTL = 0x1A0, 0x9E, 0x34, 0x1FC
MSR_HWCR, MSR_MMIO_CONF_BASE = 0xC0010015, 0xC0010058
MSR_OSVW_ID_LENGTH, MSR_OSVW_STATUS, MSR_XSS, MSR_XFD, MSR_XFD_ERR = 0xC0010140, 0xC0010141, 0xDA0, 0x1C4, 0x1C5

# Every index this family may own (the legacy PMU ones only with the PMU off): no batch may treat them as store-only.
ALL_INDICES = frozenset({
    MSR_APIC_BASE, MSR_EFER, MSR_TSC_AUX, MSR_TSC_ADJUST, MSR_TSC_DEADLINE, MSR_MISC_ENABLE, MSR_SMBASE, MSR_SMI_COUNT,
    MSR_POWER_CTL, MSR_HWCR, MSR_MMIO_CONF_BASE, MSR_OSVW_ID_LENGTH, MSR_OSVW_STATUS, MSR_XSS, MSR_XFD, MSR_XFD_ERR,
    MSR_PRED_CMD, MSR_FLUSH_CMD, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, *CANONICAL_MSRS, *READ_ONLY, *WRITE_IGNORED,
    *LEGACY_PMU,
})


class MiscMsrs(Family):
    """The common-code MSR rules of one vCPU. State lives where the rest of the model reads it: EFER and APIC_BASE in
    ``vcpu.sregs`` (KVM_GET_SREGS shows them), FS/GS base in the segment registers, the rest in ``rules.stored``."""

    def __init__(self, rules: MsrRules) -> None:
        super().__init__(rules)
        p = rules.profile
        supported = p.supported_cpuid
        ruleset = rules.rules
        # max_host_virt_addr_bits: 57 with LA57 on the host, else 48 (before 6.13: the guest's CR4.LA57 chose).
        self.host_width = ruleset.has(E.CANONICAL_HOST_WIDTH)
        self.virt_bits = 57 if C.has_feature(supported, *LA57) else 48
        self.xss_gated = ruleset.has(E.XSS_NEEDS_XSAVES)
        self.vendor_checks = ruleset.guest_vendor_checks
        self.svm = p.vendor == "svm"
        self.hwcr_tscfreqsel = ruleset.has(E.HWCR_TSCFREQSEL)
        self.apic_same_ok = ruleset.has(R.APIC_BASE_SAME_VALUE)
        self.sbpb = ruleset.has(R.PRED_CMD_SBPB)
        # efer_reserved_bits: SCE, LME, LMA; NX if the host has it; SVM: FFXSR, AUTOIBRS as the host, SVME|LMSLE with
        # nested=1 (6.12.118 svm.c:5502-5531). PVM and VMX: no more (this host: 0xD01 accepted, 0x1000 refused).
        allowed = EFER_SCE | EFER_LME | EFER_LMA | (EFER_NX if C.has_feature(supported, *NX) else 0)
        if p.vendor == "svm":
            autoibrs = C.has_feature(supported, *AUTOIBRS) and ruleset.has(R.EFER_AUTOIBRS)  # 6.3
            allowed |= ((EFER_SVME | EFER_LMSLE if p.nested_svm else 0) | (EFER_AUTOIBRS if autoibrs else 0)
                        | (EFER_FFXSR if C.has_feature(supported, *FFXSR) else 0))
        self.efer_allowed = allowed
        self.pmu_off = p.module_parameters.get("kvm.enable_pmu", "Y") == "N"
        # CONFIG_KVM_SMM (6.2): KVM_CAP_X86_SMM (117) is 0 without it (kvm_vm_ioctl_check_extension), and SMBASE then
        # fails; before 6.2 a host access never did. The capability is also 0 with SMM built in where the vendor
        # cannot run it (VMX without unrestricted guest, 6.12.118 vmx.c:7049-7056): there a capture found SMBASE
        # readable by the host, which is the evidence that counts.
        smbase = p.msr_behaviour.get(MSR_SMBASE)
        self.smm = (p.capability(KVM_CAP_X86_SMM) != 0 or (smbase is not None and smbase.readable)
                    or not ruleset.has(R.SMBASE_NEEDS_SMM))
        stored = rules.stored
        for index in (MSR_HWCR, MSR_OSVW_ID_LENGTH, MSR_OSVW_STATUS, MSR_XSS, MSR_XFD, MSR_XFD_ERR, MSR_TSC_AUX,
                      MSR_TSC_ADJUST, MSR_SMI_COUNT, MSR_POWER_CTL, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR,
                      MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_MISC_ENABLE):
            stored.setdefault(index, 0)
        stored[MSR_SMBASE] = 0x30000  # kvm_vcpu_reset: SMBASE = 0x30000
        # kvm_vcpu_reset from 6.0: PEBS_UNAVAIL | BTS_UNAVAIL; before, 0 (a vendor module that handles MISC_ENABLE
        # itself keeps its profile's reset value)
        self.misc_enable_pmu = ruleset.has(E.MISC_ENABLE_RO)
        if MSR_MISC_ENABLE not in p.vendor_msrs:
            stored[MSR_MISC_ENABLE] = MISC_ENABLE_PMU_RO if self.misc_enable_pmu else 0
        handlers: dict[int, tuple[Getter, Setter]] = {
            MSR_APIC_BASE: (self._get_apic_base, self._set_apic_base),
            MSR_EFER: (self._get_efer, self._set_efer),
            MSR_TSC_AUX: (self._get_tsc_aux, self._set_tsc_aux),
            MSR_TSC_ADJUST: (self._get_stored, self._set_tsc_adjust),
            MSR_TSC_DEADLINE: (self._get_zero, self._set_ignored),
            MSR_MISC_ENABLE: (self._get_stored, self._set_misc_enable),
            MSR_SMBASE: (self._get_smbase, self._set_smbase),
            MSR_SMI_COUNT: (self._get_stored, self._set_host_only),
            MSR_POWER_CTL: (self._get_stored, self._set_any),
            MSR_HWCR: (self._get_stored, self._set_hwcr),
            MSR_MMIO_CONF_BASE: (self._get_zero, self._set_mmio_conf_base),
            MSR_XSS: (self._get_xss, self._set_xss),
            MSR_PRED_CMD: (self._get_unsupported, self._set_pred_cmd),
            MSR_FLUSH_CMD: (self._get_unsupported, self._set_flush_cmd),
        }
        handlers[MSR_OSVW_ID_LENGTH] = handlers[MSR_OSVW_STATUS] = (self._get_osvw, self._set_osvw)
        handlers[MSR_SYSENTER_ESP] = handlers[MSR_SYSENTER_EIP] = (self._get_sysenter, self._set_sysenter)
        handlers[MSR_XFD] = handlers[MSR_XFD_ERR] = (self._get_xfd, self._set_xfd)
        for index in CANONICAL_MSRS:
            handlers[index] = (self._get_canonical, self._set_canonical)
        for index in READ_ONLY:
            handlers[index] = (self._get_constant, self._set_read_only)
        for index in WRITE_IGNORED:
            handlers[index] = (self._get_ignored_msr, self._set_ignored)
        if self.svm:  # svm_get_msr/svm_set_msr come first and keep VM_HSAVE_PA (emulated.SVM_HSAVE_PA)
            handlers[MSR_VM_HSAVE_PA], stored[MSR_VM_HSAVE_PA] = (self._get_stored, self._set_hsave_pa), 0
        if self.pmu_off:
            for index in LEGACY_PMU:
                handlers[index] = (self._get_zero, self._set_ignored)
        for index in ruleset.absent_msrs:  # MSRs this KVM does not know yet (XFD before 5.17, FLUSH_CMD before 6.4)
            handlers.pop(index, None)
        self.install(handlers)

    def bulk_kind(self, index: int) -> str | None:
        if index in (MSR_SMI_COUNT, MSR_POWER_CTL):  # any host write stored verbatim (SMI_COUNT: host writes only)
            return "any"
        # KERNEL_GS_BASE, LSTAR, CSTAR: stored when canonical; SYSENTER_ESP/EIP: stored made canonical, so verbatim
        # when already canonical. The host's width from CANONICAL_HOST_WIDTH, else the guest's CR4.LA57.
        if index in (MSR_SYSENTER_ESP, MSR_SYSENTER_EIP) and self.svm and self.vendor_checks != "vendor":
            return None  # svm_set_msr keeps the high half by the guest's vendor at the write: the handler
        if index in (MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP):
            return "canonical" if self.host_width else "canonical_cr4"
        return None

    def write_check(self, index: int) -> WriteCheck | None:
        # The "canonical" group's check for one MSR: v + 2**(bits - 1) wraps the canonical values to below 2**bits.
        if self.bulk_kind(index) == "canonical":
            return 1 << (self.virt_bits - 1), U64 & ~((1 << self.virt_bits) - 1), False
        setter = self.handlers[index][1]
        if setter == self._set_tsc_adjust and self.cap(TSC_ADJUST):  # without the bit: dropped
            return 0, 0, False
        # as written: TSC_AUX's and SYSENTER's (SVM, CR4's width) values below 2**32, VM_HSAVE_PA's page-aligned ones
        if setter in (self._set_tsc_aux, self._set_sysenter, self._set_hsave_pa):
            return 0, 0xFFF if setter == self._set_hsave_pa else U64 ^ 0xFFFFFFFF, False
        if setter == self._set_xfd:  # XFD, XFD_ERR: a host write is checked against the bits alone
            return 0, U64 & ~self._xfd_allowed(), False
        if setter == self._set_xss and (allowed := self._xss_allowed()) is not None:
            return 0, U64 & ~allowed, False
        return None

    def bulk_ok(self, kind: str, indices: Sequence[int], values: Sequence[int]) -> bool:
        shift = self._width() - 1  # "canonical": the host's width, "canonical_cr4": the guest's; bits 63..shift alike
        return {value >> shift for value in values} <= {0, U64 >> shift}

    def bulk_read_kind(self, index: int) -> str | None:  # SYSENTER masked on read: as stored while the high half is 0
        return "sysenter" if self.handlers[index][0] == self._get_sysenter and self._sysenter_masked() else None

    def bulk_read_ok(self, kind: str, indices: Sequence[int]) -> bool:
        return not any(self.rules.stored[index] >> 32 for index in indices)

    def read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        getter = self.handlers[index][0]
        if getter == self._get_constant:
            return _NOTHING, index, READ_ONLY[index]
        if getter == self._get_ignored_msr and WRITE_IGNORED[index] is not None:
            return _NOTHING, index, WRITE_IGNORED[index]  # type: ignore[return-value]
        if getter == self._get_canonical and index not in (MSR_FS_BASE, MSR_GS_BASE):
            return self.rules.stored, index, 0
        if getter in (self._get_tsc_aux, self._get_xss, self._get_xfd) or (  # never refused to the host; SYSENTER:
                getter == self._get_sysenter and not self._sysenter_masked()):  # unmasked (else bulk_read_kind)
            return self.rules.stored, index, 0
        return super().read_source(index)

    def _get_constant(self, index: int, host: bool) -> tuple[int, int]:
        return OK, READ_ONLY[index]

    def _get_ignored_msr(self, index: int, host: bool) -> tuple[int, int]:
        value = WRITE_IGNORED[index]
        return (UNSUPPORTED, 0) if value is None else (OK, value)

    def _get_unsupported(self, index: int, host: bool) -> tuple[int, int]:
        return self.refuse(index, E.READ_ONLY, UNSUPPORTED), 0

    def _set_host_only(self, index: int, data: int, host: bool) -> int:
        if not host:
            return self.refuse(index, E.HOST_ONLY, FAIL)
        self.rules.stored[index] = data
        return OK

    def _get_smbase(self, index: int, host: bool) -> tuple[int, int]:
        # x86.c: !IS_ENABLED(CONFIG_KVM_SMM) || !host_initiated. A guest's access fails on every version: host_only
        # names it; smbase_needs_smm only the host's.
        if not host:
            return self.refuse(index, E.HOST_ONLY, FAIL), 0
        if not self.smm:
            return self.refuse(index, R.SMBASE_NEEDS_SMM, FAIL), 0
        return OK, self.rules.stored[index]

    def _set_smbase(self, index: int, data: int, host: bool) -> int:
        if host and not self.smm:
            return self.refuse(index, R.SMBASE_NEEDS_SMM, FAIL)
        return self._set_host_only(index, data, host)

    # -- APIC_BASE (lapic.c:2687 kvm_apic_set_base; x86.c:3468) --
    def _get_apic_base(self, index: int, host: bool) -> tuple[int, int]:
        return OK, self.vcpu.sregs.apic_base

    def _set_apic_base(self, index: int, data: int, host: bool) -> int:
        if data == self.vcpu.sregs.apic_base and self.apic_same_ok:  # 6.13: no check at all (a75b7bb46a83)
            return OK
        reserved = reserved_gpa_bits(self.rules) | 0x2FF | (0 if self.cap(X2APIC) else X2APIC_ENABLE)
        new_mode, old_mode = data & (APIC_ENABLE | X2APIC_ENABLE), self.vcpu.sregs.apic_base & (APIC_ENABLE | X2APIC_ENABLE)
        if data & reserved or new_mode == X2APIC_ENABLE:  # LAPIC_MODE_INVALID: x2APIC without enable
            return self.refuse(index, E.APIC_BASE_VALID, FAIL)
        x2apic, xapic = APIC_ENABLE | X2APIC_ENABLE, APIC_ENABLE
        if not host and ((old_mode == x2apic and new_mode == xapic) or (old_mode == 0 and new_mode == x2apic)):
            return self.refuse(index, E.APIC_BASE_VALID, FAIL)
        self.vcpu.set_apic_base(data)
        return OK

    # -- EFER (x86.c:1336 set_efer, 1306 __kvm_valid_efer) --
    def efer_valid(self, data: int) -> bool:
        """``kvm_valid_efer``: no reserved bit, and the guest's CPUID bit for each bit set."""
        return not data & ~self.efer_allowed and not any(data & bits and not self.cap(bit) for bits, bit in EFER_NEEDS)

    def _get_efer(self, index: int, host: bool) -> tuple[int, int]:
        return OK, self.vcpu.sregs.efer

    def _set_efer(self, index: int, data: int, host: bool) -> int:
        old = self.vcpu.sregs.efer
        if data & ~self.efer_allowed:
            return self.refuse(index, E.EFER_RESERVED, FAIL)
        if not host and (not self.efer_valid(data) or self.vcpu.sregs.cr0 >> 31 & 1 and (old ^ data) & EFER_LME):
            return self.refuse(index, E.EFER_RESERVED, FAIL)  # __kvm_valid_efer; no LME toggle with paging on
        self.vcpu.sregs.efer = (data & ~EFER_LMA) | (old & EFER_LMA)
        return OK

    # -- canonical addresses (x86.c:1433 __kvm_set_msr) --
    def _get_canonical(self, index: int, host: bool) -> tuple[int, int]:
        sregs = self.vcpu.sregs
        if index == MSR_FS_BASE:
            return OK, sregs.fs.base
        if index == MSR_GS_BASE:
            return OK, sregs.gs.base
        return OK, self.rules.stored[index]

    def _width(self) -> int:
        """The virtual-address width of the canonical checks: the host's (CANONICAL_HOST_WIDTH), else the guest's."""
        return self.virt_bits if self.host_width else 57 if self.vcpu.sregs.cr4 >> 12 & 1 else 48

    def _set_canonical(self, index: int, data: int, host: bool) -> int:
        if canonical(data, self._width()) != data:
            return self.refuse(index, E.CANONICAL, FAIL)
        if index == MSR_FS_BASE:
            self.vcpu.sregs.fs.base = data
        elif index == MSR_GS_BASE:
            self.vcpu.sregs.gs.base = data
        else:
            self.rules.stored[index] = data
        return OK

    # -- SYSENTER_ESP/EIP: made canonical (x86.c:1440), then the vendor stores them --
    def _sysenter_masked(self) -> bool:
        """Whether svm_get_msr/svm_set_msr drop the high half: kept only for an Intel(-compatible) guest (5.13+)."""
        return self.svm and self.vendor_checks != "vendor" and not self.intel_like()

    def _get_sysenter(self, index: int, host: bool) -> tuple[int, int]:
        return OK, self.rules.stored[index] & (0xFFFFFFFF if self._sysenter_masked() else U64)

    def _set_sysenter(self, index: int, data: int, host: bool) -> int:
        self.rules.stored[index] = canonical(data, self._width()) & (0xFFFFFFFF if self._sysenter_masked() else U64)
        return OK

    # -- TSC_AUX (x86.c:1455, 1519) and TSC_ADJUST (x86.c:3473) --
    def _set_hsave_pa(self, index: int, data: int, host: bool) -> int:
        if not host and (data & 0xFFF or data & reserved_gpa_bits(self.rules)):  # page_address_valid
            return self.refuse(index, E.SVM_HSAVE_PA, FAIL)
        self.rules.stored[index] = data & ~0xFFF
        return OK

    def intel_like(self) -> bool:
        """Whether the guest gets Intel's SYSENTER and TSC_AUX behaviour (``Ruleset.guest_vendor_checks``): before 5.13
        the vendor module decided (VMX: yes); then a GenuineIntel CPUID; from 6.10 any but AMD or Hygon."""
        if self.vendor_checks == "intel_compatible":
            return not self.amd_compatible()
        if self.vendor_checks == "intel":
            return self.genuine_intel()
        return not self.svm

    def _tsc_aux_reachable(self) -> bool:
        """A guest's access: RDTSCP, or from 5.13 RDPID too."""
        return self.cap(RDTSCP) or (self.vendor_checks != "vendor" and self.cap(RDPID))

    def _get_tsc_aux(self, index: int, host: bool) -> tuple[int, int]:
        if not host and not self._tsc_aux_reachable():
            return self.refuse(index, E.TSC_AUX, FAIL), 0
        return OK, self.rules.stored[index]

    def _set_tsc_aux(self, index: int, data: int, host: bool) -> int:
        if not host and not self._tsc_aux_reachable():
            return self.refuse(index, E.TSC_AUX, FAIL)
        if self.intel_like() and data >> 32:
            return self.refuse(index, E.TSC_AUX, FAIL)
        # bits 63:32 dropped for a non-Intel guest; before 5.13 SVM stored all 64 (5.10.262 svm.c:2729)
        self.rules.stored[index] = data if self.vendor_checks == "vendor" else data & 0xFFFFFFFF
        return OK

    def _set_tsc_adjust(self, index: int, data: int, host: bool) -> int:
        if self.cap(TSC_ADJUST):  # without the CPUID bit the write is dropped
            self.rules.stored[index] = data
        return OK

    # -- MISC_ENABLE (x86.c:3485) --
    def _set_misc_enable(self, index: int, data: int, host: bool) -> int:
        old = self.rules.stored[index]
        if not host and self.misc_enable_pmu:
            if (old ^ data) & MISC_ENABLE_PMU_RO:
                return self.refuse(index, E.MISC_ENABLE_RO, FAIL)
            data = (data & ~MISC_ENABLE_EMON) | (old & MISC_ENABLE_EMON)
        quirk_on = not self.rules.vm.disabled_quirks & KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT
        if not quirk_on and (old ^ data) & MISC_ENABLE_MWAIT and not self.cap(SSE3):
            return self.refuse(index, E.CPUID_GATED, FAIL)
        self.rules.stored[index] = data
        return OK

    # -- AMD HWCR and friends (x86.c:3403, 3419) --
    def _set_hwcr(self, index: int, data: int, host: bool) -> int:
        data &= ~(0x40 | 0x100 | 0x8)
        if not self.hwcr_tscfreqsel:  # before 6.7 (6.1.192 x86.c:3630-3642): McStatusWrEn alone; 0 stores nothing
            if data not in (0, 1 << 18):
                return self.refuse(index, E.HWCR, FAIL)
            if data:
                self.rules.stored[index] = data
            return OK
        if data & ~(1 << 18 | 1 << 24):
            return self.refuse(index, E.HWCR, FAIL)
        self.rules.stored[index] = data
        return OK

    def _set_mmio_conf_base(self, index: int, data: int, host: bool) -> int:
        return self.refuse(index, E.VALUE_RESERVED, FAIL) if data else OK

    def _get_osvw(self, index: int, host: bool) -> tuple[int, int]:
        if not self.cap(OSVW):
            return self.refuse(index, E.CPUID_GATED, FAIL), 0
        return OK, self.rules.stored[index]

    def _set_osvw(self, index: int, data: int, host: bool) -> int:
        if not self.cap(OSVW):
            return self.refuse(index, E.CPUID_GATED, FAIL)
        self.rules.stored[index] = data
        return OK

    # -- XSS and XFD (6.18: XSS needs CPUID.XSAVES even from userspace) --
    def _get_xss(self, index: int, host: bool) -> tuple[int, int]:
        if not host and not self.cpuid_has(XSAVES):
            return self.refuse(index, E.CPUID_GATED, FAIL), 0
        return OK, self.rules.stored[index]

    def _xss_allowed(self) -> int | None:
        """The XSS bits a write may set (supported_xss; 6.18: the guest's too); None: unsupported (6.18, no XSAVES)."""
        if not self.xss_gated:  # before the CET series both vendors set supported_xss to 0 (6.12.118 vmx.c:7995,
            return 0  # svm.c:5397; 6.1.192 vmx.c:7854, svm.c:4997; 5.10.262 vmx.c:7479, svm.c:894)
        if not self.cpuid_has(XSAVES):  # 6.18: CPUID.XSAVES for everyone, and the guest's own XSS bits
            return None
        host, guest = find_cpuid(self.rules.profile.supported_cpuid, 0xD, 1), find_cpuid(self.vcpu.cpuid, 0xD, 1)
        return (host.ecx | host.edx << 32 if host is not None else 0) & (
            guest.ecx | guest.edx << 32 if guest is not None else 0)

    def _set_xss(self, index: int, data: int, host: bool) -> int:
        allowed = self._xss_allowed()
        if allowed is None:
            return self.refuse(index, E.XSS_NEEDS_XSAVES, UNSUPPORTED)
        if not self.xss_gated and not host and not self.cpuid_has(XSAVES):
            return self.refuse(index, E.CPUID_GATED, FAIL)
        if data & ~allowed:
            return self.refuse(index, E.VALUE_RESERVED, FAIL)
        self.rules.stored[index] = data
        return OK

    def _get_xfd(self, index: int, host: bool) -> tuple[int, int]:
        if not host and not self.cap(XFD):
            return self.refuse(index, E.CPUID_GATED, FAIL), 0
        return OK, self.rules.stored[index]

    def _xfd_allowed(self) -> int:
        """kvm_guest_supported_xfd: the XTILE_DATA bit of the guest's XCR0 that the host supports too."""
        guest, host = find_cpuid(self.vcpu.cpuid, 0xD, 0), find_cpuid(self.rules.profile.supported_cpuid, 0xD, 0)
        return ((guest.eax | guest.edx << 32) & (host.eax | host.edx << 32) & C.XFEATURE_MASK_XTILE_DATA
                if guest is not None and host is not None else 0)

    def _set_xfd(self, index: int, data: int, host: bool) -> int:
        if not host and not self.cap(XFD):
            return self.refuse(index, E.CPUID_GATED, FAIL)
        if data & ~self._xfd_allowed():
            return self.refuse(index, E.VALUE_RESERVED, FAIL)
        self.rules.stored[index] = data
        return OK

    # -- PRED_CMD and FLUSH_CMD (x86.c:3383, 3410): commands, never read --
    def _set_pred_cmd(self, index: int, data: int, host: bool) -> int:
        supported = self.rules.profile.supported_cpuid
        host_ibpb = C.has_feature(supported, *AMD_IBPB) or C.has_feature(supported, *SPEC_CTRL)  # boot_cpu_has(IBPB)
        if not self.sbpb:  # before 6.7: IBPB alone, and no write at all without the host's (pred_cmd_sbpb)
            if not host and not (self.cap(SPEC_CTRL) or self.cap(AMD_IBPB)):
                return self.refuse(index, E.CPUID_GATED, FAIL)
            return self.refuse(index, E.VALUE_RESERVED, FAIL) if data & ~PRED_CMD_IBPB or not host_ibpb else OK
        reserved = U64 & ~(PRED_CMD_IBPB | PRED_CMD_SBPB)
        if not host:
            if not (self.cap(SPEC_CTRL) or self.cap(AMD_IBPB) or self.cap(SBPB)):
                return self.refuse(index, E.CPUID_GATED, FAIL)
            if not self.cap(SPEC_CTRL) and not self.cap(AMD_IBPB):
                reserved |= PRED_CMD_IBPB
            if not self.cap(SBPB):
                reserved |= PRED_CMD_SBPB
        if not host_ibpb:
            reserved |= PRED_CMD_IBPB
        if not C.has_feature(supported, *SBPB):
            reserved |= PRED_CMD_SBPB
        return self.refuse(index, E.VALUE_RESERVED, FAIL) if data & reserved else OK

    def _set_flush_cmd(self, index: int, data: int, host: bool) -> int:
        if not host and not self.cap(FLUSH_L1D):
            return self.refuse(index, E.CPUID_GATED, FAIL)
        if not C.has_feature(self.rules.profile.supported_cpuid, *FLUSH_L1D) or data & ~1:
            return self.refuse(index, E.VALUE_RESERVED, FAIL)
        return OK
