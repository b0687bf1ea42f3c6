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


def test_an_entry_that_leaves_the_model_answering_otherwise_is_not_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A "kernel" (a model) whose PRED_CMD takes 0 and 1 only, unreadable: no kind the profile has says that, and the
    # catch-all "other" (the model then takes every value) must not be recorded as if it did.
    from dataclasses import replace

    from kvmscope.kernel import profile as profiles
    from kvmscope.kernel.profile import MsrBehaviour

    base = load("pvm-6.18")
    kernel = replace(base, vendor_msrs={**base.vendor_msrs, 0x49: MsrBehaviour("zero_drop", 1, False)})
    bare = replace(base, vendor_msrs={})  # what a capture starts from
    for shipped in (True, False):
        if not shipped:
            monkeypatch.setattr(profiles, "shipped", lambda: [])
        with open_model(profile=kernel) as live:
            found = capture.vendor_msrs(live, bare)
        assert 0x49 not in found, f"shipped profiles {'on' if shipped else 'off'}: PRED_CMD recorded as {found[0x49]}"
        if shipped:
            want = {i: b for i, b in base.vendor_msrs.items() if i != 0x49}
            assert found == want, f"the other entries as shipped: saw {sorted(map(hex, found))}"
