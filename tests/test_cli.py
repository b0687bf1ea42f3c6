"""The `kvmscope` command, as a user runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvmscope
from kvmscope.cli import main
from kvmscope.errors import KvmUnavailableError
from kvmscope.linux import LinuxSystem


def test_probe_json_on_live_kernel(live: LinuxSystem) -> None:
    result = CliRunner().invoke(main, ["probe", "--backend", "linux", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["backend"] == "linux" and report["host"]["vendor_module"] == "kvm_pvm"
    verdicts = {m["index"]: m["verdict"] for m in report["msrs"]}
    assert verdicts == {
        "0x8b": "writable after run",
        "0x10a": "refused even before a run (not settable here)",
        "0x345": "refused even before a run (not settable here)",
        "0xce": "frozen after first run",
    }, verdicts
    assert report["freeze_enforced"] is True
    pi = next(m for m in report["msrs"] if m["index"] == "0xce")
    assert pi["after_run_same_ok"] is True and pi["after_run_readback"] == pi["after_run_value"]
    arch = next(m for m in report["msrs"] if m["index"] == "0x10a")
    assert arch["value"] == "0x400000000c000069" and arch["fields"]["RDCL_NO"] is True


def test_probe_table_on_live_kernel(live: LinuxSystem) -> None:
    result = CliRunner().invoke(main, ["probe", "--backend", "linux"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("LIVE KERNEL", "kvm_pvm", "MSR_PLATFORM_INFO", "CPUID_FAULT", "frozen after first run",
                 "this kernel enforces the freeze"):
        assert text in result.output, f"probe output lacks {text!r}"


def test_probe_without_kvm_exits_3_with_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*a: object, **k: object) -> LinuxSystem:
        raise KvmUnavailableError("/dev/kvm", "missing", "/dev/kvm does not exist: this kernel has no KVM")

    monkeypatch.setattr("kvmscope.linux.open_system", unavailable)
    result = CliRunner().invoke(main, ["probe", "--backend", "linux"])
    assert result.exit_code == 3 and "/dev/kvm does not exist" in result.output, result.output
    assert "Traceback" not in result.output


def test_decode_and_unknown_name() -> None:
    ok = CliRunner().invoke(main, ["decode", "ARCH_CAP", "0x400000000c000069", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["fields"]["ITS_NO"] is True
    bad = CliRunner().invoke(main, ["decode", "NOPE_MSR"])
    assert bad.exit_code == 2 and "unknown MSR name 'NOPE_MSR'" in bad.output
    big = CliRunner().invoke(main, ["decode", "0xce", str(1 << 64)])
    assert big.exit_code == 2 and "64 bits" in big.output


def test_readme_api_example_runs_as_written(live: LinuxSystem, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has a python example"
    exec(compile(blocks[0], "README.md", "exec"), {"kvmscope": kvmscope})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "HltExit()" and out[2] == "1", out
    assert out[3] == "KVM_SET_MSRS of MSR_PLATFORM_INFO (0xce) = 0x0 refused at position 0 of 1", out


def test_readme_model_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.S)[1]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip()
    assert out == "KVM: x86: Disallow writes to immutable feature MSRs after KVM_RUN (since 6.4, 0094f62c7eaa)", out


def test_readme_guest_program_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.S)[2]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip()
    assert out == ("[Rdmsr(index=206, value=2147483648), GuestException(vector=13, error_code=0), Halted()]"), out


_TEMPLATE = "examples/templates/t2s-like.json"


@pytest.mark.parametrize(("command", "args", "keys"), [
    ("probe", ["probe", "--backend", "model", "--profile", "intel-spr"], ["msrs", "conclusion"]),
    ("decode", ["decode", "0x10a", "0x1"], ["name", "fields"]),
    ("msrs", ["msrs"], ["msrs"]),
    ("check", ["check", "examples/microcode-load.yaml", "--profile", "intel-spr"], ["steps", "ok"]),
    ("check --compare", ["check", "examples/microcode-load.yaml", "--compare", "6.3,6.18"], ["kernels", "reports"]),
    ("check --corpus", ["check", "--corpus", "corpus/qemu-7.2", "--compare", "6.3,6.18"], ["kernels", "cells"]),
    ("template apply", ["template", "apply", _TEMPLATE, "--profile", "intel-spr"], ["ok", "vcpus"]),
    ("template apply --compare", ["template", "apply", _TEMPLATE, "--profile", "intel-spr", "--compare", "6.3,6.18"],
     ["kernels", "reports"]),
    ("template verify", ["template", "verify", _TEMPLATE, "--profile", "intel-spr"], ["ok", "diffs"]),
    ("baseline", ["baseline", "intel-spr", "pvm-6.18"], ["hosts", "template"]),
    ("fingerprint compare", ["fingerprint", "compare", "intel-spr", "amd-epyc"], ["same", "differences"]),
    ("template restore", ["template", "restore", _TEMPLATE, "--profile", "intel-spr", "--to-kernel", "6.3"],
     ["ok", "vcpus"]),
    ("trace", ["trace", "--out", "TMP/t.yaml", "--timeout", "20", "--", "/bin/true"], ["recording", "traced_command"]),
])
def test_every_json_output_is_one_versioned_object(command: str, args: list[str], keys: list[str],
                                                   tmp_path: Path) -> None:
    # A script checks schema_version and command before it reads the rest, whatever the command.
    root = Path(__file__).resolve().parents[1]
    args = [a.replace("TMP", str(tmp_path)) if a.startswith("TMP") else str(root / a) if "/" in a[1:] else a
            for a in args]
    at = args.index("--") if "--" in args else len(args)  # --json before a traced command's own arguments
    result = CliRunner().invoke(main, [*args[:at], "--json", *args[at:]], prog_name="kvmscope")
    assert result.exit_code in (0, 1), f"{args}: expected a verdict, got exit {result.exit_code}: {result.stderr!r}"
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict) and list(doc)[:2] == ["schema_version", "command"], (
        f"{args}: expected an object starting with schema_version and command, got {str(doc)[:200]}")
    assert doc["schema_version"] == 1 and doc["command"] == command, (
        f"{args}: expected schema_version 1 and command {command!r}, got {doc['schema_version']}, {doc['command']!r}")
    assert all(k in doc for k in keys), f"{args}: expected keys {keys}, got {list(doc)}"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["decode", "NOPE", "1", "--json"], 2, "unknown MSR name 'NOPE'"),
    (["check", "examples/platform-info-after-run.yaml", "--compare", "6.3", "--json"], 2,
     "--compare needs at least 2 kernel versions, e.g. 6.3,6.18 or all (got 1) (see `kvmscope check --help`)"),
    (["probe", "--backend", "model", "--profile", "nope", "--json"], 2, "no shipped profile named 'nope'"),
    # errors click raises while it parses the command line: the command's words name it and its help
    (["check", "examples/platform-info-after-run.yaml", "--json", "--compare"], 2,
     "Option '--compare' requires an argument (see `kvmscope check --help`)"),
    (["probe", "--bogus", "--json"], 2, "No such option '--bogus' (see `kvmscope probe --help`)"),
    (["check", "examples/platform-info-after-run.yaml", "--json", "--compare", "5.10,6.1", "--bogus"], 2,
     "No such option '--bogus'"),
])
def test_json_commands_print_a_json_error_on_failure(args: list[str], code: int, message: str) -> None:
    # A script reading stdout of `--json` gets a document whatever happened; stderr keeps its one line.
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, [str(root / a) if a.endswith(".yaml") else a for a in args], prog_name="kvmscope")
    assert result.exit_code == code, f"{args}: expected exit {code}, got {result.exit_code}: {result.output}"
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == code and message in doc["error"], f"{args}: stdout JSON {doc}"
    command = args[0] + (" --compare" if "--compare" in args else "")  # as its success document would say
    assert doc["schema_version"] == 1 and doc["command"] == command, f"{args}: expected the envelope, got {doc}"
    assert result.stderr.count("\n") == 1 and message in result.stderr, f"{args}: stderr {result.stderr!r}"


def test_usage_errors_are_one_line_naming_the_help() -> None:
    result = CliRunner().invoke(main, ["template", "apply"], prog_name="kvmscope")
    assert result.exit_code == 2, f"expected exit 2 for a missing argument, got {result.exit_code}"
    assert result.stderr.count("\n") == 1 and "(see `kvmscope template apply --help`)" in result.stderr, (
        f"expected one line naming the help, got {result.stderr!r}")
    assert result.stdout == "", f"no JSON asked for, yet stdout has {result.stdout!r}"


def test_control_characters_in_user_text_print_as_escapes(tmp_path: Path) -> None:
    # A recording's name and labels are untrusted: an escape sequence must not reach the terminal, nor a newline
    # split the report's header, nor a bidi override reorder it.
    f = tmp_path / "s.yaml"
    f.write_text('scenario: 1\nname: "a\\x1b[31mRED\\nX\\u202eY"\nsteps:\n  - create_vcpu: 0\n    label: "l\\x07"\n')
    result = CliRunner().invoke(main, ["check", "--profile", "intel-spr", str(f)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("a\\x1b[31mRED\\nX\\u202eY ("), f"header should show escapes, got {lines[0]!r}"
    assert "(l\\x07)" in lines[1], f"the label should show its escape, got {lines[1]!r}"
    assert not any(c in result.stdout for c in "\x1b\x07\u202e"), "a control character reached the output"


@pytest.mark.parametrize("name", ["a\x1b[31mb", "two\nlines", " "])
def test_probe_save_name_must_be_printable(tmp_path: Path, name: str) -> None:
    result = CliRunner().invoke(main, ["probe", "--save", str(tmp_path / "p.json"), "--name", name])
    assert result.exit_code == 2 and "--name: expected a printable name" in result.stderr, (
        f"--name {name!r}: expected exit 2 naming --name, got {result.exit_code}: {result.stderr!r}")
    assert not (tmp_path / "p.json").exists(), "a refused --name must not write the profile"


@pytest.mark.parametrize(("args", "message"), [
    (["check", "--corpus", "corpus/qemu-7.2", "--backend", "linux"], "--corpus replays on the model; drop --backend"),
    (["check", "--corpus", "corpus/qemu-7.2", "--kernel", "6.3"], "--corpus takes its kernels from --compare"),
    (["check", "examples/platform-info-after-run.yaml", "--compare", "6.3,6.18", "--kernel", "6.1"],
     "--compare names every kernel; drop --kernel"),
    (["check", "examples/platform-info-after-run.yaml", "--compare", "6.3,6.3"], "--compare names a kernel twice"),
    (["check", "examples/platform-info-after-run.yaml", "--compare", "6.3,,6.18"], "--compare has an empty item"),
    (["template", "apply", "examples/templates/t2s-like.json", "--compare", "6.3,6.18,"], "--compare has an empty item"),
    (["template", "apply", "examples/templates/t2s-like.json", "--compare", "6.3,6.18", "--kernel", "6.1"],
     "--compare names every kernel; drop --kernel"),
])
def test_options_a_command_would_ignore_are_refused(args: list[str], message: str) -> None:
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, [str(root / a) if "/" in a else a for a in args], prog_name="kvmscope")
    assert result.exit_code == 2 and message in result.stderr, (
        f"{args}: expected exit 2 with {message!r}, got {result.exit_code}: {result.stderr!r}")


def test_compare_all_means_every_known_kernel_for_templates_too() -> None:
    from kvmscope.kernel.rulesets import KNOWN

    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, ["template", "apply", str(root / "examples/templates/t2s-like.json"),
                                       "--profile", "intel-spr", "--compare", "ALL", "--json"])
    assert result.exit_code in (0, 1), f"expected a verdict, got exit {result.exit_code}: {result.stderr!r}"
    doc = json.loads(result.stdout)
    assert len(doc["kernels"]) == len(KNOWN) == len(doc["reports"]), (
        f"--compare ALL should apply under {len(KNOWN)} kernels, got {doc['kernels']} and reports {list(doc['reports'])}")


@pytest.mark.parametrize("name", ["myprof.json", "myprof"])
def test_a_scenario_profile_file_is_named_relative_to_the_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   name: str) -> None:
    # A bare word too (what `probe --save myprof` writes): the scenario means the same from any working directory.
    from kvmscope.kernel.profile import load

    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / name).write_text(json.dumps(load("intel-spr").to_json()))
    (sub / "s.yaml").write_text(f"scenario: 1\nprofile: {name}\nsteps:\n  - create_vcpu: 0\n")
    (tmp_path / name).write_text(json.dumps(load("amd-epyc").to_json()))  # in the working directory: not this one
    monkeypatch.chdir(tmp_path)  # not the scenario's directory
    result = CliRunner().invoke(main, ["check", "sub/s.yaml"])
    assert result.exit_code == 0, f"expected the profile found next to the scenario, got {result.exit_code}: " \
                                  f"{result.stderr!r}"
    assert "profile intel-spr" in result.stdout, f"the report should name the profile used: {result.stdout!r}"


@pytest.mark.parametrize(("given", "says"), [("myprof", "no shipped profile named 'myprof'"),
                                             ('""', "expected a shipped profile name or a file, got ''")])
def test_a_scenario_profile_that_is_nowhere_names_its_line(tmp_path: Path, given: str, says: str) -> None:
    (tmp_path / "s.yaml").write_text(f"scenario: 1\nprofile: {given}\nsteps:\n  - create_vcpu: 0\n")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2 and f"{tmp_path / 's.yaml'}:2: profile: {says}" in result.stderr, (
        f"expected exit 2 naming line 2 and the field, got {result.exit_code}: {result.stderr!r}")


@pytest.mark.parametrize("extra", [["--backend", "linux"], ["--kernel", "6.3"], ["--profile", "intel-spr"]])
def test_template_verify_against_a_dump_refuses_options_choosing_a_vcpu(tmp_path: Path, extra: list[str]) -> None:
    template = Path(__file__).resolve().parents[1] / "examples/templates/t2s-like.json"
    result = CliRunner().invoke(main, ["template", "verify", str(template), "--state", str(template), *extra])
    assert result.exit_code == 2 and "--state verifies against a dump" in result.stderr, (
        f"{extra}: expected exit 2 naming --state, got {result.exit_code}: {result.stderr!r}")


@pytest.mark.parametrize("command", [["template", "apply", "examples/templates/t2s-like.json"],
                                     ["template", "verify", "examples/templates/t2s-like.json"],
                                     ["template", "dump"]])
def test_template_commands_exit_3_after_falling_back_to_the_model(monkeypatch: pytest.MonkeyPatch,
                                                                  command: list[str]) -> None:
    def unavailable(*a: object, **k: object) -> LinuxSystem:
        raise KvmUnavailableError("/dev/kvm", "missing", "/dev/kvm does not exist: this kernel has no KVM")

    monkeypatch.setattr("kvmscope.linux.open_system", unavailable)
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, [str(root / a) if "/" in a else a for a in command])
    assert result.exit_code == 3, f"{command}: expected exit 3 after the model's report, got {result.exit_code}"
    assert "MODEL" in result.stderr or "model" in result.stderr, f"{command}: no fallback warning: {result.stderr!r}"
    assert result.stdout, f"{command}: the model's report should still be printed"


def test_a_vm_wide_step_names_no_vcpu(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("scenario: 1\nsteps:\n  - disable_quirks: 0x10\n  - create_vcpu: 0\n")
    out = CliRunner().invoke(main, ["check", "--profile", "intel-spr", str(f)]).stdout.splitlines()
    assert "disable_quirks: ACCEPTED" in out[1], f"disable_quirks acts on the VM, yet its line reads {out[1]!r}"
    assert "create_vcpu vCPU 0: ACCEPTED" in out[2], f"a vCPU step names its vCPU: {out[2]!r}"


def test_a_path_of_the_wrong_kind_is_one_line_not_a_usage_block(tmp_path: Path) -> None:
    # click.Path(dir_okay=False) printed a four-line usage block; a scenario's reader says it in one line.
    t2s = str(Path(__file__).parent.parent / "examples" / "templates" / "t2s-like.json")
    folder = tmp_path / "dir.json"
    folder.mkdir()
    scenario = tmp_path / "s.yaml"
    scenario.write_text("scenario: 1\nsteps: []\n")
    d = str(folder)
    template_dir = f"{d}: cannot read a template from a directory: expected a regular file"
    for args, expected in (
        (["template", "read", d], template_dir),
        (["template", "apply", d, "--profile", "intel-spr"], template_dir),
        (["template", "restore", d, "--profile", "intel-spr"], template_dir),
        (["template", "verify", d, "--profile", "intel-spr"], template_dir),
        (["template", "verify", t2s, "--state", d], template_dir),
        (["template", "strip", d, t2s, "--suffix", "_x"], template_dir),
        (["trace", "--out", d, "--", "true"], f"cannot write {d}: it is a directory, expected a regular file"),
        (["check", "--corpus", str(scenario)], f"{scenario}: cannot read a corpus from a regular file: expected a "
                                               "directory"),
        (["check", "--corpus", str(tmp_path / "none")], f"{tmp_path / 'none'}: cannot read a corpus: no such directory"),
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.stderr == f"error: {expected}\n", (
            f"expected exit 2 and the one line 'error: {expected}' for {args}, saw {result.exit_code}: "
            f"{result.stderr!r}")


def test_a_gone_reader_of_json_errors_keeps_the_exit_code(tmp_path: Path) -> None:
    # `kvmscope check missing.yaml --json | true`: the JSON error has nowhere to go; the exit still says 2.
    import subprocess
    import sys

    script = Path(sys.executable).parent / "kvmscope"
    for args in ([str(tmp_path / "missing.yaml")], []):
        cmd = [str(script), "check", *args, "--json"] if args else [str(script), "nosuch", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.close()  # the reader goes before anything is written
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, f"{cmd}: expected exit 2 with stdout gone, got {proc.returncode}: {err!r}"
        assert b"Traceback" not in err, f"{cmd}: {err.decode()}"


@pytest.mark.parametrize("group", [[], ["template"], ["fingerprint"]])
def test_a_group_without_a_command_prints_its_help(group: list[str]) -> None:
    result = CliRunner().invoke(main, group, prog_name="kvmscope")
    assert result.exit_code == 2, f"{group}: expected click's exit 2 for a missing command, got {result.exit_code}"
    assert "Usage: kvmscope" in result.stderr and "Commands:" in result.stderr, (
        f"{group}: expected the help, got {result.stderr[:200]!r}")
    assert not result.stderr.startswith("error:"), f"{group}: the help should not be squashed into an error line"


def test_decode_says_when_it_has_no_name_or_no_fields() -> None:
    r = CliRunner().invoke(main, ["decode", "0xdeadbeef", "5"])
    assert r.exit_code == 0 and "not an MSR kvmscope has a name for" in r.output, r.output
    r = CliRunner().invoke(main, ["decode", "0x10", "5"])
    assert "MSR_IA32_TSC (0x10)" in r.output and "decodes no fields" in r.output, r.output
    r = CliRunner().invoke(main, ["decode", "0xdeadbeef", "--json"])
    assert json.loads(r.output)["known"] is False, r.output


def test_baseline_refuses_a_host_given_twice() -> None:
    r = CliRunner().invoke(main, ["baseline", "intel-spr", "amd-epyc", "intel-spr"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == "error: host 'intel-spr' is given twice: name each host of the fleet once", r.stderr


def test_template_help_names_every_subcommand_and_exit_codes() -> None:
    r = CliRunner().invoke(main, ["template", "--help"])
    assert "strip, restore" in " ".join(r.output.split()), r.output
    for args in (["template", "read", "--help"], ["template", "dump", "--help"], ["template", "strip", "--help"],
                 ["baseline", "--help"]):
        out = CliRunner().invoke(main, args).output
        assert "Exit codes:" in out, f"{' '.join(args)} gives no exit codes:\n{out}"


def test_decode_of_a_negative_value_says_so() -> None:
    # Click read "-1" as an unknown option ("No such option: -1"); it is a value out of range. A mistyped option is
    # still one.
    result = CliRunner().invoke(main, ["decode", "PLATFORM_INFO", "-1"], prog_name="kvmscope")
    assert result.exit_code == 2 and "is outside 0..0xffffffffffffffff" in result.stderr, (
        f"expected exit 2 naming the range, got {result.exit_code}: {result.stderr!r}")
    for args in (["decode", "PLATFORM_INFO", "--jsn"], ["decode", "--jsn", "PLATFORM_INFO"]):
        result = CliRunner().invoke(main, args, prog_name="kvmscope")
        assert result.exit_code == 2 and "No such option: --jsn" in result.stderr, f"{args}: {result.stderr!r}"
    # after "--" a word is a value, whatever it looks like; the same word before it is still an option
    result = CliRunner().invoke(main, ["decode", "--jsn", "--", "--jsn"], prog_name="kvmscope")
    assert result.exit_code == 2 and "No such option: --jsn" in result.stderr, f"{result.stderr!r}"
    result = CliRunner().invoke(main, ["decode", "PLATFORM_INFO", "--", "--json"], prog_name="kvmscope")
    assert result.exit_code == 2 and "'--json' is not a number" in result.stderr, f"{result.stderr!r}"


def test_a_missing_profile_file_of_a_scenario_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("scenario: 1\nprofile: nothere.json\nsteps:\n  - create_vcpu: 0\n")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2 and f"s.yaml:2: profile: no file {tmp_path / 'nothere.json'}" in result.stderr, (
        f"expected exit 2 naming line 2, the field and the file, got {result.exit_code}: {result.stderr!r}")
