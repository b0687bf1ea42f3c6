"""Host profiles: what the model needs to be a given host, as schema-versioned JSON (docs/profiles.md).

A profile holds the kernel release and ruleset, the vendor module (vmx, svm, pvm), capabilities, the feature-MSR list and
values, the MSR index list, the supported CPUID, vCPU defaults, how ordinary MSRs behave, and how the kernel rewrites
CPUID on KVM_SET_CPUID2. ``kvmscope probe --save FILE`` writes one from the live host; a malformed file gets a
:class:`ProfileError` naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import uapi
from ..api import CpuidEntry
from ..errors import ProfileError
from . import rulesets

SCHEMA = 1
VENDORS = ("vmx", "svm", "pvm")
REGISTERS = ("eax", "ebx", "ecx", "edx")
BEHAVIOURS = ("store", "drop", "zero_only", "refuse", "volatile", "other")
CAP_BY_NAME = {v: k for k, v in uapi.CAPABILITY_NAMES.items()}


@dataclass(frozen=True)
class MsrBehaviour:
    """How an ordinary (non-feature) MSR answers host accesses on this host.

    ``store``: any value is written and read back; ``drop``: writes succeed, reads keep giving ``default``;
    ``zero_only``: only 0 is accepted; ``refuse``: every write is refused; ``volatile``: reads change on their own (TSC);
    ``other``: a pattern the classes above do not capture (the model stores the value; conformance tests skip these).
    """

    kind: str
    default: int = 0
    readable: bool = True


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
    """When leaf ``trigger`` is in the list, KVM_SET_CPUID2 appends the listed leaves that are missing."""

    trigger: tuple[int, int]
    entries: tuple[CpuidEntry, ...]


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
    cpuid_rewrite: list[RewriteRule] = field(default_factory=list)
    cpuid_append: list[AppendRule] = field(default_factory=list)
    cpuid_runtime_ospke: bool = True
    guest_xfd_permitted: bool = False
    reset_regs: dict[str, int] = field(default_factory=dict)
    reset_sregs: dict[str, Any] = field(default_factory=dict)
    run_without_memory_errno: int | None = None
    path: str = "<memory>"

    # -- facts derived from the data --
    @property
    def supported_perf_cap(self) -> int:
        return self.feature_msrs.get(0x345, 0)

    @property
    def nested_vmx(self) -> bool:
        return any(0x480 <= i <= 0x491 for i in self.feature_msrs)

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
            },
            "ignore_msrs": self.ignore_msrs,
            "msr_behaviour": {
                h(i): {"kind": b.kind, "default": h(b.default), "readable": b.readable}
                for i, b in self.msr_behaviour.items()
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
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _leaf(key: tuple[int, int]) -> str:
    return f"0x{key[0]:x}.{key[1]}"


def _cpuid_json(e: CpuidEntry) -> dict[str, Any]:
    return {"function": f"0x{e.function:x}", "index": e.index, "flags": e.flags,
            **{r: f"0x{getattr(e, r):08x}" for r in REGISTERS}}


def _rule_json(r: RewriteRule) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": _leaf((r.function, r.index)), "register": r.register,
                           "keep": f"0x{r.keep:08x}", "force": f"0x{r.force:08x}"}
    if r.requires:
        out["requires"] = _leaf(r.requires)
    if r.unless:
        out["unless"] = _leaf(r.unless)
    return out


# --- loading, with errors that name the file and the field ----------------------------------------------------------


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> ProfileError:
        return ProfileError(f"{self.path}: field {where}: {what}")

    def obj(self, v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def lst(self, v: Any, where: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(where, f"expected a list, got {type(v).__name__}")
        return v

    def string(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"expected a string, got {type(v).__name__}")
        return v

    def boolean(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(where, f"expected true or false, got {v!r}")
        return v

    def integer(self, v: Any, where: str, bits: int = 64) -> int:
        if isinstance(v, bool):
            raise self.fail(where, f"expected an integer, got {v!r}")
        if isinstance(v, str):
            try:
                v = int(v, 0)
            except ValueError:
                raise self.fail(where, f"expected an integer like 0x1f or 31, got {v!r}") from None
        if not isinstance(v, int):
            raise self.fail(where, f"expected an integer, got {type(v).__name__}")
        if not 0 <= v < 1 << bits:
            raise self.fail(where, f"{v:#x} does not fit in {bits} bits unsigned")
        return v

    def leaf(self, v: Any, where: str) -> tuple[int, int]:
        text = self.string(v, where)
        fn, _, idx = text.partition(".")
        return (self.integer(fn, where, 32), self.integer(idx or "0", where, 32))

    def cpuid_entry(self, v: Any, where: str) -> CpuidEntry:
        d = self.obj(v, where)
        unknown = set(d) - {"function", "index", "flags", *REGISTERS}
        if unknown:
            raise self.fail(where, f"unknown keys {sorted(unknown)}")
        if "function" not in d:
            raise self.fail(f"{where}.function", "missing")
        return CpuidEntry(*(self.integer(d.get(k, 0), f"{where}.{k}", 32)
                            for k in ("function", "index", "flags", *REGISTERS)))

    def caps(self, v: Any, where: str) -> dict[int, int]:
        out = {}
        for k, val in self.obj(v, where).items():
            cap = CAP_BY_NAME.get(k)
            if cap is None:
                try:
                    cap = int(k, 0)
                except ValueError:
                    raise self.fail(f"{where}.{k}", "unknown capability name") from None
            out[cap] = self.integer(val, f"{where}.{k}", 64)
        return out


def from_json(data: Any, path: str = "<memory>") -> Profile:
    """Build a profile from parsed JSON, checking every field."""
    r = _Reader(path)
    d = r.obj(data, "(top level)")
    schema = d.get("schema")
    if schema != SCHEMA:
        raise r.fail("schema", f"expected {SCHEMA}, got {schema!r}")
    for required in ("name", "vendor", "kernel_release", "feature_msrs", "msr_index_list", "supported_cpuid"):
        if required not in d:
            raise r.fail(required, "missing")
    vendor = r.string(d["vendor"], "vendor")
    if vendor not in VENDORS:
        raise r.fail("vendor", f"expected one of {', '.join(VENDORS)}, got {vendor!r}")
    ruleset = r.string(d.get("ruleset", d["kernel_release"]), "ruleset")
    try:
        rulesets.resolve(ruleset)
    except Exception as e:
        raise r.fail("ruleset", str(e)) from None
    feature = {r.integer(k, f"feature_msrs.{k}", 32): r.integer(v, f"feature_msrs.{k}")
               for k, v in r.obj(d["feature_msrs"], "feature_msrs").items()}
    index_list = [r.integer(v, f"msr_index_list[{i}]", 32) for i, v in enumerate(r.lst(d["msr_index_list"],
                                                                                          "msr_index_list"))]
    cpuid = [r.cpuid_entry(e, f"supported_cpuid[{i}]") for i, e in enumerate(r.lst(d["supported_cpuid"],
                                                                                    "supported_cpuid"))]
    vcpu = r.obj(d.get("vcpu", {}), "vcpu")
    ucode = vcpu.get("ucode_rev_reset")
    behaviour = {}
    for k, v in r.obj(d.get("msr_behaviour", {}), "msr_behaviour").items():
        where = f"msr_behaviour.{k}"
        b = r.obj(v, where)
        kind = r.string(b.get("kind"), f"{where}.kind")
        if kind not in BEHAVIOURS:
            raise r.fail(f"{where}.kind", f"expected one of {', '.join(BEHAVIOURS)}, got {kind!r}")
        behaviour[r.integer(k, where, 32)] = MsrBehaviour(kind, r.integer(b.get("default", 0), f"{where}.default"),
                                                          r.boolean(b.get("readable", True), f"{where}.readable"))
    cp = r.obj(d.get("cpuid", {}), "cpuid")
    rules = []
    for i, rule in enumerate(r.lst(cp.get("rewrite", []), "cpuid.rewrite")):
        where = f"cpuid.rewrite[{i}]"
        rd = r.obj(rule, where)
        reg = r.string(rd.get("register"), f"{where}.register")
        if reg not in REGISTERS:
            raise r.fail(f"{where}.register", f"expected one of {', '.join(REGISTERS)}, got {reg!r}")
        fn, idx = r.leaf(rd.get("leaf"), f"{where}.leaf")
        rules.append(RewriteRule(
            fn, idx, reg, r.integer(rd.get("keep"), f"{where}.keep", 32), r.integer(rd.get("force"), f"{where}.force", 32),
            r.leaf(rd["requires"], f"{where}.requires") if "requires" in rd else None,
            r.leaf(rd["unless"], f"{where}.unless") if "unless" in rd else None,
        ))
    appends = []
    for i, a in enumerate(r.lst(cp.get("append", []), "cpuid.append")):
        where = f"cpuid.append[{i}]"
        ad = r.obj(a, where)
        appends.append(AppendRule(
            r.leaf(ad.get("trigger"), f"{where}.trigger"),
            tuple(r.cpuid_entry(e, f"{where}.entries[{j}]") for j, e in enumerate(r.lst(ad.get("entries"),
                                                                                         f"{where}.entries"))),
        ))
    errno_ = vcpu.get("run_without_memory_errno")
    return Profile(
        name=r.string(d["name"], "name"),
        description=r.string(d.get("description", ""), "description"),
        vendor=vendor,
        kernel_release=r.string(d["kernel_release"], "kernel_release"),
        ruleset=ruleset,
        feature_msrs=feature,
        msr_index_list=index_list,
        supported_cpuid=cpuid,
        capabilities=r.caps(d.get("capabilities", {}), "capabilities"),
        vm_capabilities=r.caps(d.get("vm_capabilities", {}), "vm_capabilities"),
        module_parameters={str(k): str(v) for k, v in r.obj(d.get("module_parameters", {}),
                                                            "module_parameters").items()},
        source=r.obj(d.get("source", {}), "source"),
        api_version=r.integer(d.get("api_version", 12), "api_version", 32),
        vcpu_mmap_size=r.integer(d.get("vcpu_mmap_size", 12288), "vcpu_mmap_size", 32),
        ucode_rev_reset=None if ucode is None else r.integer(ucode, "vcpu.ucode_rev_reset"),
        ignore_msrs=r.boolean(d.get("ignore_msrs", False), "ignore_msrs"),
        msr_behaviour=behaviour,
        cpuid_rewrite=rules,
        cpuid_append=appends,
        cpuid_runtime_ospke=r.boolean(cp.get("runtime_ospke", True), "cpuid.runtime_ospke"),
        guest_xfd_permitted=r.boolean(cp.get("guest_xfd_permitted", False), "cpuid.guest_xfd_permitted"),
        reset_regs={str(k): r.integer(v, f"vcpu.reset_regs.{k}") for k, v in r.obj(vcpu.get("reset_regs", {}),
                                                                                      "vcpu.reset_regs").items()},
        reset_sregs=r.obj(vcpu.get("reset_sregs", {}), "vcpu.reset_sregs"),
        run_without_memory_errno=None if errno_ is None else r.integer(errno_, "vcpu.run_without_memory_errno", 16),
        path=path,
    )


def shipped() -> list[str]:
    """Names of the profiles shipped with kvmscope."""
    return sorted(p.name[:-5] for p in resources.files("kvmscope.profiles").iterdir() if p.name.endswith(".json"))


DEFAULT_PROFILE = "pvm-6.18"


def load(spec: str | Path | None = None) -> Profile:
    """Load a shipped profile by name, or a profile JSON file by path."""
    spec = DEFAULT_PROFILE if spec is None else spec
    path = Path(spec)
    if isinstance(spec, str) and "/" not in spec and not spec.endswith(".json"):
        res = resources.files("kvmscope.profiles") / f"{spec}.json"
        if not res.is_file():
            raise ProfileError(f"no shipped profile named {spec!r}; shipped: {', '.join(shipped())} (or give a path)")
        text, where = res.read_text(), f"profile {spec}"
    else:
        try:
            text, where = path.read_text(), str(path)
        except OSError as e:
            raise ProfileError(f"{path}: cannot read profile: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return from_json(data, where)
