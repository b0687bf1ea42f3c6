"""Replay a scenario on a backend and explain, step by step, what the kernel did with it and why.

On the model every refusal carries the rule that refused it. On the live kernel the same scenario runs in lockstep
on the model (this host's profile) to explain each refusal the kernel makes; where the two disagree, the report says
so instead of guessing.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from . import guest, uapi
from . import msrs as M
from .api import CpuidEntry, MsrBatch, System, Vcpu, Vm, find_cpuid
from .errors import InvalidValueError, KvmError, KvmscopeError
from .kernel import rulesets as R
from .scenario import (
    CreateVcpu,
    DestroyVcpu,
    DisableQuirks,
    Expect,
    GetCpuid,
    GetMsrs,
    Hotplug,
    Ioctl,
    MicrocodeLoad,
    Reset,
    Run,
    Scenario,
    SetCpuid,
    SetMsrs,
    Step,
    Traced,
)

DEFAULT_HINT = "compare with KVM_GET_MSR_INDEX_LIST and the feature MSRs"


def hint(rule: R.Rule | None) -> str:
    """What to do about a refusal by ``rule`` (the hints live with the rules, in kernel/rulesets.py)."""
    return rule.hint if rule is not None and rule.hint else DEFAULT_HINT


@dataclass
class Refusal:
    """The entry KVM refused, with what it was and what it was to become."""

    index: int
    name: str
    position: int
    new: int
    old: int | None
    rule: R.Rule | None
    hint: str

    @property
    def rule_key(self) -> str | None:
        return self.rule.key if self.rule is not None else None

    @property
    def differing(self) -> int:
        return (self.old ^ self.new) if self.old is not None else 0


@dataclass
class StepResult:
    number: int
    line: int
    kind: str
    vcpu: int | None  # None: a recorded system or VM ioctl
    label: str
    outcome: str  # accepted | refused | ok | error | differs (a recorded capability this kernel answers otherwise)
    summary: str
    count: int | None = None
    total: int | None = None
    errno: int | None = None
    refusal: Refusal | None = None
    values: dict[int, int] | None = None
    exit: str | None = None
    expected: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    writes: list[tuple[int, str, int | None, int]] | None = None  # accepted KVM_SET_MSRS: (index, name, old, new)
    asked: str = ""  # "differs": what this kernel answers the recorded query ("KVM_CAP_XSAVE2 = 0")
    beyond_recording: bool = False  # the recording's expectation unmet because this kernel took what it refused
    # a recorded batch refused at an MSR this kernel's KVM_GET_MSR_INDEX_LIST does not name: the VMM, which took its
    # batch from that list, would not have sent it here (not a failure of the kernel replayed)
    not_listed: bool = False

    @property
    def asked_capability(self) -> str:
        """The capability (or the list, KVM_GET_...) a "differs" step is about (the name in ``asked``)."""
        return re.split(r" = | not ", self.asked, maxsplit=1)[0]

    @property
    def ok(self) -> bool:
        """Did what it expected (or, replaying a recording, got further than the recording: took what the recording's
        kernel refused); without an expectation: was not refused and did not fail."""
        return not ((self.met is False and not self.beyond_recording and not self.not_listed)
                    or (self.met is None and self.outcome in ("refused", "error")))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.refusal:
            r = out["refusal"]
            r["index"] = f"0x{self.refusal.index:x}"
            r["new"] = f"0x{self.refusal.new:x}"
            r["old"] = None if self.refusal.old is None else f"0x{self.refusal.old:x}"
            r["differing_bits"] = [b for b in range(64) if self.refusal.differing >> b & 1]
            r["rule"] = self.refusal.rule.cite() if self.refusal.rule is not None else None
            r["rule_key"] = self.refusal.rule_key
        if self.values is not None:
            out["values"] = {f"0x{k:x}": f"0x{v:x}" for k, v in self.values.items()}
        if self.writes is not None:
            out["writes"] = [{"index": f"0x{i:x}", "name": n, "old": None if o is None else f"0x{o:x}",
                              "new": f"0x{v:x}"} for i, n, o, v in self.writes]
        out["errno"] = _errno.errorcode.get(self.errno, self.errno) if self.errno else None
        return out


def split_asked(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The queries a replay found answered otherwise: (capabilities, lists: KVM_GET_MSR_INDEX_LIST and the like)."""
    names = list(names)
    return [n for n in names if not n.startswith("KVM_GET_")], [n for n in names if n.startswith("KVM_GET_")]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def asked_text(names: Iterable[str]) -> str:
    """"10 capabilities the VMM asked for answer otherwise; KVM_GET_MSR_INDEX_LIST answers otherwise than recorded"."""
    caps, lists = split_asked(names)
    parts = [f"{len(caps)} capabilities the VMM asked for answer otherwise" if len(caps) > 1 else
             f"{caps[0]}, which the VMM asked for, answers otherwise" if caps else "",
             f"{_and(lists)} answer{'s' if len(lists) == 1 else ''} otherwise than recorded" if lists else ""]
    return "; ".join(p for p in parts if p)


@dataclass
class Report:
    scenario: str
    path: str
    backend: str
    description: str
    steps: list[StepResult]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        """The report; ``beyond_recording`` counts the steps that got further than their recording, and
        ``capabilities_answer_otherwise`` names the capabilities the VMM asked for that this kernel answers otherwise,
        ``lists_answer_otherwise`` the lists (KVM_GET_MSR_INDEX_LIST, KVM_GET_SUPPORTED_CPUID) it gives otherwise."""
        caps, lists = split_asked(dict.fromkeys(s.asked_capability for s in self.steps if s.outcome == "differs"))
        return {"scenario": self.scenario, "path": self.path, "backend": self.backend,
                "description": self.description, "ok": self.ok,
                "beyond_recording": sum(s.beyond_recording for s in self.steps),
                "not_listed": sum(s.not_listed for s in self.steps),
                "capabilities_answer_otherwise": caps, "lists_answer_otherwise": lists,
                "steps": [s.to_json() for s in self.steps]}


class Replayer:
    """Plays a scenario's steps on one VM of ``system``; ``shadow`` (a model) explains refusals of a live kernel."""

    def __init__(self, system: System, shadow: Replayer | None = None, faithful: bool = False) -> None:
        self.system = system
        self.shadow = shadow
        # Faithful (recordings): no register set-up at vCPU creation and no reads of old values on a live kernel,
        # so the kernel sees only the recorded ioctls (and, before a vCPU's first run, its registers set to the HLT).
        self.faithful = faithful
        self.vm: Vm = system.create_vm()
        guest.ensure_memory(self.vm)
        self.vm.write_memory(guest.DEFAULT_ENTRY, guest.HLT)
        self.vcpus: dict[int, Vcpu] = {}
        self.written: dict[int, dict[int, int]] = {}
        self.given: dict[int, list[CpuidEntry]] = {}  # each vCPU's last KVM_SET_CPUID2 the kernel took, as given
        self.ran: set[int] = set()
        self.destroyed: set[int] = set()  # vCPUs whose fd a destroy_vcpu step closed
        self.irqchip = False  # a recorded KVM_CREATE_IRQCHIP was replayed
        # MSRs the recorded KVM_GET_MSR_INDEX_LIST named and this kernel's does not: what the VMM would not send here
        self.unlisted: dict[int, str] = {}

    def close(self) -> None:
        self.vm.close()
        if self.shadow:
            self.shadow.close()

    def _vcpu(self, step: Step) -> Vcpu:
        v = self.vcpus.get(step.vcpu)
        if v is None and step.vcpu in self.destroyed:
            raise InvalidValueError(f"vCPU {step.vcpu}'s fd was closed by a destroy_vcpu step, and KVM keeps the vCPU "
                                    "until the VM goes (create_vcpu of it is EEXIST): a VMM that plugs it back in "
                                    "keeps the fd open (QEMU parks it), which a hotplug step without destroy_vcpu is")
        if v is None:
            raise InvalidValueError(f"vCPU {step.vcpu} does not exist here (add a create_vcpu step)")
        return v

    def play(self, number: int, step: Step) -> StepResult:
        """Play one step (on the model alongside first, whose result explains this one) and judge it."""
        shadow = self.shadow.play(number, step) if self.shadow else None
        on_vcpu = not isinstance(step, Traced) or step.on == "vcpu"  # a traced system or VM ioctl names no vCPU
        res = StepResult(number, step.line, step.kind, step.vcpu if on_vcpu else None, step.label, "ok", "")
        if isinstance(step, Ioctl):
            step = step.step()  # reported as the ioctl it was recorded as, played as what it is
        try:
            self.PLAYERS[type(step)](self, step, res, shadow)
        except KvmError as e:
            res.outcome, res.errno = "error", e.errno
            res.summary = str(e)
        except KvmscopeError as e:
            res.outcome, res.summary = "error", str(e)
        if step.expect is not None:
            res.expected, res.met = judge(step.expect, res)
            # only a `kvmscope trace` recording (faithful) gets this: an author's `ioctl` step checks for the same
            if not res.met and self.faithful and step.expect.recorded and _beyond(step.expect, res, step.kind):
                res.beyond_recording = True
                res.notes.append("this kernel takes what the recording's kernel refused: the VMM gets further here")
            elif (not res.met and self.faithful and step.expect.recorded and step.kind in ("set_msrs", "get_msrs")
                    and res.refusal is not None and res.refusal.index in self.unlisted):
                res.not_listed = True
                res.notes.append(f"{res.refusal.name} (0x{res.refusal.index:x}) is not in this kernel's "
                                 f"KVM_GET_MSR_INDEX_LIST ({self.unlisted[res.refusal.index]}): the VMM, which saves "
                                 "and restores what that list names, would not have sent it here")
        return res

    # One method per kind of step: (step, its result to fill in, the model's result alongside or None).

    def _create_vcpu(self, step: CreateVcpu, res: StepResult, shadow: StepResult | None) -> None:
        vcpu = self.vm.create_vcpu(step.vcpu)
        if not self.faithful:
            guest.setup_real_mode(vcpu)
        self.vcpus[step.vcpu] = vcpu
        res.outcome, res.summary = "accepted", f"created vCPU {step.vcpu}"

    def _destroy_vcpu(self, step: DestroyVcpu, res: StepResult, shadow: StepResult | None) -> None:
        self._vcpu(step).close()
        del self.vcpus[step.vcpu]
        self.destroyed.add(step.vcpu)
        res.outcome, res.summary = "ok", f"closed vCPU {step.vcpu}'s fd (KVM keeps the vCPU until the VM goes)"

    def _hotplug(self, step: Hotplug, res: StepResult, shadow: StepResult | None) -> None:
        self._vcpu(step)
        res.outcome = "ok"
        res.summary = (f"vCPU {step.vcpu} unplugged and plugged back: the VMM reuses the parked vCPU fd "
                       "(KVM cannot destroy a vCPU), so the vCPU keeps its frozen model")

    def _disable_quirks(self, step: DisableQuirks, res: StepResult, shadow: StepResult | None) -> None:
        self.vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, step.quirks)
        res.outcome, res.summary = "accepted", f"disabled quirks 0x{step.quirks:x}"

    def _set_cpuid(self, step: SetCpuid, res: StepResult, shadow: StepResult | None) -> None:
        vcpu = self._vcpu(step)
        entries = self._cpuid_for(step, vcpu)
        try:
            vcpu.set_cpuid(entries)
            self.given[step.vcpu] = entries
            res.outcome, res.summary = "accepted", f"KVM_SET_CPUID2 took {len(entries)} entries"
        except KvmError as e:
            res.outcome, res.errno = "refused", e.errno
            res.summary = f"KVM_SET_CPUID2 failed: {_errno.errorcode.get(e.errno or 0, e.errno)}"
            if step.vcpu in self.ran:
                res.notes.extend(cpuid_differences(entries, vcpu.get_cpuid()))
            if step.vcpu in self.ran and e.errno == _errno.EINVAL:
                res.notes.append(f"rule: {R.CPUID_AFTER_RUN_IDENTICAL.cite()}")
                res.notes.append(f"hint: {hint(R.CPUID_AFTER_RUN_IDENTICAL)}")

    def _cpuid_for(self, step: SetCpuid, vcpu: Vcpu) -> list[CpuidEntry]:
        if step.entries is not None:
            entries = list(step.entries)
        elif step.source == "stored":
            entries = vcpu.get_cpuid()
        else:
            entries = self.system.get_supported_cpuid()
        for edit in step.edits:
            pos = next((i for i, e in enumerate(entries) if e.key == (edit.function, edit.index)), None)
            if pos is None:
                later = getattr(self.system, "rules", None)
                later = later.leaf_arrival(edit.function, edit.index) if isinstance(later, R.Ruleset) else None
                why = f" (this kernel's KVM does not list it yet: {later.key}, {later.cite()})" if later else ""
                raise InvalidValueError(f"CPUID leaf 0x{edit.function:x}.{edit.index} is not in the list to edit{why}")
            e = entries[pos]
            value = (getattr(e, edit.register) | edit.set_bits) & ~edit.clear_bits & 0xFFFFFFFF
            entries[pos] = replace(e, **{edit.register: value})
        return entries

    def _set_msrs(self, step: SetMsrs, res: StepResult, shadow: StepResult | None) -> None:
        self._write(res, self._vcpu(step), step.msrs, shadow)

    def _microcode_load(self, step: MicrocodeLoad, res: StepResult, shadow: StepResult | None) -> None:
        self._write(res, self._vcpu(step), [(M.MSR_IA32_UCODE_REV, step.revision)], shadow)

    def _reset(self, step: Reset, res: StepResult, shadow: StepResult | None) -> None:
        vcpu = self._vcpu(step)
        self._write(res, vcpu, list(self.written.get(step.vcpu, {}).items()), shadow)

    def _write(self, res: StepResult, vcpu: Vcpu, pairs: list[tuple[int, int]], shadow: StepResult | None) -> None:
        """KVM_SET_MSRS of ``pairs``, explaining a refusal (by the model alongside, on a live kernel)."""
        quiet = self.faithful and self.system.backend != "model"  # reading old values would add KVM_GET_MSRS
        olds = [None if quiet else vcpu.try_read_msr(i) for i, _ in pairs]
        batch = MsrBatch(pairs)
        count = vcpu.set_msrs(batch)
        res.count, res.total = count, len(pairs)
        n = res.vcpu if res.vcpu is not None else -1  # always a vCPU's step here
        written = self.written.setdefault(n, {})
        for index, value in pairs[:count]:
            written[index] = value
        if count == len(pairs):
            res.writes = [(i, M.name_of(i), old, v) for (i, v), old in zip(pairs, olds, strict=True)]
            res.outcome = "accepted"
            res.summary = f"KVM_SET_MSRS wrote all {count} MSR{'s' if count != 1 else ''}"
            if shadow is not None and shadow.count is not None and shadow.count != count:  # the model is wrong here
                res.notes.append(f"the model with this host's profile predicted a different result: {shadow.summary}")
            return
        index, value = pairs[count]
        cited = vcpu.refusal_rule(index)
        if cited is None and shadow is not None and shadow.refusal is not None and shadow.refusal.index == index \
                and shadow.refusal.position == count:
            cited = shadow.refusal.rule
            res.notes.append("(the rule comes from the model replayed alongside: the kernel does not say why)")
        elif cited is None and shadow is not None:
            res.notes.append("the model with this host's profile predicted a different result: "
                             f"{shadow.summary}")
        res.outcome = "refused"
        res.refusal = Refusal(index, M.name_of(index), count, value, olds[count], cited,
                              self._dropped_bit(n, vcpu, cited) or hint(cited))
        res.summary = f"KVM_SET_MSRS returned {count} of {len(pairs)}: refused {M.name_of(index)} (0x{index:x})"

    def _dropped_bit(self, n: int, vcpu: Vcpu, rule: R.Rule | None) -> str:
        """For a refusal for want of a CPUID bit that the VMM's KVM_SET_CPUID2 set and the vCPU's CPUID lacks (the
        host's KVM_SET_CPUID2 dropped it, as this PVM host does ARCH_CAPABILITIES'), the hint that says so."""
        needed = R.CPUID_GATES.get(rule) if rule is not None else None
        if needed is None or n not in self.given:
            return ""
        _, (function, index, register, b), what = needed

        def has(entries: list[CpuidEntry]) -> bool:
            e = find_cpuid(entries, function, index)
            return e is not None and bool(getattr(e, register) >> b & 1)

        if self.faithful and self.system.backend != "model":  # no KVM_GET_CPUID2 the recording lacks: ask the model
            shadow = self.shadow.vcpus.get(n) if self.shadow is not None else None
            if shadow is None:
                return ""
            vcpu = shadow
        if not has(self.given[n]) or has(vcpu.get_cpuid()):
            return ""
        return (f"the VMM's KVM_SET_CPUID2 set CPUID.{function:x}.{index}:{register.upper()}[{b}] ({what}) and this "
                f"host's KVM_SET_CPUID2 dropped it (KVM_GET_CPUID2 lacks it): on this host only 0 can be written")

    def _get_msrs(self, step: GetMsrs, res: StepResult, shadow: StepResult | None) -> None:
        vcpu = self._vcpu(step)
        batch = MsrBatch(step.msrs)
        count = vcpu.get_msrs(batch)
        res.count, res.total = count, len(batch)
        res.values = {i: v for n, (i, v) in enumerate(batch) if n < count}
        res.outcome = "ok" if count == len(batch) else "refused"
        res.summary = f"KVM_GET_MSRS read {count} of {len(batch)}"
        if count < len(batch):
            index = batch[count][0]
            res.refusal = Refusal(index, M.name_of(index), count, 0, None, vcpu.refusal_rule(index),
                                  hint(R.UNKNOWN_MSR))

    def _get_cpuid(self, step: GetCpuid, res: StepResult, shadow: StepResult | None) -> None:
        entries = self._vcpu(step).get_cpuid()
        res.outcome, res.summary = "ok", f"KVM_GET_CPUID2 returned {len(entries)} entries"

    def _run(self, step: Run, res: StepResult, shadow: StepResult | None) -> None:
        vcpu = self._vcpu(step)
        if self.irqchip and vcpu.get_mp_state() != uapi.KVM_MP_STATE_RUNNABLE:
            # an AP waiting for INIT/SIPI would block in KVM_RUN until a signal: report it rather than hang
            res.outcome, res.summary = "ok", "KVM_RUN not replayed: the vCPU waits for INIT/SIPI (in-kernel LAPIC)"
            return
        guest.setup_real_mode(vcpu)
        exit_ = vcpu.run()
        self.ran.add(step.vcpu)
        res.exit, res.outcome = exit_.name, "ok"
        res.summary = f"KVM_RUN: {exit_.name}"

    PLAYERS: ClassVar[dict[type[Step], Callable[[Replayer, Any, StepResult, StepResult | None], None]]] = {
        CreateVcpu: _create_vcpu, DestroyVcpu: _destroy_vcpu, Hotplug: _hotplug, DisableQuirks: _disable_quirks,
        SetCpuid: _set_cpuid, SetMsrs: _set_msrs, MicrocodeLoad: _microcode_load, Reset: _reset, GetMsrs: _get_msrs,
        GetCpuid: _get_cpuid, Run: _run,
    }
    """How to play each kind of step (an Ioctl plays as the step it is)."""


def cpuid_differences(given: list[CpuidEntry], current: list[CpuidEntry], limit: int = 8) -> list[str]:
    """What differs between a CPUID list and the vCPU's (KVM_GET_CPUID2), as kvm_cpuid_check_equal compares them:
    the entry count, then entry by entry in order: leaf and sub-leaf, flags, each register."""
    out = []
    if len(given) != len(current):
        out.append(f"CPUID differs: {len(given)} entries given, the vCPU has {len(current)}")
    for n, (g, c) in enumerate(zip(given, current, strict=False)):
        if g.key != c.key:
            out.append(f"CPUID entry {n} differs: leaf 0x{g.function:x}.{g.index} given where the vCPU has "
                       f"0x{c.function:x}.{c.index}")
            continue
        for reg in ("flags", "eax", "ebx", "ecx", "edx"):
            a, b = getattr(g, reg), getattr(c, reg)
            if a != b:
                bits = ", ".join(str(i) for i in range(32) if (a ^ b) >> i & 1)
                out.append(f"CPUID leaf 0x{g.function:x}.{g.index} {reg.upper()} differs: given 0x{a:08x}, the vCPU "
                           f"has 0x{b:08x} (bits {bits})")
    if len(out) > limit:
        out[limit:] = [f"... and {len(out) - limit} more differences"]
    return out


def judge(e: Expect, r: StepResult) -> tuple[str, bool]:
    """Did the step do what ``e`` says? Returns a description of the expectation and the verdict."""
    parts: list[str] = []
    ok = True
    if e.accepted is not None:
        parts.append("accepted" if e.accepted else "refused")
        ok &= (r.outcome in ("accepted", "ok")) == e.accepted
    if e.count is not None:
        parts.append(f"count {e.count}")
        ok &= r.count == e.count
    if e.errno is not None:
        parts.append(f"errno {_errno.errorcode.get(e.errno, 'none') if e.errno else 'none'}")
        ok &= (r.errno or 0) == e.errno
    if e.refused_msr is not None:
        parts.append(f"refused at {M.name_of(e.refused_msr)}")
        ok &= r.refusal is not None and r.refusal.index == e.refused_msr
    if e.values is not None:
        parts.append("values " + ", ".join(f"{M.name_of(k)}=0x{v:x}" for k, v in e.values.items()))
        ok &= r.values is not None and all(r.values.get(k) == v for k, v in e.values.items())
    if e.exit is not None:
        parts.append(f"exit {e.exit}")
        ok &= r.exit == e.exit
    return ", ".join(parts), bool(ok)


def _beyond(e: Expect, r: StepResult, kind: str) -> bool:
    """Whether ``r`` got further than the recording ``e`` describes: no error where the recording has one, or more MSRs
    written or read than the recorded count, with nothing failing now."""
    if kind not in ("set_msrs", "get_msrs", "set_cpuid") or r.outcome != "accepted" or r.errno:
        return False  # a run's exit is no further than a recorded error (a failed entry is an exit too)
    return bool(e.errno) or (e.count is not None and r.count is not None and r.count > e.count)


def replay_iter(steps: Iterable[Step], system: System, shadow_system: System | None = None, faithful: bool = False
                ) -> Iterator[StepResult]:
    """Play ``steps`` on ``system`` (a fresh VM), yielding each result as it happens (constant memory)."""
    shadow = Replayer(shadow_system, faithful=faithful) if shadow_system is not None else None
    player = Replayer(system, shadow, faithful=faithful)
    try:
        for n, s in enumerate(steps):
            yield player.play(n, s)
    finally:
        player.close()


def replay(scenario: Scenario, system: System, shadow_system: System | None = None) -> Report:
    """Play every step of ``scenario`` on ``system`` (a fresh VM) and report."""
    steps = list(replay_iter(scenario.steps, system, shadow_system, scenario.faithful))
    return Report(scenario.name, scenario.path, system.backend, system.describe(), steps)


@dataclass
class Change:
    number: int
    line: int
    kind: str
    outcomes: dict[str, str]  # kernel -> outcome text
    text: str


def outcome_text(r: StepResult) -> str:
    if r.outcome == "error" or (r.errno and r.outcome == "refused"):
        return f"{r.outcome} ({_errno.errorcode.get(r.errno or 0, r.summary)})"
    if r.outcome == "refused" and r.refusal is not None:
        return f"refused at {r.refusal.name}"
    if r.outcome == "differs":
        return f"differs ({r.asked})"
    return r.outcome


def _where(r: StepResult) -> str:
    """The outcome of one step on one kernel, with where and why it was refused."""
    verb = outcome_text(r).split(" at ", 1)[0]
    at = f" at {r.refusal.name}" if r.outcome == "refused" and r.refusal is not None else ""
    return verb + at


def _why(r: StepResult) -> str:
    if r.refusal is not None and r.refusal.rule is not None:
        rule = r.refusal.rule
        f = r.refusal
        old = "unreadable" if f.old is None else f"0x{f.old:x}"
        return (f" by {rule.commit} (since {rule.since}: {rule.title}; 0x{f.index:x} = 0x{f.new:x}, was {old}; "
                f"hint: {f.hint})")
    if r.notes:
        return " (" + r.notes[0].removeprefix("rule: ") + ")"
    return ""


def kernels_text(subset: Iterable[str], order: list[str]) -> str:
    """``subset`` of the kernels ``order`` compares, listed; a run of six or more that follow one another in ``order``
    as "FIRST to LAST (N kernels)" (``--compare all`` names 80)."""
    chosen = set(subset)
    runs: list[list[str]] = []
    for i, k in enumerate(order):
        if k in chosen:
            if runs and i > 0 and order[i - 1] == runs[-1][-1]:
                runs[-1].append(k)
            else:
                runs.append([k])
    return ", ".join(f"{r[0]} to {r[-1]} ({len(r)} kernels)" if len(r) >= 6 else ", ".join(r) for r in runs)


def compare(reports: dict[str, Report]) -> list[Change]:
    """Steps whose outcome differs between kernels: each run of kernels with one outcome, every kernel named, and the
    rule (commit, first version) behind a refusal."""
    kernels = list(reports)
    changes = []
    first = reports[kernels[0]]
    for n, base in enumerate(first.steps):
        outcomes = {k: outcome_text(reports[k].steps[n]) for k in kernels}
        if len(set(outcomes.values())) == 1:
            continue
        runs: list[list[str]] = []
        for k in kernels:
            if runs and outcomes[runs[-1][0]] == outcomes[k]:
                runs[-1].append(k)
            else:
                runs.append([k])
        segments = []
        for run in runs:
            r = reports[run[0]].steps[n]
            segments.append(f"{_where(r)} on {kernels_text(run, kernels)}{_why(r)}")
        on = "" if base.vcpu is None else f"vCPU {base.vcpu}, "  # a recorded system or VM ioctl names no vCPU
        where = f" ({on}{base.label})" if base.label else ""  # recordings: time, pid and phase
        changes.append(Change(n, base.line, base.kind, outcomes, "; ".join(segments) + where))
    return changes


# --- recordings (`kvmscope trace`) ------------------------------------------------------------------------------------


def _setup_mce(self: Replayer, step: Traced, res: StepResult) -> bool:
    """KVM_X86_SETUP_MCE replayed on both backends: it decides which MCE MSRs (MCG_CTL, the banks) KVM_SET_MSRS takes
    later."""
    vcpu = self.vcpus.get(step.vcpu)
    if vcpu is None or step.errno or not step.detail.startswith("mcg_cap "):
        return False
    cap = int(step.detail.split()[1], 16)
    try:
        vcpu.setup_mce(cap)
        res.outcome, res.summary = "accepted", f"KVM_X86_SETUP_MCE mcg_cap 0x{cap:x} (replayed)"
    except KvmError as e:
        res.outcome, res.errno = "error", e.errno
        res.summary = f"KVM_X86_SETUP_MCE mcg_cap 0x{cap:x} failed: {_errno.errorcode.get(e.errno or 0, e.errno)}"
        res.met = False
    return True


_SPLIT_IRQCHIP = re.compile(r"KVM_CAP_SPLIT_IRQCHIP flags 0x0 args \[(0x[0-9a-f]+),")  # trace.decode's detail


def _create_irqchip(self: Replayer, step: Traced, res: StepResult) -> None:
    """KVM_CREATE_IRQCHIP, or KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP), replayed on both backends: the in-kernel LAPIC
    decides what ASYNC_PF_INT, ASYNC_PF_EN and TSC_DEADLINE take later."""
    split = _SPLIT_IRQCHIP.match(step.detail or "") if step.name == "KVM_ENABLE_CAP" else None
    try:
        if split:
            self.vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, int(split.group(1), 16))
        else:
            self.vm.create_irqchip()
    except KvmError as e:
        res.outcome, res.errno, res.met = "error", e.errno, False
        res.summary = f"{step.name} failed: {_errno.errorcode.get(e.errno or 0, e.errno)}"
        return
    self.irqchip = True
    self.vm.write_memory(guest.DEFAULT_ENTRY, guest.OUT_THEN_HLT)
    res.outcome, res.summary = "accepted", f"{step.name}{' (KVM_CAP_SPLIT_IRQCHIP)' if split else ''} (replayed)"


_CAPABILITY_NUMBERS = {name: n for n, name in uapi.CAPABILITY_NAMES.items()}


_ARGS = re.compile(r"\bargs \[(0x[0-9a-f]+)")


def _first_arg(detail: str) -> int:
    m = _ARGS.search(detail)
    return int(m.group(1), 16) if m else 0


def _capability_of(detail: str) -> int | None:
    """The capability a traced KVM_CHECK_EXTENSION or KVM_ENABLE_CAP names: ``KVM_CAP_X...`` or ``capability N``."""
    words = detail.split()
    if words[:1] == ["capability"] and len(words) > 1 and words[1].isdigit():
        return int(words[1])
    return _CAPABILITY_NUMBERS.get(words[0]) if words else None


def _asked(self: Replayer, step: Traced, res: StepResult, what: str) -> bool:
    """A recorded KVM_CHECK_EXTENSION, or a KVM_ENABLE_CAP the VMM made after asking, set against what this kernel
    answers (asked, not replayed): where it answers otherwise the VMM takes another path from here ("differs")."""
    cap = _capability_of(step.detail or "")
    if cap is None or step.errno or (step.name == "KVM_CHECK_EXTENSION" and step.returned is None):
        return False
    ask = self.system if step.on == "system" else self.vm
    answer = ask.check_extension(cap)
    name = uapi.CAPABILITY_NAMES.get(cap, f"capability {cap}")
    rules = getattr(self.system, "rules", None)
    rules = rules if isinstance(rules, R.Ruleset) else None
    enable_later = rules.enable_arrival(cap) if rules is not None and step.name == "KVM_ENABLE_CAP" else None
    if step.name == "KVM_CHECK_EXTENSION" and answer != step.returned:
        res.summary = (f"recorded {what}: returned {step.returned}; this kernel answers {answer}: the VMM takes "
                       "another path from here (not replayed)")
        res.asked = f"{name} = {answer}"
    elif step.name == "KVM_ENABLE_CAP" and (not answer or enable_later is not None):
        verb = "cannot enable" if answer else "does not offer"
        res.summary = f"recorded {what}: taken; this kernel {verb} {name}, so KVM_ENABLE_CAP is EINVAL here " \
                      "(not replayed)"
        res.asked = f"{name} not " + ("enabled" if answer else "offered")
    elif step.name == "KVM_ENABLE_CAP" and cap in R.FLAG_MASK_CAPS and (arg := _first_arg(step.detail or "")) & ~answer:
        res.summary = (f"recorded {what}: taken; this kernel takes only 0x{answer:x} of {name}'s flags, not "
                       f"0x{arg & ~answer:x}, so KVM_ENABLE_CAP is EINVAL here (not replayed)")
        res.asked = f"{name} flags 0x{arg & ~answer:x} not taken"
        enable_later = rules.flags_arrival(cap, arg & ~answer) if rules is not None else None
    else:
        return False
    res.outcome = "differs"
    later = enable_later or (rules.cap_arrival(cap) or rules.limit_rule(cap) if rules is not None else None)
    if later is not None:
        res.notes.append(f"rule: {later.cite()}")
    return True


def _listed(self: Replayer, step: Traced, res: StepResult, what: str) -> bool:
    """A recorded KVM_GET_MSR_INDEX_LIST, KVM_GET_MSR_FEATURE_INDEX_LIST or KVM_GET_SUPPORTED_CPUID, set against this
    kernel's list (asked, not replayed): the VMM saves and restores the MSRs listed and offers the CPUID given, so
    where this kernel lacks items it takes another path from here ("differs"). On the model (or the live kernel with
    its model alongside), each missing item is put down to the release that brings it, where this host has it; what
    no release explains is another host's answer, and what this kernel lists beyond the recording may be a later
    kernel's or another host's: notes. With no model to ask, any difference of the live kernel judged counts."""
    from .model.cpuid import lost_features

    model = self.system if self.system.backend == "model" else self.shadow.system if self.shadow is not None else None
    rules = getattr(model, "rules", None)
    rules = rules if isinstance(rules, R.Ruleset) else None
    captured = getattr(model, "captured", None)  # the host as captured: what it has under its own kernel
    found: list[tuple[str, R.Rule | None]]  # each item this kernel lacks, and the rule that brings it
    if step.indices is not None and step.name in ("KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST"):
        index_list = step.name == "KVM_GET_MSR_INDEX_LIST"
        now = self.system.get_msr_index_list() if index_list else self.system.get_msr_feature_index_list()
        recorded, here = len(step.indices), len(now)
        arrivals = {i: r for r, indices in R.MSR_ARRIVALS.items() for i in indices}
        if not index_list:
            arrivals[M.MSR_PLATFORM_INFO] = R.PLATFORM_INFO_IMMUTABLE  # a feature MSR from 6.13
        own = set(captured.msr_index_list if index_list else captured.feature_msrs) if captured is not None else None

        def why(i: int) -> R.Rule | None:
            r = arrivals.get(i)
            return None if rules is None or r is None or r in rules.rules or own is not None and i not in own else r

        found = [(f"{M.name_of(i)} (0x{i:x})", why(i)) for i in step.indices if i not in set(now)]
        more = sum(i not in set(step.indices) for i in now)
        unit = "MSRs"
    elif step.entries is not None and step.name == "KVM_GET_SUPPORTED_CPUID" and rules is not None:
        cpuid = self.system.get_supported_cpuid()
        recorded, here = len(step.entries), len(cpuid)
        history, own_cpuid = (captured.history, captured.supported_cpuid) if captured is not None else ((), None)
        found = lost_features(rules, history, step.entries, cpuid, own_cpuid)
        more = len(lost_features(rules, (), cpuid, step.entries))
        unit = "entries"
    else:
        return False
    # Only what a release explains (or, with no model to ask, any difference of the live kernel judged) is this
    # kernel's doing; HYPERVISOR and TSC_DEADLINE the VMM sets itself.
    brought: list[tuple[str, R.Rule | None]] = found if rules is None else [
        (n, r) for n, r in found if r is not None and r not in R.VMM_SETS_ITSELF]
    other = sum(r is None for _, r in found) if rules is not None else 0
    if other:
        res.notes.append(f"{step.name}: {other} recorded item(s) this kernel lacks and no release in the rules "
                         "explains: another host's answer (give --profile for the recording's host)")
    if more:
        res.notes.append(f"{step.name}: this kernel gives {more} item(s) the recording's did not (a later kernel's, "
                         "or another host's): the VMM would save or offer them here")
    if not brought:
        return False
    shown = "; ".join(n + (f" ({r.key}, since {r.since})" if r is not None else "") for n, r in brought[:8])
    res.outcome = "differs"
    res.asked = f"{step.name} not as recorded: {len(brought)} fewer"
    res.summary = (f"recorded {what}: returned {recorded} {unit}; this kernel gives {here}, without {shown}"
                   + (f" and {len(brought) - 8} more" if len(brought) > 8 else "")
                   + ": the VMM builds its vCPU model from this answer, so it takes another path from here (not "
                   "replayed)")
    res.notes.extend(f"rule: {r.cite()}" for r in dict.fromkeys(r for _, r in brought if r is not None))
    if step.name == "KVM_GET_MSR_INDEX_LIST":
        self.unlisted = {int(n.rsplit("(0x", 1)[1].rstrip(")"), 16): f"{r.key}, since {r.since}" if r is not None
                         else f"step {res.number}" for n, r in brought}
    return True


def _traced(self: Replayer, step: Traced, res: StepResult, shadow: StepResult | None) -> None:
    """A recorded ioctl that replay does not repeat: reported as it was recorded (a capability it asked for, with what
    this kernel answers)."""
    followed = step.pid is None  # a step with a pid is another VM's (docs/trace.md): not replayed on this one
    if followed and step.name == "KVM_X86_SETUP_MCE" and _setup_mce(self, step, res):
        return
    if followed and not step.errno and (step.name == "KVM_CREATE_IRQCHIP" or step.name == "KVM_ENABLE_CAP"
                                        and _SPLIT_IRQCHIP.match(step.detail or "")):
        _create_irqchip(self, step, res)
        return
    what = f"{step.name}{f' ({step.detail})' if step.detail else ''}{f' x{step.count}' if step.count != 1 else ''}"
    # a system query is the same whichever process made it (before KVM_CREATE_VM the VMM's carry its pid)
    if ((followed or step.on == "system") and step.name in ("KVM_CHECK_EXTENSION", "KVM_ENABLE_CAP")
            and step.on in ("system", "vm") and _asked(self, step, res, what)):
        return
    if step.on == "system" and not step.errno and _listed(self, step, res, what):
        return
    if step.errno:
        got = f"failed with {_errno.errorcode.get(step.errno, step.errno)}"
    else:
        got = f"returned {step.returned}" if step.returned is not None else "counted"
    res.outcome, res.summary = "ok", f"recorded {what}: {got} (not replayed)"


Replayer.PLAYERS[Traced] = _traced
