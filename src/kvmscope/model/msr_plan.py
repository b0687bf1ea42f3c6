"""The shapes of the model's batch plans (``msr_batch``), the C-level pickers they read a batch's values with, and
the helpers of their checks (``checks_pass``, ``groups_pass``, ``types_valid``); ``msr_compiled`` compiles the direct
path."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from ..kernel.rule import Rule
from .mtrr import MEMORY_TYPE_INVALID

if TYPE_CHECKING:
    from .msr_compiled import DirectPlan

U64 = (1 << 64) - 1

Setter = Callable[[int], int]
Getter = Callable[[int, bool], tuple[int, int]]
FrozenCheck = tuple[Callable[[memoryview], object], Callable[[dict[int, int]], object]]
Pick = Callable[[memoryview], Sequence[int]]
# The bytes of a batch's buffer that must be MTRR memory types: the span [start, end) that holds them, and a mask of
# 0xFF at each of them within the span read as a little-endian integer.
TypeSpan = tuple[int, int, int]
BulkCheck = Callable[[str, Sequence[int], Sequence[int]], bool]
# A write plan: the entries with rules (position, index, its setter if it has one); the bulk stores, each (the dict,
# the keys, how to pick their values from the batch's values); how to pick the ZERO entries' values; the plain
# entries' positions (for a refusal part-way); the indices when the batch can be stored whole (else None); the freeze
# check of the ruled entries; the set of the plain indices; the quick path (``QuickPlan``), its checked variant, and
# that variant compiled when it has nothing to call (``msr_compiled.DirectPlan``).
WritePlan = tuple[
    "tuple[tuple[int, int, Setter | None], ...]",
    "tuple[tuple[dict[int, int], tuple[int, ...], Pick], ...]",
    "Pick | None",
    tuple[int, ...],
    "tuple[int, ...] | None",
    "FrozenCheck | None",
    frozenset[int],
    "QuickPlan | None",
    "QuickPlan | None",
    "DirectPlan | None",
]
# What a write plan does when its freeze check passes (``_quick_plan``): the entries whose handler must run, each
# (position, index, the function, how it is called: 0 ``f(data)``, 1 ``f(index, data, True)``, 2 ``f(index, data)``);
# how to pick the values of the read-only entries that pass only with 0 (None when none or any value passes); the
# read-only entries (position, index, rule), each recorded as refused by its rule and forgiven (family MSRs whose
# write is always unsupported, and setters' MSRs refused as unsupported under the CPUID now: ``setter_refusal``);
# the other ruled entries' positions by index (each write clears its MSR's last refusal); how to pick the values of
# the entries called; the refusals the read-only entries leave; the groups of entries a family checks at once
# (``MsrFamily.bulk_ok``: the check, the group, its indices, how to pick its values); where the grouped entries are
# stored (indices, how to pick their values, their positions); the positions of the plain and grouped entries (those
# before a refused one take effect). Entries whose write always passes and changes nothing (``Family.write_kind``) need no call.
# A plan's checked variant (``_quick_plan`` with the plain stores) also stores the plain entries that go to ``stored``
# with the grouped ones, in one update, and adds: the stores left for after (the VM-wide ones); and the entries
# checked without their handler (``MsrFamily.write_check``), each stored verbatim when the check passes: how to pick
# their values, the offsets and masks of their checks, which of them enable a guest address with bit 0, their
# positions, and the bytes of the batch's buffer that must be memory types (``TypeSpan``). Both variants
# end with the MSRs whose write clears their last refusal, and every ruled entry's position by index.
QuickPlan = tuple[
    "tuple[tuple[int, int, Callable[..., int], int], ...]", "Pick | None", tuple[tuple[int, int, Rule], ...],
    dict[int, int], "Pick", "dict[int, Rule]", "tuple[tuple[BulkCheck, str, tuple[int, ...], Pick], ...]",
    "tuple[tuple[int, ...], Pick, tuple[int, ...]] | None", tuple[int, ...],
    "tuple[tuple[dict[int, int], tuple[int, ...], Pick], ...] | None",
    "tuple[Pick, tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...], TypeSpan | None] | None",
    frozenset[int],
    dict[int, int]]


def no_values(words: memoryview) -> Sequence[int]:
    return ()


def always_mismatch(words: memoryview) -> object:
    return object()


def nothing(store: dict[int, int]) -> object:
    return None


def one(key: int) -> Callable[[object], object]:
    """``obj[key]`` as a 1-tuple, to compare with what itemgetter of several keys gives."""
    def get(obj: object) -> object:
        return (obj[key],)  # type: ignore[index]
    return get


def last_wins(keys: Sequence[int], positions: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The keys of an update in batch order, each once (at its first place), with the position of its last entry:
    one update of these leaves a dict as the update of all of them does (an alias's write overrides its pair's), in
    fewer stores."""
    last = dict(zip(keys, positions, strict=True))
    return tuple(last), tuple(last.values())


def keyed_store(entries: Sequence[tuple[int, int]]) -> tuple[tuple[int, ...], Pick, tuple[int, ...]] | None:
    """One update's keys, how to pick their values, and their positions, from its entries (position, key) in batch
    order (``last_wins``); None when there are none."""
    if not entries:
        return None
    keys, positions = last_wins([index for _, index in entries], [pos for pos, _ in entries])
    return keys, picker(positions), positions


def plain_stores(stored: dict[int, int], keys_positions: tuple[list[int], list[int]], vm_msrs: dict[int, int],
                 vm_keys_positions: tuple[list[int], list[int]]
                 ) -> tuple[tuple[tuple[dict[int, int], tuple[int, ...], Pick], ...], tuple[dict[int, int], int, int] | None]:
    """A write plan's stores of its plain entries (the vCPU's, then the VM-wide ones: each the dict, its keys, how to
    pick their values), each key once (``last_wins``); and the VM-wide store as ``msr_compiled.direct_plan``
    takes it, when it has one key."""
    stores = []
    for store, (keys, positions) in ((stored, last_wins(*keys_positions)), (vm_msrs, last_wins(*vm_keys_positions))):
        if keys:
            stores.append((store, keys, picker(positions)))
    vm_keys, vm_positions = last_wins(*vm_keys_positions)
    return tuple(stores), (vm_msrs, vm_keys[0], 2 + 2 * vm_positions[0]) if len(vm_keys) == 1 else None


def picker(positions: Sequence[int]) -> Pick:
    """The values of the entries at ``positions`` from a batch's u64 words (entry i's value is word 2 + 2i, at byte
    16 + 16i), as a tuple even for one entry. Positions in batch order are one ``struct`` unpack that skips the
    bytes between them: it makes the ints in a third less time than indexing the words one by one. Others (an
    alias's last entry before its pair's: ``last_wins``) are an ``itemgetter`` of the words."""
    if list(positions) != sorted(set(positions)):
        return itemgetter(*(2 + 2 * pos for pos in positions))  # two or more: a tuple
    fmt, at = "<", 0
    for pos in positions:
        offset = 16 + 16 * pos  # past the previous value's end, as the positions rise
        fmt += f"{offset - at}xQ"
        at = offset + 8
    return struct.Struct(fmt).unpack_from


def groups_pass(groups: tuple[tuple[BulkCheck, str, tuple[int, ...], Pick], ...], words: memoryview) -> bool:
    """Whether each group's ``bulk_ok`` passes on its values in the batch's ``words``."""
    for ok, kind, indices, pick in groups:  # noqa: SIM110 (a loop: no generator made on the hot path)
        if not ok(kind, indices, pick(words)):
            return False
    return True


def type_span(types: int) -> TypeSpan | None:
    """The ``TypeSpan`` of a mask with 0xFF at each byte of a batch's buffer that must be a memory type."""
    if not types:
        return None
    start, end = ((types & -types).bit_length() - 1) // 8, (types.bit_length() + 7) // 8
    return start, end, types >> (8 * start)


def types_valid(raw: bytearray, span: TypeSpan) -> bool:
    """Whether each byte of ``raw`` that ``span`` names is a valid MTRR memory type: the span translated to 0 (valid)
    or 1 per byte, read as one integer and masked."""
    start, end, mask = span
    return not int.from_bytes(raw[start:end].translate(MEMORY_TYPE_INVALID), "little") & mask


def checks_pass(has_memory: Callable[[int, int], bool],
                checks: tuple[Pick, tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...], TypeSpan | None],
                values: Sequence[int]) -> bool:
    """The entries' ``write_check``s, when the batch's C-level pass failed: it counts an address's enable bit (bit 0)
    as a failure, which passes here when guest memory holds the address (``has_memory(address, 1)``)."""
    for value, offset, mask, gpa in zip(values, *checks[1:4], strict=True):
        if (value + offset) & mask & ~gpa:
            return False
        if gpa and value & 1 and not has_memory(value & ~1, 1):
            return False
    return True

