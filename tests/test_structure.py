"""The shape of the code (docs/architecture.md), drawn from the source itself: no import cycles beyond type hints, no
module reaching into another's private members, small model files and thin CLI commands."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "kvmscope"
MODEL_MAX_LINES = 450
CLI_COMMAND_MAX_LINES = 40


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports when it runs (module level or inside functions), not for type hints."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in known and m != name}


def import_cycles() -> list[list[str]]:
    mods = modules()
    known = set(mods)
    graph = {n: runtime_imports(n, p, known) for n, p in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of knowledge: leave package -> child edges out.
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    return cycles


def private_reaches() -> Iterator[str]:
    """``x._name`` where ``x`` is not ``self``/``cls`` (or the class being defined): a reach into another object's
    private members."""
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
                continue
            if attr in ("_fields_", "_pack_", "_anonymous_", "_replace", "_asdict", "_fields", "_field_defaults"):
                continue  # ctypes and namedtuple protocols are public by convention
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            yield f"{name}:{node.lineno}: {ast.unparse(node)}"


def test_no_import_cycles_beyond_type_hints() -> None:
    cycles = import_cycles()
    assert not cycles, "import cycles at run time (break them, or import for type hints only):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_no_module_reaches_into_private_members() -> None:
    reaches = list(private_reaches())
    assert not reaches, "private members used from outside their object:\n" + "\n".join(reaches)


def test_model_files_are_small() -> None:
    big = {p.name: n for p in (PACKAGE / "model").glob("*.py") if (n := len(p.read_text().splitlines())) >= MODEL_MAX_LINES}
    assert not big, f"model files at or over {MODEL_MAX_LINES} lines: {big}"


def test_cli_commands_are_thin() -> None:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    long = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("command" in ast.unparse(d) for d in node.decorator_list):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            body_lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if body_lines > CLI_COMMAND_MAX_LINES:
                long[node.name] = (start, body_lines)
    assert not long, f"CLI command functions over {CLI_COMMAND_MAX_LINES} lines (name: (line, length)): {long}"
