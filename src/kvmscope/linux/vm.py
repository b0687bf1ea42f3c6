"""A VM file descriptor: guest memory, vCPUs and VM-wide capabilities."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..api import Vm
from ..errors import InvalidValueError
from ..memory import MemoryRegion, find_region, host_address, map_guest_memory
from ._ioctl import ioctl_buf, ioctl_int, ioctl_ulong
from .vcpu import LinuxVcpu, map_kvm_run

if TYPE_CHECKING:
    from .system import LinuxSystem

_SET_USER_MEMORY_REGION = uapi.KVM_SET_USER_MEMORY_REGION
_REGION = struct.Struct(uapi.struct_format(uapi.kvm_userspace_memory_region, "slot", "flags", "guest_phys_addr",
                                           "memory_size", "userspace_addr"))


class LinuxVm(Vm):
    """A VM created by KVM_CREATE_VM. Closing it closes its vCPUs and unmaps its memory."""

    def __init__(self, fd: int, system: LinuxSystem, vm_type: int = 0) -> None:
        self._fd = fd
        self.system = system
        self.vm_type = vm_type
        self.regions: list[MemoryRegion] = []
        # Weak: each vCPU holds its VM, and a cycle would keep a dropped VM's fds open until the next garbage
        # collection. Keyed by id, in creation order. Plain weak references, not a WeakValueDictionary: that costs
        # VM start about 2.5 us more (made, filled and listed once per VM), and an id's dead reference is replaced
        # when the id is made again (KVM refuses it while the VM lives, so at most one per id).
        self._vcpus: dict[int, weakref.ref[LinuxVcpu]] = {}
        self._adopted: list[int] = []  # fds of vCPUs dropped unclosed
        self._mmap_size = system.run_size()
        self._slot_sizes: dict[int, int] = {}
        # The memslot limits (``Vm._memslot_limits``) of the system's earlier VMs of this type: KVM_CAP_NR_MEMSLOTS is a
        # constant, and KVM_CAP_MULTI_ADDRESS_SPACE depends on the VM type alone (``kvm_arch_nr_memslot_as_ids`` is 1
        # for a VM type with private memory, else 2: arch/x86/include/asm/kvm_host.h:2301 in 6.12).
        self._limits = system.memslot_limits.get(vm_type)

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    @property
    def vcpus(self) -> list[LinuxVcpu]:
        """The vCPUs made here that are still referenced (a vCPU keeps its VM alive, not the other way round)."""
        return [vcpu for ref in self._vcpus.values() if (vcpu := ref()) is not None]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vcpu in self.vcpus:
            vcpu.close()
        for fd in self._adopted:
            os.close(fd)
        self._adopted.clear()
        os.close(self._fd)
        for r in self.regions:
            if isinstance(r.mem, mmap.mmap):
                r.mem.close()
        self.regions.clear()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def adopt_fd(self, fd: int) -> None:
        """Close ``fd`` with the VM (a vCPU dropped without close() hands its fd over here); at once if it is closed."""
        if self._closed:
            os.close(fd)
        else:
            self._adopted.append(fd)

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
        self._slot_sizes[slot] = size  # KVM_GET_DIRTY_LOG's bitmap is sized from it (size 0 deletes the slot)

    def add_memory(self, guest_phys_addr: int, size: int, slot: int | None = None, flags: int = 0) -> int:
        slot = self._claim_slot(guest_phys_addr, size, slot, flags)
        if self._limits is not None:  # asked by the claim: kept for the system's next VMs
            self.system.memslot_limits.setdefault(self.vm_type, self._limits)
        mem = map_guest_memory(size, slot)
        try:
            # the region packed straight to bytes (no ctypes struct): VM start does this once per VM
            region = bytearray(_REGION.size)
            try:
                _REGION.pack_into(region, 0, slot, flags, guest_phys_addr, size, host_address(mem))
            except struct.error:  # gpa and size are checked above; a ctypes struct would have truncated these
                raise InvalidValueError(f"slot {slot!r} and flags {flags!r} must be 32-bit unsigned ints") from None
            ioctl_buf(self._fd, _SET_USER_MEMORY_REGION, region)
        except BaseException:
            mem.close()
            raise
        self._slot_sizes[slot] = size
        self.regions.append(MemoryRegion(slot, guest_phys_addr, size, flags, mem))
        return slot

    def write_memory(self, guest_phys_addr: int, data: bytes) -> None:
        """Write ``data`` to guest memory inside one region (into the mapping, with no view made)."""
        self._check_open()
        r = find_region(self.regions, guest_phys_addr, len(data))
        offset = guest_phys_addr - r.guest_phys_addr
        r.mem[offset : offset + len(data)] = data

    def create_vcpu(self, vcpu_id: int = 0) -> LinuxVcpu:
        """KVM_CREATE_VCPU, then mmap its ``struct kvm_run``: one fd per vCPU. Out of fds, the ioctl fails with a
        :class:`~kvmscope.errors.FdLimitError` and the kernel has undone the vCPU (kvm_main.c:4352-4354, 4373-4389 in
        6.12): the same id can be created once fds are free. Only a failed mmap after it (ENOMEM) leaves the id taken,
        as KVM has no call to destroy a vCPU."""
        fd = ioctl_int(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = LinuxVcpu(self, fd, vcpu_id, map_kvm_run(fd, self._mmap_size))
        except BaseException:
            os.close(fd)
            raise
        self._vcpus[vcpu_id] = weakref.ref(vcpu)
        return vcpu

    def set_msr_filter(self, flags: int, ranges: Sequence[tuple[int, int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER."""
        if len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:
            raise InvalidValueError(f"at most {uapi.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges")
        f = uapi.kvm_msr_filter(flags=flags)
        keep = []
        for i, (rflags, base, nmsrs, bitmap) in enumerate(ranges):
            # The kernel reads whole longs (BITS_TO_LONGS(nmsrs), x86.c:6373 in 6.12): pad to them.
            cbuf = ctypes.create_string_buffer(bytes(bitmap), max(len(bitmap), (nmsrs + 63) // 64 * 8, 1))
            keep.append(cbuf)
            f.ranges[i] = uapi.kvm_msr_filter_range(rflags, nmsrs, base, ctypes.addressof(cbuf))
        ioctl_buf(self.fd, uapi.KVM_X86_SET_MSR_FILTER, f)
        del keep

    # -- the VMM's VM ioctls: one thin method each, no policy --
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (the argument is an unsigned long, not a pointer)."""
        ioctl_ulong(self.fd, uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (a pointer to a __u64)."""
        ioctl_buf(self.fd, uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP."""
        ioctl_int(self.fd, uapi.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        """KVM_GET_IRQCHIP."""
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        ioctl_buf(self.fd, uapi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP."""
        ioctl_buf(self.fd, uapi.KVM_SET_IRQCHIP, chip)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE."""
        ioctl_buf(self.fd, uapi.KVM_IRQ_LINE, uapi.kvm_irq_level(irq, level))

    def irq_line_status(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: the status the kernel writes over ``irq``."""
        line = uapi.kvm_irq_level(irq, level)
        ioctl_buf(self.fd, uapi.KVM_IRQ_LINE_STATUS, line)
        return line.status

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2."""
        ioctl_buf(self.fd, uapi.KVM_CREATE_PIT2, uapi.kvm_pit_config(flags=flags))

    def get_pit2(self) -> uapi.kvm_pit_state2:
        """KVM_GET_PIT2."""
        state = uapi.kvm_pit_state2()
        ioctl_buf(self.fd, uapi.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        ioctl_buf(self.fd, uapi.KVM_SET_PIT2, state)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: the kernel's return value (vCPUs that took it)."""
        msi = uapi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data, flags=flags,
                           devid=devid)
        return ioctl_buf(self.fd, uapi.KVM_SIGNAL_MSI, msi)

    def set_gsi_routing(self, entries: Sequence[uapi.kvm_irq_routing_entry]) -> None:
        """KVM_SET_GSI_ROUTING."""
        head, size = ctypes.sizeof(uapi.kvm_irq_routing), ctypes.sizeof(uapi.kvm_irq_routing_entry)
        buf = bytearray(head + size * len(entries))
        struct.pack_into("<II", buf, 0, len(entries), 0)
        for i, entry in enumerate(entries):
            buf[head + i * size : head + (i + 1) * size] = bytes(entry)
        ioctl_buf(self.fd, uapi.KVM_SET_GSI_ROUTING, buf)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """KVM_IRQFD."""
        ioctl_buf(self.fd, uapi.KVM_IRQFD, uapi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd))

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int = 0, flags: int = 0) -> None:
        """KVM_IOEVENTFD."""
        ev = uapi.kvm_ioeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags)
        ioctl_buf(self.fd, uapi.KVM_IOEVENTFD, ev)

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG into a bitmap sized from the slot (KVM writes one bit per page, in whole longs)."""
        # Every slot this VM set has its size recorded: a slot not there does not exist (ENOENT), so the kernel writes
        # nothing into the minimal buffer.
        pages = (self._slot_sizes.get(slot, 0) + 4095) // 4096
        bitmap = ctypes.create_string_buffer(max(8, (pages + 63) // 64 * 8))
        ioctl_buf(self.fd, uapi.KVM_GET_DIRTY_LOG, uapi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap)))
        return bitmap.raw[: (pages + 7) // 8]

    def get_clock(self) -> uapi.kvm_clock_data:
        """KVM_GET_CLOCK."""
        data = uapi.kvm_clock_data()
        ioctl_buf(self.fd, uapi.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        ioctl_buf(self.fd, uapi.KVM_SET_CLOCK, data)

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO."""
        zone = uapi.kvm_coalesced_mmio_zone(addr, size, int(pio))
        ioctl_buf(self.fd, uapi.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO."""
        zone = uapi.kvm_coalesced_mmio_zone(addr, size, int(pio))
        ioctl_buf(self.fd, uapi.KVM_UNREGISTER_COALESCED_MMIO, zone)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM."""
        return ioctl_int(self.fd, uapi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the VM."""
        ioctl_int(self.fd, uapi.KVM_SET_TSC_KHZ, khz)
