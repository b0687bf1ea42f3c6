"""Reading input files safely: every file kvmscope reads (scenarios, profiles, CPUID lists) comes through here.

A file must be a regular file (never a FIFO, a device or a directory: they would hang or never end), within a size
limit when it is read whole, and strict UTF-8. YAML is read event by event into :class:`~kvmscope.schema.Node` trees
by one composer with no aliases (no "billion laughs"), no tags beyond plain data, a nesting limit, a limit on the text
of one value and on the values under one entry; JSON with limits on integers and nesting. Every refusal is one line
naming the file, the line where known, and the limit or the expectation.

>>> from kvmscope.errors import ScenarioError
>>> yaml_document(TextSource("a: [1, 0x10, text]\\n"), "x.yaml", ScenarioError).value["a"].value[1].value
16
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, NoReturn, TextIO

import yaml

from .errors import KvmscopeError
from .schema import Node

MiB = 1 << 20
MAX_FILE = 16 * MiB
"""The largest file read whole: a profile, a CPUID list, a scenario for ``--json`` or ``--compare``."""
MAX_VALUE = MiB
"""The most text between two YAML events: one value (or one comment). Streaming memory is bounded by it."""
MAX_DEPTH = 64
"""The deepest nesting of lists and mappings (a scenario needs 6)."""
MAX_NODES = 200_000
"""The most values under one entry of a file (one step, one header field) or in one file read whole."""
MAX_INT_DIGITS = 80
"""The longest integer literal (a 64-bit value in binary with a prefix and separators fits)."""
MAX_KEY = 256
"""The longest mapping key (every key kvmscope reads is a word or a number)."""
MAX_SHOWN = 160

ErrorType = Callable[[str], KvmscopeError]

_SURROGATE = re.compile("[\ud800-\udfff]")
# What YAML 1.1 does not allow in a text (its printable set is tab, newlines and the rest of Unicode but controls).
_NOT_YAML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_TAG = "tag:yaml.org,2002:"
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def shown(path: str | os.PathLike[str]) -> str:
    """A path as it can be printed on one line: control characters escaped, an over-long name shortened."""
    raw = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], raw if isinstance(raw, str) else os.fsdecode(raw))
    return text if len(text) <= MAX_SHOWN else f"{text[:100]}...{text[-50:]} ({len(text)} characters)"


def _path(path: str | os.PathLike[str], error: ErrorType) -> str:
    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(p, str):
        raise error(f"{shown(path)}: expected a file name as text, got {type(path).__name__}")
    if "\0" in p:
        raise error(f"{shown(p)}: a file name cannot contain a NUL byte")
    return p


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], error: ErrorType, what: str = "") -> IO[bytes]:
    """Open a regular file for reading, without blocking (a FIFO or a device is refused before it is read)."""
    p = _path(path, error)
    label = f"{what} " if what else ""
    try:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):  # refused before opening: opening a device can have effects, a FIFO blocks
            raise error(f"{shown(p)}: cannot read {label}from {_not_regular(mode)}: expected a regular file")
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"{shown(p)}: cannot read {label}file: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode  # it may have been swapped since the stat
        if not stat.S_ISREG(mode):
            raise error(f"{shown(p)}: cannot read {label}from {_not_regular(mode)}: expected a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_kind(path: str | os.PathLike[str], error: ErrorType, what: str, directory: bool = False) -> None:
    """Before reading: ``path``, when it exists, is a regular file (or, with ``directory``, a directory); anything else
    is refused without being opened. A missing path is left to the reader, which says so."""
    p = _path(path, error)
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return
    if directory and not stat.S_ISDIR(mode):
        found = "a regular file" if stat.S_ISREG(mode) else _not_regular(mode)
        raise error(f"{shown(p)}: cannot read {what} from {found}: expected a directory")
    if not directory and not stat.S_ISREG(mode):
        raise error(f"{shown(p)}: cannot read {what} from {_not_regular(mode)}: expected a regular file")


def decode(data: bytes, where: str, error: ErrorType) -> str:
    """Strict UTF-8 (a UTF-8 byte-order mark is dropped); the line of the first bad byte is named."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(f"{where}:1: {name} text: expected UTF-8 (save the file as UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_bytes(path: str | os.PathLike[str], error: ErrorType, what: str = "", limit: int = MAX_FILE) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    with open_regular(path, error, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{shown(path)}: larger than {limit // MiB} MiB, the limit for a file read whole")
    return data


def read_text(path: str | os.PathLike[str], error: ErrorType, what: str = "", limit: int = MAX_FILE) -> str:
    """The whole text of a regular file of at most ``limit`` bytes, strict UTF-8."""
    return decode(read_bytes(path, error, what, limit), shown(path), error)


def check_output(path: str | os.PathLike[str], error: ErrorType) -> None:
    """Before any work: ``path`` can be written as a regular file (it is one, or its folder is writable)."""
    p = _path(path, error)
    if not p:
        raise error("cannot write '': expected a file name")
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise error(f"cannot write {shown(p)}: {shown(parent)} is not a writable directory") from None
        return
    except OSError as e:
        raise error(f"cannot write {shown(p)}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise error(f"cannot write {shown(p)}: it is {_not_regular(mode)}, expected a regular file")
    if not os.access(p, os.W_OK):
        raise error(f"cannot write {shown(p)}: permission denied")


def write_text(path: str | os.PathLike[str], text: str, error: ErrorType) -> None:
    """Write ``text`` to a regular file (created or replaced), refusing FIFOs and devices without blocking."""
    check_output(path, error)
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise error(f"cannot write {shown(p)}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"cannot write {shown(p)}: it is {_not_regular(mode)}, expected a regular file")
        os.set_blocking(fd, True)
        try:
            f.truncate(0)
            f.write(text.encode())
        except OSError as e:
            raise error(f"cannot write {shown(p)}: {e.strerror}") from None


class _Output(io.TextIOWrapper):
    """A text file whose failed writes are one line naming the file the user gave, not the temporary one."""

    target = ""
    error: ErrorType = KvmscopeError

    def write(self, s: str) -> int:
        try:
            return super().write(s)
        except OSError as e:
            raise self.error(f"cannot write {self.target}: {e.strerror}") from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            raise self.error(f"cannot write {self.target}: {e.strerror}") from None


@contextmanager
def replacing(path: str | os.PathLike[str], error: ErrorType) -> Iterator[TextIO]:
    """A text file written beside ``path`` that replaces it only when the block ends without an exception: a run that
    fails leaves an existing file as it was. ``path`` is checked first (:func:`check_output`); a symbolic link is
    followed, so its target is the file replaced."""
    check_output(path, error)
    target = os.path.realpath(_path(path, error))
    folder, name = os.path.split(target)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise error(f"cannot write {shown(path)}: {e.strerror}") from None
    try:
        out = _Output(os.fdopen(fd, "wb"), encoding="utf-8")
        out.target, out.error = shown(path), error
        try:
            yield out
            out.flush()  # here, not in close(): a failed write is then one line naming the file
        except BaseException:
            with contextlib.suppress(OSError):
                out.close()
            raise
        out.close()
        try:  # the mode a plain open() would have given it, or the one it had
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        try:
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except OSError as e:
            raise error(f"cannot write {shown(path)}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# --- YAML ---------------------------------------------------------------------------------------------------------------


class TextSource:
    """Text for the YAML loader, from a binary file (decoded incrementally, strict UTF-8) or a string, counting what
    was read since the last :meth:`mark`: more than ``MAX_VALUE`` between two events is refused, so memory stays
    bounded however large one value in the file is."""

    def __init__(self, source: IO[bytes] | str, where: str = "", error: ErrorType = KvmscopeError,
                 limit: int = MAX_VALUE) -> None:
        self.source = source
        self.where = where
        self.error = error
        self.limit = limit
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.offset = 0  # characters (a string) or bytes (a file) handed out so far
        self.lines = 0  # newlines handed out so far
        self.marked = 0
        self.marked_line = 1
        self.first = True

    def mark(self, line: int) -> None:
        """An event ended on ``line``: what follows is a new value."""
        self.marked, self.marked_line = self.offset, line

    def rewind(self) -> None:
        """Back to the start of the file (a second pass over it)."""
        if not isinstance(self.source, str):
            self.source.seek(0)
        self.decoder.reset()
        self.offset = self.lines = self.marked = 0
        self.marked_line, self.first = 1, True

    def read(self, size: int = 65536) -> str:
        size = max(1, min(size, 65536))
        if self.offset - self.marked > self.limit:
            raise self.error(f"{self.where}:{self.marked_line}: a value (or comment) after this line is longer than "
                             f"{self.limit // MiB} MiB, the limit for one value")
        if isinstance(self.source, str):
            text = self.source[self.offset:self.offset + size]
            self.offset += len(text)
        else:
            data = self.source.read(size)
            if self.first:
                self._check_start(data)
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.object: this chunk, after any bytes held back from the last one
                held = len(e.object) - len(data)
                at, line = self.offset - held + e.start, self.lines + e.object.count(b"\n", 0, e.start) + 1
                raise self.error(f"{self.where}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                 f"{at})") from None
            self.offset += len(data)
        bad = _NOT_YAML.search(text)
        if bad:
            line = self.lines + text.count("\n", 0, bad.start()) + 1
            raise self.error(f"{self.where}:{line}: the character U+{ord(bad.group()):04X} is not allowed in YAML text")
        self.lines += text.count("\n")
        if self.first:
            self.first = False
            text = text.removeprefix("\ufeff")
        return text

    def _check_start(self, data: bytes) -> None:
        for bom, name in _BOMS:
            if data.startswith(bom):
                raise self.error(f"{self.where}:1: {name} text: expected UTF-8 (save the file as UTF-8)")


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster
_BOOLS = yaml.constructor.SafeConstructor.bool_values


class Events:
    """The events of one YAML text, composed into :class:`Node` trees with the limits above. YAML's own errors are
    raised as they come (see :meth:`translate`)."""

    def __init__(self, source: TextSource, where: str, error: ErrorType) -> None:
        source.where, source.error = where, error
        self.source = source
        self.where = where
        self.error = error
        self.loader = _Loader(source)
        self.budget = MAX_NODES

    def close(self) -> None:
        self.loader.dispose()

    def fail(self, line: int, what: str) -> NoReturn:
        raise self.error(f"{self.where}:{line}: {what}")

    def translate(self, e: yaml.YAMLError) -> KvmscopeError:
        """YAML's error as ours, with its line."""
        if isinstance(e, yaml.MarkedYAMLError):
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else self.source.marked_line
            return self.error(f"{self.where}:{line}: not valid YAML: {e.problem or e.context}")
        return self.error(f"{self.where}: not valid YAML: {' '.join(str(e).split())}")

    def next(self) -> Any:
        ev = self.loader.get_event()
        self.source.mark(ev.end_mark.line + 1)
        return ev

    def peek(self, kind: type[yaml.Event]) -> bool:
        return bool(self.loader.check_event(kind))

    def start(self) -> bool:
        """Past the start of the one document; False when the text holds no document."""
        self.next()  # stream start
        if self.peek(yaml.StreamEndEvent):
            return False
        self.next()  # document start
        return True

    def finish(self) -> None:
        """The end of the document, and of the text: a second document is refused."""
        self.next()  # document end
        if not self.peek(yaml.StreamEndEvent):
            ev = self.next()
            self.fail(ev.start_mark.line + 1, "a second YAML document: expected one")
        self.next()

    def key(self) -> tuple[str, int]:
        """A mapping key: its source text and line."""
        ev = self.next()
        line = ev.start_mark.line + 1
        if not isinstance(ev, yaml.ScalarEvent):
            self.fail(line, "a key must be a plain value (text or a number)")
        if len(ev.value) > MAX_KEY:
            self.fail(line, f"a key of {len(ev.value):,} characters: the limit is {MAX_KEY}")
        self._check_text(ev.value, line)
        return str(ev.value), line

    def node(self, budget: int = MAX_NODES, depth: int = 0) -> Node:
        """The next whole value; ``budget``: how many values it may hold."""
        self.budget = budget
        return self._node(depth)

    def _node(self, depth: int) -> Node:
        self.budget -= 1
        ev = self.next()
        line = ev.start_mark.line + 1
        if self.budget < 0:
            self.fail(line, f"more than {MAX_NODES:,} values in one entry: the limit")
        if isinstance(ev, yaml.ScalarEvent):
            return Node(self._scalar(ev, line), line)
        if isinstance(ev, yaml.AliasEvent):
            self.fail(line, "anchors and aliases (*name) are not supported: write the value out")
        if depth >= MAX_DEPTH:
            self.fail(line, f"nested more than {MAX_DEPTH} levels deep: the limit")
        if isinstance(ev, yaml.SequenceStartEvent):
            self.check_tag(ev)
            items = []
            while not self.peek(yaml.SequenceEndEvent):
                items.append(self._node(depth + 1))
            self.next()
            return Node(items, line)
        if isinstance(ev, yaml.MappingStartEvent):
            self.check_tag(ev)
            out: dict[str, Node] = {}
            while not self.peek(yaml.MappingEndEvent):
                name, at = self.key()
                if name in out:
                    self.fail(at, f"duplicate key {name!r}: a key appears once in a mapping")
                out[name] = self._node(depth + 1)
            self.next()
            return Node(out, line)
        self.fail(line, f"unexpected {type(ev).__name__}")

    def check_tag(self, ev: Any) -> None:
        """A list or mapping has no tag but its own."""
        plain = _TAG + ("seq" if isinstance(ev, yaml.SequenceStartEvent) else "map")
        if ev.tag not in (None, "!", plain):
            self.fail(ev.start_mark.line + 1,
                      f"the tag {_short(ev.tag)} is not supported: plain values, lists and mappings only")

    def _check_text(self, text: str, line: int) -> None:
        bad = _SURROGATE.search(text)
        if bad:
            self.fail(line, f"a lone surrogate ({bad.group()!a}) is not valid Unicode text")

    def _scalar(self, ev: Any, line: int) -> Any:
        value: str = ev.value
        tag = ev.tag
        if tag in (None, "!"):
            tag = self.loader.resolve(yaml.ScalarNode, value, ev.implicit)
            if tag == _TAG + "timestamp":
                tag = _TAG + "str"  # a plain date is text here, never a datetime (2001-13-45 would not be one)
        if tag == _TAG + "str":
            self._check_text(value, line)
            return value
        if tag == _TAG + "null":
            if value not in ("", "~", "null", "Null", "NULL"):
                self.fail(line, f"expected null, got {value!r}")
            return None
        if tag == _TAG + "bool":
            if value.lower() not in _BOOLS:
                self.fail(line, f"expected true or false, got {value!r}")
            return _BOOLS[value.lower()]
        if tag in (_TAG + "int", _TAG + "float"):
            kind = tag[len(_TAG):]
            if len(value) > MAX_INT_DIGITS:
                self.fail(line, f"a number of {len(value):,} characters: the limit is {MAX_INT_DIGITS}")
            if ev.tag in (None, "!"):  # YAML 1.1's surprises in a plain scalar: 1:30 is 90, 010 is 8
                if ":" in value:
                    self.fail(line, f"{value!r} is a base-60 number in YAML 1.1; write it in decimal or hex")
                if _LEADING_ZERO.fullmatch(value):
                    digits = value.lstrip("+-0_") or "0"
                    self.fail(line, f"{value!r} is octal in YAML 1.1 (a leading 0): write {digits} for decimal, "
                                    f"0o{digits} for octal")
            node = yaml.ScalarNode(tag, value)
            try:
                return getattr(self.loader, f"construct_yaml_{kind}")(node)
            except (ValueError, TypeError, ArithmeticError, IndexError, yaml.YAMLError):
                self.fail(line, f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        self.fail(line, f"the tag {_short(tag)} is not supported: plain values, lists and mappings only")


_LEADING_ZERO = re.compile(r"[-+]?0[0-7_]+")


def _short(tag: str | None) -> str:
    return str(tag).replace(_TAG, "!!")


def yaml_document(source: TextSource, where: str, error: ErrorType) -> Node:
    """The one document of a YAML text, as a :class:`Node` tree (errors name ``where`` and the line)."""
    events = Events(source, where, error)
    try:
        if not events.start():
            events.fail(1, "the file is empty")
        node = events.node()
        events.finish()
        return node
    except yaml.YAMLError as e:
        raise events.translate(e) from None
    finally:
        events.close()


# --- JSON ---------------------------------------------------------------------------------------------------------------


def _json_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _JsonLimit(f"a number of {len(text):,} digits: the limit is {MAX_INT_DIGITS}")
    return int(text)


def _json_constant(text: str) -> Any:
    raise _JsonLimit(f"{text} is not a JSON number")


class _JsonLimit(ValueError):
    pass


def json_data(text: str, where: str, error: ErrorType, duplicates: bool = True) -> Any:
    """Parsed JSON, refusing what cannot be used: over-long integers, NaN, nesting beyond ``MAX_DEPTH``, lone
    surrogates, and (with ``duplicates``) a key twice in one object."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if duplicates and k in out:
                raise _JsonLimit(f"duplicate key {k!r}: a key appears once in an object")
            out[k] = v
        return out

    try:
        data = json.loads(text, parse_int=_json_int, parse_constant=_json_constant, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise error(f"{where}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except _JsonLimit as e:
        raise error(f"{where}: {e}") from None
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_DEPTH} levels deep: the limit") from None
    _check_json(data, where, error)
    return data


def _check_json(data: Any, where: str, error: ErrorType) -> None:
    todo = [(data, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            bad = _SURROGATE.search(value)
            if bad:
                raise error(f"{where}: a lone surrogate ({bad.group()!a}) is not valid Unicode text")
            continue
        if isinstance(value, (list, dict)) and depth >= MAX_DEPTH:
            raise error(f"{where}: nested more than {MAX_DEPTH} levels deep: the limit")
        if isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            long_key = next((k for k in value if len(k) > MAX_KEY), None)
            if long_key is not None:
                raise error(f"{where}: a key of {len(long_key):,} characters: the limit is {MAX_KEY}")
            todo.extend((k, depth + 1) for k in value)
            todo.extend((v, depth + 1) for v in value.values())
