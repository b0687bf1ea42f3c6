"""Templates and profiles at KVM's batch limits (MAX_IO_MSRS, KVM_MAX_CPUID_ENTRIES) and other bad input to the
``template`` commands: each is a finding or a one-line refusal, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from kvmscope.cli import main
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model
from kvmscope.template import parse
from kvmscope.template_apply import BOOT_MSRS, apply

ROOT = Path(__file__).resolve().parent.parent
SPR = ROOT / "src" / "kvmscope" / "profiles" / "intel-spr.json"
EXTRA = 0x40001000  # past Hyper-V's range: dumpable, and stored by the model when the index list holds it


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def no_traceback(r: Result) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"expected an exit, saw {type(r.exception).__name__}: {r.exception}\n{r.output[-2000:]}")
    assert "Traceback" not in r.output, f"expected no traceback, saw:\n{r.output[-2000:]}"


def profile_with(tmp_path: Path, name: str = "many", **changes: Any) -> Path:
    """intel-spr with fields replaced (``msr_index_list`` extended by ``extra_msrs`` MSRs from EXTRA)."""
    data = json.loads(SPR.read_text())
    data["name"] = name
    extra = changes.pop("extra_msrs", 0)
    data["msr_index_list"] += [hex(EXTRA + i) for i in range(extra)]
    data.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def msr_template(n: int, first: int = EXTRA, bitmap: str = "0b0") -> str:
    return json.dumps({"msr_modifiers": [{"addr": hex(first + i), "bitmap": bitmap} for i in range(n)]})


# --- B2: 256 or more MSR modifiers -----------------------------------------------------------------------------------


def test_apply_with_300_msrs_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """KVM refuses a KVM_GET/SET_MSRS of 256 or more (E2BIG); Firecracker reads in chunks of 256 and writes in one
    call, so it fails: kvmscope says so, and still judges every MSR (in batches KVM takes)."""
    profile = profile_with(tmp_path, extra_msrs=300)
    t = parse(msr_template(300), "msr300.json")
    with open_model(profile=str(profile)) as system:
        rep = apply(system, t, 1)
    assert not rep.ok, "expected the template not taken"
    assert "msr300.json: msr_modifiers: 300 modifiers" in rep.failures[0] and "E2BIG" in rep.failures[0], (
        f"expected the read limit first, naming file and field, saw {rep.failures[:2]}")
    total = len({EXTRA + i for i in range(300)} | {i for i, _ in BOOT_MSRS})
    assert any(f"{total} MSRs with the boot MSRs" in f and "one KVM_SET_MSRS" in f for f in rep.failures), (
        f"expected the write limit ({total} entries in one KVM_SET_MSRS), saw {rep.failures}")
    (vcpu,) = rep.vcpus
    assert (vcpu.msrs_total, vcpu.msrs_written) == (total, 0), (
        f"expected {total} entries judged and Firecracker's one call writing 0, saw {vcpu.msrs_total}, "
        f"{vcpu.msrs_written}")
    assert not [d for d in vcpu.diffs if d.where.startswith("MSR_0x4000")], (
        f"expected every template MSR written and read back (in batches), saw {vcpu.diffs[:3]}")


def test_apply_with_255_msrs_has_no_batch_finding(tmp_path: Path) -> None:
    profile = profile_with(tmp_path, extra_msrs=255)
    with open_model(profile=str(profile)) as system:
        rep = apply(system, parse(msr_template(255), "msr255.json"), 1, boot=())
    assert rep.ok, f"expected 255 MSRs taken (one batch under MAX_IO_MSRS), saw {rep.failures}"


@pytest.mark.parametrize("command", ["apply", "restore"])
def test_cli_256_msrs_exits_1_naming_file_and_field(tmp_path: Path, command: str) -> None:
    path = tmp_path / "msr256.json"
    path.write_text(msr_template(256))
    r = run("template", command, str(path), "--profile", "intel-spr")
    no_traceback(r)
    assert r.exit_code == 1, f"expected exit 1 (a finding), saw {r.exit_code}:\n{r.output[-1500:]}"
    assert f"{path}: msr_modifiers: 256 modifiers" in r.output and "E2BIG" in r.output, (
        f"expected the file, the field and E2BIG named, saw:\n{r.output[:1500]}")


def test_cli_300_msrs_on_the_live_kernel(live: LinuxSystem, tmp_path: Path) -> None:
    path = tmp_path / "msr300.json"
    path.write_text(msr_template(300))
    r = run("template", "apply", str(path), "--backend", "linux")
    no_traceback(r)
    assert r.exit_code == 1 and "msr_modifiers: 300 modifiers" in r.output, (
        f"expected exit 1 and the read limit named, saw {r.exit_code}:\n{r.output[:1500]}")
