"""One vCPU's MSRs: their state and the kernel's per-MSR rules, host-initiated and guest, side by side.

Host access is ``do_get_msr``/``do_set_msr`` (``host_initiated`` true): the per-MSR handlers (``host_get``,
``host_set`` and the setters), then ``kvm_do_msr_access``'s unsupported-MSR rule (``access_get``, ``unsupported_ok``)
and, for writes, the freeze check (``try_set``). Guest RDMSR/WRMSR are ``kvm_emulate_msr_read``/``write``
(``host_initiated`` false, no freeze check: that rule is host-only); the MSR filter and the exits to userspace are the
guest executor's (``guest_exec``). The batch ioctls are in ``msr_batch``.

Return codes follow the kernel: 0 success, 1 failure, ``UNSUPPORTED`` (``KVM_MSR_RET_UNSUPPORTED``), negative errnos.
Each refusal records the rule behind it (``refusal_rule``), which the strict helpers and ``kvmscope check`` name.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import msrs as M
from .. import uapi
from ..api import CpuidEntry, find_cpuid
from ..kernel import rulesets as R
from . import cpuid as C
from . import msr_debugctl, msr_misc, msr_pv, mtrr, vmx
from .msr_family import MsrFamily

if TYPE_CHECKING:
    from .vcpu import ModelVcpu

OK, FAIL, UNSUPPORTED = 0, 1, 2
KEPT = 3  # internal to set_msrs: the write was accepted and stored nothing (a frozen MSR given its own value)
EINVAL = -errno.EINVAL

# CPUID bits the MSR rules consult: (function, index, register, bit).
ARCH_CAPABILITIES_BIT = R.CPUID_GATES[R.ARCH_CAP_NEEDS_CPUID][1]
PDCM_BIT = R.CPUID_GATES[R.PERF_CAP_NEEDS_PDCM][1]
VMX_BIT = (1, 0, "ecx", 5)
DS_BIT = (1, 0, "edx", 21)
DTES64_BIT = (1, 0, "ecx", 2)
XSAVE_BIT = (1, 0, "ecx", 26)

# kvmclock MSRs share storage (x86.c kvm_set_msr_common): the old and new wall clock (VM-wide), system time (vCPU).
MSR_ALIASES = {0x4B564D00: 0x11, 0x4B564D01: 0x12}
VM_WIDE_MSRS = frozenset({0x11})
MSR_MISC_FEATURES_ENABLES = 0x140
MSR_EFER = 0xC0000080
MSR_APIC_BASE = 0x1B
# The MSRs whose rules live in a family module (kvm_set_msr_common's; MCE, KVM PV, x2APIC; MTRRs and PAT; DEBUGCTL).
FAMILY_MSRS = msr_misc.ALL_INDICES | msr_pv.ALL_INDICES | mtrr.ALL_INDICES | msr_debugctl.ALL_INDICES
_PLATFORM_INFO = M.MSR_PLATFORM_INFO
_CPUID_FAULT = M.PLATFORM_INFO_CPUID_FAULT


class MsrRules:
    """The MSR state of one vCPU and the rules that read and write it.

    ``stored`` holds the vCPU's MSRs by index (kvmclock's aliases under their shared index; VM-wide ones are in
    ``vm.msrs``; a negative key, a constant batch reads take: ``msr_reads.constant_key``), ``vmx`` the nested VMX
    capability MSRs (one slot per control pair, see :mod:`.vmx`), ``refusals`` the rule behind each MSR's last
    refusal, ``frozen`` the MSRs the freeze check holds (empty until the first VM entry).
    """

    def __init__(self, vcpu: ModelVcpu) -> None:
        vm = vcpu.vm
        p, rs = vcpu.profile, vcpu.rules
        self.vcpu = vcpu
        self.vm = vm
        self.profile = p
        self.rules = rs
        self.refusals: dict[int, R.Rule] = {}
        self.behaviour = p.behaviours  # how the profile's ordinary MSRs behave, the vendor's own handling included
        self._bits_of: object = None  # the CPUID list _bits was computed from (cpuid_has)
        self._supported: dict[tuple[int, int, str, int], bool] = {}
        self._bits: dict[tuple[int, int, str, int], bool] = {}
        self._advertised = vm.system.advertised
        # kvm_is_immutable_feature_msr: the generic list plus the VMX range, computed once so the check stays cheap.
        self.immutable = frozenset(M.VMX_RANGE) | rs.immutable_generic
        # The MSRs frozen right now: empty until the first real VM entry, then the immutable set (if the ruleset
        # freezes), so the per-entry check is one set lookup.
        self.frozen: frozenset[int] = frozenset()
        # MSRs whose do_get_msr is a plain read of the stored value (no CPUID gate): the check reads them directly.
        self._plain = frozenset({M.MSR_PLATFORM_INFO} | ({M.MSR_AMD64_DE_CFG} if p.vendor == "svm" else set()))
        # MISC_FEATURES_ENABLES follows KVM's own rule unless the profile recorded what its host does instead (PVM
        # stores anything there: see docs/live-kernel.md).
        self.misc_features_rule = MSR_MISC_FEATURES_ENABLES not in p.msr_behaviour
        self.setters = self._msr_setters()
        self._same_value_real_write = rs.same_value_real_write
        features = p.feature_msrs
        quirk = (not rs.stuff_quirk) or not vm.disabled_quirks & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS
        self.stored: dict[int, int] = {
            M.MSR_IA32_ARCH_CAPABILITIES: features.get(M.MSR_IA32_ARCH_CAPABILITIES, 0) if quirk else 0,
            M.MSR_PLATFORM_INFO: M.PLATFORM_INFO_CPUID_FAULT if quirk else 0,
            M.MSR_IA32_PERF_CAPABILITIES: p.supported_perf_cap if quirk else 0,
            M.MSR_IA32_UCODE_REV: (p.ucode_rev_reset or 0) if quirk else 0,
            M.MSR_AMD64_DE_CFG: 0,
        }
        for index, b in self.behaviour.items():
            self.stored.setdefault(index, b.default)
        if self.misc_features_rule:
            self.stored[MSR_MISC_FEATURES_ENABLES] = 0
        self.vmx_kvm = vmx.slots_from(features) if p.nested_vmx else {}
        # The emulated MSR families (msr_misc, mtrr): index -> the family whose get/set rule it follows.
        families: tuple[MsrFamily, ...] = (msr_misc.MiscMsrs(self), msr_pv.PvMceMsrs(self), mtrr.MtrrMsrs(self),
                                           msr_debugctl.DebugctlMsrs(self))
        vendor = p.vendor_msrs  # the vendor module's own handling, recorded in the profile, comes first (behaviour)
        self.families = {i: f for f in families for i in f.indices if i not in vendor}
        self.vmx = dict(self.vmx_kvm) if (quirk and p.nested_vmx) else vmx.slots_from({})

    # -- refusals and the state rules read --
    def refusal_rule(self, index: int) -> R.Rule | None:
        return self.refusals.get(index)

    def refuse(self, index: int, rule: R.Rule, code: int) -> int:
        """Record ``rule`` as the reason ``index`` was refused; return ``code``."""
        self.refusals[index] = rule
        return code

    def cpuid_has(self, bit: tuple[int, int, str, int]) -> bool:
        # Cached per CPUID list: KVM_SET_CPUID2 gives the vCPU a new list (the batch ioctls' setters ask often).
        cpuid = self.vcpu.cpuid
        if cpuid is not self._bits_of:
            self._bits_of, self._bits = cpuid, {}
        has = self._bits.get(bit)
        if has is None:
            has = self._bits[bit] = C.has_feature(cpuid, *bit)
        return has

    def cap(self, bit: tuple[int, int, str, int]) -> bool:
        """A guest CPUID feature as KVM's MSR code asks for it: from 6.14 ``guest_cpu_cap_has``, the guest's bit and
        KVM's support (the supported CPUID, or emulated: RDPID on a host with RDTSCP); before, the bit alone."""
        if not self.cpuid_has(bit) or not self.rules.guest_cpu_caps:
            return self.cpuid_has(bit)
        return self.supported(bit) or (bit == C.RDPID and self.supported(C.RDTSCP))

    def supported(self, bit: tuple[int, int, str, int]) -> bool:
        """The bit in the profile's supported CPUID (fixed for the vCPU's life, so looked up once per bit)."""
        has = self._supported.get(bit)
        if has is None:
            has = self._supported[bit] = C.has_feature(self.profile.supported_cpuid, *bit)
        return has

    def ruled_msrs(self) -> frozenset[int]:
        """Every MSR with a host rule of its own (read or write, in ``host_get``/``host_set`` or a setter) and every
        MSR a rule reads. The batch ioctls (``msr_batch``) send only these through the rules one by one and handle
        the profile's plain MSRs in bulk: a new rule adds its MSR here (or to ``_msr_setters``). A family's MSR that
        the profile's vendor module handles itself (``vendor_msrs``) follows the profile's behaviour, as a plain one."""
        return frozenset({
            MSR_MISC_FEATURES_ENABLES,  # read by PLATFORM_INFO's order check
            msr_pv.MSR_MCG_CAP,  # read by MCG_CTL's and the MCi banks' rules (even when the vendor module writes it)
            M.MSR_IA32_ARCH_CAPABILITIES, M.MSR_IA32_PERF_CAPABILITIES, M.MSR_PLATFORM_INFO, M.MSR_IA32_UCODE_REV,
            M.MSR_AMD64_DE_CFG, vmx.MSR_IA32_FEAT_CTL, *MSR_ALIASES, *MSR_ALIASES.values(), *VM_WIDE_MSRS,
            *self.setters, *self.immutable, *range(M.VMX_FIRST, M.VMX_LAST + 1), *self.families,
        })

    def freeze(self) -> None:
        """The first real VM entry (``kvm_vcpu_has_run``): from now on the immutable MSRs keep their values."""
        self.frozen = self.immutable

    # -- host access: the kernel's per-MSR handlers --
    def host_get(self, index: int) -> tuple[int, int]:
        """``do_get_msr`` before the unsupported-MSR rule: (code, value)."""
        p, rs = self.profile, self.rules
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            if p.vendor != "vmx" or not p.nested_vmx:
                return UNSUPPORTED, 0
            if not self.cpuid_has(VMX_BIT):
                return self.refuse(index, R.VMX_RESTORE, FAIL), 0
            value = vmx.read(self.vmx, index)
            return (OK, value) if value is not None else (FAIL, 0)
        if index == M.MSR_IA32_ARCH_CAPABILITIES:
            if rs.cpuid_gated_caps and not self.cap(ARCH_CAPABILITIES_BIT):
                return self.refuse(index, R.ARCH_CAP_NEEDS_CPUID, UNSUPPORTED), 0
            return OK, self.stored[index]
        if index == M.MSR_IA32_PERF_CAPABILITIES:
            if rs.cpuid_gated_caps and not self.cap(PDCM_BIT):
                return self.refuse(index, R.PERF_CAP_NEEDS_PDCM, UNSUPPORTED), 0
            return OK, self.stored[index]
        if index in (M.MSR_PLATFORM_INFO, M.MSR_IA32_UCODE_REV):
            return OK, self.stored[index]
        if index == M.MSR_AMD64_DE_CFG:
            return (OK, self.stored[index]) if p.vendor == "svm" else (UNSUPPORTED, 0)
        if index == MSR_MISC_FEATURES_ENABLES and self.misc_features_rule:
            return OK, self.stored[index]
        family = self.families.get(index)
        if family is not None:
            return family.get(index, True)
        b = self.behaviour.get(index)
        if b is None:
            return self.refuse(index, R.UNKNOWN_MSR, UNSUPPORTED), 0
        if not b.readable:
            return self.refuse(index, R.HOST_PROFILE, FAIL), 0
        if b.kind in ("drop", "zero_drop"):
            return OK, b.default
        key = MSR_ALIASES.get(index, index)
        store = self.vm.msrs if key in VM_WIDE_MSRS else self.stored
        return OK, store.get(key, b.default)

    def host_set(self, index: int, data: int) -> int:
        """``kvm_set_msr_ignored_check`` before the unsupported-MSR rule."""
        setter = self.setters.get(index)
        if setter is not None:
            return setter(data)
        p = self.profile
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            if p.vendor != "vmx" or not p.nested_vmx:
                return self.refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
            if not self.cpuid_has(VMX_BIT):
                return self.refuse(index, R.VMX_RESTORE, FAIL)
            # before 5.10.137 / 6.0 the restore was checked against the vCPU's current values, not KVM's
            reference = self.vmx if self.rules.has(R.VMX_RESTORE_CURRENT) else self.vmx_kvm
            code = vmx.write(self.vmx, reference, index, data)
            return self.refuse(index, R.VMX_RESTORE, code) if code else OK
        family = self.families.get(index)
        if family is not None:
            return family.set(index, data, True)
        b = self.behaviour.get(index)
        if b is None:
            return self.refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
        if b.kind == "refuse" or (b.kind == "zero_only" and data) or (b.kind == "zero_drop" and data not in (0, b.default)):
            unknown = b.kind == "refuse" and index not in p.msr_index_list and (  # CET without SHSTK/IBT: unsupported
                index not in M.BY_INDEX or index in R.MSR_ARRIVALS[R.CET_MSRS])
            return self.refuse(index, R.HOST_PROFILE, UNSUPPORTED if unknown else FAIL)
        if b.kind not in ("drop", "zero_drop"):
            key = MSR_ALIASES.get(index, index)
            (self.vm.msrs if key in VM_WIDE_MSRS else self.stored)[key] = data
        return OK

    def _msr_setters(self) -> dict[int, Callable[[int], int]]:
        """The MSRs with a host-write rule of their own, and the rule. A setter that returns OK has stored the value
        verbatim under its own index in ``stored``: ``set_msrs`` relies on it (see ``msr_batch``)."""
        setters: dict[int, Callable[[int], int]] = {
            M.MSR_IA32_ARCH_CAPABILITIES: self._set_arch_cap,
            M.MSR_IA32_PERF_CAPABILITIES: self._set_perf_cap,
            M.MSR_PLATFORM_INFO: self._set_platform_info,
            M.MSR_IA32_UCODE_REV: self._set_ucode_rev,
            M.MSR_AMD64_DE_CFG: self._set_de_cfg,
        }
        if self.profile.vendor == "vmx":
            setters[vmx.MSR_IA32_FEAT_CTL] = self._set_feat_ctl
        if self.misc_features_rule:
            setters[MSR_MISC_FEATURES_ENABLES] = self._set_misc_features
        return setters

    def _set_arch_cap(self, data: int) -> int:
        index = M.MSR_IA32_ARCH_CAPABILITIES
        if self.rules.cpuid_gated_caps and not self.cap(ARCH_CAPABILITIES_BIT):
            return self.refuse(index, R.ARCH_CAP_NEEDS_CPUID, UNSUPPORTED)
        self.stored[index] = data
        return OK

    def _set_platform_info(self, data: int) -> int:
        if (
            self.rules.platform_info_order_check
            and not data & _CPUID_FAULT
            and self.stored.get(MSR_MISC_FEATURES_ENABLES, 0) & 1
        ):
            return self.refuse(M.MSR_PLATFORM_INFO, R.PLATFORM_INFO_ORDER_CHECK, FAIL)
        self.stored[_PLATFORM_INFO] = data
        return OK

    def _set_misc_features(self, data: int) -> int:
        # kvm_set_msr_common, host and guest alike (5.10.262 x86.c:3418-3424 ... 6.12.118 x86.c:3695-3701): only
        # CPUID_FAULT (bit 0), and only when PLATFORM_INFO offers CPUID faulting (supports_cpuid_fault).
        if data & ~1 or (data & 1 and not self.stored[_PLATFORM_INFO] & _CPUID_FAULT):
            return self.refuse(MSR_MISC_FEATURES_ENABLES, R.MISC_FEATURES_CPUID_FAULT, FAIL)
        self.stored[MSR_MISC_FEATURES_ENABLES] = data
        return OK

    def _set_ucode_rev(self, data: int) -> int:
        self.stored[M.MSR_IA32_UCODE_REV] = data
        return OK

    def _set_de_cfg(self, data: int) -> int:
        index, p = M.MSR_AMD64_DE_CFG, self.profile
        if p.vendor != "svm":
            return self.refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
        if data & ~p.feature_msrs.get(index, 0):
            return self.refuse(index, R.DE_CFG_SUBSET, FAIL)
        self.stored[index] = data
        return OK

    def _set_feat_ctl(self, data: int) -> int:
        # vmx_set_msr: userspace may set any bit KVM supports (is_vmx_feature_control_msr_valid, 6.2+); before
        # d2a00af2061d only the bits the guest's CPUID grants (msr_ia32_feature_control_valid_bits).
        if self.rules.has(R.FEAT_CTL_HOST_ANY_SUPPORTED):
            if data & ~vmx.KVM_SUPPORTED_FEATURE_CONTROL:
                return self.refuse(vmx.MSR_IA32_FEAT_CTL, R.HOST_PROFILE, FAIL)
        elif data & ~vmx.feature_control_valid_bits(self.vcpu.cpuid, self.profile.nested_vmx):
            return self.refuse(vmx.MSR_IA32_FEAT_CTL, R.FEAT_CTL_GUEST_CPUID, FAIL)
        self.stored[vmx.MSR_IA32_FEAT_CTL] = data
        return OK

    def perf_cap_vendor_check(self, data: int) -> int:
        """``vmx_set_msr``'s LBR and PEBS format checks, which run before the common code, for host and guest."""
        index, p, rs = M.MSR_IA32_PERF_CAPABILITIES, self.profile, self.rules
        supported = p.supported_perf_cap
        if p.vendor == "vmx":
            cpuid = self.vcpu.cpuid
            host = next((e for e in p.supported_cpuid if e.function == 1), None)
            guest = find_cpuid(cpuid, 1)
            consistent = host is not None and guest is not None and C.x86_model(host.eax) == C.x86_model(guest.eax)
            if data & M.PERF_CAP_LBR_FMT and ((data ^ supported) & M.PERF_CAP_LBR_FMT or not consistent):
                return self.refuse(index, R.PERF_CAP_SUBSET, FAIL)
            if data & M.PERF_CAP_PEBS_FORMAT and (
                (data ^ supported) & rs.perf_cap_pebs_mask
                or not self.cap(DS_BIT)
                or not self.cap(DTES64_BIT)
                or not consistent
            ):
                return self.refuse(index, R.PERF_CAP_SUBSET, FAIL)
            if rs.perf_cap_pmu_version and data:
                pmu = find_cpuid(cpuid, 0xA)
                if pmu is None or not pmu.eax & 0xFF:
                    return self.refuse(index, R.PERF_CAP_SUBSET, FAIL)
        return OK

    def _set_perf_cap(self, data: int) -> int:
        index, p, rs = M.MSR_IA32_PERF_CAPABILITIES, self.profile, self.rules
        supported = p.supported_perf_cap
        code = self.perf_cap_vendor_check(data)
        if code:
            return code
        if rs.cpuid_gated_caps and not self.cap(PDCM_BIT):
            return self.refuse(index, R.PERF_CAP_NEEDS_PDCM, UNSUPPORTED)
        if data & ~supported:
            return self.refuse(index, R.PERF_CAP_SUBSET, FAIL)
        self.stored[index] = data
        return OK

    # -- host access: kvm_do_msr_access and do_set_msr --
    def access_get(self, index: int) -> tuple[int, int]:
        """``do_get_msr`` with the unsupported-MSR rule: (code, value), the value 0 unless the read succeeded."""
        code, value = self.host_get(index)
        if code == UNSUPPORTED and (
            (self.rules.unsupported_zero and index in self._advertised) or self.profile.ignore_msrs
        ):
            return OK, 0
        return code, value if code == OK else 0

    def do_set(self, index: int, data: int) -> int:
        """``do_set_msr`` of one host-initiated write: 0 when it took effect (or was ignored), else the code."""
        code = self.try_set(index, data)
        if code == KEPT or (code == UNSUPPORTED and self.unsupported_ok(index, data)):
            return OK
        return code

    def try_set(self, index: int, data: int) -> int:
        """The write with the freeze check, before unsupported MSRs are forgiven (``unsupported_ok``); ``KEPT`` when a
        frozen MSR took its own value without a real write (before 6.10)."""
        if self.refusals:
            self.refusals.pop(index, None)  # the rule behind the last refusal only, not an older one
        if index in self.frozen:
            if index in self._plain:
                current: int | None = self.stored[index]
            else:
                code, value = self.access_get(index)
                current = None if code else value
            if current != data:
                rule = R.PLATFORM_INFO_IMMUTABLE if index == M.MSR_PLATFORM_INFO else R.FREEZE
                return self.refuse(index, rule, EINVAL)
            if not self._same_value_real_write:
                return KEPT
        setter = self.setters.get(index)
        return setter(data) if setter is not None else self.host_set(index, data)

    def unsupported_ok(self, index: int, data: int) -> bool:
        """kvm_do_msr_access: an unsupported MSR's write of 0 passes when the MSR is advertised (6.12+), and any
        write passes with ``ignore_msrs``; nothing is stored either way."""
        return (self.rules.unsupported_zero and data == 0 and index in self._advertised) or self.profile.ignore_msrs

    # -- guest access: kvm_emulate_msr_read/kvm_emulate_msr_write, after the MSR filter --
    def guest_get(self, index: int) -> tuple[int, int]:
        """A guest RDMSR's handler: (code, value)."""
        p, rs = self.profile, self.rules
        gated = UNSUPPORTED if rs.cpuid_gated_caps else FAIL
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            if p.vendor != "vmx" or not p.nested_vmx:
                return UNSUPPORTED, 0
            value = vmx.read(self.vmx, index)
            return (OK, value) if self.cpuid_has(VMX_BIT) and value is not None else (FAIL, 0)
        if index == M.MSR_IA32_ARCH_CAPABILITIES:
            return (OK, self.stored[index]) if self.cap(ARCH_CAPABILITIES_BIT) else (gated, 0)
        if index == M.MSR_IA32_PERF_CAPABILITIES:
            return (OK, self.stored[index]) if self.cap(PDCM_BIT) else (gated, 0)
        if index == M.MSR_PLATFORM_INFO:
            return (OK, self.stored[index]) if self.vm.platform_info_readable else (FAIL, 0)
        if index == M.MSR_IA32_UCODE_REV:
            return OK, self.stored[index]
        if index == M.MSR_AMD64_DE_CFG:
            return (OK, self.stored[index]) if p.vendor == "svm" else (UNSUPPORTED, 0)
        if index == MSR_MISC_FEATURES_ENABLES and self.misc_features_rule:
            return OK, self.stored[index]
        family = self.families.get(index)
        if family is not None:
            return family.get(index, False)
        b = self.behaviour.get(index)
        if b is not None and b.kind == "zero_drop":
            return FAIL, 0  # a value only userspace sees (PVM's TSC_RATIO): the guest's access fails with 1
        if b is None or not b.readable:
            return UNSUPPORTED, 0
        code, value = self.host_get(index)
        return (OK, value) if code == OK else (UNSUPPORTED, 0)

    def guest_set(self, index: int, data: int) -> int:
        """A guest WRMSR's handler: the code."""
        p, rs = self.profile, self.rules
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            return FAIL if p.vendor == "vmx" and p.nested_vmx else UNSUPPORTED  # "they are read-only"
        if index == M.MSR_IA32_UCODE_REV:
            return OK  # guest writes are dropped: only userspace emulates a microcode load
        if index == M.MSR_IA32_ARCH_CAPABILITIES:
            return UNSUPPORTED if rs.cpuid_gated_caps else FAIL
        if index == M.MSR_IA32_PERF_CAPABILITIES:
            # vmx_set_msr's LBR/PEBS checks run first (code 1); then the common code: host only.
            return self.perf_cap_vendor_check(data) or (UNSUPPORTED if rs.cpuid_gated_caps else FAIL)
        if index == M.MSR_PLATFORM_INFO:
            return FAIL
        if index == M.MSR_AMD64_DE_CFG:
            if p.vendor != "svm":
                return UNSUPPORTED
            supported = p.feature_msrs.get(index, 0)
            if data & ~supported:  # 4d5163cba43f: the guest may write any supported subset
                return FAIL
            if rs.has(R.DE_CFG_GUEST_EXACT) and data != supported:  # before 6.12: exactly the supported value
                return FAIL
            if rs.de_cfg_guest_same_only and data != self.stored[index]:  # 74a0e79df68a, 6.12.0-6.12.6
                return FAIL
            self.stored[index] = data
            return OK
        if index == MSR_MISC_FEATURES_ENABLES and self.misc_features_rule:
            return self._set_misc_features(data)
        family = self.families.get(index)
        if family is not None:
            return family.set(index, data, False)
        b = self.behaviour.get(index)
        if b is None:
            return UNSUPPORTED
        if b.kind == "zero_drop":
            return FAIL
        code = self.host_set(index, data)  # UNSUPPORTED: an MSR upstream lacks (PVM's 0x4B564D11-13)
        return code if code in (OK, UNSUPPORTED) else FAIL

    # -- KVM_SET_CPUID2 --
    def after_set_cpuid(self, raw: Sequence[CpuidEntry]) -> None:
        """``vmx_vcpu_after_set_cpuid``: KVM re-derives some nested VMX MSRs from the new CPUID (see :mod:`.vmx`)."""
        p, hardware = self.profile, self.vm.system.hardware_features.get(0x48B, 0)
        if p.vendor == "vmx" and p.nested_vmx:
            quirk_off = self.rules.stuff_quirk and bool(self.vm.disabled_quirks & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS)
            vmx.after_set_cpuid(self.vmx, hardware, raw, p.supported_cpuid, self.rules, adjust=not quirk_off)
