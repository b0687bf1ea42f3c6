"""Fleets of hosts: what differs between two captured profiles, and the most capable template every host accepts.

The baseline computes each feature MSR by the rule the kernel applies to a host write of it (model/vmx.py and
model/msr_rules.py hold those rules; the facts are from ``arch/x86/kvm/x86.c`` and ``vmx/nested.c``):

- subset MSRs (DE_CFG, VMX_EPT_VPID_CAP, VMX_VMFUNC): a value is taken when it is a subset of the host's, so the
  baseline is the AND of every host's value;
- ARCH_CAPABILITIES and PLATFORM_INFO: KVM stores any value a host writes (6.12.118 x86.c:3370-3373, 3688-3693), so
  the AND is a choice, not a limit: a guest is told only what every host has. ARCH_CAPABILITIES' RSBA and RRSBA (bits
  2 and 19) say that a bug may be present, so they are set where any host has them (OR), as Firecracker's T2S
  template sets them; clearing them would tell a guest on those hosts that it need not mitigate;
- PERF_CAPABILITIES: the LBR format (bits 5:0) and PEBS format (bits 11:8) are taken only equal to the host's (or 0),
  so each is kept where every host has the same and set to 0 otherwise; the other bits are a subset (AND);
- VMX true controls (0x48B, 0x48D-0x490): the allowed-0 half (bits 31:0, a 1 means must be 1) may only gain bits and
  the allowed-1 half (bits 63:32) only lose them: OR of the low halves, AND of the high halves;
- VMX_CR0_FIXED0/CR4_FIXED0: bits may only be added: OR;
- VMX_BASIC, VMX_MISC and VMX_VMCS_ENUM carry fields a host must match: kept when every host has the same value,
  else left out (and said so);
- the non-true VMX controls and CR0/CR4_FIXED1 are read-only to a VMM, and UCODE_REV is a revision rather than a
  capability: left out.

CPUID: the feature-flag registers of the leaves every host lists (``FEATURE_REGISTERS``); a bit is fixed to 1 where
every host has it and to 0 where some host lacks it. Other registers (family/model, topology, cache) pass through.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import msrs as M
from .api import CpuidEntry, cpu_vendor_name, find_cpuid
from .errors import KvmscopeError, ProfileError, shown
from .kernel.profile import Profile
from .template import PER_CPU_BITS, Bitmap, CpuidModifier, LeafModifier, MsrModifier, Template

U64 = (1 << 64) - 1
LOW = 0xFFFFFFFF
PERF_FORMATS = M.PERF_CAP_LBR_FMT | M.PERF_CAP_PEBS_FORMAT
ARCH_CAP_BUG_PRESENT = 1 << 2 | 1 << 19  # RSBA, RRSBA: the guest must assume the behaviour (and mitigate it)

# MSR index -> how the baseline is computed.
MSR_RULES: dict[int, str] = {
    M.MSR_IA32_ARCH_CAPABILITIES: "arch_cap", M.MSR_PLATFORM_INFO: "and", M.MSR_AMD64_DE_CFG: "and",
    M.MSR_IA32_PERF_CAPABILITIES: "perf", M.MSR_IA32_UCODE_REV: "skip",
    0x480: "equal", 0x485: "equal", 0x48A: "equal", 0x48C: "and", 0x491: "and",
    0x486: "or", 0x488: "or", 0x487: "skip", 0x489: "skip",
    0x481: "skip", 0x482: "skip", 0x483: "skip", 0x484: "skip",
    0x48B: "controls", 0x48D: "controls", 0x48E: "controls", 0x48F: "controls", 0x490: "controls",
}

# (leaf, subleaf) -> the registers that are feature flags.
FEATURE_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"),
    (0x7, 0): ("ebx", "ecx", "edx"),
    (0x7, 1): ("eax",),
    (0xD, 1): ("eax",),
    (0x80000001, 0): ("ecx", "edx"),
    (0x80000008, 0): ("ebx",),
}


@dataclass
class Forced:
    """A bit the baseline clears (or sets) because of the named hosts."""

    where: str
    bit: int
    value: int
    hosts: list[str]


@dataclass
class Baseline:
    template: Template
    forced: list[Forced] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template.to_json(),
                "forced": [{"where": f.where, "bit": f.bit, "value": f.value, "hosts": f.hosts} for f in self.forced],
                "left_out": self.left_out, "notes": self.notes}


def _msr_baseline(index: int, rule: str, values: dict[str, int]) -> tuple[int | None, str]:
    """The baseline value of one MSR from each host's value (None: left out, with why)."""
    vs = list(values.values())
    if rule == "arch_cap":
        every, anyone = U64, 0
        for v in vs:
            every, anyone = every & v, anyone | v
        return every & ~ARCH_CAP_BUG_PRESENT | anyone & ARCH_CAP_BUG_PRESENT, ""
    if rule == "and" or rule == "perf":
        out = U64
        for v in vs:
            out &= v
        if rule == "perf":
            for f in (M.PERF_CAP_LBR_FMT, M.PERF_CAP_PEBS_FORMAT):
                same = len({v & f for v in vs}) == 1
                out = (out & ~f) | (vs[0] & f if same else 0)
        return out, ""
    if rule == "or":
        out = 0
        for v in vs:
            out |= v
        return out, ""
    if rule == "controls":
        low, high = 0, LOW
        for v in vs:
            low |= v & LOW
            high &= v >> 32
        if low & ~high:
            return None, f"a control must be 1 on one host and cannot be 1 on another (bits 0x{low & ~high:x})"
        return high << 32 | low, ""
    if rule == "equal":
        if len(set(vs)) == 1:
            return vs[0], ""
        return None, "hosts differ in fields that must match"
    return None, "not a capability a template can set (read-only to a VMM, or a revision)"


def baseline(profiles: Sequence[Profile]) -> Baseline:
    """The most capable template every host of ``profiles`` accepts, and which host forces which bit."""
    names = [p.name for p in profiles]
    out = Baseline(Template(path="<baseline>"))
    vendors: dict[str, list[str]] = {}
    unknown = [p.name for p in profiles if cpu_vendor_name(p.supported_cpuid) is None]
    for p in profiles:
        if (name := cpu_vendor_name(p.supported_cpuid)) is not None:
            vendors.setdefault(name, []).append(p.name)
    if unknown:
        out.notes.append(f"the CPU vendor of {', '.join(unknown)} is not known (no CPUID leaf 0): whether a vCPU can "
                         "move between the hosts is not judged")
    if len(vendors) > 1:
        out.notes.append("the hosts' CPUs are of different vendors (" + "; ".join(
            f"{v}: {', '.join(n)}" for v, n in vendors.items()) + "): every host takes the template, but a running "
            "vCPU cannot move between vendors (fingerprint compare)")
    msr_mods = []
    every = [i for i in profiles[0].feature_msrs if all(i in p.feature_msrs for p in profiles)]
    for i in sorted({i for p in profiles for i in p.feature_msrs} - set(every)):
        hosts = ", ".join(p.name for p in profiles if i in p.feature_msrs)
        out.left_out.append(f"{M.name_of(i)}: only on {hosts} (Firecracker refuses a template MSR it cannot read)")
    for index in sorted(every):
        values = {p.name: p.feature_msrs[index] for p in profiles}
        value, why = _msr_baseline(index, MSR_RULES.get(index, "skip"), values)
        if value is None:
            out.left_out.append(f"{M.name_of(index)}: {why}")
            continue
        msr_mods.append(MsrModifier(index, Bitmap.exact(64, value)))
        for b in range(64):
            # A bit some host has otherwise: the hosts that have it as the baseline does are the ones forcing it.
            forcing = [n for n, v in values.items() if (v >> b & 1) == (value >> b & 1)]
            if len(forcing) < len(values):
                out.forced.append(Forced(f"{M.name_of(index)} (0x{index:x})", b, value >> b & 1, forcing))
    leaves = []
    for key, regs in FEATURE_REGISTERS.items():
        entries = [find_cpuid(p.supported_cpuid, *key) for p in profiles]
        present = [e for e in entries if e is not None]
        if len(present) != len(entries):
            out.left_out.append(f"CPUID 0x{key[0]:x}.{key[1]}: not listed by every host")
            continue
        mods = []
        for r in regs:
            vals = [getattr(e, r) for e in present]
            both = LOW
            for v in vals:
                both &= v
            mods.append(CpuidModifier(r, Bitmap.exact(32, both)))
            for b in range(32):
                lacking = [n for n, v in zip(names, vals, strict=True) if not v >> b & 1]
                if lacking and len(lacking) < len(names):
                    out.forced.append(Forced(f"CPUID 0x{key[0]:x}.{key[1]} {r}", b, 0, lacking))
        leaves.append(LeafModifier(key[0], key[1], present[0].flags, tuple(mods)))
    out.template = Template((), tuple(leaves), tuple(msr_mods), "<baseline>")
    return out


def host(spec: str) -> tuple[Profile, str | None]:
    """A fleet's host and the kernel it is asked under: a shipped profile name or a profile file as it is (None), or
    ``HOST@VERSION``, that host under that kernel (``intel-spr@6.1.192``: its name says so, its ``ruleset`` and kernel
    release are the version). A name or file that exists is itself, '@' or not (``spr@6.12.json``)."""
    from dataclasses import replace

    from .kernel.profile import load, shipped
    from .kernel.rulesets import parse_version, resolve

    name, _, version = spec.rpartition("@") if isinstance(spec, str) else ("", "", "")
    try:
        parse_version(version)
    except KvmscopeError:
        return load(spec), None  # no version after an @: a name or a path as it is
    if spec in shipped() or os.path.lexists(spec):
        return load(spec), None
    if not name:
        raise ProfileError(f"{shown(spec)}: expected HOST@VERSION with a profile name or file before the @")
    try:
        resolve(version)
    except KvmscopeError as e:  # older than the oldest ruleset
        raise ProfileError(f"{shown(spec)}: {e}") from None
    p = load(name)
    return replace(p, name=f"{p.name}@{version}", ruleset=version, kernel_release=version), version


def under(profiles: Sequence[Profile], kernel: str | None, versions: Sequence[str | None] = (),
          notes: list[str] | None = None) -> list[Profile]:
    """Each host as ``kernel`` would report it, or as the version it was asked under (``versions``, HOST@VERSION's;
    the model's view: what that kernel's KVM did not report yet left out, ``rulesets.FEATURE_ARRIVALS``, the CPUID
    and MSR arrivals and the profile's ``history``); a host asked under neither is taken as captured (a capture from a
    distribution's kernel holds backports the mainline release of its number lacks). ``notes`` gets the model's
    warnings (a kernel newer than the rules)."""
    from .model import open_model

    out = []
    for i, p in enumerate(profiles):
        version = kernel or (versions[i] if i < len(versions) else None)
        if version is None:
            out.append(p)
            continue
        with open_model(kernel=version, profile=p) as system:
            out.append(system.profile)
            if system.warning and notes is not None and system.warning not in notes:
                notes.append(system.warning)
    return out


def settle(base: Baseline, profiles: Sequence[Profile], kernel: str | None = None, rounds: int = 4,
           versions: Sequence[str | None] = ()) -> Baseline:
    """Judge ``base`` on the model of every host (under ``kernel``, or its ``versions`` entry, HOST@VERSION's; else as
    captured, under its own kernel's rules) and take out what a host refuses or rewrites: an MSR KVM_SET_MSRS refuses
    is left out (naming the host and rule); CPUID bits a host's KVM_SET_CPUID2 changes are passed through (``x``),
    since no template can hold them there. Repeats until every host takes the template (Firecracker's boot MSRs are
    left out of the judgement: they are not the template's)."""
    from .model import open_model
    from .template_apply import apply

    t = base.template
    for _ in range(rounds):
        dropped: dict[int, str] = {}
        loose: dict[tuple[int, int, str], int] = {}
        for i, p in enumerate(profiles):
            pinned = kernel or (versions[i] if i < len(versions) else None)  # else as captured, under its own rules
            with open_model(kernel=pinned, profile=p, as_captured=pinned is None) as system:
                rep = apply(system, t, 1, boot=())
            if not all(v.cpuid_set for v in rep.vcpus):  # every other verdict would be a vCPU's without CPUID
                failed = next(f for f in rep.failures if "KVM_SET_CPUID2" in f)
                raise ProfileError(f"{p.path}: {p.name} refuses the baseline's CPUID ({failed}); the fleet cannot "
                                   "be judged on it")
            for d in (d for v in rep.vcpus for d in v.diffs if d.kind != "overridden"):  # none: one each
                if d.where.startswith("CPUID"):
                    leaf, sub = d.where.split()[1].split(".")
                    key = (int(leaf, 16), int(sub), d.where.split()[2])
                    loose[key] = loose.get(key, 0) | ((d.wanted ^ (d.got or 0)) & d.mask)
                    base.left_out.append(f"{d.where} bits {', '.join(map(str, d.bits))}: {p.name}'s KVM_SET_CPUID2 "
                                         "changes them; passed through")
                else:
                    index = int(d.where.rsplit("(", 1)[1].rstrip(")"), 16)
                    dropped[index] = f"{d.where}: {p.name} refuses it ({d.rule or d.kind}); left out"
        if not dropped and not loose:
            break
        base.left_out.extend(dropped.values())
        base.forced = [f for f in base.forced if not any(f.where.startswith(M.name_of(i)) for i in dropped)
                       and not _loosened(f, loose)]
        t = Template(t.kvm_capabilities, tuple(_loosen(m, loose) for m in t.cpuid_modifiers),
                     tuple(m for m in t.msr_modifiers if m.addr not in dropped), t.path)
    base.template = t
    return base


def _loosened(f: Forced, loose: dict[tuple[int, int, str], int]) -> bool:
    """Whether a forced CPUID bit was since passed through."""
    return any(f.where == f"CPUID 0x{k[0]:x}.{k[1]} {k[2]}" and mask >> f.bit & 1 for k, mask in loose.items())


def _loosen(m: LeafModifier, loose: dict[tuple[int, int, str], int]) -> LeafModifier:
    regs = []
    for r in m.modifiers:
        free = loose.get((m.leaf, m.subleaf, r.register), 0)
        regs.append(CpuidModifier(r.register, Bitmap(32, r.bitmap.mask & ~free, r.bitmap.value & ~free)))
    return LeafModifier(m.leaf, m.subleaf, m.flags, tuple(regs))


# --- fingerprint compare -----------------------------------------------------------------------------------------------


@dataclass
class Difference:
    what: str  # kernel | vendor | microcode | feature_msr | cpuid
    where: str
    a: str
    b: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"what": self.what, "where": self.where, "a": self.a, "b": self.b, "detail": self.detail}


def _bitnames(index: int, a: int, b: int) -> str:
    """The decoded fields that differ between two values of MSR ``index`` (or the differing bits)."""
    try:
        m = M.lookup(index)
        fa, fb = m.decode(a), m.decode(b)
    except Exception:  # noqa: BLE001 - an MSR without a decoder: fall back to bit numbers
        fa = fb = {}
    names = [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k) != fb.get(k)]
    if names:
        return "fields " + ", ".join(names)
    return "bits " + ", ".join(str(x) for x in range(64) if (a ^ b) >> x & 1)


def compare(a: Profile, b: Profile) -> list[Difference]:
    """What differs between two hosts that matters for migrating a vCPU between them."""
    from .kernel.rulesets import resolve

    out = []
    cpus = [cpu_vendor_name(p.supported_cpuid) for p in (a, b)]
    if None not in cpus and cpus[0] != cpus[1]:  # a host without leaf 0: not judged (the CPUID lines show it)
        out.append(Difference("vendor", "CPU vendor", str(cpus[0]), str(cpus[1]), "a running guest cannot move "
                              "between CPU vendors"))
    if a.vendor != b.vendor:
        out.append(Difference("vendor", "vendor module", a.vendor, b.vendor, "a vCPU's state is its module's: it "
                              "cannot move between modules"))
    rules = [resolve(p.ruleset).version for p in (a, b)]
    if rules[0] != rules[1]:
        out.append(Difference("kernel", "kernel", f"{a.kernel_release} ({rules[0]} rules)",
                              f"{b.kernel_release} ({rules[1]} rules)"))
    for index in sorted(set(a.feature_msrs) | set(b.feature_msrs)):
        va, vb = a.feature_msrs.get(index), b.feature_msrs.get(index)
        if va == vb:
            continue
        what = "microcode" if index == M.MSR_IA32_UCODE_REV else "feature_msr"
        sa, sb = ("-" if v is None else f"0x{v:x}" for v in (va, vb))
        detail = _bitnames(index, va, vb) if va is not None and vb is not None else "listed by one host only"
        out.append(Difference(what, f"{M.name_of(index)} (0x{index:x})", sa, sb, detail))
    keys = list(dict.fromkeys([e.key for e in a.supported_cpuid] + [e.key for e in b.supported_cpuid]))
    for key in keys:
        ea, eb = _entry(a.supported_cpuid, key), _entry(b.supported_cpuid, key)
        if ea is None or eb is None:
            out.append(Difference("cpuid", f"CPUID 0x{key[0]:x}.{key[1]}", "-" if ea is None else "listed",
                                  "-" if eb is None else "listed", "leaf listed by one host only"))
            continue
        for r in ("eax", "ebx", "ecx", "edx"):
            mine = PER_CPU_BITS.get((key[0], r), 0)  # the APIC ID of the CPU each capture ran on: not the host's
            va, vb = getattr(ea, r) & ~mine, getattr(eb, r) & ~mine
            if va != vb:
                bits = ", ".join(str(x) for x in range(32) if (va ^ vb) >> x & 1)
                out.append(Difference("cpuid", f"CPUID 0x{key[0]:x}.{key[1]} {r}", f"0x{va:x}", f"0x{vb:x}",
                                      f"bits {bits}"))
    return out


def _entry(entries: Sequence[CpuidEntry], key: tuple[int, int]) -> CpuidEntry | None:
    return next((e for e in entries if e.key == key), None)
