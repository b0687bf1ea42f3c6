"""What a batch may decide for the MSRs with setters in ``msr_rules`` without running them, under the vCPU's
configuration now (``msr_batch`` and ``msr_reads`` remake their plans when the CPUID or MCG_CAP changes): the check a
write passes (``MsrFamily.write_check`` says what it gives), the rule a write is refused by, and where a read finds
its value. Each mirrors its setter or ``host_get`` branch; ``tests/test_model_batch_plan.py`` holds them to those,
value by value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import msrs as M
from ..api import find_cpuid
from ..kernel import rulesets as R
from . import vmx
from .msr_family import U64, WriteCheck
from .msr_rules import ARCH_CAPABILITIES_BIT, PDCM_BIT

if TYPE_CHECKING:
    from .msr_rules import MsrRules


def setter_check(rules: MsrRules, index: int) -> WriteCheck | None:
    """``MsrFamily.write_check`` for the MSRs with setters in ``msr_rules``: how a batch checks a host write without the
    setter, under the vCPU's CPUID now; None when the setter must run."""
    p, rs = rules.profile, rules.rules
    if index == M.MSR_IA32_UCODE_REV:
        return 0, 0, False
    if index == M.MSR_IA32_ARCH_CAPABILITIES:
        return None if rs.cpuid_gated_caps and not rules.cap(ARCH_CAPABILITIES_BIT) else (0, 0, False)
    if index == M.MSR_AMD64_DE_CFG:
        return (0, U64 & ~p.feature_msrs.get(index, 0), False) if p.vendor == "svm" else None
    if index == M.MSR_IA32_PERF_CAPABILITIES:
        if rs.cpuid_gated_caps and not rules.cap(PDCM_BIT):
            return None
        mask = U64 & ~p.supported_perf_cap
        if p.vendor == "vmx":  # a value with an LBR or PEBS format takes the setter (perf_cap_vendor_check)
            mask |= M.PERF_CAP_LBR_FMT | M.PERF_CAP_PEBS_FORMAT
            pmu = find_cpuid(rules.vcpu.cpuid, 0xA)
            if rs.perf_cap_pmu_version and (pmu is None or not pmu.eax & 0xFF):
                mask = U64
        return 0, mask, False
    if index == vmx.MSR_IA32_FEAT_CTL:  # _set_feat_ctl: the bits KVM supports (6.2+), else those the CPUID grants
        allowed = (vmx.KVM_SUPPORTED_FEATURE_CONTROL if rs.has(R.FEAT_CTL_HOST_ANY_SUPPORTED)
                   else vmx.feature_control_valid_bits(rules.vcpu.cpuid, p.nested_vmx))
        return 0, U64 & ~allowed, False
    return None


def read_decided(rules: MsrRules, index: int) -> tuple[dict[int, int], int, int, R.Rule | None] | None:
    """How ``access_get`` reads a feature MSR with a setter in ``msr_rules`` under the vCPU's CPUID now, when it reads one
    dict and never fails: ``(dict, key, default, the rule it records or None)``; None when it must run."""
    p, rs = rules.profile, rules.rules
    gates = {M.MSR_IA32_ARCH_CAPABILITIES: (ARCH_CAPABILITIES_BIT, R.ARCH_CAP_NEEDS_CPUID),
             M.MSR_IA32_PERF_CAPABILITIES: (PDCM_BIT, R.PERF_CAP_NEEDS_PDCM)}
    forgiven = rules.unsupported_ok(index, 0)  # a refused read gives 0
    if index in gates:
        bit, rule = gates[index]
        if not (rs.cpuid_gated_caps and not rules.cap(bit)):
            return rules.stored, index, 0, None
        return ({}, index, 0, rule) if forgiven else None  # refused as unsupported: 0 when forgiven
    if index in (M.MSR_PLATFORM_INFO, M.MSR_IA32_UCODE_REV) or (index == M.MSR_AMD64_DE_CFG and p.vendor == "svm"):
        return rules.stored, index, 0, None
    if index == M.MSR_AMD64_DE_CFG:
        return ({}, index, 0, None) if forgiven else None
    b = rules.behaviour.get(index)  # FEAT_CTL has no getter: host_get reads it by the profile's behaviour
    if index == vmx.MSR_IA32_FEAT_CTL and rules.families.get(index) is None and b is not None and b.readable:
        return ({}, index, b.default, None) if b.kind in ("drop", "zero_drop") else (rules.stored, index, b.default, None)
    return None


def setter_refusal(rules: MsrRules, index: int) -> R.Rule | None:
    """The rule a host write of ``index`` is always refused by, as unsupported, under the vCPU's CPUID now (for
    any value ``unsupported_ok`` forgives); None when its setter must run."""
    p, rs = rules.profile, rules.rules
    if index == M.MSR_IA32_ARCH_CAPABILITIES and rs.cpuid_gated_caps and not rules.cap(ARCH_CAPABILITIES_BIT):
        return R.ARCH_CAP_NEEDS_CPUID
    if index == M.MSR_IA32_PERF_CAPABILITIES and rs.cpuid_gated_caps and not rules.cap(PDCM_BIT) and not (
            p.vendor == "vmx" and p.ignore_msrs):  # vmx's format checks come first, and pass only for 0
        return R.PERF_CAP_NEEDS_PDCM
    if index == M.MSR_AMD64_DE_CFG and p.vendor != "svm":
        return R.UNKNOWN_MSR
    return None
