"""Everything the ``kvmscope`` command prints: the probe tables, check reports, kernel comparisons, MSR decodings and
lists, as styled text or as JSON. The CLI decides what to print; this module decides how it looks."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from .probe import FROZEN, NOT_SETTABLE, WRITABLE

if TYPE_CHECKING:
    from .check import Change, Report, StepResult
    from .msrs import Msr
    from .probe import ProbeReport

err_console = Console(stderr=True)


def console() -> Console:
    """Standard output: wide enough for the tables when it is not a terminal."""
    return Console(width=None if sys.stdout.isatty() else 160)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)


def note(message: str) -> None:
    err_console.print(f"note: {message}", highlight=False)


def _hex(v: int | None) -> str:
    return "-" if v is None else f"0x{v:x}"


def _ok(v: bool | None) -> str:
    return "-" if v is None else ("[green]ok[/]" if v else "[red]refused[/]")


def _fields(fields: dict[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif v:
            parts.append(f"{k}={v:#x}" if k == "other_bits" or v > 9 else f"{k}={v}")
    return " ".join(parts) or "(none set)"


# --- kvmscope probe -----------------------------------------------------------------------------------------------------


def fallback(reason: str, description: str) -> None:
    """``--backend auto`` found no usable /dev/kvm and shows the model instead."""
    err_console.print(f"[yellow]warning:[/] {reason}\n[yellow]warning:[/] showing the MODEL instead "
                      f"({description}); nothing below was measured on a live kernel", highlight=False)


def saved_profile(name: str, path: str) -> None:
    err_console.print(f"saved profile {name!r} to {path}", highlight=False)


def probe(report: ProbeReport, fallback_reason: str | None, as_json: bool) -> None:
    """The probe report: JSON (with ``fallback_reason``), or the host line, capabilities, feature MSRs, freeze check
    and conclusion."""
    if as_json:
        out = report.to_json()
        out["fallback_reason"] = fallback_reason
        click.echo(json.dumps(out, indent=2))
        return
    con = console()
    host = report.host
    label = "LIVE KERNEL" if report.backend == "linux" else "MODEL (software KVM, not the live kernel)"
    con.print(f"[bold]kvmscope probe[/] - {label}: {report.description}", highlight=False)
    con.print(
        f"kernel {host.get('kernel_release')}  vendor module {host.get('vendor_module')}  "
        f"API version {report.api_version}  index list {len(report.msr_index_list)} MSRs",
        highlight=False,
    )
    if host.get("module_parameters"):
        params = host["module_parameters"]
        con.print("module parameters: " + " ".join(f"{k}={v}" for k, v in params.items()), highlight=False)
    con.print(_capabilities(report))
    con.print(_feature_msrs(report))
    con.print(_freeze_check(report))
    style = "bold green" if report.freeze_enforced else "bold red" if report.freeze_enforced is False else "yellow"
    con.print(f"[{style}]Conclusion:[/] {report.conclusion}", highlight=False)


def _capabilities(report: ProbeReport) -> Table:
    caps = Table(title="Capabilities", show_edge=False)
    caps.add_column("capability")
    caps.add_column("value", justify="right")
    for name, value in report.capabilities.items():
        caps.add_row(name, f"{value:#x}" if "QUIRKS" in name else str(value))
    return caps


def _feature_msrs(report: ProbeReport) -> Table:
    feats = Table(title="Feature MSRs (KVM_GET_MSR_FEATURE_INDEX_LIST, system KVM_GET_MSRS)", show_edge=False)
    for col in ("MSR", "name", "value", "decoded"):
        feats.add_column(col, overflow="fold")
    for m in report.msrs:
        feats.add_row(f"0x{m.index:x}", m.name, _hex(m.value), _fields(m.fields))
    return feats


def _freeze_check(report: ProbeReport) -> Table:
    check = Table(
        title="Freeze check (fresh VMs" + (", CPUID = KVM_GET_SUPPORTED_CPUID" if report.cpuid_set else "") + ")",
        show_edge=False,
    )
    for col in ("MSR", "vCPU default", "changed value", "before run", "after run: same", "after run: changed",
                "read back", "verdict"):
        check.add_column(col, overflow="fold")
    colour = {FROZEN: "bold yellow", WRITABLE: "green", NOT_SETTABLE: "dim"}
    for m in report.msrs:
        check.add_row(
            f"0x{m.index:x}",
            _hex(m.vcpu_default),
            _hex(m.changed_value),
            _ok(m.before_run_changed_ok),
            _ok(m.after_run_same_ok),
            _ok(m.after_run_changed_ok),
            _hex(m.after_run_readback),
            f"[{colour.get(m.verdict, 'red')}]{m.verdict}[/]",
        )
    return check


# --- kvmscope decode, kvmscope msrs ---------------------------------------------------------------------------------------


def decode(m: Msr, value: int | None, as_json: bool) -> None:
    """One MSR and, with a value, its decoded fields."""
    fields = m.decode(value) if value is not None else {}
    if as_json:
        click.echo(json.dumps({"index": f"0x{m.index:x}", "name": m.name, "aliases": list(m.aliases),
                               "feature": m.feature, "value": _hex(value) if value is not None else None,
                               "fields": fields}))
        return
    click.echo(f"{m.name} (0x{m.index:x}){' [feature MSR]' if m.feature else ''}")
    if value is not None:
        click.echo(f"value 0x{value:x}")
        for k, fv in fields.items():
            click.echo(f"  {k:24} {fv if isinstance(fv, bool) else hex(fv)}")


def msr_list(catalogue: Iterable[Msr], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{"index": f"0x{m.index:x}", "name": m.name, "aliases": list(m.aliases),
                                "feature": m.feature} for m in catalogue], indent=2))
        return
    for m in catalogue:
        click.echo(f"0x{m.index:08x}  {m.name}{'  [feature]' if m.feature else ''}")


# --- kvmscope check -------------------------------------------------------------------------------------------------------

_STYLE_TAGS = re.compile(r"\[(?:/|(?:bold )?(?:green|red|yellow)|bold|dim)\]")


def _emit(con: Console, markup: str) -> None:
    """One line of a report: styled on a terminal, plain (and fast) otherwise."""
    if con.is_terminal:
        con.print(markup, highlight=False)
    else:
        sys.stdout.write(_STYLE_TAGS.sub("", markup) + "\n")


def _diff_marks(old: int, new: int) -> str:
    """A caret under each hex digit that differs between two 16-digit values."""
    a, b = f"{old:016x}", f"{new:016x}"
    return "".join("^" if x != y else " " for x, y in zip(a, b, strict=True))


def check_title(con: Console, scenario: str, path: str, description: str) -> None:
    con.print(f"[bold]{scenario}[/] ({path}) on {description}", highlight=False)


def check_steps(con: Console, results: Iterable[StepResult]) -> bool:
    """Each step's result (and refusal, notes, expectation) as it comes; True when every step was ok."""
    ok = True
    for s in results:
        ok = ok and s.ok
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: " "}[s.met]
        colour = {"accepted": "green", "ok": "green", "refused": "yellow", "error": "red"}[s.outcome]
        label = f" ({s.label})" if s.label else ""
        _emit(con, f"{mark} [{s.number}] line {s.line:<3} {s.kind} vCPU {s.vcpu}{label}: "
                   f"[{colour}]{s.outcome.upper()}[/] {s.summary}")
        r = s.refusal
        if r is not None:
            old = "unreadable" if r.old is None else f"0x{r.old:016x}"
            _emit(con, f"      {r.name} (0x{r.index:x}) at position {r.position}")
            _emit(con, f"      old {old}\n      new 0x{r.new:016x}")
            if r.old is not None and r.differing:
                bits = [b for b in range(64) if r.differing >> b & 1]
                shown = ", ".join(map(str, bits[:12])) + (" ..." if len(bits) > 12 else "")
                _emit(con, f"          {_diff_marks(r.old, r.new)}  bits differing: {shown}")
            elif r.old is not None:
                _emit(con, "          (same value as before)")
            _emit(con, f"      rule: {r.rule or 'not known (the live kernel does not say why)'}")
            _emit(con, f"      hint: {r.hint}")
        for line in s.notes:
            _emit(con, f"      {line}")
        if s.expected:
            _emit(con, f"      expected: {s.expected} -> {'met' if s.met else '[red]NOT met[/]'}")
    return ok


def check_verdict(con: Console, ok: bool) -> None:
    verdict = "[bold green]OK[/]: every step did what it expected" if ok else \
        "[bold red]FAILED[/]: a step did not do what it expected (or was refused without an expectation)"
    con.print(verdict, highlight=False)


def check_report(report: Report, as_json: bool) -> None:
    """A whole replay: JSON, or the title, the steps and the verdict."""
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    con = console()
    check_title(con, report.scenario, report.path, report.description)
    check_steps(con, report.steps)
    check_verdict(con, report.ok)


def check_stream(scenario: str, path: str, description: str, results: Iterable[StepResult]) -> bool:
    """A replay printed step by step as it runs (constant memory); True when every step was ok."""
    con = console()
    check_title(con, scenario, path, description)
    ok = check_steps(con, results)
    check_verdict(con, ok)
    return ok


def comparison(scenario: str, kernels: list[str], profile: str, reports: dict[str, Report], changes: list[Change],
               as_json: bool) -> None:
    """The steps whose outcome changes between kernels (JSON: with every kernel's whole report)."""
    if as_json:
        click.echo(json.dumps({"scenario": scenario, "kernels": kernels,
                               "reports": {v: r.to_json() for v, r in reports.items()},
                               "changes": [vars(c) for c in changes]}, indent=2))
        return
    con = console()
    con.print(f"[bold]{scenario}[/] on kernels {', '.join(kernels)} (model, profile {profile})", highlight=False)
    if not changes:
        con.print("no step changes outcome between these kernels", highlight=False)
    for c in changes:
        con.print(f"  [{c.number}] line {c.line} {c.kind}: {c.text}", highlight=False)


_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def error_line(message: str) -> None:
    """An error as exactly one line on stderr (issue 13): never wrapped, never read as markup, control characters
    escaped, and text that cannot be encoded (a lone surrogate) shown as an escape rather than failing."""
    from rich.text import Text

    line = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], " ".join(message.splitlines()))
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    err_console.print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True, highlight=False)
