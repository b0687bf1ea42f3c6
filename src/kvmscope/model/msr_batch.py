"""KVM_SET_MSRS on the model (``msr_io``/``__msr_io``), over a vCPU's MSR rules; KVM_GET_MSRS is in ``msr_reads``.

A batch stops at the first refused entry and returns the count processed; the entries before it took effect. Both
ioctls run by plan, made once per set of indices and cached (``_write_plan``, ``_read_plan``): the MSRs with rules of
their own (``MsrRules.ruled_msrs``) go through the rules one by one, in order; the profile's plain MSRs, classified
once per vCPU by a per-MSR table (``plain_msrs``), are read and written in bulk with C-level calls. Of the ruled
entries, those whose write always passes and changes nothing, or is always unsupported and forgiven for 0
(``Family.write_kind``), are decided by the plan without a call, and the others call their handler directly
(``_quick_plan``). The outcome is the kernel's entry-by-entry one (``tests/test_model_batch_plan.py`` holds it to
that on a twin vCPU, over every MSR the index lists and the emulated families have). This is the model's hot path:
keep it free of per-entry Python work and attribute hops (``benchmarks/run.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import add, and_, itemgetter
from typing import TYPE_CHECKING, cast

from .. import msrs as M
from ..api import MsrBatch, MsrItems, as_batch
from ..errors import ClosedError
from ..kernel import emulated as E
from ..kernel.rule import Rule
from .msr_compiled import direct_plan
from .msr_family import Family, MsrFamily
from .msr_plan import (
    FrozenCheck,
    Pick,
    QuickPlan,
    Setter,
    WritePlan,
    always_mismatch,
    checks_pass,
    groups_pass,
    keyed_store,
    no_values,
    nothing,
    one,
    picker,
    plain_stores,
    type_span,
    types_valid,
)
from .msr_reads import PLAN_CACHE, STORE, VM_WIDE, ZERO, ReadingMsrRules
from .msr_rules import KEPT, OK, UNSUPPORTED
from .msr_setter_checks import setter_check, setter_refusal

if TYPE_CHECKING:
    from .vcpu import ModelVcpu


NO_PLAN = cast("tuple[memoryview | None, WritePlan]", (None, None))  # equal to no batch's indices
_ALL_STORED, _TAKEN_NOT_STORED = -1, -2  # how the ruled entries of a batch all passed (_run_ruled, _run_quick)

class BatchedMsrRules(ReadingMsrRules):
    """A vCPU's MSR rules with the batch ioctls. The vCPU binds ``get_msrs``/``set_msrs`` as its own (see
    ``ModelVcpu.__init__``), so they check that the vCPU is open (``closed``) and raise its strict errors."""

    def __init__(self, vcpu: ModelVcpu) -> None:
        super().__init__(vcpu)
        self.plans: dict[bytes, WritePlan] = {}
        # the last batch's indices (a view of its plan's key, None for none) and its plan: cleared with ``plans``
        self.last_plan: tuple[memoryview | None, WritePlan] = NO_PLAN
        self.frozen_reads: dict[int, Rule] | None = None  # what a batch's freeze check recorded (_frozen_check)

    def freeze(self) -> None:
        super().freeze()
        self.plans.clear()
        self.last_plan = NO_PLAN  # plans know which of their MSRs are frozen

    def config_changed(self) -> None:
        """The vCPU's CPUID or MCG_CAP changed: plans decide by both (``write_check``, ``setter_refusal``,
        ``read_decided``)."""
        super().config_changed()
        self.plans.clear()
        self.last_plan = NO_PLAN

    # -- KVM_SET_MSRS --
    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        if type(entries) is MsrBatch:
            batch = entries
        else:
            if self.closed:
                raise ClosedError("this vCPU is closed")
            batch = as_batch(entries)
        n = batch.nmsrs
        # The batch's indices, packed, key its plan; a batch naming the MSRs the last one named (a VMM's save and
        # restore) is known by comparing the two views, in a third of the time. Values are read straight from the
        # buffer (entry i's value is u64 word 2 + 2i) by the plan's pickers: no list is built.
        indices = batch.indices32
        last = self.last_plan
        if indices == last[0]:  # the same indices as a batch that passed the checks below (``close`` forgets it)
            plan = last[1]
        else:
            if not self.batch_checked(n, "KVM_SET_MSRS"):
                return self._set_one_by_one(batch, strict)
            key = indices.tobytes()
            plan = self.plans.get(key) or self._write_plan(key)
            self.last_plan = (memoryview(key).cast("I"), plan)
        words = batch.words64
        direct = plan[9]
        # nothing to call, no freeze check: the plan's own function checks the batch and, when it passes, takes it
        if direct is not None and direct[0](batch.raw, words, self.refusals):
            return n
        ruled, stores, zero, plain_positions, whole, frozen, plain_set, quick, checked, _ = plan
        if zero is not None and any(zero(words)):
            return self._set_one_by_one(batch, strict)  # a ZERO MSR refuses its value: the kernel's order decides
        # Frozen MSRs keep their value through the batch (a different one is refused), so their freeze check can run
        # for the whole batch at once: when every frozen entry carries the value it has, each entry with a setter
        # goes straight to it, as try_set would; otherwise every ruled entry takes the full path.
        if ruled:  # a batch of plain MSRs alone (the 1-MSR case) goes straight to the stores
            # The refusals the check's reads recorded (``_frozen_check``) are recorded as each entry's turn comes.
            reads: dict[int, Rule] | None = None
            if frozen is None:
                fast = True
            else:
                self.frozen_reads = None
                fast = frozen[0](words) == frozen[1](self.stored) and self._same_value_real_write
                reads = self.frozen_reads if fast else None
            refusals = self.refusals
            use_quick = fast and quick is not None and not (quick[1] is not None and any(quick[1](words)))
            if use_quick and checked is not None:  # every write_check passes (C-level): no handler of theirs runs
                checks = checked[10]
                assert checks is not None  # the checked variant has checks (``_quick_plan``)
                pick, offsets, masks, _, _, types = checks
                values = pick(words)
                if (not any(map(and_, map(add, values, offsets), masks)) or checks_pass(self.vm.has_memory, checks, values)
                        ) and (types is None or types_valid(batch.raw, types)):
                    quick = checked
                    if not quick[0] and not quick[6]:  # nothing to call, no group to check: no entry is refused
                        wipe = quick[11]
                        if refusals and not wipe.isdisjoint(refusals):  # each write clears its MSR's last refusal
                            for index in wipe & refusals.keys():
                                del refusals[index]
                        if reads:  # then records what its freeze check's read records
                            refusals.update(reads)
                        if quick[5]:
                            refusals.update(quick[5])  # what the read-only entries record
                        if quick[7] is not None:
                            self.stored.update(zip(quick[7][0], quick[7][1](words)))  # noqa: B905
                        for store, keys, pick in quick[9]:  # type: ignore[union-attr]
                            store.update(zip(keys, pick(words)))  # noqa: B905
                        return n
            if use_quick and quick[6] and not groups_pass(quick[6], words):  # type: ignore[index]
                use_quick = False
            if use_quick:
                assert quick is not None
                cleared = quick[3]
                if reads or (refusals and not cleared.keys().isdisjoint(refusals)):
                    # each write clears its MSR's last refusal and records what its freeze check's read records: do both
                    # now, and undo them for the entries after a refused one (only which rule is on record counts)
                    where = quick[12]
                    held = {index: refusals.pop(index) for index in (cleared.keys() | (reads or {}).keys())
                            & refusals.keys()}
                    if reads:
                        refusals.update(reads)
                    stop = self._run_quick(quick, words)
                    if stop >= 0:
                        for index in reads or ():
                            if where[index] > stop:
                                refusals.pop(index, None)
                        refusals.update((index, rule) for index, rule in held.items() if where[index] > stop)
                else:
                    stop = self._run_quick(quick, words)
                if stop < 0 and quick[7] is not None:  # the grouped entries, checked above: stored verbatim
                    self.stored.update(zip(quick[7][0], quick[7][1](words)))  # noqa: B905
                plain_positions = quick[8]
                if quick[9] is not None:  # the checked variant stored the plain entries with the grouped ones
                    whole, stores = None, quick[9]
            else:
                # a frozen MSR checked only by its 0 (``_zero_only_refused``) needs try_set's freeze check here
                stop = self._run_ruled(ruled, words, fast and not any(
                    index in self.frozen and self._zero_only_refused(index) for _, index, _ in ruled), reads)
            if stop == _TAKEN_NOT_STORED:
                whole = None  # taken without storing: the whole-batch store below must leave it alone
            if stop >= 0:
                for i in plain_positions:  # the plain (and grouped) entries before the refused one took effect, in order
                    if i > stop:
                        break
                    self.do_set(*batch[i])
                if strict:
                    raise self.vcpu.short_write(batch, stop)
                return stop
        if whole is not None:
            # Every ruled entry stored its value verbatim under its own index (the setters do), as every plain one
            # does: storing the whole batch in order changes nothing for the ruled ones and stores the plain ones.
            self.stored.update(zip(whole, words[2::2]))  # noqa: B905 (same length by construction)
        else:
            for store, keys, pick in stores:
                store.update(zip(keys, pick(words)))  # noqa: B905
        refusals = self.refusals
        if refusals and not plain_set.isdisjoint(refusals):  # each write of a plain MSR clears its last refusal
            for index in plain_set & refusals.keys():
                del refusals[index]
        return n

    def _run_ruled(self, ruled: tuple[tuple[int, int, Setter | None], ...], words: memoryview, fast: bool,
                   reads: dict[int, Rule] | None) -> int:
        """The ruled entries in order, each through its setter or (frozen ones when the batch's freeze check failed,
        and those without a setter) ``try_set``: the position of the refused one, else _ALL_STORED or
        _TAKEN_NOT_STORED."""
        refusals, frozen_now, taken = self.refusals, self.frozen, _ALL_STORED
        for pos, index, setter in ruled:
            data = words[2 + 2 * pos]
            if setter is None or (not fast and index in frozen_now):  # an MSR not frozen has no freeze check to run
                code = self.try_set(index, data)
            else:
                if refusals:
                    refusals.pop(index, None)
                if reads and index in reads:  # what the freeze check's read of it recorded
                    refusals[index] = reads[index]
                code = setter(data)
            if code:
                if code == KEPT or (code == UNSUPPORTED and self.unsupported_ok(index, data)):
                    taken = _TAKEN_NOT_STORED
                    continue
                return pos
        return taken

    def _run_quick(self, quick: QuickPlan, words: memoryview) -> int:
        """The ruled entries as ``_run_ruled`` runs them, once their refusals on record are cleared (by the caller)
        and when the read-only ones' values pass: only the handlers that must run are called; the read-only
        entries' refusals are recorded as their handler records them. The position of the refused entry, else
        _TAKEN_NOT_STORED (the read-only and ignored entries store nothing)."""
        calls, _, read_only, _, pick, recorded = quick[:6]
        taken = _TAKEN_NOT_STORED if read_only else _ALL_STORED
        for (pos, index, fn, form), data in zip(calls, pick(words)):  # noqa: B905 (same length by construction)
            code = fn(data) if form == 0 else fn(index, data, True) if form == 1 else fn(index, data)
            if code:
                if code == KEPT or (code == UNSUPPORTED and self.unsupported_ok(index, data)):
                    taken = _TAKEN_NOT_STORED
                    continue
                self.refusals.update((i, rule) for p, i, rule in read_only if p < pos)
                return pos
        if recorded:
            self.refusals.update(recorded)
        return taken

    def _quick_plan(self, ruled: tuple[tuple[int, int, Setter | None], ...], plain_positions: tuple[int, ...],
                    stores: tuple[tuple[dict[int, int], tuple[int, ...], Pick], ...] | None = None,
                    plain_store: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                    plain_set: frozenset[int] | None = None) -> QuickPlan | None:
        """The quick path of a plan's ruled entries (``QuickPlan``); None when a ruled MSR comes twice (a second
        write must clear what the first recorded). Given the plan's stores and its plain entries stored in
        ``stored`` (keys, positions), the checked variant instead: the entries with a ``write_check`` are checked
        at once, not called, and stored with the grouped and plain ones; None when no entry has a check."""
        if len({index for _, index, _ in ruled}) < len(ruled):
            return None
        calls: list[tuple[int, int, Callable[..., int], int]] = []
        read_only: list[tuple[int, int, Rule]] = []
        zero_only: list[int] = []
        checks: list[tuple[int, int, tuple[int, int, bool]]] = []  # position, index, check
        types = 0  # the bytes of the batch's buffer that must be memory types (``memory_types``), 0xFF each
        groups: dict[tuple[int, str], tuple[MsrFamily, list[int], list[int]]] = {}  # (family, kind): indices, positions
        for pos, index, setter in ruled:
            family = self.families.get(index)
            handler = self._family_handler(index)
            if plain_store is not None and (handler is not None or setter is not None):
                check = setter_check(self, index) if handler is None else family.write_check(index)  # type: ignore[union-attr]
                if check is not None:
                    checks.append((pos, index, check))
                    if handler is not None:
                        types |= family.memory_types(index) << (128 + 128 * pos)  # type: ignore[union-attr]
                    continue
            group = family.bulk_kind(index) if handler is not None and family is not None else None
            if group is not None:
                assert family is not None
                _, group_indices, group_positions = groups.setdefault((id(family), group), (family, [], []))
                group_indices.append(index)
                group_positions.append(pos)
                continue
            kind = family.write_kind(index) if handler is not None and isinstance(family, Family) else None
            if kind == "ignored":
                continue
            refusal = E.READ_ONLY if kind == "read_only" else setter_refusal(self, index) if handler is None else None
            if refusal is not None and (self.profile.ignore_msrs or (
                    self.rules.unsupported_zero and index in self._advertised)):
                read_only.append((pos, index, refusal))
                if not self.profile.ignore_msrs:
                    zero_only.append(pos)
                continue
            if handler is not None:
                calls.append((pos, index, handler, 1))
            elif setter is not None:
                calls.append((pos, index, setter, 0))
            else:
                calls.append((pos, index, self.try_set, 2))
        if plain_store is not None and not checks:
            return None
        kept = {index: rule for _, index, rule in read_only}
        cleared = {index: pos for pos, index, _ in ruled if index not in kept}
        pick = picker([pos for pos, _, _, _ in calls]) if calls else no_values
        bulk = tuple((family.bulk_ok, kind, tuple(indices), picker(positions))
                     for (_, kind), (family, indices, positions) in groups.items() if kind != "any")
        in_bulk = sorted([*((pos, index) for _, indices, positions in groups.values()
                            for pos, index in zip(positions, indices, strict=True)),
                          *((pos, index) for pos, index, _ in checks)])
        after = None
        if plain_store is not None:
            if {index for _, index in in_bulk} & set(plain_store[0]):
                return None  # a plain key that a ruled entry also stores: the ruled stores must come first
            # the plain entries bound for ``stored`` join the one update, in batch order; the other stores stay
            in_bulk = sorted([*in_bulk, *zip(plain_store[1], plain_store[0], strict=True)])
            after = tuple(store for store in stores or () if store[0] is not self.stored)
        store = keyed_store(in_bulk)
        before = tuple(sorted({*plain_positions, *(pos for pos, _ in in_bulk)}))
        checked = None
        if checks:  # an address's enable bit joins its mask: the C-level pass fails it, checks_pass looks closer
            checks = [check for check in checks if check[2][1] or check[2][2]]  # a mask of 0 always passes
            checked = (picker([pos for pos, _, _ in checks]) if checks else no_values,
                       tuple(offset for _, _, (offset, _, _) in checks),
                       tuple(mask | gpa for _, _, (_, mask, gpa) in checks),
                       tuple(bool(gpa) for _, _, (_, _, gpa) in checks), tuple(pos for pos, _, _ in checks),
                       type_span(types))
        wipe = frozenset(cleared) | (plain_set or frozenset())  # the MSRs whose write clears their last refusal
        return (tuple(calls), picker(zero_only) if zero_only else None, tuple(read_only), cleared, pick,
                kept, bulk, store, before, after, checked, wipe, {index: pos for pos, index, _ in ruled})

    def _family_handler(self, index: int) -> Callable[[int, int, bool], int] | None:
        """The family handler ``try_set`` ends at for ``index`` (as ``_direct``), called as ``f(index, data, True)``;
        None for an MSR with a setter or none of these."""
        if index in self.setters or index in self.immutable or index in self.frozen or (
                M.VMX_FIRST <= index <= M.VMX_LAST):
            return None
        family = self.families.get(index)
        if family is None:
            return None
        return family.handlers[index][1] if isinstance(family, Family) else family.set

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

    def _zero_only_refused(self, index: int) -> bool:
        """A frozen MSR whose write is refused as unsupported and forgiven for 0 alone, whose read gives 0 and
        records the write's rule (``setter_refusal``, ``read_decided``): the plan's check that its value is 0 is
        then its freeze check, so it needs none of its own (the full path, ``try_set``, still runs one)."""
        return not self.profile.ignore_msrs and self.unsupported_ok(index, 0) and setter_refusal(self, index) is not None

    def _frozen_check(self, ruled: tuple[tuple[int, int, Setter | None], ...]) -> FrozenCheck | None:
        """For a plan: how to get the values a batch gives its frozen MSRs that have setters, and the values they
        hold, as tuples, so that one comparison does their freeze check (None when no such entry); on a match each
        goes straight to its setter, as ``try_set`` would after its check.

        Plain-read MSRs (``_plain``) are read straight from ``stored``. Any other is read as ``try_set`` reads it
        (``access_get``). Such a read can record a refusal (a CPUID-gated feature MSR without its bit, read as 0),
        which the kernel's order records only when it reaches the entry, so the reads run against a scratch refusal
        record, left in ``frozen_reads`` for ``set_msrs`` to record at each entry's turn. The read-ahead needs reads
        that no earlier entry of the batch can change: no VMX MSR (control pairs share a slot) and no frozen MSR
        twice; otherwise the check always fails."""
        positions = [(pos, index) for pos, index, setter in ruled
                     if setter is not None and index in self.frozen and not self._zero_only_refused(index)]
        if not positions:
            return None
        words = [2 + 2 * pos for pos, _ in positions]
        indices = tuple(index for _, index in positions)
        given: Callable[[memoryview], object] = itemgetter(*words) if len(words) > 1 else one(words[0])
        if all(index in self._plain for index in indices):
            return given, itemgetter(*indices) if len(indices) > 1 else one(indices[0])
        if len(set(indices)) < len(indices) or any(M.VMX_FIRST <= index <= M.VMX_LAST for index in indices):
            return (always_mismatch, nothing)
        access_get = self.access_get
        kept = itemgetter(*indices) if len(indices) > 1 else one(indices[0])
        # A read of a feature MSR (no VMX MSR here) depends on the vCPU's CPUID and the MSR's stored value only, and
        # frozen ones change neither, so the reads are made again only when either changed.
        last: list[object] = [None, None, (), {}]  # the CPUID list, the stored values, the values read, the records

        def held(stored: dict[int, int]) -> object:
            cpuid, now = self.vcpu.cpuid, kept(stored)
            if last[0] is cpuid and last[1] == now:
                self.frozen_reads = last[3]  # type: ignore[assignment]
                return last[2]
            saved, self.refusals = self.refusals, {}
            try:
                values = tuple(value if code == OK else None for code, value in map(access_get, indices))
                self.frozen_reads = self.refusals
            finally:
                self.refusals = saved
            last[:] = [cpuid, now, values, self.frozen_reads]
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
        stores, vm_wide = plain_stores(self.stored, by_store[STORE], self.vm.msrs, by_store[VM_WIDE])
        # When every entry is stored verbatim under its own index (plain STORE/ZERO entries, and setters, which store
        # the value verbatim when they accept it), the whole batch can be stored in order in one update.
        verbatim = all(index in setters for _, index, _ in ruled) and all(
            plain[i][0] in (STORE, ZERO) and plain[i][1] == i for i in indices if i in plain)
        plain_positions = tuple(pos for pos, index in enumerate(indices) if index in plain)
        in_stored = (tuple(by_store[STORE][0]), tuple(by_store[STORE][1]))  # the plain entries bound for ``stored``
        plain_set = frozenset(i for i in indices if i in plain)
        frozen = self._frozen_check(ruled)
        checked = self._quick_plan(ruled, plain_positions, stores, in_stored, plain_set)
        plan = (ruled, stores, picker(zero) if zero else None, plain_positions, indices if verbatim else None,
                frozen, plain_set, self._quick_plan(ruled, plain_positions), checked,
                direct_plan(checked, zero, self.profile.ignore_msrs, self.stored, vm_wide) if frozen is None else None)
        if len(self.plans) >= PLAN_CACHE:
            self.plans.clear()
        self.plans[key] = plan
        return plan
