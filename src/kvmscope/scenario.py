"""Scenario files: a VMM's sequence of vCPU-model operations on one VM (docs/scenarios.md).

YAML (safe loader) or JSON. Every problem is a :class:`ScenarioError` naming the file, the line and the field.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import msrs as M
from .api import CpuidEntry
from .errors import KvmscopeError, ScenarioError

SCHEMA = 1
REGISTERS = ("eax", "ebx", "ecx", "edx")
EXITS = ("HltExit", "IoExit", "MmioExit", "ShutdownExit", "InterruptedExit", "InternalErrorExit", "FailEntryExit",
         "SystemEventExit")
STEP_KINDS = ("create_vcpu", "set_cpuid", "set_msrs", "get_msrs", "get_cpuid", "run", "reset", "microcode_load",
              "destroy_vcpu", "hotplug", "disable_quirks", "ioctl")


# --- YAML with line numbers -------------------------------------------------------------------------------------------


class Node:
    """A parsed value with the line it came from (1-based)."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


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


@dataclass(frozen=True)
class CpuidEdit:
    function: int
    index: int
    register: str
    set_bits: int = 0
    clear_bits: int = 0


@dataclass
class Expect:
    """What a step should do; every field is optional."""

    accepted: bool | None = None
    count: int | None = None
    errno: int | None = None  # 0 for "no error"
    refused_msr: int | None = None
    values: dict[int, int] | None = None
    exit: str | None = None


@dataclass
class Step:
    kind: str
    line: int
    vcpu: int = 0
    msrs: list[tuple[int, int]] = field(default_factory=list)  # set_msrs; for get_msrs only the indices matter
    cpuid_from: str = "supported"  # supported | stored | entries | file
    cpuid_entries: list[CpuidEntry] = field(default_factory=list)
    cpuid_edits: list[CpuidEdit] = field(default_factory=list)
    revision: int = 0
    quirks: int = 0
    ioctl: str = ""
    expect: Expect | None = None
    label: str = ""


@dataclass
class Scenario:
    name: str
    description: str
    steps: list[Step]
    path: str
    kernel: str | None = None
    profile: str | None = None


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where
        self.base = Path(where).parent

    def fail(self, node: Node, field_: str, what: str) -> ScenarioError:
        return ScenarioError(f"{self.where}:{node.line}: {field_}: {what}")

    def mapping(self, node: Node, field_: str) -> dict[str, Node]:
        if not isinstance(node.value, dict):
            raise self.fail(node, field_, f"expected a mapping, got {_kind(node.value)}")
        return node.value

    def seq(self, node: Node, field_: str) -> list[Node]:
        if not isinstance(node.value, list):
            raise self.fail(node, field_, f"expected a list, got {_kind(node.value)}")
        return node.value

    def integer(self, node: Node, field_: str, bits: int = 64) -> int:
        v = node.value
        if isinstance(v, str):
            try:
                v = int(v.replace("_", ""), 0)
            except ValueError:
                raise self.fail(node, field_, f"expected an integer like 0x1f, got {node.value!r}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(node, field_, f"expected an integer, got {_kind(v)}")
        if not 0 <= v < 1 << bits:
            raise self.fail(node, field_, f"{v:#x} does not fit in {bits} bits unsigned")
        return v

    def string(self, node: Node, field_: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(node.value, str):
            raise self.fail(node, field_, f"expected a string, got {_kind(node.value)}")
        if choices and node.value not in choices:
            raise self.fail(node, field_, f"expected one of {', '.join(choices)}, got {node.value!r}")
        return node.value

    def msr(self, node: Node, field_: str) -> int:
        if isinstance(node.value, str):
            try:
                return M.index_of(node.value)
            except KvmscopeError as e:
                raise self.fail(node, field_, str(e)) from None
        return self.integer(node, field_, 32)

    def keys(self, d: dict[str, Node], node: Node, field_: str, allowed: tuple[str, ...]) -> None:
        for k, v in d.items():
            if k not in allowed:
                raise self.fail(v, f"{field_}.{k}", f"unknown field (expected {', '.join(allowed)})")

    def msr_values(self, node: Node, field_: str) -> list[tuple[int, int]]:
        if isinstance(node.value, dict):
            return [(self.msr(Node(k, v.line), f"{field_}.{k}"), self.integer(v, f"{field_}.{k}"))
                    for k, v in node.value.items()]
        out = []
        for i, item in enumerate(self.seq(node, field_)):
            pair = self.seq(item, f"{field_}[{i}]")
            if len(pair) != 2:
                raise self.fail(item, f"{field_}[{i}]", "expected [msr, value]")
            out.append((self.msr(pair[0], f"{field_}[{i}]"), self.integer(pair[1], f"{field_}[{i}]")))
        return out

    def cpuid_entry(self, node: Node, field_: str) -> CpuidEntry:
        d = self.mapping(node, field_)
        self.keys(d, node, field_, ("function", "index", "flags", *REGISTERS))
        if "function" not in d:
            raise self.fail(node, f"{field_}.function", "missing")
        return CpuidEntry(*(self.integer(d[k], f"{field_}.{k}", 32) if k in d else 0
                            for k in ("function", "index", "flags", *REGISTERS)))

    def expect(self, node: Node, kind: str) -> Expect:
        if isinstance(node.value, str):
            word = self.string(node, "expect", ("accepted", "refused", "ok"))
            return Expect(accepted=word in ("accepted", "ok"))
        d = self.mapping(node, "expect")
        self.keys(d, node, "expect", ("accepted", "count", "errno", "refused", "values", "exit"))
        e = Expect()
        if "accepted" in d:
            if not isinstance(d["accepted"].value, bool):
                raise self.fail(d["accepted"], "expect.accepted", "expected true or false")
            e.accepted = d["accepted"].value
        if "count" in d:
            e.count = self.integer(d["count"], "expect.count", 16)
        if "errno" in d:
            name = d["errno"].value
            if name in (0, "0", "ok", None):
                e.errno = 0
            elif isinstance(name, str) and hasattr(_errno, name):
                e.errno = getattr(_errno, name)
            else:
                raise self.fail(d["errno"], "expect.errno", f"expected an errno name such as EINVAL, got {name!r}")
        if "refused" in d:
            e.refused_msr = self.msr(d["refused"], "expect.refused")
            e.accepted = False
        if "values" in d:
            e.values = dict(self.msr_values(d["values"], "expect.values"))
        if "exit" in d:
            e.exit = self.string(d["exit"], "expect.exit", EXITS)
        return e

    def step(self, node: Node, i: int) -> Step:
        where = f"steps[{i}]"
        d = self.mapping(node, where)
        kinds = [k for k in d if k not in ("expect", "label")]
        if len(kinds) != 1:
            raise self.fail(node, where, f"a step has one action (one of {', '.join(STEP_KINDS)}), got {kinds}")
        kind = kinds[0]
        if kind not in STEP_KINDS:
            raise self.fail(d[kind], f"{where}.{kind}", f"unknown step (expected one of {', '.join(STEP_KINDS)})")
        body = d[kind]
        step = Step(kind, body.line)
        if "label" in d:
            step.label = self.string(d["label"], f"{where}.label")
        field_ = f"{where}.{kind}"
        # Short forms: `run: 0`, `create_vcpu: 1`, `microcode_load: 0x...` (vCPU 0).
        if not isinstance(body.value, dict):
            if kind in ("create_vcpu", "destroy_vcpu", "hotplug", "run", "get_cpuid", "reset"):
                step.vcpu = self.integer(body, field_, 32)
            elif kind == "microcode_load":
                step.revision = self.integer(body, field_)
            elif kind == "disable_quirks":
                step.quirks = self.integer(body, field_)
            else:
                raise self.fail(body, field_, f"expected a mapping, got {_kind(body.value)}")
        else:
            b = body.value
            allowed = {
                "create_vcpu": ("vcpu",), "destroy_vcpu": ("vcpu",), "hotplug": ("vcpu",), "run": ("vcpu",),
                "get_cpuid": ("vcpu",),
                "reset": ("vcpu",), "set_msrs": ("vcpu", "msrs"), "get_msrs": ("vcpu", "msrs"),
                "set_cpuid": ("vcpu", "from", "entries", "file", "edits"), "microcode_load": ("vcpu", "revision"),
                "disable_quirks": ("quirks",), "ioctl": ("vcpu", "name", "msrs", "entries", "returned", "errno"),
            }[kind]
            self.keys(b, body, field_, allowed)
            if "vcpu" in b:
                step.vcpu = self.integer(b["vcpu"], f"{field_}.vcpu", 32)
            if kind == "set_msrs" or (kind == "ioctl" and "msrs" in b):
                if "msrs" not in b:
                    raise self.fail(body, f"{field_}.msrs", "missing")
                step.msrs = self.msr_values(b["msrs"], f"{field_}.msrs")
            if kind == "get_msrs":
                if "msrs" not in b:
                    raise self.fail(body, f"{field_}.msrs", "missing")
                step.msrs = [(self.msr(m, f"{field_}.msrs[{j}]"), 0)
                             for j, m in enumerate(self.seq(b["msrs"], f"{field_}.msrs"))]
            if kind == "set_cpuid":
                self._cpuid(step, b, field_)
            if kind == "microcode_load":
                if "revision" not in b:
                    raise self.fail(body, f"{field_}.revision", "missing")
                step.revision = self.integer(b["revision"], f"{field_}.revision")
            if kind == "disable_quirks":
                step.quirks = self.integer(b.get("quirks", Node(0, body.line)), f"{field_}.quirks")
            if kind == "ioctl":
                self._ioctl(step, b, body, field_)
        if "expect" in d:
            step.expect = self.expect(d["expect"], kind)
        return step

    def _cpuid(self, step: Step, b: dict[str, Node], field_: str) -> None:
        if "entries" in b:
            step.cpuid_from = "entries"
            step.cpuid_entries = [self.cpuid_entry(e, f"{field_}.entries[{j}]")
                                  for j, e in enumerate(self.seq(b["entries"], f"{field_}.entries"))]
        elif "file" in b:
            step.cpuid_from = "entries"
            fname = self.string(b["file"], f"{field_}.file")
            path = self.base / fname
            try:
                data = parse_text(path.read_text(), str(path))
            except OSError as err:
                raise self.fail(b["file"], f"{field_}.file", f"cannot read {path}: {err.strerror}") from None
            inner = _Parser(str(path))
            step.cpuid_entries = [inner.cpuid_entry(e, f"entries[{j}]")
                                  for j, e in enumerate(inner.seq(data, "(top level)"))]
        elif "from" in b:
            step.cpuid_from = self.string(b["from"], f"{field_}.from", ("supported", "stored"))
        for j, edit in enumerate(self.seq(b["edits"], f"{field_}.edits") if "edits" in b else []):
            where = f"{field_}.edits[{j}]"
            ed = self.mapping(edit, where)
            self.keys(ed, edit, where, ("leaf", "register", "set_bits", "clear_bits"))
            for req in ("leaf", "register"):
                if req not in ed:
                    raise self.fail(edit, f"{where}.{req}", "missing")
            leaf = self.string(ed["leaf"], f"{where}.leaf")
            fn, _, idx = leaf.partition(".")
            try:
                key = (int(fn, 0), int(idx or "0", 0))
            except ValueError:
                raise self.fail(ed["leaf"], f"{where}.leaf", f"expected a leaf like 0x7.0, got {leaf!r}") from None
            bits = {}
            for name in ("set_bits", "clear_bits"):
                mask = 0
                for k, bit in enumerate(self.seq(ed[name], f"{where}.{name}") if name in ed else []):
                    mask |= 1 << self.integer(bit, f"{where}.{name}[{k}]", 5)
                bits[name] = mask
            step.cpuid_edits.append(CpuidEdit(key[0], key[1], self.string(ed["register"], f"{where}.register",
                                                                          REGISTERS), **bits))

    def _ioctl(self, step: Step, b: dict[str, Node], body: Node, field_: str) -> None:
        """A recorded ioctl of a real VMM: what it passed and what the kernel returned (the expectation)."""
        if "name" not in b:
            raise self.fail(body, f"{field_}.name", "missing")
        step.ioctl = self.string(b["name"], f"{field_}.name", ("KVM_SET_MSRS", "KVM_GET_MSRS", "KVM_SET_CPUID2",
                                                               "KVM_RUN", "KVM_CREATE_VCPU"))
        if step.ioctl == "KVM_SET_CPUID2":
            step.cpuid_from = "entries"
            step.cpuid_entries = [self.cpuid_entry(e, f"{field_}.entries[{j}]")
                                  for j, e in enumerate(self.seq(b.get("entries", Node([], body.line)),
                                                                 f"{field_}.entries"))]
        e = Expect()
        if "returned" in b:
            e.count = self.integer(b["returned"], f"{field_}.returned", 16)
            if step.ioctl in ("KVM_SET_CPUID2", "KVM_RUN", "KVM_CREATE_VCPU"):
                e.errno, e.count = 0, None
        if "errno" in b:
            e.errno = self.expect(Node({"errno": b["errno"]}, b["errno"].line), "ioctl").errno
        step.expect = e


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            type(None): "nothing"}.get(type(v), type(v).__name__)


def parse(text: str, where: str = "<scenario>") -> Scenario:
    root = parse_text(text, where)
    p = _Parser(where)
    d = p.mapping(root, "(top level)")
    p.keys(d, root, "(top level)", ("scenario", "name", "description", "kernel", "profile", "steps"))
    if "scenario" not in d:
        raise p.fail(root, "scenario", f"missing (the format version, {SCHEMA})")
    if d["scenario"].value != SCHEMA:
        raise p.fail(d["scenario"], "scenario", f"unsupported format version {d['scenario'].value!r} (expected "
                                                f"{SCHEMA})")
    if "steps" not in d:
        raise p.fail(root, "steps", "missing")
    steps = [p.step(s, i) for i, s in enumerate(p.seq(d["steps"], "steps"))]
    return Scenario(
        name=p.string(d["name"], "name") if "name" in d else Path(where).stem,
        description=p.string(d["description"], "description") if "description" in d else "",
        steps=steps,
        path=where,
        kernel=str(d["kernel"].value) if "kernel" in d else None,
        profile=p.string(d["profile"], "profile") if "profile" in d else None,
    )


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
        p = _Parser(where)
        _event(loader)  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            raise ScenarioError(f"{where}:1: the file is empty")
        _event(loader)  # document start
        if not loader.check_event(yaml.MappingStartEvent):
            node = _convert(_compose(loader), loader)
            raise p.fail(node, "(top level)", f"expected a mapping, got {_kind(node.value)}")
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
        p.keys(header, root, "(top level)", ("scenario", "name", "description", "kernel", "profile"))
        if "scenario" not in header:
            raise p.fail(root, "scenario", f"missing before steps (the format version, {SCHEMA})")
        if header["scenario"].value != SCHEMA:
            raise p.fail(header["scenario"], "scenario", f"unsupported format version {header['scenario'].value!r}")
        if not loader.check_event(yaml.SequenceStartEvent):
            node = _convert(_compose(loader), loader)
            raise p.fail(node, "steps", f"expected a list, got {_kind(node.value)}")
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
                yield p.step(node, i)
                i += 1
        except yaml.MarkedYAMLError as e:
            line = (e.problem_mark.line + 1) if e.problem_mark else 0
            raise ScenarioError(f"{where}:{line}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ScenarioError(f"{where}: not valid YAML: {e}") from None
        finally:
            f.close()

    head = Scenario(
        name=p.string(header["name"], "name") if "name" in header else Path(where).stem,
        description=p.string(header["description"], "description") if "description" in header else "",
        steps=[], path=where,
        kernel=str(header["kernel"].value) if "kernel" in header else None,
        profile=p.string(header["profile"], "profile") if "profile" in header else None,
    )
    return Stream(head, steps())
