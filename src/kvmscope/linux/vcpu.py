"""A vCPU file descriptor and its mmapped ``struct kvm_run``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..api import (
    CpuidEntry,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    MsrBatch,
    MsrItems,
    OtherExit,
    RdmsrExit,
    ShutdownExit,
    SystemEventExit,
    Vcpu,
    WrmsrExit,
    as_batch,
    check_flag,
    check_run_cr8,
    check_timeout,
    not_a_batch,
)
from ..errors import ClosedError, kvm_error
from ._cpuid import decode_cpuid, encode_cpuid
from ._ioctl import ioctl_buf, ioctl_int
from ._kick import KICK_SIGNAL, WATCHDOG, sigset_bytes
from .vcpu_state import SIGSET_BYTES, VcpuStateIoctls

if TYPE_CHECKING:
    from .vm import LinuxVm

_KVM_RUN = uapi.KVM_RUN
_KVM_GET_MSRS = uapi.KVM_GET_MSRS
_EXIT_IO = uapi.KVM_EXIT_IO
_EXIT_HLT = uapi.KVM_EXIT_HLT
_EXIT_INTR = uapi.KVM_EXIT_INTR
_IO_OUT = uapi.KVM_EXIT_IO_OUT
_KVM_SET_MSRS = uapi.KVM_SET_MSRS
_fcntl_ioctl = fcntl.ioctl


# struct kvm_run as this module reads it from the mapping: offsets and struct formats derived once, here, from the
# ctypes structs in uapi (checked against linux/kvm.h by tests/test_uapi.py), so that the layout has one source and the
# hot path reads plain module constants.
def _word(offset: int, size: int) -> int:
    """``offset`` as an index into the mapping cast to ``size``-byte words (the views need it aligned)."""
    if offset % size:
        raise ImportError(f"kvm_run offset {offset} is not {size}-byte aligned")
    return offset // size


def _fields(cls: type[ctypes.Structure], *names: str) -> struct.Struct:
    return struct.Struct(uapi.struct_format(cls, *names))


_EXIT = uapi.KVM_RUN_EXIT_OFFSET  # the exit-reason union, where each exit's members start
_REASON = _word(uapi.KVM_RUN_EXIT_REASON_OFFSET, 4)  # kvm_run.exit_reason as an index of 32-bit words
_IO_PORT = _word(_EXIT + uapi.kvm_run_io.port.offset, 2)  # kvm_run.io.port as an index of 16-bit words
_IO = _fields(uapi.kvm_run_io, "direction", "size", "port", "count", "data_offset")
_IO_DATA_OFFSET = _fields(uapi.kvm_run_io, "data_offset")
# run() reads exit_reason and the io members in one unpack, from exit_reason to the end of kvm_run.io (the bytes
# between are skipped): one C call per exit instead of an index of the u32 view and then an unpack.
_REASON_AT = uapi.KVM_RUN_EXIT_REASON_OFFSET
_REASON_IO = struct.Struct(
    f"<{uapi.field_code(uapi.kvm_run, 'exit_reason')}{_EXIT - _REASON_AT - 4}x{_IO.format.lstrip('<=')}")
_unpack_reason_io = _REASON_IO.unpack_from  # bound once: run() calls it on every exit
_new_tuple = tuple.__new__  # exits are tuples: run() builds an IoExit with no Python-level __init__
_MMIO = _fields(uapi.kvm_run_mmio, "phys_addr", "data", "len", "is_write")
_FAIL = _fields(uapi.kvm_run_fail_entry, "hardware_entry_failure_reason", "cpu")
_INTERNAL = _fields(uapi.kvm_run_internal, "suberror", "ndata", "data")
_SYSTEM_EVENT = _fields(uapi.kvm_run_system_event, "type", "ndata", "data")
_MSR = _fields(uapi.kvm_run_msr, "error", "reason", "index", "data")
# The answer to a user-space MSR exit is written field by field: a format spanning the fields between would zero them.
_MSR_ERROR = struct.Struct("<" + uapi.field_code(uapi.kvm_run_msr, "error"))
_MSR_ERROR_AT = _EXIT + uapi.kvm_run_msr.error.offset
_MSR_DATA = struct.Struct("<" + uapi.field_code(uapi.kvm_run_msr, "data"))
_MSR_DATA_AT = _EXIT + uapi.kvm_run_msr.data.offset

_IMMEDIATE_EXIT = uapi.KVM_RUN_IMMEDIATE_EXIT_OFFSET
_RUN_CR8 = struct.Struct("<" + uapi.field_code(uapi.kvm_run, "cr8"))
_RUN_CR8_AT = uapi.kvm_run.cr8.offset
_REQUEST_IRQ_WINDOW = uapi.kvm_run.request_interrupt_window.offset
_READY_IF_FLAGS = _fields(  # each from the start of kvm_run (the bytes before skipped)
    uapi.kvm_run, "ready_for_interrupt_injection", "if_flag", "flags")
_RUN_APIC_BASE = _fields(uapi.kvm_run, "apic_base")
_HLT = HltExit()
_SHUTDOWN = ShutdownExit()
_IRQ_WINDOW_OPEN = IrqWindowOpenExit()
_INTERRUPTED = InterruptedExit()
_CLOSED = "this vCPU is closed"

# kvm_run is mapped with libc's mmap, not Python's: mmap.mmap dups the fd it maps (until 3.13's trackfd=False), which
# costs every vCPU a second fd, and a process at its fd limit then fails after KVM_CREATE_VCPU, with the vCPU made.
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _mapping_type(size: int) -> type[ctypes.Array[ctypes.c_char]]:
    """A ``c_char`` array of ``size`` that unmaps itself when it goes: when the vCPU is closed and the last view of
    it is gone, never under one (a view holds the array). A ``__del__``, not ``weakref.finalize``, which costs every
    VM start about 1 us more. Unmapping under a daemon thread still in KVM_RUN at exit is harmless: the kernel
    writes kvm_run through its own mapping, and the thread runs no Python after the interpreter's finalization
    begins."""

    unmap, addressof = _munmap, ctypes.addressof  # held here: module globals may be gone when the last one goes

    def __del__(self: ctypes.Array[ctypes.c_char]) -> None:
        unmap(addressof(self), size)

    mapping: type[ctypes.Array[ctypes.c_char]] = type("KvmRunMapping", (ctypes.c_char * size,),
                                                      {"__del__": __del__, "__slots__": ()})
    return mapping


def map_kvm_run(fd: int, size: int) -> Any:
    """``struct kvm_run`` of vCPU ``fd``, mapped shared, as a ``c_char`` array over the mapping (slices are bytes),
    unmapped when the array goes (``_mapping_type``)."""
    addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        raise kvm_error(ctypes.get_errno(), "mmap(kvm_run)")
    return _mapping_type(size).from_address(addr)


class LinuxVcpu(VcpuStateIoctls, Vcpu):
    """A vCPU created by KVM_CREATE_VCPU. The save/restore, injection and debugging ioctls are in
    :class:`~kvmscope.linux.vcpu_state.VcpuStateIoctls`."""

    def __init__(self, vm: LinuxVm, fd: int, vcpu_id: int, kvm_run: Any) -> None:
        self._closed = True  # until made: a half-made vCPU has nothing for __del__ to close
        self.vm = vm  # a strong reference: the VM (its fd, its memory) lives as long as any of its vCPUs
        self._fd = fd
        self.id = vcpu_id
        # Reads that must give bytes slice the c_char array; ints and writes go through the views. close() swaps a
        # released view in for the array: a run() in another thread then raises ValueError, reported as ClosedError.
        self._run: Any = kvm_run
        self._view = memoryview(kvm_run).cast("B")
        self._u32 = self._view.cast("I")
        self._u16 = self._view.cast("H")
        self._closed = False

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    def close(self) -> None:
        if not self._closed:
            os.close(self._detach())

    def _detach(self) -> int:
        """Mark the vCPU closed and release its views of kvm_run; return its fd, for the caller to close."""
        self._closed = True
        fd, self._fd = self._fd, -1  # later ioctls fail with EBADF, reported as ClosedError
        for view in (self._u32, self._u16, self._view):
            try:  # noqa: SIM105 (no context manager made per view: VM start closes three)
                view.release()
            except BufferError:  # the caller holds a buffer of it: the mapping stays with it
                pass
        self._run = self._view  # drops the array: the page is unmapped when no view of it is left
        return fd

    def __del__(self) -> None:
        # Dropped, not closed: the fd goes to the VM, which closes it with its own. KVM keeps a vCPU as long as its VM,
        # and a caller may still use the fd by number (as benchmarks/run.py does).
        if not getattr(self, "_closed", True):
            self.vm.adopt_fd(self._detach())

    # -- KVM_RUN --
    @property
    def immediate_exit(self) -> bool:
        self._check_open()
        return bool(self._view[_IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._check_open()
        self._view[_IMMEDIATE_EXIT] = 1 if value else 0

    @property
    def run_cr8(self) -> int:
        self._check_open()
        return int(_RUN_CR8.unpack_from(self._view, _RUN_CR8_AT)[0])

    @run_cr8.setter
    def run_cr8(self, value: int) -> None:
        value = check_run_cr8(value)
        self._check_open()
        _RUN_CR8.pack_into(self._view, _RUN_CR8_AT, value)

    @property
    def request_interrupt_window(self) -> bool:
        self._check_open()
        return bool(self._view[_REQUEST_IRQ_WINDOW])

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        flag = check_flag("Vcpu.request_interrupt_window", value)
        self._check_open()
        self._view[_REQUEST_IRQ_WINDOW] = flag

    def _ready_if_flags(self) -> tuple[int, int, int]:
        self._check_open()
        return _READY_IF_FLAGS.unpack_from(self._view)

    @property
    def if_flag(self) -> bool:
        return bool(self._ready_if_flags()[1])

    @property
    def ready_for_interrupt_injection(self) -> bool:
        return bool(self._ready_if_flags()[0])

    @property
    def run_flags(self) -> int:
        return self._ready_if_flags()[2]

    @property
    def run_apic_base(self) -> int:
        self._check_open()
        return int(_RUN_APIC_BASE.unpack_from(self._view)[0])

    @property
    def kvm_run(self) -> memoryview:
        """The raw mmapped ``struct kvm_run`` (valid while the vCPU is open)."""
        self._check_open()
        return self._view

    def run(self, timeout: float | None = None) -> Exit:
        """KVM_RUN. Returns the exit, :class:`InterruptedExit` on EINTR (signal or ``immediate_exit``), or when
        ``timeout`` seconds pass first (see :meth:`_run_timed`). Closed here or in another thread: ClosedError."""
        if timeout is not None:
            return self._run_timed(check_timeout(timeout))
        try:
            _fcntl_ioctl(self._fd, _KVM_RUN)
        except OSError as e:
            return self._run_failed(e)
        except ValueError:  # fd -1: closed
            raise ClosedError(_CLOSED) from None
        try:  # no check per exit: a vCPU closed by another thread during KVM_RUN shows as a released view here
            run = self._run
            reason, direction, size, port, count, offset = _unpack_reason_io(run, _REASON_AT)
            if reason == _EXIT_IO and direction == _IO_OUT:  # an OUT is decoded here: saves a call per exit
                return _new_tuple(IoExit, (_IO_OUT, size, port, count, run[offset : offset + size * count], None))
            return self._decode(reason)
        except ValueError:
            if self._closed:
                raise ClosedError(_CLOSED) from None
            raise

    def _run_timed(self, timeout: float) -> Exit:
        """KVM_RUN kicked at ``timeout``: the watchdog thread sets ``immediate_exit`` and signals this thread, which
        holds the signal blocked outside KVM_RUN and lets KVM_RUN take it (KVM_SET_SIGNAL_MASK); see ``_kick``."""
        self._check_open()
        view, tid = self._view, threading.get_ident()

        def kick() -> None:
            with contextlib.suppress(ValueError):  # closed meanwhile: the signal still ends the run
                view[_IMMEDIATE_EXIT] = 1  # a kick before the entry: KVM_RUN returns at once
            signal.pthread_kill(tid, KICK_SIGNAL)

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [KICK_SIGNAL])
        try:
            mine = self._signal_mask  # the caller's KVM_SET_SIGNAL_MASK, else this thread's mask, minus the kick
            during = bytearray(mine if mine is not None else sigset_bytes(set(blocked), SIGSET_BYTES))
            during[(KICK_SIGNAL - 1) // 8] &= ~(1 << (KICK_SIGNAL - 1) % 8)
            self._set_kvm_sigmask(bytes(during))
            before = view[_IMMEDIATE_EXIT]
            token = WATCHDOG.arm(time.monotonic() + timeout, kick)
            try:
                return self.run()
            finally:
                if WATCHDOG.disarm(token):  # kicked: the signal is pending (blocked) on this thread
                    signal.sigtimedwait([KICK_SIGNAL], 0)
                    if not self._closed:
                        view[_IMMEDIATE_EXIT] = before
                if not self._closed:
                    self._set_kvm_sigmask(mine)
        finally:
            if KICK_SIGNAL not in blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [KICK_SIGNAL])

    def run_raw(self) -> int:
        """KVM_RUN for tight loops: returns ``kvm_run.exit_reason`` (KVM_EXIT_INTR on EINTR) and decodes nothing.
        The exit stays in ``kvm_run`` until the next run: read it with :attr:`io_port` or :meth:`last_exit`."""
        try:
            _fcntl_ioctl(self._fd, _KVM_RUN)
        except OSError as e:
            self._run_failed(e)
            return _EXIT_INTR
        except ValueError:  # fd -1: closed
            raise ClosedError(_CLOSED) from None
        try:
            return self._u32[_REASON]
        except ValueError:  # released by close() in another thread during KVM_RUN
            raise ClosedError(_CLOSED) from None

    def _run_failed(self, e: OSError) -> Exit:
        if e.errno != errno.EINTR:
            raise self._ioctl_error(e, "KVM_RUN") from None
        # KVM leaves exit_reason as it was when it did not enter (immediate_exit): record the interruption there, so
        # that last_exit() sees it; KVM overwrites the field at the next exit.
        try:
            self._u32[_REASON] = _EXIT_INTR
        except ValueError:  # closed by another thread during KVM_RUN
            raise ClosedError(_CLOSED) from None
        return _INTERRUPTED

    @property
    def io_port(self) -> int:
        """``kvm_run.io.port`` of the last exit (meaningful after a KVM_EXIT_IO)."""
        try:
            return self._u16[_IO_PORT]
        except ValueError:
            raise ClosedError(_CLOSED) from None

    def last_exit(self) -> Exit:
        """The last exit, decoded (after :meth:`run_raw`)."""
        self._check_open()
        return self._decode(self._u32[_REASON])

    def _decode(self, reason: int) -> Exit:
        if reason == _EXIT_IO:
            run = self._run
            direction, size, port, count, offset = _IO.unpack_from(run, _EXIT)
            if direction == _IO_OUT:
                return _new_tuple(IoExit, (direction, size, port, count, run[offset : offset + size * count], None))
            return _new_tuple(IoExit, (direction, size, port, count, b"", self._reply_io))  # an IN: as fast as an OUT
        if reason == _EXIT_HLT:
            return _HLT
        if reason == _EXIT_INTR:
            return _INTERRUPTED
        return self._decode_other(reason)

    def _reply_io(self, data: bytes) -> None:
        offset = _IO_DATA_OFFSET.unpack_from(self._view, _EXIT)[0]
        self._view[offset : offset + len(data)] = data

    def _reply_msr(self, error: int, value: int) -> None:
        _MSR_ERROR.pack_into(self._view, _MSR_ERROR_AT, error)
        _MSR_DATA.pack_into(self._view, _MSR_DATA_AT, value)

    def _decode_other(self, reason: int) -> Exit:
        run = self._run
        if reason == uapi.KVM_EXIT_MMIO:
            phys, data, length, is_write = _MMIO.unpack_from(run, _EXIT)
            return MmioExit(phys, data[:length], length, bool(is_write))
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == uapi.KVM_EXIT_IRQ_WINDOW_OPEN:
            return _IRQ_WINDOW_OPEN
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(*_FAIL.unpack_from(run, _EXIT))
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            sub, ndata, *data = _INTERNAL.unpack_from(run, _EXIT)
            return InternalErrorExit(sub, tuple(data[:ndata]))
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            etype, ndata, *data = _SYSTEM_EVENT.unpack_from(run, _EXIT)
            return SystemEventExit(etype, tuple(data[:ndata]))
        if reason in (uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_EXIT_X86_WRMSR):
            _error, msr_reason, index, data = _MSR.unpack_from(run, _EXIT)
            cls = RdmsrExit if reason == uapi.KVM_EXIT_X86_RDMSR else WrmsrExit
            return cls(index, data, msr_reason, self._reply_msr)
        if reason == uapi.KVM_EXIT_INTR:
            return _INTERRUPTED
        return OtherExit(reason)

    # -- registers --
    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        ioctl_buf(self.fd, uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        ioctl_buf(self.fd, uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_SREGS, sregs)

    # -- MSRs: the hot paths call fcntl.ioctl directly on the preallocated batch buffer --
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        """KVM_GET_MSRS: values land in ``batch``; returns how many entries the kernel read."""
        try:
            done: int = _fcntl_ioctl(self._fd, _KVM_GET_MSRS, batch.raw, True)
        except OSError as e:
            raise self._ioctl_error(e, "KVM_GET_MSRS") from None
        except AttributeError:  # not an MsrBatch (checked here: free when the batch is right)
            raise not_a_batch("get_msrs", batch) from None
        except ValueError:  # fd -1: closed
            raise ClosedError(_CLOSED) from None
        if strict and done != batch.nmsrs:  # the slot, not len(): this is the hot path
            raise self.short_read(batch, done)
        return done

    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        """KVM_SET_MSRS: returns how many entries the kernel wrote (it stops at the first refused one)."""
        try:  # a batch is used as it is: reading .raw is the type check (cheaper than type(entries) is MsrBatch)
            done: int = _fcntl_ioctl(self._fd, _KVM_SET_MSRS, entries.raw, True)  # type: ignore[union-attr]
        except AttributeError:  # a mapping or pairs: made into a batch
            return self.set_msrs(as_batch(entries), strict)
        except OSError as e:
            raise self._ioctl_error(e, "KVM_SET_MSRS") from None
        except ValueError:  # fd -1: closed
            raise ClosedError(_CLOSED) from None
        if strict and done != entries.nmsrs:  # type: ignore[union-attr]
            raise self.short_write(entries, done)  # type: ignore[arg-type]
        return done

    def _ioctl_error(self, e: OSError, name: str) -> Exception:
        if self._closed:
            return ClosedError(_CLOSED)
        return kvm_error(e.errno or 0, name)

    # -- CPUID --
    def get_cpuid(self, max_entries: int = uapi.KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        # The header says max_entries (any u32); the buffer holds at most KVM_MAX_CPUID_ENTRIES, all a vCPU can have
        # (kvm_vcpu_ioctl_set_cpuid2 refuses more, cpuid.c:562 in 6.12; get_cpuid2 copies cpuid_nent, cpuid.c:585).
        buf = encode_cpuid([], capacity=min(max_entries, uapi.KVM_MAX_CPUID_ENTRIES))
        struct.pack_into("<I", buf, 0, max_entries)
        ioctl_buf(self.fd, uapi.KVM_GET_CPUID2, buf)
        return decode_cpuid(buf, struct.unpack_from("<I", buf)[0])

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_CPUID2, encode_cpuid(list(entries)))

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, cap)
