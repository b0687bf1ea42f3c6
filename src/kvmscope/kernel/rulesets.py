"""Kernel versions as data: each rule names the kernel version (and stable releases) that brought it and its commit.

A :class:`Ruleset` is the set of rules in force at one kernel version, computed from the rules' own versions: a new
kernel behaviour is one :class:`Rule` line, a stable backport one entry in its ``stable`` tuple.

Sources: the kernel commits named below, read in ``arch/x86/kvm/x86.c`` (CachyOS/linux @4703912f5e30, 6.18+),
``vmx/nested.c``, ``vmx/vmx.c``, ``svm/svm.c`` and ``cpuid.c``; see docs/rules.md for the rule table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import InvalidValueError

Version = tuple[int, int, int]
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[-+_~].*)?")
OLDEST: Version = (6, 3, 0)  # the oldest kernel whose rules the model was checked against


def parse_version(text: str) -> Version:
    """``"6.18"`` -> (6, 18, 0); ``"6.12.118-fc"`` -> (6, 12, 118)."""
    m = _VERSION.fullmatch(str(text).strip())
    if m is None:
        raise InvalidValueError(f"kernel version {text!r} is not like 6.18 or 6.18.44")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _label(v: Version) -> str:
    return f"{v[0]}.{v[1]}" if v[2] == 0 else f"{v[0]}.{v[1]}.{v[2]}"


@dataclass(frozen=True)
class Rule:
    """A kernel behaviour the model implements: where it came from, and what a VMM can do when it refuses something.

    ``since`` is the first mainline release with the rule ("-" for facts that hold on every version the model knows,
    such as a host's observed behaviour); ``until`` the first mainline release without it; ``stable`` and
    ``stable_until`` the stable releases that received the rule or its removal (e.g. ``("6.12.77",)``).
    """

    key: str
    since: str
    commit: str
    title: str
    hint: str = ""  # what a VMM can do about a refusal by this rule
    until: str | None = None
    removed_by: str = ""  # the commit that removed it (with ``until``)
    stable: tuple[str, ...] = ()
    stable_until: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for v in (self.until, *self.stable, *self.stable_until):
            if v is not None:
                parse_version(v)

    def cite(self) -> str:
        since = self.since if self.until is None else f"< {self.until} (removed in {self.until} by {self.removed_by})"
        return f"{self.title} (since {since}, {self.commit})"

    def __str__(self) -> str:
        return self.cite()

    @property
    def start(self) -> Version | None:
        """The first mainline release with the rule; None when it predates every version the model knows ("-",
        "< 6.3", "2.6.x")."""
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", self.since):
            return None
        v = parse_version(self.since)
        return v if v >= OLDEST else None

    def in_force(self, version: Version) -> bool:
        """Whether a kernel of ``version`` (mainline or stable) has this rule."""

        def reached(mainline: Version | None, stable: tuple[str, ...]) -> bool:
            if mainline is not None and version >= mainline:
                return True
            return any(version[:2] == s[:2] and version >= s for s in map(parse_version, stable))

        started = self.start is None or reached(self.start, self.stable)
        ended = self.until is not None and reached(parse_version(self.until), self.stable_until)
        return started and not ended

    def versions(self) -> list[Version]:
        """The releases where this rule starts or stops applying."""
        out = [v for v in (self.start, None if self.until is None else parse_version(self.until)) if v is not None]
        return out + [parse_version(s) for s in (*self.stable, *self.stable_until)]


# --- behaviours that change with the kernel version -------------------------------------------------------------------
FREEZE = Rule("freeze", "6.4", "0094f62c7eaa",
              "KVM: x86: Disallow writes to immutable feature MSRs after KVM_RUN",
              "write feature MSRs before the first KVM_RUN; after it, write only the value the vCPU already "
              "has (read it back with KVM_GET_MSRS)")
SAME_VALUE_REAL_WRITE = Rule("same_value_real_write", "6.10", "1d294dfaba8c",
                             "KVM: x86: Allow, don't ignore, same-value writes to immutable MSRs")
UNSUPPORTED_ZERO = Rule("unsupported_zero", "6.12", "64a5d7a1091f",
                        "KVM: x86: Suppress failures on userspace access to advertised, unsupported MSRs")
PLATFORM_INFO_IMMUTABLE = Rule("platform_info_immutable", "6.13", "bc2ca3680b30",
                               "KVM: x86: Disallow changing MSR_PLATFORM_INFO after vCPU has run",
                               "set MSR_PLATFORM_INFO before the first KVM_RUN (immutable after it since 6.13)")
STUFF_QUIRK = Rule("stuff_quirk", "6.13", "dcb988cdac85",
                   "KVM: x86: Quirk initialization of feature MSRs to KVM's max configuration")
PERF_CAP_NEEDS_PDCM = Rule("perf_cap_needs_pdcm", "6.13", "d75cac366f44",
                           "KVM: x86: Reject userspace attempts to access PERF_CAPABILITIES w/o PDCM",
                           "set CPUID.1:ECX[15] (PDCM) with KVM_SET_CPUID2 before writing it, or write 0")
ARCH_CAP_NEEDS_CPUID = Rule("arch_cap_needs_cpuid", "6.13", "a5d563890b8f",
                            "KVM: x86: Reject userspace attempts to access ARCH_CAPABILITIES w/o support",
                            "set CPUID.7.0:EDX[29] (ARCH_CAPABILITIES) with KVM_SET_CPUID2 before writing it, or "
                            "write 0")
PLATFORM_INFO_ORDER_CHECK = Rule("platform_info_no_order_check", "< 6.3", "kvm_set_msr_common",
                                 "PLATFORM_INFO.CPUID_FAULT cannot be cleared while MISC_FEATURES_ENABLES.CPUID_FAULT "
                                 "is set", "set PLATFORM_INFO.CPUID_FAULT before enabling "
                                 "MISC_FEATURES_ENABLES.CPUID_FAULT", until="6.13", removed_by="1ded7a57b805")
PERF_CAP_PMU_VERSION = Rule("perf_cap_pmu_version", "< 6.3", "kvm_set_msr_common",
                            "a non-zero PERF_CAPABILITIES needs a PMU version > 0 in CPUID.0xA",
                            until="6.13", removed_by="a1039111192b")
PEBS_TIMING_INFO = Rule("pebs_timing_info", "6.18", "PERF_CAP_PEBS_MASK",
                        "PERF_CAP_PEBS_MASK includes PEBS_TIMING_INFO (bit 17)")
CR4_FIXED1_LAM = Rule("cr4_fixed1_lam", "6.8", "nested_vmx_cr_fixed1_bits_update",
                      "nested CR4_FIXED1 allows LAM_SUP when guest CPUID.7.1:EAX.LAM is set")
CR4_FIXED1_CET = Rule("cr4_fixed1_cet", "6.18", "nested_vmx_cr_fixed1_bits_update",
                      "nested CR4_FIXED1 allows CET when guest CPUID has SHSTK or IBT (the CET series)")
DE_CFG_GUEST_SAME_ONLY = Rule("de_cfg_guest_same_only", "6.12", "74a0e79df68a",
                              "the guest may only rewrite DE_CFG's current value",
                              until="6.13", removed_by="4d5163cba43f")  # Cc stable: lets it write any subset again
# --- refusal reasons that hold on every version the model knows ---------------------------------------------------
CPUID_AFTER_RUN_IDENTICAL = Rule("cpuid_after_run_identical", "5.17", "c6617c61e8fe",
                                 "KVM: x86: Partially allow KVM_SET_CPUID{,2} after KVM_RUN",
                                 "after KVM_RUN, re-send exactly what KVM_GET_CPUID2 returns (KVM may have rewritten "
                                 "what you first gave it)")
MSR_IO_LIMIT = Rule("msr_io_limit", "2.6.x", "MAX_IO_MSRS",
                    "msr_io: batches of MAX_IO_MSRS (256) or more entries get E2BIG",
                    "split the batch into chunks of at most 255 MSRs")
VMX_RESTORE = Rule("vmx_restore", "< 6.3", "vmx_set_vmx_msr",
                   "nVMX: host writes of VMX MSRs must be restorable against KVM's nested capabilities",
                   "VMX MSRs may only restrict KVM's nested capabilities (system KVM_GET_MSRS); 0x481-0x484, "
                   "CR0_FIXED1 and CR4_FIXED1 are never writable; set CPUID.1:ECX.VMX first")
PERF_CAP_SUBSET = Rule("perf_cap_subset", "< 6.3", "kvm_set_msr_common",
                       "PERF_CAPABILITIES must be a subset of kvm_caps.supported_perf_cap",
                       "write a subset of the PERF_CAPABILITIES feature value (system KVM_GET_MSRS), with the host's "
                       "LBR and PEBS formats")
DE_CFG_SUBSET = Rule("de_cfg_subset", "< 6.3", "svm_set_msr",
                     "DE_CFG writes must be a subset of the supported bits (LFENCE_SERIALIZE)",
                     "write a subset of the DE_CFG feature value")
UNSUPPORTED = Rule("unsupported", "-", "-", "the MSR is not supported for this vCPU and the value is not 0")
UNKNOWN_MSR = Rule("unknown_msr", "-", "-", "KVM does not know this MSR (not advertised, ignore_msrs=N)",
                   "this KVM does not know the MSR: leave it out (see KVM_GET_MSR_INDEX_LIST)")
HOST_PROFILE = Rule("host_profile", "-", "-",
                    "this host's KVM refuses the value (observed behaviour recorded in the profile)",
                    "this host's KVM refuses this value for this MSR (see the profile's msr_behaviour)")

RULES: dict[str, Rule] = {
    r.key: r
    for r in (FREEZE, SAME_VALUE_REAL_WRITE, UNSUPPORTED_ZERO, PLATFORM_INFO_IMMUTABLE, STUFF_QUIRK, PERF_CAP_NEEDS_PDCM,
              ARCH_CAP_NEEDS_CPUID, PLATFORM_INFO_ORDER_CHECK, PERF_CAP_PMU_VERSION, PEBS_TIMING_INFO, CR4_FIXED1_LAM,
              CR4_FIXED1_CET, DE_CFG_GUEST_SAME_ONLY, CPUID_AFTER_RUN_IDENTICAL, MSR_IO_LIMIT, VMX_RESTORE,
              PERF_CAP_SUBSET, DE_CFG_SUBSET, UNSUPPORTED, UNKNOWN_MSR, HOST_PROFILE)
}


def rule(key: str) -> Rule:
    """The rule named ``key``; an unknown key is an error, not a fallback."""
    try:
        return RULES[key]
    except KeyError:
        raise InvalidValueError(f"no rule named {key!r}; known: {', '.join(sorted(RULES))}") from None


PEBS_MASK = 0x4FC0  # PERF_CAP_PEBS_MASK before PEBS_TIMING_INFO


@dataclass(frozen=True)
class Ruleset:
    """What one kernel version does with the vCPU model: the rules in force there. Its flags are cached properties
    (a ruleset never changes): the model's MSR rules read them on every entry."""

    version: str
    rules: frozenset[Rule]

    def has(self, r: Rule) -> bool:
        return r in self.rules

    @cached_property
    def freeze(self) -> bool:
        return FREEZE in self.rules

    @cached_property
    def same_value_real_write(self) -> bool:
        return SAME_VALUE_REAL_WRITE in self.rules

    @cached_property
    def unsupported_zero(self) -> bool:
        return UNSUPPORTED_ZERO in self.rules

    @cached_property
    def platform_info_immutable(self) -> bool:
        return PLATFORM_INFO_IMMUTABLE in self.rules

    @cached_property
    def stuff_quirk(self) -> bool:
        return STUFF_QUIRK in self.rules

    @cached_property
    def cpuid_gated_caps(self) -> bool:
        """ARCH_CAP needs CPUID.7.0:EDX[29] and PERF_CAP needs PDCM, for host and guest accesses (6.13)."""
        return ARCH_CAP_NEEDS_CPUID in self.rules and PERF_CAP_NEEDS_PDCM in self.rules

    @cached_property
    def platform_info_order_check(self) -> bool:
        return PLATFORM_INFO_ORDER_CHECK in self.rules

    @cached_property
    def perf_cap_pmu_version(self) -> bool:
        return PERF_CAP_PMU_VERSION in self.rules

    @cached_property
    def perf_cap_pebs_mask(self) -> int:
        return PEBS_MASK | (1 << 17 if PEBS_TIMING_INFO in self.rules else 0)

    @cached_property
    def cr4_fixed1_lam(self) -> bool:
        return CR4_FIXED1_LAM in self.rules

    @cached_property
    def cr4_fixed1_cet(self) -> bool:
        return CR4_FIXED1_CET in self.rules

    @cached_property
    def de_cfg_guest_same_only(self) -> bool:
        return DE_CFG_GUEST_SAME_ONLY in self.rules

    @cached_property
    def immutable_generic(self) -> frozenset[int]:
        """The generic feature MSRs that are immutable after the first run (kvm_is_immutable_feature_msr)."""
        from .. import msrs

        base = {msrs.MSR_AMD64_DE_CFG, msrs.MSR_IA32_ARCH_CAPABILITIES, msrs.MSR_IA32_PERF_CAPABILITIES}
        if self.platform_info_immutable:
            base.add(msrs.MSR_PLATFORM_INFO)
        return frozenset(base)


KNOWN: list[str] = sorted({_label(v) for r in RULES.values() for v in r.versions() if v >= OLDEST} | {_label(OLDEST)},
                          key=parse_version)
DEFAULT = "6.18"


def resolve(version: str) -> Ruleset:
    """The ruleset in force for a kernel version, labelled with the newest release where a rule changed at or before
    it: ``"6.11"`` gets the 6.10 rules; ``"6.18.44-fc"`` the 6.18 ones; a stable release gets its series' backports."""
    wanted = parse_version(version)
    if wanted < OLDEST:
        raise InvalidValueError(f"kernel {version!r} is older than the oldest ruleset ({KNOWN[0]}); known: {KNOWN}")
    boundaries = [v for v in map(parse_version, KNOWN) if v <= wanted and (v[2] == 0 or v[:2] == wanted[:2])]
    label = _label(max(boundaries))
    return Ruleset(label, frozenset(r for r in RULES.values() if r.in_force(wanted)))
