"""Everything the ``kvmscope`` command prints: the probe tables, check reports, kernel comparisons, MSR decodings and
lists, as styled text or as JSON. The CLI decides what to print; this module decides how it looks.

Two rules hold for every line. User text (scenario and profile names, paths, labels, error messages) is never parsed
as rich markup: lines are built as :class:`rich.text.Text` with styles attached, so ``[/]`` prints as itself. And a hex
value or an MSR name never wraps: a table is printed only when it fits the width with every such cell whole, else the
same rows are printed stacked, one block per row.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import uapi
from .probe import FROZEN, JSON_SCHEMA_VERSION, NO_RUN, NOT_SETTABLE, WRITABLE
from .scenario import VM_WIDE_KINDS

if TYPE_CHECKING:
    from .check import Change, Report, StepResult
    from .msrs import Msr
    from .probe import MsrProbe, ProbeReport

Part = str | tuple[str, str] | Text  # plain text, (text, rich style), or styled text

DEFAULT_WIDTH = 80  # off a terminal, without COLUMNS


def json_document(command: str, body: dict[str, Any]) -> None:
    """Print one ``--json`` document: every command's is an object that starts with ``schema_version`` and the
    ``command`` that made it, so a script can check both before it reads the rest (README.md)."""
    assert not {"schema_version", "command"} & body.keys(), "a report's own key would hide the envelope's"
    click.echo(json.dumps({"schema_version": JSON_SCHEMA_VERSION, "command": command, **body}, indent=2))


def _terminal() -> bool:
    return sys.stdout.isatty()


def _width() -> int:
    """Off a terminal: ``COLUMNS`` when it is a sane number, else 80."""
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and 20 <= int(columns) <= 1000 else DEFAULT_WIDTH


EXIT_BROKEN_PIPE = 128 + 13  # the status of a process SIGPIPE ended


class _Console(Console):
    """rich's console, except that a reader going away (``kvmscope probe | head -1``) ends the command with 141 (128 +
    SIGPIPE), as the CLI's other output does and as `cat` gives under ``set -o pipefail``, where rich exits 1."""

    def on_broken_pipe(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_BROKEN_PIPE)


def console() -> Console:
    """Standard output: the terminal's width on a terminal; off one, ``COLUMNS`` or 80 (rich would otherwise ask
    stdin and stderr for a width, so ``kvmscope probe | less`` would follow whatever terminal is attached)."""
    if _terminal():
        return _Console(file=sys.stdout, force_terminal=True)
    return _Console(file=sys.stdout, width=_width(), force_terminal=False)


def _err_console() -> Console:
    # Looked up at each call: the CLI's tests swap sys.stderr.
    terminal = sys.stderr.isatty()
    return Console(file=sys.stderr, width=None if terminal else _width(), force_terminal=terminal)


# Control characters and bidirectional overrides in user text (a recording's labels, a scenario's name) would move the
# cursor, recolour the terminal or split a line: they are shown as escapes.
_HIDDEN = re.compile("[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """``text`` with control characters and bidi overrides shown as Python escapes."""
    return _HIDDEN.sub(lambda m: repr(m.group())[1:-1], text) if _HIDDEN.search(text) else text


def line(*parts: Part) -> Text:
    """One line from plain and styled parts; no part is read as markup, and none can hide or split it (``clean``)."""
    return Text.assemble(*(clean(p) if isinstance(p, str) else (clean(p[0]), p[1]) if isinstance(p, tuple) else p
                           for p in parts))


def error(message: str) -> None:
    """``error: <message>`` on stderr, one line however long (a script greps it)."""
    _err_console().print(line(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)


def note(message: str) -> None:
    _err_console().print(line("note: ", message), soft_wrap=True, highlight=False)


def _hex(v: int | None) -> str:
    return "-" if v is None else f"0x{v:x}"


def _ok(v: bool | None) -> Text:
    return Text("-") if v is None else Text("ok", "green") if v else Text("refused", "red")


def fields_text(fields: dict[str, Any]) -> str:
    """Decoded fields as a user reads them: the names of the flags that are set, ``NAME=value`` for multi-bit
    fields that are not 0 (hex above 9), ``(no bit set)`` when none is, ``-`` without a decoder."""
    parts = []
    for k, v in fields.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif v:
            parts.append(f"{k}={v:#x}" if k == "other_bits" or v > 9 else f"{k}={v}")
    return " ".join(parts) or ("(no bit set)" if fields else "-")


def _fits(con: Console, columns: Sequence[tuple[str, bool]], rows: Sequence[Sequence[Text]]) -> bool:
    """Whether a table of ``rows`` fits ``con`` with every no-wrap cell whole and each wrapping column at least as
    wide as its longest word (columns: header, wraps). Mirrors rich's layout: one space of padding each side of a
    cell and one rule between columns, no outer edge."""
    need = len(columns) - 1
    for i, (header, wraps) in enumerate(columns):
        cells = [header, *(r[i].plain for r in rows)]
        if wraps:
            need += max((cell_len(w) for c in cells for w in c.split()), default=1) + 2
        else:
            need += max(cell_len(c) for c in cells) + 2
    return need <= con.width


def _table(title: str, columns: Sequence[tuple[str, bool]], rows: Sequence[Sequence[Text]],
           right: Iterable[int] = ()) -> Table:
    table = Table(title=title, show_edge=False)
    aligned = set(right)
    for i, (header, wraps) in enumerate(columns):
        width = max(cell_len(c) for c in [header, *(r[i].plain for r in rows)])
        table.add_column(header, no_wrap=not wraps, min_width=None if wraps else width,
                         justify="right" if i in aligned else "left")
    for r in rows:
        table.add_row(*r)
    return table


def _print_stacked(con: Console, title: str, blocks: Iterable[tuple[Text, list[Text]]]) -> None:
    """Rows one under another: a head line, then its details indented (wrapped lines keep the indent, and no line
    carries trailing blanks)."""
    con.print(Text(title, style="italic"), highlight=False)
    for head, details in blocks:
        con.print(head, highlight=False)
        for d in details:
            for wrapped in d.wrap(con, max(con.width - 4, 20)):
                wrapped.rstrip()
                con.print(Text("    ") + wrapped, highlight=False, soft_wrap=True)


# --- kvmscope probe -----------------------------------------------------------------------------------------------------

# KVM_X86_QUIRK_* (arch/x86/include/uapi/asm/kvm.h). Bit 9 is IGNORE_GUEST_PAT (c9c1e20b4c7d, 6.13); bit 10 is
# VMCS12_ALLOW_FREEZE_IN_SMM (e2ffe85b6d2b, 6.19, in 6.18.y stable), which this host's 6.18.44 reports.
QUIRK_NAMES: dict[int, str] = {
    **{value.bit_length() - 1: name.removeprefix("KVM_X86_QUIRK_") for name, value in vars(uapi).items()
       if name.startswith("KVM_X86_QUIRK_") and isinstance(value, int)},
    9: "IGNORE_GUEST_PAT",
    10: "VMCS12_ALLOW_FREEZE_IN_SMM",
}


def quirk_names(mask: int) -> str:
    """The quirks in a KVM_CAP_DISABLE_QUIRKS2 mask by name (``bit N`` for a bit kvmscope has no name for)."""
    return " ".join(QUIRK_NAMES.get(b, f"bit {b}") for b in range(mask.bit_length()) if mask >> b & 1) or "none"


def fallback(reason: str, description: str) -> None:
    """``--backend auto`` found no usable /dev/kvm and shows the model instead."""
    con = _err_console()
    con.print(line(("warning:", "yellow"), " ", reason), soft_wrap=True, highlight=False)
    con.print(line(("warning:", "yellow"), f" showing the MODEL instead ({description}); nothing below was measured "
                   "on a live kernel"), soft_wrap=True, highlight=False)


def saved_profile(name: str, path: str) -> None:
    _err_console().print(line(f"saved profile {name!r} to {path}"), soft_wrap=True, highlight=False)


def probe(report: ProbeReport, fallback_reason: str | None, as_json: bool) -> None:
    """The probe report: JSON (with ``fallback_reason``), or the host lines, capabilities, feature MSRs, freeze
    check, what explains its rows, and the conclusion."""
    if as_json:
        json_document("probe", {**report.to_json(), "fallback_reason": fallback_reason})
        return
    con = console()
    for text in probe_header(report):
        con.print(text, highlight=False)
    params = report.host.get("module_parameters") or {}
    if params:
        con.print(line("module parameters: " + " ".join(f"{k}={v}" for k, v in params.items())), highlight=False)
    _print_table(con, *_capabilities(report))
    quirks = {v for k, v in report.capabilities.items() if "QUIRKS" in k}
    for mask in sorted(quirks):
        con.print(line("quirks KVM can disable (", f"0x{mask:x}", "): ", quirk_names(mask)), highlight=False)
    _print_table(con, *_feature_msrs(report))
    if report.later:  # the model: what the profile's host has that this kernel version does not yet
        con.print(line(f"Not yet on kernel {report.host.get('ruleset')} (the profile's host has them), by the release "
                       "that brings them (docs/rules.md):"), highlight=False)
        by_release: dict[str, dict[str, list[str]]] = {}
        for name, at in report.later.items():  # one register's bits from two rules of a release: one item
            head, sep, bits = name.removeprefix("KVM_CAP_").partition(" bit(s) ")
            by_release.setdefault(at["since"], {}).setdefault(head + sep, []).append(bits)
        for since, names in by_release.items():
            con.print(line(f"  {since}: ", ", ".join(f"{h}{', '.join(b)}" if b != [""] else h for h, b in names.items())),
                      highlight=False)
    if _print_table(con, *_freeze_check(report)):
        con.print(line("before: a changed value on a vCPU that never ran (tried: the first, +N more); after: the same and "
                       "a changed value after a run to HLT"), style="dim", highlight=False)
        for m in report.msrs:  # stacked rows carry their own explanation
            if m.why:
                con.print(line(f"0x{m.index:x} {m.name}: ", m.why), highlight=False)
    style = "bold green" if report.freeze_enforced else "bold red" if report.freeze_enforced is False else "yellow"
    con.print(line(("Conclusion:", style), " ", report.conclusion), highlight=False)


def probe_header(report: ProbeReport) -> list[Text]:
    """Which kernel this is: the live one, or the model's ruleset on a profile, whose capture kernel is named as the
    profile's (so the lines never disagree about the version)."""
    host = report.host
    api = f"API version {report.api_version}  index list {len(report.msr_index_list)} MSRs"
    if report.backend == "linux":
        return [line(("kvmscope probe", "bold"), " - LIVE KERNEL"), line(report.description),
                line(f"vendor module {host.get('vendor_module')}  ", api)]
    return [line(("kvmscope probe", "bold"), " - MODEL (software KVM, not the live kernel)"), line(report.description),
            line(f"profile {host.get('profile')} captured from kernel {host.get('kernel_release')}, vendor module "
                 f"{host.get('vendor_module')}"), line(api)]


Layout = tuple[str, list[tuple[str, bool]], list[list[Text]], list[tuple[Text, list[Text]]], list[int]]


def _print_table(con: Console, title: str, columns: list[tuple[str, bool]], rows: list[list[Text]],
                 stacked: list[tuple[Text, list[Text]]], right: list[int]) -> bool:
    """The rows as a table when it fits whole, else stacked; True for the table."""
    if _fits(con, columns, rows):
        con.print(_table(title, columns, rows, right), highlight=False)
        return True
    _print_stacked(con, title, stacked)
    return False


def _capabilities(report: ProbeReport) -> Layout:
    rows = [[Text(name), Text(f"{value:#x}" if "QUIRKS" in name else str(value))]
            for name, value in report.capabilities.items()]
    stacked: list[tuple[Text, list[Text]]] = [(line(r[0].plain, " = ", r[1].plain), []) for r in rows]
    return "Capabilities", [("capability", False), ("value", False)], rows, stacked, [1]


def _feature_msrs(report: ProbeReport) -> Layout:
    rows = [[Text(f"0x{m.index:x}"), Text(m.name), Text(_hex(m.value)), Text(fields_text(m.fields))]
            for m in report.msrs]
    stacked = [(line((r[0].plain, "bold"), " ", r[1].plain, " = ", r[2].plain), [r[3]]) for r in rows]
    columns = [("MSR", False), ("name", False), ("value", False), ("decoded", True)]
    return "Feature MSRs (KVM_GET_MSR_FEATURE_INDEX_LIST, system KVM_GET_MSRS)", columns, rows, stacked, []


# The verdicts in a table cell; a verdict not named here is shown whole.
SHORT_VERDICT = {FROZEN: "frozen", WRITABLE: "writable", NOT_SETTABLE: "not settable", NO_RUN: "did not run"}
_VERDICT_STYLE = {FROZEN: "bold yellow", WRITABLE: "green", NOT_SETTABLE: "dim"}


def _tried(m: MsrProbe) -> str:
    if m.changed_value is not None:
        return _hex(m.changed_value)
    if m.tried is None:
        return "-"
    return f"{_hex(m.tried)} (+{m.tried_count - 1})" if m.tried_count > 1 else _hex(m.tried)


def _freeze_check(report: ProbeReport) -> Layout:
    title = "Freeze check (fresh VMs" + (", CPUID = KVM_GET_SUPPORTED_CPUID" if report.cpuid_set else "") + ")"
    rows: list[list[Text]] = []
    stacked: list[tuple[Text, list[Text]]] = []
    for m in report.msrs:
        verdict = Text(SHORT_VERDICT.get(m.verdict, m.verdict), _VERDICT_STYLE.get(m.verdict, "red"))
        rows.append([Text(f"0x{m.index:x}"), Text(_hex(m.vcpu_default)), Text(_tried(m)), _ok(m.before_run_changed_ok),
                     _ok(m.after_run_same_ok), _ok(m.after_run_changed_ok), Text(_hex(m.after_run_readback)), verdict])
        feature = " (the feature value)" if m.tried is not None and m.tried == m.value else ""
        tried = (f"took {_hex(m.changed_value)}" + (f" after {m.tried_count - 1} refused" if m.tried_count > 1 else "")
                 if m.changed_value is not None else
                 f"refused {_hex(m.tried)}{feature}" + (f" and {m.tried_count - 1} other values" if m.tried_count > 1
                                                        else "")
                 if m.tried is not None else "tried nothing")
        stacked.append((
            line((f"0x{m.index:x}", "bold"), " ", m.name, ": ", (m.verdict, _VERDICT_STYLE.get(m.verdict, "red"))),
            [line(f"vCPU default {_hex(m.vcpu_default)}; before a run it ", tried),
             line("after a run: the same value ", _ok(m.after_run_same_ok), ", a changed one ",
                  _ok(m.after_run_changed_ok), f"; reads back {_hex(m.after_run_readback)}"),
             *([line("why: ", m.why)] if m.why else [])]))
    columns = [("MSR", False), ("default", False), ("tried", False), ("before", False), ("after: same", False),
               ("after: changed", False), ("read back", False), ("verdict", False)]
    return title, columns, rows, stacked, []


# --- kvmscope decode, kvmscope msrs ---------------------------------------------------------------------------------------


def decode(m: Msr, value: int | None, as_json: bool) -> None:
    """One MSR and, with a value, its decoded fields: the flags that are set by name, multi-bit fields as numbers."""
    from .msrs import BY_INDEX

    fields = m.decode(value) if value is not None else {}
    known = m.index in BY_INDEX
    if as_json:
        json_document("decode", {"index": f"0x{m.index:x}", "name": m.name, "known": known,
                                 "aliases": list(m.aliases), "feature": m.feature,
                                 "value": _hex(value) if value is not None else None, "fields": fields})
        return
    click.echo(f"{m.name} (0x{m.index:x}){', a feature MSR' if m.feature else ''}"
               f"{'' if known else ': not an MSR kvmscope has a name for (`kvmscope msrs` lists them)'}")
    if value is None:
        return
    click.echo(f"value 0x{value:x}" + ("" if fields or not known else "  (kvmscope decodes no fields of it)"))
    flags = [k for k, v in fields.items() if v is True]
    numbers = {k: v for k, v in fields.items() if not isinstance(v, bool)}
    if flags:
        click.echo("  set: " + " ".join(flags))
    for k, n in numbers.items():
        click.echo(f"  {k} = " + (f"0x{n:x}" if n > 9 or k == "other_bits" else str(n)))
    if fields and not flags and not any(numbers.values()):
        click.echo("  (no bit set)")


def msr_list(catalogue: Iterable[Msr], as_json: bool) -> None:
    if as_json:
        json_document("msrs", {"msrs": [{"index": f"0x{m.index:x}", "name": m.name, "aliases": list(m.aliases),
                                         "feature": m.feature} for m in catalogue]})
        return
    for m in catalogue:
        click.echo(f"0x{m.index:08x}  {m.name}{'  [feature]' if m.feature else ''}")


# --- kvmscope check -------------------------------------------------------------------------------------------------------


def _emit(con: Console, text: Text | str) -> None:
    """One line of a report: styled on a terminal (wrapped at spaces), plain and whole otherwise (fast, greppable). A
    str is plain text, never markup."""
    if con.is_terminal:
        con.print(Text(text) if isinstance(text, str) else text, highlight=False)
    else:
        sys.stdout.write((text if isinstance(text, str) else text.plain) + "\n")


def diff_marks(old: int, new: int) -> str:
    """A caret under each hex digit that differs between two values printed as ``0x%016x`` (the ``0x`` gets none)."""
    a, b = f"{old:016x}", f"{new:016x}"
    return "  " + "".join("^" if x != y else " " for x, y in zip(a, b, strict=True))


def check_title(con: Console, scenario: str, path: str, description: str) -> None:
    _emit(con, line((scenario, "bold"), f" ({path}) on {description}"))


_VALUE_COLUMN = "      old "  # the evidence lines put each 0x%016x value under the one above


def _evidence(s: StepResult) -> Iterable[Text | str]:
    """The lines that show why a step came out as it did: the refused entry, old and new values, the rule."""
    r = s.refusal
    if r is not None:
        yield f"      {r.name} (0x{r.index:x}) at position {r.position}"
        yield from _old_new(r.old, r.new)
        yield f"      rule: {r.rule or 'not known (the live kernel does not say why)'}"
        yield f"      hint: {r.hint}"
    elif s.met is False and s.writes:
        # Expected a refusal and the kernel took it: what was written over what, entry by entry.
        for index, name, old, new in s.writes:
            yield f"      {name} (0x{index:x}) was accepted"
            yield from _old_new(old, new)


def _old_new(old: int | None, new: int) -> Iterable[Text | str]:
    yield _VALUE_COLUMN + ("unreadable" if old is None else f"0x{old:016x}")
    yield f"      new 0x{new:016x}"
    if old is None:
        return
    if old == new:
        yield " " * len(_VALUE_COLUMN) + "(same value)"
        return
    bits = [b for b in range(64) if (old ^ new) >> b & 1]
    shown = ", ".join(map(str, bits[:12])) + (" ..." if len(bits) > 12 else "")
    yield " " * len(_VALUE_COLUMN) + diff_marks(old, new) + f"  bits differing: {shown}"


_OUTCOME_STYLE = {"accepted": "green", "ok": "green", "differs": "yellow", "refused": "yellow", "error": "red"}


@dataclass
class Tally:
    """What a replay of a recording found beyond pass and fail: steps that got further than the recording, and the
    capabilities the VMM asked for that this kernel answers otherwise."""

    beyond: int = 0
    asked: dict[str, None] = field(default_factory=dict)
    not_listed: int = 0

    def text(self) -> str:
        from .check import asked_text

        parts = [f"{self.beyond} step(s) got further than the recording" if self.beyond else "", asked_text(self.asked),
                 f"{self.not_listed} recorded batch(es) hold an MSR this kernel does not list (the VMM would not send "
                 "it)" if self.not_listed else ""]
        return "".join(f"; {p}" for p in parts if p)


def check_steps(con: Console, results: Iterable[StepResult], tally: Tally | None = None) -> bool:
    """Each step's result (and refusal, notes, expectation) as it comes; True when every step was ok."""
    ok = True
    tally = Tally() if tally is None else tally
    for s in results:
        ok = ok and s.ok
        tally.beyond += s.beyond_recording
        tally.not_listed += s.not_listed
        if s.outcome == "differs":
            tally.asked[s.asked_capability] = None
        mark = Text("✓", "green") if s.met else Text("✗", "red") if not s.ok else Text("+", "yellow") if \
            s.beyond_recording else Text(" ")
        label = f" ({s.label})" if s.label else ""
        on = "" if s.kind in VM_WIDE_KINDS or s.vcpu is None else f" vCPU {s.vcpu}"
        _emit(con, line(mark, f" [{s.number}] line {s.line:<3} {s.kind}{on}{label}: ",
                        (s.outcome.upper(), _OUTCOME_STYLE.get(s.outcome, "red")), " ", s.summary))
        for text in _evidence(s):
            _emit(con, text)
        for n in s.notes:
            _emit(con, f"      {n}")
        if s.expected:
            verdict = ("met", "") if s.met else ("beyond the recording", "yellow") if s.beyond_recording else \
                ("NOT met", "red")
            _emit(con, line(f"      expected: {s.expected} (as recorded) -> " if s.beyond_recording
                            else f"      expected: {s.expected} -> ", verdict))
    return ok


def check_verdict(con: Console, ok: bool, tally: Tally | None = None) -> None:
    found = tally.text() if tally is not None else ""
    _emit(con, line(("OK", "bold green"), f": every step did what it expected{found}") if ok else
          line(("FAILED", "bold red"), f": a step did not do what it expected (or was refused without an expectation)"
                                       f"{found}"))


def check_report(report: Report, as_json: bool) -> None:
    """A whole replay: JSON, or the title, the steps and the verdict."""
    if as_json:
        json_document("check", report.to_json())
        return
    con = console()
    check_title(con, report.scenario, report.path, report.description)
    tally = Tally()
    check_steps(con, report.steps, tally)
    check_verdict(con, report.ok, tally)


def check_stream(scenario: str, path: str, description: str, results: Iterable[StepResult]) -> bool:
    """A replay printed step by step as it runs (constant memory); True when every step was ok."""
    con = console()
    check_title(con, scenario, path, description)
    tally = Tally()
    ok = check_steps(con, results, tally)
    check_verdict(con, ok, tally)
    return ok


def comparison(scenario: str, kernels: list[str], profile: str, reports: dict[str, Report], changes: list[Change],
               as_json: bool, proposals: dict[str, str] | None = None) -> None:
    """The steps whose outcome changes between kernels (JSON: with every kernel's whole report). ``proposals``: the
    ruleset each proposal file names, printed under the title (the steps name the file as it was given)."""
    if as_json:
        json_document("check --compare", {"scenario": scenario, "kernels": kernels,
                                          "reports": {v: r.to_json() for v, r in reports.items()},
                                          "changes": [vars(c) for c in changes], "proposals": proposals or {}})
        return
    from .check import kernels_text, outcome_text

    con = console()
    _emit(con, line((scenario, "bold"), f" on kernels {kernels_text(kernels, kernels)} (model, profile {profile})"))
    for label, ruleset in (proposals or {}).items():
        _emit(con, line(f"  {label}: {ruleset}"))
    if not changes:
        _emit(con, line("no step changes outcome between these kernels"))
    for c in changes:
        _emit(con, line(f"  [{c.number}] line {c.line} {c.kind}: {c.text}"))

    changed = {c.number for c in changes}
    steps = zip(*(r.steps for r in reports.values()), strict=True)
    for n, results in enumerate(steps):  # a step that misses its expectation the same way on every kernel
        if n not in changed and not results[0].ok:
            r = results[0]
            _emit(con, line(f"  [{n}] line {r.line} {r.kind}: {outcome_text(r)} on every kernel compared: "
                            f"{r.summary}" + (f" (expected {r.expected})" if r.expected else "")))
    failed = [k for k, r in reports.items() if not r.ok]
    further = [k for k, r in reports.items() if any(st.beyond_recording for st in r.steps)]
    beyond = f"; got further than the recording on {kernels_text(further, kernels)}" if further else ""
    _emit(con, line(("FAILED", "bold red"), f": a step did not do what it expected on {kernels_text(failed, kernels)}"
                    f"{beyond}")
          if failed else line(("OK", "bold green"), f": every step did what it expected on every kernel{beyond}"))


_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def error_line(message: str) -> None:
    """An error as exactly one line on stderr (issue 13): never wrapped, never read as markup, control characters
    escaped, and text that cannot be encoded (a lone surrogate) shown as an escape rather than failing."""
    from rich.text import Text

    line = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], " ".join(message.splitlines()))
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    _err_console().print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True, highlight=False)
