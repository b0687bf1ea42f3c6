"""What a trapped KVM ioctl carried, and how it is written down as a scenario step (streamed, constant memory).

A :class:`Call` is one ioctl as the tracer saw it: the object its fd names (``/dev/kvm``, a VM, a vCPU, per
``/proc/TID/fd/N``), the request, the payload read at entry (what the VMM passed) and at exit (what KVM returned),
and the return value. :class:`Writer` turns calls into scenario steps: the vCPU-model ioctls as ``ioctl`` steps that
``kvmscope check`` replays and checks (KVM_CREATE_VCPU, KVM_SET_CPUID2, KVM_SET_MSRS, KVM_GET_MSRS, the first KVM_RUN),
KVM_CAP_DISABLE_QUIRKS2 as ``disable_quirks``, every other ioctl as a ``traced`` step (kept, not replayed), runs of
identical ones and the later KVM_RUNs of a vCPU as counts. Each step's label carries the time since the trace began.
"""

from __future__ import annotations

import errno as _errno
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import msrs, uapi
from ..api import CpuidEntry

Reader = Callable[[int, int], bytes]
"""Reads ``size`` bytes at ``address`` of the traced process."""

MAX_ENTRIES = 4096  # more entries than KVM accepts in one batch: the VMM's call fails anyway; do not read megabytes

# KVM_EXIT_* names for the first run's exit.
EXIT_NAMES = {v: k for k, v in vars(uapi).items() if k.startswith("KVM_EXIT_") and isinstance(v, int)
              and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


@dataclass
class Call:
    """One trapped ioctl."""

    time: float
    pid: int  # thread-group id (the process)
    tid: int
    fd: int
    obj: str  # system | vm | vcpu | device | other
    vcpu: int  # the vCPU id, for obj == "vcpu"
    request: int
    arg: int
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    result: int | None = None  # the return value; negative: -errno

    @property
    def errno(self) -> int:
        return -self.result if self.result is not None and self.result < 0 else 0


def name_of(request: int) -> str:
    return uapi.TRACE_IOCTL_NAMES.get(request, f"KVMIO 0x{request:08x}")


def classify(link: str) -> tuple[str, int]:
    """``/proc/TID/fd/N``'s link to (object kind, vCPU id)."""
    if link == "/dev/kvm":
        return "system", 0
    if link == "anon_inode:kvm-vm":
        return "vm", 0
    if link.startswith("anon_inode:kvm-vcpu:"):
        try:
            return "vcpu", int(link.rsplit(":", 1)[1])
        except ValueError:
            return "other", 0
    if link.startswith("anon_inode:kvm"):
        return "device", 0
    return "other", 0


def _msrs(read: Reader, address: int, with_values: bool) -> list[tuple[int, int]]:
    n = min(struct.unpack("<I", read(address, 4))[0], MAX_ENTRIES)
    raw = read(address + 8, 16 * n)
    return [(index, value if with_values else 0) for index, _, value in struct.iter_unpack("<IIQ", raw)]


def _cpuid(read: Reader, address: int) -> list[CpuidEntry]:
    n = min(struct.unpack("<I", read(address, 4))[0], MAX_ENTRIES)
    raw = read(address + 8, 40 * n)
    return [CpuidEntry(*e[:7]) for e in struct.iter_unpack("<10I", raw)]


def read_entry(call: Call, read: Reader) -> None:
    """The payload the VMM passed, read at syscall entry."""
    n, a = call.name, call.arg
    if n in ("KVM_SET_MSRS", "KVM_GET_MSRS"):
        call.data["msrs"] = _msrs(read, a, n == "KVM_SET_MSRS")
    elif n == "KVM_SET_CPUID2":
        call.data["entries"] = _cpuid(read, a)
    elif n == "KVM_ENABLE_CAP":
        cap, flags, *args = struct.unpack("<II4Q", read(a, 40))
        call.data.update(cap=cap, flags=flags, args=args)
    elif n == "KVM_SET_USER_MEMORY_REGION":
        slot, flags, gpa, size, _ = struct.unpack("<IIQQQ", read(a, 32))
        call.data.update(slot=slot, flags=flags, gpa=gpa, size=size)
    elif n == "KVM_X86_SETUP_MCE":
        call.data["mcg_cap"] = struct.unpack("<Q", read(a, 8))[0]
    elif n == "KVM_X86_SET_MSR_FILTER":
        flags = struct.unpack("<I", read(a, 4))[0]
        ranges = [struct.unpack("<IIIxxxxQ", read(a + 8 + 24 * i, 24))[:3] for i in range(16)]
        call.data.update(flags=flags, ranges=[(f, nm, b) for f, nm, b in ranges if f])
    elif n in ("KVM_CREATE_VCPU", "KVM_CHECK_EXTENSION", "KVM_CREATE_VM"):
        call.data["value"] = a


LISTS = ("KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST", "KVM_GET_SUPPORTED_CPUID")


def read_exit(call: Call, read: Reader) -> None:
    """What KVM returned in the payload, read at syscall exit: a KVM_GET_MSRS's values, and the lists the VMM builds
    its vCPU model from (the MSRs to save and restore, the CPUID to offer), which ``check`` sets against another
    kernel's."""
    if call.result is None or call.result < 0:
        return
    if call.name == "KVM_GET_MSRS":
        call.data["msrs"] = _msrs(read, call.arg, True)
    elif call.name in LISTS[:2]:
        n = min(struct.unpack("<I", read(call.arg, 4))[0], MAX_ENTRIES)
        call.data["indices"] = list(struct.unpack(f"<{n}I", read(call.arg + 4, 4 * n)))
    elif call.name == "KVM_GET_SUPPORTED_CPUID":
        call.data["entries"] = _cpuid(read, call.arg)


class Hex(int):
    """An int written in hex."""


def flow(x: Any) -> str:
    """``x`` as YAML flow text (one line)."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, Hex):
        return f"0x{int(x):x}"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in x) + "]"
    raise TypeError(f"cannot write {type(x).__name__}")


def _errno_name(e: int) -> str:
    return _errno.errorcode.get(e, str(e))


@dataclass
class _Pending:
    """Identical consecutive ``traced`` calls, written as one step with a count."""

    key: tuple[Any, ...]
    body: dict[str, Any]
    time: float
    pid: int
    count: int = 1


@dataclass
class Summary:
    """What a recording holds, for the report printed after tracing."""

    calls: int = 0
    steps: int = 0
    vcpus: list[int] = field(default_factory=list)
    runs: dict[int, int] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # vCPU-model calls KVM refused or failed, described
    failed: dict[str, int] = field(default_factory=dict)  # other calls that failed (e.g. E2BIG size probes), by name
    other_vms: int = 0


MODEL_STEPS = ("KVM_CREATE_VCPU", "KVM_SET_CPUID2", "KVM_SET_MSRS", "KVM_GET_MSRS")


class Writer:
    """Writes calls as scenario steps to ``out`` as they come (memory: O(vCPUs))."""

    def __init__(self, out: TextIO, name: str, description: str) -> None:
        self.out = out
        self.summary = Summary()
        self.vm: tuple[int, int] | None = None  # (pid, fd) of the VM the scenario follows
        self.vcpu_fds: set[int] = set()  # the fds of its vCPUs, in that process
        self.pending: _Pending | None = None
        # vCPU -> (times of the first and last unwritten run, runs not written)
        self.ran: dict[int, tuple[float, float, int]] = {}
        self.pid = 0  # the process that created the VM
        # The phase, as the ioctls show it: "creation" until a vCPU first runs, then "run"; "hotplug" from a vCPU
        # created after another ran to its first run; "reload" for vCPU-model writes to a vCPU that has run (a reset,
        # loadvm and an incoming migration look alike at this level) until the next run.
        self.phase = "creation"
        out.write(f"scenario: 1\nname: {json.dumps(name)}\ndescription: {json.dumps(description)}\nfaithful: true\n")
        self.started = False  # "steps:" is written with the first step ("steps: []" at the end if none came)

    # --- writing -----------------------------------------------------------------------------------------------

    def _step(self, kind: str, body: dict[str, Any], time: float, pid: int, note: str = "",
              until: float | None = None) -> None:
        span = f"t={time:.6f}" + (f"..{until:.6f}" if until is not None and until != time else "")
        label = f"{span} pid {pid} {self.phase}" + (f" {note}" if note else "")
        self._begin()
        self.out.write(f"- {{{kind}: {flow(body)}, label: {json.dumps(label)}}}\n")
        self.summary.steps += 1

    def _begin(self) -> None:
        if not self.started:
            self.out.write("steps:\n")
            self.started = True

    def _flush_pending(self) -> None:
        p, self.pending = self.pending, None
        if p is not None:
            if p.count > 1:
                p.body["count"] = p.count
            self._step("traced", p.body, p.time, p.pid)

    def _flush_runs(self, vcpu: int | None = None) -> None:
        for v in [vcpu] if vcpu is not None else sorted(self.ran):
            first, last, n = self.ran.get(v, (0.0, 0.0, 0))
            if n:
                self._flush_pending()
                # the runs span a time, which other threads' steps can fall within: the label gives the span
                self._step("traced", {"on": "vcpu", "vcpu": v, "name": "KVM_RUN", "count": n}, first, self.pid,
                           "(later runs of this vCPU, counted)", last)
                self.ran[v] = (last, last, 0)

    def run(self, call: Call) -> bool:
        """A KVM_RUN at entry: True when it is the vCPU's first (recorded whole), else counted here."""
        s = self.summary
        s.calls += 1
        s.by_name["KVM_RUN"] = s.by_name.get("KVM_RUN", 0) + 1
        s.runs[call.vcpu] = s.runs.get(call.vcpu, 0) + 1
        if call.vcpu not in self.ran or not self._ours(call):
            return True
        first, _, n = self.ran[call.vcpu]
        self.ran[call.vcpu] = (first if n else call.time, call.time, n + 1)
        if self.phase == "reload":
            self.phase = "run"
        return False

    def _ours(self, call: Call) -> bool:
        """Whether ``call`` is on the followed VM: its process, and for a VM or vCPU call that VM's fd or one of its
        vCPUs' (a process may create several VMs: kvmscope probe does, and a VMM that restarts)."""
        if self.vm is None or call.pid != self.vm[0]:
            return False
        if call.obj == "vcpu":
            return call.fd in self.vcpu_fds
        return call.obj != "vm" or call.fd == self.vm[1]

    def add(self, call: Call) -> None:
        """A call seen at exit (or at entry for calls with no exit stop)."""
        s = self.summary
        if call.name != "KVM_RUN":
            s.calls += 1
            s.by_name[call.name] = s.by_name.get(call.name, 0) + 1
        made = call.name in ("KVM_CREATE_VM", "KVM_CREATE_VCPU") and call.result is not None and call.result >= 0
        if made and self.vm is not None and call.pid == self.vm[0]:
            # the fd number names a new object: one of the followed VM's vCPUs, or no longer anything of it
            if call.name == "KVM_CREATE_VCPU" and call.fd == self.vm[1]:
                self.vcpu_fds.add(call.result)  # type: ignore[arg-type]
            else:
                self.vcpu_fds.discard(call.result)
                if call.result == self.vm[1]:
                    self.vm = (call.pid, -1)  # the followed VM was closed and its number given to another
        if call.name == "KVM_CREATE_VM" and call.result is not None and call.result >= 0:
            if self.vm is None:
                self.vm = (call.pid, call.result)
                self.pid = call.pid
            else:
                s.other_vms += 1
        if call.obj == "vcpu" and self._ours(call):
            self._flush_runs(call.vcpu)
        typed = self._ours(call) and (call.obj == "vcpu" or call.name == "KVM_CREATE_VCPU")
        if typed:
            self._track_phase(call)
        if typed and call.name in MODEL_STEPS:
            self._model_step(call)
        elif typed and call.name == "KVM_RUN" and not call.errno:  # an interrupted first try (EINTR) is only traced
            self.ran[call.vcpu] = (call.time, call.time, 0)
            self.phase = "run"
            exit_ = EXIT_NAMES.get(call.data.get("exit_reason", -1), "")
            self._model_step(call, f"(first run: {exit_})" if exit_ else "(first run)")
        elif (self._ours(call) and call.name == "KVM_ENABLE_CAP" and call.obj == "vm"
              and call.data.get("cap") == uapi.KVM_CAP_DISABLE_QUIRKS2):
            self._disable_quirks(call)
        else:
            self._traced(call)

    def _disable_quirks(self, call: Call) -> None:
        """KVM_CAP_DISABLE_QUIRKS2 as the scenario step that replays it, expecting what KVM returned."""
        self._flush_pending()
        self._begin()
        expect = {"errno": _errno_name(call.errno) if call.errno else "ok"}
        label = f"t={call.time:.6f} pid {call.pid} {self.phase}"
        self.out.write(f"- {{disable_quirks: {{quirks: {flow(Hex(call.data['args'][0]))}}}, expect: {flow(expect)}, "
                       f"label: {json.dumps(label)}}}\n")
        self.summary.steps += 1

    def _track_phase(self, call: Call) -> None:
        if call.name == "KVM_CREATE_VCPU" and self.ran:
            self._flush_pending()
            self.phase = "hotplug"
        elif call.name in ("KVM_SET_MSRS", "KVM_SET_CPUID2") and call.vcpu in self.ran and self.phase == "run":
            self._flush_pending()
            self.phase = "reload"

    def existing(self, vcpu: int) -> None:
        """A vCPU that existed before an attach: a create_vcpu step, marked (its ioctl was not seen)."""
        self.summary.vcpus.append(vcpu)
        self._step("create_vcpu", {"vcpu": vcpu}, 0.0, self.pid, "(existed at attach)")

    def _model_step(self, call: Call, note: str = "") -> None:
        self._flush_pending()
        body: dict[str, Any] = {"name": call.name, "vcpu": call.vcpu}
        if call.name == "KVM_CREATE_VCPU":
            body["vcpu"] = call.data.get("value", 0)
            if not call.errno:
                self.summary.vcpus.append(body["vcpu"])
        if "msrs" in call.data:
            body["msrs"] = [[Hex(i), Hex(v)] for i, v in call.data["msrs"]]
        if "entries" in call.data:
            body["entries"] = _entries(call.data["entries"])
        if call.errno:
            body["errno"] = _errno_name(call.errno)
            self.summary.refused.append(f"{call.name} on vCPU {body['vcpu']}: failed with {body['errno']}")
        else:
            body["returned"] = call.result if call.result is not None else 0
        if call.name == "KVM_SET_MSRS" and call.result is not None and 0 <= call.result < len(call.data["msrs"]):
            index, value = call.data["msrs"][call.result]
            self.summary.refused.append(f"KVM_SET_MSRS on vCPU {call.vcpu}: returned {call.result} of "
                                        f"{len(call.data['msrs'])}, refused {msrs.name_of(index)} (0x{index:x}) = 0x{value:x}")
        self._step("ioctl", body, call.time, call.pid, note)

    def _traced(self, call: Call) -> None:
        body: dict[str, Any] = {"on": call.obj}
        if call.obj == "vcpu":
            body["vcpu"] = call.vcpu
        body["name"] = call.name
        detail = _detail(call)
        if detail:
            body["detail"] = detail
        if "indices" in call.data:  # what KVM listed: check sets it against another kernel's list
            body["indices"] = [Hex(i) for i in call.data["indices"]]
        if "entries" in call.data:
            body["entries"] = _entries(call.data["entries"])
        if call.errno:
            body["errno"] = _errno_name(call.errno)
            self.summary.failed[f"{call.name} {body['errno']}"] = self.summary.failed.get(
                f"{call.name} {body['errno']}", 0) + 1
        elif call.result is not None:
            body["returned"] = call.result
        if not self._ours(call) and call.pid:
            body["pid"] = call.pid
        key = (call.pid, flow(body))
        if self.pending is not None and self.pending.key == key and not detail:
            self.pending.count += 1
            return
        self._flush_pending()
        self.pending = _Pending(key, body, call.time, call.pid)
        if detail:  # calls with arguments are each their own step
            self._flush_pending()

    def close(self) -> Summary:
        self._flush_pending()
        self._flush_runs()
        if not self.started:
            self.out.write("steps: []\n")
        self.out.flush()
        return self.summary


def _entries(entries: list[CpuidEntry]) -> list[dict[str, Any]]:
    return [{"function": Hex(e.function), "index": e.index, "flags": e.flags, "eax": Hex(e.eax), "ebx": Hex(e.ebx),
             "ecx": Hex(e.ecx), "edx": Hex(e.edx)} for e in entries]


def _detail(call: Call) -> str:
    d = call.data
    n = call.name
    if n == "KVM_ENABLE_CAP":
        cap = uapi.CAPABILITY_NAMES.get(d["cap"], f"capability {d['cap']}")
        return f"{cap} flags 0x{d['flags']:x} args [{', '.join(hex(a) for a in d['args'])}]"
    if n == "KVM_SET_USER_MEMORY_REGION":
        return f"slot {d['slot']} gpa 0x{d['gpa']:x} size 0x{d['size']:x} flags 0x{d['flags']:x}"
    if n == "KVM_X86_SETUP_MCE":
        return f"mcg_cap 0x{d['mcg_cap']:x}"
    if n == "KVM_X86_SET_MSR_FILTER":
        return f"flags 0x{d['flags']:x} ranges " + ", ".join(f"[flags {f} 0x{b:x}+{c}]" for f, c, b in d["ranges"])
    if n in ("KVM_GET_MSRS", "KVM_SET_MSRS") and "msrs" in d:  # on /dev/kvm (feature MSRs) or another VM
        return " ".join(f"0x{i:x}=0x{v:x}" for i, v in d["msrs"])
    if n == "KVM_CHECK_EXTENSION":
        return uapi.CAPABILITY_NAMES.get(d["value"], f"capability {d['value']}")
    return ""
