"""What every family of emulated-MSR rules shares (``msr_misc``, ``msr_pv``, ``mtrr``): the result codes, dispatch
through a per-MSR handler table, the CPUID bits the rules read, and what the batch ioctls (``msr_batch``) may do for an
MSR without calling its handler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..api import find_cpuid
from ..kernel import emulated as E
from ..kernel.rulesets import Rule

if TYPE_CHECKING:
    from .msr_rules import MsrRules

OK, FAIL, UNSUPPORTED = 0, 1, 2
U64 = (1 << 64) - 1
Bit = tuple[int, int, str, int]
# How a batch checks a host write without its handler (``write_check``): (offset, mask, gpa).
WriteCheck = tuple[int, int, bool]
AMD_VENDORS = {(0x68747541, 0x69746E65, 0x444D4163), (0x6F677948, 0x6E65476E, 0x656E6975)}  # AuthenticAMD, HygonGenuine
GENUINE_INTEL = (0x756E6547, 0x49656E69, 0x6C65746E)  # CPUID leaf 0 EBX, EDX, ECX


class MsrFamily(Protocol):
    """A family of MSRs with rules of their own: ``get`` gives (code, value), ``set`` the code; ``host`` is
    ``host_initiated``."""

    indices: frozenset[int]

    def get(self, index: int, host: bool) -> tuple[int, int]: ...

    def set(self, index: int, data: int, host: bool) -> int: ...

    def bulk_kind(self, index: int) -> str | None:
        """The group whose host writes ``bulk_ok`` checks for a whole batch at once ("any": every host write is
        stored verbatim, returns OK and records nothing, so no check runs); None for the others. Worth it for "any"
        and for groups that batches hold many of (MCi banks, MTRRs): a checked group costs a call, as one handler
        does."""

    def bulk_ok(self, kind: str, indices: Sequence[int], values: Sequence[int]) -> bool:
        """True when each host write of ``values[i]`` to ``indices[i]`` (all of group ``kind``) would store the
        value verbatim under its index in ``stored``, return OK and record nothing; False when any might not (the
        batch then runs entry by entry, so False is always safe)."""

    def write_check(self, index: int) -> WriteCheck | None:
        """How a batch may check a host write of ``index`` without calling its handler, under the vCPU's
        configuration now (its CPUID and MCG_CAP: ``msr_batch`` remakes its plans when either changes):
        ``(offset, mask, gpa)``. The write of ``v`` returns OK, stores ``v`` verbatim under ``index`` and records
        nothing when ``(v + offset) & mask == 0`` and, with ``gpa``, when bit 0 of ``v`` is clear or guest memory
        holds the byte at ``v & ~1``. A mask of reserved bits has offset 0; an offset moves the allowed values to 0
        first (canonical addresses: ``1 << (bits - 1)``; 0 or all ones: 1, with bit 0 out of the mask). A value that
        fails may still be taken: the batch then calls the handler, so a narrower check is always safe. None when
        the handler must run."""

    def memory_types(self, index: int) -> int:
        """With ``write_check``: what each byte of a written value must also be for the check to pass, as a mask of
        ``MEMORY_TYPE_INVALID``'s bits per byte (0xFF: an MTRR memory type; 0x02: a PAT type; 0: anything)."""

    def bulk_read_kind(self, index: int) -> str | None:
        """The group whose host reads ``bulk_read_ok`` checks for a whole batch at once; None for the others."""

    def bulk_read_ok(self, kind: str, indices: Sequence[int]) -> bool:
        """True when each host read of ``indices`` (all of group ``kind``, sorted, each once) would give
        ``stored[index]`` and record nothing (False is always safe, as for ``bulk_ok``)."""

    def read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        """Where a host read of ``index`` always finds its value, ``(dict, key, default)`` for ``dict.get``, when its
        getter reads nothing else and never fails; None when the getter must run."""


def canonical(value: int, bits: int) -> int:
    """``__canonical_address``: sign-extend from bit ``bits - 1``."""
    value &= (1 << bits) - 1
    return (value | (U64 & ~((1 << bits) - 1))) if value >> (bits - 1) else value


Getter = Callable[[int, bool], tuple[int, int]]
Setter = Callable[[int, int, bool], int]
_NOTHING: dict[int, int] = {}  # read_source of a getter that always gives its default: no key is ever stored here


class Family:
    """What every family of MSR rules shares: dispatch through ``handlers`` (index -> getter, setter; ``host`` is
    ``host_initiated``) and the vCPU state the kernel's rules read."""

    def __init__(self, rules: MsrRules) -> None:
        self.rules = rules
        self.vcpu = rules.vcpu
        self.handlers: dict[int, tuple[Getter, Setter]] = {}
        self.indices: frozenset[int] = frozenset()

    def install(self, handlers: dict[int, tuple[Getter, Setter]]) -> None:
        self.handlers = handlers
        self.indices = frozenset(handlers)

    # -- the family interface (MsrRules dispatches here) --
    def get(self, index: int, host: bool) -> tuple[int, int]:
        return self.handlers[index][0](index, host)

    def set(self, index: int, data: int, host: bool) -> int:
        return self.handlers[index][1](index, data, host)

    # -- what the rules read --
    def cap(self, bit: Bit) -> bool:
        """``guest_cpu_cap_has`` from 6.14, ``guest_cpuid_has`` before (``MsrRules.cap``)."""
        return self.rules.cap(bit)

    def cpuid_has(self, bit: Bit) -> bool:
        """``guest_cpuid_has``: the guest's CPUID bit alone."""
        return self.rules.cpuid_has(bit)

    def supported(self, bit: Bit) -> bool:
        """The bit in the profile's supported CPUID."""
        return self.rules.supported(bit)

    # -- what the batch ioctls may do without calling a handler (msr_batch) --
    def write_kind(self, index: int) -> str | None:
        """"ignored" when a host write of ``index`` always succeeds and changes nothing (``_set_ignored``),
        "read_only" when it is always unsupported (``_set_read_only``); None when its handler must run."""
        setter = self.handlers[index][1]
        if setter == self._set_ignored:  # the same method of this object
            return "ignored"
        if setter == self._set_read_only:
            return "read_only"
        return None

    def bulk_kind(self, index: int) -> str | None:
        return None

    def bulk_ok(self, kind: str, indices: Sequence[int], values: Sequence[int]) -> bool:
        return False

    def write_check(self, index: int) -> WriteCheck | None:
        return None

    def memory_types(self, index: int) -> int:
        return 0

    def bulk_read_kind(self, index: int) -> str | None:
        return None

    def bulk_read_ok(self, kind: str, indices: Sequence[int]) -> bool:
        return False

    def read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        """Where a host read of ``index`` always finds its value, when its getter reads nothing else and never
        fails: (dict, key, default), for ``dict.get(key, default)``; None when the getter must run."""
        getter = self.handlers[index][0]
        if getter == self._get_stored:
            return self.rules.stored, index, 0
        if getter == self._get_zero:
            return _NOTHING, index, 0
        return None

    def amd_compatible(self) -> bool:
        """``guest_cpuid_is_amd_compatible`` (vcpu->arch.is_amd_compatible): AMD or Hygon in CPUID leaf 0."""
        leaf = find_cpuid(self.vcpu.cpuid, 0)
        return leaf is not None and (leaf.ebx, leaf.edx, leaf.ecx) in AMD_VENDORS

    def genuine_intel(self) -> bool:
        """``guest_cpuid_is_intel``: GenuineIntel in CPUID leaf 0."""
        leaf = find_cpuid(self.vcpu.cpuid, 0)
        return leaf is not None and (leaf.ebx, leaf.edx, leaf.ecx) == GENUINE_INTEL

    def lapic_in_kernel(self) -> bool:
        # The families answer as without an in-kernel LAPIC: with one, the vCPU's own setters take ASYNC_PF_EN/INT and
        # TSC_DEADLINE over (vcpu_state), and the x2APIC MSRs look at the vCPU's LAPIC themselves (x2apic).
        return False

    def refuse(self, index: int, rule: Rule, code: int) -> int:
        return self.rules.refuse(index, rule, code)

    # -- plain handlers --
    def _get_stored(self, index: int, host: bool) -> tuple[int, int]:
        return OK, self.rules.stored[index]

    def _get_zero(self, index: int, host: bool) -> tuple[int, int]:
        return OK, 0

    def _set_any(self, index: int, data: int, host: bool) -> int:
        self.rules.stored[index] = data
        return OK

    def _set_ignored(self, index: int, data: int, host: bool) -> int:
        return OK

    def _set_read_only(self, index: int, data: int, host: bool) -> int:
        return self.refuse(index, E.READ_ONLY, UNSUPPORTED)
