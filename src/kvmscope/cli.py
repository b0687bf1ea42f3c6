"""The ``kvmscope`` command: options, exit codes and the order of the work. What is computed lives in probe.py,
check.py and scenario.py; which backend opens, in backends.py; what is printed, in render.py."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import backends, render
from . import msrs as _msrs
from .errors import InvalidValueError, KvmscopeError, KvmUnavailableError, ProfileError, ScenarioError

if TYPE_CHECKING:
    from .api import System
    from .kernel.profile import Profile
    from .scenario import Scenario
    from .template import Template
    from .template_apply import ApplyReport

MAX_TRACE_TIMEOUT = 365 * 24 * 3600  # well within threading.TIMEOUT_MAX and setitimer's range

# Exit codes shared by every subcommand.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_KVM = 3
EXIT_BROKEN_PIPE = render.EXIT_BROKEN_PIPE  # a reader went away before the output ended


_argv: list[str] = []  # the command line main() parses (not sys.argv under click's test runner)


def _wants_json(ctx: click.Context | None = None) -> bool:
    """Whether the command asks for --json: its parsed options when click got that far, else the command line (before
    any ``--``: what follows is a traced command's)."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is not None and "as_json" in ctx.params:
        return bool(ctx.params["as_json"])
    return "--json" in (_argv[: _argv.index("--")] if "--" in _argv else _argv)


def fail(message: str, code: int, ctx: click.Context | None = None) -> NoReturn:
    """The error as one line on stderr and exit ``code``; with --json, also as JSON on stdout, so that a script reading
    stdout gets a document whatever happened (unless the reader has gone: the exit code still says it)."""
    render.error_line(message)
    ctx = ctx or click.get_current_context(silent=True)
    if _wants_json(ctx):
        try:
            # the name its success document would have; where click could not parse the command line (no context,
            # or one with no parameters yet), the command line's words say which command and mode it was
            path = ctx.command_path.partition(" ")[2] if ctx is not None else ""
            command = path or " ".join(_command_words())
            given = [a.partition("=")[0] for a in _argv[: _argv.index("--") if "--" in _argv else None]]
            params = ctx.params if ctx is not None and path else {}
            if params.get("corpus_dir") or (not params and command == "check" and "--corpus" in given):
                command += " --corpus"
            elif params.get("compare_kernels") or (not params and command in ("check", "template apply")
                                                   and "--compare" in given):
                command += " --compare"
            click.echo(json.dumps({"schema_version": 1, "command": command or None, "error": message, "exit_code": code}))
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush is silent
    sys.exit(code)


def _command_words() -> list[str]:
    """The (sub)command the command line names (``["template", "apply"]``), as far as its words say: for an error
    click raised before it knew the command's context."""
    words: list[str] = []
    group: click.Command = main
    for arg in _argv:
        if arg == "--" or not isinstance(group, click.Group):
            break
        if arg.startswith("-"):
            continue
        cmd = group.commands.get(arg)
        if cmd is None:
            break
        words.append(arg)
        group = cmd
    return words


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
kernel_option = click.option("--kernel", metavar="VERSION", help="Model only: kernel ruleset, e.g. 6.3, 6.10, 6.18 (a "
                             "series alone is its first release: give 6.1.192 for 6.1.y's backports).")
profile_option = click.option(
    "--profile", metavar="NAME|FILE", help="Model only: a shipped host profile name or a profile JSON file (a shipped "
    "name is taken before a file of the same name: give ./NAME for the file)."
)


# click 8.2+ raises this UsageError for a group given no subcommand, to print the help
_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError",
                                                    type("_Never", (click.UsageError,), {}))


class _Group(click.Group):
    """kvmscope's command group: a reader that goes away (``kvmscope msrs | head -1``) ends the command quietly, and a
    usage error is one line (``fail``) naming the help to read, not click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False  # click's own handling prints several lines; ours, one
        given = args[0] if args else kwargs.get("args")
        _argv[:] = [str(a) for a in (sys.argv[1:] if given is None else given)]
        _fell_back.clear()
        try:
            code = super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # `kvmscope` or `kvmscope template` alone: the help, as click prints it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else " ".join(["kvmscope", *_command_words()])
            fail(f"{e.format_message().rstrip('.')} (see `{where} --help`)", EXIT_USAGE, e.ctx)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.Abort:  # Ctrl-C
            fail("interrupted", 130)
        # click returns an Exit's code (--help, --version); a command itself ends with sys.exit or returns None
        sys.exit(code if type(code) is int else EXIT_OK)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # Nothing more can be written; point stdout at /dev/null so the interpreter's final flush is silent. The
            # command did not finish, so no verdict: the exit status of a process SIGPIPE ended, as `cat` or `yes`
            # give under `set -o pipefail`.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmscope")
def main() -> None:
    """kvmscope: Linux KVM's x86 vCPU model, live (/dev/kvm) and modelled.

    Exit codes: 0 success, 1 a check failed, 2 bad input or arguments, 3 /dev/kvm missing or not permitted, 141 the
    reader of the output went away (128 + SIGPIPE).
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
    Exit codes: 0 probed; 2 bad arguments or profile; 3 /dev/kvm missing or not permitted (with --backend auto
                the model's report is printed, and the exit is still 3).
    \b
    Examples:
      kvmscope probe
      kvmscope probe --json
      kvmscope probe --backend model --profile intel-spr --kernel 6.18
    """
    if backend == "linux" and (kernel or profile):
        raise click.UsageError("--kernel and --profile choose the model; drop them or use --backend model")
    if profile_name is not None and save_path is None:
        raise click.UsageError("--name names the profile --save writes; add --save FILE")
    if profile_name is not None and (not profile_name.strip() or render.clean(profile_name) != profile_name):
        raise click.UsageError(f"--name: expected a printable name, got '{render.clean(profile_name)[:60]}'")
    with exit_on_error():
        if save_path:  # a bad target is bad input: refused before anything is opened or captured
            from .inputs import check_output

            check_output(save_path, ProfileError)
        system, fallback = backends.choose(backend, kernel=kernel or None, profile=profile or None, note=render.note)
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
        with exit_on_error():  # a profile whose KVM_SET_CPUID2 refuses its own supported CPUID: one line
            report = run_probe(system, set_cpuid=set_cpuid)
        if save_path:
            from .capture import capture

            captured = capture(system, name=profile_name)
            with exit_on_error():
                captured.save(save_path)
            render.saved_profile(captured.name, save_path)
    render.probe(report, fallback, as_json)
    return EXIT_NO_KVM if fallback else EXIT_OK


class _ValuesAfterDashes(click.Command):
    """Keeps the words after ``--`` in ``ctx.meta["operands"]``: they are values whatever they look like."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["operands"] = args[args.index("--") + 1 :] if "--" in args else []
        return super().parse_args(ctx, args)


@main.command(cls=_ValuesAfterDashes, context_settings={"ignore_unknown_options": True})  # VALUE -1: a value
@click.argument("msr")
@click.argument("value", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def decode(msr: str, value: str | None, as_json: bool) -> None:
    """Look up an MSR by name or index and decode VALUE.

    MSR is a kernel name (MSR_IA32_ARCH_CAPABILITIES), a short one (ARCH_CAPABILITIES, ARCH_CAP), any case, or an
    index (0x10a); VALUE is hex (0x...) or decimal. `kvmscope msrs` lists the names.

    \b
    Examples:
      kvmscope decode ARCH_CAP 0x400000000c000069
      kvmscope decode msr_platform_info 0x80000000
    """
    given = [w for w in (msr, value) if w is not None]
    after = len(click.get_current_context().meta.get("operands", []))  # the last ones came after "--"
    for word in given[: len(given) - after]:  # options click let through for VALUE's sake: only a number is a value
        if word.startswith("-") and not _msrs.is_number(word):
            raise click.UsageError(f"No such option: {word}")
    with exit_on_error():
        m = _msrs.lookup(msr)
        v = _msrs.parse_value(value, f"value for {m.name}") if value is not None else None
    render.decode(m, v, as_json)


@main.command("msrs")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_msrs(as_json: bool) -> None:
    """List every MSR kvmscope knows by name."""
    render.msr_list(_msrs.catalogue(), as_json)


@main.command()
@click.argument("scenario_file", metavar="[SCENARIO]", required=False)  # read by inputs.open_regular
@click.option("--backend", type=click.Choice(["model", "linux"]), default="model", show_default=True,
              help="model: replay on kvmscope's software KVM; linux: replay on the live /dev/kvm.")
@kernel_option
@profile_option
@click.option("--compare", "compare_kernels", metavar="V1,V2,...|all",
              help="Replay on the model under several kernel rulesets (all: every version whose rules differ) and "
                   "show the steps whose outcome changes.")
@click.option("--corpus", "corpus_dir", metavar="DIR",  # checked in _corpus: one line, not click's usage block
              help="Instead of SCENARIO: every recording in DIR x the --compare kernels (x --profile P1,P2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(scenario_file: str | None, backend: str, kernel: str | None, profile: str | None,
          compare_kernels: str | None, corpus_dir: str | None, as_json: bool) -> None:
    """Replay a VMM's sequence of vCPU-model operations and say, step by step, what the kernel does and why.

    \b
    Exit codes: 0 every step did what it expected (or, without expectations, nothing was refused);
                with --compare: on every kernel compared;
                1 not (with --compare: on at least one kernel, named in the last line);
                2 a bad scenario file or bad arguments; 3 /dev/kvm missing (--backend linux).
                With --corpus: 0 once the matrix is printed (it reports each kernel's first refusal).
    \b
    Examples:
      kvmscope check examples/platform-info-after-run.yaml
      kvmscope check examples/platform-info-after-run.yaml --backend linux
      kvmscope check examples/sandbox-reset-snapshot.yaml --compare all
      kvmscope check examples/sandbox-reset-snapshot.yaml --compare 6.3,6.10,6.18
      kvmscope check --corpus corpus/qemu-7.2 --compare 6.3,6.12,6.13,6.18
    """
    if corpus_dir is not None or scenario_file is None:
        if backend != "model":
            raise click.UsageError("--corpus replays on the model; drop --backend linux")
        if kernel:
            raise click.UsageError("--corpus takes its kernels from --compare; drop --kernel")
        _corpus(corpus_dir, scenario_file, compare_kernels and ",".join(_versions(compare_kernels, 1)), profile,
                as_json)
    versions = None
    if compare_kernels is not None:
        if backend != "model":
            raise click.UsageError("--compare replays on the model; drop --backend linux")
        if kernel:
            raise click.UsageError("--compare names every kernel; drop --kernel")
        versions = _versions(compare_kernels, 2)
    if backend == "linux" and kernel:
        raise click.UsageError("--kernel chooses a model ruleset; it does not apply to --backend linux")
    with exit_on_error():
        ok = _check(scenario_file, backend, kernel or None, profile or None, versions, as_json)
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


def _versions(text: str, least: int) -> list[str]:
    """The kernels of ``--compare`` (``all``, any case: every version where a rule changes), at least ``least``."""
    items = [v.strip() for v in text.split(",")]
    if len(items) > 1 and not all(items):  # "6.1,,6.12" or a trailing comma: a version left out by mistake?
        raise click.UsageError(f"--compare has an empty item: {text!r} (versions separated by single commas)")
    versions = [v for v in items if v]
    if [v.lower() for v in versions] == ["all"]:
        from .kernel.rulesets import KNOWN

        versions = list(KNOWN)
    if len(versions) < least:
        given = f"got {len(versions)}" if versions else "got none"
        raise click.UsageError(f"--compare needs at least {least} kernel versions, e.g. 6.3,6.18 or all ({given})")
    if len(set(versions)) < len(versions):
        raise click.UsageError(f"--compare names a kernel twice: {text}")
    return versions


def _check(path: str, backend: str, kernel: str | None, profile: str | None, versions: list[str] | None,
           as_json: bool) -> bool:
    """Read the scenario, replay it, print the report; True when every step did what it expected."""
    from .check import replay, replay_iter
    from .scenario import load, stream

    # Tables are printed step by step, in constant memory (the whole file is checked first: one verdict per file);
    # --json and --compare keep every result, so they read the file whole, within its limits.
    opened = stream(path) if not as_json and versions is None else None
    scenario = opened.header if opened is not None else load(path)
    chosen: str | Profile | None = profile
    if backend == "model":
        kernel, chosen = kernel or scenario.kernel, profile or scenario.profile
        for v in [kernel] if versions is None else versions:  # a bad version is refused before /dev/kvm is opened
            if v is not None:
                with _named_by(scenario, v, None):
                    backends.check_kernel(v)
        if chosen is None:
            chosen, said = backends.default_profile()
            if not as_json:
                render.note(said)
    if versions is not None:
        return _compare(scenario, versions, chosen, as_json)
    system, shadow = _check_systems(backend, kernel, chosen, scenario)
    with system:
        if opened is not None:
            return render.check_stream(scenario.name, scenario.path, system.describe(),
                                       replay_iter(opened.steps, system, shadow, scenario.faithful))
        report = replay(scenario, system, shadow)
    render.check_report(report, as_json)
    return report.ok


@contextmanager
def _named_by(scenario: Scenario, kernel: str | None, profile: str | Profile | None) -> Iterator[None]:
    """A bad kernel or profile that the scenario names is an error of the scenario file, and says so."""
    try:
        yield
    except KvmUnavailableError:
        raise
    except KvmscopeError as e:
        if (kernel and kernel == scenario.kernel) or (profile and profile == scenario.profile):
            raise ScenarioError(f"{scenario.path}: {e}") from None
        raise


def _check_systems(backend: str, kernel: str | None, profile: str | Profile | None, scenario: Scenario
                   ) -> tuple[System, System | None]:
    """Where to replay, and the model to replay alongside a live kernel to explain its refusals (or None)."""
    if backend == "model":
        with _named_by(scenario, kernel, profile):
            return backends.choose("model", kernel=kernel, profile=profile, note=render.note)[0], None
    if scenario.profile and not profile:
        render.note(f"the scenario's profile {scenario.profile!r} is for the model; the live kernel is this host")
    system, shadow = backends.live_with_explainer(profile)
    if shadow is None:
        vendor = system.host_info().get("vendor")
        given = f"the profile given is not for this host's {vendor} vendor module" if profile else \
            f"no {vendor} profile given (--profile)"
        render.note(f"{given}: refusals are reported without the rule behind them")
    return system, shadow


def _compare(scenario: Scenario, versions: list[str], profile: str | Profile | None, as_json: bool) -> bool:
    """Replay on the model under each kernel's rules and print the steps whose outcome changes."""
    from .check import Report, compare, replay

    reports: dict[str, Report] = {}
    rulesets: dict[str, str] = {}  # a proposal file's label -> the ruleset it names (its `name`, on its base)
    for v in versions:
        with _named_by(scenario, v, profile):
            system, _ = backends.choose("model", kernel=v, profile=profile, note=render.note)
        reports[v] = replay(scenario, system)
        rulesets[v] = str(system.host_info()["ruleset"])
    render.comparison(scenario.name, versions, str(system.host_info()["profile"]), reports, compare(reports), as_json,
                      {v: r for v, r in rulesets.items() if "(proposed" in r})
    return all(r.ok for r in reports.values())


# --- kvmscope template, baseline, fingerprint (Firecracker's custom CPU templates; docs/templates.md) -----------------


@main.group()
def template() -> None:
    """Firecracker custom CPU templates: read, apply (live or modelled), verify, dump, strip, restore.

    \b
    Examples:
      kvmscope template read examples/templates/t2s-like.json
      kvmscope template apply examples/templates/t2s-like.json
      kvmscope template apply examples/templates/t2s-like.json --profile intel-spr --compare 6.3,6.18
    """


def _check_outputs(*paths: str | None) -> None:
    """Before any work: every file a command will write can be written as a regular file (a FIFO, a device or a
    directory is refused with one line, exit 2, as for ``probe --save``)."""
    from .inputs import check_output

    with exit_on_error():
        for path in paths:
            if path is not None:
                check_output(path, InvalidValueError)


def _save(t: Template, path: str) -> None:
    with exit_on_error():
        t.save(path)


def _load_template(path: str) -> Template:
    from .inputs import check_kind
    from .template import TemplateError, load

    with exit_on_error():
        check_kind(path, TemplateError, "a template")  # one line, as for a scenario; not click's usage block
        return load(path)


@template.command("read")
@click.argument("template_file", metavar="TEMPLATE")  # read by _load_template
@click.option("-o", "--output", metavar="FILE", help="Write the template back out, as Firecracker writes it.")
@click.option("--json", "as_json", is_flag=True, help="Print the template as Firecracker's JSON.")
def template_read(template_file: str, output: str | None, as_json: bool) -> None:
    """Check a template (errors name the line, field and character) and show what it fixes.

    Exit codes: 0 a well-formed template; 2 a bad template or arguments.
    """
    from . import render_template

    _check_outputs(output)
    t = _load_template(template_file)
    if output:
        _save(t, output)
    render_template.template_summary(t, as_json)


@template.command("apply")
@click.argument("template_file", metavar="TEMPLATE")  # read by _load_template
@backend_option
@kernel_option
@profile_option
@click.option("--compare", "compare_kernels", metavar="V1,V2,...", help="Apply on the model under each kernel.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True, help="vCPUs in the VM.")
@click.option("--boot-msrs/--no-boot-msrs", default=True, show_default=True,
              help="Write Firecracker's boot MSRs in the same KVM_SET_MSRS as the template's.")
@click.option("--after-run", is_flag=True, help="Run every vCPU once (to a port write) before writing the MSRs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def template_apply(template_file: str, backend: str, kernel: str | None, profile: str | None,
                   compare_kernels: str | None, vcpus: int, boot_msrs: bool, after_run: bool, as_json: bool) -> None:
    """Apply a template in Firecracker's order and report every bit the kernel refused or changed, per vCPU.

    \b
    Exit codes: 0 every fixed bit holds and Firecracker would boot; 1 not; 2 bad template or arguments;
                3 /dev/kvm missing (with --backend auto, after the model's report, as probe does).
    """
    from . import render_template
    from .model import ModelLimitation
    from .template_apply import BOOT_MSRS, apply

    t = _load_template(template_file)
    boot = BOOT_MSRS if boot_msrs else ()
    systems = _template_systems(backend, kernel, profile, compare_kernels)
    reports = {}
    for label, system in systems:
        with system:
            try:
                reports[label] = apply(system, t, vcpus, boot, after_run)
            except ModelLimitation as e:  # what the model does not reproduce: no verdict rather than a made-up one
                fail(f"{template_file}: the model cannot judge this template: {e}", EXIT_USAGE)
        if warning := getattr(system, "warning", None):  # a kernel newer than the newest ruleset: extrapolated
            reports[label].notes.insert(0, warning)
        if system.backend == "linux":
            _explain_live(reports[label], t, vcpus, boot, after_run)
    render_template.apply_reports(reports, as_json)
    _verdict(all(r.ok for r in reports.values()))


def _template_systems(backend: str, kernel: str | None, profile: str | None, compare_kernels: str | None
                      ) -> list[tuple[str, System]]:
    """The systems to judge a template on: one backend, or the model under each kernel of --compare."""
    if backend == "linux" and (kernel or profile or compare_kernels):
        raise click.UsageError("--kernel, --profile and --compare choose the model; drop them, or drop --backend linux")
    if compare_kernels is not None and kernel:
        raise click.UsageError("--compare names every kernel; drop --kernel")
    versions = _versions(compare_kernels, 2) if compare_kernels is not None else []
    with exit_on_error():
        if versions:
            return [(v, backends.choose("model", kernel=v, profile=profile)[0]) for v in versions]
        system, fallback = backends.choose(backend, kernel=kernel, profile=profile)
    if fallback:
        render.fallback(fallback, system.describe())
        _fell_back.append(fallback)
    return [(system.backend, system)]


_fell_back: list[str] = []  # set when --backend auto judged the model for want of /dev/kvm (_template_systems)


def _verdict(ok: bool) -> NoReturn:
    """Exit with a template command's verdict; 3 when it judged the model for want of /dev/kvm, as probe does."""
    sys.exit(EXIT_NO_KVM if _fell_back else EXIT_OK if ok else EXIT_FAILED)


def _explain_live(report: ApplyReport, t: Template, vcpus: int, boot: Sequence[tuple[int, int]],
                  after_run: bool) -> None:
    """Apply alongside on the model of this host (when it is of the same vendor) to name the rules behind refusals."""
    from .model import ModelLimitation
    from .template_apply import apply, explain

    with exit_on_error():
        live, model = backends.live_with_explainer()
    live.close()
    if model is not None:
        with model:
            try:
                explain(report, apply(model, t, vcpus, boot, after_run))
            except ModelLimitation as e:
                report.notes.append(f"the model of this host cannot explain this template, so refusals name no rule: {e}")


@template.command("restore")
@click.argument("template_file", metavar="TEMPLATE")  # read by _load_template
@backend_option
@kernel_option
@profile_option
@click.option("--to-kernel", metavar="VERSION", help="Restore on the model under this kernel's rules.")
@click.option("--to-profile", metavar="NAME|FILE", help="Restore on the model of this host.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True, help="vCPUs in the VM.")
@click.option("--boot-msrs/--no-boot-msrs", default=True, show_default=True, help="Boot with Firecracker's boot MSRs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def template_restore(template_file: str, backend: str, kernel: str | None, profile: str | None,
                     to_kernel: str | None, to_profile: str | None, vcpus: int, boot_msrs: bool, as_json: bool) -> None:
    """Boot a VM with the template (source: --backend/--kernel/--profile), snapshot it as Firecracker does and
    restore the snapshot on another host and kernel (--to-profile/--to-kernel, the model; by default the source's
    host); exit 1 if it fails.

    \b
    Example:
      kvmscope template restore examples/templates/t2s-like.json --profile intel-spr --to-profile pvm-6.18
    """
    from . import render_template
    from .template_apply import BOOT_MSRS
    from .template_restore import restore

    t = _load_template(template_file)
    (_, source), = _template_systems(backend, kernel, profile, None)
    with source, exit_on_error():
        modelled = bool(to_kernel or to_profile or source.backend == "model")
        target, _ = backends.choose("model" if modelled else source.backend, kernel=to_kernel,
                                    profile=to_profile or (profile if modelled else None))
        with target:
            report = restore(source, target, t, vcpus, BOOT_MSRS if boot_msrs else ())
    report.notes[:0] = [f"{side}: {w}" for side, system in (("source", source), ("target", target))
                        if (w := getattr(system, "warning", None))]
    render_template.apply_reports({"restore": report}, as_json, "template restore")
    _verdict(report.ok)


@template.command("verify")
@click.argument("template_file", metavar="TEMPLATE")  # read by _load_template
@click.option("--state", "state_file", metavar="DUMP",  # read by _load_template
              help="A vCPU state from `template dump` (default: dump a fresh vCPU of the backend now).")
@backend_option
@kernel_option
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def template_verify(template_file: str, state_file: str | None, backend: str, kernel: str | None,
                    profile: str | None, as_json: bool) -> None:
    """Masked equality between a template and a vCPU's state, with a bit diff (exit 1 on a mismatch)."""
    from . import render_template
    from .template_apply import dump, state_of, verify

    if state_file and (backend != "auto" or kernel or profile):
        raise click.UsageError("--state verifies against a dump; --backend, --kernel and --profile choose a vCPU to "
                               "dump instead: give one or the other")
    t = _load_template(template_file)
    if state_file:
        source, state = state_file, _load_template(state_file)
    else:
        (_, system), = _template_systems(backend, kernel, profile, None)
        with system, exit_on_error():
            source, state = system.describe(), dump(system).template
    diffs = verify(t, *state_of(state))
    render_template.verify_report(source, diffs, as_json)
    _verdict(not diffs)


@template.command("dump")
@backend_option
@kernel_option
@profile_option
@click.option("-o", "--output", metavar="FILE", help="Write the dump to FILE (default: standard output).")
def template_dump(backend: str, kernel: str | None, profile: str | None, output: str | None) -> None:
    """A vCPU's CPUID and MSRs as a template with every bit fixed (TSC, MCG, PMU, VMX and KVM clocks left out).

    Exit codes: 0 dumped; 2 bad arguments or profile; 3 /dev/kvm missing or not permitted.
    """
    from . import render_template
    from .template_apply import dump

    _check_outputs(output)
    (_, system), = _template_systems(backend, kernel, profile, None)
    with system, exit_on_error():
        d = dump(system)
    if output:
        _save(d.template, output)
    render_template.dump_report(d, output)
    _verdict(True)


@template.command("strip")
@click.argument("dumps", metavar="DUMP...", nargs=-1, required=True)  # read by _load_template
@click.option("--suffix", default="_stripped", show_default=True, help="Each output is written next to its input.")
def template_strip(dumps: tuple[str, ...], suffix: str) -> None:
    """Keep only the bits that differ across several dumps (the rest is the same everywhere: no need to fix it).

    Exit codes: 0 written; 2 a bad dump, a refused output path or bad arguments.
    """
    from .template_apply import strip

    if len(dumps) < 2:
        raise click.UsageError("strip needs at least two dumps")
    outs = _strip_outputs(dumps, suffix)
    _check_outputs(*outs)  # all of them before the first is written
    stripped = strip([_load_template(p) for p in dumps])
    for out, t in zip(outs, stripped, strict=True):
        _save(t, out)
        click.echo(f"wrote {out}: {len(t.cpuid_modifiers)} CPUID leaves, {len(t.msr_modifiers)} MSRs differ")


def _strip_outputs(dumps: Sequence[str], suffix: str) -> list[str]:
    """Where `template strip` writes each dump's result; refused before anything is written (one line, exit 2) when
    it would overwrite an input or another output, or when a dump is given twice."""
    from .inputs import shown

    def same(path: str) -> object:  # an existing file by its inode (links and ./ spellings), else by its path
        try:
            st = os.stat(path)
            return (st.st_dev, st.st_ino)
        except OSError:
            return os.path.realpath(path)

    if not suffix:
        fail("--suffix '': each output would be written over its input; give a suffix such as _stripped", EXIT_USAGE)
    if "/" in suffix or "\0" in suffix:
        fail(f"--suffix {shown(suffix)!r}: expected a part of a file name, without '/' or NUL (each output is "
             "written next to its input)", EXIT_USAGE)
    inputs: dict[object, str] = {}
    for path in dumps:
        if same(path) in inputs:
            fail(f"{shown(path)}: the same dump is given twice ({shown(inputs[same(path)])}): strip compares different "
                 "dumps", EXIT_USAGE)
        inputs[same(path)] = path
    outs = [f"{p[:-5] if p.endswith('.json') else p}{suffix}.json" for p in dumps]
    written: dict[object, str] = {}
    for path, out in zip(dumps, outs, strict=True):
        key = same(out)
        if key in inputs:
            fail(f"{shown(out)}: the output for {shown(path)} would overwrite the dump {shown(inputs[key])}; choose "
                 "another --suffix", EXIT_USAGE)
        if key in written:
            fail(f"{shown(out)}: the outputs for {shown(written[key])} and {shown(path)} would be the same file",
                 EXIT_USAGE)
        written[key] = path
    return outs


@main.command("baseline")
@click.argument("profiles", metavar="PROFILE[@VERSION]...", nargs=-1, required=True)
@click.option("--kernel", metavar="VERSION", help="Judge every host under this kernel's rules (default: each own, "
              "or the @VERSION given with it).")
@click.option("-o", "--output", metavar="FILE", help="Write the template to FILE (default: standard output).")
@click.option("--json", "as_json", is_flag=True, help="Print the template, forced bits and omissions as JSON.")
def baseline_cmd(profiles: tuple[str, ...], kernel: str | None, output: str | None, as_json: bool) -> None:
    """The most capable template every host of a fleet accepts (shipped profile names or profile files; HOST@VERSION
    is that host under that kernel, for a fleet on several kernels).

    \b
    Examples:
      kvmscope baseline intel-spr amd-epyc pvm-6.18 -o fleet.json
      kvmscope baseline intel-spr@6.1.192 intel-spr@6.12.118 amd-epyc@6.12.118

    Exit codes: 0 the baseline (taken by every host's model); 2 a bad profile, a host given twice, or bad arguments.
    """
    from . import render_template
    from .fleet import baseline, host, settle, under

    _check_outputs(output)
    with exit_on_error():
        hosts = [host(p) for p in profiles]
    loaded, versions = [p for p, _ in hosts], [v for _, v in hosts]
    if kernel is not None and any(versions):
        fail("--kernel judges every host under one kernel: drop it, or the @VERSION of each host", EXIT_USAGE)
    names = [p.name for p in loaded]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        fail(f"host {render.clean(twice)!r} is given twice: name each host of the fleet once", EXIT_USAGE)
    notes: list[str] = []
    with exit_on_error():  # the baseline of what each host reports under --kernel (or its @VERSION), judged there
        result = settle(baseline(under(loaded, kernel, versions, notes)), loaded, kernel, versions=versions)
    result.notes[:0] = notes
    if output:
        _save(result.template, output)
    from .kernel.rulesets import resolve

    render_template.baseline_report(result, [p.name for p in loaded], output, as_json, {
        p.name: resolve(kernel or v or p.ruleset).version + ("" if kernel or v else " (as captured)")
        for p, v in hosts})


@main.group()
def fingerprint() -> None:
    """Compare captured host profiles (`kvmscope probe --save`)."""


@fingerprint.command("compare")
@click.argument("a", metavar="A[@VERSION]")
@click.argument("b", metavar="B[@VERSION]")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def fingerprint_compare(a: str, b: str, as_json: bool) -> None:
    """What differs between two hosts that matters for migration: vendor, kernel, microcode, feature MSRs, CPUID.
    A and B are shipped profile names or profile files, each as captured; HOST@VERSION is that host under that
    kernel.

    \b
    Example:
      kvmscope fingerprint compare intel-spr@6.1.192 intel-spr@6.12.118

    Exit 0 when nothing differs, 1 when something does, 2 for a bad profile name or file.
    """
    from . import render_template
    from .fleet import compare, host, under

    notes: list[str] = []
    with exit_on_error():  # each host as captured, or as HOST@VERSION's kernel reports it
        (pa, va), (pb, vb) = host(a), host(b)
        pa, pb = under([pa, pb], None, [va, vb], notes)
    if not as_json:
        for n in notes:
            render.note(n)
    diffs = compare(pa, pb)
    render_template.fingerprint_report(pa.name, pb.name, diffs, as_json, notes)
    sys.exit(EXIT_OK if not diffs else EXIT_FAILED)


# --- kvmscope trace ---------------------------------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--out", "out_path", metavar="FILE", default="trace.yaml", show_default=True,  # inputs.replacing
              help="Write the recording (a scenario file) here.")
@click.option("--timeout", type=click.FloatRange(min=0), default=0, metavar="SECONDS",
              help="Kill the command (and its children) after SECONDS; with --attach, detach then. 0: no limit.")
@click.option("--attach", "attach_pid", type=click.IntRange(min=1), metavar="PID",
              help="Record a running process instead (every syscall stops it: slower; detaches at the end).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace(out_path: str, timeout: float, attach_pid: int | None, as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND (a VMM) and record its KVM ioctls as a scenario that `kvmscope check` replays and explains.

    Only ioctls on KVM fds stop the command (a seccomp filter); every other syscall runs at full speed. Threads and
    child processes are followed. The recording holds every vCPU-model ioctl with its arguments and what KVM returned
    (KVM_SET_MSRS entries and the count written, KVM_SET_CPUID2 entries, ...), the first KVM_RUN of each vCPU, counts of
    the later ones, and the time of each step. Exit codes: 0 recorded (whatever the command did); 2 bad arguments or
    the command could not be started.

    \b
    Examples:
      kvmscope trace --out host.yaml --timeout 30 -- qemu-system-x86_64 -enable-kvm -cpu host -S -nographic -nodefaults
      kvmscope trace --out running.yaml --attach 4242 --timeout 10
      kvmscope check host.yaml
      kvmscope check host.yaml --compare 6.3,6.12,6.13,6.18
    """
    from .inputs import replacing
    from .trace.attach import attach
    from .trace.recorder import TraceError, record
    from .trace.report import trace_result

    if bool(command) == bool(attach_pid):
        raise click.UsageError("give a COMMAND to run, or --attach PID (not both)")
    if not 0 <= timeout <= MAX_TRACE_TIMEOUT:  # nan fails every comparison; inf and 1e308 overflow the timers
        fail(f"--timeout {timeout}: expected seconds from 0 (no limit) to {MAX_TRACE_TIMEOUT:,} (a year)", EXIT_USAGE)
    # The recording goes to a file beside --out that replaces it only once there is one to keep: a command that cannot
    # be run, or a PID that is not there, leaves an existing file as it was.
    with exit_on_error(), replacing(out_path, InvalidValueError) as out:
        try:
            result = attach(attach_pid, out, timeout or None) if attach_pid else record(command, out, timeout or None)
        except (TraceError, OSError) as e:
            raise InvalidValueError(f"kvmscope trace: {e.strerror or e}") from None
        if not attach_pid and result.exit_code == 127 and not result.summary.calls:
            raise InvalidValueError(f"kvmscope trace: {command[0]} could not be run (exit status 127, no KVM ioctl)")
    trace_result(result, out_path, as_json)


def _corpus(corpus_dir: str | None, scenario_file: str | None, kernels: str | None, profiles: str | None,
            as_json: bool) -> NoReturn:
    """`check --corpus DIR`: the matrix of recordings x kernels (x profiles), each cell OK or the first refusal."""
    from pathlib import Path

    from .trace.report import corpus_matrix
    from .trace.whatif import matrix

    if corpus_dir is None or scenario_file is not None:
        raise click.UsageError("give either SCENARIO or --corpus DIR")
    versions = [v.strip() for v in (kernels or "6.3,6.12,6.13,6.18").split(",") if v.strip()]
    with exit_on_error():
        from .inputs import check_kind, shown

        check_kind(corpus_dir, ScenarioError, "a corpus", directory=True)
        if not os.path.isdir(corpus_dir):
            raise ScenarioError(f"{shown(corpus_dir)}: cannot read a corpus: no such directory")
        cells = matrix(Path(corpus_dir), versions, [p.strip() for p in profiles.split(",")] if profiles else [None])
    corpus_matrix(cells, versions, as_json)
    sys.exit(EXIT_OK)
