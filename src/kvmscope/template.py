"""Firecracker's custom CPU template JSON (x86_64), read and written exactly.

The format (Firecracker ``docs/cpu_templates/cpu-templates.md`` and ``schema.json``; parsing in
``src/vmm/src/cpu_config/templates.rs``, ``templates_serde.rs``, ``x86_64/custom_cpu_template.rs``):

- top level: ``kvm_capabilities`` (strings: ``"N"`` adds capability N to the checks, ``"!N"`` removes it),
  ``cpuid_modifiers`` and ``msr_modifiers``; each defaults to ``[]``; any other key is an error;
- a CPUID modifier: ``leaf`` and ``subleaf`` (strings that must start with ``0x`` or ``0b``), ``flags`` (an integer,
  replaces the entry's KVM flags) and ``modifiers`` (``register`` one of eax/ebx/ecx/edx, ``bitmap`` of 32 bits);
- an MSR modifier: ``addr`` (as ``leaf``) and ``bitmap`` of 64 bits;
- a bitmap is read right to left: ``0``/``1`` fix a bit, ``x`` leaves it, ``_`` is skipped, a leading ``0b`` is
  optional, missing high bits mean ``x``, and a character once every bit is placed is an error ("too long"); it applies
  as ``new = (old & ~filter) | value``.

Firecracker refuses unknown keys only at the top level; kvmscope refuses them at every level, so a misspelled
``bitmap`` is an error rather than a modifier that silently does nothing. Errors are :class:`TemplateError`, one line
naming the file, the line, the field and (for bitmaps and numbers) the character.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import os
import re
import stat
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import inputs
from .errors import (
    KvmscopeError,
    shown,  # the scenario reader's: a value from a file can be megabytes long; errors stay one line
)

REGISTERS = ("eax", "ebx", "ecx", "edx")
MAX_BYTES = 4 << 20  # a template is a few KiB; Firecracker's whole-fleet dumps are well under this
U32_MAX = (1 << 32) - 1
# CPUID bits that name the host CPU the ioctl ran on, not the host: KVM_GET_SUPPORTED_CPUID reports the calling CPU's
# APIC IDs (leaf 1 EBX[31:24], the x2APIC ID in every subleaf of 0xB and 0x1F EDX), and a VMM sets them per vCPU.
# Dumps leave them unfixed, and host comparisons skip them.
PER_CPU_BITS: dict[tuple[int, str], int] = {(0x1, "ebx"): 0xFF000000, (0xB, "edx"): U32_MAX, (0x1F, "edx"): U32_MAX}


class TemplateError(KvmscopeError, ValueError):
    """A CPU template that cannot be used: names the file, line, field and what was expected."""


# --- bitmaps ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bitmap:
    """A ``width``-bit register filter: bits set in ``mask`` are fixed to the bits of ``value``; the rest pass through."""

    width: int
    mask: int
    value: int

    def __post_init__(self) -> None:
        limit = (1 << self.width) - 1
        if self.mask & ~limit or self.value & ~self.mask:
            raise ValueError(f"bitmap mask 0x{self.mask:x} / value 0x{self.value:x} do not fit {self.width} bits")

    def apply(self, old: int) -> int:
        """Firecracker's ``(old & ~filter) | value``."""
        return (old & ~self.mask) | self.value

    def matches(self, current: int) -> bool:
        """Masked equality: every fixed bit of the template holds in ``current``."""
        return (current & self.mask) == self.value

    def text(self) -> str:
        """Firecracker's serialisation: ``0b`` and every bit, most significant first, ``x`` where not fixed."""
        return "0b" + "".join(
            ("1" if self.value >> b & 1 else "0") if self.mask >> b & 1 else "x" for b in range(self.width - 1, -1, -1)
        )

    @classmethod
    def exact(cls, width: int, value: int) -> Bitmap:
        return cls(width, (1 << width) - 1, value)


def parse_bitmap(text: str, width: int) -> Bitmap:
    """A bitmap string as Firecracker reads it; ValueError says which character (1-based, left to right) is wrong."""
    body = text[2:] if text.startswith("0b") else text
    offset = len(text) - len(body)
    mask = value = 0
    bit = 0
    for pos in range(len(body) - 1, -1, -1):
        c = body[pos]
        if bit == width:  # Firecracker checks before looking at the character, so even a '_' here is too long
            raise ValueError(f"too long: character {offset + pos + 1} ({c!r}) is beyond the {width} bits of the register")
        if c == "_":
            continue
        if c == "1":
            value |= 1 << bit
            mask |= 1 << bit
        elif c == "0":
            mask |= 1 << bit
        elif c != "x":
            raise ValueError(f"character {offset + pos + 1} ({c!r}) is not 0, 1, x or _")
        bit += 1
    return Bitmap(width, mask, value)


_PREFIXED = {"0x": (16, re.compile(r"\+?[0-9a-fA-F]+")), "0b": (2, re.compile(r"\+?[01]+"))}


def parse_number(text: str, bits: int = 32) -> int:
    """A leaf, subleaf or MSR address as Firecracker reads it: ``0x`` or ``0b`` then digits (Rust's
    ``from_str_radix``, which also takes one leading ``+``), within ``bits`` bits."""
    prefix = text[:2]
    if prefix not in _PREFIXED:
        raise ValueError(f"{shown(text)} must start with 0x (hexadecimal) or 0b (binary)")
    radix, digits = _PREFIXED[prefix]
    body = text[2:]
    if not digits.fullmatch(body):
        allowed = "01" if radix == 2 else "0123456789abcdefABCDEF"
        bad = next((i for i, c in enumerate(body) if c not in allowed and not (c == "+" and i == 0)), None)
        where = f": character {bad + 3} ({body[bad]!r})" if bad is not None else ""
        raise ValueError(f"{shown(text)} is not a {'hexadecimal' if radix == 16 else 'binary'} number{where}")
    v = int(body.lstrip("+"), radix)
    if v >> bits:
        raise ValueError(f"{shown(text)} does not fit {bits} bits")
    return v


def parse_capability(text: str) -> tuple[int, bool]:
    """A ``kvm_capabilities`` string: ``"N"`` (add) or ``"!N"`` (remove), N a decimal u32. Returns (N, removed)."""
    removed = text.startswith("!")
    body = text[1:] if removed else text
    digits = body.lstrip("+").lstrip("0") or "0"  # int() of more than 4,300 digits raises, leading zeros too
    if not re.fullmatch(r"\+?[0-9]+", body) or len(digits) > 10 or int(digits) > U32_MAX:
        raise ValueError(f"{shown(text)} is not a capability: expected a decimal number, optionally after '!'")
    return int(digits), removed


# --- the template ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuidModifier:
    """One register of one CPUID leaf."""

    register: str
    bitmap: Bitmap


@dataclass(frozen=True)
class LeafModifier:
    leaf: int
    subleaf: int
    flags: int
    modifiers: tuple[CpuidModifier, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.leaf, self.subleaf)


@dataclass(frozen=True)
class MsrModifier:
    addr: int
    bitmap: Bitmap


@dataclass(frozen=True)
class Capability:
    number: int
    removed: bool = False

    def text(self) -> str:
        return f"!{self.number}" if self.removed else str(self.number)


@dataclass(frozen=True)
class Template:
    """A custom CPU template (x86_64)."""

    kvm_capabilities: tuple[Capability, ...] = ()
    cpuid_modifiers: tuple[LeafModifier, ...] = ()
    msr_modifiers: tuple[MsrModifier, ...] = ()
    path: str = field(default="<memory>", compare=False)

    def msr(self, addr: int) -> MsrModifier | None:
        """The last modifier of ``addr`` (Firecracker applies each in turn; the last one's fixed bits win)."""
        return next((m for m in reversed(self.msr_modifiers) if m.addr == addr), None)

    def overrides(self) -> list[str]:
        """Where a later modifier of the same MSR or CPUID register fixes bits an earlier one fixed otherwise: Firecracker
        accepts both and applies them in turn, so the earlier one's bits cannot hold (``template_apply`` reports them
        as "overridden" after the fact)."""
        fixed: dict[object, list[tuple[str, Bitmap]]] = {}
        for i, mm in enumerate(self.msr_modifiers):
            fixed.setdefault(mm.addr, []).append((f"msr_modifiers[{i}] (MSR 0x{mm.addr:x})", mm.bitmap))
        for i, m in enumerate(self.cpuid_modifiers):
            for j, r in enumerate(m.modifiers):
                where = f"cpuid_modifiers[{i}].modifiers[{j}] (CPUID 0x{m.leaf:x}.{m.subleaf} {r.register})"
                fixed.setdefault((m.leaf, m.subleaf, r.register), []).append((where, r.bitmap))
        out = []
        for entries in fixed.values():
            for k, (later, b) in enumerate(entries):
                for earlier, a in entries[:k]:
                    if bits := a.mask & b.mask & (a.value ^ b.value):
                        out.append(f"{later} overrides {earlier} at bits 0x{bits:x}")
        return out

    def to_json(self) -> dict[str, Any]:
        """The template as Firecracker serialises it (field order, ``0x`` numbers, full-width bitmaps)."""
        return {
            "kvm_capabilities": [c.text() for c in self.kvm_capabilities],
            "cpuid_modifiers": [
                {"leaf": f"0x{m.leaf:x}", "subleaf": f"0x{m.subleaf:x}", "flags": m.flags,
                 "modifiers": [{"register": r.register, "bitmap": r.bitmap.text()} for r in m.modifiers]}
                for m in self.cpuid_modifiers
            ],
            "msr_modifiers": [{"addr": f"0x{m.addr:x}", "bitmap": m.bitmap.text()} for m in self.msr_modifiers],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the template to ``path``; a FIFO, a device or a directory is refused (one line), never waited on."""
        from . import inputs  # here: reading a template needs none of it

        inputs.write_text(path, self.dumps(), TemplateError)


_scanstring: Any = json.decoder.scanstring  # type: ignore[attr-defined]  # the json module's scanner (C)

# --- JSON with lines -------------------------------------------------------------------------------------------------


@dataclass
class _Value:
    """A parsed JSON value and the line it starts on."""

    value: Any
    line: int


class _JsonReader:
    """Strict JSON (RFC 8259: no NaN, no trailing commas, duplicate keys refused) into values that know their line."""

    _WS = re.compile(r"[ \t\n\r]*")

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect_right(self.newlines, pos - 1) + 1

    def fail(self, pos: int, what: str) -> TemplateError:
        return TemplateError(f"{self.where}:{self.line(pos)}: not valid JSON: {what}")

    def skip(self, pos: int) -> int:
        m = self._WS.match(self.text, pos)
        return m.end() if m else pos

    def document(self) -> _Value:
        pos = self.skip(0)
        if pos == len(self.text):
            raise TemplateError(f"{self.where}:1: the file is empty")
        v, pos = self.value(pos, 0)
        pos = self.skip(pos)
        if pos != len(self.text):
            raise self.fail(pos, "extra data after the top-level value")
        return v

    def value(self, pos: int, depth: int) -> tuple[_Value, int]:
        if depth > 64:
            raise self.fail(pos, "nested more than 64 deep")
        t, line = self.text, self.line(pos)
        c = t[pos : pos + 1]
        if c == "{":
            return self.obj(pos + 1, line, depth)
        if c == "[":
            return self.array(pos + 1, line, depth)
        if c == '"':
            try:
                s, end = _scanstring(t, pos + 1, True)
            except json.JSONDecodeError as e:
                raise self.fail(e.pos, e.msg) from None
            return _Value(s, line), end
        for word, v in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, pos):
                return _Value(v, line), pos + len(word)
        m = json.scanner.NUMBER_RE.match(t, pos)
        if m and m.group(0):
            integer, frac, exp = m.groups()
            if len(m.group(0)) > inputs.MAX_INT_DIGITS:  # int() of thousands of digits raises (or takes quadratic time)
                raise self.fail(pos, f"a number of {len(m.group(0)):,} characters: the limit is {inputs.MAX_INT_DIGITS}")
            num: Any = float(m.group(0)) if frac or exp else int(integer)
            return _Value(num, line), m.end()
        raise self.fail(pos, f"expected a value, found {c!r}" if c else "unexpected end of file")

    def obj(self, pos: int, line: int, depth: int) -> tuple[_Value, int]:
        out: dict[str, _Value] = {}
        pos = self.skip(pos)
        if self.text.startswith("}", pos):
            return _Value(out, line), pos + 1
        while True:
            if not self.text.startswith('"', pos):
                raise self.fail(pos, "expected a key in double quotes")
            key, pos = self.value(pos, depth + 1)
            if key.value in out:
                raise TemplateError(f"{self.where}:{key.line}: duplicate key {shown(key.value)}")
            pos = self.skip(pos)
            if not self.text.startswith(":", pos):
                raise self.fail(pos, "expected ':' after a key")
            out[key.value], pos = self.value(self.skip(pos + 1), depth + 1)
            pos = self.skip(pos)
            if self.text.startswith("}", pos):
                return _Value(out, line), pos + 1
            if not self.text.startswith(",", pos):
                raise self.fail(pos, "expected ',' or '}'")
            pos = self.skip(pos + 1)

    def array(self, pos: int, line: int, depth: int) -> tuple[_Value, int]:
        out: list[_Value] = []
        pos = self.skip(pos)
        if self.text.startswith("]", pos):
            return _Value(out, line), pos + 1
        while True:
            item, pos = self.value(pos, depth + 1)
            out.append(item)
            pos = self.skip(pos)
            if self.text.startswith("]", pos):
                return _Value(out, line), pos + 1
            if not self.text.startswith(",", pos):
                raise self.fail(pos, "expected ',' or ']'")
            pos = self.skip(pos + 1)


# --- reading ---------------------------------------------------------------------------------------------------------


class _Fields:
    """Reads one JSON object's fields, refusing unknown ones; errors name the file, line and field path."""

    def __init__(self, where: str, v: _Value, path: str, known: Iterable[str]) -> None:
        self.where = where
        self.path = path
        if not isinstance(v.value, dict):
            raise self.error(v, path or "(top level)", f"expected an object, got {_kind(v.value)}")
        self.items: dict[str, _Value] = v.value
        self.line = v.line
        allowed = tuple(known)
        for k, item in self.items.items():
            if k not in allowed:
                raise self.error(item, self.sub(k), f"unknown field; expected one of {', '.join(allowed)}")

    def sub(self, key: str) -> str:
        key = key if len(key) <= 60 else shown(key)  # a 100,000-character unknown key is named, not echoed
        return f"{self.path}.{key}" if self.path else key

    def error(self, at: _Value, path: str, what: str) -> TemplateError:
        return TemplateError(f"{self.where}:{at.line}: field {path}: {what}")

    def get(self, key: str, required: bool = True) -> _Value | None:
        if key not in self.items:
            if required:
                raise TemplateError(f"{self.where}:{self.line}: field {self.sub(key)}: missing (required)")
            return None
        return self.items[key]

    def string(self, key: str) -> tuple[str, _Value]:
        v = self.get(key)
        assert v is not None
        if not isinstance(v.value, str):
            raise self.error(v, self.sub(key), f"expected a string, got {_kind(v.value)}")
        return v.value, v

    def convert(self, key: str, fn: Any) -> Any:
        text, v = self.string(key)
        try:
            return fn(text)
        except ValueError as e:
            raise self.error(v, self.sub(key), str(e)) from None

    def array(self, key: str) -> list[_Value]:
        v = self.get(key, required=False)
        if v is None:
            return []
        if not isinstance(v.value, list):
            raise self.error(v, self.sub(key), f"expected a list, got {_kind(v.value)}")
        return list(v.value)


def _json(v: Any) -> str:
    """A value as the file spells it in JSON (``true``, ``null``, ``1.5``, ``"text"``), shortened; a list or an object
    by its kind."""
    if isinstance(v, (dict, list)):
        return _kind(v)
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text):,} characters)"


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number with a fraction or exponent", type(None): "null"}.get(type(v), type(v).__name__)


def _leaf(where: str, v: _Value, path: str) -> LeafModifier:
    f = _Fields(where, v, path, ("leaf", "subleaf", "flags", "modifiers"))
    leaf = f.convert("leaf", parse_number)
    subleaf = f.convert("subleaf", parse_number)
    flags_v = f.get("flags")
    assert flags_v is not None
    if type(flags_v.value) is not int or not 0 <= flags_v.value <= U32_MAX:
        raise f.error(flags_v, f.sub("flags"), f"expected an integer from 0 to {U32_MAX}, got {_json(flags_v.value)}")
    f.get("modifiers")  # required: Firecracker has no default for it
    regs = []
    for i, item in enumerate(f.array("modifiers")):
        r = _Fields(where, item, f"{f.sub('modifiers')}[{i}]", ("register", "bitmap"))
        name, at = r.string("register")
        if name not in REGISTERS:
            raise r.error(at, r.sub("register"), f"{shown(name)} is not one of {', '.join(REGISTERS)}")
        regs.append(CpuidModifier(name, r.convert("bitmap", lambda s: parse_bitmap(s, 32))))
    return LeafModifier(leaf, subleaf, flags_v.value, tuple(regs))


def parse(text: str, where: str = "<template>") -> Template:
    """A template from JSON text; ``where`` names it in errors."""
    root = _Fields(where, _JsonReader(text, where).document(), "",
                   ("kvm_capabilities", "cpuid_modifiers", "msr_modifiers"))
    caps = []
    for i, item in enumerate(root.array("kvm_capabilities")):
        if not isinstance(item.value, str):
            raise root.error(item, f"kvm_capabilities[{i}]", f"expected a string like \"56\" or \"!56\", got "
                             f"{_kind(item.value)}")
        try:
            caps.append(Capability(*parse_capability(item.value)))
        except ValueError as e:
            raise root.error(item, f"kvm_capabilities[{i}]", str(e)) from None
    leaves = tuple(_leaf(where, item, f"cpuid_modifiers[{i}]") for i, item in enumerate(root.array("cpuid_modifiers")))
    msrs = []
    for i, item in enumerate(root.array("msr_modifiers")):
        m = _Fields(where, item, f"msr_modifiers[{i}]", ("addr", "bitmap"))
        msrs.append(MsrModifier(m.convert("addr", parse_number), m.convert("bitmap", lambda s: parse_bitmap(s, 64))))
    return Template(tuple(caps), leaves, tuple(msrs), where)


def read_text(path: str | Path, limit: int = MAX_BYTES) -> str:
    """A regular file's text, at most ``limit`` bytes (a FIFO or /dev/zero is refused, not read forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise TemplateError(f"{inputs.shown(path)}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TemplateError(f"{inputs.shown(path)}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TemplateError(f"{inputs.shown(path)}: larger than {limit} bytes; not a CPU template")
    try:
        return data.decode("utf-8")  # strictly: a byte-order mark is not JSON, to Firecracker either
    except UnicodeDecodeError:
        inputs.decode(data, inputs.shown(path), TemplateError)  # raises, naming the line, the byte and its offset
        raise


def load(path: str | Path) -> Template:
    """Read and check a template file."""
    return parse(read_text(path), inputs.shown(path))
