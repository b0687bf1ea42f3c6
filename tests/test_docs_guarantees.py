"""Guarantees stated in docs/reliability.md that are about the code itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _code_strings(path: Path) -> list[str]:
    """String constants in a module's code (docstrings excluded)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_host_msr_access() -> None:
    # kvmscope never opens the host's MSR devices: every MSR value comes from KVM ioctls or a profile.
    offenders = {str(p.relative_to(ROOT)): s for p in (ROOT / "src").rglob("*.py") for s in _code_strings(p)
                 if "/dev/cpu" in s or re.search(r"cpu.*msr", s)}
    assert not offenders, f"host MSR device paths in the code: {offenders}"
    assert _code_strings(ROOT / "src/kvmscope/linux/system.py"), "the scan sees string constants"


def test_every_test_named_in_reliability_doc_exists() -> None:
    doc = (ROOT / "docs" / "reliability.md").read_text()
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc):
        assert re.search(rf"def {name}\b", (ROOT / path).read_text()), f"{path}::{name} is cited but does not exist"


def test_rules_by_version_table_matches_the_code() -> None:
    """docs/rules.md's "Rules by kernel version" lists every known version with what changes there, as computed."""
    from kvmscope.kernel import rulesets as R

    text = (ROOT / "docs" / "rules.md").read_text()
    section = text.split("## Rules by kernel version", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == R.version_table(), (
        "docs/rules.md's version table differs from the code; regenerate it with "
        "`python -c 'from kvmscope.kernel.rulesets import version_table; print(version_table())'`")
