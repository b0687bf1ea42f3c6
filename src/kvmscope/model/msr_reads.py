"""KVM_GET_MSRS on the model (``msr_io`` reading), by plan, and the table of the profile's plain MSRs that both batch
ioctls use (``plain_msrs``). ``msr_batch`` adds KVM_SET_MSRS on top; its docstring says how plans work."""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, cast

from .. import msrs as M
from .. import uapi
from ..api import LITTLE_ENDIAN, MsrBatch, not_a_batch
from ..errors import ClosedError, KvmError
from ..kernel import rulesets as R
from .msr_compiled import CompiledRead, ReadGuard, compile_read
from .msr_family import Family, MsrFamily
from .msr_rules import MSR_ALIASES, MSR_MISC_FEATURES_ENABLES, OK, UNSUPPORTED, VM_WIDE_MSRS, MsrRules
from .msr_setter_checks import read_decided

if TYPE_CHECKING:
    from ..kernel.rule import Rule
    from .vcpu import ModelVcpu

ENTRY = struct.Struct("<IIQ")
PLAN_CACHE = 256  # plans kept per vCPU, for writes and for reads

# How a plain MSR is written (plain_msrs): STORE keeps any value under a key (its own index, or the index a kvmclock
# alias shares), in the vCPU's MSRs or (VM_WIDE) the VM's; ZERO takes only 0 (and keeps it); DROP takes any value and
# keeps nothing (reads give the profile's default).
STORE, VM_WIDE, ZERO, DROP = range(4)
Plain = tuple[int, int, int]  # (how, key, the profile's default)

Getter = Callable[[int, bool], tuple[int, int]]
# A read plan: for each entry, the dict its value is in, its key and its default (map(dict.get, ...)); the entries
# read through the rules (position, index); the checks that let the grouped entries be read in bulk (each the family's
# ``bulk_read_ok``, the group and its indices; when one fails the batch is read entry by entry); the refusals that
# entries read as forgiven record (``read_decided``: a feature MSR refused under the CPUID now reads as 0); and the
# quick read (``quick_read``), or None; and, when every entry is plain and there is a quick read, the plan compiled
# (``msr_compiled.compile_read``), else None.
ReadPlan = tuple[
    tuple[dict[int, int], ...], tuple[int, ...], tuple[int, ...], "tuple[tuple[int, int, Getter | None], ...]",
    "tuple[ReadGuard, ...]", "dict[int, Rule]", "QuickRead | None", "CompiledRead | None"]
# A read of every entry from ``stored`` by one itemgetter (a C-level pass that makes a tuple, which ``array`` takes
# in half the time of an iterator), with each constant under its ``constant_key`` and a placeholder for each entry
# whose value is elsewhere: those entries follow (position, the dict, the key, the default). A key ``stored`` lacks
# (an MSR not yet written) raises KeyError: that batch takes ``map(dict.get, ...)``.
QuickRead = tuple[Callable[[dict[int, int]], Sequence[int]], tuple[tuple[int, dict[int, int], int, int], ...]]
NO_READ_PLAN = cast("tuple[memoryview | None, ReadPlan]", (None, None))  # equal to no batch's indices


def constant_key(value: int) -> int:
    """The key under which ``stored`` holds the constant ``value`` for batch reads: negative, so never an MSR's."""
    return -1 - value


def quick_read(stored: dict[int, int], vm_msrs: dict[int, int], dicts: Sequence[dict[int, int]], keys: Sequence[int],
               defaults: Sequence[int], constants: set[int]) -> QuickRead | None:
    """The ``QuickRead`` of a read plan's entries; None when fewer than two are read from ``stored`` (itemgetter of
    one key gives no sequence). A source other than ``stored`` and the VM's ``vm_msrs`` is an empty dict of the plan's
    own (a DROP MSR, a read forgiven as 0): it reads its default, which ``stored`` is given under its
    ``constant_key`` here (and the key added to ``constants``), so that the one pass reads it too."""
    getter_keys: list[int] = []
    live = []
    for pos, (source, key, default) in enumerate(zip(dicts, keys, defaults, strict=True)):
        if source is vm_msrs:
            live.append((pos, source, key, default))
            getter_keys.append(constant_key(0))  # a placeholder
        elif source is stored:
            getter_keys.append(key)
        else:
            assert not source, "a read plan's own source holds nothing"
            getter_keys.append(constant_key(default))
    if len(getter_keys) - len(live) < 2:
        return None
    for key in getter_keys:
        if key < 0:
            stored[key] = -1 - key
            constants.add(key)
    return itemgetter(*getter_keys), tuple(live)


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

class ReadingMsrRules(MsrRules):
    """A vCPU's MSR rules with KVM_GET_MSRS; the vCPU binds ``get_msrs`` as its own (see ``ModelVcpu.__init__``), so
    it checks that the vCPU is open (``closed``) and raises its strict errors."""

    def __init__(self, vcpu: ModelVcpu) -> None:
        super().__init__(vcpu)
        self._plain_table: dict[int, Plain] | None = None  # made when a plan first needs it (``plain``)
        self.closed = False  # set by the vCPU's close()
        self.read_plans: dict[bytes, ReadPlan] = {}
        self.constant_keys: set[int] = set()  # the keys of ``stored`` that hold constants (``constant_key``)
        # the last batch's indices (a view of its plan's key, None for none) and its plan: cleared with ``read_plans``
        self.last_read_plan: tuple[memoryview | None, ReadPlan] = NO_READ_PLAN
        self._refused_read_zeroed = self.rules.has(R.REFUSED_READ_ZEROED)

    @property
    def plain(self) -> dict[int, Plain]:
        """The table of the profile's plain MSRs (``plain_msrs``), made on first use and after ``rules_changed``."""
        if self._plain_table is None:
            self._plain_table = plain_msrs(self)
        return self._plain_table

    @property
    def store_only(self) -> frozenset[int]:
        """The plain MSRs that keep any value under their own index and share it with none (not kvmclock's)."""
        shared = {*MSR_ALIASES, *MSR_ALIASES.values()}
        return frozenset(i for i, (how, _, _) in self.plain.items() if how == STORE and i not in shared)

    def close(self) -> None:
        """The vCPU closed: every call raises ClosedError from now on (the batch ioctls check on a miss of their last
        plan, which this forgets with every plan)."""
        self.closed = True
        self.config_changed()

    def config_changed(self) -> None:
        """The vCPU's CPUID or MCG_CAP changed: read plans decide by both (``read_decided``)."""
        self.read_plans.clear()
        self.last_read_plan = NO_READ_PLAN

    def take_rules(self, setters: dict[int, Callable[[int], int]], unowned: Sequence[int]) -> None:
        """Give ``setters`` their MSRs and take ``unowned`` from their families (an in-kernel LAPIC's rules, at vCPU
        reset): the table of plain MSRs and every plan are made again, as they decide by both."""
        self.setters.update(setters)
        for index in unowned:
            self.families.pop(index, None)
        self.rules_changed()

    def rules_changed(self) -> None:
        """Setters, families or the profile's behaviours changed: the plain-MSR table and every plan are made again."""
        self._plain_table = None
        self.config_changed()

    # -- KVM_GET_MSRS --
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        try:
            n = batch.nmsrs
            indices = batch.indices32  # the plan's key, or the last batch's (as in ``set_msrs``)
        except AttributeError:  # not an MsrBatch: checked here, where it costs nothing when the batch is right
            if self.closed:
                raise ClosedError("this vCPU is closed") from None
            raise not_a_batch("get_msrs", batch) from None
        last = self.last_read_plan
        if indices == last[0]:  # the same indices as a batch that passed the checks below (``close`` forgets it)
            plan = last[1]
        else:
            if not self.batch_checked(n, "KVM_GET_MSRS"):
                return self._get_one_by_one(batch, strict)
            key = indices.tobytes()
            plan = self.read_plans.get(key) or self._read_plan(key)
            self.last_read_plan = (memoryview(key).cast("I"), plan)
        compiled = plan[7]
        if compiled is not None and compiled(batch.words64, self.refusals):
            return n
        dicts, keys, defaults, ruled, guards, recorded, quick, _ = plan
        if guards:
            for ok, kind, group in guards:  # a loop: no generator made on the hot path
                if not ok(kind, group):
                    return self._get_one_by_one(batch, strict)
        if not ruled:  # all plain: every value in one C-level pass, written back in one
            if quick is not None:
                try:
                    out = array("Q", quick[0](self.stored))
                except KeyError:
                    out = array("Q", map(dict.get, dicts, keys, defaults))
                else:
                    for pos, source, k, default in quick[1]:
                        out[pos] = source.get(k, default)
            else:
                out = array("Q", map(dict.get, dicts, keys, defaults))
            batch.words64[2::2] = out
            if recorded:  # what the reads refused and forgave record (the batch ran whole)
                self.refusals.update(recorded)
            return n
        values = list(map(dict.get, dicts, keys, defaults))
        access_get = self.access_get
        for pos, index, getter in ruled:
            code, value = getter(index, True) if getter is not None else access_get(index)
            if code:  # the batch stops here: redo it entry by entry, which writes and zeroes as the kernel does
                return self._get_one_by_one(batch, strict)
            values[pos] = value
        batch.words64[2::2] = array("Q", values)
        if recorded:
            self.refusals.update(recorded)
        return n

    def batch_checked(self, n: int, ioctl: str) -> bool:
        """What a batch of ``n`` entries passes before its plan is found: raises when the vCPU is closed or ``n`` is
        ``MAX_IO_MSRS`` or more (E2BIG); False on a big-endian host, where batches go entry by entry."""
        if self.closed:
            raise ClosedError("this vCPU is closed")
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, ioctl)
        return LITTLE_ENDIAN

    def _get_one_by_one(self, batch: MsrBatch, strict: bool) -> int:
        buf = batch.buffer
        for i in range(batch.nmsrs):
            off = 8 + 16 * i
            index = ENTRY.unpack_from(buf, off)[0]
            code, value = self.access_get(index)
            if code in (OK, UNSUPPORTED) or self._refused_read_zeroed:  # else the entry keeps userspace's value
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
        groups: dict[tuple[int, str], tuple[MsrFamily, list[int]]] = {}
        recorded: dict[int, Rule] = {}
        for pos, index in enumerate(indices):
            plain = self.plain.get(index)
            source = self._read_source(index) if plain is None else None
            decided = read_decided(self, index) if plain is None and source is None else None
            if decided is not None:
                source = decided[:3]
                if decided[3] is not None:
                    recorded[index] = decided[3]
            family = self.families.get(index) if plain is None and source is None else None
            group = family.bulk_read_kind(index) if family is not None and self._read_source_allowed(index) else None
            if group is not None:  # read from stored in bulk when the family's check passes for the whole group
                assert family is not None
                groups.setdefault((id(family), group), (family, []))[1].append(index)
                source = (self.stored, index, 0)
            if source is not None:  # a getter that only ever reads one dict: read in bulk like a plain MSR
                dicts.append(source[0])
                keys.append(source[1])
                defaults.append(source[2])
            elif plain is None:
                ruled.append((pos, index, self._direct_get(index)))
                dicts.append(self.stored)
                keys.append(index)
                defaults.append(0)
            else:
                how, k, default = plain
                dicts.append(stores[how])
                keys.append(k if how != DROP else index)
                defaults.append(default)
        guards = tuple((family.bulk_read_ok, kind, tuple(sorted(set(group))))
                       for (_, kind), (family, group) in groups.items())
        quick = quick_read(self.stored, self.vm.msrs, dicts, keys, defaults, self.constant_keys)
        compiled = None if ruled or quick is None else compile_read(*quick, guards, recorded, self.stored)
        plan = (tuple(dicts), tuple(keys), tuple(defaults), tuple(ruled), guards, recorded, quick, compiled)
        if len(self.read_plans) >= PLAN_CACHE:
            self.read_plans.clear()
        self.read_plans[key] = plan
        return plan

    def _read_source(self, index: int) -> tuple[dict[int, int], int, int] | None:
        """Where ``access_get`` always finds ``index``'s value, for a family getter that reads one dict and never
        fails (``Family.read_source``); None for the others."""
        if not self._read_source_allowed(index):
            return None
        family = self.families.get(index)
        return family.read_source(index) if family is not None else None

    def _read_source_allowed(self, index: int) -> bool:
        """Whether ``host_get`` hands ``index`` to its family: not for MISC_FEATURES_ENABLES or a VMX MSR."""
        return index != MSR_MISC_FEATURES_ENABLES and not M.VMX_FIRST <= index <= M.VMX_LAST

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
