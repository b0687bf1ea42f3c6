"""kvmscope: a pure-Python binding to Linux KVM and a software model of KVM's x86 vCPU-model rules.

>>> import kvmscope
>>> with kvmscope.open() as kvm:            # the live kernel when /dev/kvm is usable, else the model
...     print(kvm.backend, [hex(i) for i in kvm.get_msr_feature_index_list()])
"""

from __future__ import annotations

from typing import Any

from . import msrs, uapi
from .api import (
    CpuidEntry,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
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
    ``profile`` (a shipped profile name or a JSON file path).
    """
    if backend is None:
        from .linux import open_system
        from .model import open_model

        if set(options) & {"kernel", "profile"}:
            return open_model(**options)  # a kernel or profile can only mean the model
        try:
            return open_system(**options)
        except KvmUnavailableError:
            return open_model()
    unknown = set(options) - ({"path"} if backend == "linux" else {"kernel", "profile"})
    if backend in BACKENDS and unknown:
        raise InvalidValueError(f"backend {backend!r} takes no option {', '.join(sorted(unknown))}")
    if backend == "linux":
        from .linux import open_system

        return open_system(**options)
    if backend == "model":
        from .model import open_model

        return open_model(**options)
    raise InvalidValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "ClosedError",
    "CpuidEntry",
    "Exit",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "InvalidValueError",
    "IoExit",
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
