"""What a backend is: System, Vm and Vcpu, the exit types, and the value types both backends share.

The ``linux`` backend (``kvmscope.linux``) implements these over the real ``/dev/kvm``; the ``model`` backend
(``kvmscope.model``) implements them in software. Raw methods mirror the kernel (``set_msrs`` returns the number of entries
processed); the strict helpers defined here once (``write_msrs``, ``read_msrs``, ...) raise typed errors on top.
"""

from __future__ import annotations

import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from . import argcheck, uapi
from . import msrs as _msrs
from .errors import ClosedError, InvalidTypeError, InvalidValueError, MsrReadError, MsrWriteError
from .memory import DEFAULT_NR_SLOTS, MemoryRegion, check_region, find_region

if TYPE_CHECKING:
    from .kernel.rulesets import Rule
    from .program import Program

# --- MSR batches ---------------------------------------------------------------------------------------------------------

_ENTRY = struct.Struct("<IIQ")
_HEADER = struct.Struct("<II")
# The batch is little-endian (x86); its typed views read native order, so they are used only on little-endian hosts.
LITTLE_ENDIAN = sys.byteorder == "little"

MsrSpec = int | str
MsrItems = Mapping[MsrSpec, int] | Iterable[tuple[MsrSpec, int]]


class MsrBatch:
    """A ``struct kvm_msrs`` in a preallocated buffer: what KVM_GET_MSRS and KVM_SET_MSRS take.

    Build it from MSRs (names or indices) for a read, or from ``(msr, value)`` pairs or a mapping for a write. The
    buffer is reused call after call; values read by ``get_msrs`` land in it. Any size can be built, so that a batch of
    256 or more can be sent to see the kernel refuse it (E2BIG).
    """

    # ``raw``, ``nmsrs``, ``words32``, ``words64`` and ``indices32`` are what the backends' hot paths read: plain slots
    # (a property would cost a call per ioctl). Treat them as read-only.
    __slots__ = ("raw", "nmsrs", "_view", "words32", "words64", "indices32")
    raw: bytearray  # the struct kvm_msrs (also :attr:`buffer`)
    nmsrs: int  # the number of entries
    words32: memoryview  # the buffer as native u32 words: entry i's index is word 2 + 4i
    words64: memoryview  # the buffer as native u64 words: entry i's data is word 2 + 2i
    indices32: memoryview  # the entries' indices as a strided view of ``words32`` (entry i's is item i)

    def __init__(self, entries: Iterable[MsrSpec | tuple[MsrSpec, int]] | Mapping[MsrSpec, int] = ()) -> None:
        items: list[tuple[int, int]] = []
        if isinstance(entries, (str, bytes, bytearray)) or not isinstance(entries, Iterable):
            raise argcheck.type_error("MsrBatch", "entries", "MSRs (names or indices), (msr, value) pairs or a mapping",
                                      entries)
        source: Iterable[Any] = entries.items() if isinstance(entries, Mapping) else entries
        for entry in source:
            if isinstance(entry, tuple):
                if len(entry) != 2:
                    raise InvalidValueError(f"an MSR entry is (msr, value), not {entry!r}")
                msr, value = entry
                items.append((_msrs.index_of(msr), _msrs.check_value(value, f"value for MSR {msr!r}")))
            else:
                items.append((_msrs.index_of(entry), 0))
        self.nmsrs = len(items)
        self.raw = bytearray(_HEADER.size + _ENTRY.size * len(items))
        _HEADER.pack_into(self.raw, 0, len(items), 0)
        for i, (index, value) in enumerate(items):
            _ENTRY.pack_into(self.raw, _HEADER.size + i * _ENTRY.size, index, 0, value)
        self._view = memoryview(self.raw)
        # Strided views of the indices and values (entry i: index at u32 word 2+4i, data at u64 word 2+2i), so that
        # a backend can take them all in one C-level call (in native byte order: see LITTLE_ENDIAN).
        self.words32 = self._view.cast("I")
        self.words64 = self._view.cast("Q")
        # made once: the model keys its plans by ``indices32.tobytes()``, and a slice per call costs a third of that
        self.indices32 = self.words32[2::4]

    @property
    def buffer(self) -> bytearray:
        """The ``struct kvm_msrs`` itself. Its contents may be changed in place; the buffer cannot be replaced (the
        backends keep views of it)."""
        return self.raw

    def __len__(self) -> int:
        return self.nmsrs

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not -self.nmsrs <= i < self.nmsrs:
            raise IndexError(f"batch entry {i} out of range (batch has {self.nmsrs})")
        index, _, value = _ENTRY.unpack_from(self.raw, _HEADER.size + (i % self.nmsrs) * _ENTRY.size)
        return index, value

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index, _, value in _ENTRY.iter_unpack(self._view[_HEADER.size :]):
            yield index, value

    def __repr__(self) -> str:
        inner = ", ".join(f"0x{i:x}: 0x{v:x}" for i, v in self)
        return f"MsrBatch({{{inner}}})"

    @property
    def indices(self) -> list[int]:
        return self.indices32.tolist() if LITTLE_ENDIAN else [i for i, _ in self]

    @property
    def values(self) -> list[int]:
        return self.words64[2::2].tolist() if LITTLE_ENDIAN else [v for _, v in self]

    def set_value(self, i: int, value: int) -> None:
        """Set entry ``i``'s value (checked to fit in 64 bits)."""
        if not 0 <= i < self.nmsrs:
            raise IndexError(f"batch entry {i} out of range (batch has {self.nmsrs})")
        _msrs.check_value(value)
        struct.pack_into("<Q", self.raw, _HEADER.size + i * _ENTRY.size + 8, value)

    def to_dict(self) -> dict[int, int]:
        return dict(self)


def as_batch(entries: MsrBatch | MsrItems) -> MsrBatch:
    return entries if isinstance(entries, MsrBatch) else MsrBatch(entries)


def not_a_batch(method: str, value: object) -> InvalidTypeError:
    """The error of a vCPU's batch ioctl ``method`` given something other than an :class:`MsrBatch` (raised from the
    except branch of the hot path, so that the check costs nothing when the batch is right)."""
    return argcheck.type_error(f"Vcpu.{method}", "batch", "a kvmscope.api.MsrBatch (read_msrs takes a list)", value)


# --- CPUID ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2`` (padding dropped)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def __post_init__(self) -> None:
        for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _msrs.U32_MAX:
                raise InvalidValueError(f"CPUID entry field {name} must be a 32-bit unsigned int, not {v!r}")

    @property
    def key(self) -> tuple[int, int]:
        return (self.function, self.index)

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}


def find_cpuid(entries: Sequence[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for (function, index), honouring KVM_CPUID_FLAG_SIGNIFCANT_INDEX as the kernel does."""
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def cpu_vendor_string(entries: Sequence[CpuidEntry]) -> str | None:
    """CPUID leaf 0's vendor string (EBX, EDX, ECX: ``"GenuineIntel"``), else None."""
    leaf0 = find_cpuid(entries, 0)
    if leaf0 is None:
        return None
    return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx)).decode("latin-1")


def cpu_vendor_of(entries: Sequence[CpuidEntry]) -> str | None:
    """``"intel"``/``"amd"`` (Hygon too: KVM treats it as AMD) from CPUID leaf 0's vendor string, else None."""
    text = cpu_vendor_string(entries)
    return None if text is None else _msrs.cpu_vendor(text)


# CPU vendors as reports name them (a guest cannot move between them: Hygon is its own, whatever KVM shares)
VENDOR_NAMES = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon", "CentaurHauls": "Centaur",
                "  Shanghai  ": "Zhaoxin"}


def cpu_vendor_name(entries: Sequence[CpuidEntry]) -> str | None:
    """The CPU vendor as reports name it (``"Intel"``; an unknown vendor string as it is), None without leaf 0."""
    text = cpu_vendor_string(entries)
    return None if text is None else VENDOR_NAMES.get(text, text)


# --- exits ----------------------------------------------------------------------------------------------------------------


class Exit(tuple[Any, ...]):
    """Why KVM_RUN returned. Subclasses carry the members of ``kvm_run`` for their exit reason.

    An exit is a read-only record built once per exit. It is a tuple underneath, so that ``run()`` builds it with one
    C-level call (``tuple.__new__``) instead of a Python ``__init__``: its fields are read-only attributes, in order
    (``__match_args__``), and then, for an exit that takes an answer, the reply hook. Exits compare equal only to exits
    of the same class with equal fields (never to plain tuples, the reply hook not compared), are always true, and are
    not hashable, as the dataclasses they replace.
    """

    __slots__ = ()
    reason: ClassVar[int] = -1
    _fields: ClassVar[tuple[str, ...]] = ()  # the public fields, in order (the reply hook, if any, comes after them)
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each field declared in the class body (annotations that are not ClassVar) a read-only C-level
        getter of its tuple item; fields of the parent class come first."""
        super().__init_subclass__(**kwargs)
        names = [n for n, a in vars(cls).get("__annotations__", {}).items() if not str(a).startswith("ClassVar")]
        fields = [*cls._fields, *(n for n in names if not n.startswith("_"))]
        for i, name in enumerate([*fields, *(n for n in names if n.startswith("_"))]):
            setattr(cls, name, _tuplegetter(i, f"Field {i} of the exit"))
        cls._fields = tuple(fields)
        setattr(cls, "__match_args__", cls._fields)  # noqa: B010 - mypy takes __match_args__ as final

    def __new__(cls) -> Exit:
        return _new_tuple(cls, ())

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle call __new__ with the items, as positional args
        return tuple(self)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __bool__(self) -> bool:  # a field-less exit is an empty tuple, which would be false
        return True

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False if isinstance(other, tuple) else NotImplemented  # False: tuple.__eq__ would compare items
        n = len(self._fields)
        return _tuple_getitem(self, slice(n)) == _tuple_getitem(other, slice(n))  # not the reply hook

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # as a dataclass with eq: exits are not dict keys

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


_new_tuple = tuple.__new__
_tuple_getitem = tuple.__getitem__


def _field(index: int, doc: str) -> Any:
    return property(itemgetter(index), doc=doc)


try:  # the C-level getter namedtuple uses; a property over itemgetter elsewhere (same behaviour, slower)
    from collections import _tuplegetter  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CPython has it since 3.8
    _tuplegetter = _field


class IoExit(Exit):
    """KVM_EXIT_IO: a port access. ``data`` holds what an OUT wrote; answer an IN with :meth:`reply`."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_IO
    direction: int
    size: int
    port: int
    count: int  # type: ignore[assignment]  # the field, not tuple.count (as in a namedtuple)
    data: bytes
    _reply: Callable[[bytes], None] | None

    def __new__(cls, direction: int, size: int, port: int, count: int, data: bytes,
                _reply: Callable[[bytes], None] | None = None) -> IoExit:
        return _new_tuple(cls, (direction, size, port, count, data, _reply))

    @property
    def is_out(self) -> bool:
        return self.direction == uapi.KVM_EXIT_IO_OUT

    def reply(self, data: bytes) -> None:
        """Give an IN its data (``size * count`` bytes) before the next run."""
        if self.is_out or self._reply is None:
            raise InvalidValueError("only an IN exit takes reply data")
        if len(data) != self.size * self.count:
            raise InvalidValueError(f"IN of {self.size}x{self.count} needs {self.size * self.count} bytes")
        self._reply(data)


class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no memslot backs."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_MMIO
    phys_addr: int
    data: bytes
    length: int
    is_write: bool

    def __new__(cls, phys_addr: int, data: bytes, length: int, is_write: bool) -> MmioExit:
        return _new_tuple(cls, (phys_addr, data, length, is_write))


class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT (no in-kernel local APIC)."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_HLT


class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: a triple fault."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_SHUTDOWN


class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: :attr:`Vcpu.request_interrupt_window` was set (no in-kernel PIC) and the guest can
    now take an interrupt from KVM_INTERRUPT (``ready_for_interrupt_injection``)."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_IRQ_WINDOW_OPEN


class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware (or vendor module) refused the VM entry."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_FAIL_ENTRY
    hardware_entry_failure_reason: int
    cpu: int

    def __new__(cls, hardware_entry_failure_reason: int, cpu: int) -> FailEntryExit:
        return _new_tuple(cls, (hardware_entry_failure_reason, cpu))


class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle something (e.g. emulation failure)."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_INTERNAL_ERROR
    suberror: int
    data: tuple[int, ...]

    def __new__(cls, suberror: int, data: tuple[int, ...]) -> InternalErrorExit:
        return _new_tuple(cls, (suberror, data))


class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset, crash, ..."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_SYSTEM_EVENT
    type: int
    data: tuple[int, ...]

    def __new__(cls, type: int, data: tuple[int, ...]) -> SystemEventExit:  # noqa: A002 - kvm_run's member name
        return _new_tuple(cls, (type, data))


class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: ``immediate_exit`` was set or a signal was pending. The vCPU did not (re)enter."""

    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_INTR


class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / WRMSR: a guest MSR access sent to userspace (KVM_CAP_X86_USER_SPACE_MSR)."""

    __slots__ = ()
    index: int  # type: ignore[assignment]  # the field, not tuple.index (as in a namedtuple)
    data: int
    msr_reason: int
    _reply: Callable[[int, int], None] | None

    def __new__(cls, index: int, data: int, msr_reason: int,
                _reply: Callable[[int, int], None] | None = None) -> MsrExit:
        return _new_tuple(cls, (index, data, msr_reason, _reply))

    def reply(self, value: int = 0) -> None:
        """Complete the access: for RDMSR, ``value`` is what the guest reads."""
        if self._reply is None:
            raise InvalidValueError("this exit cannot be answered")
        self._reply(0, _msrs.check_value(value))

    def inject_gp(self) -> None:
        """Complete the access with a #GP in the guest."""
        if self._reply is None:
            raise InvalidValueError("this exit cannot be answered")
        self._reply(1, self.data)


class RdmsrExit(MsrExit):
    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_X86_RDMSR


class WrmsrExit(MsrExit):
    __slots__ = ()
    reason: ClassVar[int] = uapi.KVM_EXIT_X86_WRMSR


class OtherExit(Exit):
    """Any exit reason kvmscope does not decode; ``exit_reason`` is the raw number."""

    __slots__ = ()
    exit_reason: int

    def __new__(cls, exit_reason: int) -> OtherExit:
        return _new_tuple(cls, (exit_reason,))

    @property
    def name(self) -> str:
        return f"Exit({self.exit_reason})"


# --- objects ----------------------------------------------------------------------------------------------------------------

_INTERFACES = ("System", "Vm", "Vcpu")


argcheck.TYPES.update(CpuidEntry=CpuidEntry, MsrBatch=MsrBatch)


class _Closable:
    _closed: bool = False
    _kind: ClassVar[str] = "object"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every class implementing System, Vm or Vcpu (a backend, or the interface's own concrete methods) gets the
        # same argument checks (argcheck): the backends cannot drift on what they take.
        super().__init_subclass__(**kwargs)
        api = next((c.__name__ for c in cls.__mro__ if c.__module__ == __name__ and c.__name__ in _INTERFACES), None)
        if api is not None:
            argcheck.install(cls, api)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"this {self._kind} is closed")

    def close(self) -> None:
        """Release the object (idempotent); using it afterwards raises :class:`ClosedError`."""
        self._closed = True

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_INFINITY = float("inf")  # not math.inf: importing math maps one more library, and VM creation walks every mapping


_RUN_CR8 = argcheck.field(uapi.kvm_run, "cr8")


def check_flag(where: str, value: object) -> bool:
    """A settable ``kvm_run`` flag: a bool (or 0 or 1), else :class:`InvalidTypeError`."""
    argcheck.flag(where, "value", value)
    return bool(value)


def check_run_cr8(value: object) -> int:
    """``run_cr8``'s value: an int ``kvm_run.cr8`` (a u64) holds, else :class:`InvalidTypeError` or
    :class:`InvalidValueError` (KVM_RUN itself refuses one above 15)."""
    _RUN_CR8("Vcpu.run_cr8", "value", value)
    assert isinstance(value, int)  # the check above raised otherwise
    return value


def check_timeout(timeout: object) -> float:
    """``run(timeout=...)``'s seconds: a finite int or float >= 0, else :class:`InvalidTypeError` (not a number) or
    :class:`InvalidValueError`."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidTypeError(f"Vcpu.run: timeout must be seconds as an int or float, not {type(timeout).__name__} "
                               f"{timeout!r}")
    if not 0 <= timeout < _INFINITY:  # NaN compares false
        raise InvalidValueError(f"Vcpu.run: timeout must be a finite number of seconds >= 0, not {timeout!r}")
    return float(timeout)


class Vcpu(_Closable, ABC):
    """A vCPU. Raw methods mirror the vCPU ioctls; strict helpers raise typed errors."""

    _kind = "vCPU"
    id: int

    # -- raw, one per ioctl --
    @abstractmethod
    def run(self, timeout: float | None = None) -> Exit:
        """KVM_RUN: enter the guest until the next exit. The returned exit describes that exit only.

        With ``timeout`` (seconds, an int or float >= 0) the run is kicked out of the guest at that deadline if it has
        not exited by then, and returns :class:`InterruptedExit`: the way out of a guest that never exits (``jmp $``).
        The vCPU keeps its state and can run again. Without it, nothing bounds the run (and it costs nothing extra)."""

    _last_exit: Exit | None = None

    def run_raw(self) -> int:
        """KVM_RUN returning only the exit reason (KVM_EXIT_INTR when interrupted), for tight loops; the exit's
        details are read with :attr:`io_port` or :meth:`last_exit` until the next run."""
        e = self._last_exit = self.run()
        return e.exit_reason if isinstance(e, OtherExit) else e.reason

    def last_exit(self) -> Exit:
        """The last exit of :meth:`run_raw`, decoded."""
        self._check_open()
        if self._last_exit is None:
            raise InvalidValueError("this vCPU has not run yet")
        return self._last_exit

    @property
    def io_port(self) -> int:
        """The port of the last exit (after a KVM_EXIT_IO from :meth:`run_raw`)."""
        e = self._last_exit
        return e.port if isinstance(e, IoExit) else 0

    @property
    @abstractmethod
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, KVM_RUN returns EINTR before entering the guest."""

    @immediate_exit.setter
    @abstractmethod
    def immediate_exit(self, value: bool) -> None: ...

    @property
    @abstractmethod
    def run_cr8(self) -> int:
        """``kvm_run.cr8``. Without an in-kernel LAPIC, KVM_RUN first loads it into CR8 (EINVAL above 15, before
        the entry), so a CR8 given by KVM_SET_SREGS lasts only until the next run; each KVM_RUN leaves the vCPU's CR8
        here as it returns, whatever its outcome (0 on a new vCPU). 6.12.118 x86.c:11157-11163, 9765-9771."""

    @run_cr8.setter
    @abstractmethod
    def run_cr8(self, value: int) -> None: ...

    @property
    @abstractmethod
    def request_interrupt_window(self) -> bool:
        """``kvm_run.request_interrupt_window``: without an in-kernel PIC, KVM_RUN returns
        :class:`IrqWindowOpenExit` once the guest can take an interrupt (6.12.118 x86.c:9758-9762, 10888-10894)."""

    @request_interrupt_window.setter
    @abstractmethod
    def request_interrupt_window(self, value: bool) -> None: ...

    # What each KVM_RUN leaves in kvm_run as it returns, whatever its outcome (post_kvm_run_save, 6.12.118
    # x86.c:9765-9781); all 0 on a vCPU that has not run.
    @property
    @abstractmethod
    def if_flag(self) -> bool:
        """``kvm_run.if_flag``: RFLAGS.IF when the last KVM_RUN returned."""

    @property
    @abstractmethod
    def ready_for_interrupt_injection(self) -> bool:
        """``kvm_run.ready_for_interrupt_injection`` from the last KVM_RUN: an in-kernel PIC, or interrupts allowed
        (IF set, no interrupt shadow), no KVM_INTERRUPT vector waiting, no exception, interrupt or NMI to reinject and
        no exception pending (6.12.118 x86.c:4715-4744; a pending NMI does not count)."""

    @property
    @abstractmethod
    def run_apic_base(self) -> int:
        """``kvm_run.apic_base``: the vCPU's APIC_BASE MSR when the last KVM_RUN returned."""

    @property
    @abstractmethod
    def run_flags(self) -> int:
        """``kvm_run.flags`` from the last KVM_RUN: ``KVM_RUN_X86_SMM`` (bit 0), ``KVM_RUN_X86_BUS_LOCK`` (bit 1),
        ``KVM_RUN_X86_GUEST_MODE`` (bit 2, from 6.11)."""

    @abstractmethod
    def get_regs(self) -> uapi.kvm_regs:
        """KVM_GET_REGS."""

    @abstractmethod
    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS."""

    @abstractmethod
    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS."""

    @abstractmethod
    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""

    @abstractmethod
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        """KVM_GET_MSRS: fill ``batch`` values in place; return the number of entries read (the kernel stops at the
        first failure). ``strict=True`` raises :class:`MsrReadError` on a short count instead."""

    @abstractmethod
    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        """KVM_SET_MSRS: return the number of entries written (the kernel stops at the first refused entry).
        ``strict=True`` raises :class:`MsrWriteError` naming the refused MSR instead."""

    @abstractmethod
    def get_cpuid(self, max_entries: int = uapi.KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        """KVM_GET_CPUID2 (E2BIG as :class:`KvmError` when ``max_entries`` is too small)."""

    @abstractmethod
    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (EINVAL / E2BIG as :class:`KvmError`)."""

    # -- the VMM's vCPU ioctls (save/restore, injection, debugging): one thin method each --
    @abstractmethod
    def get_fpu(self) -> uapi.kvm_fpu:
        """KVM_GET_FPU: the x87/SSE state in FXSAVE form."""

    @abstractmethod
    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        """KVM_SET_FPU."""

    @abstractmethod
    def get_lapic(self) -> uapi.kvm_lapic_state:
        """KVM_GET_LAPIC: the in-kernel local APIC's register page (EINVAL without an in-kernel irqchip)."""

    @abstractmethod
    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC (ENXIO without an in-kernel irqchip)."""

    @abstractmethod
    def get_xsave(self) -> uapi.kvm_xsave:
        """KVM_GET_XSAVE: the first 4096 bytes of the guest's XSAVE area."""

    @abstractmethod
    def set_xsave(self, xsave: uapi.kvm_xsave | bytes) -> None:
        """KVM_SET_XSAVE: 4096 bytes, or as many as KVM_CAP_XSAVE2 says (the kernel copies that many)."""

    @abstractmethod
    def get_xsave2(self, size: int) -> bytes:
        """KVM_GET_XSAVE2 into ``size`` bytes (``size``: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM, at least 4096)."""

    @abstractmethod
    def get_xcrs(self) -> uapi.kvm_xcrs:
        """KVM_GET_XCRS: the extended control registers (XCR0)."""

    @abstractmethod
    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        """KVM_SET_XCRS (EINVAL for a value CPUID does not allow)."""

    @abstractmethod
    def get_debugregs(self) -> uapi.kvm_debugregs:
        """KVM_GET_DEBUGREGS: DR0-3, DR6, DR7."""

    @abstractmethod
    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS (EINVAL for flags, or DR6/DR7 bits set above 32)."""

    @abstractmethod
    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS: pending and injected exceptions, interrupts, NMIs, SMIs, the interrupt shadow."""

    @abstractmethod
    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS (EINVAL for unknown flags or an inconsistent state)."""

    @abstractmethod
    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: a ``KVM_MP_STATE_*`` value."""

    @abstractmethod
    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (EINVAL for any state but RUNNABLE without an in-kernel LAPIC)."""

    @abstractmethod
    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: the vCPU's MCG_CAP (bank count in bits 7:0; EINVAL for 0 or more than 32 banks, or a
        capability KVM does not support). It decides which machine-check MSRs KVM_SET_MSRS takes later."""

    @abstractmethod
    def get_nested_state(self, size: int = 0x2000 + 128) -> bytes:
        """KVM_GET_NESTED_STATE into a buffer of ``size`` bytes; returns the state (its header's ``size`` bytes)."""

    @abstractmethod
    def set_nested_state(self, state: bytes) -> None:
        """KVM_SET_NESTED_STATE."""

    @abstractmethod
    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the vCPU's TSC frequency in kHz."""

    @abstractmethod
    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (EINVAL for another frequency without TSC scaling, KVM_CAP_TSC_CONTROL)."""

    @abstractmethod
    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest it was paused (EINVAL unless the guest enabled kvmclock)."""

    @abstractmethod
    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: ``KVM_GUESTDBG_*`` flags and up to 8 debug-register values."""

    @abstractmethod
    def translate(self, linear_address: int) -> uapi.kvm_translation:
        """KVM_TRANSLATE: a guest-linear address through the vCPU's current paging mode."""

    @abstractmethod
    def nmi(self) -> None:
        """KVM_NMI: queue an NMI."""

    @abstractmethod
    def smi(self) -> None:
        """KVM_SMI: queue an SMI (needs KVM_CAP_X86_SMM)."""

    @abstractmethod
    def interrupt(self, irq: int) -> None:
        """KVM_INTERRUPT: queue external interrupt ``irq`` (only without an in-kernel irqchip: ENXIO with one)."""

    @abstractmethod
    def set_signal_mask(self, sigset: bytes | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while in KVM_RUN (8 bytes on x86-64; None clears it)."""

    # -- strict helpers --
    def refusal_rule(self, index: int) -> Rule | None:
        """The rule behind the last refusal of ``index``, where the backend knows it (the live kernel does not)."""
        return None

    def short_write(self, batch: MsrBatch, done: int) -> MsrWriteError:
        """The error a strict KVM_SET_MSRS raises when the kernel stopped at entry ``done``."""
        index, value = batch[done]
        return MsrWriteError("KVM_SET_MSRS", index, _msrs.name_of(index), done, len(batch), value,
                             self.refusal_rule(index))

    def short_read(self, batch: MsrBatch, done: int) -> MsrReadError:
        """The error a strict KVM_GET_MSRS raises when the kernel stopped at entry ``done``."""
        index, _ = batch[done]
        return MsrReadError("KVM_GET_MSRS", index, _msrs.name_of(index), done, len(batch), None,
                            self.refusal_rule(index))

    def write_msrs(self, entries: MsrBatch | MsrItems) -> None:
        """Write a batch; raise :class:`MsrWriteError` naming the first refused MSR, its value and position."""
        self.set_msrs(entries, strict=True)

    def read_msrs(self, msrs: Iterable[MsrSpec]) -> dict[int, int]:
        """Read MSRs by name or index; raise :class:`MsrReadError` naming the first refused MSR."""
        batch = msrs if isinstance(msrs, MsrBatch) else MsrBatch(msrs)
        self.get_msrs(batch, strict=True)
        return batch.to_dict()

    def read_msr(self, msr: MsrSpec) -> int:
        """One MSR's value by name or index; raise :class:`MsrReadError` when KVM_GET_MSRS refuses it."""
        index = _msrs.index_of(msr)
        return self.read_msrs([index])[index]

    def try_read_msr(self, msr: MsrSpec) -> int | None:
        """One MSR's value by name or index, or None when KVM_GET_MSRS refuses it (the lenient :meth:`read_msr`)."""
        batch = MsrBatch([msr])
        return batch[0][1] if self.get_msrs(batch) == 1 else None

    def write_msr(self, msr: MsrSpec, value: int) -> None:
        """Write one MSR; raise :class:`MsrWriteError` when KVM_SET_MSRS refuses it."""
        self.write_msrs([(msr, value)])


@runtime_checkable
class ProgramRunner(Protocol):
    """A vCPU that runs a :class:`kvmscope.program.Program` by interpreting its operations instead of executing guest
    code (the model's vCPU). :func:`kvmscope.program.load_program` hands such a vCPU the program itself and every other
    one the program assembled into guest memory. Optional: test with ``isinstance(vcpu, ProgramRunner)``."""

    def attach_program(self, program: Program) -> None:
        """Run ``program`` from the next KVM_RUN on."""


class Vm(_Closable, ABC):
    """A VM: guest memory, vCPUs, VM-wide capabilities."""

    _kind = "VM"

    @abstractmethod
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU."""

    @abstractmethod
    def add_memory(self, guest_phys_addr: int, size: int, slot: int | None = None, flags: int = 0) -> int:
        """Back ``[guest_phys_addr, +size)`` with new host memory (KVM_SET_USER_MEMORY_REGION); return the slot."""

    regions: list[MemoryRegion]

    def has_memory(self, guest_phys_addr: int | None = None, length: int = 1) -> bool:
        """Whether the VM has guest memory: any region at all, or (given ``guest_phys_addr``) one region holding all of
        ``[guest_phys_addr, +length)``. Raises :class:`ClosedError` on a closed VM."""
        self._check_open()
        if guest_phys_addr is None:
            return bool(self.regions)
        return any(r.contains(guest_phys_addr, length) for r in self.regions)

    def _claim_slot(self, guest_phys_addr: int, size: int, slot: int | None, flags: int = 0) -> int:
        """Validate a new region as KVM_SET_USER_MEMORY_REGION would, before anything is mapped; return its slot."""
        self._check_open()
        if slot is None:
            slot = max((r.slot for r in self.regions), default=-1) + 1
        check_region(self.regions, guest_phys_addr, size, slot, flags, *self._memslot_limits())
        return slot

    _limits: tuple[int, int] | None = None

    def _memslot_limits(self) -> tuple[int, int]:
        """KVM_CAP_NR_MEMSLOTS and KVM_CAP_MULTI_ADDRESS_SPACE of this VM, asked once (they do not change)."""
        if self._limits is None:
            self._limits = (self.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) or DEFAULT_NR_SLOTS,
                            self.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE))
        return self._limits

    def memory(self, guest_phys_addr: int, length: int) -> memoryview:
        """A live view of guest memory inside one region (valid while the VM is open)."""
        return self._view(guest_phys_addr, length)

    def _view(self, guest_phys_addr: int, length: int) -> memoryview:
        # The arguments were checked by the public method that called this one (argcheck): no second check.
        self._check_open()
        r = find_region(self.regions, guest_phys_addr, length)
        off = guest_phys_addr - r.guest_phys_addr
        return memoryview(r.mem)[off : off + length]

    def read_memory(self, guest_phys_addr: int, length: int) -> bytes:
        """A copy of guest memory inside one region."""
        with self._view(guest_phys_addr, length) as view:
            return bytes(view)

    def write_memory(self, guest_phys_addr: int, data: bytes) -> None:
        """Write ``data`` to guest memory inside one region."""
        with self._view(guest_phys_addr, len(data)) as view:
            view[:] = data

    @abstractmethod
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM."""

    @abstractmethod
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: 0 when unsupported, else a capability-specific value (some answers differ
        from the system's, e.g. KVM_CAP_DISABLE_QUIRKS2)."""

    @abstractmethod
    def set_msr_filter(self, flags: int, ranges: Sequence[tuple[int, int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER: ``ranges`` of ``(flags, base, nmsrs, bitmap)``."""

    # -- the VMM's VM ioctls (interrupt controllers, timers, eventfds, clock, dirty log): one thin method each --
    @abstractmethod
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space for the real-mode TSS (Intel)."""

    @abstractmethod
    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map (Intel); EEXIST/EINVAL after vCPUs exist."""

    @abstractmethod
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: the in-kernel PIC pair, IOAPIC and local APICs (EEXIST twice, EINVAL after vCPUs)."""

    @abstractmethod
    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        """KVM_GET_IRQCHIP of ``KVM_IRQCHIP_PIC_MASTER``/``PIC_SLAVE``/``IOAPIC`` (ENXIO without an irqchip)."""

    @abstractmethod
    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP (``chip.chip_id`` says which)."""

    @abstractmethod
    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` to ``level``."""

    @abstractmethod
    def irq_line_status(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: as :meth:`irq_line`; returns the delivery status the kernel writes back."""

    @abstractmethod
    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (ENOENT without an irqchip, EEXIST twice)."""

    @abstractmethod
    def get_pit2(self) -> uapi.kvm_pit_state2:
        """KVM_GET_PIT2 (ENXIO without a PIT)."""

    @abstractmethod
    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        """KVM_SET_PIT2 (ENXIO without a PIT)."""

    @abstractmethod
    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: returns how many vCPUs took it (0: delivered nowhere; EPERM: no vCPU matched)."""

    @abstractmethod
    def set_gsi_routing(self, entries: Sequence[uapi.kvm_irq_routing_entry]) -> None:
        """KVM_SET_GSI_ROUTING: replace the GSI routing table (EINVAL without an irqchip)."""

    @abstractmethod
    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """KVM_IRQFD: signalling eventfd ``fd`` raises ``gsi`` (``KVM_IRQFD_FLAG_DEASSIGN`` removes it)."""

    @abstractmethod
    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int = 0, flags: int = 0) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` (MMIO, or a port with ``KVM_IOEVENTFD_FLAG_PIO``) signals ``fd``."""

    @abstractmethod
    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of memslot ``slot`` written since the last call (ENOENT unless the slot
        has ``KVM_MEM_LOG_DIRTY_PAGES``)."""

    @abstractmethod
    def get_clock(self) -> uapi.kvm_clock_data:
        """KVM_GET_CLOCK: the kvmclock value in nanoseconds (and flags saying what else is valid)."""

    @abstractmethod
    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""

    @abstractmethod
    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: writes to the zone are batched in the ring instead of exiting."""

    @abstractmethod
    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO."""

    @abstractmethod
    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM: the default frequency of new vCPUs."""

    @abstractmethod
    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the VM (needs KVM_CAP_VM_TSC_CONTROL)."""


class System(_Closable, ABC):
    """The KVM subsystem (``/dev/kvm``, or the model's stand-in)."""

    _kind = "KVM system"
    backend: ClassVar[str]

    @abstractmethod
    def api_version(self) -> int:
        """KVM_GET_API_VERSION (12 on every kernel since 2.6.22)."""

    @abstractmethod
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system: 0 when unsupported, else a capability-specific positive value."""

    @abstractmethod
    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM saves and restores (msrs_to_save, then emulated_msrs)."""

    @abstractmethod
    def get_msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs this KVM offers."""

    @abstractmethod
    def msr_list_raw(self, request: int, nmsrs: int) -> tuple[int, list[int]]:
        """An index-list ioctl (``request``: KVM_GET_MSR_INDEX_LIST or KVM_GET_MSR_FEATURE_INDEX_LIST) with a
        caller-chosen ``nmsrs``: return the count written back and the indices. Too small an ``nmsrs`` raises
        :class:`KvmError` E2BIG with the kernel's count in ``detail`` (``"kernel count N"``)."""

    @abstractmethod
    def get_feature_msrs(self, batch: MsrBatch) -> int:
        """System-level KVM_GET_MSRS of feature MSRs: fill ``batch``; return the number read."""

    @abstractmethod
    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID entries this KVM can give a vCPU."""

    @abstractmethod
    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID: the CPUID bits KVM emulates in software (not for a vCPU's CPUID as is)."""

    @abstractmethod
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: the size of a vCPU's ``struct kvm_run`` mapping."""

    @abstractmethod
    def create_vm(self) -> Vm:
        """KVM_CREATE_VM."""

    def describe(self) -> str:
        """A one-line description of what this system is (backend, kernel, profile)."""
        return self.backend

    @abstractmethod
    def host_info(self) -> dict[str, object]:
        """Kernel release, vendor module (vmx, svm, pvm) and the module parameters that shape the vCPU model."""

    def read_feature_msrs(self, msrs: Iterable[MsrSpec] | None = None) -> dict[int, int]:
        """The feature MSRs' values (all of them by default); raise :class:`MsrReadError` on a short count."""
        batch = MsrBatch(msrs if msrs is not None else self.get_msr_feature_index_list())
        done = self.get_feature_msrs(batch)
        if done != len(batch):
            index, _ = batch[done]
            raise MsrReadError("KVM_GET_MSRS (system)", index, _msrs.name_of(index), done, len(batch))
        return batch.to_dict()
