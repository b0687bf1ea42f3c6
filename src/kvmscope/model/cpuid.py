"""CPUID as the kernel stores it: the vendor's rewriting (profile data), the runtime bits KVM owns, and the checks.

Upstream sources: ``arch/x86/kvm/cpuid.c`` (``kvm_set_cpuid``, ``kvm_check_cpuid``, ``kvm_update_cpuid_runtime``,
``kvm_cpuid_check_equal``); the vendor rewriting (PVM's on our hosts) is data in the host profile.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..api import CpuidEntry, find_cpuid
from ..kernel import rulesets as R
from ..kernel.profile import HostArrival, Profile
from ..uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX

X86_CR4_OSXSAVE = 1 << 18
X86_CR4_PKE = 1 << 22
APIC_BASE_ENABLE = 1 << 11
XFEATURE_MASK_XTILE_DATA = 1 << 18  # XFEATURE_MASK_USER_DYNAMIC
# KVM emulates RDPID for a guest wherever the host has RDTSCP (cpuid_func_emulated), so from 6.14 a guest's RDPID
# counts for TSC_AUX on such a host (``MsrRules.cap``).
RDTSCP = (0x80000001, 0, "edx", 27)
RDPID = (7, 0, "ecx", 22)


@dataclass
class RuntimeState:
    """The vCPU state KVM folds into CPUID at run time (kvm_update_cpuid_runtime)."""

    cr4: int = 0
    apic_base: int = 0xFEE00900
    xcr0: int = 1
    xss: int = 0
    hlt_in_guest: bool = False  # KVM_X86_DISABLE_EXITS_HLT when KVM_SET_CPUID2 ran


def _set_bit(value: int, bit: int, on: bool) -> int:
    return value | 1 << bit if on else value & ~(1 << bit)


def xstate_size(supported: Sequence[CpuidEntry], xfeatures: int, compacted: bool) -> int:
    """``xstate_required_size()``: the XSAVE area size for ``xfeatures`` from the host's leaf 0xD sub-leaves."""
    size = 512 + 64
    offset = size
    for i in range(2, 64):
        if not xfeatures >> i & 1:
            continue
        leaf = next((e for e in supported if e.function == 0xD and e.index == i), None)
        if leaf is None:
            continue
        if compacted:
            if leaf.ecx & 2:
                offset = (offset + 63) & ~63
            offset += leaf.eax
            size = offset
        else:
            size = max(size, leaf.ebx + leaf.eax)
    return size


def _first(entries: Sequence[CpuidEntry], function: int, index: int) -> int | None:
    """Position of the entry ``kvm_find_cpuid_entry_index`` would return."""
    for i, e in enumerate(entries):
        if e.function == function and (e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return i
    return None


def runtime_update(entries: list[CpuidEntry], state: RuntimeState, profile: Profile) -> list[CpuidEntry]:
    """Apply ``kvm_update_cpuid_runtime`` to a copy of ``entries``."""
    out = list(entries)
    i = _first(out, 1, 0)
    if i is not None:
        e = out[i]
        out[i] = replace(e, ecx=_set_bit(e.ecx, 27, bool(state.cr4 & X86_CR4_OSXSAVE)),
                         edx=_set_bit(e.edx, 9, bool(state.apic_base & APIC_BASE_ENABLE)))
    i = _first(out, 7, 0)
    if i is not None and profile.cpuid_runtime_ospke:
        out[i] = replace(out[i], ecx=_set_bit(out[i].ecx, 4, bool(state.cr4 & X86_CR4_PKE)))
    i = _first(out, 0x40000001, 0)
    if i is not None and state.hlt_in_guest:  # __kvm_update_cpuid_runtime: no PV_UNHALT (bit 7) with HLT in guest
        out[i] = replace(out[i], eax=out[i].eax & ~(1 << 7))
    i = _first(out, 0xD, 0)
    if i is not None:
        out[i] = replace(out[i], ebx=xstate_size(profile.supported_cpuid, state.xcr0, False))
    i = _first(out, 0xD, 1)
    if i is not None and out[i].eax & 0xA:  # XSAVEC or XSAVES
        out[i] = replace(out[i], ebx=xstate_size(profile.supported_cpuid, state.xcr0 | state.xss, True))
    return out


def without_bits(entries: Sequence[CpuidEntry], bits: Sequence[tuple[int, int, str, int]]) -> list[CpuidEntry]:
    """``entries`` with each (function, index, register, bit) cleared where that leaf is present."""
    out = list(entries)
    for function, index, reg, bit in bits:
        i = _first(out, function, index)
        if i is not None and getattr(out[i], reg) >> bit & 1:
            out[i] = replace(out[i], **{reg: getattr(out[i], reg) & ~(1 << bit)})
    return out


def within_limits(entries: Sequence[CpuidEntry], limits: dict[int, int]) -> list[CpuidEntry]:
    """``entries`` as a kernel with lower leaf limits lists them (``Ruleset.cpuid_limits``): leaf 0's, 0x80000000's and
    7.0's EAX at most the limit, and no basic leaf, extended leaf or sub-leaf of 7 above it."""
    out = []
    for e in entries:
        if e.function < 0x40000000:
            top = limits.get(0)
        elif 0x80000000 <= e.function <= 0x8FFFFFFF:  # not Centaur's 0xC0000000 range, limited on its own
            top = limits.get(0x80000000)
        else:
            top = None
        if top is not None and e.function > top:
            continue
        if e.function == 7 and 7 in limits and e.index > limits[7]:
            continue
        if e.index == 0 and e.function in limits and e.eax > limits[e.function]:
            e = replace(e, eax=limits[e.function])
        out.append(e)
    return out


def xsave_leaves(entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """Leaf 0xD as ``__do_cpuid_func`` builds it from the XCR0 and XSS bits offered (0xD.0 EAX/EDX, 0xD.1 ECX/EDX):
    a sub-leaf for each bit, 0xD.0 EBX and ECX the standard size of that XCR0, 0xD.1 EBX the compacted size of XCR0
    and XSS with XSAVEC or XSAVES (6.12.118 cpuid.c:1095-1119). For a profile whose bits an earlier kernel lacks."""
    leaf0, leaf1 = find_cpuid(entries, 0xD, 0), find_cpuid(entries, 0xD, 1)
    if leaf0 is None:
        return list(entries)
    xcr0 = leaf0.eax | leaf0.edx << 32
    xss = 0 if leaf1 is None else leaf1.ecx | leaf1.edx << 32
    out = []
    for e in entries:
        if e.function == 0xD and e.index >= 2 and not (xcr0 | xss) >> e.index & 1:
            continue
        if e.function == 0xD and e.index == 0:
            e = replace(e, ebx=xstate_size(entries, xcr0, False), ecx=xstate_size(entries, xcr0, False))
        elif e.function == 0xD and e.index == 1:  # XSAVEC, XSAVES: the compacted size, else 0
            e = replace(e, ebx=xstate_size(entries, xcr0 | xss, True) if e.eax & 0b1010 else 0)
        out.append(e)
    return out


def filter_xtile_cfg(entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """``kvm_get_filtered_xcr0`` (55cd57b596e8, 6.4): XTILE_CFG (XCR0 bit 17) is dropped from the supported XCR0 when
    XTILE_DATA (bit 18) is not offered, i.e. the process lacks the guest permission (6.12.118 x86.h:406-424); leaf 0xD
    is then built from that XCR0 (cpuid.c:1092-1119)."""
    out = list(entries)
    i = _first(out, 0xD, 0)
    if i is not None and out[i].eax & (1 << 17) and not out[i].eax & (1 << 18):
        out[i] = replace(out[i], eax=out[i].eax & ~(1 << 17))
        return xsave_leaves(out)  # the filtered XCR0 sizes leaf 0xD and lists its sub-leaves (no 0xD.17)
    return out


def check(entries: Sequence[CpuidEntry], profile: Profile, dynamic_xfeatures: bool = True) -> int:
    """``kvm_check_cpuid``: 0, or the errno KVM_SET_CPUID2 fails with before the first run. ``dynamic_xfeatures``: the
    check of XTILE_DATA against the guest permission, which came with AMX (5.17: 6.1.192 cpuid.c:159-171; 5.10.262
    cpuid.c:73-89 checks the address width alone)."""
    ext = find_cpuid(entries, 0x80000008)
    if ext is not None and (ext.eax >> 8 & 0xFF) not in (0, 48, 57):
        return errno.EINVAL
    xsave = find_cpuid(entries, 0xD, 0)
    if xsave is not None and dynamic_xfeatures:
        xfeatures = (xsave.eax | xsave.edx << 32) & XFEATURE_MASK_XTILE_DATA
        if xfeatures and not profile.guest_xfd_permitted:
            return errno.EPERM
    return 0


def rewrite(entries: Sequence[CpuidEntry], profile: Profile) -> list[CpuidEntry]:
    """What the vendor module stores for ``entries`` (identity on upstream VMX/SVM; PVM rewrites, per the profile)."""
    out = list(entries)
    for rule in profile.cpuid_append:  # all or nothing, as PVM here does (an entry already there ends up twice)
        if rule.entries and _first(out, *rule.trigger) is not None and _first(out, *rule.entries[0].key) is None:
            out.extend(rule.entries)
    # Each rule edits the one entry KVM's own lookup finds (kvm_find_cpuid_entry_index: the first of the function
    # whose index matches or that lacks KVM_CPUID_FLAG_SIGNIFCANT_INDEX), as the live kernel shows: a second copy of a
    # leaf is left as given, and an indexed entry without the flag takes the edits of the other indices after it.
    present = {(r.function, r.index): _first(out, r.function, r.index) for r in profile.cpuid_rewrite}
    for r in profile.cpuid_rewrite:
        i = present[r.function, r.index]
        if i is None or r.requires is not None and _first(out, *r.requires) is None:
            continue
        if r.unless is not None and _first(out, *r.unless) is not None:
            continue
        out[i] = replace(out[i], **{r.register: (getattr(out[i], r.register) & r.keep) | r.force})
    return out


def has_feature(entries: Sequence[CpuidEntry], function: int, index: int, register: str, bit: int) -> bool:
    e = find_cpuid(entries, function, index)
    return bool(e is not None and getattr(e, register) >> bit & 1)


def x86_model(signature: int) -> int:
    family = signature >> 8 & 0xF
    model = signature >> 4 & 0xF
    if family >= 6:
        model += (signature >> 16 & 0xF) << 4
    return model


# The CPUID registers that are feature flags (a bit a guest may use).
FLAG_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"), (0x7, 0): ("ebx", "ecx", "edx"), (0x7, 1): ("eax", "edx"), (0x7, 2): ("edx",),
    (0xD, 0): ("eax", "edx"), (0xD, 1): ("eax", "ecx", "edx"), (0x80000001, 0): ("ecx", "edx"),
    (0x80000008, 0): ("ebx",), (0x80000021, 0): ("eax",),
}


def lost_features(rules: R.Ruleset, history: Sequence[HostArrival], before: Sequence[CpuidEntry],
                  after: Sequence[CpuidEntry], host: Sequence[CpuidEntry] | None = None,
                  in_force: bool = False) -> list[tuple[str, R.Rule | None]]:
    """The KVM_GET_SUPPORTED_CPUID leaves and bits ``before`` offers and ``after`` does not, each with the rule not in
    force under ``rules`` that brings it (``CPUID_LIMITS`` and 0xD's sub-leaves, ``CPUID_ARRIVALS``, a profile's
    ``history``), or None for a feature-flag bit no rule explains: ``("CPUID 0x7.2 (leaf)", rule)``,
    ``("CPUID 0x7.0 edx bit(s) 22, 24", rule)``. With ``host`` (what a host offers under its own kernel) only what
    that host has is put down to a rule; ``in_force``: bits ``after`` gained by a rule in force (leaves get none)."""
    arrivals: dict[tuple[int, int, str, int], R.Rule] = {}
    for r, bits in R.CPUID_ARRIVALS.items():
        arrivals.update({bit: r for bit in bits if (r in rules.rules) == in_force})
    for a in history:
        if a.leaf is not None and (a.rule in rules.rules) == in_force:
            arrivals.update({(*a.leaf, a.register, b): a.rule for b in range(32) if a.mask >> b & 1})

    def has(function: int, index: int, reg: str = "", bit: int = 0) -> bool:
        e = find_cpuid(host, function, index) if host is not None else None
        return host is None or e is not None and (not reg or bool(getattr(e, reg) >> bit & 1))

    out: list[tuple[str, R.Rule | None]] = []
    grouped: dict[tuple[int, int, str, R.Rule | None], list[int]] = {}
    for e in before:
        here = find_cpuid(after, e.function, e.index)
        if here is None:
            rule = rules.leaf_arrival(e.function, e.index) if not in_force else None
            out.append((f"CPUID 0x{e.function:x}.{e.index} (leaf)", rule if has(e.function, e.index) else None))
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            lacking = getattr(e, reg) & ~getattr(here, reg)
            for b in (b for b in range(32) if lacking >> b & 1):
                rule = arrivals.get((e.function, e.index, reg, b))
                rule = rule if has(e.function, e.index, reg, b) else None
                if rule is not None or reg in FLAG_REGISTERS.get((e.function, e.index), ()):
                    grouped.setdefault((e.function, e.index, reg, rule), []).append(b)
    out += [(f"CPUID 0x{f:x}.{i} {reg} bit(s) {', '.join(map(str, bits))}", r) for (f, i, reg, r), bits in grouped.items()]
    return out
