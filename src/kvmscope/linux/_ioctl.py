"""The one place the linux backend calls ioctl(2): OSError becomes :class:`KvmError` naming the ioctl."""

from __future__ import annotations

import fcntl
from typing import Any

from ..errors import kvm_error
from ..uapi import IOCTL_NAMES


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """An ioctl whose argument is an integer (or nothing); returns the kernel's return value."""
    try:  # 0 is passed by leaving the argument out: given an int, fcntl.ioctl first fails to read it as a buffer, twice
        return int(fcntl.ioctl(fd, request) if arg == 0 else fcntl.ioctl(fd, request, arg))
    except OSError as e:
        raise kvm_error(e.errno or 0, IOCTL_NAMES.get(request, hex(request))) from None


def ioctl_buf(fd: int, request: int, buf: Any) -> int:
    """An ioctl on a writable buffer the kernel may read and write in place; returns the kernel's return value."""
    try:
        return int(fcntl.ioctl(fd, request, buf, True))
    except OSError as e:
        raise kvm_error(e.errno or 0, IOCTL_NAMES.get(request, hex(request))) from None


_libc: Any = None


def ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """An ioctl whose argument is an ``unsigned long`` (fcntl.ioctl passes only a C int: an address such as
    KVM_SET_TSS_ADDR's 0xfffbd000 does not fit)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
        _libc.ioctl.restype = ctypes.c_int
    import ctypes

    r = int(_libc.ioctl(fd, request, arg))
    if r < 0:
        raise kvm_error(ctypes.get_errno(), IOCTL_NAMES.get(request, hex(request)))
    return r
