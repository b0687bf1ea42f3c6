"""The one place the linux backend calls ioctl(2): OSError becomes :class:`KvmError` naming the ioctl."""

from __future__ import annotations

import fcntl
from typing import Any

from ..errors import KvmError
from ..uapi import IOCTL_NAMES


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """An ioctl whose argument is an integer (or nothing); returns the kernel's return value."""
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as e:
        raise KvmError(e.errno or 0, IOCTL_NAMES.get(request, hex(request))) from None


def ioctl_buf(fd: int, request: int, buf: Any) -> int:
    """An ioctl on a writable buffer the kernel may read and write in place; returns the kernel's return value."""
    try:
        return int(fcntl.ioctl(fd, request, buf, True))
    except OSError as e:
        raise KvmError(e.errno or 0, IOCTL_NAMES.get(request, hex(request))) from None
