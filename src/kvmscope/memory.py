"""Guest memory regions: the checks KVM_SET_USER_MEMORY_REGION makes, shared by both backends."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

from . import uapi
from .errors import InvalidValueError, MemoryRegionError

PAGE_SIZE = mmap.PAGESIZE


@dataclass
class MemoryRegion:
    """One memslot: guest-physical range backed by an anonymous host mapping."""

    slot: int
    guest_phys_addr: int
    size: int
    flags: int
    mem: mmap.mmap

    def contains(self, gpa: int, length: int) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.guest_phys_addr + self.size


def host_address(mem: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mem)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


# virt/kvm/kvm_main.c and arch/x86/kvm/x86.c, the checks of KVM_SET_USER_MEMORY_REGION in the kernel's order (function
# names: kvm_main.c moves between releases; read at CachyOS/linux 79f4411db5cb, the same in 6.12):
_IOCTL = "KVM_SET_USER_MEMORY_REGION"
# kvm_vm_ioctl: the v1 ioctl takes only KVM_SET_USER_MEMORY_REGION_V1_FLAGS (check_memory_region_flags: x86 has
# read-only memory for its default VM type); KVM_MEM_GUEST_MEMFD needs the v2 ioctl.
VALID_FLAGS = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
# include/linux/kvm_host.h KVM_MEM_MAX_NR_PAGES: a slot's page count fits in 31 bits.
MAX_NR_PAGES = (1 << 31) - 1
# arch/x86/kvm/x86.c:12345 (6.12, kvm_arch_prepare_memory_region): no page beyond kvm_mmu_max_gfn(), which is 52 bits
# of address without TDP (PVM here) and the host's MAXPHYADDR with it.
MAX_GPA_BITS = 52
# KVM_USER_MEM_SLOTS on x86 since 5.12 (and what KVM_CAP_NR_MEMSLOTS says), when a backend does not say.
DEFAULT_NR_SLOTS = 32764


def check_region(regions: Sequence[MemoryRegion], gpa: int, size: int, slot: int, flags: int = 0,
                 nr_slots: int = DEFAULT_NR_SLOTS, nr_as: int = 1) -> None:
    """Refuse what KVM_SET_USER_MEMORY_REGION would refuse for a new slot, before mapping anything, with the errno the
    kernel gives (:class:`MemoryRegionError`). ``nr_slots``: KVM_CAP_NR_MEMSLOTS; ``nr_as``: the address spaces
    (KVM_CAP_MULTI_ADDRESS_SPACE, 0 meaning one)."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF

    def refuse(err: int, what: str) -> MemoryRegionError:
        return MemoryRegionError(err, _IOCTL, f"{what} (slot {slot:#x}, guest_phys_addr {gpa:#x}, size {size:#x}, "
                                              f"flags {flags:#x}); refused before the call")

    # kvm_vm_ioctl_set_memory_region: the slot id (low 16 bits) below KVM_USER_MEM_SLOTS.
    if slot_id >= nr_slots:
        raise refuse(errno.EINVAL, f"slot id {slot_id} is not below KVM_CAP_NR_MEMSLOTS {nr_slots}")
    # __kvm_set_memory_region, in order: flags, alignment, address space, wrap-around, slot size.
    if flags & ~VALID_FLAGS:
        raise refuse(errno.EINVAL, f"flags {flags:#x} beyond KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY")
    if size % PAGE_SIZE or gpa % PAGE_SIZE:
        raise refuse(errno.EINVAL, f"guest memory must be page-aligned (page {PAGE_SIZE:#x})")
    if as_id >= max(nr_as, 1):
        raise refuse(errno.EINVAL, f"address space {as_id} (slot bits 31:16) beyond the VM's {max(nr_as, 1)}")
    if gpa + size >= 1 << 64:
        raise refuse(errno.EINVAL, "guest_phys_addr + size wraps around 64 bits")
    if size // PAGE_SIZE > MAX_NR_PAGES:
        raise refuse(errno.EINVAL, f"more than KVM_MEM_MAX_NR_PAGES ({MAX_NR_PAGES}) pages in one slot")
    # memory_size 0 deletes a slot in the kernel (EINVAL when there is none); add_memory only adds.
    if size == 0:
        raise refuse(errno.EINVAL, "size 0 deletes a slot; add_memory adds one")
    # An existing slot may only be moved or have its flags changed, with the same host mapping: add_memory always maps
    # new memory, so the kernel refuses it.
    if any(r.slot == slot for r in regions):
        raise refuse(errno.EINVAL, f"memory slot {slot:#x} is already in use")
    for r in regions:  # kvm_check_memslot_overlap, within one address space
        if r.slot >> 16 == as_id and gpa < r.guest_phys_addr + r.size and r.guest_phys_addr < gpa + size:
            raise refuse(errno.EEXIST, f"overlaps slot {r.slot:#x} at {r.guest_phys_addr:#x}+{r.size:#x}")
    if gpa + size > 1 << MAX_GPA_BITS:
        raise refuse(errno.EINVAL, f"beyond the {MAX_GPA_BITS}-bit guest-physical address space")


def map_guest_memory(size: int, slot: int) -> mmap.mmap:
    """An anonymous private mapping of ``size`` bytes for a slot: lazy (pages are allocated when first touched), and
    the same call on both backends, so that a size the host cannot map fails alike (ENOMEM, naming the size)."""
    try:
        return mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise MemoryRegionError(e.errno or errno.ENOMEM, "mmap",
                                f"cannot map {size:#x} bytes ({size / (1 << 30):.1f} GiB) of guest memory for slot "
                                f"{slot:#x}") from None


def find_region(regions: Sequence[MemoryRegion], gpa: int, length: int) -> MemoryRegion:
    for r in regions:
        if r.contains(gpa, length):
            return r
    raise InvalidValueError(f"guest range 0x{gpa:x}+0x{length:x} is not inside one memory region")
