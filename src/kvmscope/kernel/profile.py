"""Host profiles: what the model needs to be a given host, as schema-versioned JSON (docs/profiles.md).

A profile holds the kernel release and ruleset, the vendor module (vmx, svm, pvm), capabilities, the feature-MSR list and
values, the MSR index list, the supported CPUID, vCPU defaults, how ordinary MSRs behave, and how the kernel rewrites
CPUID on KVM_SET_CPUID2. ``kvmscope probe --save FILE`` writes one from the live host; a malformed file gets a
:class:`ProfileError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import inputs, uapi
from ..api import CpuidEntry
from ..errors import InvalidValueError, ProfileError
from ..schema import (
    CPUID_ENTRY,
    AnyMapping,
    Bool,
    Field,
    Int,
    Leaf,
    ListOf,
    MapOf,
    Nullable,
    Reader,
    Record,
    Str,
    Struct,
    Style,
    Text,
    Type,
    Version,
    unwrap,
)
from ..schema import REGISTERS as REGISTERS  # re-exported: capture.py names CPUID registers from here
from . import rulesets

SCHEMA = 1
# What a capture measures, numbered: a cached capture of this host (``backends.default_profile``) made by a kvmscope
# that measured less is taken again. 2: ``vcpu.cr4_accepted``. 3: ``vendor_msrs`` (capture.vendor_msrs). 4: the
# unlisted MSRs of KVM's range, the MTRRs, and appended CPUID leaves as appended. 5: XFD's and CET's MSRs (named).
# 6: the PMU and Hyper-V MSRs (named; the P6 counters and event selects answer in common code where no PMU claims them).
# 7: AMD's K7 and F15H PMU MSRs, PEBS_DATA_CFG and the rest of Hyper-V's (named; K7's answer in common code too).
CAPTURE_FORMAT = 7
VENDORS = ("vmx", "svm", "pvm")
BEHAVIOURS = ("store", "drop", "zero_only", "zero_drop", "refuse", "volatile", "other")
CAP_BY_NAME = {v: k for k, v in uapi.CAPABILITY_NAMES.items()}


@dataclass(frozen=True)
class MsrBehaviour:
    """How an ordinary (non-feature) MSR answers host accesses on this host.

    ``store``: any value is written and read back; ``drop``: writes succeed, reads keep giving ``default``;
    ``zero_only``: only 0 is accepted; ``zero_drop``: only 0 and ``default`` are accepted, reads keep giving ``default``,
    guest accesses fault; ``refuse``: every write is refused; ``volatile``: reads change on their own (TSC);
    ``other``: a pattern the classes above do not capture (the model stores the value; conformance tests skip these).
    """

    kind: str
    default: int = 0
    readable: bool = True
    evidence: str = ""  # for a vendor MSR (Profile.vendor_msrs): what showed the vendor module's behaviour


@dataclass(frozen=True)
class RewriteRule:
    """KVM_SET_CPUID2 stores ``(value & keep) | force`` for ``register`` of leaf ``(function, index)``, when the final
    list holds ``requires`` (or lacks ``unless``)."""

    function: int
    index: int
    register: str
    keep: int
    force: int
    requires: tuple[int, int] | None = None
    unless: tuple[int, int] | None = None


@dataclass(frozen=True)
class AppendRule:
    """When leaf ``trigger`` is in the list and the first of ``entries`` is not, KVM_SET_CPUID2 appends every one of
    ``entries``, those already in the list too (PVM here: leaf 1 without 0xD.0 brings 0xD.0, 1, 2, 5, 6, 7; with 0xD.0
    it brings nothing)."""

    trigger: tuple[int, int]
    entries: tuple[CpuidEntry, ...]


@dataclass(frozen=True)
class HostArrival:
    """A change of a later release to what this host's KVM reports: under a kernel without ``rule``, ``mask`` of the
    feature MSR ``msr`` reads ``before``; or (``leaf`` and ``register``) KVM_GET_SUPPORTED_CPUID does not offer the
    bits ``mask`` there. For what a host's hardware decides (perf's PEBS support on Sapphire Rapids), where the global
    arrivals of ``rulesets`` cannot say."""

    rule: rulesets.Rule
    mask: int
    msr: int | None = None
    before: int = 0
    leaf: tuple[int, int] | None = None
    register: str = ""


@dataclass
class Profile:
    """A host profile (schema 1, docs/profiles.md). Treat it as fixed once a system is opened with it: vCPUs derive
    their MSR tables (which MSRs are store-only, which have setters) from it when they are created."""

    name: str
    description: str
    vendor: str
    kernel_release: str
    ruleset: str
    feature_msrs: dict[int, int]
    msr_index_list: list[int]
    supported_cpuid: list[CpuidEntry]
    capabilities: dict[int, int] = field(default_factory=dict)
    vm_capabilities: dict[int, int] = field(default_factory=dict)
    module_parameters: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    api_version: int = 12
    vcpu_mmap_size: int = 12288
    ucode_rev_reset: int | None = None
    ignore_msrs: bool = False
    msr_behaviour: dict[int, MsrBehaviour] = field(default_factory=dict)
    # MSRs this host's vendor module handles itself, unlike upstream KVM's common-code rule, with the evidence: the
    # model takes their behaviour from here instead of the rule (a capture measures them: capture.vendor_msrs).
    vendor_msrs: dict[int, MsrBehaviour] = field(default_factory=dict)
    cpuid_rewrite: list[RewriteRule] = field(default_factory=list)
    cpuid_append: list[AppendRule] = field(default_factory=list)
    cpuid_runtime_ospke: bool = True
    guest_xfd_permitted: bool = False
    reset_regs: dict[str, int] = field(default_factory=dict)
    reset_sregs: dict[str, Any] = field(default_factory=dict)
    run_without_memory_errno: int | None = None
    # The CR4 bits KVM_SET_SREGS took on this host, each alone on a vCPU given the supported CPUID (capture). The
    # model reads it on PVM only (model/cr4.py); None there: CR4 is not checked.
    cr4_accepted: int | None = None
    history: list[HostArrival] = field(default_factory=list)
    path: str = "<memory>"

    # -- facts derived from the data --
    @property
    def supported_perf_cap(self) -> int:
        return self.feature_msrs.get(0x345, 0)

    @property
    def behaviours(self) -> dict[int, MsrBehaviour]:
        """How each ordinary MSR behaves: the captured ``msr_behaviour``, with ``vendor_msrs`` over it."""
        return {**self.msr_behaviour, **self.vendor_msrs}

    @property
    def nested_vmx(self) -> bool:
        return any(0x480 <= i <= 0x491 for i in self.feature_msrs)

    @property
    def nested_svm(self) -> bool:
        """kvm_amd's ``nested`` parameter (on unless the profile records it off)."""
        return self.vendor == "svm" and self.module_parameters.get("kvm_amd.nested", "1") not in ("0", "N", "n")

    def capability(self, cap: int, vm: bool = False) -> int:
        if vm and cap in self.vm_capabilities:
            return self.vm_capabilities[cap]
        return self.capabilities.get(cap, 0)

    # -- JSON --
    def to_json(self) -> dict[str, Any]:
        def h(v: int) -> str:
            return f"0x{v:x}"

        def cap_key(c: int) -> str:
            return uapi.CAPABILITY_NAMES.get(c, str(c))

        return {
            "schema": SCHEMA,
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "vendor": self.vendor,
            "kernel_release": self.kernel_release,
            "ruleset": self.ruleset,
            "module_parameters": self.module_parameters,
            "api_version": self.api_version,
            "vcpu_mmap_size": self.vcpu_mmap_size,
            "capabilities": {cap_key(c): v for c, v in self.capabilities.items()},
            "vm_capabilities": {cap_key(c): v for c, v in self.vm_capabilities.items()},
            "feature_msrs": {h(i): h(v) for i, v in self.feature_msrs.items()},
            "msr_index_list": [h(i) for i in self.msr_index_list],
            "supported_cpuid": [_cpuid_json(e) for e in self.supported_cpuid],
            "vcpu": {
                "ucode_rev_reset": None if self.ucode_rev_reset is None else h(self.ucode_rev_reset),
                "reset_regs": {k: h(v) for k, v in self.reset_regs.items()},
                "reset_sregs": self.reset_sregs,
                "run_without_memory_errno": self.run_without_memory_errno,
                "cr4_accepted": None if self.cr4_accepted is None else h(self.cr4_accepted),
            },
            "ignore_msrs": self.ignore_msrs,
            "msr_behaviour": {
                h(i): {"kind": b.kind, "default": h(b.default), "readable": b.readable}
                for i, b in self.msr_behaviour.items()
            },
            "vendor_msrs": {
                h(i): {"kind": b.kind, "default": h(b.default), "readable": b.readable, "evidence": b.evidence}
                for i, b in self.vendor_msrs.items()
            },
            "cpuid": {
                "rewrite": [_rule_json(r) for r in self.cpuid_rewrite],
                "append": [
                    {"trigger": _leaf(a.trigger), "entries": [_cpuid_json(e) for e in a.entries]}
                    for a in self.cpuid_append
                ],
                "runtime_ospke": self.cpuid_runtime_ospke,
                "guest_xfd_permitted": self.guest_xfd_permitted,
            },
            **({"history": [_arrival_json(a) for a in self.history]} if self.history else {}),
        }

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON to a regular file (a FIFO or a device is refused, never waited on)."""
        inputs.write_text(path, json.dumps(self.to_json(), indent=1) + "\n", ProfileError)


def _leaf(key: tuple[int, int]) -> str:
    return f"0x{key[0]:x}.{key[1]}"


def _cpuid_json(e: CpuidEntry) -> dict[str, Any]:
    return {"function": f"0x{e.function:x}", "index": e.index, "flags": e.flags,
            **{r: f"0x{getattr(e, r):08x}" for r in REGISTERS}}


def _arrival_json(a: HostArrival) -> dict[str, Any]:
    if a.leaf is not None:
        return {"rule": a.rule.key, "cpuid": _leaf(a.leaf), "register": a.register, "mask": f"0x{a.mask:x}"}
    return {"rule": a.rule.key, "feature_msr": f"0x{a.msr:x}", "mask": f"0x{a.mask:x}", "before": f"0x{a.before:x}"}


def _rule_json(r: RewriteRule) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": _leaf((r.function, r.index)), "register": r.register,
                           "keep": f"0x{r.keep:08x}", "force": f"0x{r.force:08x}"}
    if r.requires:
        out["requires"] = _leaf(r.requires)
    if r.unless:
        out["unless"] = _leaf(r.unless)
    return out


# --- reading, with errors that name the file and the field: the format as tables of the one reader --------------------


class Capability(Type[int]):
    """A ``KVM_CAP_*`` name kvmscope knows, or a capability number."""

    def read(self, r: Reader, x: Any, path: str) -> int:
        name = unwrap(x)[0]
        cap = CAP_BY_NAME.get(name) if isinstance(name, str) else None
        if cap is None:
            try:
                cap = int(name, 0)
            except (TypeError, ValueError):
                raise r.fail(x, path, "unknown capability name") from None
        return cap


def _rewrite(leaf: tuple[int, int], register: str, keep: int, force: int, requires: tuple[int, int] | None = None,
             unless: tuple[int, int] | None = None) -> RewriteRule:
    return RewriteRule(leaf[0], leaf[1], register, keep, force, requires, unless)


def _append(trigger: tuple[int, int], entries: list[CpuidEntry]) -> AppendRule:
    return AppendRule(trigger, tuple(entries))


def _finish(r: Reader, x: Any, path: str, values: dict[str, Any]) -> None:
    """The ruleset defaults to the kernel release, and must resolve either way; the CPUID must fit one vCPU. An unknown
    top-level key is ignored (a newer kvmscope may add some), unless it looks like a misspelt known one."""
    unknown = [k for k in unwrap(x)[0] if isinstance(k, str) and k not in PROFILE.keys]
    if unknown:
        import difflib  # only for the message (kept out of `import kvmscope`: tests/test_import_footprint.py)

        for k in unknown:
            close = difflib.get_close_matches(k, PROFILE.keys, n=1, cutoff=0.8)
            if close:
                raise r.fail(x, inputs.shown(k), f"unknown field (did you mean {close[0]}?)")
    values.setdefault("ruleset", values["kernel_release"])
    try:
        own = rulesets.resolve(values["ruleset"])
    except Exception as e:
        raise r.fail(x, "ruleset", inputs.shown(str(e))) from None
    _check_history(r, x, values, own)
    _check_cpuid_size(r, x, values)
    values["path"] = r.file


def _check_history(r: Reader, x: Any, values: dict[str, Any], own: rulesets.Ruleset) -> None:
    """Each ``history`` entry: a rule that brings a change from a release on (not one that ended), in force on the
    profile's own kernel (what the host reported), about a feature MSR or CPUID leaf the profile has."""
    from ..api import find_cpuid

    for i, a in enumerate(values.get("history", [])):
        where = f"history[{i}]"
        if a.rule.start is None or a.rule.until is not None:
            raise r.fail(x, f"{where}.rule", f"{a.rule.key} is not a change from a release on (since {a.rule.since}"
                         + (f", until {a.rule.until}" if a.rule.until else "") + ")")
        if not own.has(a.rule):
            raise r.fail(x, f"{where}.rule", f"{a.rule.key} (since {a.rule.since}) is not in force on the profile's own "
                         f"kernel ({values['ruleset']}): there the value is the one captured")
        if a.msr is not None and (a.register or a.msr not in values["feature_msrs"]):
            raise r.fail(x, where, "a feature_msr entry has no register" if a.register else
                         f"feature_msr 0x{a.msr:x} is not in feature_msrs")
        if a.leaf is not None and find_cpuid(values["supported_cpuid"], *a.leaf) is None:
            raise r.fail(x, f"{where}.cpuid", f"leaf 0x{a.leaf[0]:x}.{a.leaf[1]} is not in supported_cpuid")


def _check_cpuid_size(r: Reader, x: Any, values: dict[str, Any]) -> None:
    """KVM holds at most KVM_MAX_CPUID_ENTRIES (256) per vCPU: KVM_SET_CPUID2 refuses more (E2BIG), and a vCPU that
    stored more could not be read back (KVM_GET_CPUID2). Every command sets the supported list (or a template of the
    same leaves) on a vCPU, so a profile whose list, or what its ``cpuid.append`` rules make of it, is larger cannot
    be modelled."""
    limit = uapi.KVM_MAX_CPUID_ENTRIES
    supported: list[CpuidEntry] = values["supported_cpuid"]
    if len(supported) > limit:
        raise r.fail(x, "supported_cpuid", f"{len(supported)} entries; a vCPU holds at most {limit} "
                     "(KVM_MAX_CPUID_ENTRIES: KVM_SET_CPUID2 refuses more with E2BIG)")
    keys = {e.key for e in supported}
    n = len(supported)
    for i, rule in enumerate(values.get("cpuid_append", [])):  # as model/cpuid.py rewrite() appends
        if rule.trigger in keys:
            added = [e.key for e in rule.entries if e.key not in keys]
            n += len(added)
            keys.update(added)
            if n > limit:
                raise r.fail(x, f"cpuid.append[{i}].entries", f"KVM_SET_CPUID2 of supported_cpuid would hold {n} "
                             f"entries with those this rule appends; a vCPU holds at most {limit} "
                             "(KVM_MAX_CPUID_ENTRIES)")


ERRORS = Style(ProfileError, "{file}: field {field}: {what}")
MSR_BEHAVIOUR = Record(MsrBehaviour, [Field("kind", Str(BEHAVIOURS), required=True), Field("default", Int()),
                                      Field("readable", Bool())], strict=False)
VENDOR_MSR = Record(MsrBehaviour, [Field("kind", Str(BEHAVIOURS), required=True), Field("default", Int()),
                                   Field("readable", Bool()), Field("evidence", Text(), required=True)], strict=False)
REWRITE_RULE = Record(_rewrite, [
    Field("leaf", Leaf(), required=True), Field("register", Str(REGISTERS), required=True),
    Field("keep", Int(32), required=True), Field("force", Int(32), required=True),
    Field("requires", Leaf()), Field("unless", Leaf()),
], strict=False)
APPEND_RULE = Record(_append, [Field("trigger", Leaf(), required=True),
                               Field("entries", ListOf(CPUID_ENTRY), required=True)], strict=False)


class RuleKey(Type[rulesets.Rule]):
    """A rule of ``rulesets`` by its key."""

    def read(self, r: Reader, x: Any, path: str) -> rulesets.Rule:
        try:
            return rulesets.rule(Str().read(r, x, path))
        except InvalidValueError as e:
            raise r.fail(x, path, str(e)) from None


def _arrival(r: Reader, x: Any, path: str, values: dict[str, Any]) -> None:
    """One of ``feature_msr`` (with ``before``, within ``mask``) or ``cpuid`` (with ``register``, no ``before``)."""
    msr, leaf = values.get("msr"), values.get("leaf")
    if (msr is None) == (leaf is None):
        raise r.fail(x, path, "expected one of feature_msr or cpuid (what the rule changes)")
    if leaf is not None and ("register" not in values or "before" in values):
        raise r.fail(x, path, "a cpuid entry names its register and has no before (the bits came with the rule)")
    if msr is not None and values.get("before", 0) & ~values["mask"]:
        raise r.fail(x, f"{path}.before", f"0x{values['before']:x} has bits outside mask 0x{values['mask']:x}")


HOST_ARRIVAL = Record(HostArrival, [
    Field("rule", RuleKey(), required=True), Field("mask", Int(), required=True), Field("feature_msr", Int(32), attr="msr"),
    Field("before", Int()), Field("cpuid", Leaf(), attr="leaf"), Field("register", Str(REGISTERS)),
], finish=_arrival)


class Name(Str):
    """A profile's name: one printable line (reports print it as the host's name), as ``probe --save --name`` asks."""

    def read(self, r: Reader, x: Any, path: str) -> str:
        v = super().read(r, x, path)
        if not v.strip() or not v.isprintable():
            raise r.fail(x, path, f"expected a printable name on one line, got '{inputs.shown(v)}'")
        return v


# Unknown keys are ignored (a newer kvmscope may add some, _finish refuses a misspelt known one); a CPUID entry's are
# an error.
PROFILE: Record[Profile] = Record(Profile, [
    Field("schema", Version(SCHEMA), required=True, store=False),
    Field("name", Name(), required=True),
    Field("description", Str(), default=""),
    Field("source", AnyMapping()),
    Field("vendor", Str(VENDORS), required=True),
    Field("kernel_release", Str(), required=True),
    Field("ruleset", Str()),
    Field("module_parameters", MapOf(Text(), Text())),
    Field("api_version", Int(32)),
    Field("vcpu_mmap_size", Int(32)),
    Field("capabilities", MapOf(Capability(), Int())),
    Field("vm_capabilities", MapOf(Capability(), Int())),
    Field("feature_msrs", MapOf(Int(32), Int()), required=True),
    Field("msr_index_list", ListOf(Int(32)), required=True),
    Field("supported_cpuid", ListOf(CPUID_ENTRY), required=True),
    Field("vcpu.ucode_rev_reset", Nullable(Int())),
    Field("vcpu.reset_regs", Struct(uapi.kvm_regs)),
    Field("vcpu.reset_sregs", Struct(uapi.kvm_sregs)),
    Field("vcpu.run_without_memory_errno", Nullable(Int(16))),
    Field("vcpu.cr4_accepted", Nullable(Int())),
    Field("ignore_msrs", Bool()),
    Field("msr_behaviour", MapOf(Int(32), MSR_BEHAVIOUR)),
    Field("vendor_msrs", MapOf(Int(32), VENDOR_MSR)),
    Field("cpuid.rewrite", ListOf(REWRITE_RULE), attr="cpuid_rewrite"),
    Field("cpuid.append", ListOf(APPEND_RULE), attr="cpuid_append"),
    Field("cpuid.runtime_ospke", Bool(), attr="cpuid_runtime_ospke"),
    Field("cpuid.guest_xfd_permitted", Bool()),
    Field("history", ListOf(HOST_ARRIVAL)),
], strict=False, finish=_finish)


def read(data: Any, path: str = "<memory>") -> Profile:
    """A profile from parsed JSON (``path`` names it in errors), checking every field."""
    return PROFILE.read(Reader(path, ERRORS), data, "")


def shipped() -> list[str]:
    """Names of the profiles shipped with kvmscope."""
    return sorted(p.name[:-5] for p in resources.files("kvmscope.profiles").iterdir() if p.name.endswith(".json"))


DEFAULT_PROFILE = "pvm-6.18"


def load(spec: str | Path | None = None) -> Profile:
    """Load a shipped profile by name, or a profile JSON file by path. A bare word (no ``/``, no ``.json``) is a
    shipped name first, else a file of that name (``probe --save myhost`` writes one), else an error."""
    spec = DEFAULT_PROFILE if spec is None else spec
    if not isinstance(spec, (str, Path)):
        raise ProfileError(f"a profile is a shipped name or a path, got {type(spec).__name__} {spec!r:.60}")
    path = Path(spec)
    if isinstance(spec, str) and "/" not in spec and not spec.endswith(".json") and (
            spec in shipped() or not os.path.lexists(spec)):  # lexists: False for NUL or 10,000 characters too
        if spec not in shipped():
            raise ProfileError(f"no shipped profile named {inputs.shown(spec)!r} and no file of that name; shipped: "
                               f"{', '.join(shipped())} (or give a path)")
        res = resources.files("kvmscope.profiles") / f"{spec}.json"
        text, where = res.read_text(), f"profile {spec}"
    else:
        where = inputs.shown(path)
        text = inputs.read_text(path, ProfileError, "a profile")
    return read(inputs.json_data(text, where, ProfileError), where)
