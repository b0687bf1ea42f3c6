"""KVM_GET_MSRS and KVM_SET_MSRS on the model (``msr_io``/``__msr_io``): whole batches over a vCPU's MSR rules.

A batch stops at the first refused entry and returns the count processed; the entries before it took effect. Both
ioctls run by plan, made once per set of indices and cached (``_write_plan``, ``_read_plan``): the MSRs with rules of
their own (``MsrRules.ruled_msrs``) go through the rules one by one, in order; the profile's plain MSRs, classified
once per vCPU by a per-MSR table (``plain_msrs``), are read and written in bulk with C-level calls. The outcome is the
kernel's entry-by-entry one (``tests/test_model_batch_plan.py`` holds it to that on a twin vCPU). This is the model's
hot path: keep it free of per-entry Python work and attribute hops (``benchmarks/run.py``).
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from .. import msrs as M
from .. import uapi
from ..api import LITTLE_ENDIAN, MsrBatch, MsrItems, as_batch, not_a_batch
from ..errors import ClosedError, KvmError
from .msr_misc import Family
from .msr_rules import KEPT, MSR_ALIASES, MSR_MISC_FEATURES_ENABLES, OK, UNSUPPORTED, VM_WIDE_MSRS, MsrRules

if TYPE_CHECKING:
    from .vcpu import ModelVcpu

_ENTRY = struct.Struct("<IIQ")
_PLAN_CACHE = 256  # plans kept per vCPU, for writes and for reads

# How a plain MSR is written (plain_msrs): STORE keeps any value under a key (its own index, or the index a kvmclock
# alias shares), in the vCPU's MSRs or (VM_WIDE) the VM's; ZERO takes only 0 (and keeps it); DROP takes any value and
# keeps nothing (reads give the profile's default).
STORE, VM_WIDE, ZERO, DROP = range(4)
Plain = tuple[int, int, int]  # (how, key, the profile's default)

Setter = Callable[[int], int]
Getter = Callable[[int, bool], tuple[int, int]]
FrozenCheck = tuple[Callable[[memoryview], object], Callable[[dict[int, int]], object]]
Pick = Callable[[memoryview], Sequence[int]]
# A write plan: the entries with rules (position, index, its setter if it has one); the bulk stores, each (the dict,
# the keys, how to pick their values from the batch's values); how to pick the ZERO entries' values; the plain
# entries' positions (for a refusal part-way); the indices when the batch can be stored whole (else None); the freeze
# check of the ruled entries; the set of the plain indices.
WritePlan = tuple[
    "tuple[tuple[int, int, Setter | None], ...]",
    "tuple[tuple[dict[int, int], tuple[int, ...], Pick], ...]",
    "Pick | None",
    tuple[int, ...],
    "tuple[int, ...] | None",
    "FrozenCheck | None",
    frozenset[int],
]
# A read plan: for each entry, the dict its value is in, its key and its default (map(dict.get, ...)); the entries
# read through the rules (position, index).
ReadPlan = tuple[tuple[dict[int, int], ...], tuple[int, ...], tuple[int, ...], "tuple[tuple[int, int, Getter | None], ...]"]


def plain_msrs(rules: MsrRules) -> dict[int, Plain]:
    """The per-MSR table of the profile's plain MSRs: those with no rule of their own, none a rule reads
    (``MsrRules.ruled_msrs``), and how ``host_set``/``host_get`` treat each by its kind, plus the kvmclock aliases. No
    rule reads any of them, so a batch's ruled entries can run first and the plain ones follow in bulk."""
    ruled = rules.ruled_msrs()
    table: dict[int, Plain] = {}
    for index, b in rules.behaviour.items():
        if b.kind in ("refuse", "zero_drop") or not b.readable or index in rules.setters or index in rules.immutable:
            continue  # refused writes or reads, or rules of their own: the rules decide, entry by entry
        alias = MSR_ALIASES.get(index, index)
        if index in MSR_ALIASES or index in MSR_ALIASES.values():  # host_set/host_get: stored under the shared key
            if b.kind not in ("zero_only", "drop"):
                table[index] = (VM_WIDE if alias in VM_WIDE_MSRS else STORE, alias, b.default)
        elif index not in ruled:
            how = {"zero_only": ZERO, "drop": DROP}.get(b.kind, STORE)
            table[index] = (how, index, b.default)
    return table


def _always_mismatch(words: memoryview) -> object:
    return object()


def _nothing(store: dict[int, int]) -> object:
    return None


def _one(key: int) -> Callable[[object], object]:
    """``obj[key]`` as a 1-tuple, to compare with what itemgetter of several keys gives."""
    def get(obj: object) -> object:
        return (obj[key],)  # type: ignore[index]
    return get


def _picker(positions: Sequence[int]) -> Pick:
    """The values of the entries at ``positions`` from a batch's u64 words (entry i's value is word 2 + 2i), as a
    sequence even for one entry (itemgetter of one item gives the item, of a slice a sequence)."""
    words = [2 + 2 * pos for pos in positions]
    if len(words) == 1:
        return itemgetter(slice(words[0], words[0] + 1))
    return itemgetter(*words)


class BatchedMsrRules(MsrRules):
    """A vCPU's MSR rules with the batch ioctls. The vCPU binds ``get_msrs``/``set_msrs`` as its own (see
    ``ModelVcpu.__init__``), so they check that the vCPU is open (``closed``) and raise its strict errors."""

    def __init__(self, vcpu: ModelVcpu) -> None:
        super().__init__(vcpu)
        self.plain = plain_msrs(self)
        # The plain MSRs that keep any value under their own index and share it with none (not kvmclock's).
        shared = {*MSR_ALIASES, *MSR_ALIASES.values()}
        self.store_only = frozenset(i for i, (how, _, _) in self.plain.items() if how == STORE and i not in shared)
        self.closed = False  # set by the vCPU's close()
        self.plans: dict[bytes, WritePlan] = {}
        self.read_plans: dict[bytes, ReadPlan] = {}

    def freeze(self) -> None:
        super().freeze()
        self.plans.clear()  # plans know which of their MSRs are frozen

    # -- KVM_GET_MSRS --
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        if self.closed:
            raise ClosedError("this vCPU is closed")
        try:
            n = batch.nmsrs
        except AttributeError:  # not an MsrBatch: checked here, where it costs nothing when the batch is right
            raise not_a_batch("get_msrs", batch) from None
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_GET_MSRS")
        if not LITTLE_ENDIAN:
            return self._get_one_by_one(batch, strict)
        key = batch.words32[2::4].tobytes()
        dicts, keys, defaults, ruled = self.read_plans.get(key) or self._read_plan(key)
        if not ruled:  # all plain: every value in one C-level pass, written back in one
            batch.words64[2::2] = array("Q", map(dict.get, dicts, keys, defaults))
            return n
        values = list(map(dict.get, dicts, keys, defaults))
        access_get = self.access_get
        for pos, index, getter in ruled:
            code, value = getter(index, True) if getter is not None else access_get(index)
            if code:  # the batch stops here: redo it entry by entry, which writes and zeroes as the kernel does
                return self._get_one_by_one(batch, strict)
            values[pos] = value
        batch.words64[2::2] = array("Q", values)
        return n

    def _get_one_by_one(self, batch: MsrBatch, strict: bool) -> int:
        buf = batch.buffer
        for i in range(batch.nmsrs):
            off = 8 + 16 * i
            index = _ENTRY.unpack_from(buf, off)[0]
            code, value = self.access_get(index)
            struct.pack_into("<Q", buf, off + 8, value if code == OK else 0)
            if code:
                if strict:
                    raise self.vcpu.short_read(batch, i)
                return i
        return batch.nmsrs

    def _read_plan(self, key: bytes) -> ReadPlan:
        """Plain MSRs read from the dict that holds them (a DROP MSR's key is never stored, so its default comes
        back); the others go through ``access_get``, with a placeholder in the bulk read. Plans hold the dicts
        themselves (``stored``, the VM's ``msrs``): code that replaced either, rather than updating it, would have to
        clear ``plans`` and ``read_plans``."""
        indices = struct.unpack(f"<{len(key) // 4}I", key)
        stores = {STORE: self.stored, VM_WIDE: self.vm.msrs, ZERO: self.stored, DROP: {}}
        dicts, keys, defaults, ruled = [], [], [], []
        for pos, index in enumerate(indices):
            plain = self.plain.get(index)
            if plain is None:
                ruled.append((pos, index, self._direct_get(index)))
                dicts.append(self.stored)
                keys.append(index)
                defaults.append(0)
            else:
                how, k, default = plain
                dicts.append(stores[how])
                keys.append(k if how != DROP else index)
                defaults.append(default)
        plan = (tuple(dicts), tuple(keys), tuple(defaults), tuple(ruled))
        if len(self.read_plans) >= _PLAN_CACHE:
            self.read_plans.clear()
        self.read_plans[key] = plan
        return plan

    # -- KVM_SET_MSRS --
    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        if self.closed:
            raise ClosedError("this vCPU is closed")
        batch = entries if type(entries) is MsrBatch else as_batch(entries)
        n = batch.nmsrs
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_SET_MSRS")
        if not LITTLE_ENDIAN:
            return self._set_one_by_one(batch, strict)
        # The batch's indices, packed, key its plan (one C-level call). Values are read straight from the buffer's
        # u64 words (entry i's value is word 2 + 2i), by the plan's itemgetters: no list of them is built.
        key = batch.words32[2::4].tobytes()
        plan = self.plans.get(key) or self._write_plan(key)
        words = batch.words64
        ruled, stores, zero, plain_positions, whole, frozen, plain_set = plan
        if zero is not None and any(zero(words)):
            return self._set_one_by_one(batch, strict)  # a ZERO MSR refuses its value: the kernel's order decides
        # Frozen MSRs keep their value through the batch (a different one is refused), so their freeze check can run
        # for the whole batch at once: when every frozen entry carries the value it has, each entry with a setter
        # goes straight to it, as try_set would; otherwise every ruled entry takes the full path.
        fast = frozen is None or (frozen[0](words) == frozen[1](self.stored) and self._same_value_real_write)
        refusals, frozen_now = self.refusals, self.frozen
        for pos, index, setter in ruled:
            data = words[2 + 2 * pos]
            if setter is None or (not fast and index in frozen_now):  # an MSR not frozen has no freeze check to run
                code = self.try_set(index, data)
            else:
                if refusals:
                    refusals.pop(index, None)
                code = setter(data)
            if code:
                if code == KEPT or (code == UNSUPPORTED and self.unsupported_ok(index, data)):
                    whole = None  # taken without storing: the whole-batch store below must leave it alone
                    continue
                for i in plain_positions:  # the plain entries before the refused one took effect, in order
                    if i > pos:
                        break
                    self.do_set(*batch[i])
                if strict:
                    raise self.vcpu.short_write(batch, pos)
                return pos
        if whole is not None:
            # Every ruled entry stored its value verbatim under its own index (the setters do), as every plain one
            # does: storing the whole batch in order changes nothing for the ruled ones and stores the plain ones.
            self.stored.update(zip(whole, words[2::2]))  # noqa: B905 (same length by construction)
        else:
            for store, keys, pick in stores:
                store.update(zip(keys, pick(words)))  # noqa: B905
        if refusals and not plain_set.isdisjoint(refusals):  # each write of a plain MSR clears its last refusal
            for index in plain_set & refusals.keys():
                del refusals[index]
        return n

    def _direct_get(self, index: int) -> Getter | None:
        """The host-side read handler of ``index``'s emulated family, which ``access_get`` reaches for it (a failed
        read sends the batch entry by entry through ``access_get``); None for the others."""
        if index == MSR_MISC_FEATURES_ENABLES or M.VMX_FIRST <= index <= M.VMX_LAST:
            return None
        family = self.families.get(index)
        if family is None:
            return None
        if isinstance(family, Family):
            return family.handlers[index][0]
        return family.get

    def _direct(self, index: int) -> Setter | None:
        """What ``try_set`` ends at for ``index`` once its freeze check passed: the MSR's setter, or the host-side
        handler of its emulated family (``host_set`` reaches it when there is no setter and it is no VMX MSR); None
        for the others, which take the full path."""
        setter = self.setters.get(index)
        if setter is not None or index in self.immutable or M.VMX_FIRST <= index <= M.VMX_LAST:
            return setter
        family = self.families.get(index)
        if family is None:
            return None
        if isinstance(family, Family):  # its handler directly, without the family's own dispatch
            handler = family.handlers[index][1]
            return lambda data: handler(index, data, True)
        return lambda data: family.set(index, data, True)

    def _set_one_by_one(self, batch: MsrBatch, strict: bool) -> int:
        for i, (index, data) in enumerate(batch):
            if self.do_set(index, data):
                if strict:
                    raise self.vcpu.short_write(batch, i)
                return i
        return batch.nmsrs

    def _frozen_check(self, ruled: tuple[tuple[int, int, Setter | None], ...]) -> FrozenCheck | None:
        """For a plan: how to get the values a batch gives its frozen MSRs that have setters, and the values they
        hold, as tuples, so that one comparison does their freeze check (None when no such entry); on a match each
        goes straight to its setter, as ``try_set`` would after its check.

        Plain-read MSRs (``_plain``) are read straight from ``stored``. Any other is read as ``try_set`` reads it
        (``access_get``). Such a read can record a refusal (a CPUID-gated feature MSR without its bit), which the
        kernel's order records only when it reaches the entry, so the reads run against a scratch refusal record: a
        read that records anything counts as a mismatch and the ruled entries take the full path, in order. The
        read-ahead needs reads that no earlier entry of the batch can change: no VMX MSR (control pairs share a slot)
        and no frozen MSR twice; otherwise the check always fails."""
        positions = [(pos, index) for pos, index, setter in ruled if setter is not None and index in self.frozen]
        if not positions:
            return None
        words = [2 + 2 * pos for pos, _ in positions]
        indices = tuple(index for _, index in positions)
        given: Callable[[memoryview], object] = itemgetter(*words) if len(words) > 1 else _one(words[0])
        if all(index in self._plain for index in indices):
            return given, itemgetter(*indices) if len(indices) > 1 else _one(indices[0])
        if len(set(indices)) < len(indices) or any(M.VMX_FIRST <= index <= M.VMX_LAST for index in indices):
            return (_always_mismatch, _nothing)
        access_get = self.access_get
        recorded_once: list[bool] = []  # set when a read recorded a refusal: from then on the plan skips the read-ahead

        def held(stored: dict[int, int]) -> object:
            if recorded_once:  # the full path reads again anyway: do not read twice (only speed depends on this)
                return _nothing
            saved, self.refusals = self.refusals, {}
            try:
                values = tuple(value if code == OK else None for code, value in map(access_get, indices))
                recorded = bool(self.refusals)
            finally:
                self.refusals = saved
            if recorded:
                recorded_once.append(True)
                return _nothing
            return values

        return given, held

    def _write_plan(self, key: bytes) -> WritePlan:
        """How to write a batch naming these MSRs. Plain MSRs always take a value their kind allows and only store
        it (``plain_msrs``), and no rule reads them, so the ruled entries can run first, in order, and the plain ones
        follow in C-level updates (one per dict): the outcome is the kernel's entry-by-entry one. ZERO entries are
        checked before anything runs. Which MSRs are plain depends only on the profile and ruleset; the freeze check
        depends on which MSRs are frozen, so plans are rebuilt once, at the freeze."""
        indices = struct.unpack(f"<{len(key) // 4}I", key)  # the raw bytes of the little-endian batch
        plain, setters = self.plain, self.setters
        ruled = tuple((i, index, self._direct(index)) for i, index in enumerate(indices) if index not in plain)
        by_store: dict[int, tuple[list[int], list[int]]] = {STORE: ([], []), VM_WIDE: ([], [])}  # keys, positions
        zero = []
        for pos, index in enumerate(indices):
            how, k, _ = plain.get(index, (-1, 0, 0))
            if how == ZERO:
                zero.append(pos)
            if how in (STORE, ZERO, VM_WIDE):
                keys, positions = by_store[VM_WIDE if how == VM_WIDE else STORE]
                keys.append(k)
                positions.append(pos)
        stores = tuple((self.stored if which == STORE else self.vm.msrs, tuple(keys), _picker(positions))
                       for which, (keys, positions) in by_store.items() if keys)
        # When every entry is stored verbatim under its own index (plain STORE/ZERO entries, and setters, which store
        # the value verbatim when they accept it), the whole batch can be stored in order in one update.
        verbatim = all(index in setters for _, index, _ in ruled) and all(
            plain[i][0] in (STORE, ZERO) and plain[i][1] == i for i in indices if i in plain)
        plain_positions = tuple(pos for pos, index in enumerate(indices) if index in plain)
        plan = (ruled, stores, _picker(zero) if zero else None, plain_positions, indices if verbatim else None,
                self._frozen_check(ruled), frozenset(i for i in indices if i in plain))
        if len(self.plans) >= _PLAN_CACHE:
            self.plans.clear()
        self.plans[key] = plan
        return plan
