"""Scenario files: a VMM's sequence of vCPU-model operations on one VM (docs/scenarios.md).

YAML (safe loader) or JSON. Each kind of step is a class declaring its fields in a table, read by the one reader of
:mod:`kvmscope.schema`; every problem is a :class:`ScenarioError` naming the file, the line and the field.

.. code-block:: yaml

    scenario: 1
    name: PLATFORM_INFO changed after the first run
    steps:
      - create_vcpu: 0
      - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0x80000000}}
      - run: 0
      - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0}}
        expect: refused
"""

from __future__ import annotations

import errno as _errno
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from . import inputs
from .api import CpuidEntry
from .errors import ScenarioError
from .inputs import TextSource
from .schema import (
    CPUID_ENTRY,
    REGISTERS,
    Bool,
    Choice,
    Convert,
    Field,
    Int,
    KernelVersion,
    Leaf,
    ListOf,
    Msr,
    MsrValues,
    Node,
    Raw,
    Reader,
    Record,
    Str,
    Style,
    Type,
    Version,
    kind,
    unwrap,
)

SCHEMA = 1
EXITS = ("HltExit", "IoExit", "MmioExit", "ShutdownExit", "InterruptedExit", "InternalErrorExit", "FailEntryExit",
         "SystemEventExit")
ERRORS = Style(ScenarioError, "{file}:{line}: {field}: {what}", "{file}: {field}: {what}")


# --- reading text: one reader for every path (src/kvmscope/inputs.py holds the limits) ------------------------------------


def _source(text: str, where: str) -> TextSource:
    """A text as YAML events; a ``.json`` file must be valid JSON first (it is read as YAML for its line numbers)."""
    if where.endswith(".json"):
        inputs.json_data(text, where, ScenarioError, duplicates=False)  # duplicates are named with their line below
    return TextSource(text)


def parse_text(text: str, where: str) -> Node:
    """YAML or JSON text to a tree of :class:`Node` (values with lines)."""
    return inputs.yaml_document(_source(text, where), where, ScenarioError)


# --- the scenario model ---------------------------------------------------------------------------------------------------


_ERRNOS = {name: number for number, name in _errno.errorcode.items()}


class Errno(Type[int]):
    """An errno name (``EINVAL``), or ``ok``/``0`` for no error (0)."""

    def read(self, r: Reader, x: Any, path: str) -> int:
        name = unwrap(x)[0]
        if name in (0, "0", "ok", None):
            return 0
        if isinstance(name, str) and name in _ERRNOS:
            return _ERRNOS[name]
        raise r.fail(x, path, f"expected an errno name such as EINVAL, got {name!r}")


@dataclass
class Expect:
    """What a step should do; every field is optional."""

    accepted: bool | None = None
    count: int | None = None
    errno: int | None = None  # 0 for "no error"
    refused_msr: int | None = None
    values: dict[int, int] | None = None
    exit: str | None = None
    recorded: bool = False  # what a traced kernel returned (Ioctl.recorded), not what a scenario's author wrote

    def __post_init__(self) -> None:
        if self.refused_msr is not None:
            self.accepted = False


EXPECT = Record(Expect, [
    Field("accepted", Bool()),
    Field("count", Int(16)),
    Field("errno", Errno()),
    Field("refused", Msr(), attr="refused_msr"),
    Field("values", Convert(MsrValues(), dict)),
    Field("exit", Str(EXITS)),
], short=Field("expect", Choice({"accepted": True, "ok": True, "refused": False}), attr="accepted"))


@dataclass(frozen=True)
class CpuidEdit:
    function: int
    index: int
    register: str
    set_bits: int = 0
    clear_bits: int = 0


def _mask(bits: Sequence[int]) -> int:
    mask = 0
    for b in bits:
        mask |= 1 << b
    return mask


def _edit(leaf: tuple[int, int], register: str, set_bits: Sequence[int] = (), clear_bits: Sequence[int] = ()
          ) -> CpuidEdit:
    return CpuidEdit(leaf[0], leaf[1], register, _mask(set_bits), _mask(clear_bits))


CPUID_EDIT = Record(_edit, [Field("leaf", Leaf(), required=True), Field("register", Str(REGISTERS), required=True),
                            Field("set_bits", ListOf(Int(5))), Field("clear_bits", ListOf(Int(5)))])


class ProfileRef(Type[str]):
    """A host profile: a shipped name, or a file named relative to the scenario, as CPUID files are, so that the
    scenario means the same from any working directory. A bare word (no "/", no ".json") is a shipped name first,
    else a file of that name next to the scenario (``probe --save myhost`` writes one)."""

    def read(self, r: Reader, x: Any, path: str) -> str:
        from .kernel.profile import shipped

        text = Str().read(r, x, path)
        if not text.strip():
            raise r.fail(x, path, f"expected a shipped profile name or a file, got {text!r}")
        if "/" in text or text.endswith(".json") or text not in shipped() and os.path.lexists(r.base / text):
            if not os.path.lexists(r.base / text):
                raise r.fail(x, path, f"no file {inputs.shown(r.base / text)} (a profile file is named relative to the "
                                      "scenario)")
            return str(r.base / text)
        if text not in shipped():
            raise r.fail(x, path, f"no shipped profile named {inputs.shown(text)!r} and no file of that name next to "
                                  f"the scenario; shipped: {', '.join(shipped())} (or give a path)")
        return text


class CpuidFile(Type[list[CpuidEntry]]):
    """A file holding a list of CPUID entries, named relative to the scenario."""

    def read(self, r: Reader, x: Any, path: str) -> list[CpuidEntry]:
        file = r.base / Str().read(r, x, path)
        try:  # every problem in that file is named with the step that names the file
            text = inputs.read_text(file, ScenarioError, "a CPUID list", limit=MAX_CPUID_FILE)
            data = parse_text(text, inputs.shown(file))
            inner = Reader(inputs.shown(file), r.style)
            if not isinstance(data.value, list):
                raise inner.fail(data, "(top level)", f"expected a list, got {kind(data.value)}")
            return [CPUID_ENTRY.read(inner, e, f"entries[{j}]") for j, e in enumerate(data.value)]
        except ScenarioError as e:
            raise r.fail(x, path, str(e)) from None


MAX_CPUID_FILE = inputs.MiB  # a CPUID list has a few hundred entries at most

# KVM_CREATE_VCPU takes an unsigned long but stores an int (kvm_vcpu.vcpu_id), and the binding passes it as a C int
VCPU = Field("vcpu", Int(31, " (a vCPU id is a C int: 0 to 0x7fffffff)"))


@dataclass(kw_only=True)
class Step:
    """One operation of a scenario. Each kind declares ``KIND`` (its key in the file), ``FIELDS`` (its table) and
    ``SHORT`` (the key a bare value stands for: ``run: 0`` is ``run: {vcpu: 0}``)."""

    KIND: ClassVar[str]
    FIELDS: ClassVar[tuple[Field, ...]]
    SHORT: ClassVar[str | None] = "vcpu"

    line: int = 0
    vcpu: int = 0  # the vCPU it acts on (0 for the VM-wide steps)
    label: str = ""
    expect: Expect | None = None

    @property
    def kind(self) -> str:
        return self.KIND


@dataclass(kw_only=True)
class CreateVcpu(Step):
    """KVM_CREATE_VCPU, then real-mode registers pointing at a one-byte HLT guest."""

    KIND = "create_vcpu"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class SetCpuid(Step):
    """KVM_SET_CPUID2 of ``entries`` (from the step or its ``file``), or without them of the ``source`` list
    (``supported``: KVM_GET_SUPPORTED_CPUID; ``stored``: the vCPU's KVM_GET_CPUID2), after ``edits``."""

    KIND = "set_cpuid"
    FIELDS = (VCPU, Field("from", Str(("supported", "stored")), attr="source"), Field("entries", ListOf(CPUID_ENTRY)),
              Field("file", CpuidFile(), attr="entries"), Field("edits", ListOf(CPUID_EDIT)))
    SHORT = None
    source: str = "supported"
    entries: list[CpuidEntry] | None = None
    edits: list[CpuidEdit] = field(default_factory=list)


@dataclass(kw_only=True)
class SetMsrs(Step):
    """KVM_SET_MSRS of one batch: ``msrs`` as ``{MSR: value}`` or ``[[MSR, value], ...]``."""

    KIND = "set_msrs"
    FIELDS = (VCPU, Field("msrs", MsrValues(), required=True))
    SHORT = None
    msrs: list[tuple[int, int]] = field(default_factory=list)


@dataclass(kw_only=True)
class GetMsrs(Step):
    """KVM_GET_MSRS of one batch."""

    KIND = "get_msrs"
    FIELDS = (VCPU, Field("msrs", ListOf(Msr()), required=True))
    SHORT = None
    msrs: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class GetCpuid(Step):
    """KVM_GET_CPUID2."""

    KIND = "get_cpuid"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class Run(Step):
    """KVM_RUN to the first exit (the guest is a HLT)."""

    KIND = "run"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class Reset(Step):
    """RESET emulation: writes again, in one batch, every MSR value the scenario wrote to the vCPU so far."""

    KIND = "reset"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class MicrocodeLoad(Step):
    """Writes IA32_UCODE_REV, as a VMM emulating a microcode update does."""

    KIND = "microcode_load"
    FIELDS = (VCPU, Field("revision", Int(), required=True))
    SHORT = "revision"
    revision: int = 0


@dataclass(kw_only=True)
class DestroyVcpu(Step):
    """Closes the vCPU fd (KVM keeps the vCPU until the VM goes)."""

    KIND = "destroy_vcpu"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class Hotplug(Step):
    """Unplug and plug back as QEMU does: the parked vCPU fd is reused; no ioctl."""

    KIND = "hotplug"
    FIELDS = (VCPU,)


@dataclass(kw_only=True)
class DisableQuirks(Step):
    """KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2) on the VM."""

    KIND = "disable_quirks"
    FIELDS = (Field("quirks", Int()),)
    SHORT = "quirks"
    quirks: int = 0


IOCTLS = ("KVM_SET_MSRS", "KVM_GET_MSRS", "KVM_SET_CPUID2", "KVM_RUN", "KVM_CREATE_VCPU")


@dataclass(kw_only=True)
class Ioctl(Step):
    """One recorded ioctl of a real VMM: what it passed, and what the kernel returned (``returned``, ``errno``), which
    replaying it checks unless the step has its own ``expect``."""

    KIND = "ioctl"
    FIELDS = (VCPU, Field("name", Str(IOCTLS), required=True), Field("msrs", MsrValues()),
              Field("entries", ListOf(CPUID_ENTRY)), Field("returned", Int(16)), Field("errno", Errno()))
    SHORT = None
    name: str
    msrs: list[tuple[int, int]] = field(default_factory=list)
    entries: list[CpuidEntry] = field(default_factory=list)
    returned: int | None = None
    errno: int | None = None

    def recorded(self) -> Expect:
        """What the kernel returned when this ioctl was recorded, as an expectation."""
        e = Expect(recorded=True)
        if self.returned is not None:
            if self.name in ("KVM_SET_CPUID2", "KVM_RUN", "KVM_CREATE_VCPU"):
                e.errno = 0  # these return 0 or fail: "returned" says it did not fail
            else:
                e.count = self.returned
        if self.errno is not None:
            e.errno = self.errno
        return e

    def step(self) -> Step:
        """The typed step this ioctl is, expecting what the kernel returned."""
        common: dict[str, Any] = {"line": self.line, "vcpu": self.vcpu, "label": self.label,
                                  "expect": self.expect if self.expect is not None else self.recorded()}
        if self.name == "KVM_SET_MSRS":
            return SetMsrs(msrs=self.msrs, **common)
        if self.name == "KVM_GET_MSRS":
            return GetMsrs(msrs=[i for i, _ in self.msrs], **common)
        if self.name == "KVM_SET_CPUID2":
            return SetCpuid(entries=self.entries, **common)
        if self.name == "KVM_RUN":
            return Run(**common)
        return CreateVcpu(**common)


@dataclass(kw_only=True)
class Traced(Step):
    """An ioctl a traced VMM issued that replay does not repeat (``kvmscope trace``): kept so the recording shows the
    whole sequence. ``on`` is the object (system, vm, vcpu, device), ``count`` how many identical calls in a row,
    ``detail`` the decoded arguments, ``returned``/``errno`` what the kernel returned, ``indices``/``entries`` the
    list a KVM_GET_MSR_INDEX_LIST or KVM_GET_SUPPORTED_CPUID gave."""

    KIND = "traced"
    FIELDS = (VCPU, Field("on", Str(("system", "vm", "vcpu", "device", "other"))), Field("name", Str(), required=True),
              Field("count", Int(64)), Field("detail", Str()), Field("returned", Int(64)), Field("errno", Errno()),
              Field("pid", Int(32)), Field("indices", ListOf(Int(32))), Field("entries", ListOf(CPUID_ENTRY)))
    SHORT = None
    on: str = "vm"
    name: str = ""
    count: int = 1
    detail: str = ""
    returned: int | None = None
    errno: int | None = None
    pid: int | None = None
    indices: list[int] | None = None  # what a KVM_GET_MSR_INDEX_LIST or _FEATURE_INDEX_LIST listed
    entries: list[CpuidEntry] | None = None  # what a KVM_GET_SUPPORTED_CPUID offered


STEP_TYPES: tuple[type[Step], ...] = (CreateVcpu, SetCpuid, SetMsrs, GetMsrs, GetCpuid, Run, Reset, MicrocodeLoad,
                                      DestroyVcpu, Hotplug, DisableQuirks, Ioctl, Traced)
STEPS: dict[str, Record[Step]] = {t.KIND: Record(t, t.FIELDS, short=t.SHORT) for t in STEP_TYPES}
VM_WIDE_KINDS = frozenset(t.KIND for t in STEP_TYPES if VCPU not in t.FIELDS)  # steps that act on no vCPU
STEP_KINDS = tuple(STEPS)


def read_step(r: Reader, node: Node, i: int) -> Step:
    """``steps[i]``: one action (its key names the kind), an optional ``label`` and an optional ``expect``."""
    where = f"steps[{i}]"
    if not isinstance(node.value, dict):
        raise r.fail(node, where, f"expected a mapping, got {kind(node.value)}")
    d: dict[str, Node] = node.value
    kinds = [k for k in d if k not in ("expect", "label")]
    if len(kinds) != 1:
        raise r.fail(node, where, f"a step has one action (one of {', '.join(STEP_KINDS)}), got {kinds}")
    action = kinds[0]
    record = STEPS.get(action)
    if record is None:
        raise r.fail(d[action], f"{where}.{action}", f"unknown step (expected one of {', '.join(STEP_KINDS)})")
    body = d[action]
    label = Str().read(r, d["label"], f"{where}.label") if "label" in d else ""
    if action == "set_cpuid" and isinstance(body.value, dict):
        sources = [k for k in ("from", "entries", "file") if k in body.value]
        if len(sources) > 1:
            raise r.fail(body, f"{where}.{action}", f"one source of entries (from, entries or file), got "
                                                    f"{', '.join(sources)}")
    step = record.read(r, body, f"{where}.{action}", line=body.line, label=label)
    if "expect" in d:
        step.expect = EXPECT.read(r, d["expect"], "expect")  # named without the step, as ever
        if step.expect.values is not None and action != "get_msrs":
            raise r.fail(d["expect"], "expect.values", f"values are what a get_msrs step reads, not a {action} step")
    return step


class Steps(Type[list[Step]]):
    def read(self, r: Reader, x: Any, path: str) -> list[Step]:
        return [read_step(r, n, i) for i, n in enumerate(ListOf(Raw()).read(r, x, path))]


@dataclass
class Scenario:
    name: str
    description: str = ""
    steps: list[Step] = field(default_factory=list)
    path: str = "<scenario>"
    kernel: str | None = None
    profile: str | None = None
    faithful: bool = False  # replay issues only the recorded ioctls (a recording by `kvmscope trace`)


def _scenario_defaults(r: Reader, x: Any, path: str, values: dict[str, Any]) -> None:
    values.setdefault("name", Path(r.file).stem)
    values["path"] = r.file


HEADER = (
    Field("scenario", Version(SCHEMA), required=True, store=False, note=f"the format version, {SCHEMA}"),
    Field("name", Str()),
    Field("description", Str()),
    Field("kernel", KernelVersion()),
    Field("profile", ProfileRef()),
    Field("faithful", Bool(), note="replay only the ioctls of the steps (no register set-up or extra reads)"),
)
SCENARIO = Record(Scenario, (HEADER[0], Field("steps", Steps(), required=True), *HEADER[1:]), finish=_scenario_defaults)
SCENARIO_HEADER = Record(Scenario, HEADER, finish=_scenario_defaults)


HEADER_FIELDS = {f.key: f for f in HEADER}
MAX_STEPS = 50_000
"""The most steps of a scenario read whole (``load``, ``parse``: ``check --json`` and ``--compare`` keep every result);
:func:`stream` reads any number in constant memory."""


class _Walk:
    """One pass over a scenario's YAML events: the header fields (anywhere in the top-level mapping, each checked as it
    comes) and the steps, checked to the end of the file, so that every way of reading a file gives one verdict."""

    def __init__(self, source: TextSource, where: str) -> None:
        self.events = inputs.Events(source, where, ScenarioError)
        self.where = where
        self.reader = Reader(where, ERRORS)
        self.header: dict[str, Node] = {}
        self.scenario: Scenario | None = None  # the header, once the whole file has been read

    def steps(self) -> Iterator[Step]:
        """Each step as it is read; at the end, :attr:`scenario` holds the header."""
        ev, r = self.events, self.reader
        try:
            if not ev.start():
                raise ScenarioError(f"{self.where}:1: the file is empty")
            if not ev.peek(yaml.MappingStartEvent):
                node = ev.node()
                raise r.fail(node, "(top level)", f"expected a mapping, got {kind(node.value)}")
            ev.check_tag(ev.next())
            seen_steps = False
            while not ev.peek(yaml.MappingEndEvent):
                name, line = ev.key()
                if name in self.header or (name == "steps" and seen_steps):
                    ev.fail(line, f"duplicate key {name!r}: a key appears once in a mapping")
                if name == "steps":
                    seen_steps = True
                    yield from self._steps()
                elif name in HEADER_FIELDS:
                    node = self.header[name] = ev.node(depth=1)
                    HEADER_FIELDS[name].type.read(r, node, name)  # checked now: the version before any step
                else:
                    raise r.fail(Node(None, line), f"(top level).{name}",
                                 f"unknown field (expected {', '.join(SCENARIO.keys)})")
            ev.next()
            ev.finish()
            root = Node(self.header, 1)
            if not seen_steps:
                raise r.fail(root, "steps", "missing")
            self.scenario = SCENARIO_HEADER.read(r, root, "")
        except yaml.YAMLError as e:
            raise ev.translate(e) from None
        finally:
            ev.close()

    def _steps(self) -> Iterator[Step]:
        ev, r = self.events, self.reader
        if not ev.peek(yaml.SequenceStartEvent):
            node = ev.node(depth=1)
            raise r.fail(node, "steps", f"expected a list, got {kind(node.value)}")
        ev.check_tag(ev.next())
        i = 0
        while not ev.peek(yaml.SequenceEndEvent):
            yield read_step(r, ev.node(depth=2), i)
            i += 1
        ev.next()


def _read_all(source: TextSource, where: str) -> Scenario:
    walk = _Walk(source, where)
    steps: list[Step] = []
    for step in walk.steps():
        if len(steps) == MAX_STEPS:
            raise ScenarioError(f"{where}:{step.line}: more than {MAX_STEPS:,} steps, the limit for a scenario read "
                                "whole (--json, --compare); without them `kvmscope check` streams any number")
        steps.append(step)
    assert walk.scenario is not None
    walk.scenario.steps = steps
    return walk.scenario


def parse(text: str, where: str = "<scenario>") -> Scenario:
    """Read and check scenario text; ``where`` names it in errors (``.json`` reads it as JSON)."""
    return _read_all(_source(text, where), where)


def load(path: str | Path) -> Scenario:
    """Read and check a scenario file (at most ``inputs.MAX_FILE`` bytes and ``MAX_STEPS`` steps)."""
    where = inputs.shown(path)
    if where.endswith(".json"):
        return parse(inputs.read_text(path, ScenarioError, "a scenario"), where)
    # Decoded as it is parsed, as stream() does: the first problem in the file is the one reported either way.
    return _read_all(TextSource(io.BytesIO(inputs.read_bytes(path, ScenarioError, "a scenario"))), where)


@dataclass
class Stream:
    """A scenario read step by step (constant memory however long it is): the header first, then :attr:`steps`."""

    header: Scenario
    steps: Iterator[Step]


def stream(path: str | Path) -> Stream:
    """Open a scenario for step-by-step reading, in constant memory. The whole file is read and checked first
    (its steps are not kept), so that a bad line anywhere is reported before any step is played; the steps are then
    read again as they are consumed. A JSON file is read whole (``inputs.MAX_FILE``)."""
    where = inputs.shown(path)
    if where.endswith(".json"):
        source = _source(inputs.read_text(path, ScenarioError, "a scenario"), where)
        file = None
    else:
        file = inputs.open_regular(path, ScenarioError, "a scenario")
        source = TextSource(file)
    try:
        first = _Walk(source, where)
        for _ in first.steps():
            pass
        assert first.scenario is not None
        source.rewind()
    except BaseException:
        if file is not None:
            file.close()
        raise

    def steps() -> Iterator[Step]:
        try:
            yield from _Walk(source, where).steps()
        finally:
            if file is not None:
                file.close()

    return Stream(first.scenario, steps())
