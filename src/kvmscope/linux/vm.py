"""A VM file descriptor: guest memory, vCPUs and VM-wide capabilities."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..api import Vm
from ..errors import InvalidValueError
from ..memory import MemoryRegion, host_address
from ._ioctl import ioctl_buf, ioctl_int
from .vcpu import LinuxVcpu

if TYPE_CHECKING:
    from .system import LinuxSystem

class LinuxVm(Vm):
    """A VM created by KVM_CREATE_VM. Closing it closes its vCPUs and unmaps its memory."""

    def __init__(self, fd: int, system: LinuxSystem) -> None:
        self._fd = fd
        self.system = system
        self.regions: list[MemoryRegion] = []
        self.vcpus: list[LinuxVcpu] = []
        self._mmap_size = system.vcpu_mmap_size()

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vcpu in self.vcpus:
            vcpu.close()
        os.close(self._fd)
        for r in self.regions:
            if isinstance(r.mem, mmap.mmap):
                r.mem.close()
        self.regions.clear()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (VM-specific answers, e.g. for KVM_CAP_DISABLE_QUIRKS2)."""
        return ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP with up to four arguments."""
        if len(args) > 4:
            raise InvalidValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = uapi.kvm_enable_cap(cap=cap, flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl_buf(self.fd, uapi.KVM_ENABLE_CAP, ec)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, size: int, host_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION, raw."""
        region = uapi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr)
        ioctl_buf(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    def add_memory(self, guest_phys_addr: int, size: int, slot: int | None = None, flags: int = 0) -> int:
        slot = self._claim_slot(guest_phys_addr, size, slot)
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self.set_user_memory_region(slot, flags, guest_phys_addr, size, host_address(mem))
        except BaseException:
            mem.close()
            raise
        self.regions.append(MemoryRegion(slot, guest_phys_addr, size, flags, mem))
        return slot

    def create_vcpu(self, vcpu_id: int = 0) -> LinuxVcpu:
        """KVM_CREATE_VCPU, then mmap its ``struct kvm_run``."""
        fd = ioctl_int(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = LinuxVcpu(fd, vcpu_id, self._mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def set_msr_filter(self, flags: int, ranges: Sequence[tuple[int, int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER."""
        if len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:
            raise InvalidValueError(f"at most {uapi.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges")
        f = uapi.kvm_msr_filter(flags=flags)
        keep = []
        for i, (rflags, base, nmsrs, bitmap) in enumerate(ranges):
            if len(bitmap) * 8 < nmsrs:
                raise InvalidValueError(f"filter range {i}: bitmap of {len(bitmap)} bytes covers fewer than {nmsrs}")
            cbuf = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
            keep.append(cbuf)
            f.ranges[i] = uapi.kvm_msr_filter_range(rflags, nmsrs, base, ctypes.addressof(cbuf))
        ioctl_buf(self.fd, uapi.KVM_X86_SET_MSR_FILTER, f)
        del keep
