"""Backend ``linux``: thin objects over the real ``/dev/kvm``, one method per ioctl, no policy."""

from .system import LinuxSystem, open_system
from .vcpu import LinuxVcpu
from .vm import LinuxVm

__all__ = ["LinuxSystem", "LinuxVcpu", "LinuxVm", "open_system"]
