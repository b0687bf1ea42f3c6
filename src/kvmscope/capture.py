"""Capture a host profile from a live system (``kvmscope probe --save FILE``).

Everything the model needs is measured, not assumed: capabilities, feature MSRs, the index list, supported CPUID,
vCPU reset state, how each ordinary MSR answers host writes, and how KVM_SET_CPUID2 rewrites what it is given.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from . import __version__, guest, uapi
from . import msrs as M
from .api import CpuidEntry, System, Vcpu, Vm
from .errors import KvmError
from .kernel import rulesets
from .kernel.profile import REGISTERS, AppendRule, MsrBehaviour, Profile, RewriteRule

CAP_SCAN = range(0, 300)
_ONES = 0xFFFFFFFF
# Inputs KVM refuses outright (kvm_check_cpuid): keep them out of the all-ones probe of these registers.
_ONES_EXCEPT = {(0xD, 0, "eax"): 0xFFFBFFFF, (0x80000008, 0, "eax"): 0xFFFF30FF}


def _segment(seg: uapi.kvm_segment) -> dict[str, int]:
    return {f[0]: getattr(seg, f[0]) for f in seg._fields_ if f[0] != "padding"}


def _sregs_dict(s: uapi.kvm_sregs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        out[name] = _segment(getattr(s, name))
    for name in ("gdt", "idt"):
        out[name] = {"base": getattr(s, name).base, "limit": getattr(s, name).limit}
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        out[name] = getattr(s, name)
    return out


def _fresh(system: System, cpuid: Sequence[CpuidEntry] | None = None, memory: bool = True) -> tuple[Vm, Vcpu]:
    vm = system.create_vm()
    if memory:
        guest.ensure_memory(vm)
    vcpu = vm.create_vcpu(0)
    if cpuid is not None:
        vcpu.set_cpuid(cpuid)
    return vm, vcpu


def cr4_accepted(system: System, cpuid: Sequence[CpuidEntry]) -> int:
    """The CR4 bits KVM_SET_SREGS takes, each set alone over a fresh vCPU's CR4, on a vCPU given ``cpuid``."""
    vm, vcpu = _fresh(system, cpuid, memory=False)
    with vm:
        base = vcpu.get_sregs()
        accepted = 0
        for bit in range(64):
            sregs = uapi.kvm_sregs.from_buffer_copy(base)
            sregs.cr4 |= 1 << bit
            try:
                vcpu.set_sregs(sregs)
            except KvmError:
                continue  # refused before anything changed
            if vcpu.get_sregs().cr4 == sregs.cr4:  # not dropped in silence (VMX before 5.10.137: cr4_vendor_hook)
                accepted |= 1 << bit
            vcpu.set_sregs(base)
    return accepted


def classify_msr(system: System, index: int, cpuid: Sequence[CpuidEntry] | None) -> MsrBehaviour:
    """Write a set of test values to ``index`` on fresh vCPUs and name the pattern."""
    vm, vcpu = _fresh(system, cpuid)
    with vm:
        default = vcpu.try_read_msr(index)
        again = vcpu.try_read_msr(index)
    readable = default is not None
    base = default or 0
    if readable and again != default:
        return MsrBehaviour("volatile", 0, True)
    values = [0, base, base ^ 1, M.U64_MAX, 0x5555555555555555, 0x00007FFFDEADB000]
    results: list[tuple[int, bool, int | None]] = []
    for v in values:
        vm, vcpu = _fresh(system, cpuid)
        with vm:
            ok = vcpu.set_msrs([(index, v)]) == 1
            results.append((v, ok, vcpu.try_read_msr(index)))
    if all(ok for _, ok, _ in results):
        if all(rb == v for v, _, rb in results):
            return MsrBehaviour("store", base, readable)
        if all(rb == base for _, _, rb in results):
            return MsrBehaviour("drop", base, readable)
    if not any(ok for _, ok, _ in results):
        return MsrBehaviour("refuse", base, readable)
    if all(ok == (v == 0) for v, ok, _ in results) and all(rb in (0, None) for v, ok, rb in results if ok):
        return MsrBehaviour("zero_only", base, readable)
    return MsrBehaviour("other", base, readable)


def _set_get(system: System, entries: Sequence[CpuidEntry]) -> list[CpuidEntry] | None:
    vm, vcpu = _fresh(system, memory=False)
    with vm:
        try:
            vcpu.set_cpuid(entries)
        except KvmError:
            return None
        return vcpu.get_cpuid()


def _masks(
    system: System, context: Callable[[CpuidEntry], list[CpuidEntry]], entry: CpuidEntry, position: Callable[
        [list[CpuidEntry]], CpuidEntry | None]
) -> dict[str, tuple[int, int]]:
    """Per register of ``entry``: (keep, force) such that stored = (given & keep) | force, found with 0 and all-ones."""
    out: dict[str, tuple[int, int]] = {}
    for reg in REGISTERS:
        ones = _ONES_EXCEPT.get((entry.function, entry.index, reg), _ONES)
        got0 = _set_get(system, context(replace(entry, **{reg: 0})))
        got1 = _set_get(system, context(replace(entry, **{reg: ones})))
        e0 = position(got0) if got0 else None
        e1 = position(got1) if got1 else None
        if e0 is None or e1 is None:
            continue
        force = getattr(e0, reg)
        keep = (getattr(e1, reg) & ~force & ones) | (~ones & _ONES)
        if (keep, force) != (_ONES, 0):
            out[reg] = (keep, force)
    return out


def _appended_raw(system: System, trigger: CpuidEntry, extra: list[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    """What KVM_SET_CPUID2 appends for ``trigger``, before its rewrite: given the trigger and a copy of every appended
    leaf but the first (whose absence makes the append), the appended copies that follow a given one are not the
    entries the rewrite finds (``kvm_find_cpuid_entry_index``: the first), so they keep the values appended. The
    first appended leaf is always the one found, so its rewritten value is the one that counts."""
    got = _set_get(system, [trigger, *extra[1:]]) or []
    if len(got) != 2 * len(extra) or [x.key for x in got[len(extra):]] != [x.key for x in extra]:
        return {}  # not appended as a block after what was given: nothing to learn
    return {x.key: x for x in got[len(extra) + 1:]}


def capture_cpuid_rules(system: System, supported: list[CpuidEntry]) -> tuple[list[RewriteRule], list[AppendRule]]:
    """Derive how KVM_SET_CPUID2 rewrites its input, from experiments on fresh vCPUs."""
    rules: list[RewriteRule] = []
    appends: list[AppendRule] = []
    by_key = {e.key: e for e in supported}
    full = _set_get(system, supported) or []
    # Leaves whose presence adds others.
    for e in supported:
        alone = _set_get(system, [e]) or []
        extra = [x for x in alone if x.key != e.key]
        if extra:
            raw = _appended_raw(system, e, extra)
            appends.append(AppendRule(e.key, tuple(raw.get(x.key) or by_key.get(x.key, x) for x in extra)))
    for i, e in enumerate(supported):
        alone_got = _set_get(system, [e]) or []
        requires: tuple[int, int] | None = None
        if alone_got[:1] != full[i:i + 1]:
            # Stored differently alone than among the others: find the leaf that must be in the final list.
            outputs = []
            for other in supported:
                if other.key == e.key:
                    continue
                got = _set_get(system, [e, other]) or []
                if got[:1] == full[i:i + 1]:
                    outputs.append({x.key for x in got} - {e.key})
            if outputs:
                common = set.intersection(*outputs)
                requires = sorted(common)[0] if common else None
        def among_others(x: CpuidEntry, i: int = i) -> list[CpuidEntry]:
            return [*supported[:i], x, *supported[i + 1:]]

        def at_position(got: list[CpuidEntry], i: int = i) -> CpuidEntry | None:
            return got[i] if len(got) > i else None

        in_full = _masks(system, among_others, e, at_position)
        for reg, (keep, force) in in_full.items():
            rules.append(RewriteRule(e.function, e.index, reg, keep, force, requires=requires))
        if requires is not None:
            alone_masks = _masks(system, lambda x: [x], e, lambda got: got[0] if got else None)
            for reg, (keep, force) in alone_masks.items():
                rules.append(RewriteRule(e.function, e.index, reg, keep, force, unless=requires))
    return rules, appends


KVM_PV_RANGE = range(0x4B564D00, 0x4B564E00)  # KVM's own MSRs ("KVM" in ASCII); a vendor module may add its own there


def _unlisted(system: System) -> list[int]:
    """MSRs of KVM's range that a vCPU answers although no list names them: PVM adds four of its own (0x4B564D10-13:
    a per-vCPU control and three constants, its signature 0x4D5650 among them)."""
    params = system.host_info().get("module_parameters")
    if isinstance(params, dict) and str(params.get("kvm.ignore_msrs", "N")) in ("Y", "1"):
        return []  # every unknown MSR reads 0 then: nothing to tell them apart
    vm, vcpu = _fresh(system)
    with vm:
        return [i for i in KVM_PV_RANGE if vcpu.try_read_msr(i) is not None]


_SWEEP = (0, 1, M.U64_MAX, 0x5555555555555555, 0x00007FFFDEADB000)  # after the MSR's own value and its low bit flipped


def _sweep(system: System, indices: Sequence[int], cpuid: Sequence[CpuidEntry] | None) -> dict[int, list[object]]:
    """Per MSR, on one vCPU given ``cpuid`` (None: no KVM_SET_CPUID2): its read, then each write of :data:`_SWEEP`
    (and of its own value with the low bit flipped, then its own value) with what reads back. The same sequence on
    two systems says whether they answer alike; the model and the kernel must, whatever the order does to the
    state."""
    vm, vcpu = _fresh(system, cpuid)
    out: dict[int, list[object]] = {}
    with vm:
        for index in indices:
            first = vcpu.try_read_msr(index)
            trace: list[object] = [first]
            for v in (*_SWEEP, (first or 0) ^ 1, first or 0):
                trace += [vcpu.set_msrs([(index, v)]), vcpu.try_read_msr(index)]
            out[index] = trace
    return out


def vendor_msrs(live: System, profile: Profile) -> dict[int, MsrBehaviour]:
    """The MSRs the live vendor module answers otherwise than upstream KVM's rules do (the model of ``profile`` without
    any ``vendor_msrs``): each with the behaviour to follow instead. A shipped profile of the same vendor module gives
    the entry where it makes the model answer as the kernel does (its evidence is richer: a guest-side test, a kind a
    sweep cannot tell); else the behaviour measured here. MSRs whose reads change by themselves (the TSC) are left to
    the model."""
    from .kernel.profile import load, shipped
    from .model import open_model

    known = {}
    for name in shipped():
        other = load(name)
        if other.vendor == profile.vendor:
            known.update(other.vendor_msrs)
    with open_model(profile=profile) as model:
        vcpu = model.create_vm().create_vcpu(0)
        ruled = vcpu.msr_rules.ruled_msrs()
    candidates = sorted(i for i in set(ruled) | set(profile.msr_behaviour) | set(known)
                        if not M.is_feature_msr(i) and not M.VMX_FIRST <= i <= M.VMX_LAST)
    cpuid = profile.supported_cpuid
    ours = _sweep(live, candidates, cpuid)
    with open_model(profile=profile) as model:
        differ = [i for i, t in _sweep(model, candidates, cpuid).items() if t != ours[i]]
    found: dict[int, MsrBehaviour] = {}
    for index in differ:
        measured = classify_msr(live, index, cpuid)
        if measured.kind == "volatile":
            continue
        # The kernel's answers to this MSR alone, on fresh vCPUs with and without CPUID: an entry is taken only if the
        # model then gives the same (a kind alone, "other" above all, says too little), else none is, and the
        # difference stays for the conformance tests to show.
        alone = [(c, _sweep(live, [index], c)[index]) for c in (cpuid, None)]
        measured = replace(measured, evidence=(
            f"kvmscope {__version__} probe --save, {datetime.date.today().isoformat()}: host writes and reads of this "
            "MSR differ from upstream KVM's rule for it"))
        with open_model(profile=replace(profile, vendor_msrs=dict(found))) as model:
            if all(_sweep(model, [index], c)[index] == t for c, t in alone):
                continue  # alike on fresh vCPUs: what differed came of the sweep's history, no entry explains it
        for entry in (known.get(index), measured):
            if entry is None:
                continue
            with open_model(profile=replace(profile, vendor_msrs={**found, index: entry})) as model:
                if all(_sweep(model, [index], c)[index] == t for c, t in alone):
                    found[index] = entry
                    break
    return found


def capture(system: System, name: str | None = None, description: str = "", cpuid_rules: bool = True) -> Profile:
    """Measure ``system`` (the live kernel) and return its host profile."""
    info = system.host_info()
    release = str(info.get("kernel_release"))
    vendor = str(info.get("vendor") or "pvm")
    caps = {c: v for c in CAP_SCAN if (v := system.check_extension(c))}
    with system.create_vm() as vm:
        vm_caps = {c: v for c in CAP_SCAN if (v := vm.check_extension(c)) != caps.get(c, 0)}
    features = system.read_feature_msrs()
    index_list = system.get_msr_index_list()
    supported = system.get_supported_cpuid()
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
        reset_regs = {n: getattr(regs, n) for n, _ in regs._fields_ if getattr(regs, n)}
        sregs = _sregs_dict(vcpu.get_sregs())
        ucode = vcpu.try_read_msr(M.MSR_IA32_UCODE_REV)
        try:
            vcpu.run()
            no_mem_errno = None
        except KvmError as e:
            no_mem_errno = e.errno
    cr4 = cr4_accepted(system, supported)
    known = set(index_list) | {m.index for m in M.catalogue()}
    unlisted = set(_unlisted(system)) - known
    behaviour: dict[int, MsrBehaviour] = {}
    for index in sorted(known | unlisted):
        if M.is_feature_msr(index):
            continue
        with_cpuid = classify_msr(system, index, supported)
        without = classify_msr(system, index, None)
        if with_cpuid.kind == "refuse" and not with_cpuid.readable and index not in index_list:
            continue  # unknown to this KVM: the model's default
        found = with_cpuid if with_cpuid == without else replace(with_cpuid, kind="other")
        if index in unlisted and found.kind == "other":
            continue  # no VMM knows it (PVM's 0x4B564D10): the model answers it as unknown rather than store it
        behaviour[index] = found
    rules, appends = capture_cpuid_rules(system, supported) if cpuid_rules else ([], [])
    params = info.get("module_parameters")
    module_parameters = {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else {}
    ruleset = rulesets.resolve(release).version
    profile = Profile(
        name=name or f"{vendor}-{release}",
        description=description or f"captured from a live {vendor} host running Linux {release}",
        vendor=vendor,
        kernel_release=release,
        ruleset=ruleset,
        feature_msrs=features,
        msr_index_list=index_list,
        supported_cpuid=supported,
        capabilities=caps,
        vm_capabilities=vm_caps,
        module_parameters=module_parameters,
        source={
            "kind": "captured",
            "by": f"kvmscope {__version__} probe --save",
            "date": datetime.date.today().isoformat(),
        },
        api_version=system.api_version(),
        vcpu_mmap_size=system.vcpu_mmap_size(),
        ucode_rev_reset=ucode,
        ignore_msrs=module_parameters.get("kvm.ignore_msrs", "N") in ("Y", "1"),
        msr_behaviour=behaviour,
        cpuid_rewrite=rules,
        cpuid_append=appends,
        reset_regs=reset_regs,
        reset_sregs={k: v for k, v in sregs.items()},
        run_without_memory_errno=no_mem_errno,
        cr4_accepted=cr4,
    )
    return replace(profile, vendor_msrs=vendor_msrs(system, profile))
