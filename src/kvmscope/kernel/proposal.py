"""A proposed kernel rule, as a TOML file that stands in for a kernel version (``--kernel``, ``--compare``).

.. code-block:: toml

    name = "freeze-tsc"                      # the column name (default: the file name)
    base = "6.18"                            # the kernel version whose rules it starts from
    title = "RFC: freeze IA32_TSC after KVM_RUN"
    remove = ["arch_cap_needs_cpuid"]        # rule keys (kernel/rulesets.py) to drop
    add = []                                 # rule keys to add
    immutable = ["TSC", "0x2ff"]             # MSRs that become immutable after the first KVM_RUN

A write of a different value to an ``immutable`` MSR after the vCPU's first run is refused like the feature MSRs since
6.4 (the report cites the freeze rule; the column name says it is the proposal).
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import inputs, msrs
from ..errors import InvalidValueError, KvmscopeError
from ..schema import shown
from . import rulesets as R

MAX_ITEM = 64
"""The longest rule key or MSR name in a list (the longest known is 32 characters): longer text is no name."""
_AT = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$", re.S)


@dataclass(frozen=True)
class ProposedRuleset(R.Ruleset):
    """A kernel's ruleset with rules added or removed and more MSRs immutable after the first run."""

    extra_immutable: frozenset[int] = frozenset()
    warning: str | None = field(default=None, compare=False)  # its base is newer than the newest ruleset known

    @property
    def immutable_generic(self) -> frozenset[int]:
        return super().immutable_generic | self.extra_immutable


def is_proposal(kernel: str) -> bool:
    return kernel.endswith(".toml")


def _strings(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValueError(f"{where}: {key}: expected a list of strings, got {shown(value)}")
    for i, v in enumerate(value):
        if len(v) > MAX_ITEM:
            raise InvalidValueError(f"{where}: {key}[{i}]: {shown(v)} is longer than any rule key or MSR name")
    return value


def _toml(text: str, where: str) -> dict[str, Any]:
    """The TOML table of ``text``; any failure of the parser is one line naming the file (and the line it gives)."""
    tomllib: Any = importlib.import_module("tomllib")  # 3.11+; checked by the caller (mypy targets 3.10)
    try:
        data: dict[str, Any] = tomllib.loads(text)
        return data
    except tomllib.TOMLDecodeError as e:
        m = _AT.match(str(e))
        if m:
            raise InvalidValueError(f"{where}:{m['line']}: not valid TOML: {m['what']} (column {m['column']})"
                                    ) from None
        raise InvalidValueError(f"{where}: not valid TOML: {e}") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits(): no field here takes a number at all
        limit = sys.get_int_max_str_digits()
        digits = re.search(f"[0-9_]{{{limit + 1},}}", text)
        if digits is None:
            raise InvalidValueError(f"{where}: not valid TOML: {shown(str(e))}") from None
        line = text.count("\n", 0, digits.start()) + 1
        raise InvalidValueError(f"{where}:{line}: not valid TOML here: a number of more than {limit:,} digits"
                                ) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise InvalidValueError(f"{where}: not valid TOML here: arrays or tables nested too deeply") from None


def load(path: str | Path) -> ProposedRuleset:
    """Read a proposal file; every problem is one :class:`InvalidValueError` naming the file and the field."""
    where = inputs.shown(path)
    if sys.version_info < (3, 11):
        raise InvalidValueError(f"{where}: reading a TOML ruleset needs Python 3.11 or newer (tomllib)")
    # through the project's reader: a FIFO, a device or a directory is refused at once, a file read within its limit
    data = _toml(inputs.read_text(path, InvalidValueError, "a proposal"), where)
    unknown = set(data) - {"name", "base", "title", "add", "remove", "immutable"}
    if unknown:
        raise InvalidValueError(f"{where}: unknown field(s) {shown(sorted(unknown))} (expected name, base, title, "
                                "add, remove, immutable)")
    base = data.get("base")
    if not isinstance(base, str):
        raise InvalidValueError(f"{where}: base: expected a kernel version such as \"6.18\", got {shown(base)}")
    try:
        rules = set(R.resolve(base).rules)
    except KvmscopeError as e:  # not a version, or older than the oldest ruleset
        raise InvalidValueError(f"{where}: base: {e}") from None
    for key in ("name", "title"):
        if not isinstance(data.get(key, ""), str):
            raise InvalidValueError(f"{where}: {key}: expected a string, got {shown(data[key])}")
    add, remove, frozen = (_strings(data, key, where) for key in ("add", "remove", "immutable"))
    try:
        rules |= {R.rule(k) for k in add}
        removed = [R.rule(k) for k in remove]
    except KvmscopeError as e:  # an unknown rule key
        raise InvalidValueError(f"{where}: {e}") from None
    absent = next((r for r in removed if r not in rules), None)
    if absent is not None:  # removing it would change nothing: a wrong base or a typo of intent
        raise InvalidValueError(f"{where}: remove: {absent.key!r} is not among the rules of base {base} (it applies "
                                f"{'from ' + absent.since if absent.until is None else 'before ' + absent.until})")
    rules -= set(removed)
    try:
        immutable = frozenset(msrs.index_of(m) for m in frozen)
    except KvmscopeError as e:  # an unknown MSR name, or an index that is not one
        raise InvalidValueError(f"{where}: immutable: {e}") from None
    # The freeze check is what makes an MSR immutable: without it (a base before 6.4, or `remove = ["freeze"]`) the
    # immutable list and the rules that only refine it would change nothing, silently.
    needs_freeze = ["immutable"] if immutable else []
    needs_freeze += [f'add = ["{k}"]' for k in add if R.rule(k) is R.PLATFORM_INFO_IMMUTABLE]
    if R.FREEZE not in rules and needs_freeze:
        lacks = "`remove` takes out" if R.FREEZE in R.resolve(base).rules else f"base {base} does not have"
        raise InvalidValueError(f"{where}: {needs_freeze[0]} needs the freeze after the first run, which {lacks} "
                                f"({R.FREEZE.cite()}): keep \"freeze\" (`add = [\"freeze\"]`)")
    name = data.get("name", Path(path).stem)
    warning = R.newer_than_known(base)
    return ProposedRuleset(f"{name} (proposed, on {base})", frozenset(rules), immutable,
                           f"{where}: base: {warning}" if warning else None)
