"""One reader for kvmscope's input files, scenarios and host profiles: their shapes are tables of typed fields.

A record declares its fields as a table of :class:`Field` (key, type, required, default, short form); a
:class:`Reader` reads one file's parsed values against it. Values come as plain JSON data or as :class:`Node` trees
(values with the line they came from); every problem is an error naming the file, the line where known, and the field,
in the file kind's :class:`Style`.

>>> from kvmscope.errors import ProfileError
>>> point = Record(dict, [Field("x", Int(8), required=True), Field("y", Int(8), default=0)])
>>> point.read(Reader("p.json", Style(ProfileError, "{file}: field {field}: {what}")), {"x": "0x10"}, "")
{'x': 16, 'y': 0}
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from . import msrs as M
from .api import CpuidEntry
from .errors import KvmscopeError
from .errors import shown as shown  # re-exported: the readers' messages use it from here

T = TypeVar("T")
U = TypeVar("U")

REGISTERS = ("eax", "ebx", "ecx", "edx")


class Node:
    """A parsed value with the line it came from (1-based); a mapping's values and a list's items are Nodes too."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def unwrap(x: Any) -> tuple[Any, int | None]:
    """A value and its line (None for plain data)."""
    return (x.value, x.line) if isinstance(x, Node) else (x, None)


def plain(x: Any) -> Any:
    """The plain data under a Node tree."""
    value, _ = unwrap(x)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def located(x: Any, v: Any) -> Any:
    """``v`` with the line of ``x`` (plain when ``x`` is)."""
    return Node(v, x.line) if isinstance(x, Node) else v


def kind(v: Any) -> str:
    """What a value is, for messages."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else "infinity"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a fractional number", type(None): "nothing"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class Style:
    """How one kind of file words its errors: the error type, and the message with and without a line."""

    error: type[KvmscopeError]
    with_line: str  # fields: file, line, field, what
    without_line: str = ""

    def message(self, file: str, line: int | None, field: str, what: str) -> str:
        text = self.with_line if line is not None or not self.without_line else self.without_line
        return text.format(file=file, line=line, field=field, what=what)


class Reader:
    """Reads the values of one file; its errors name ``file`` (and ``base``, the folder that relative names in the
    file start from)."""

    def __init__(self, file: str, style: Style, base: Path | None = None) -> None:
        self.file = file
        self.style = style
        self.base = base if base is not None else Path(file).parent

    def fail(self, at: Any, field: str, what: str) -> KvmscopeError:
        """The error for ``field``, at the line of ``at`` (a Node; plain data has none)."""
        return self.style.error(self.style.message(self.file, unwrap(at)[1], field, what))


class Type(Generic[T]):
    """How to read one value. ``read`` returns it, or raises the reader's error naming ``path``."""

    def read(self, r: Reader, x: Any, path: str) -> T:
        raise NotImplementedError


class Int(Type[int]):
    """An unsigned integer of ``bits`` bits: a number, or a string in any Python base (``"0x1f"``, ``"31"``)."""

    def __init__(self, bits: int = 64, why: str = "") -> None:
        self.bits = bits
        self.limit = 1 << bits
        self.why = why  # why the field has that width, when it is not the C type's own

    def read(self, r: Reader, x: Any, path: str) -> int:
        v = x.value if type(x) is Node else x
        if type(v) is int and 0 <= v < self.limit:  # the common case first: profiles hold thousands
            return v
        if isinstance(v, str):
            try:
                if len(v) > 80:  # int() of a long text is slow, and no such number fits anyway
                    raise ValueError
                v = int(v.replace("_", ""), 0)
            except ValueError:
                raise r.fail(x, path, f"expected an integer like 0x1f or 31, got {shown(unwrap(x)[0])}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise r.fail(x, path, f"expected an integer, got {kind(v)}")
        if not 0 <= v < self.limit:
            number = f"{v:#x}" if v.bit_length() <= 128 else f"a {v.bit_length()}-bit number"
            raise r.fail(x, path, f"{number} does not fit in {self.bits} bits unsigned{self.why}")
        return v


U32 = Int(32)
U64 = Int()


class Str(Type[str]):
    """A string, one of ``choices`` when given."""

    def __init__(self, choices: Sequence[str] = ()) -> None:
        self.choices = tuple(choices)

    def read(self, r: Reader, x: Any, path: str) -> str:
        v = unwrap(x)[0]
        if not isinstance(v, str):
            raise r.fail(x, path, f"expected a string, got {kind(v)}")
        if self.choices and v not in self.choices:
            raise r.fail(x, path, f"expected one of {', '.join(self.choices)}, got {shown(v)}")
        return v


class Choice(Type[T]):
    """A word standing for a value: ``Choice({"ok": True, "refused": False})``."""

    def __init__(self, words: Mapping[str, T]) -> None:
        self.words = dict(words)
        self.word = Str(tuple(self.words))

    def read(self, r: Reader, x: Any, path: str) -> T:
        return self.words[self.word.read(r, x, path)]


class Raw(Type[Any]):
    """The value as it is (a Node where the file has lines), for readers that look further themselves."""

    def read(self, r: Reader, x: Any, path: str) -> Any:
        return x


class Text(Type[str]):
    """Any scalar, as text (``6.10`` read by YAML as a number gives ``"6.1"``, as ever)."""

    def read(self, r: Reader, x: Any, path: str) -> str:
        return str(plain(x))


class KernelVersion(Type[str]):
    """A kernel release as text (``"6.10"``, ``"6.12.118"``). A YAML number is refused: ``6.10`` unquoted is the
    float 6.1, which would silently choose the wrong kernel."""

    def read(self, r: Reader, x: Any, path: str) -> str:
        from .kernel.rulesets import parse_version

        v = unwrap(x)[0]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise r.fail(x, path, f"expected a kernel version such as \"6.18\", got {kind(v)}")
        if not isinstance(v, str):
            raise r.fail(x, path, f"kernel version {v!r} was read as a number (YAML reads 6.10 as 6.1): quote it, "
                                  f"e.g. \"6.10\"")
        try:
            parse_version(v)
        except KvmscopeError as e:
            raise r.fail(x, path, str(e)) from None
        return v


class Bool(Type[bool]):
    def read(self, r: Reader, x: Any, path: str) -> bool:
        v = unwrap(x)[0]
        if not isinstance(v, bool):
            raise r.fail(x, path, f"expected true or false, got {shown(v)}")
        return v


class AnyMapping(Type[dict[str, Any]]):
    """A mapping of anything, taken as it is (free-form metadata)."""

    def read(self, r: Reader, x: Any, path: str) -> dict[str, Any]:
        v = plain(x)
        if not isinstance(v, dict):
            raise r.fail(x, path, f"expected a mapping, got {kind(v)}")
        return v


class Nullable(Type["T | None"]):
    """``null`` or a value of ``inner``."""

    def __init__(self, inner: Type[T]) -> None:
        self.inner = inner

    def read(self, r: Reader, x: Any, path: str) -> T | None:
        return None if unwrap(x)[0] is None else self.inner.read(r, x, path)


class Convert(Type[U]):
    """A value of ``inner`` passed through ``fn`` (``Convert(ListOf(Int()), tuple)``)."""

    def __init__(self, inner: Type[T], fn: Callable[[T], U]) -> None:
        self.inner = inner
        self.fn = fn

    def read(self, r: Reader, x: Any, path: str) -> U:
        return self.fn(self.inner.read(r, x, path))


class ListOf(Type[list[T]]):
    """A list of ``item``; items are named ``path[i]``."""

    def __init__(self, item: Type[T]) -> None:
        self.item = item

    def read(self, r: Reader, x: Any, path: str) -> list[T]:
        v = unwrap(x)[0]
        if not isinstance(v, list):
            raise r.fail(x, path, f"expected a list, got {kind(v)}")
        return [self.item.read(r, item, f"{path}[{i}]") for i, item in enumerate(v)]


class MapOf(Type[dict[T, U]]):
    """A mapping whose keys are read as ``key`` and values as ``value``; both are named ``path.KEY``."""

    def __init__(self, key: Type[T], value: Type[U], what: str = "key") -> None:
        self.key = key
        self.value = value
        self.what = what  # what a key names, for the message about two spellings of one

    def read(self, r: Reader, x: Any, path: str) -> dict[T, U]:
        v, _ = unwrap(x)
        if not isinstance(v, dict):
            raise r.fail(x, path, f"expected a mapping, got {kind(v)}")
        out: dict[T, U] = {}
        spelled: dict[T, Any] = {}
        for k, item in v.items():
            where = f"{path}.{k}"
            # Keys keep their source text (`0xce`, not 206) and take their value's line.
            key = self.key.read(r, located(item, k), where)
            if key in spelled:  # two spellings of one key (PLATFORM_INFO, 0xce): a mapping would keep only the last
                same = f" ({key:#x})" if isinstance(key, int) else ""
                raise r.fail(item, where, f"{shown(spelled[key])} and {shown(k)} name the same {self.what}{same}; give it once")
            spelled[key] = k
            out[key] = self.value.read(r, item, where)
        return out


class Version(Type[int]):
    """A file format's version: exactly ``number``."""

    def __init__(self, number: int) -> None:
        self.number = number

    def read(self, r: Reader, x: Any, path: str) -> int:
        v = plain(x)
        if isinstance(v, str) and v.strip() == str(self.number):
            raise r.fail(x, path, f"expected the number {self.number}, got the text {shown(v)}")
        if isinstance(v, bool) or v != self.number:
            raise r.fail(x, path, f"unsupported format version {shown(v)} (expected {self.number})")
        return self.number


class Msr(Type[int]):
    """An MSR by name (``PLATFORM_INFO``, ``MSR_PLATFORM_INFO``, an alias) or by 32-bit index."""

    def read(self, r: Reader, x: Any, path: str) -> int:
        v = unwrap(x)[0]
        if isinstance(v, str):
            if len(v) > 64:
                raise r.fail(x, path, f"expected an MSR name or index, got {shown(v)}")
            try:
                return M.index_of(v)
            except KvmscopeError as e:
                raise r.fail(x, path, str(e)) from None
        return U32.read(r, x, path)


MSR = Msr()


class MsrValues(Type[list[tuple[int, int]]]):
    """MSR values in batch order: a mapping ``{MSR: value}`` or a list of ``[MSR, value]`` pairs."""

    def read(self, r: Reader, x: Any, path: str) -> list[tuple[int, int]]:
        v, _ = unwrap(x)
        if isinstance(v, dict):
            return list(MapOf(MSR, U64, "MSR").read(r, x, path).items())
        out = []
        for i, item in enumerate(ListOf(Raw()).read(r, x, path)):
            where = f"{path}[{i}]"
            pair = ListOf(Raw()).read(r, item, where)
            if len(pair) != 2:
                raise r.fail(item, where, "expected [msr, value]")
            out.append((MSR.read(r, pair[0], where), U64.read(r, pair[1], where)))
        return out


class Leaf(Type[tuple[int, int]]):
    """A CPUID leaf as ``"FUNCTION.INDEX"`` (``"0x7.0"``; ``"0x7"`` is index 0)."""

    def read(self, r: Reader, x: Any, path: str) -> tuple[int, int]:
        text = Str().read(r, x, path)
        fn, _, idx = text.partition(".")
        try:
            if len(text) > 40:
                raise ValueError
            function, index = int(fn, 0), int(idx or "0", 0)
        except ValueError:
            raise r.fail(x, path, f"expected a leaf like 0x7.0, got {shown(text)}") from None
        return U32.read(r, located(x, function), path), U32.read(r, located(x, index), path)


class Struct(Type[dict[str, Any]]):
    """Some fields of a ctypes structure of the kernel ABI (``kvm_regs``, ``kvm_sregs``): each an unsigned integer
    of its field's width, or a mapping for a nested structure; arrays and padding are not settable."""

    def __init__(self, struct: type[ctypes.Structure]) -> None:
        self.struct = struct
        self.fields: dict[str, Type[Any]] = {}
        for name, ctype, *_ in struct._fields_:
            if name == "padding" or issubclass(ctype, ctypes.Array):
                continue
            if issubclass(ctype, ctypes.Structure):
                self.fields[name] = Struct(ctype)
            else:
                self.fields[name] = Int(8 * ctypes.sizeof(ctype))

    def read(self, r: Reader, x: Any, path: str) -> dict[str, Any]:
        v, _ = unwrap(x)
        if not isinstance(v, dict):
            raise r.fail(x, path, f"expected a mapping, got {kind(v)}")
        out = {}
        for k, item in v.items():
            if k not in self.fields:
                raise r.fail(item, f"{path}.{k}", f"not a field of struct {self.struct.__name__} "
                                                  f"(expected {', '.join(self.fields)})")
            out[k] = self.fields[k].read(r, item, f"{path}.{k}")
        return out


ABSENT: Any = object()  # Field.default: pass nothing, leaving the record's own default


@dataclass(frozen=True)
class Field:
    """One entry of a record's table: the file's key, how to read it, and what happens when it is absent.

    A dotted key (``"vcpu.reset_regs"``) reads key ``reset_regs`` of the mapping under ``vcpu``. The value is passed to
    the record as ``attr`` (default: the key's last part; where two fields feed one attr, the first present wins and
    the other is not read); ``store=False`` only checks it. ``note`` is added to the "missing" message.
    """

    key: str
    type: Type[Any]
    required: bool = False
    default: Any = ABSENT
    attr: str = ""
    store: bool = True
    note: str = ""

    @property
    def name(self) -> str:
        return self.attr or self.key.rpartition(".")[2]


class Record(Type[T]):
    """A mapping read by a table of fields into ``make(**values)`` (a dataclass, or any callable).

    ``short``: the key of the field a bare value stands for (``run: 0`` is ``run: {vcpu: 0}``), or a Field of its own
    for a bare value read differently; ``strict``: unknown keys are an error (else ignored);
    ``finish(reader, node, path, values)``: cross-field defaults and checks before ``make``.
    """

    def __init__(self, make: Callable[..., T], fields: Iterable[Field], *, short: str | Field | None = None,
                 strict: bool = True,
                 finish: Callable[[Reader, Any, str, dict[str, Any]], None] | None = None) -> None:
        self.make = make
        self.fields = tuple(fields)
        self.short = next(f for f in self.fields if f.key == short) if isinstance(short, str) else short
        self.strict = strict
        self.finish = finish
        self.keys: dict[str, tuple[str, ...]] = {}  # top-level key -> its dotted sub-keys
        for f in self.fields:
            head, _, rest = f.key.partition(".")
            self.keys[head] = (*self.keys.get(head, ()), *((rest,) if rest else ()))
        # Per field: the mapping it sits in ("" for this one), its key there, and where its value goes.
        self.plan = [(f, *f.key.rpartition(".")[::2], f.name if f.store else "") for f in self.fields]
        if dataclasses.is_dataclass(make):
            attrs = {a.name for a in dataclasses.fields(make)}
            unknown = [f.name for f in self.fields if f.store and f.name not in attrs]
            if unknown:
                raise TypeError(f"{make.__name__} has no attribute for fields {unknown}")

    def read(self, r: Reader, x: Any, path: str, **given: Any) -> T:
        """Read ``x``; ``given`` are values from outside the mapping (its line, say), passed to ``make`` as well."""
        value = unwrap(x)[0]
        where = path or "(top level)"
        values = dict(given)
        if not isinstance(value, dict):
            if self.short is None:
                raise r.fail(x, where, f"expected a mapping, got {kind(value)}")
            values[self.short.name] = self.short.type.read(r, x, where)
            value = {}  # the other fields are absent
        elif self.strict:
            self._refuse_unknown(r, value, path)
        for f, head, key, name in self.plan:
            if name in values:
                continue
            container, at = (value, x) if not head else self._nested(r, value, x, path, head)
            if key in container:
                v = f.type.read(r, container[key], f"{path}.{f.key}" if path else f.key)
            elif f.required:
                raise r.fail(at, f"{path}.{f.key}" if path else f.key, f"missing ({f.note})" if f.note else "missing")
            elif f.default is not ABSENT:
                v = f.default
            else:
                continue
            if name:
                values[name] = v
        if self.finish is not None:
            self.finish(r, x, path, values)
        return self.make(**values)

    def _refuse_unknown(self, r: Reader, value: dict[str, Any], path: str) -> None:
        for k, v in value.items():
            if k not in self.keys:
                raise r.fail(v, f"{path or '(top level)'}.{k}", f"unknown field (expected {', '.join(self.keys)})")

    def _nested(self, r: Reader, value: dict[str, Any], x: Any, path: str, head: str) -> tuple[dict[str, Any], Any]:
        if head not in value:
            return {}, x
        sub = value[head]
        inner = unwrap(sub)[0]
        if not isinstance(inner, dict):
            raise r.fail(sub, f"{path}.{head}" if path else head, f"expected a mapping, got {kind(inner)}")
        if self.strict:
            for k, v in inner.items():
                if k not in self.keys[head]:
                    raise r.fail(v, f"{path}.{head}.{k}" if path else f"{head}.{k}",
                                 f"unknown field (expected {', '.join(self.keys[head])})")
        return inner, sub


CPUID_ENTRY: Record[CpuidEntry] = Record(CpuidEntry, [
    Field("function", Int(32), required=True),
    *(Field(k, Int(32)) for k in ("index", "flags", *REGISTERS)),
])
"""A ``struct kvm_cpuid_entry2``: ``function`` (required), ``index``, ``flags``, ``eax`` .. ``edx`` (default 0)."""
