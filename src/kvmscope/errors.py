"""kvmscope's errors: every failure a user can act on has its own type and says what happened."""

from __future__ import annotations

import errno as _errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernel.rulesets import Rule


def shown(v: Any, limit: int = 60) -> str:
    """``repr(v)`` for a message, shortened: a value from a file or a command line can be megabytes long."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-12:]} ({len(text):,} characters)"


class KvmscopeError(Exception):
    """Base class of every error kvmscope raises on purpose."""


class KvmError(KvmscopeError, OSError):
    """An ioctl on a KVM file descriptor failed: carries the errno and the ioctl's name."""

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        self.ioctl = ioctl
        self.detail = detail
        text = f"{ioctl} failed: {_errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        if detail:
            text += f": {detail}"
        OSError.__init__(self, err, text)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.ioctl, self.detail))


class KvmUnavailableError(KvmscopeError):
    """``/dev/kvm`` cannot be used: ``reason`` is ``"missing"`` or ``"permission"`` (or ``"error"``)."""

    def __init__(self, path: str, reason: str, message: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(message)


class ClosedError(KvmscopeError, ValueError):
    """A call was made on a System, VM or vCPU that has been closed."""


class MsrLookupError(KvmscopeError, KeyError):
    """An MSR name or index that kvmscope cannot resolve."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown MSR"


class InvalidValueError(KvmscopeError, ValueError):
    """An argument out of range for the kernel ABI (an MSR value beyond 64 bits, an index beyond 32 bits, ...).

    Where an API argument is at fault, ``argument`` names it, ``expected`` says what it takes and ``given`` is what it
    got (all None for errors raised before these attributes existed, or not about one argument)."""

    def __init__(self, message: str, *, argument: str | None = None, expected: str | None = None,
                 given: object = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.expected = expected
        self.given = given


class InvalidTypeError(InvalidValueError, TypeError):
    """An API argument of the wrong type (None, a str or float for an int, a list for a ctypes struct, ...): also a
    ``TypeError``, so code that caught Python's own error keeps working."""


class MemoryRegionError(KvmError, InvalidValueError):
    """Guest memory that KVM_SET_USER_MEMORY_REGION (or the host ``mmap`` behind it) refuses, found before the ioctl:
    carries the errno the kernel gives for it (EINVAL, EEXIST; ENOMEM when the host cannot map the size), so that it
    is caught alike as a :class:`KvmError` or an :class:`InvalidValueError`."""

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        KvmError.__init__(self, err, ioctl, detail)
        self.argument = self.expected = self.given = None


class MsrAccessError(KvmscopeError):
    """A strict MSR helper saw the kernel stop short of the whole batch.

    Names the refused MSR (``name`` and ``index``), the ``value`` (for writes), its ``position`` in the batch, how many
    entries the kernel processed (``processed``: those before ``position`` took effect), and ``rule``, the rule that
    refused it where the backend knows it (a :class:`~kvmscope.kernel.rulesets.Rule`: the model knows it; the live kernel
    does not say).
    """

    def __init__(
        self,
        op: str,
        index: int,
        name: str,
        position: int,
        total: int,
        value: int | None = None,
        rule: Rule | None = None,
    ) -> None:
        self.op = op
        self.index = index
        self.name = name
        self.position = position
        self.total = total
        self.processed = position
        self.value = value
        self.rule = rule
        what = f"{name} (0x{index:x})"
        if value is not None:
            text = f"{op} of {what} = 0x{value:x} refused at position {position} of {total}"
        else:
            text = f"{op} of {what} refused at position {position} of {total}"
        if position:
            text += f"; the {position} entr{'y' if position == 1 else 'ies'} before it took effect"
        if rule:
            text += f" [rule: {rule}]"
        super().__init__(text)


class MsrWriteError(MsrAccessError):
    """KVM_SET_MSRS refused an entry (see :class:`MsrAccessError`)."""


class MsrReadError(MsrAccessError):
    """KVM_GET_MSRS refused an entry (see :class:`MsrAccessError`)."""


class ProfileError(KvmscopeError, ValueError):
    """A host profile that cannot be loaded: names the file and the field."""


class ScenarioError(KvmscopeError, ValueError):
    """A scenario file that cannot be used: names the file, line and field."""


class FdLimitError(KvmError):
    """An ioctl that makes a file descriptor (KVM_CREATE_VM, KVM_CREATE_VCPU, ...) failed with EMFILE (this process is
    at ``ulimit -n``) or ENFILE (the system is out of files). The kernel undoes the object when it cannot give it an
    fd (for a vCPU, virt/kvm/kvm_main.c:4352-4354 and 4373-4389 in 6.12), so the same call works once fds are closed."""


def kvm_error(err: int, ioctl: str, detail: str = "") -> KvmError:
    """The :class:`KvmError` for ``err`` from ``ioctl``: :class:`FdLimitError` for EMFILE and ENFILE."""
    if err in (_errno.EMFILE, _errno.ENFILE):
        if not detail:
            detail = _fd_limit_detail(err)
        return FdLimitError(err, ioctl, detail)
    return KvmError(err, ioctl, detail)


def _fd_limit_detail(err: int) -> str:
    if err == _errno.ENFILE:
        return "the system is out of open files (fs.file-max); close some and retry"
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"this process has its limit of {soft} open files (ulimit -n); close some or raise the limit and retry"
