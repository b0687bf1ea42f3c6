"""What an ioctl failed with, and the assertion the conformance tests make of it (the same test on both backends)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from kvmscope.errors import KvmError


def errno_of(call: Callable[[], object]) -> int:
    """The errno ``call`` fails with (0 when it succeeds)."""
    try:
        call()
    except KvmError as e:
        return e.errno or 0
    return 0


def expect(call: Callable[[], object], err: int, what: str) -> None:
    got = errno_of(call)
    assert got == err, f"{what}: expected {errno.errorcode.get(err, 'success')}, saw {errno.errorcode.get(got, 'success')}"
