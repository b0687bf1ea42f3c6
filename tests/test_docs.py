"""The examples in the documentation run as written.

Convention: a ```python block in ``docs/*.md`` or ``README.md`` runs when its first line is a marker comment:

- ``# doctest: run NAME``: runs anywhere (model backend only, or no KVM at all);
- ``# doctest: live NAME``: needs the live ``/dev/kvm``; skips with the reason where it is missing (``live`` fixture);
- ``# doctest: skip REASON``: shown to readers, never run.

Every ```python block under ``docs/`` must carry one of the three markers (README blocks without a marker are left to
``tests/test_cli.py``). When a runnable block is followed directly by a ```text block, that block is the expected
standard output and must match exactly. Each block runs in a fresh namespace, from a temporary working directory.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"#\s*doctest:\s*(run|live|skip)\b\s*(.*)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    mode: str  # run | live | skip | "" (no marker)
    name: str
    code: str
    expected: str | None  # the ```text block right after it, if any

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}::{self.name or f'line {self.line}'}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    fences = list(FENCE.finditer(text))
    out = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        code = m.group(2)
        first = code.split("\n", 1)[0].strip()
        marker = MARKER.fullmatch(first)
        expected = None
        if i + 1 < len(fences):
            nxt = fences[i + 1]
            if nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip():
                expected = nxt.group(2)
        out.append(
            Block(
                path,
                text.count("\n", 0, m.start()) + 1,
                marker.group(1) if marker else "",
                marker.group(2).strip() if marker else "",
                code,
                expected,
            )
        )
    return out


ALL = [b for p in SOURCES if p.exists() for b in blocks(p)]
RUNNABLE = [b for b in ALL if b.mode in ("run", "live")]


def test_every_docs_python_block_is_marked() -> None:
    unmarked = [f"{b.path.relative_to(ROOT)}:{b.line}" for b in ALL if b.path.parent.name == "docs" and not b.mode]
    assert not unmarked, f"python blocks without '# doctest: run|live|skip' (they would silently not run): {unmarked}"
    names = [b.id for b in RUNNABLE]
    assert len(names) == len(set(names)), f"duplicate example names: {sorted(n for n in names if names.count(n) > 1)}"
    assert RUNNABLE, "no runnable documentation examples found"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_example(block: Block, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.mode == "live":
        request.getfixturevalue("live")  # skips, with the reason, where /dev/kvm is unusable
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, f"{block.path.relative_to(ROOT)}:{block.line}", "exec"), {"__name__": "__doc__"})
    if block.expected is not None:
        got = [line.rstrip() for line in out.getvalue().splitlines()]
        want = [line.rstrip() for line in block.expected.splitlines()]
        assert got == want, f"{block.id}: the output shown in the docs differs from what the example prints"
