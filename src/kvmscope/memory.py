"""Guest memory regions: the checks KVM_SET_USER_MEMORY_REGION makes, shared by both backends."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidValueError

PAGE_SIZE = mmap.PAGESIZE


@dataclass
class MemoryRegion:
    """One memslot: guest-physical range backed by an anonymous host mapping."""

    slot: int
    guest_phys_addr: int
    size: int
    flags: int
    mem: mmap.mmap | bytearray

    def contains(self, gpa: int, length: int) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.guest_phys_addr + self.size


def host_address(mem: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mem)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def check_region(regions: Sequence[MemoryRegion], gpa: int, size: int, slot: int) -> None:
    """Refuse what KVM_SET_USER_MEMORY_REGION would refuse, before mapping anything."""
    for name, v in (("guest_phys_addr", gpa), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidValueError(f"{name} must be a non-negative int, not {v!r}")
    if size == 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
        raise InvalidValueError(
            f"guest memory must be page-aligned and non-empty: gpa=0x{gpa:x} size=0x{size:x} (page 0x{PAGE_SIZE:x})"
        )
    if gpa + size > 1 << 52:
        raise InvalidValueError(f"guest memory 0x{gpa:x}+0x{size:x} is beyond the 52-bit physical address space")
    for r in regions:
        if r.slot == slot:
            raise InvalidValueError(f"memory slot {slot} is already in use")
        if gpa < r.guest_phys_addr + r.size and r.guest_phys_addr < gpa + size:
            raise InvalidValueError(
                f"guest memory 0x{gpa:x}+0x{size:x} overlaps slot {r.slot} at 0x{r.guest_phys_addr:x}+0x{r.size:x}"
            )


def find_region(regions: Sequence[MemoryRegion], gpa: int, length: int) -> MemoryRegion:
    for r in regions:
        if r.contains(gpa, length):
            return r
    raise InvalidValueError(f"guest range 0x{gpa:x}+0x{length:x} is not inside one memory region")
