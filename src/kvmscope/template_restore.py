"""A templated VM snapshotted on one host and restored on another, as Firecracker does it.

Firecracker (``src/vmm/src/arch/x86_64/vcpu.rs`` ``save_state``/``restore_state``, ``msr.rs``): a snapshot holds each
vCPU's KVM_GET_CPUID2 and the MSRs it saves, the MSRs of KVM_GET_MSR_INDEX_LIST that ``msr_should_serialize`` lets
through (``SERIALIZABLE_MSR_RANGES``, without MCG_CTL) plus the template's MSRs; a short KVM_GET_MSRS fails the
snapshot. Restore does KVM_SET_CPUID2 with the saved CPUID on a fresh vCPU, then KVM_SET_MSRS of the saved MSRs; a
short count fails the restore. This is where a template's ARCH_CAPABILITIES or PERF_CAPABILITIES, taken on the source
host, meets a destination host that cannot take it. (Firecracker also saves the MSRs that CPUID features imply, MPX,
MTRR and MCE groups; kvmscope does not.)
"""

from __future__ import annotations

from collections.abc import Sequence

from . import uapi
from .api import CpuidEntry, IoExit, System, cpu_vendor_name, find_cpuid
from .errors import KvmError
from .kernel import rulesets as R
from .kernel.profile import HostArrival
from .model.cpuid import FLAG_REGISTERS
from .template import Template
from .template_apply import (
    BOOT_MSRS,
    VOLATILE,
    ApplyReport,
    BitDiff,
    VcpuOutcome,
    configure,
    firecracker_vm,
    msr_where,
    read_each,
    run_once,
    write_each,
)

# SERIALIZABLE_MSR_RANGES (Firecracker src/vmm/src/arch/x86_64/msr.rs) as (first, count); numbers from the kernel's
# arch/x86/include/asm/msr-index.h.
SERIALIZABLE: tuple[tuple[int, int], ...] = (
    (0x0, 2), (0x10, 1), (0x17, 1), (0x1B, 1), (0x2A, 1), (0x2C, 1), (0x34, 1), (0x3A, 2), (0x48, 2), (0x79, 1),
    (0x8B, 1), (0x9E, 1), (0xCD, 2), (0xE2, 1), (0xE7, 2), (0xFE, 1), (0x11E, 1), (0x174, 3), (0x179, 3), (0x198, 1),
    (0x1A0, 1), (0x1A4, 1), (0x1AA, 1), (0x1AD, 2), (0x1D9, 1), (0x1DB, 4), (0x1FC, 1), (0x200, 0x100), (0x3FC, 3),
    (0x400, 0x80), (0x606, 1), (0x60A, 3), (0x610, 2), (0x613, 2), (0x618, 2), (0x61B, 2), (0x648, 5), (0x6E0, 1),
    (0x800, 0x400), (0x4B564D00, 5), (0xC0000080, 5), (0xC0000100, 4), (0x140, 1), (0xC0010015, 1),
    (0x4B564D05, 2),
)
MCG_CTL = 0x17B


def serializable(index: int) -> bool:
    """Firecracker's ``msr_should_serialize``."""
    return index != MCG_CTL and any(first <= index < first + n for first, n in SERIALIZABLE)


def restore(source: System, target: System, template: Template, vcpus: int = 1,
            boot: Sequence[tuple[int, int]] = BOOT_MSRS) -> ApplyReport:
    """Boot a VM with ``template`` on ``source`` (Firecracker's order, each vCPU run once), snapshot it,
    and restore the snapshot on ``target``: report where Firecracker would fail and every saved MSR the target refused
    or changed (template MSRs compared on their fixed bits)."""
    rep = ApplyReport(template.path, target.backend, f"{source.describe()} -> {target.describe()}")
    masks = {m.addr: m.bitmap.mask for m in template.msr_modifiers}
    listed = [i for i in source.get_msr_index_list() if serializable(i)]
    to_save = list(dict.fromkeys([*listed, *masks]))
    saved = []
    with firecracker_vm(source) as vm:  # both VMs as Firecracker makes them: the LAPIC MSRs are judged as it meets them
        booted = ApplyReport(template.path, source.backend, source.describe())
        cpus = configure(source, vm, template, vcpus, boot, False, booted, irqchip=True)
        rep.failures.extend(f"on the source: {f}" for f in booted.failures)
        rep.notes.extend(f"on the source: {n}" for n in booted.notes)
        if len(to_save) >= uapi.MAX_IO_MSRS:  # get_msr_chunks (vstate/vcpu/x86_64.rs): chunks of 256 MSRs
            rep.failures.append(f"snapshot: {template.path}: msr_modifiers: with them a snapshot saves "
                                f"{len(to_save)} MSRs; Firecracker reads them with KVM_GET_MSRS in chunks of "
                                f"{uapi.MAX_IO_MSRS}, and KVM refuses a batch of {uapi.MAX_IO_MSRS} or more with E2BIG "
                                "(MAX_IO_MSRS)")
        rep.source_vcpus = booted.vcpus  # what the template left on the source is what the snapshot carries
        for i, v in enumerate(cpus):
            ran = run_once(vm, v, irqchip=True)
            if not isinstance(ran, IoExit):  # the boot code ends at a port write; anything else is no guest state
                rep.failures.append(f"on the source: vCPU {i}'s first run ended with {ran!r}, not at the boot code's "
                                    "port write: the VM stops there, before any snapshot")
            values = read_each(v, to_save)
            lost = [ix for ix in to_save if ix not in values]
            if lost:
                rep.failures.append(f"snapshot: KVM_GET_MSRS on vCPU {i} refuses {msr_where(lost[0])}"
                                    + (f" and {len(lost) - 1} more" if len(lost) > 1 else ""))
            saved.append((v.get_cpuid(), [(ix, values[ix]) for ix in to_save if ix in values]))
    there, here = (cpu_vendor_name(s.get_supported_cpuid()) for s in (source, target))
    if saved and None in (there, here):
        rep.notes.append("the CPU vendor of the " + " and the ".join(w for w, v in (("source", there), ("target", here))
                                                                     if v is None)
                         + " is not known (no CPUID leaf 0): whether a guest can move between them is not judged")
    elif saved and there != here:
        rep.cannot_move = (f"the source host's CPUs are {there}, the target's {here}: KVM may take the snapshot's CPUID "
                           "and MSRs, but a running guest chose vendor-specific code at boot")
    if saved:
        captured = getattr(target, "captured", None)
        lacking = unbacked(saved[0][0], source.get_supported_cpuid(), target.get_supported_cpuid(),
                           getattr(target, "rules", None), captured.history if captured is not None else ())
        rep.notes.extend(lacking)
        rep.unbacked = len(lacking)
    with firecracker_vm(target) as vm:
        for i, (cpuid, entries) in enumerate(saved):
            v = vm.create_vcpu(i)
            try:
                v.set_cpuid(cpuid)
            except KvmError as e:
                rep.failures.append(f"restore: KVM_SET_CPUID2 on vCPU {i}: {e}")
            written, refused = write_each(v, entries)
            out = VcpuOutcome(i, True, written, len(entries))
            if refused:
                first = next(n for n, (ix, _) in enumerate(entries) if ix in refused)
                rep.failures.append(f"restore: KVM_SET_MSRS on vCPU {i} returned {first} of {len(entries)}: "
                                    f"refused {msr_where(entries[first][0])}")
                out.msrs_written = first
            now = read_each(v, [ix for ix, _ in entries])
            for index, want in entries:
                got = now.get(index)
                if index in refused:
                    out.diffs.append(BitDiff(msr_where(index), "refused", want, got, (1 << 64) - 1, refused[index]))
                elif index in masks and index not in VOLATILE and (got is None or (got ^ want) & masks[index]):
                    out.diffs.append(BitDiff(msr_where(index), "changed" if got is not None else "unreadable", want,
                                             got, masks[index]))
            rep.vcpus.append(out)
    return rep


def _arrival_bits(function: int, index: int, reg: str, host: Sequence[HostArrival]) -> dict[int, list[R.Rule]]:
    """Bit -> the rules that brought it into KVM_GET_SUPPORTED_CPUID: ``CPUID_ARRIVALS``, and the target host's own
    (its profile's ``history``: DS and DTES64 came to Sapphire Rapids with perf's pebs_ept in 6.3)."""
    out: dict[int, list[R.Rule]] = {}
    for r, arrivals in R.CPUID_ARRIVALS.items():
        for f, i, rg, b in arrivals:
            if (f, i, rg) == (function, index, reg):
                out.setdefault(b, []).append(r)
    for a in host:
        if a.leaf == (function, index) and a.register == reg:
            for b in (b for b in range(32) if a.mask >> b & 1):
                out.setdefault(b, []).append(a.rule)
    return out


def unbacked(cpuid: Sequence[CpuidEntry], source: Sequence[CpuidEntry], target: Sequence[CpuidEntry],
             rules: object = None, host: Sequence[HostArrival] = ()) -> list[str]:
    """The snapshot's CPUID feature bits and leaves that the source's KVM_GET_SUPPORTED_CPUID offers and the target's
    does not: KVM_SET_CPUID2 takes them (any list before the run), but the target's KVM may not support what they
    enumerate (an older kernel: CET's and XFD's MSRs). With a model target, the rule that brings each
    (``CPUID_ARRIVALS``, ``CPUID_LIMITS``)."""
    ruleset = rules if isinstance(rules, R.Ruleset) else None
    notes = []
    for e in cpuid:
        there, here = find_cpuid(source, e.function, e.index), find_cpuid(target, e.function, e.index)
        if there is None:
            continue
        where = f"CPUID 0x{e.function:x}.{e.index}"
        if here is None:
            later = ruleset.leaf_arrival(e.function, e.index) if ruleset else None
            notes.append(f"restore: the snapshot has {where}, which the target's KVM_GET_SUPPORTED_CPUID does not list"
                         + (f" ({later.key}, since {later.since})" if later else ""))
            continue
        for reg in FLAG_REGISTERS.get((e.function, e.index), ()):
            lost = getattr(e, reg) & getattr(there, reg) & ~getattr(here, reg)
            arrivals = _arrival_bits(e.function, e.index, reg, host)
            bits = [b for b in range(32) if lost >> b & 1 and not R.ADVERTISED_ONLY.intersection(arrivals.get(b, ()))]
            if not bits:
                continue
            keys = sorted({f"{r.key} (since {r.since})" for b in bits for r in arrivals.get(b, ())
                           if ruleset is not None and r not in ruleset.rules})
            notes.append(f"restore: the snapshot's {where} {reg} sets bit(s) {', '.join(map(str, bits))}, which the "
                         "target's KVM_GET_SUPPORTED_CPUID does not offer (the source's does): KVM_SET_CPUID2 takes "
                         "them, but the target's KVM may not support what they enumerate"
                         + (f" ({'; '.join(keys)})" if keys else ""))
    return notes
