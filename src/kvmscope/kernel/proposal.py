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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import msrs
from ..errors import InvalidValueError, KvmscopeError
from . import rulesets as R


@dataclass(frozen=True)
class ProposedRuleset(R.Ruleset):
    """A kernel's ruleset with rules added or removed and more MSRs immutable after the first run."""

    extra_immutable: frozenset[int] = frozenset()

    @property
    def immutable_generic(self) -> frozenset[int]:
        return super().immutable_generic | self.extra_immutable


def is_proposal(kernel: str) -> bool:
    return kernel.endswith(".toml")


def _strings(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValueError(f"{where}: {key}: expected a list of strings, got {value!r}")
    return value


def load(path: str | Path) -> ProposedRuleset:
    """Read a proposal file; every problem is one :class:`InvalidValueError` naming the file and the field."""
    where = str(path)
    if sys.version_info < (3, 11):
        raise InvalidValueError(f"{where}: reading a TOML ruleset needs Python 3.11 or newer (tomllib)")
    tomllib: Any = importlib.import_module("tomllib")  # 3.11+; checked above (mypy targets 3.10)

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidValueError(f"{where}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidValueError(f"{where}: not valid TOML: {e}") from None
    unknown = set(data) - {"name", "base", "title", "add", "remove", "immutable"}
    if unknown:
        raise InvalidValueError(f"{where}: unknown field(s) {sorted(unknown)} (expected name, base, title, add, "
                                "remove, immutable)")
    base = data.get("base")
    if not isinstance(base, str):
        raise InvalidValueError(f"{where}: base: expected a kernel version such as \"6.18\", got {base!r}")
    rules = set(R.resolve(base).rules)
    try:
        rules |= {R.rule(k) for k in _strings(data, "add", where)}
        rules -= {R.rule(k) for k in _strings(data, "remove", where)}
        immutable = frozenset(msrs.index_of(m if not m.lower().startswith("0x") else int(m, 16))
                              for m in _strings(data, "immutable", where))
    except KvmscopeError as e:  # an unknown rule key or MSR name
        raise InvalidValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise InvalidValueError(f"{where}: immutable: {e}") from None
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str):
        raise InvalidValueError(f"{where}: name: expected a string, got {name!r}")
    return ProposedRuleset(f"{name} (proposed, on {base})", frozenset(rules), immutable)
