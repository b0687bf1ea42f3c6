"""A batch plan's fast path compiled to straight-line Python, once per plan: the direct write (``set_msrs``' first
branch) and the bulk read (``get_msrs``' when every entry is plain).

A batch whose ruled entries need no call and no freeze check (``msr_plan.QuickPlan``'s checked variant, with nothing to
call) is decided by checks on its values alone, then stored whole. Its plan gets a function of its own, made from its
``DirectSpec`` by ``direct_source``: one ``struct`` unpack of the values it reads into locals, the checks as one
integer expression, then each store as a dict assignment with its key a constant. A read of plain entries alone gets
one too (``read_source``): one C-level pass over ``stored``, then the entries whose value is elsewhere, each a
constant or one lookup. That is the same work as a loop over the plan's tuples, without the loop and the tuple
unpacking: in this CPython the index-list batch's checks and stores take about 60% of the time of one pass over the
buffer read as one integer and a dict update (``make where``). The generated text holds only integers and fixed
names, never data from a caller.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from types import CodeType

from ..kernel.rule import Rule
from .msr_plan import U64, BulkCheck, Pick, QuickPlan, TypeSpan, groups_pass, types_valid

# The function of a direct plan: given a batch's buffer, its u64 words and the vCPU's refusals, it returns False
# having changed nothing when a check fails (the batch then takes the quick path, which checks it again and says
# which entry fails), else takes the whole batch and returns True.
DirectWrite = Callable[[bytearray, memoryview, "dict[int, Rule]"], bool]
# What a direct plan is made of: the checks, each (position, offset, mask) and passing when (value + offset) & mask
# is 0 (the checked entries; with mask all ones the ZERO entries and the read-only ones that pass only with 0); the
# bytes of the buffer that must be memory types (``MsrFamily.memory_types``), if any; the groups a family checks at
# once (as in ``QuickPlan``), run after the other checks; the MSRs whose write clears their last refusal; the
# refusals the read-only entries record; the stores of ``stored``, each (key, position), in batch order with each key
# once (``msr_plan.last_wins``); ``stored`` itself; and the VM-wide store (the dict, its key, its position), if any.
DirectSpec = tuple[
    tuple[tuple[int, int, int], ...], "TypeSpan | None", "tuple[tuple[BulkCheck, str, tuple[int, ...], Pick], ...]",
    frozenset[int], "dict[int, Rule]", tuple[tuple[int, int], ...], "dict[int, int]",
    "tuple[dict[int, int], int, int] | None"]
# A direct plan: its function and what it was made from.
DirectPlan = tuple[DirectWrite, DirectSpec]


def direct_plan(checked: QuickPlan | None, zero: list[int], ignore_msrs: bool, stored: dict[int, int],
                vm_wide: tuple[dict[int, int], int, int] | None) -> DirectPlan | None:
    """The direct path of a plan whose checked variant has nothing to call (``DirectPlan``); None for the others.
    ``vm_wide`` is ``msr_plan.plain_stores``' VM-wide store (the word of the batch that holds its value)."""
    if (checked is None or checked[0] or checked[7] is None or checked[10] is None
            or len(checked[9] or ()) > 1 or (checked[9] and vm_wide is None)):
        return None
    # An address's enable bit is in its mask: an enabled address fails here and takes the quick path, which looks
    # guest memory up (``checks_pass``). A check with mask 0 always passes.
    _, offsets, masks, _, positions, types = checked[10]
    checks = [(pos, offset, mask) for pos, offset, mask in zip(positions, offsets, masks, strict=True) if mask]
    zeros = [*zero, *(pos for pos, _, _ in checked[2] if not ignore_msrs)]
    keys, _, key_positions = checked[7]
    vm = (vm_wide[0], vm_wide[1], (vm_wide[2] - 2) // 2) if checked[9] and vm_wide is not None else None
    spec: DirectSpec = (tuple(sorted([*checks, *((pos, 0, U64) for pos in zeros)])), types, checked[6],
                        checked[11], checked[5], tuple(zip(keys, key_positions, strict=True)), stored, vm)
    return compile_direct(spec), spec


def compile_direct(spec: DirectSpec, checks_only: bool = False) -> DirectWrite:
    """The function of a direct plan; with ``checks_only``, one that checks as it does and stores nothing (what
    ``benchmarks/run.py`` times as a checking model's floor)."""
    names: dict[str, object] = {"types_valid": types_valid, "groups_pass": groups_pass}
    source = direct_source(spec, names, checks_only)
    exec(compiled(source), names)  # noqa: S102 (integers and fixed names)
    function: DirectWrite = names["direct"]  # type: ignore[assignment]
    return function


_CODE: dict[str, CodeType] = {}  # compiled texts: plans of the same shape (on any vCPU) share the text
_CODE_CACHE = 1024


def compiled(source: str) -> CodeType:
    """``source`` compiled, once per text while it is in the cache."""
    code = _CODE.get(source)
    if code is None:
        if len(_CODE) >= _CODE_CACHE:
            _CODE.clear()
        code = _CODE[source] = compile(source, "<kvmscope plan>", "exec")
    return code


def header(signature: str, names: dict[str, object]) -> str:
    """The ``def`` line of a generated function: the objects it names are positional defaults, so that the
    function reads them as locals. Not keyword-only defaults: CPython 3.11 looks each of those up in a dict on
    every call (the index-list read took 0.08 us more, 41 paired rounds); and not globals: plans of one shape share
    one code object, whose specialised global loads would miss on each other plan's globals."""
    bound = ", ".join(f"{name}={name}" for name in names if not name.startswith("__"))
    return f"def {signature[:-1]}, {bound}):" if bound else f"def {signature}:"


def direct_source(spec: DirectSpec, names: dict[str, object], checks_only: bool = False) -> str:
    """The text of a direct plan's function (``DirectWrite``); the objects it names are added to ``names``, its
    globals. Entry i's value is the u64 at byte 16 + 16i of the buffer, and is the local ``v{i}``."""
    checks, types, groups, wipe, recorded, stores, stored, vm = spec
    used = sorted({*(pos for pos, _, _ in checks), *(() if checks_only else (
        *(pos for _, pos in stores), *((vm[2],) if vm is not None else ())))})
    lines = ["def direct(raw, words, refusals):"]
    if used:
        fmt, at = "<", 0
        for pos in used:
            fmt += f"{16 + 16 * pos - at}xQ"
            at = 24 + 16 * pos
        names["unpack"] = struct.Struct(fmt).unpack_from
        lines.append(f"    {', '.join(f'v{pos}' for pos in used)}, = unpack(raw)")
    # Checks with the same offset and mask share one mask: ((a + o) | (b + o)) & m is 0 exactly when each of
    # (a + o) & m and (b + o) & m is. A mask covers a value's 64 bits alone, so an offset's carry out of them is
    # dropped, as the kernel's u64 sum drops it.
    by_check: dict[tuple[int, int], list[int]] = {}
    for pos, offset, mask in checks:
        by_check.setdefault((offset, mask), []).append(pos)
    terms = []
    for (offset, mask), group in by_check.items():
        values = " | ".join(f"(v{pos} + {offset:#x})" if offset else f"v{pos}" for pos in group)
        terms.append(f"({values})" if mask == U64 and not offset else f"(({values}) & {mask:#x})")
    if terms:
        lines += [f"    if {' | '.join(terms)}:", "        return False"]
    if types is not None:
        names["TYPES"] = types
        lines += ["    if not types_valid(raw, TYPES):", "        return False"]
    if groups:
        names["GROUPS"] = groups
        lines += ["    if not groups_pass(GROUPS, words):", "        return False"]
    if checks_only:
        return "\n".join([header("direct(raw, words, refusals)", names), *lines[1:], "    return True", ""])
    # Each write clears its MSR's last refusal, and the read-only entries record theirs: nothing to do when those
    # are all that is on record.
    names.update(WIPE=wipe, RECORDED=recorded, S=stored)
    lines += ["    if refusals != RECORDED:",
              "        if refusals and not WIPE.isdisjoint(refusals):",
              "            for index in WIPE & refusals.keys():",
              "                del refusals[index]",
              "        refusals.update(RECORDED)"]
    lines += [f"    S[{key:#x}] = v{pos}" for key, pos in stores]
    if vm is not None:
        names["V"] = vm[0]
        lines.append(f"    V[{vm[1]:#x}] = v{vm[2]}")
    return "\n".join([header("direct(raw, words, refusals)", names), *lines[1:], "    return True", ""])



# The compiled read of a plan whose entries are all plain: given a batch's u64 words and the vCPU's refusals, it
# returns False having changed nothing when a group's check fails or ``stored`` lacks a key (the batch then takes
# the general path), else writes every value and records what the reads forgave, and returns True.
CompiledRead = Callable[[memoryview, "dict[int, Rule]"], bool]
# A group check of a read plan: the family's ``bulk_read_ok``, the group's kind and its indices.
ReadGuard = tuple[Callable[[str, Sequence[int]], bool], str, tuple[int, ...]]


def compile_read(getter: Callable[[dict[int, int]], Sequence[int]], live: Sequence[tuple[int, dict[int, int], int, int]],
                 guards: Sequence[ReadGuard], recorded: dict[int, Rule], stored: dict[int, int]) -> CompiledRead:
    """The read of a plan whose entries are all plain, from its ``msr_reads.QuickRead`` (the pass over ``stored``,
    the entries read from another dict), its group checks and the refusals it records."""
    names: dict[str, object] = {"array": array, "G": getter, "S": stored, "R": recorded, "VALUES": slice(2, None, 2)}
    lines = ["def read(words, refusals):"]
    for i, guard in enumerate(guards):
        names[f"GUARD{i}"] = guard
        lines += [f"    if not GUARD{i}[0](GUARD{i}[1], GUARD{i}[2]):", "        return False"]
    lines += ["    try:", '        out = array("Q", G(S))', "    except KeyError:", "        return False"]
    # an MSR read at several positions (kvmclock's aliases) is looked up once (a VM-wide MSR not yet written is
    # common: its default, not a KeyError)
    lookups: dict[tuple[int, int, int], list[int]] = {}
    for pos, source, key, default in live:
        lookups.setdefault((id(source), key, default), []).append(pos)
        names[f"D{id(source)}"] = source
    for i, ((source_id, key, default), positions) in enumerate(lookups.items()):
        lines.append(f"    w{i} = D{source_id}.get({key:#x}, {default:#x})")
        lines += [f"    out[{pos}] = w{i}" for pos in positions]
    lines.append("    words[VALUES] = out")
    if len(recorded) > 4:
        lines.append("    refusals.update(R)")
    for i, (index, rule) in enumerate(recorded.items()):  # a few: one assignment each costs less than a call
        if len(recorded) <= 4:
            names[f"R{i}"] = rule
            lines.append(f"    refusals[{index:#x}] = R{i}")
    lines.append("    return True")
    lines[0] = header("read(words, refusals)", names)
    exec(compiled("\n".join([*lines, ""])), names)  # noqa: S102 (integers and fixed names)
    function: CompiledRead = names["read"]  # type: ignore[assignment]
    return function
