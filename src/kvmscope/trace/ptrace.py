"""ptrace(2), waitpid and process_vm_readv through ctypes (x86_64 Linux), just what the recorder needs."""

from __future__ import annotations

import ctypes
import os

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_GETREGS = 12
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_DETACH = 17
PTRACE_EVENT_STOP = 128
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_SECCOMP = 7

OPTIONS = (PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE
           | PTRACE_O_TRACEEXEC | PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


class user_regs_struct(ctypes.Structure):
    """``struct user_regs_struct`` (arch/x86/include/asm/user_64.h)."""

    _fields_ = [(n, ctypes.c_ulong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _check(ret: int, what: str) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def traceme() -> None:
    _check(_libc.ptrace(PTRACE_TRACEME, 0, None, None), "ptrace(PTRACE_TRACEME)")


def setoptions(tid: int, options: int = OPTIONS) -> None:
    _check(_libc.ptrace(PTRACE_SETOPTIONS, tid, None, options), "ptrace(PTRACE_SETOPTIONS)")


def cont(tid: int, sig: int = 0) -> None:
    """PTRACE_CONT; a task that vanished meanwhile (ESRCH: killed, exited) is not an error."""
    if _libc.ptrace(PTRACE_CONT, tid, None, sig) == -1 and ctypes.get_errno() != 3:
        _check(-1, "ptrace(PTRACE_CONT)")


def syscall(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: resume and stop at this syscall's exit."""
    if _libc.ptrace(PTRACE_SYSCALL, tid, None, sig) == -1 and ctypes.get_errno() != 3:
        _check(-1, "ptrace(PTRACE_SYSCALL)")


def getregs(tid: int) -> user_regs_struct:
    regs = user_regs_struct()
    _check(_libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs)), "ptrace(PTRACE_GETREGS)")
    return regs


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong()
    _check(_libc.ptrace(PTRACE_GETEVENTMSG, tid, None, ctypes.byref(msg)), "ptrace(PTRACE_GETEVENTMSG)")
    return msg.value


def is_group_stop(tid: int) -> bool:
    """Whether a stop is a group-stop (no siginfo: PTRACE_GETSIGINFO fails with EINVAL), not a signal to deliver."""
    info = ctypes.create_string_buffer(128)  # siginfo_t
    return _libc.ptrace(PTRACE_GETSIGINFO, tid, None, info) == -1 and ctypes.get_errno() == 22


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` of ``pid`` (process_vm_readv); short or failed reads raise OSError."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = iovec(address, size)
    n = _check(_libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0),
               f"process_vm_readv({pid}, 0x{address:x}, {size})")
    if n != size:
        raise OSError(5, f"process_vm_readv({pid}, 0x{address:x}, {size}): read {n} bytes")
    return buf.raw


def seize(tid: int, options: int) -> None:
    """PTRACE_SEIZE: trace a running task without stopping it (``--attach``)."""
    _check(_libc.ptrace(PTRACE_SEIZE, tid, None, options), f"ptrace(PTRACE_SEIZE, {tid})")


def interrupt(tid: int) -> None:
    if _libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == -1 and ctypes.get_errno() != 3:
        _check(-1, "ptrace(PTRACE_INTERRUPT)")


def detach(tid: int, sig: int = 0) -> None:
    if _libc.ptrace(PTRACE_DETACH, tid, None, sig) == -1 and ctypes.get_errno() != 3:
        _check(-1, "ptrace(PTRACE_DETACH)")


def syscall_op(tid: int) -> int:
    """PTRACE_GET_SYSCALL_INFO's ``op`` at a syscall stop: PTRACE_SYSCALL_INFO_ENTRY or _EXIT."""
    info = ctypes.create_string_buffer(88)
    _check(_libc.ptrace(PTRACE_GET_SYSCALL_INFO, tid, ctypes.c_void_p(88), info), "ptrace(PTRACE_GET_SYSCALL_INFO)")
    return info.raw[0]
