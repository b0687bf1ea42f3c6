"""A CPU template applied the way Firecracker applies it, on either backend, and checked bit by bit.

Firecracker's order on x86_64 (``src/vmm/src/arch/x86_64/mod.rs`` ``configure_system_for_boot``, and
``src/vmm/src/cpu_config/x86_64/mod.rs``): the template's KVM capabilities are checked before any vCPU exists; the
CPUID modifiers are applied to KVM_GET_SUPPORTED_CPUID (a modifier of a leaf not in that list is an error, and a
modifier's ``flags`` replace the entry's); KVM_SET_CPUID2 on every vCPU; the template's MSRs are read from vCPU 0 (one
that cannot be read is an error); the MSR modifiers are applied to those values; the boot MSRs
(``create_boot_msr_entries``) are added, replacing a template value of the same index; all of them go in one
KVM_SET_MSRS per vCPU, and a short count is an error. Firecracker also normalises CPUID (topology, cache, APIC ids)
between the template and KVM_SET_CPUID2; kvmscope does not, so those leaves are judged as the template left them.

Where Firecracker stops at the first error, kvmscope records it as the point Firecracker would fail and carries on, so
that one run shows everything the kernel refused or silently changed (read back after the writes).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from . import guest, uapi
from . import msrs as M
from .api import CpuidEntry, Exit, MsrBatch, System, Vcpu, Vm, find_cpuid
from .errors import KvmError
from .template import PER_CPU_BITS, U32_MAX, Bitmap, CpuidModifier, LeafModifier, MsrModifier, Template

K = TypeVar("K", bound=Hashable)

# create_boot_msr_entries() (Firecracker src/vmm/src/arch/x86_64/msr.rs), in its order.
BOOT_MSRS: tuple[tuple[int, int], ...] = (
    (0x174, 0), (0x175, 0), (0x176, 0),  # SYSENTER_CS, ESP, EIP
    (0xC0000081, 0), (0xC0000083, 0), (0xC0000102, 0), (0xC0000084, 0), (0xC0000082, 0),  # STAR CSTAR KGS FMASK LSTAR
    (0x10, 0),  # IA32_TSC
    (0x1A0, 1),  # IA32_MISC_ENABLE: FAST_STRING
    (0x2FF, (1 << 11) | 6),  # MTRRdefType: MTRRs enabled, default write-back
)
VOLATILE = {0x10}  # the TSC runs on: reading it back says nothing about the write
# The capabilities Firecracker checks before it makes a VM (``Kvm::DEFAULT_CAPABILITIES``, src/vmm/src/arch/x86_64/
# kvm.rs); a template's kvm_capabilities add to them ("N") or remove from them ("!N").
FIRECRACKER_CAPABILITIES = (uapi.KVM_CAP_IRQCHIP, uapi.KVM_CAP_IOEVENTFD, uapi.KVM_CAP_IRQFD, uapi.KVM_CAP_USER_MEMORY,
                            uapi.KVM_CAP_SET_TSS_ADDR, uapi.KVM_CAP_PIT2, uapi.KVM_CAP_PIT_STATE2,
                            uapi.KVM_CAP_ADJUST_CLOCK, uapi.KVM_CAP_DEBUGREGS, uapi.KVM_CAP_MP_STATE,
                            uapi.KVM_CAP_VCPU_EVENTS, uapi.KVM_CAP_XCRS, uapi.KVM_CAP_XSAVE, uapi.KVM_CAP_EXT_CPUID)
MSR_BATCH = uapi.MAX_IO_MSRS - 1  # the most entries KVM_GET/SET_MSRS takes in one call (x86.c msr_io: E2BIG from 256)


@dataclass
class BitDiff:
    """Where a register or MSR does not hold what the template (or Firecracker's boot value) fixed."""

    where: str
    kind: str  # refused (KVM_SET_MSRS stopped at it) | changed (accepted, read back different) | unreadable
    # | overridden (a later modifier of the same MSR or register fixes these bits otherwise) | missing (verify: the
    # state has no such leaf or MSR)
    # wanted: the whole value the template leaves (its fixed bits over the register's other bits); mask: its fixed bits
    wanted: int
    got: int | None
    mask: int
    rule: str = ""  # the kernel rule behind a refusal, where the backend knows it (the model does)

    @property
    def bits(self) -> list[int]:
        if self.got is None:
            return []
        return [b for b in range(64) if ((self.wanted ^ self.got) & self.mask) >> b & 1]

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "kind": self.kind, "wanted": f"0x{self.wanted:x}",
                "got": None if self.got is None else f"0x{self.got:x}", "mask": f"0x{self.mask:x}", "bits": self.bits,
                "rule": self.rule or None}


@dataclass
class VcpuOutcome:
    vcpu: int
    cpuid_set: bool
    msrs_written: int
    msrs_total: int
    diffs: list[BitDiff] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"vcpu": self.vcpu, "cpuid_set": self.cpuid_set, "msrs_written": self.msrs_written,
                "msrs_total": self.msrs_total, "diffs": [d.to_json() for d in self.diffs]}


@dataclass
class ApplyReport:
    """What applying a template did: where Firecracker would stop (``failures``, first one first) and, per vCPU, every
    bit refused or changed."""

    template: str
    backend: str
    description: str
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vcpus: list[VcpuOutcome] = field(default_factory=list)
    # a restore: the vCPUs booted on the source, whose template bits the snapshot carries (None for an apply)
    source_vcpus: list[VcpuOutcome] | None = None
    cannot_move: str = ""  # a restore: why a running guest cannot make the move, whatever KVM takes (CPU vendors)
    unbacked: int = 0  # a restore: CPUID registers or leaves of the snapshot the target's KVM does not offer (notes)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.cannot_move and not any(
            v.diffs for v in [*self.vcpus, *(self.source_vcpus or ())])

    def summary(self) -> str:
        """One line: what Firecracker would do, and which bits were refused or changed (each counted once, however
        many vCPUs it failed on)."""
        held = [(v.vcpu, d) for v in self.vcpus for d in v.diffs if d.kind != "overridden"]
        bits = {(d.where, b) for _, d in held for b in d.bits}
        whole = {d.where for _, d in held if not d.bits}  # refused or unreadable, no fixed bit differing
        lost = {(d.where, b) for v in self.vcpus for d in v.diffs if d.kind == "overridden" for b in d.bits}
        if self.ok:
            return "taken: every fixed bit holds on every vCPU" + (
                f", but the snapshot enumerates CPUID features in {self.unbacked} register(s) or leaves that the "
                "target's KVM does not offer (notes): the guest may use what the target cannot support"
                if self.unbacked else "")
        done = "Firecracker would boot" if self.source_vcpus is None else "Firecracker would restore"
        head = f"Firecracker would fail: {self.failures[0]}" if self.failures else done
        if self.cannot_move:
            head = f"the guest cannot move: {self.cannot_move}; {head}"
        on_source = {(d.where, d.kind) for v in self.source_vcpus or () for d in v.diffs}
        if on_source:
            head += f"; on the source {len(on_source)} register(s) or MSR(s) did not hold the template"
        vcpus = len({n for n, _ in held})
        if bits:
            head += f"; {len(bits)} bit(s) refused or changed" + (f" (on {vcpus} vCPUs)" if vcpus > 1 else "")
        if whole:
            head += f"; {len(whole)} register(s) or MSR(s) refused or unreadable, with no value read to compare bits"
        return (f"{head}; {len(lost)} bit(s) fixed by one modifier and overridden (by a later one or a boot MSR)"
                if lost else head)

    def to_json(self) -> dict[str, Any]:
        doc = {"template": self.template, "backend": self.backend, "description": self.description, "ok": self.ok,
               "summary": self.summary(), "failures": self.failures, "notes": self.notes,
               "vcpus": [v.to_json() for v in self.vcpus]}
        if self.source_vcpus is not None:
            doc["source_vcpus"] = [v.to_json() for v in self.source_vcpus]
            doc["cannot_move"] = self.cannot_move or None
            doc["unbacked"] = self.unbacked
        return doc


def msr_where(index: int) -> str:
    return f"{M.name_of(index)} (0x{index:x})"


def cpuid_where(leaf: int, subleaf: int, register: str) -> str:
    return f"CPUID 0x{leaf:x}.{subleaf} {register}"


def apply_cpuid(supported: Sequence[CpuidEntry], template: Template) -> tuple[list[CpuidEntry], list[str]]:
    """The CPUID list the template makes of ``supported``, and the modifiers Firecracker would refuse (leaf missing)."""
    entries = list(supported)
    missing = []
    for mod in template.cpuid_modifiers:
        pos = next((i for i, e in enumerate(entries) if e.key == mod.key), None)
        if pos is None:
            missing.append(f"the template changes CPUID leaf 0x{mod.leaf:x} subleaf 0x{mod.subleaf:x}, "
                           "which KVM_GET_SUPPORTED_CPUID does not list")
            continue
        e = replace(entries[pos], flags=mod.flags)
        for r in mod.modifiers:
            e = replace(e, **{r.register: r.bitmap.apply(getattr(e, r.register))})
        entries[pos] = e
    return entries, missing


def flagless(supported: Sequence[CpuidEntry], template: Template) -> list[str]:
    """Notes for modifiers of an indexed leaf whose ``flags`` lack KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Firecracker copies
    the template's flags into the entry, and KVM's lookup (``kvm_find_cpuid_entry_index``: the first entry of the leaf
    whose subleaf matches or that lacks the flag) can then take it for the subleaves after it in the list."""
    indexed = {e.function for e in supported if e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
    listed = {e.key for e in supported}  # a subleaf KVM does not list is a failure already
    return [f"cpuid_modifiers[{i}]: leaf 0x{m.leaf:x} has subleaves (KVM marks it KVM_CPUID_FLAG_SIGNIFCANT_INDEX), "
            f"but the template gives flags {m.flags}: KVM's lookup can take this entry for the subleaves of "
            f"0x{m.leaf:x} after it"
            for i, m in enumerate(template.cpuid_modifiers)
            if m.leaf in indexed and m.key in listed and not m.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX]


def apply_msrs(read: dict[int, int], template: Template) -> tuple[dict[int, int], dict[int, int]]:
    """The template's MSR values from the values read on vCPU 0: (index -> value to write, index -> fixed-bit mask)."""
    values: dict[int, int] = {}
    masks: dict[int, int] = {}
    for m in template.msr_modifiers:
        if m.addr not in read:
            continue
        values[m.addr] = m.bitmap.apply(values.get(m.addr, read[m.addr]))
        masks[m.addr] = masks.get(m.addr, 0) | m.bitmap.mask
    return values, masks


def read_each(vcpu: Vcpu, indices: Sequence[int]) -> dict[int, int]:
    """KVM_GET_MSRS of ``indices`` in batches of at most :data:`MSR_BATCH` (KVM refuses a bigger one whole), each
    carried on one by one past a refusal: index -> value for those read."""
    out: dict[int, int] = {}
    rest = list(indices)
    while rest:
        batch = MsrBatch(rest[:MSR_BATCH])
        n = vcpu.get_msrs(batch)
        out.update((i, v) for k, (i, v) in enumerate(batch) if k < n)
        rest = rest[n + 1 if n < batch.nmsrs else n :]
    return out


def write_each(vcpu: Vcpu, entries: list[tuple[int, int]]) -> tuple[int, dict[int, str]]:
    """KVM_SET_MSRS of ``entries`` (Firecracker's one call; in batches of at most :data:`MSR_BATCH` where that would
    be too big for KVM, see :func:`write_limit`), then the rest past each refusal (kvmscope's, to find them all): the
    first call's count and the refused indices with the rule behind each (where the backend knows it)."""
    first = -1
    refused: dict[int, str] = {}
    rest = entries
    while rest:
        batch = rest[:MSR_BATCH]
        n = vcpu.set_msrs(MsrBatch(batch))
        if first < 0:
            first = n
        if n == len(batch):
            rest = rest[n:]
            continue
        rule = vcpu.refusal_rule(rest[n][0])
        refused[rest[n][0]] = rule.cite() if rule is not None else ""
        rest = rest[n + 1 :]
    return max(first, 0), refused


def _field(template: Template) -> str:
    return f"{template.path}: msr_modifiers"


def read_limit(template: Template) -> str | None:
    """Where Firecracker's read of the template's MSRs is too big for KVM (x86.c ``msr_io``: MAX_IO_MSRS, a batch of
    256 or more gets E2BIG). Firecracker reads them from vCPU 0 with one index per modifier, in chunks of
    KVM_MAX_MSR_ENTRIES (256, kvm-bindings; ``get_msr_chunks`` in ``src/vmm/src/vstate/vcpu/x86_64.rs``): 256
    modifiers or more make a first chunk of 256, which KVM refuses whole."""
    n = len(template.msr_modifiers)
    if n < uapi.MAX_IO_MSRS:
        return None
    return (f"{_field(template)}: {n} modifiers: Firecracker reads them from vCPU 0 with KVM_GET_MSRS in chunks of "
            f"{uapi.MAX_IO_MSRS}, and KVM refuses a batch of {uapi.MAX_IO_MSRS} or more with E2BIG (MAX_IO_MSRS): "
            f"at most {MSR_BATCH} modifiers work")


def write_limit(template: Template, entries: int, where: str = "") -> str | None:
    """Where Firecracker's KVM_SET_MSRS is too big for KVM: it writes the template's MSRs and the boot MSRs in one
    call (``set_msrs`` in ``src/vmm/src/arch/x86_64/msr.rs``, no chunks), so ``entries`` of 256 or more fail (E2BIG;
    more than 256 do not even fit kvm-bindings' ``Msrs``)."""
    if entries < uapi.MAX_IO_MSRS:
        return None
    return (f"{_field(template)}: {entries} MSRs with the boot MSRs: Firecracker writes them{where} in one "
            f"KVM_SET_MSRS, and KVM refuses a batch of {uapi.MAX_IO_MSRS} or more with E2BIG (MAX_IO_MSRS)")


def _cpuid_diffs(entries: Sequence[CpuidEntry], mods: Sequence[LeafModifier], wanted: Sequence[CpuidEntry]
                 ) -> list[BitDiff]:
    """Template-fixed CPUID bits that KVM does not hold (read back with KVM_GET_CPUID2), and the fixed bits of every
    register modifier that a later one of the same register fixes otherwise (see :func:`overridden`)."""
    diffs = []
    for i, mod in enumerate(mods):
        want = next((e for e in wanted if e.key == mod.key), None)
        if want is None:
            continue
        got = find_cpuid(entries, mod.leaf, mod.subleaf)
        for j, r in enumerate(mod.modifiers):
            g = None if got is None else getattr(got, r.register)
            w = getattr(want, r.register)
            where = cpuid_where(mod.leaf, mod.subleaf, r.register)
            if g is None or (g ^ w) & r.bitmap.mask:
                diffs.append(BitDiff(where, "changed", w, g, r.bitmap.mask))
            if (r.bitmap.value ^ w) & r.bitmap.mask and g is not None:
                diffs.append(replace(_mismatch(where, r.bitmap, g), where=f"{where} (cpuid_modifiers[{i}].modifiers[{j}])",
                                     kind="overridden"))
    return diffs


def overridden(template: Template, values: dict[int, int]) -> list[tuple[int, MsrModifier]]:
    """MSR modifiers (with their position) whose fixed bits a later modifier of the same MSR fixes otherwise.

    Firecracker accepts several modifiers of one MSR, CPUID leaf or register (its template is a list, and
    ``CpuConfiguration::apply_template`` applies each in turn), so the last one's fixed bits win; an earlier one's that
    differ cannot hold, whatever the kernel does. ``values``: the MSR values the template makes."""
    return [(k, m) for k, m in enumerate(template.msr_modifiers)
            if m.addr in values and (m.bitmap.value ^ values[m.addr]) & m.bitmap.mask]


def firecracker_vm(system: System) -> Vm:
    """A VM as Firecracker's ``setup_irqchip`` makes it (src/vmm/src/arch/x86_64/vm.rs): an in-kernel irqchip before the
    vCPUs, so they have a local APIC (x2APIC, TSC_DEADLINE and KVM_ASYNC_PF_INT need one), and its PIT."""
    vm = system.create_vm()
    vm.create_irqchip()
    vm.create_pit2(uapi.KVM_PIT_SPEAKER_DUMMY)  # no MSR depends on it
    return vm


def run_once(vm: Vm, vcpu: Vcpu, irqchip: bool) -> Exit:
    """Run ``vcpu`` once in real mode. With an in-kernel irqchip an AP waits for INIT/SIPI (made runnable here, as
    after a SIPI) and a HLT blocks in KVM_RUN, so the run ends at a port write."""
    if irqchip:
        vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
    guest.load_real_mode(vm, vcpu, guest.OUT_THEN_HLT if irqchip else guest.HLT)
    return vcpu.run()


def _cap_name(number: int) -> str:
    return f"KVM capability {number}" + (f" ({uapi.CAPABILITY_NAMES[number]})" if number in uapi.CAPABILITY_NAMES
                                         else "")


def apply(system: System, template: Template, vcpus: int = 1, boot: Sequence[tuple[int, int]] = BOOT_MSRS,
          after_run: bool = False) -> ApplyReport:
    """Apply ``template`` to a new VM of ``system`` with ``vcpus`` vCPUs in Firecracker's order, with Firecracker's
    ``boot`` MSRs in the same KVM_SET_MSRS (``()`` judges the template alone); report everything. ``after_run`` runs
    every vCPU once (to a port write: the VM has an irqchip) before the MSRs are read and written: a VMM that applies
    (or re-applies) a template to vCPUs that have already run, which kernels that freeze the vCPU model after the
    first run refuse."""
    rep = ApplyReport(template.path, system.backend, system.describe())
    with firecracker_vm(system) as vm:
        configure(system, vm, template, vcpus, boot, after_run, rep, irqchip=True)
    return rep


def configure(system: System, vm: Vm, template: Template, vcpus: int, boot: Sequence[tuple[int, int]],
              after_run: bool, rep: ApplyReport, irqchip: bool = False) -> list[Vcpu]:
    """The work of :func:`apply` on ``vm``: create and configure its vCPUs, recording everything in ``rep``.
    ``irqchip``: ``vm`` has an in-kernel irqchip, so a run ends at a port write (a HLT would block in KVM_RUN)."""
    required = dict.fromkeys(FIRECRACKER_CAPABILITIES)
    for cap in template.kvm_capabilities:  # in order, as Firecracker combines them
        if cap.removed:
            rep.notes.append(f"{_cap_name(cap.number)} is removed from Firecracker's checks" if cap.number in required
                             else f"{_cap_name(cap.number)}: removed, but Firecracker's checks do not have it")
            required.pop(cap.number, None)
        else:
            required[cap.number] = None
    rules = getattr(system, "rules", None)
    for number in required:
        if not system.check_extension(number):
            later = rules.cap_arrival(number) if rules is not None else None
            rep.failures.append(f"{_cap_name(number)} is not supported" + (
                f" (this kernel's KVM does not report it yet: {later.key}, {later.cite()})" if later else ""))
    supported = system.get_supported_cpuid()
    cpuid, missing = apply_cpuid(supported, template)
    rep.failures.extend(missing)
    rep.notes.extend(flagless(supported, template))
    cpus = [vm.create_vcpu(i) for i in range(vcpus)]
    set_ok = []
    for i, v in enumerate(cpus):
        try:
            v.set_cpuid(cpuid)
            set_ok.append(True)
        except KvmError as e:
            rep.failures.append(f"KVM_SET_CPUID2 on vCPU {i}: {e}")
            set_ok.append(False)
    if after_run:
        for i, v in enumerate(cpus):
            rep.notes.append(f"vCPU {i} ran before the MSRs were written: {run_once(vm, v, irqchip).name}")
    addrs = list(dict.fromkeys(m.addr for m in template.msr_modifiers))
    too_many = read_limit(template)
    if too_many:
        rep.failures.append(too_many)
    read = read_each(cpus[0], addrs)
    for a in addrs:
        if a not in read:
            rep.failures.append(f"the template changes {msr_where(a)}, which KVM_GET_MSRS on vCPU 0 refuses")
    values, masks = apply_msrs(read, template)
    entries = dict(values)
    for index, value in boot:
        if index in masks:
            if (value ^ values[index]) & masks[index]:  # else the template fixes what Firecracker writes anyway
                rep.notes.append(f"{msr_where(index)} is a boot MSR: Firecracker writes 0x{value:x} over the "
                                 "template's value (the fixed bits it contradicts are OVERRIDDEN)")
            masks[index] = (1 << 64) - 1
        entries[index] = value
    too_many = write_limit(template, len(entries), " on each vCPU")
    if too_many:
        rep.failures.append(too_many)
    # Firecracker inserts its boot MSRs over the template's values (KvmVcpu::configure: msrs.extend(boot entries)), so
    # a fixed bit that a boot value contradicts cannot hold either, as one a later modifier fixes otherwise.
    lost = overridden(template, {a: entries[a] for a in values})
    for i, v in enumerate(cpus):
        rep.vcpus.append(_configure(v, i, set_ok[i], list(entries.items()), masks, cpuid, template, rep, lost))
    return cpus


def _configure(vcpu: Vcpu, i: int, cpuid_set: bool, entries: list[tuple[int, int]], masks: dict[int, int],
               cpuid: Sequence[CpuidEntry], template: Template, rep: ApplyReport,
               lost: Sequence[tuple[int, MsrModifier]] = ()) -> VcpuOutcome:
    """KVM_SET_MSRS on one vCPU, then read everything back and compare (``lost``: modifiers a later one overrides)."""
    written, refused = write_each(vcpu, entries)
    if len(entries) >= uapi.MAX_IO_MSRS:
        written = 0  # Firecracker's one call is refused whole (E2BIG); kvmscope wrote them in batches to judge each
    elif refused:
        first = next(n for n, (ix, _) in enumerate(entries) if ix in refused)
        rep.failures.append(f"KVM_SET_MSRS on vCPU {i} returned {first} of {len(entries)}: refused "
                            f"{msr_where(entries[first][0])}")
        written = first
    out = VcpuOutcome(i, cpuid_set, written, len(entries))
    now = read_each(vcpu, [ix for ix, _ in entries])
    for index, want in entries:
        mask = masks.get(index, (1 << 64) - 1)
        got = now.get(index)
        if index in VOLATILE and index not in refused:
            continue
        kind = "refused" if index in refused else "unreadable" if got is None else "changed"
        if kind != "changed" or (got is not None and (got ^ want) & mask):
            out.diffs.append(BitDiff(msr_where(index), kind, want, got, mask, refused.get(index, "")))
    for k, m in lost:
        # a volatile MSR (the TSC) has moved on by the read: what overrides the template's bits is the value written
        got = dict(entries).get(m.addr) if m.addr in VOLATILE and m.addr not in refused else now.get(m.addr)
        if got is not None:
            out.diffs.append(replace(_mismatch(msr_where(m.addr), m.bitmap, got),
                                     where=f"{msr_where(m.addr)} (msr_modifiers[{k}])", kind="overridden"))
    if cpuid_set:
        out.diffs[:0] = _cpuid_diffs(vcpu.get_cpuid(), template.cpuid_modifiers, cpuid)
    return out


# --- verify and dump -------------------------------------------------------------------------------------------------


def verify(template: Template, cpuid: Sequence[CpuidEntry], msrs: dict[int, int]) -> list[BitDiff]:
    """Masked equality of ``template`` against a vCPU's state (its CPUID and MSR values): every fixed bit that does not
    hold, and every leaf or MSR the state lacks."""
    diffs = []
    for mod in template.cpuid_modifiers:
        e = find_cpuid(cpuid, mod.leaf, mod.subleaf)
        for r in mod.modifiers:
            got = None if e is None else getattr(e, r.register)
            if got is None or not r.bitmap.matches(got):
                diffs.append(_mismatch(cpuid_where(mod.leaf, mod.subleaf, r.register), r.bitmap, got))
    for m in template.msr_modifiers:
        got = msrs.get(m.addr)
        if got is None or not m.bitmap.matches(got):
            diffs.append(_mismatch(msr_where(m.addr), m.bitmap, got))
    return diffs


def _mismatch(where: str, bitmap: Bitmap, got: int | None) -> BitDiff:
    """A register or MSR that does not match: ``wanted`` is the whole value the template would leave (its fixed bits
    over what the state holds), as ``apply`` reports it; a leaf or MSR the state lacks is ``missing``."""
    if got is None:
        return BitDiff(where, "missing", bitmap.value, None, bitmap.mask)
    return BitDiff(where, "changed", got & ~bitmap.mask | bitmap.value & bitmap.mask, got, bitmap.mask)


def state_of(template: Template) -> tuple[list[CpuidEntry], dict[int, int]]:
    """A dumped template (every bit fixed) as the vCPU state it records: CPUID entries and MSR values."""
    entries = []
    for mod in template.cpuid_modifiers:
        regs = {r.register: r.bitmap.value for r in mod.modifiers}
        entries.append(CpuidEntry(mod.leaf, mod.subleaf, mod.flags, **regs))
    return entries, {m.addr: m.bitmap.value for m in template.msr_modifiers}


def undumpable(index: int) -> bool:
    """MSRs a dump leaves out: the TSC and its deadline/adjust, machine check, PMU counters and controls, VMX
    capabilities (they describe the host's nested support, not the guest's model), the KVM clock pages and Hyper-V.
    Firecracker's own list is UNDUMPABLE_MSR_RANGES in ``src/vmm/src/arch/x86_64/msr.rs``; unlike it, kvmscope keeps
    PERF_CAPABILITIES, a feature MSR a template may fix."""
    return (
        index in (0x10, 0x3B, 0x6E0, 0x11, 0x12, 0x4B564D00, 0x4B564D01)
        or 0x179 <= index <= 0x17B or index == 0x4D0 or 0x400 <= index < 0x480  # MCG_*, MCi banks
        or M.VMX_FIRST <= index <= M.VMX_LAST
        or 0xC1 <= index <= 0xC8 or 0x186 <= index <= 0x18D or 0x309 <= index <= 0x30B  # Intel PMCs, PERFEVTSELs
        or 0x38D <= index <= 0x390 or index in (0x3F1, 0x3F2, 0x600, 0x1D9) or 0x4C1 <= index <= 0x4C8  # PMU, PEBS
        or 0xC0010000 <= index <= 0xC0010007 or 0xC0010200 <= index <= 0xC001020B  # AMD PMU
        or 0xC0000300 <= index <= 0xC0000303
        # Hyper-V's synthetic MSRs (to the TSC invariant control, 0x40000118, 6.12.118 x86.c:371-380): enlightenment
        # state of a Hyper-V guest, not the vCPU model; Firecracker leaves them out too
        or 0x40000000 <= index <= 0x400001FF
    )


@dataclass
class Dump:
    template: Template
    left_out: list[int]  # listed by KVM but not dumpable by rule
    unreadable: list[int]  # KVM_GET_MSRS refused them on the vCPU


def dump(system: System) -> Dump:
    """A vCPU's CPUID (after KVM_SET_CPUID2 of the supported list) and MSRs as a template with every bit fixed."""
    indices = list(dict.fromkeys([*system.get_msr_index_list(), *system.get_msr_feature_index_list()]))
    keep = [i for i in indices if not undumpable(i)]
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid(system.get_supported_cpuid())
        except KvmError as e:
            from .probe import cpuid_refused

            raise cpuid_refused(system, e, "a dump would be of a vCPU without it") from None
        cpuid = vcpu.get_cpuid()
        values = read_each(vcpu, keep)
    def fixed(e: CpuidEntry, register: str) -> Bitmap:  # every bit but those naming the CPU the dump ran on
        mask = U32_MAX & ~PER_CPU_BITS.get((e.function, register), 0)
        return Bitmap(32, mask, getattr(e, register) & mask)

    leaves = tuple(LeafModifier(e.function, e.index, e.flags,
                                tuple(CpuidModifier(r, b) for r in ("eax", "ebx", "ecx", "edx") if (b := fixed(e, r)).mask))
                   for e in cpuid)
    msr_mods = tuple(MsrModifier(i, Bitmap.exact(64, values[i])) for i in sorted(values))
    return Dump(Template((), leaves, msr_mods, "<dump>"), sorted(set(indices) - set(keep)),
                sorted(set(keep) - set(values)))


def strip(templates: Sequence[Template]) -> list[Template]:
    """Firecracker's ``template strip`` (``strip_common`` in ``src/cpu-template-helper/src/template/strip/mod.rs``):
    a CPUID register (by leaf, subleaf, flags and register) or MSR that every template has keeps, in each, only the
    bits whose fixed value differs from the first template's somewhere, and goes when there are none; one that some
    template lacks stays, whole, in those that have it."""
    cpuid_maps: list[dict[tuple[int, int, int, str], Bitmap]] = [
        {(m.leaf, m.subleaf, m.flags, r.register): r.bitmap for m in t.cpuid_modifiers for r in m.modifiers}
        for t in templates]
    msr_maps: list[dict[int, Bitmap]] = [{m.addr: m.bitmap for m in t.msr_modifiers} for t in templates]
    _strip_common(cpuid_maps)
    _strip_common(msr_maps)
    out = []
    for t, cpuid, msrs in zip(templates, cpuid_maps, msr_maps, strict=True):
        leaves: dict[tuple[int, int, int], list[CpuidModifier]] = {}
        for (leaf, subleaf, flags, register), bitmap in cpuid.items():
            leaves.setdefault((leaf, subleaf, flags), []).append(CpuidModifier(register, bitmap))
        out.append(Template(t.kvm_capabilities,
                            tuple(LeafModifier(k[0], k[1], k[2], tuple(v)) for k, v in leaves.items()),
                            tuple(MsrModifier(a, b) for a, b in msrs.items()), t.path))
    return out


def _strip_common(maps: list[dict[K, Bitmap]]) -> None:
    """``strip_common`` on ``maps`` in place: each key all maps share gets, in every map, its filter narrowed to the
    bits whose filtered value differs from the first map's in some map (the key goes where there are none)."""
    diffs: dict[K, int] = {}
    for key, first in maps[0].items():
        others = [m.get(key) for m in maps[1:]]
        if all(b is not None for b in others):
            diffs[key] = functools.reduce(operator.or_, ((b.value & b.mask) ^ (first.value & first.mask)
                                                         for b in others if b is not None), 0)
    for key, diff in diffs.items():
        for m in maps:
            if diff:
                b = m[key]
                m[key] = Bitmap(b.width, b.mask & diff, b.value & b.mask & diff)
            else:
                del m[key]


def explain(live: ApplyReport, model: ApplyReport) -> None:
    """Give a live kernel's refusals the rule the model of this host names for the same refusal (the kernel does not
    say why), and say where the two disagree."""
    by_key = {(v.vcpu, d.where, d.kind): d for v in model.vcpus for d in v.diffs}
    for v in live.vcpus:
        for d in v.diffs:
            twin = by_key.pop((v.vcpu, d.where, d.kind), None)
            if twin is not None and twin.rule and not d.rule:
                d.rule = f"{twin.rule} (from the model of this host, applied alongside)"
            elif twin is None:
                live.notes.append(f"the model of this host did not predict: vCPU {v.vcpu} {d.kind} {d.where}")
    for (vcpu, where, kind) in by_key:
        live.notes.append(f"the model of this host predicted, the kernel did not: vCPU {vcpu} {kind} {where}")
