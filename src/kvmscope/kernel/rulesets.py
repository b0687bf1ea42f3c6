"""Kernel versions as data: one ruleset per change in KVM's vCPU-model behaviour, each citing its commit.

Sources: the kernel commits named below, read in ``arch/x86/kvm/x86.c`` (CachyOS/linux @4703912f5e30, 6.18+),
``vmx/nested.c``, ``vmx/vmx.c``, ``svm/svm.c`` and ``cpuid.c``; see docs/rules.md for the rule table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidValueError


@dataclass(frozen=True)
class Rule:
    """A behaviour the model implements, with the kernel version and commit that introduced it."""

    key: str
    since: str
    commit: str
    title: str
    hint: str = ""  # what a VMM can do about a refusal by this rule

    def cite(self) -> str:
        return f"{self.title} (since {self.since}, {self.commit})"


RULES: dict[str, Rule] = {
    r.key: r
    for r in (
        Rule("freeze", "6.4", "0094f62c7eaa",
             "KVM: x86: Disallow writes to immutable feature MSRs after KVM_RUN",
             "write feature MSRs before the first KVM_RUN; after it, write only the value the vCPU already "
             "has (read it back with KVM_GET_MSRS)"),
        Rule("same_value_real_write", "6.10", "1d294dfaba8c",
             "KVM: x86: Allow, don't ignore, same-value writes to immutable MSRs"),
        Rule("unsupported_zero", "6.12", "64a5d7a1091f",
             "KVM: x86: Suppress failures on userspace access to advertised, unsupported MSRs"),
        Rule("platform_info_immutable", "6.13", "bc2ca3680b30",
             "KVM: x86: Disallow changing MSR_PLATFORM_INFO after vCPU has run",
             "set MSR_PLATFORM_INFO before the first KVM_RUN (immutable after it since 6.13)"),
        Rule("stuff_quirk", "6.13", "dcb988cdac85",
             "KVM: x86: Quirk initialization of feature MSRs to KVM's max configuration"),
        Rule("perf_cap_needs_pdcm", "6.13", "d75cac366f44",
             "KVM: x86: Reject userspace attempts to access PERF_CAPABILITIES w/o PDCM",
             "set CPUID.1:ECX[15] (PDCM) with KVM_SET_CPUID2 before writing it, or write 0"),
        Rule("arch_cap_needs_cpuid", "6.13", "a5d563890b8f",
             "KVM: x86: Reject userspace attempts to access ARCH_CAPABILITIES w/o support",
             "set CPUID.7.0:EDX[29] (ARCH_CAPABILITIES) with KVM_SET_CPUID2 before writing it, or write 0"),
        Rule("platform_info_no_order_check", "< 6.13 (removed in 6.13 by 1ded7a57b805)", "kvm_set_msr_common",
             "PLATFORM_INFO.CPUID_FAULT cannot be cleared while MISC_FEATURES_ENABLES.CPUID_FAULT is set",
             "set PLATFORM_INFO.CPUID_FAULT before enabling MISC_FEATURES_ENABLES.CPUID_FAULT"),
        Rule("cpuid_after_run_identical", "5.17", "c6617c61e8fe",
             "KVM: x86: Partially allow KVM_SET_CPUID{,2} after KVM_RUN",
             "after KVM_RUN, re-send exactly what KVM_GET_CPUID2 returns (KVM may have rewritten what you "
             "first gave it)"),
        Rule("msr_io_limit", "2.6.x", "MAX_IO_MSRS",
             "msr_io: batches of MAX_IO_MSRS (256) or more entries get E2BIG",
             "split the batch into chunks of at most 255 MSRs"),
        Rule("vmx_restore", "< 6.3", "vmx_set_vmx_msr",
             "nVMX: host writes of VMX MSRs must be restorable against KVM's nested capabilities",
             "VMX MSRs may only restrict KVM's nested capabilities (system KVM_GET_MSRS); 0x481-0x484, "
             "CR0_FIXED1 and CR4_FIXED1 are never writable; set CPUID.1:ECX.VMX first"),
        Rule("perf_cap_subset", "< 6.3", "kvm_set_msr_common",
             "PERF_CAPABILITIES must be a subset of kvm_caps.supported_perf_cap",
             "write a subset of the PERF_CAPABILITIES feature value (system KVM_GET_MSRS), with the host's "
             "LBR and PEBS formats"),
        Rule("de_cfg_subset", "< 6.3", "svm_set_msr",
             "DE_CFG writes must be a subset of the supported bits (LFENCE_SERIALIZE)",
             "write a subset of the DE_CFG feature value"),
        Rule("unsupported", "-", "-", "the MSR is not supported for this vCPU and the value is not 0"),
        Rule("unknown_msr", "-", "-", "KVM does not know this MSR (not advertised, ignore_msrs=N)",
             "this KVM does not know the MSR: leave it out (see KVM_GET_MSR_INDEX_LIST)"),
        Rule("host_profile", "-", "-", "this host's KVM refuses the value (observed behaviour recorded in the profile)",
             "this host's KVM refuses this value for this MSR (see the profile's msr_behaviour)"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Ruleset:
    """What one kernel version does with the vCPU model."""

    version: str
    freeze: bool  # 6.4: feature MSRs immutable after the first VM entry (0094f62c7eaa)
    same_value_real_write: bool  # 6.10: same-value writes go through the setter (1d294dfaba8c)
    unsupported_zero: bool  # 6.12: advertised, unsupported MSRs: host reads give 0, writes of 0 succeed (64a5d7a1091f)
    platform_info_immutable: bool  # 6.13 (bc2ca3680b30)
    stuff_quirk: bool  # 6.13: KVM_X86_QUIRK_STUFF_FEATURE_MSRS exists and gates the defaults (dcb988cdac85)
    cpuid_gated_caps: bool  # 6.13: ARCH_CAP needs CPUID.7.0:EDX[29], PERF_CAP needs PDCM (a5d563890b8f, d75cac366f44)
    platform_info_order_check: bool  # before 6.13: cannot clear CPUID_FAULT while enabled (removed by 1ded7a57b805)
    perf_cap_pebs_mask: int  # PERF_CAP_PEBS_MASK: 6.18 adds PEBS_TIMING_INFO (bit 17)
    cr4_fixed1_lam: bool = False  # nested_vmx_cr_fixed1_bits_update allows LAM_SUP from CPUID.7.1:EAX.LAM (6.8)
    cr4_fixed1_cet: bool = False  # ... and CET from SHSTK/IBT (the CET series, 6.18)
    de_cfg_guest_same_only: bool = False  # 6.12.0 (74a0e79df68a): the guest may only rewrite DE_CFG's current value;
    # 4d5163cba43f (6.13-rc, Cc stable) lets it write any supported subset again

    @property
    def immutable_generic(self) -> frozenset[int]:
        """The generic feature MSRs that are immutable after the first run (kvm_is_immutable_feature_msr)."""
        from .. import msrs

        base = {msrs.MSR_AMD64_DE_CFG, msrs.MSR_IA32_ARCH_CAPABILITIES, msrs.MSR_IA32_PERF_CAPABILITIES}
        if self.platform_info_immutable:
            base.add(msrs.MSR_PLATFORM_INFO)
        return frozenset(base)


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


RULESETS: dict[str, Ruleset] = {
    "6.3": Ruleset("6.3", False, False, False, False, False, False, True, 0x4FC0),
    "6.4": Ruleset("6.4", True, False, False, False, False, False, True, 0x4FC0),
    "6.10": Ruleset("6.10", True, True, False, False, False, False, True, 0x4FC0, True),
    "6.12": Ruleset("6.12", True, True, True, False, False, False, True, 0x4FC0, True, de_cfg_guest_same_only=True),
    "6.13": Ruleset("6.13", True, True, True, True, True, True, False, 0x4FC0, True),
    "6.18": Ruleset("6.18", True, True, True, True, True, True, False, 0x24FC0, True, True),
}
KNOWN = sorted(RULESETS, key=_v)
DEFAULT = "6.18"


def resolve(version: str) -> Ruleset:
    """The ruleset in force for a kernel version: ``"6.11"`` gets the 6.10 rules; ``"6.18.44-fc"`` the 6.18 ones."""
    text = str(version).strip()
    head = text.split("-")[0]
    parts = head.split(".")
    try:
        wanted = tuple(int(p) for p in parts[:2])
    except ValueError:
        raise InvalidValueError(f"kernel version {version!r} is not like 6.18 or 6.18.44") from None
    if len(wanted) < 2:
        raise InvalidValueError(f"kernel version {version!r} is not like 6.18 or 6.18.44")
    candidates = [k for k in KNOWN if _v(k) <= wanted]
    if not candidates:
        raise InvalidValueError(f"kernel {version!r} is older than the oldest ruleset ({KNOWN[0]}); known: {KNOWN}")
    return RULESETS[candidates[-1]]
