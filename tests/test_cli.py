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
