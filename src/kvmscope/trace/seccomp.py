"""A seccomp filter that hands ``ioctl`` calls of type KVMIO to the tracer and lets every other syscall run.

The filter is classic BPF over ``struct seccomp_data`` (include/uapi/linux/seccomp.h): ``nr`` at 0, ``arch`` at 4,
``args[i]`` at 16 + 8*i (little-endian, so the low 32 bits of ``args[1]``, the ioctl request, are at 24).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

# include/uapi/linux/filter.h, bpf_common.h
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_ALU_AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_SET_MODE_FILTER = 1
PR_SET_NO_NEW_PRIVS = 38
AUDIT_ARCH_X86_64 = 0xC000003E
NR_IOCTL = 16  # x86_64
NR_SECCOMP = 317  # x86_64
KVMIO = 0xAE


class sock_filter(ctypes.Structure):
    """``struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; };``"""

    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class sock_fprog(ctypes.Structure):
    """``struct sock_fprog { unsigned short len; struct sock_filter *filter; };``"""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter))]


def program(skip: Iterable[int] = ()) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k): TRACE for ioctl(fd, KVMIO request) except the ``skip`` requests."""
    skip = list(skip)
    n = len(skip)
    # Layout: 0 ld arch; 1 jeq x86_64; 2 ld nr; 3 jeq ioctl; 4 ld req; 5 and 0xff00; 6 jeq KVMIO<<8;
    # 7 ld req; 8..8+n-1 jeq skip[i] -> allow; 8+n ret TRACE; 9+n ret ALLOW.
    allow = 9 + n
    prog = [
        (BPF_LD_W_ABS, 0, 0, 4),
        (BPF_JEQ_K, 0, allow - 2, AUDIT_ARCH_X86_64),
        (BPF_LD_W_ABS, 0, 0, 0),
        (BPF_JEQ_K, 0, allow - 4, NR_IOCTL),
        (BPF_LD_W_ABS, 0, 0, 24),
        (BPF_ALU_AND_K, 0, 0, 0xFF00),
        (BPF_JEQ_K, 0, allow - 7, KVMIO << 8),
        (BPF_LD_W_ABS, 0, 0, 24),
    ]
    for i, req in enumerate(skip):
        at = 8 + i
        prog.append((BPF_JEQ_K, allow - at - 1, 0, req))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_TRACE))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return prog


def run_filter(prog: list[tuple[int, int, int, int]], nr: int, request: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    """Interpret ``prog`` on one syscall (for tests: what the kernel's BPF interpreter would return)."""
    data = struct.pack("<IIQ6Q", nr, arch, 0, 3, request, 0, 0, 0, 0)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == BPF_ALU_AND_K:
            acc &= k
        elif code == BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == BPF_RET_K:
            return k
        pc += 1


_libc = ctypes.CDLL(None, use_errno=True)  # loaded at import: a forked child must not dlopen (another thread may hold
# the loader's lock at fork time)


class Filter:
    """The filter built in memory ahead of time, so that the forked child only makes two system calls."""

    def __init__(self, skip: Iterable[int] = ()) -> None:
        prog = program(skip)
        self.array = (sock_filter * len(prog))(*(sock_filter(*ins) for ins in prog))
        self.fprog = sock_fprog(len(prog), self.array)


def install(skip: Iterable[int] | Filter = ()) -> None:
    """Install the filter on the calling thread (and what it execs). Raises OSError on failure."""
    built = skip if isinstance(skip, Filter) else Filter(skip)
    fprog, libc = built.fprog, _libc
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    if libc.syscall(NR_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(e)}")
