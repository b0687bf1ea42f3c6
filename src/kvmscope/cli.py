"""The ``kvmscope`` command: options, exit codes and the order of the work. What is computed lives in probe.py,
check.py and scenario.py; which backend opens, in backends.py; what is printed, in render.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import click

from . import backends, render
from . import msrs as _msrs
from .errors import KvmscopeError, KvmUnavailableError, ProfileError, ScenarioError

if TYPE_CHECKING:
    from .api import System
    from .scenario import Scenario

# Exit codes shared by every subcommand.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_KVM = 3


def fail(message: str, code: int) -> NoReturn:
    render.error_line(message)
    sys.exit(code)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """kvmscope's errors as exit codes: 3 when /dev/kvm is unusable, 2 for any other (bad input or arguments)."""
    try:
        yield
    except KvmUnavailableError as e:
        fail(str(e), EXIT_NO_KVM)
    except KvmscopeError as e:
        fail(str(e), EXIT_USAGE)


backend_option = click.option(
    "--backend",
    type=click.Choice(list(backends.CHOICES)),
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


@main.command()
@backend_option
@kernel_option
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-cpuid", is_flag=True, help="Do not set KVM_GET_SUPPORTED_CPUID on the probe vCPUs first.")
@click.option("--save", "save_path", metavar="FILE",  # checked by inputs.check_output: one line, exit 2
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
    if backend == "linux" and (kernel or profile):
        raise click.UsageError("--kernel and --profile choose the model; drop them or use --backend model")
    with exit_on_error():
        if save_path:  # a bad target is bad input: refused before anything is opened or captured
            from .inputs import check_output

            check_output(save_path, ProfileError)
        system, fallback = backends.choose(backend, kernel=kernel or None, profile=profile or None)
    sys.exit(_probe(system, fallback, as_json, not no_cpuid, save_path, profile_name))


def _probe(system: System, fallback: str | None, as_json: bool, set_cpuid: bool, save_path: str | None,
           profile_name: str | None) -> int:
    """Probe ``system``, capture its profile to ``save_path`` if asked, print; returns the exit code."""
    from .probe import probe as run_probe

    if fallback:
        render.fallback(fallback, system.describe())
    if save_path and system.backend != "linux":
        system.close()
        fail("--save captures a profile from the live kernel; the model has nothing new to capture",
             EXIT_NO_KVM if fallback else EXIT_USAGE)
    with system:
        report = run_probe(system, set_cpuid=set_cpuid)
        if save_path:
            from .capture import capture

            captured = capture(system, name=profile_name)
            with exit_on_error():
                captured.save(save_path)
            render.saved_profile(captured.name, save_path)
    render.probe(report, fallback, as_json)
    return EXIT_NO_KVM if fallback else EXIT_OK


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
    render.decode(m, v, as_json)


@main.command("msrs")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_msrs(as_json: bool) -> None:
    """List every MSR kvmscope knows by name."""
    render.msr_list(_msrs.catalogue(), as_json)


@main.command()
@click.argument("scenario_file", metavar="SCENARIO")  # read by inputs.open_regular
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
    versions = None
    if compare_kernels is not None:
        if backend != "model":
            raise click.UsageError("--compare replays on the model; drop --backend linux")
        versions = [v.strip() for v in compare_kernels.split(",") if v.strip()]
        if len(versions) < 2:
            raise click.UsageError("--compare needs at least two kernel versions, e.g. 6.3,6.18")
    if backend == "linux" and kernel:
        raise click.UsageError("--kernel chooses a model ruleset; it does not apply to --backend linux")
    with exit_on_error():
        ok = _check(scenario_file, backend, kernel or None, profile or None, versions, as_json)
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


def _check(path: str, backend: str, kernel: str | None, profile: str | None, versions: list[str] | None,
           as_json: bool) -> bool:
    """Read the scenario, replay it, print the report; True when every step did what it expected."""
    from .check import replay, replay_iter
    from .scenario import load, stream

    # Tables are printed step by step, in constant memory (the whole file is checked first: one verdict per file);
    # --json and --compare keep every result, so they read the file whole, within its limits.
    opened = stream(path) if not as_json and versions is None else None
    scenario = opened.header if opened is not None else load(path)
    if backend == "model":
        kernel, profile = kernel or scenario.kernel, profile or scenario.profile
    if versions is not None:
        return _compare(scenario, versions, profile, as_json)
    system, shadow = _check_systems(backend, kernel, profile, scenario)
    with system:
        if opened is not None:
            return render.check_stream(scenario.name, scenario.path, system.describe(),
                                       replay_iter(opened.steps, system, shadow))
        report = replay(scenario, system, shadow)
    render.check_report(report, as_json)
    return report.ok


@contextmanager
def _named_by(scenario: Scenario, kernel: str | None, profile: str | None) -> Iterator[None]:
    """A bad kernel or profile that the scenario names is an error of the scenario file, and says so."""
    try:
        yield
    except KvmUnavailableError:
        raise
    except KvmscopeError as e:
        if (kernel and kernel == scenario.kernel) or (profile and profile == scenario.profile):
            raise ScenarioError(f"{scenario.path}: {e}") from None
        raise


def _check_systems(backend: str, kernel: str | None, profile: str | None, scenario: Scenario
                   ) -> tuple[System, System | None]:
    """Where to replay, and the model to replay alongside a live kernel to explain its refusals (or None)."""
    if backend == "model":
        with _named_by(scenario, kernel, profile):
            return backends.choose("model", kernel=kernel, profile=profile)[0], None
    if scenario.profile and not profile:
        render.note(f"the scenario's profile {scenario.profile!r} is for the model; the live kernel is this host")
    system, shadow = backends.live_with_explainer(profile)
    if shadow is None:
        render.note(f"no {system.host_info().get('vendor')} profile given (--profile): refusals are reported "
                    "without the rule behind them")
    return system, shadow


def _compare(scenario: Scenario, versions: list[str], profile: str | None, as_json: bool) -> bool:
    """Replay on the model under each kernel's rules and print the steps whose outcome changes."""
    from .check import Report, compare, replay

    reports: dict[str, Report] = {}
    for v in versions:
        with _named_by(scenario, v, profile):
            system, _ = backends.choose("model", kernel=v, profile=profile)
        reports[v] = replay(scenario, system)
    render.comparison(scenario.name, versions, str(system.host_info()["profile"]), reports, compare(reports), as_json)
    return all(r.ok for r in reports.values())
