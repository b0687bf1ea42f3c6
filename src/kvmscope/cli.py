"""The ``kvmscope`` command."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from . import msrs as _msrs
from .api import System
from .errors import KvmscopeError, KvmUnavailableError

# Exit codes shared by every subcommand.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_KVM = 3

err_console = Console(stderr=True)


def fail(message: str, code: int) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def open_backend(backend: str, kernel: str | None, profile: str | None) -> tuple[System, str | None]:
    """Open the chosen backend; with ``auto``, fall back to the model and return why."""
    import kvmscope

    if backend in ("auto", "linux") and (kernel or profile):
        if backend == "linux":
            raise click.UsageError("--kernel and --profile choose the model; drop them or use --backend model")
        backend = "model"
    if backend == "auto":
        try:
            return kvmscope.open("linux"), None
        except KvmUnavailableError as e:
            return kvmscope.open("model"), str(e)
    if backend == "linux":
        return kvmscope.open("linux"), None
    options: dict[str, Any] = {}
    if kernel:
        options["kernel"] = kernel
    if profile:
        options["profile"] = profile
    return kvmscope.open("model", **options), None


backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "linux", "model"]),
    default="auto",
    show_default=True,
    help="linux: the live /dev/kvm; model: kvmscope's software KVM; auto: linux when /dev/kvm is usable, else model.",
)
kernel_option = click.option("--kernel", metavar="VERSION", help="Model only: kernel ruleset, e.g. 6.3, 6.10, 6.18.")
profile_option = click.option(
    "--profile", metavar="NAME|FILE", help="Model only: a shipped host profile name or a profile JSON file."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmscope")
def main() -> None:
    """kvmscope: Linux KVM's x86 vCPU model, live (/dev/kvm) and modelled.

    Exit codes: 0 success, 1 a check failed, 2 bad input or arguments, 3 /dev/kvm missing or not permitted.
    """


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


@main.command()
@backend_option
@kernel_option
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-cpuid", is_flag=True, help="Do not set KVM_GET_SUPPORTED_CPUID on the probe vCPUs first.")
@click.option("--save", "save_path", metavar="FILE", type=click.Path(dir_okay=False, writable=True),
              help="Also capture this host's profile (live kernel only) and write it to FILE as JSON.")
@click.option("--name", "profile_name", metavar="NAME", help="With --save: the profile's name.")
def probe(backend: str, kernel: str | None, profile: str | None, as_json: bool, no_cpuid: bool,
          save_path: str | None, profile_name: str | None) -> None:
    """Show what this host's KVM offers and whether it freezes the vCPU model after the first run.

    For every feature MSR: its value and decoded fields, then a live check on fresh VMs: a changed write on a vCPU
    that never ran, and a same-value and a changed write after a run to the first HLT.

    \b
    Examples:
      kvmscope probe
      kvmscope probe --json
      kvmscope probe --backend model --profile intel-spr --kernel 6.18
    """
    from .probe import FROZEN, NOT_SETTABLE, WRITABLE
    from .probe import probe as run_probe

    try:
        system, fallback = open_backend(backend, kernel, profile)
    except KvmUnavailableError as e:
        fail(str(e), EXIT_NO_KVM)
    except KvmscopeError as e:
        fail(str(e), EXIT_USAGE)
    if fallback:
        err_console.print(f"[yellow]warning:[/] {fallback}\n[yellow]warning:[/] showing the MODEL instead "
                          f"({system.describe()}); nothing below was measured on a live kernel", highlight=False)
    if save_path:
        import os

        parent = os.path.dirname(os.path.abspath(save_path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            system.close()
            fail(f"cannot write {save_path}: {parent} is not a writable directory", EXIT_USAGE)
    if save_path and system.backend != "linux":
        system.close()
        fail("--save captures a profile from the live kernel; the model has nothing new to capture", EXIT_NO_KVM
             if fallback else EXIT_USAGE)
    with system:
        report = run_probe(system, set_cpuid=not no_cpuid)
        if save_path:
            from .capture import capture

            captured = capture(system, name=profile_name)
            try:
                captured.save(save_path)
            except OSError as e:
                fail(f"cannot write {save_path}: {e.strerror}", EXIT_FAILED)
            err_console.print(f"saved profile {captured.name!r} to {save_path}", highlight=False)
    if as_json:
        out = report.to_json()
        out["fallback_reason"] = fallback
        click.echo(json.dumps(out, indent=2))
        sys.exit(EXIT_NO_KVM if fallback else EXIT_OK)

    console = Console(width=None if sys.stdout.isatty() else 160)
    host = report.host
    label = "LIVE KERNEL" if report.backend == "linux" else "MODEL (software KVM, not the live kernel)"
    console.print(f"[bold]kvmscope probe[/] - {label}: {report.description}", highlight=False)
    console.print(
        f"kernel {host.get('kernel_release')}  vendor module {host.get('vendor_module')}  "
        f"API version {report.api_version}  index list {len(report.msr_index_list)} MSRs",
        highlight=False,
    )
    if host.get("module_parameters"):
        params = host["module_parameters"]
        console.print("module parameters: " + " ".join(f"{k}={v}" for k, v in params.items()), highlight=False)
    caps = Table(title="Capabilities", show_edge=False)
    caps.add_column("capability")
    caps.add_column("value", justify="right")
    for name, value in report.capabilities.items():
        caps.add_row(name, f"{value:#x}" if "QUIRKS" in name else str(value))
    console.print(caps)

    feats = Table(title="Feature MSRs (KVM_GET_MSR_FEATURE_INDEX_LIST, system KVM_GET_MSRS)", show_edge=False)
    for col in ("MSR", "name", "value", "decoded"):
        feats.add_column(col, overflow="fold")
    for m in report.msrs:
        feats.add_row(f"0x{m.index:x}", m.name, _hex(m.value), _fields(m.fields))
    console.print(feats)

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
    console.print(check)
    style = "bold green" if report.freeze_enforced else "bold red" if report.freeze_enforced is False else "yellow"
    console.print(f"[{style}]Conclusion:[/] {report.conclusion}", highlight=False)
    sys.exit(EXIT_NO_KVM if fallback else EXIT_OK)


@main.command()
@click.argument("msr")
@click.argument("value", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def decode(msr: str, value: str | None, as_json: bool) -> None:
    """Look up an MSR by name or index and decode VALUE (e.g. `kvmscope decode ARCH_CAP 0x400000000c000069`)."""
    try:
        try:
            number = int(msr, 0)
        except ValueError:
            number = None
        m = _msrs.lookup(number if number is not None else msr)
        v = _msrs.check_value(int(value, 0)) if value is not None else None
    except KvmscopeError as e:
        fail(str(e), EXIT_USAGE)
    except ValueError as e:
        fail(f"bad value {value!r}: {e}", EXIT_USAGE)
    fields = m.decode(v) if v is not None else {}
    if as_json:
        click.echo(json.dumps({"index": f"0x{m.index:x}", "name": m.name, "aliases": list(m.aliases),
                               "feature": m.feature, "value": _hex(v) if v is not None else None, "fields": fields}))
        return
    click.echo(f"{m.name} (0x{m.index:x}){' [feature MSR]' if m.feature else ''}")
    if v is not None:
        click.echo(f"value 0x{v:x}")
        for k, fv in fields.items():
            click.echo(f"  {k:24} {fv if isinstance(fv, bool) else hex(fv)}")


@main.command("msrs")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_msrs(as_json: bool) -> None:
    """List every MSR kvmscope knows by name."""
    cat = _msrs.catalogue()
    if as_json:
        click.echo(json.dumps([{"index": f"0x{m.index:x}", "name": m.name, "aliases": list(m.aliases),
                                "feature": m.feature} for m in cat], indent=2))
        return
    for m in cat:
        click.echo(f"0x{m.index:08x}  {m.name}{'  [feature]' if m.feature else ''}")


def _diff_marks(old: int, new: int) -> str:
    """A caret under each hex digit that differs between two 16-digit values."""
    a, b = f"{old:016x}", f"{new:016x}"
    return "".join("^" if x != y else " " for x, y in zip(a, b, strict=True))


def _print_report(console: Console, report: Any) -> None:
    console.print(f"[bold]{report.scenario}[/] ({report.path}) on {report.description}", highlight=False)
    _print_steps(console, report)
    _print_verdict(console, report.ok)


_STYLE_TAGS = re.compile(r"\[(?:/|(?:bold )?(?:green|red|yellow)|bold|dim)\]")


def _emit(console: Console, markup: str) -> None:
    """One line of a report: styled on a terminal, plain (and fast) otherwise."""
    if console.is_terminal:
        console.print(markup, highlight=False)
    else:
        sys.stdout.write(_STYLE_TAGS.sub("", markup) + "\n")


def _print_verdict(console: Console, ok: bool) -> None:
    verdict = "[bold green]OK[/]: every step did what it expected" if ok else \
        "[bold red]FAILED[/]: a step did not do what it expected (or was refused without an expectation)"
    console.print(verdict, highlight=False)


def _print_steps(console: Console, report: Any) -> None:
    for s in report.steps:
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: " "}[s.met]
        colour = {"accepted": "green", "ok": "green", "refused": "yellow", "error": "red"}[s.outcome]
        label = f" ({s.label})" if s.label else ""
        _emit(console, f"{mark} [{s.number}] line {s.line:<3} {s.kind} vCPU {s.vcpu}{label}: "
                      f"[{colour}]{s.outcome.upper()}[/] {s.summary}")
        r = s.refusal
        if r is not None:
            old = "unreadable" if r.old is None else f"0x{r.old:016x}"
            _emit(console, f"      {r.name} (0x{r.index:x}) at position {r.position}")
            _emit(console, f"      old {old}\n      new 0x{r.new:016x}")
            if r.old is not None and r.differing:
                bits = [b for b in range(64) if r.differing >> b & 1]
                shown = ", ".join(map(str, bits[:12])) + (" ..." if len(bits) > 12 else "")
                _emit(console, f"          {_diff_marks(r.old, r.new)}  bits differing: {shown}")
            elif r.old is not None:
                _emit(console, "          (same value as before)")
            _emit(console, f"      rule: {r.rule or 'not known (the live kernel does not say why)'}")
            _emit(console, f"      hint: {r.hint}")
        for note in s.notes:
            _emit(console, f"      {note}")
        if s.expected:
            _emit(console, f"      expected: {s.expected} -> {'met' if s.met else '[red]NOT met[/]'}")


@main.command()
@click.argument("scenario_file", metavar="SCENARIO", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["model", "linux"]), default="model", show_default=True,
              help="model: replay on kvmscope's software KVM; linux: replay on the live /dev/kvm.")
@kernel_option
@profile_option
@click.option("--compare", "compare_kernels", metavar="V1,V2,...",
              help="Replay on the model under several kernel rulesets and show the steps whose outcome changes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(scenario_file: str, backend: str, kernel: str | None, profile: str | None, compare_kernels: str | None,
          as_json: bool) -> None:
    """Replay a VMM's sequence of vCPU-model operations and say, step by step, what the kernel does and why.

    \b
    Exit codes: 0 every step did what it expected (or, without expectations, nothing was refused);
                1 not; 2 a bad scenario file or bad arguments; 3 /dev/kvm missing (--backend linux).
    \b
    Examples:
      kvmscope check examples/platform-info-after-run.yaml
      kvmscope check examples/platform-info-after-run.yaml --backend linux
      kvmscope check examples/sandbox-reset-snapshot.yaml --compare 6.3,6.10,6.18
    """
    import kvmscope

    from .check import compare, replay, replay_iter
    from .model import open_model
    from .scenario import load, stream

    # YAML tables are printed step by step, in constant memory; JSON files are read whole (line-located errors).
    streaming = not as_json and not compare_kernels and not scenario_file.endswith(".json")
    try:
        if streaming:
            opened = stream(scenario_file)
            scenario = opened.header
        else:
            scenario = load(scenario_file)
    except KvmscopeError as e:
        fail(str(e), EXIT_USAGE)
    if backend == "model":
        kernel = kernel or scenario.kernel
        profile = profile or scenario.profile
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if compare_kernels is not None:
            if backend != "model":
                raise click.UsageError("--compare replays on the model; drop --backend linux")
            versions = [v.strip() for v in compare_kernels.split(",") if v.strip()]
            if len(versions) < 2:
                raise click.UsageError("--compare needs at least two kernel versions, e.g. 6.3,6.18")
            reports = {v: replay(scenario, open_model(kernel=v, profile=profile)) for v in versions}
            changes = compare(reports)
            if as_json:
                click.echo(json.dumps({"scenario": scenario.name, "kernels": versions,
                                       "reports": {v: r.to_json() for v, r in reports.items()},
                                       "changes": [c.__dict__ for c in changes]}, indent=2))
            else:
                console.print(f"[bold]{scenario.name}[/] on kernels {', '.join(versions)} "
                              f"(model, profile {open_model(profile=profile).profile.name})", highlight=False)
                if not changes:
                    console.print("no step changes outcome between these kernels", highlight=False)
                for c in changes:
                    console.print(f"  [{c.number}] line {c.line} {c.kind}: {c.text}", highlight=False)
            sys.exit(EXIT_OK if all(r.ok for r in reports.values()) else EXIT_FAILED)
        if backend == "linux":
            if kernel:
                raise click.UsageError("--kernel chooses a model ruleset; it does not apply to --backend linux")
            if scenario.profile and not profile:
                err_console.print(f"note: the scenario's profile {scenario.profile!r} is for the model; the live "
                                  "kernel is this host", highlight=False)
            system: System = kvmscope.open("linux")
            # The model replayed alongside explains refusals; only a profile of this host's kind can do that.
            model = open_model(profile=profile)
            shadow: System | None = model
            live_vendor = system.host_info().get("vendor")
            if model.profile.vendor != live_vendor:
                err_console.print(f"note: no {live_vendor} profile given (--profile): refusals are reported "
                                  "without the rule behind them", highlight=False)
                shadow = None
        else:
            system, shadow = open_model(kernel=kernel, profile=profile), None
        with system:
            if streaming:
                from .check import Report

                console.print(f"[bold]{scenario.name}[/] ({scenario.path}) on {system.describe()}", highlight=False)
                ok = True
                for result in replay_iter(opened.steps, system, shadow):
                    one = Report(scenario.name, scenario.path, system.backend, "", [result])
                    _print_steps(console, one)
                    ok = ok and one.ok
                _print_verdict(console, ok)
                sys.exit(EXIT_OK if ok else EXIT_FAILED)
            report = replay(scenario, system, shadow)
    except KvmUnavailableError as e:
        fail(str(e), EXIT_NO_KVM)
    except KvmscopeError as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(console, report)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)
