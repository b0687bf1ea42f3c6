"""What a KVM system offers and whether it freezes the vCPU model after the first run.

Works on any backend. For each feature MSR it uses fresh VMs: one vCPU that never runs (is a changed value settable at
all?) and one vCPU that has run to its first HLT (is the same value accepted, and the changed one refused?). Only the
comparison of the two tells "refused by the after-run rule" from "refused anyway".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import guest, uapi
from . import msrs as _msrs
from .api import CpuidEntry, HltExit, MsrBatch, System, Vcpu, Vm, cpu_vendor_of, find_cpuid
from .errors import KvmError, KvmscopeError
from .kernel import rulesets as R
from .kernel.profile import HostArrival
from .model.cpuid import lost_features

FROZEN = "frozen after first run"
WRITABLE = "writable after run"
NOT_SETTABLE = "refused even before a run (not settable here)"
NO_RUN = "could not run the vCPU to HLT"

# The version of ``probe --json``'s layout: bumped when a key changes meaning or goes away (new keys keep it).
JSON_SCHEMA_VERSION = 1

PROBED_CAPABILITIES = (
    uapi.KVM_CAP_GET_MSR_FEATURES,
    uapi.KVM_CAP_MSR_PLATFORM_INFO,
    uapi.KVM_CAP_DISABLE_QUIRKS2,
    uapi.KVM_CAP_X86_USER_SPACE_MSR,
    uapi.KVM_CAP_X86_MSR_FILTER,
    uapi.KVM_CAP_IMMEDIATE_EXIT,
    uapi.KVM_CAP_ONE_REG,
    uapi.KVM_CAP_NR_VCPUS,
    uapi.KVM_CAP_MAX_VCPUS,
    uapi.KVM_CAP_MAX_VCPU_ID,
    uapi.KVM_CAP_NR_MEMSLOTS,
)


@dataclass
class MsrProbe:
    """The live check of one feature MSR."""

    index: int
    name: str
    value: int | None
    fields: dict[str, Any]
    vcpu_default: int | None = None
    changed_value: int | None = None
    before_run_changed_ok: bool = False
    run_exit: str = ""
    after_run_value: int | None = None
    after_run_same_ok: bool | None = None
    after_run_changed_ok: bool | None = None
    after_run_readback: int | None = None
    verdict: str = ""
    tried: int | None = None  # the first changed value tried on the vCPU that never ran
    tried_count: int = 0  # how many changed values were tried there before one was taken (or all were refused)
    why: str = ""  # what explains the row, where something does (a CPUID gate, the rule behind a refusal)


@dataclass
class ProbeReport:
    backend: str
    description: str
    host: dict[str, Any]
    api_version: int
    capabilities: dict[str, int]
    msr_index_list: list[int]
    cpuid_set: bool
    msrs: list[MsrProbe] = field(default_factory=list)
    freeze_enforced: bool | None = None
    conclusion: str = ""
    cpu_vendor: str | None = None  # "intel" or "amd" from the supported CPUID's vendor string (decodes UCODE_REV)
    # the model: what the profile's host offers that this kernel version does not yet (name -> the release, commit)
    later: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"since": release, "rule": key}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)  # the --json envelope (render.json_document) carries schema_version
        out["msr_index_list"] = [f"0x{i:x}" for i in self.msr_index_list]
        for m in out["msrs"]:
            for k in ("value", "vcpu_default", "changed_value", "after_run_value", "after_run_readback", "tried"):
                if m[k] is not None:
                    m[k] = f"0x{m[k]:x}"
            m["index"] = f"0x{m['index']:x}"
            m["fields"] = {k: (f"0x{v:x}" if isinstance(v, int) and not isinstance(v, bool) and v > 9 else v)
                           for k, v in m["fields"].items()}
        return out


def _candidates(current: int, feature: int | None) -> Iterator[int]:
    """Changed values worth trying, most natural first: the feature value, each set bit cleared, 0, each bit set."""
    seen = {current}

    def fresh(v: int) -> bool:
        if v in seen:
            return False
        seen.add(v)
        return True

    if feature is not None and fresh(feature):
        yield feature
    for bit in range(64):
        if current >> bit & 1 and fresh(current & ~(1 << bit)):
            yield current & ~(1 << bit)
    if fresh(0):
        yield 0
    for bit in range(64):
        if not current >> bit & 1 and fresh(current | 1 << bit):
            yield current | 1 << bit


def _fresh_vcpu(system: System, cpuid: list[CpuidEntry] | None) -> tuple[Vm, Vcpu]:
    vm = system.create_vm()
    vcpu = vm.create_vcpu(0)
    if cpuid is not None:
        try:
            vcpu.set_cpuid(cpuid)
        except KvmError as e:  # probing on: the verdicts would be those of a vCPU without CPUID, without a word
            vm.close()
            raise cpuid_refused(system, e, "the probe would judge vCPUs without it (--no-cpuid probes without "
                                "setting it)") from None
    return vm, vcpu


def cpuid_refused(system: System, e: KvmError, why_not: str) -> KvmscopeError:
    """The error for a system whose KVM_SET_CPUID2 refuses its own KVM_GET_SUPPORTED_CPUID; ``why_not`` says what
    going on would mean."""
    return KvmscopeError(f"{system.describe()}: KVM_SET_CPUID2 of KVM_GET_SUPPORTED_CPUID fails ({e}); {why_not}")


# Feature MSRs that KVM gates on a guest CPUID bit since 6.13 (rulesets.CPUID_GATES), by MSR: (leaf, sub-leaf,
# register, bit, name, rule).
_CPUID_GATES: dict[int, tuple[int, int, str, int, str, R.Rule]] = {
    msr: (*bit, name, rule) for rule, (msr, bit, name) in R.CPUID_GATES.items()}


def _kernel_rules(system: System) -> R.Ruleset | None:
    """The ruleset of the kernel ``system`` is (the model's own, or the live kernel's release), None if unknown."""
    info = system.host_info()
    try:
        return R.resolve(str(info.get("ruleset") or info.get("kernel_release") or ""))
    except KvmscopeError:
        return None


def why_refused(system: System, vcpu: Vcpu, index: int, tried: int) -> str:
    """Why a vCPU that never ran refused every changed value of ``index``: the rule where the backend knows it (the
    model), else the CPUID gate the kernel's version has and the vCPU's own CPUID (KVM_GET_CPUID2) trips."""
    rule = vcpu.refusal_rule(index)
    gate = _CPUID_GATES.get(index)
    if gate is not None:
        leaf, sub, reg, bit, feature, gate_rule = gate
        ruleset = _kernel_rules(system)
        gated = rule == gate_rule if rule is not None else ruleset is not None and ruleset.has(gate_rule)
        entry = find_cpuid(vcpu.get_cpuid(), leaf, sub)
        if gated and (entry is None or not getattr(entry, reg) >> bit & 1):
            return (f"the vCPU's CPUID (KVM_GET_CPUID2) lacks {leaf:x}.{sub}:{reg.upper()}[{bit}] ({feature}), "
                    f"so KVM takes only 0 (since {gate_rule.since}, {gate_rule.commit})")
    if rule is not None:
        return f"by the rule {rule.cite()}" + (f"; hint: {rule.hint}" if rule.hint else "")
    return f"all {tried} values tried were refused; the kernel does not say why"


def probe_msr(system: System, index: int, feature: int | None, cpuid: list[CpuidEntry] | None,
              vendor: str | None = None) -> MsrProbe:
    m = _msrs.lookup(index)
    result = MsrProbe(index, m.name, feature, m.decode(feature, vendor) if feature is not None else {})
    # A vCPU that never runs: which changed value (if any) does the kernel take at all?
    vm, vcpu = _fresh_vcpu(system, cpuid)
    with vm:
        current = vcpu.try_read_msr(index)
        result.vcpu_default = current
        base = current if current is not None else 0
        for candidate in _candidates(base, feature):
            result.tried_count += 1
            if result.tried is None:
                result.tried = candidate
            if vcpu.set_msrs([(index, candidate)]) == 1:
                result.changed_value = candidate
                result.before_run_changed_ok = True
                break
        if not result.before_run_changed_ok:
            result.why = why_refused(system, vcpu, index, result.tried_count)
    # A vCPU that has run to HLT: same value, then the changed value.
    vm, vcpu = _fresh_vcpu(system, cpuid)
    with vm:
        exit_ = guest.run_to_hlt(vm, vcpu)
        result.run_exit = exit_.name
        if not isinstance(exit_, HltExit):
            result.verdict = NO_RUN
            return result
        after = vcpu.try_read_msr(index)
        result.after_run_value = after
        if after is not None:
            result.after_run_same_ok = vcpu.set_msrs([(index, after)]) == 1
        changed = result.changed_value
        if changed is None:
            changed = next(_candidates(base, feature))
        result.after_run_changed_ok = vcpu.set_msrs([(index, changed)]) == 1
        result.after_run_readback = vcpu.try_read_msr(index)
    if index == _msrs.MSR_IA32_UCODE_REV and result.after_run_changed_ok:
        result.why = ("UCODE_REV is the one feature MSR KVM leaves writable after a run, for microcode-load emulation "
                      "(x86.c kvm_is_immutable_feature_msr)")
    if not result.before_run_changed_ok:
        result.verdict = NOT_SETTABLE
    elif result.after_run_changed_ok:
        result.verdict = WRITABLE
    else:
        result.verdict = FROZEN
    return result


def freeze_rule(index: int) -> R.Rule:
    """The rule that freezes ``index`` after the first run (PLATFORM_INFO joined the feature MSRs later)."""
    return R.PLATFORM_INFO_IMMUTABLE if index == _msrs.MSR_PLATFORM_INFO else R.FREEZE


def verdict(msrs: list[MsrProbe]) -> tuple[bool | None, str]:
    """The freeze verdict from every feature MSR probed: enforced when each one a VMM can change at all refuses a
    changed value after the first run (UCODE_REV aside: it stays writable by design), with the rule behind each."""
    ucode = [m for m in msrs if m.index == _msrs.MSR_IA32_UCODE_REV]
    immutable = [m for m in msrs if m.index != _msrs.MSR_IA32_UCODE_REV]
    frozen = [m for m in immutable if m.verdict == FROZEN and m.after_run_same_ok]
    writable = [m for m in immutable if m.verdict == WRITABLE]
    by_rule: dict[R.Rule, list[str]] = {}
    for m in frozen:
        by_rule.setdefault(freeze_rule(m.index), []).append(m.name)
    frozen_text = "; ".join(f"{', '.join(names)} (since {r.since}, {r.commit})" for r, names in by_rule.items())
    ucode_text = "; UCODE_REV stays writable" if any(m.verdict == WRITABLE for m in ucode) else ""
    if frozen and not writable:
        return True, (f"this kernel enforces the freeze on every feature MSR it lets a VMM change: {frozen_text} "
                      f"refused a changed value after the first run and accepted the same value{ucode_text}")
    if frozen:
        return False, (f"this kernel enforces the freeze only in part: frozen: {frozen_text}; still writable after "
                       f"the first run: {', '.join(m.name for m in writable)}")
    if writable:
        return False, (f"this kernel does not enforce the freeze (a rule since {R.FREEZE.since}, {R.FREEZE.commit}): "
                       f"{', '.join(m.name for m in writable)} took a changed value after the first run")
    return None, "cannot tell: no feature MSR could be changed even before a run"


def probe(system: System, set_cpuid: bool = True) -> ProbeReport:
    """Probe ``system``: capabilities, feature MSRs with decoded values, and the live freeze check."""
    caps: dict[str, int] = {}
    for cap in PROBED_CAPABILITIES:
        caps[uapi.CAPABILITY_NAMES[cap]] = system.check_extension(cap)
    with system.create_vm() as vm:
        caps["KVM_CAP_DISABLE_QUIRKS2 (VM)"] = vm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
    report = ProbeReport(
        backend=system.backend,
        description=system.describe(),
        host=system.host_info(),
        api_version=system.api_version(),
        capabilities=caps,
        msr_index_list=system.get_msr_index_list(),
        cpuid_set=set_cpuid,
    )
    supported = system.get_supported_cpuid()
    cpuid = supported if set_cpuid else None
    report.cpu_vendor = cpu_vendor_of(supported)
    features = system.get_msr_feature_index_list()
    batch = MsrBatch(features)
    done = system.get_feature_msrs(batch)
    values = {index: value for i, (index, value) in enumerate(batch) if i < done}
    for index in features:
        report.msrs.append(probe_msr(system, index, values.get(index), cpuid, report.cpu_vendor))
    report.freeze_enforced, report.conclusion = verdict(report.msrs)
    report.later = _later(system)
    return report


def _later(system: System) -> dict[str, dict[str, str]]:
    """On the model: the capabilities the profile's host reports, and the feature MSRs and MSRs it lists, that this
    kernel version does not yet, each with the rule that brings it (``CAP_ARRIVALS``, ``MSR_ARRIVALS``; PLATFORM_INFO,
    a feature MSR from 6.13)."""
    rules, profile = getattr(system, "rules", None), getattr(system, "captured", None)
    if not isinstance(rules, R.Ruleset) or profile is None:
        return {}
    found: list[tuple[str, R.Rule]] = []
    for cap in sorted(c for caps in R.CAP_ARRIVALS.values() for c in caps):
        rule = rules.cap_arrival(cap)
        if rule is not None and profile.capability(cap):
            found.append((uapi.CAPABILITY_NAMES.get(cap, f"capability {cap}"), rule))
    found += [(f"{_msrs.name_of(i)} (feature MSR)", R.PLATFORM_INFO_IMMUTABLE) for i in profile.feature_msrs
              if not rules.feature_msr(i)]
    found += [(f"{_msrs.name_of(i)} (MSR)", r) for r, indices in R.MSR_ARRIVALS.items() if r not in rules.rules
              for i in indices if i in getattr(profile, "msr_index_list", ())]
    now = getattr(system, "profile", profile)
    found += _later_fields(rules, profile.history, profile.feature_msrs, now.feature_msrs)
    found += [(name, r) for name, r in lost_features(rules, profile.history, profile.supported_cpuid,
                                                     now.supported_cpuid) if r is not None]
    found.sort(key=lambda f: R.parse_version(f[1].since))
    return {name: {"since": rule.since, "rule": rule.key} for name, rule in found}


def _later_fields(rules: R.Ruleset, history: Sequence[HostArrival], captured: dict[int, int], now: dict[int, int]
                  ) -> list[tuple[str, R.Rule]]:
    """The feature-MSR bits the profile's host reports that this version's KVM does not yet, each with the oldest
    rule not in force that covers it (``FEATURE_ARRIVALS`` and the profile's ``history``)."""
    absent = rules.absent_arrivals((a.rule, a.msr, a.mask, a.before) for a in history if a.msr is not None)
    out = []
    for index, value in captured.items():
        lacking = value & ~now.get(index, 0)
        for r, i, mask, _ in absent:
            if i == index and lacking & mask:
                bits = ", ".join(str(b) for b in range(64) if (lacking & mask) >> b & 1)
                out.append((f"{_msrs.name_of(index)} bit(s) {bits} (feature MSR)", r))
                lacking &= ~mask
    return out
