"""Packing ``struct kvm_cpuid2`` buffers."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..api import CpuidEntry

_CPUID_ENTRY = struct.Struct("<7I12x")


def decode_cpuid(buf: bytes | bytearray, nent: int, offset: int = 8) -> list[CpuidEntry]:
    return [CpuidEntry(*fields) for fields in _CPUID_ENTRY.iter_unpack(memoryview(buf)[offset : offset + 40 * nent])]


def encode_cpuid(entries: Sequence[CpuidEntry], capacity: int | None = None) -> bytearray:
    n = len(entries) if capacity is None else capacity
    buf = bytearray(8 + 40 * n)
    struct.pack_into("<II", buf, 0, len(entries) if capacity is None else capacity, 0)
    for i, e in enumerate(entries):
        _CPUID_ENTRY.pack_into(buf, 8 + 40 * i, e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
    return buf
