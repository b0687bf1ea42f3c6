"""KVM_GET_MSRS and KVM_SET_MSRS on the model (``msr_io``/``__msr_io``): whole batches over a vCPU's MSR rules.

A batch stops at the first refused entry and returns the count processed; the entries before it took effect. Writes
run by plan (``BatchedMsrRules._plan``): the outcome is the kernel's entry-by-entry one, at a fraction of the cost.
This is the model's hot path: keep it free of extra calls and attribute hops (``benchmarks/run.py``).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from .. import msrs as M
from .. import uapi
from ..api import LITTLE_ENDIAN, MsrBatch, MsrItems, as_batch
from ..errors import ClosedError, KvmError
from . import vmx
from .msr_rules import FAMILY_MSRS, KEPT, MSR_ALIASES, MSR_MISC_FEATURES_ENABLES, OK, UNSUPPORTED, VM_WIDE_MSRS, MsrRules

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from .vcpu import ModelVcpu

_ENTRY = struct.Struct("<IIQ")
_PLAN_CACHE = 256  # batch plans kept per vCPU
# A batch's write plan: the entries with rules (position, index, the MSR's setter if it has one), the store-only
# indices, how to pick their values from the batch's list of values, and all the indices when the batch can be stored
# whole (see _plan).
FrozenCheck = tuple[Callable[[list[int]], object], Callable[[dict[int, int]], object]]
WritePlan = tuple[
    "tuple[tuple[int, int, Callable[[int], int] | None], ...]",
    tuple[int, ...],
    "Callable[[list[int]], Sequence[int]] | None",
    "tuple[int, ...] | None",
    "FrozenCheck | None",
]


def store_only_msrs(profile: Profile, immutable: frozenset[int]) -> frozenset[int]:
    """The MSRs for which ``do_set`` always succeeds and does nothing but store the value under its own index:
    UCODE_REV and the profile's ordinary MSRs that accept any value, less every MSR with a rule of its own and every
    MSR a rule reads (MISC_FEATURES_ENABLES, which PLATFORM_INFO's order check reads), so that no rule depends on a
    store-only write: ``set_msrs`` relies on it to run a batch's ruled entries first."""
    ruled = {
        MSR_MISC_FEATURES_ENABLES,
        *MSR_ALIASES.values(),
        M.MSR_IA32_ARCH_CAPABILITIES,
        M.MSR_IA32_PERF_CAPABILITIES,
        M.MSR_PLATFORM_INFO,
        M.MSR_AMD64_DE_CFG,
        vmx.MSR_IA32_FEAT_CTL,
        *MSR_ALIASES,
        *VM_WIDE_MSRS,
        *immutable,
        *FAMILY_MSRS,
    }
    ordinary = {i for i, b in profile.behaviours.items() if b.kind not in ("refuse", "zero_only", "zero_drop", "drop")}
    return frozenset(({M.MSR_IA32_UCODE_REV} | ordinary) - ruled - set(range(M.VMX_FIRST, M.VMX_LAST + 1)))


def _always_mismatch(values: list[int]) -> object:
    return object()


def _nothing(store: dict[int, int]) -> object:
    return None


class BatchedMsrRules(MsrRules):
    """A vCPU's MSR rules with the batch ioctls. The vCPU binds ``get_msrs``/``set_msrs`` as its own (see
    ``ModelVcpu.__init__``), so they check that the vCPU is open (``closed``) and raise its strict errors."""

    def __init__(self, vcpu: ModelVcpu) -> None:
        super().__init__(vcpu)
        self.store_only = store_only_msrs(self.profile, self.immutable)
        self.closed = False  # set by the vCPU's close()
        self.plans: dict[bytes, WritePlan] = {}

    def freeze(self) -> None:
        super().freeze()
        self.plans.clear()  # plans know which of their MSRs are frozen

    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        if self.closed:
            raise ClosedError("this vCPU is closed")
        n = len(batch)
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_GET_MSRS")
        buf = batch.buffer
        for i in range(n):
            off = 8 + 16 * i
            index = _ENTRY.unpack_from(buf, off)[0]
            code, value = self.access_get(index)
            struct.pack_into("<Q", buf, off + 8, value if code == OK else 0)
            if code:
                if strict:
                    raise self.vcpu.short_read(batch, i)
                return i
        return n

    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        if self.closed:
            raise ClosedError("this vCPU is closed")
        batch = entries if type(entries) is MsrBatch else as_batch(entries)
        n = batch.nmsrs
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_SET_MSRS")
        # The batch's indices, packed, key its plan; its values come out as one list (both one C-level call each).
        key = batch.words32[2::4].tobytes()
        plan = self.plans.get(key) or self._plan(key)
        values: list[int] = batch.words64[2::2].tolist() if LITTLE_ENDIAN else batch.values
        specials, store_indices, pick, verbatim, frozen = plan
        # Frozen MSRs keep their value through the batch (a different one is refused), so their freeze check can run
        # for the whole batch at once: when every frozen entry carries the value it has, each entry with a setter
        # goes straight to it, as try_set would; otherwise every entry takes the full path.
        fast = frozen is None or (frozen[0](values) == frozen[1](self.stored) and self._same_value_real_write)
        for pos, index, setter in specials:
            data = values[pos]
            if setter is None or not fast:
                code = self.try_set(index, data)
            else:
                if self.refusals:
                    self.refusals.pop(index, None)
                code = setter(data)
            if code:
                if code == KEPT or (code == UNSUPPORTED and self.unsupported_ok(index, data)):
                    verbatim = None  # taken without storing: the bulk store below must leave it alone
                    continue
                indices = batch.indices
                for i in range(pos):  # the store-only entries before the refused one took effect
                    if indices[i] in self.store_only:
                        self._store(indices[i], values[i])
                if strict:
                    raise self.vcpu.short_write(batch, pos)
                return pos
        if verbatim is not None:
            # Every entry with a rule stored its value verbatim under its own index (the setters do), so storing the
            # whole batch in order changes nothing for them and stores the store-only entries: no picking needed.
            self.stored.update(zip(verbatim, values))  # noqa: B905 (same length by construction)
        elif pick is not None:
            self.stored.update(zip(store_indices, pick(values)))  # noqa: B905
        if self.refusals:
            for index in store_indices:
                self.refusals.pop(index, None)
        return n

    def _frozen_check(self, specials: tuple[tuple[int, int, Callable[[int], int] | None], ...]) -> FrozenCheck | None:
        """For a plan: how to get the values a batch gives its frozen MSRs that have setters, and the values they
        hold, so that one comparison does their freeze check (None when no such entry). The values held are read
        straight from ``stored``, so only plain MSRs qualify: any other frozen MSR with a setter gets a check that
        always fails, which sends the batch down the full path."""
        positions = [(pos, index) for pos, index, setter in specials if setter is not None and index in self.frozen]
        if not positions:
            return None
        if any(index not in self._plain for _, index in positions):
            return (_always_mismatch, _nothing)
        return (itemgetter(*(pos for pos, _ in positions)), itemgetter(*(index for _, index in positions)))

    def _store(self, index: int, data: int) -> None:
        """``do_set`` of a store-only MSR."""
        self.refusals.pop(index, None)
        self.stored[index] = data

    def _plan(self, key: bytes) -> WritePlan:
        """How to write a batch naming these MSRs. Store-only MSRs always succeed and only store their value under
        their own index, and no rule reads them (``store_only_msrs``), so the entries with rules can run first, in
        order, and the store-only ones follow in one C-level update: the outcome is the kernel's entry-by-entry one.
        Which MSRs are store-only depends only on the profile and ruleset; the freeze check depends on which MSRs are
        frozen, so plans are rebuilt once, at the freeze."""
        indices = struct.unpack(f"<{len(key) // 4}I", key)  # the raw bytes of the little-endian batch
        store_only = self.store_only
        specials = tuple((i, index, self.setters.get(index)) for i, index in enumerate(indices) if index not in store_only)
        positions = [i for i, index in enumerate(indices) if index in store_only]
        pick: Callable[[list[int]], Sequence[int]] | None = None
        if len(positions) == 1:  # itemgetter of one item gives the item, of a slice a list
            pick = itemgetter(slice(positions[0], positions[0] + 1))
        elif positions:
            pick = itemgetter(*positions)
        # When every entry with a rule is one of the setters' MSRs, which store the value verbatim when they accept
        # it, the whole batch can be stored in order after the rules ran (see set_msrs).
        verbatim = tuple(indices) if all(setter is not None for _, _, setter in specials) else None
        plan = (specials, tuple(indices[i] for i in positions), pick, verbatim, self._frozen_check(specials))
        if len(self.plans) >= _PLAN_CACHE:
            self.plans.clear()
        self.plans[key] = plan
        return plan
