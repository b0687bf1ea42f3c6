"""A capture of this host (``probe --save``, and the model the CLI uses by default) answers as the live kernel does."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmscope import capture
from kvmscope import msrs as M
from kvmscope.cli import main
from kvmscope.kernel.profile import Profile, load
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model

_CAPTURED: list[Profile] = []


@pytest.fixture
def captured(live: LinuxSystem) -> Profile:
    if not _CAPTURED:  # one capture (a few seconds) for the tests of this file
        _CAPTURED.append(capture.capture(live))
    return _CAPTURED[0]


def test_a_capture_measures_the_msrs_the_vendor_module_handles_itself(live: LinuxSystem, captured: Profile) -> None:
    # On this PVM host: PAT, PRED_CMD, FLUSH_CMD, MISC_ENABLE and TSC_RATIO answer unlike upstream's rules. A capture
    # that left them out made the CLI's default model refuse PAT writes the kernel takes.
    if live.host_info().get("vendor_module") != "kvm_pvm":
        pytest.skip("the expected entries are this project's PVM host's")
    shipped = load("pvm-6.18").vendor_msrs
    assert captured.vendor_msrs == shipped, (
        f"expected the shipped pvm-6.18 entries {sorted(map(hex, shipped))}, "
        f"captured {sorted(map(hex, captured.vendor_msrs))}")


def test_the_model_of_a_capture_answers_every_ruled_msr_as_the_kernel(live: LinuxSystem, captured: Profile) -> None:
    # The same read/write sweep on a vCPU of each: every MSR the model has a rule for, and every ordinary one.
    with open_model(profile=captured) as model:
        ruled = model.create_vm().create_vcpu(0).msr_rules.ruled_msrs()
    indices = sorted(i for i in set(ruled) | set(captured.msr_behaviour)
                     if not M.is_feature_msr(i) and not M.VMX_FIRST <= i <= M.VMX_LAST and i != 0x10)  # the TSC: reads change
    kernel = capture._sweep(live, indices, captured.supported_cpuid)
    with open_model(profile=captured) as model:
        ours = capture._sweep(model, indices, captured.supported_cpuid)
    differ = {hex(i): (kernel[i], ours[i]) for i in indices if kernel[i] != ours[i]}
    assert not differ, f"{len(differ)} of {len(indices)} MSRs answer otherwise on the model (kernel, model): {differ}"


def test_the_default_model_takes_what_the_kernel_takes(live: LinuxSystem, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMSCOPE_CACHE", str(tmp_path / "cache"))
    scenario = tmp_path / "pat.yaml"
    scenario.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - set_cpuid: {from: supported}\n"
                        "  - set_msrs: {vcpu: 0, msrs: {PAT: 0xffffffffffffffff}}\n    expect: accepted\n")
    for backend in ("linux", "model"):
        result = CliRunner().invoke(main, ["check", str(scenario), "--backend", backend])
        assert result.exit_code == 0, f"--backend {backend}: expected the PAT write taken, got {result.output}"
