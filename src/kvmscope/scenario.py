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
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .api import CpuidEntry
from .errors import ScenarioError
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


# --- YAML with line numbers -------------------------------------------------------------------------------------------


def _convert(node: yaml.Node, loader: Any) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for k, v in node.value:
            # Keys keep their source text (`0xce`, not 206) so that messages name them as written.
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else str(_convert(k, loader).value)
            out[name] = _convert(v, loader)
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(v, loader) for v in node.value], line)
    return Node(loader.construct_object(node, deep=True), line)


def parse_text(text: str, where: str) -> Node:
    """YAML or JSON text to a tree of :class:`Node` (values with lines)."""
    if where.endswith(".json"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ScenarioError(f"{where}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:  # e.g. a control character: the reader refuses the text before parsing
        raise ScenarioError(f"{where}: not valid YAML: {e}") from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise ScenarioError(f"{where}:1: the file is empty")
        return _convert(root, loader)
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 0
        raise ScenarioError(f"{where}:{line}: not valid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ScenarioError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


# --- the scenario model ---------------------------------------------------------------------------------------------------


class Errno(Type[int]):
    """An errno name (``EINVAL``), or ``ok``/``0`` for no error (0)."""

    def read(self, r: Reader, x: Any, path: str) -> int:
        name = unwrap(x)[0]
        if name in (0, "0", "ok", None):
            return 0
        if isinstance(name, str) and isinstance(getattr(_errno, name, None), int):
            return int(getattr(_errno, name))
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


class CpuidFile(Type[list[CpuidEntry]]):
    """A file holding a list of CPUID entries, named relative to the scenario."""

    def read(self, r: Reader, x: Any, path: str) -> list[CpuidEntry]:
        file = r.base / Str().read(r, x, path)
        try:
            data = parse_text(file.read_text(), str(file))
        except OSError as err:
            raise r.fail(x, path, f"cannot read {file}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise r.fail(x, path, f"cannot read {file}: not a text file") from None
        inner = Reader(str(file), r.style)
        if not isinstance(data.value, list):
            raise inner.fail(data, "(top level)", f"expected a list, got {kind(data.value)}")
        return [CPUID_ENTRY.read(inner, e, f"entries[{j}]") for j, e in enumerate(data.value)]


VCPU = Field("vcpu", Int(32))


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
        e = Expect()
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
    ``detail`` the decoded arguments, ``returned``/``errno`` what the kernel returned."""

    KIND = "traced"
    FIELDS = (VCPU, Field("on", Str(("system", "vm", "vcpu", "device", "other"))), Field("name", Str(), required=True),
              Field("count", Int(64)), Field("detail", Str()), Field("returned", Int(64)), Field("errno", Errno()),
              Field("pid", Int(32)))
    SHORT = None
    on: str = "vm"
    name: str = ""
    count: int = 1
    detail: str = ""
    returned: int | None = None
    errno: int | None = None
    pid: int | None = None


STEP_TYPES: tuple[type[Step], ...] = (CreateVcpu, SetCpuid, SetMsrs, GetMsrs, GetCpuid, Run, Reset, MicrocodeLoad,
                                      DestroyVcpu, Hotplug, DisableQuirks, Ioctl, Traced)
STEPS: dict[str, Record[Step]] = {t.KIND: Record(t, t.FIELDS, short=t.SHORT) for t in STEP_TYPES}
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
    step = record.read(r, body, f"{where}.{action}", line=body.line, label=label)
    if "expect" in d:
        step.expect = EXPECT.read(r, d["expect"], "expect")  # named without the step, as ever
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
    Field("profile", Str()),
    Field("faithful", Bool(), note="replay only the ioctls of the steps (no register set-up or extra reads)"),
)
SCENARIO = Record(Scenario, (HEADER[0], Field("steps", Steps(), required=True), *HEADER[1:]), finish=_scenario_defaults)
SCENARIO_HEADER = Record(Scenario, HEADER, finish=_scenario_defaults)


def parse(text: str, where: str = "<scenario>") -> Scenario:
    """Read and check scenario text; ``where`` names it in errors (``.json`` reads it as JSON)."""
    return SCENARIO.read(Reader(where, ERRORS), parse_text(text, where), "")


def load(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a text file") from None
    return parse(text, str(path))


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster


def _event(loader: Any) -> None:
    loader.get_event()


def _compose(loader: Any) -> yaml.Node:
    """The next whole node, built from events (works with libyaml's loader, which has no per-node composer)."""
    ev = loader.get_event()
    if isinstance(ev, yaml.ScalarEvent):
        tag = ev.tag if ev.tag not in (None, "!") else loader.resolve(yaml.ScalarNode, ev.value, ev.implicit)
        return yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, style=ev.style)  # type: ignore[arg-type]
    if isinstance(ev, yaml.SequenceStartEvent):
        items = []
        while not loader.check_event(yaml.SequenceEndEvent):
            items.append(_compose(loader))
        end = loader.get_event()
        tag = ev.tag if ev.tag not in (None, "!") else loader.resolve(yaml.SequenceNode, None, ev.implicit)
        return yaml.SequenceNode(tag, items, ev.start_mark, end.end_mark,  # type: ignore[arg-type]
                                 flow_style=ev.flow_style)
    if isinstance(ev, yaml.MappingStartEvent):
        pairs = []
        while not loader.check_event(yaml.MappingEndEvent):
            key = _compose(loader)
            pairs.append((key, _compose(loader)))
        end = loader.get_event()
        tag = ev.tag if ev.tag not in (None, "!") else loader.resolve(yaml.MappingNode, None, ev.implicit)
        return yaml.MappingNode(tag, pairs, ev.start_mark, end.end_mark,  # type: ignore[arg-type]
                                flow_style=ev.flow_style)
    if isinstance(ev, yaml.AliasEvent):
        raise yaml.MarkedYAMLError(None, None, "anchors and aliases are not supported in scenarios",
                                   ev.start_mark)  # type: ignore[arg-type]
    raise yaml.YAMLError(f"unexpected {type(ev).__name__}")


@dataclass
class Stream:
    """A scenario read step by step (constant memory however long it is): the header first, then :attr:`steps`."""

    header: Scenario
    steps: Iterator[Step]


def stream(path: str | Path) -> Stream:
    """Open a scenario for step-by-step reading. The header fields (``scenario``, ``name``, ``kernel``, ``profile``)
    must come before ``steps``; the steps are parsed as they are consumed, and errors name the line as usual."""
    where = str(path)
    try:
        f = open(path)  # noqa: SIM115 - closed when the step iterator ends
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    try:
        loader = _Loader(f)
        r = Reader(where, ERRORS)
        _event(loader)  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            raise ScenarioError(f"{where}:1: the file is empty")
        _event(loader)  # document start
        if not loader.check_event(yaml.MappingStartEvent):
            node = _convert(_compose(loader), loader)
            raise r.fail(node, "(top level)", f"expected a mapping, got {kind(node.value)}")
        _event(loader)
        header: dict[str, Node] = {}
        while not loader.check_event(yaml.MappingEndEvent):
            key = _compose(loader)
            name = str(key.value)
            if name == "steps":
                break
            header[name] = _convert(_compose(loader), loader)
        else:
            raise ScenarioError(f"{where}: steps: missing")
        root = Node(header, 1)
        if "scenario" not in header:
            raise r.fail(root, "scenario", f"missing before steps (the format version, {SCHEMA})")
        head = SCENARIO_HEADER.read(r, root, "")
        if not loader.check_event(yaml.SequenceStartEvent):
            node = _convert(_compose(loader), loader)
            raise r.fail(node, "steps", f"expected a list, got {kind(node.value)}")
        _event(loader)
    except yaml.MarkedYAMLError as e:
        f.close()
        line = (e.problem_mark.line + 1) if e.problem_mark else 0
        raise ScenarioError(f"{where}:{line}: not valid YAML: {e.problem}") from None
    except (yaml.YAMLError, ScenarioError) as e:
        f.close()
        if isinstance(e, ScenarioError):
            raise
        raise ScenarioError(f"{where}: not valid YAML: {e}") from None

    def steps() -> Iterator[Step]:
        i = 0
        try:
            while not loader.check_event(yaml.SequenceEndEvent):
                node = _convert(_compose(loader), loader)
                # The constructor caches every object it built for the document: drop them step by step.
                loader.constructed_objects.clear()
                loader.recursive_objects.clear()
                loader.state_generators = []
                yield read_step(r, node, i)
                i += 1
        except yaml.MarkedYAMLError as e:
            line = (e.problem_mark.line + 1) if e.problem_mark else 0
            raise ScenarioError(f"{where}:{line}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ScenarioError(f"{where}: not valid YAML: {e}") from None
        finally:
            f.close()

    return Stream(head, steps())
