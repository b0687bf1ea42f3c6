"""kvmscope: a pure-Python binding to Linux KVM and a software model of KVM's x86 vCPU-model rules.

>>> import kvmscope
>>> with kvmscope.open() as kvm:            # the live kernel when /dev/kvm is usable, else the model
...     print(kvm.backend, [hex(i) for i in kvm.get_msr_feature_index_list()])
"""

from __future__ import annotations

from typing import Any

from . import backends, msrs, uapi
from .api import (
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
    MsrExit,
    OtherExit,
    RdmsrExit,
    ShutdownExit,
    System,
    SystemEventExit,
    Vcpu,
    Vm,
    WrmsrExit,
)
from .errors import (
    ClosedError,
    FdLimitError,
    InvalidValueError,
    KvmError,
    KvmscopeError,
    KvmUnavailableError,
    MsrAccessError,
    MsrLookupError,
    MsrReadError,
    MsrWriteError,
    ProfileError,
    ScenarioError,
)

__version__ = "0.1.0"

BACKENDS = ("linux", "model")


def open(backend: str | None = None, **options: Any) -> System:  # noqa: A001 - mirrors os.open / io.open naming
    """Open a KVM system.

    ``backend=None`` uses the live kernel when ``/dev/kvm`` is usable and the model otherwise (``system.backend`` and
    ``system.describe()`` say which). ``"linux"`` takes ``path``; ``"model"`` takes ``kernel`` (e.g. ``"6.18"``) and
    ``profile`` (a shipped profile name, a JSON file path or a Profile); a kernel or profile without a backend means
    the model.
    """
    if backend is not None and backend not in BACKENDS:
        raise InvalidValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    takes = {"linux": {"path"}, "model": {"kernel", "profile"}}.get(backend or "", {"path", "kernel", "profile"})
    unknown = set(options) - takes
    if unknown:
        raise InvalidValueError(f"backend {backend!r} takes no option {', '.join(sorted(unknown))}")
    return backends.choose(backend or "auto", **options)[0]


__all__ = [
    "BACKENDS",
    "ClosedError",
    "CpuidEntry",
    "Exit",
    "FailEntryExit",
    "FdLimitError",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "InvalidValueError",
    "IoExit",
    "IrqWindowOpenExit",
    "KvmError",
    "KvmUnavailableError",
    "MmioExit",
    "MsrAccessError",
    "MsrBatch",
    "MsrExit",
    "MsrLookupError",
    "MsrReadError",
    "MsrWriteError",
    "OtherExit",
    "ProfileError",
    "KvmscopeError",
    "RdmsrExit",
    "ScenarioError",
    "ShutdownExit",
    "System",
    "SystemEventExit",
    "Vcpu",
    "Vm",
    "WrmsrExit",
    "msrs",
    "open",
    "uapi",
]
