"""`kvmscope check`: scenarios replayed on the model and on the live kernel, the explanations, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmscope.check import outcome_text, replay
from kvmscope.cli import main
from kvmscope.errors import ScenarioError
from kvmscope.linux import LinuxSystem
from kvmscope.model import open_model
from kvmscope.scenario import CreateVcpu, load, parse

EXAMPLES = Path(__file__).parent.parent / "examples"
LIVE_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if "intel" not in p.name)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("path", LIVE_EXAMPLES, ids=[p.stem for p in LIVE_EXAMPLES])
def test_example_same_verdicts_on_model_and_live_kernel(live: LinuxSystem, path: Path) -> None:
    scenario = load(path)
    on_model = replay(scenario, open_model())
    on_live = replay(scenario, live, open_model())
    assert on_model.ok and on_live.ok, f"{path.name}: every expectation holds on both backends"
    for m, k in zip(on_model.steps, on_live.steps, strict=True):
        assert (outcome_text(m), m.count, m.values, m.exit) == (outcome_text(k), k.count, k.values, k.exit), (
            f"{path.name} step {m.number} (line {m.line}): model {m.summary!r}, live kernel {k.summary!r}")
        if m.refusal:
            assert k.refusal and (k.refusal.rule, k.refusal.old, k.refusal.new) == (m.refusal.rule, m.refusal.old,
                                                                                    m.refusal.new)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_passes_on_the_model(path: Path) -> None:
    code, out = run("check", str(path))
    assert code == 0, out


def test_refusal_is_explained() -> None:
    code, out = run("check", str(EXAMPLES / "platform-info-after-run.yaml"))
    assert code == 0
    for text in ("MSR_PLATFORM_INFO (0xce)", "old 0x0000000080000000", "new 0x0000000000000000",
                 "bits differing: 31", "since 6.13, bc2ca3680b30", "hint: set MSR_PLATFORM_INFO before"):
        assert text in out, f"check output lacks {text!r}:\n{out}"


def test_refusal_is_explained_on_live_kernel(live: LinuxSystem) -> None:
    code, out = run("check", str(EXAMPLES / "platform-info-after-run.yaml"), "--backend", "linux", "--json")
    assert code == 0, out
    report = json.loads(out)
    refused = [s for s in report["steps"] if s["outcome"] == "refused"]
    assert len(refused) == 1 and refused[0]["refusal"]["differing_bits"] == [31]
    assert "bc2ca3680b30" in refused[0]["refusal"]["rule"]


def test_compare_kernels() -> None:
    code, out = run("check", str(EXAMPLES / "sandbox-reset-snapshot-intel.yaml"), "--compare", "6.3,6.4,6.18")
    assert code == 1, "the expectation (refused) is not met on 6.3"
    assert "accepted on 6.3; refused at MSR_IA32_ARCH_CAPABILITIES on 6.4, 6.18 by 0094f62c7eaa (since 6.4: " in out, out
    code, out = run("check", str(EXAMPLES / "platform-info-after-run.yaml"), "--compare", "6.10,6.13", "--json")
    changes = json.loads(out)["changes"]
    assert [c["text"].split(" (since")[0] for c in changes] == [
        "accepted on 6.10; refused at MSR_PLATFORM_INFO on 6.13 by bc2ca3680b30"], changes


def test_compare_names_the_ruleset_of_each_proposal_file() -> None:
    # Steps name a proposal by the file given; the title says which ruleset that file is.
    proposal = str(EXAMPLES / "proposals" / "revert-arch-cap-check.toml")
    args = ("check", str(EXAMPLES / "platform-info-after-run.yaml"), "--compare", f"6.3,{proposal}", "--profile",
            "intel-spr")
    code, out = run(*args)
    assert code == 1 and out.splitlines()[1] == f"  {proposal}: revert-arch-cap-check (proposed, on 6.18)", out
    code, out = run(*args, "--json")
    assert json.loads(out)["proposals"] == {proposal: "revert-arch-cap-check (proposed, on 6.18)"}, out


def test_unexpected_refusal_exits_1(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - run: 0\n  - set_msrs: {vcpu: 0, msrs: {0xce: 0}}\n")
    code, out = run("check", str(f))
    assert code == 1 and "REFUSED" in out and "FAILED" in out


BAD = {
    "wrong type": ("scenario: 1\nsteps:\n  - set_msrs: {vcpu: zero, msrs: {0xce: 1}}\n", ":3: steps[0].set_msrs.vcpu"),
    "unknown msr": ("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - set_msrs:\n      vcpu: 0\n      msrs: {PLATFORM_INFOO: 1}\n",
                    ":6: steps[1].set_msrs.msrs.PLATFORM_INFOO: unknown MSR name"),
    "beyond 64 bits": ("scenario: 1\nsteps:\n  - set_msrs: {vcpu: 0, msrs: {0xce: 0x10000000000000000}}\n",
                       ":3: steps[0].set_msrs.msrs.0xce: 0x10000000000000000 does not fit in 64 bits"),
    "negative": ("scenario: 1\nsteps:\n  - microcode_load: -1\n", ":3: steps[0].microcode_load"),
    "unknown step": ("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - launch: 0\n", ":4: steps[1].launch: unknown step"),
    "truncated": ("scenario: 1\nsteps:\n  - set_msrs: {vcpu: 0, msrs: {0xce: 1\n", "not valid YAML"),
    "no version": ("steps: []\n", "scenario: missing"),
    "unknown field": ("scenario: 1\nsteps:\n  - run: {vcpu: 0, fast: true}\n", ":3: steps[0].run.fast: unknown field"),
    "bad expect": ("scenario: 1\nsteps:\n  - run: 0\n    expect: {exit: Halted}\n", ":4: expect.exit"),
    "empty": ("", ":1: the file is empty"),
    "not a mapping": ("- 1\n- 2\n", "(top level): expected a mapping"),
    "two cpuid sources": ("scenario: 1\nsteps:\n  - set_cpuid: {vcpu: 0, from: supported, entries: []}\n",
                          ":3: steps[0].set_cpuid: one source of entries (from, entries or file), got from, entries"),
    "values on a write": ("scenario: 1\nsteps:\n  - set_msrs: {vcpu: 0, msrs: {TSC: 1}}\n    expect: {values: {TSC: 1}}\n",
                          ":4: expect.values: values are what a get_msrs step reads, not a set_msrs step"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_scenario_exit_2_names_the_place(tmp_path: Path, name: str) -> None:
    text, expected = BAD[name]
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    code, out = run("check", str(f))
    assert code == 2, f"{name}: expected exit 2, saw {code}: {out}"
    flat = " ".join(out.split())
    assert str(f) in flat and " ".join(expected.split()) in flat, f"{name}: expected {expected!r} in: {flat}"


def test_json_scenarios_accepted_and_bad_json_located(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"scenario": 1, "steps": [{"create_vcpu": 0}, {"run": 0, "expect": {"exit": "HltExit"}}]}))
    code, out = run("check", str(f))
    assert code == 0, out
    f.write_text('{"scenario": 1,\n "steps": [\n')
    code, out = run("check", str(f))
    assert code == 2 and f"{f}:3: not valid JSON" in " ".join(out.split()), out


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    code, out = run("check", str(tmp_path / "nope.yaml"))
    assert code == 2 and "cannot read" in out
    code, out = run("check", str(EXAMPLES / "microcode-load.yaml"), "--kernel", "5.0")
    assert code == 2 and "older than the oldest ruleset" in " ".join(out.split())
    code, out = run("check", str(EXAMPLES / "microcode-load.yaml"), "--profile", "nope")
    assert code == 2 and "no shipped profile named 'nope'" in out


def test_recorded_ioctl_events(tmp_path: Path) -> None:
    # The shape a recorder of real VMMs writes: ioctl-level events with what the kernel returned.
    text = """scenario: 1
steps:
  - ioctl: {name: KVM_CREATE_VCPU, vcpu: 0}
  - ioctl: {name: KVM_SET_MSRS, vcpu: 0, msrs: [[0xce, 0x80000000], [0x8b, 1]], returned: 2}
  - ioctl: {name: KVM_RUN, vcpu: 0}
  - ioctl: {name: KVM_SET_MSRS, vcpu: 0, msrs: [[0x8b, 2], [0xce, 0]], returned: 1}
"""
    s = parse(text, "rec.yaml")
    report = replay(s, open_model())
    assert report.ok, [(r.summary, r.expected, r.met) for r in report.steps]
    assert report.steps[3].refusal and report.steps[3].refusal.index == 0xCE


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_streamed_scenario_equals_loaded(path: Path) -> None:
    from kvmscope.scenario import stream

    loaded = load(path)
    s = stream(path)
    assert (s.header.name, s.header.kernel, s.header.profile) == (loaded.name, loaded.kernel, loaded.profile)
    assert list(s.steps) == loaded.steps


def test_streamed_errors_name_the_line_before_any_step(tmp_path: Path) -> None:
    from kvmscope.scenario import stream

    f = tmp_path / "s.yaml"
    f.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - run: {vcpu: x}\n")
    # The whole file is checked before the first step is handed out (a live replay touches nothing).
    with pytest.raises(ScenarioError, match=r"s.yaml:4: steps\[1\].run.vcpu"):
        stream(f)
    # The header may follow the steps: read either way, the file gives the same scenario.
    f.write_text("steps:\n  - create_vcpu: 0\nscenario: 1\nname: late\n")
    s = stream(f)
    assert s.header.name == "late" and list(s.steps) == load(f).steps == [CreateVcpu(line=2, vcpu=0)]


DROPPED = """scenario: 1
steps:
  - create_vcpu: 0
  - set_cpuid: {vcpu: 0, from: supported}
  - set_msrs: {vcpu: 0, msrs: {ARCH_CAPABILITIES: 0x1}}
"""


@pytest.mark.parametrize("backend", ["model", "linux"])
def test_hint_when_the_hosts_set_cpuid_dropped_the_bit(tmp_path: Path, backend: str, live: LinuxSystem) -> None:
    """This host's KVM_GET_SUPPORTED_CPUID offers ARCH_CAPABILITIES (7.0 EDX[29]) and its KVM_SET_CPUID2 drops it; the
    6.13 refusal's usual hint (set the bit first) cannot work here, so the hint says what happened."""
    path = tmp_path / "dropped.yaml"
    path.write_text(DROPPED)
    code, out = run("check", str(path), "--backend", backend, "--json")
    assert code == 1, out
    refusal = next(s for s in json.loads(out)["steps"] if s["outcome"] == "refused")["refusal"]
    assert "this host's KVM_SET_CPUID2 dropped it" in refusal["hint"], f"{backend}: hint {refusal['hint']!r}"
    assert "a5d563890b8f" in refusal["rule"], refusal


def test_recorded_system_and_vm_ioctls_name_no_vcpu(tmp_path: Path) -> None:
    path = tmp_path / "traced.yaml"
    path.write_text("scenario: 1\nsteps:\n  - traced: {on: system, name: KVM_GET_API_VERSION, returned: 12}\n"
                    "  - traced: {on: vcpu, vcpu: 1, name: KVM_GET_REGS}\n  - get_cpuid: 3\n")
    code, out = run("check", str(path))
    lines = [line for line in out.splitlines() if line.lstrip("✗ ").startswith("[")]
    assert "traced:" in lines[0] and "vCPU" not in lines[0], f"a system ioctl names no vCPU: {lines[0]!r}"
    assert "traced vCPU 1:" in lines[1], lines[1]
    assert lines[2].startswith("✗"), f"a step that errs without an expectation is marked: {lines[2]!r}"
    code, out = run("check", str(path), "--json")
    assert [s["vcpu"] for s in json.loads(out)["steps"]] == [None, 1, 3], out


def test_a_destroyed_vcpu_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    path.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - destroy_vcpu: 0\n  - hotplug: 0\n")
    code, out = run("check", str(path))
    flat = " ".join(out.split())
    assert code == 1 and "vCPU 0's fd was closed by a destroy_vcpu step" in flat, out


def test_live_check_says_when_the_model_alongside_refused_what_the_kernel_took(live: LinuxSystem, tmp_path: Path) -> None:
    # The explaining model is wrong here (a profile without PVM's PAT handling): the report must say so on the step,
    # as it does for a refusal the model did not predict, or a wrong model goes unnoticed in every live check.
    data = json.loads((EXAMPLES.parent / "src/kvmscope/profiles/pvm-6.18.json").read_text())
    del data["vendor_msrs"]["0x277"]
    (tmp_path / "p.json").write_text(json.dumps(data))
    scenario = tmp_path / "pat.yaml"
    scenario.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - set_cpuid: {from: supported}\n"
                        "  - set_msrs: {vcpu: 0, msrs: {PAT: 0xffffffffffffffff}}\n    expect: accepted\n")
    code, out = run("check", str(scenario), "--backend", "linux", "--profile", str(tmp_path / "p.json"))
    note = "the model with this host's profile predicted a different result: KVM_SET_MSRS returned 0 of 1"
    assert code == 0 and note in out, f"expected the step taken, with the note {note!r}: {out}"
