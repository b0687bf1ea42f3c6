"""The one reader (kvmscope.schema) behind scenarios and host profiles, the typed scenario steps it reads, and the one
backend chooser."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import kvmscope
from kvmscope import backends, schema
from kvmscope.check import Replayer
from kvmscope.errors import InvalidValueError, KvmUnavailableError, ProfileError, ScenarioError
from kvmscope.kernel import profile
from kvmscope.linux import LinuxSystem
from kvmscope.scenario import (
    IOCTLS,
    STEP_TYPES,
    STEPS,
    GetMsrs,
    Ioctl,
    Run,
    SetCpuid,
    Step,
    parse,
)

PLAIN = schema.Style(ProfileError, "{file}: field {field}: {what}")
LINES = schema.Style(ScenarioError, "{file}:{line}: {field}: {what}", "{file}: {field}: {what}")


def read(t: schema.Type[object], data: object, style: schema.Style = PLAIN) -> object:
    return t.read(schema.Reader("f", style), data, "x")


def test_field_types_read_and_name_the_field() -> None:
    assert read(schema.Int(8), "0xff") == 255 and read(schema.Int(8), 7) == 7
    assert read(schema.Leaf(), "0x7.1") == (7, 1) and read(schema.Leaf(), "0xd") == (0xD, 0)
    assert read(schema.Msr(), "PLATFORM_INFO") == 0xCE
    assert read(schema.MsrValues(), {"0xce": 1}) == read(schema.MsrValues(), [["PLATFORM_INFO", "1"]]) == [(0xCE, 1)]
    assert read(schema.MapOf(schema.Int(32), schema.ListOf(schema.Bool())), {"0x10": [True]}) == {16: [True]}
    for t, bad, what in ((schema.Int(8), 256, "field x: 0x100 does not fit in 8 bits unsigned"),
                         (schema.Int(), True, "field x: expected an integer, got a boolean"),
                         (schema.Str(("a", "b")), "c", "field x: expected one of a, b, got 'c'"),
                         (schema.Leaf(), "0x1.0x100000000", "field x: 0x100000000 does not fit in 32 bits"),
                         (schema.ListOf(schema.Int()), [1, "z"], "field x[1]: expected an integer like 0x1f or 31"),
                         (schema.Version(1), True, "field x: unsupported format version True (expected 1)")):
        with pytest.raises(ProfileError, match="^" + re.escape("f: " + what)):
            read(t, bad)


def test_records_defaults_dotted_fields_short_forms_and_unknown_keys() -> None:
    rec = schema.Record(dict, [schema.Field("a", schema.Int(), required=True, note="say how many"),
                               schema.Field("b", schema.Int(), default=5),
                               schema.Field("in.c", schema.Str(), attr="c")], short="a")
    assert read(rec, {"a": 1, "in": {"c": "z"}}) == {"a": 1, "b": 5, "c": "z"}
    assert read(rec, 3) == {"a": 3, "b": 5}
    node = schema.Node({"a": schema.Node(1, 2), "in": schema.Node({"d": schema.Node(0, 4)}, 3)}, 1)
    with pytest.raises(ScenarioError, match=r"^f:4: x\.in\.d: unknown field \(expected c\)"):
        read(rec, node, LINES)
    with pytest.raises(ProfileError, match=r"^f: field x\.a: missing \(say how many\)"):
        read(rec, {})
    with pytest.raises(TypeError, match="no attribute for fields"):
        schema.Record(kvmscope.CpuidEntry, [schema.Field("nope", schema.Int())])


def test_every_step_kind_has_a_table_and_a_player() -> None:
    assert set(Replayer.PLAYERS) == set(STEP_TYPES) - {Ioctl}
    for t in STEP_TYPES:
        attrs = {f.name for f in dataclasses.fields(t)}
        assert all(f.name in attrs for f in t.FIELDS), t
        assert issubclass(t, Step) and STEPS[t.KIND].make is t
    for name in IOCTLS:
        assert type(Ioctl(name=name).step()) in Replayer.PLAYERS


def test_steps_are_typed_and_ioctls_map_onto_them() -> None:
    s = parse("""scenario: 1
steps:
  - run: 2
  - set_cpuid: {vcpu: 1, from: stored}
  - ioctl: {name: KVM_GET_MSRS, vcpu: 1, msrs: [[0xce, 5]], returned: 1}
  - ioctl: {name: KVM_RUN, returned: 0, errno: EINTR}
  - ioctl: {name: KVM_SET_MSRS, msrs: {0xce: 0}, returned: 0}
    expect: accepted
""", "s.yaml")
    run, cpuid, get, kvm_run, set_ = s.steps
    assert run == Run(line=3, vcpu=2) and (cpuid.kind, cpuid.line) == ("set_cpuid", 4)
    assert isinstance(cpuid, SetCpuid) and (cpuid.vcpu, cpuid.source, cpuid.entries) == (1, "stored", None)
    assert isinstance(get, Ioctl) and get.step() == GetMsrs(line=5, vcpu=1, msrs=[0xCE], expect=get.recorded())
    assert get.recorded().count == 1
    assert isinstance(kvm_run, Ioctl) and (kvm_run.recorded().errno, kvm_run.recorded().count) == (4, None)
    assert isinstance(set_, Ioctl) and set_.step().expect == set_.expect and set_.expect and set_.expect.accepted


def test_cpuid_file_is_read_relative_to_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("- {function: 7, edx: 0x10}\n- {function: 1, bogus: 1}\n")
    text = "scenario: 1\nsteps:\n  - set_cpuid: {vcpu: 0, file: c.yaml}\n"
    with pytest.raises(ScenarioError, match=r"c\.yaml:2: entries\[1\]\.bogus: unknown field"):
        parse(text, str(tmp_path / "s.yaml"))
    (tmp_path / "c.yaml").write_text("- {function: 7, edx: 0x10}\n")
    step = parse(text, str(tmp_path / "s.yaml")).steps[0]
    assert isinstance(step, SetCpuid) and step.entries == [kvmscope.CpuidEntry(7, edx=0x10)]


def test_profiles_round_trip_and_their_errors_keep_their_form() -> None:
    for name in profile.shipped():
        p = profile.load(name)
        assert profile.read(p.to_json(), p.path) == p
    data = profile.load("pvm-6.18").to_json()
    del data["ruleset"]
    assert profile.read(data).ruleset == data["kernel_release"]
    data["supported_cpuid"][1]["eex"] = "0x1"
    with pytest.raises(ProfileError, match=r"^x.json: field supported_cpuid\[1\]\.eex: unknown field \(expected "):
        profile.read(data, "x.json")
    data = profile.load("pvm-6.18").to_json()
    data["vcpu"]["reset_regs"] = []
    with pytest.raises(ProfileError, match=r"^x.json: field vcpu.reset_regs: expected a mapping, got a list$"):
        profile.read(data, "x.json")


def test_one_backend_chooser(monkeypatch: pytest.MonkeyPatch) -> None:
    system, why = backends.choose("auto", kernel="6.10")
    assert system.backend == "model" and why is None and "kernel 6.10" in system.describe()
    with pytest.raises(InvalidValueError, match="the linux backend takes neither"):
        backends.choose("linux", profile="intel-spr")
    with pytest.raises(InvalidValueError, match="unknown backend 'kvm'"):
        backends.choose("kvm")
    with pytest.raises(InvalidValueError, match="backend 'model' takes no option path"):
        kvmscope.open("model", path="/dev/kvm")

    def unavailable(*a: object, **k: object) -> LinuxSystem:
        raise KvmUnavailableError("/dev/kvm", "missing", "no /dev/kvm here")

    monkeypatch.setattr("kvmscope.linux.open_system", unavailable)
    system, why = backends.choose("auto")
    assert system.backend == "model" and why == "no /dev/kvm here"
    assert kvmscope.open().backend == "model"
    with pytest.raises(KvmUnavailableError):
        backends.choose("linux")


@pytest.mark.parametrize(("entry", "error"), [
    ({"rule": "pebs_ept_spr", "mask": "0x4"}, r"history\[0\]: expected one of feature_msr or cpuid"),
    ({"rule": "pebs_ept_spr", "mask": "0x4", "feature_msr": "0x345", "cpuid": "0x1.0", "register": "ecx"},
     r"history\[0\]: expected one of feature_msr or cpuid"),
    ({"rule": "pebs_ept_spr", "mask": "0x4", "cpuid": "0x1.0"}, r"history\[0\]: a cpuid entry names its register"),
    ({"rule": "pebs_ept_spr", "mask": "0x4", "cpuid": "0x1.0", "register": "ecx", "before": 0},
     r"history\[0\]: a cpuid entry names its register and has no before"),
    ({"rule": "pebs_ept_spr", "mask": "0x40", "feature_msr": "0x345", "before": "0x41"},
     r"history\[0\]\.before: 0x41 has bits outside mask 0x40"),
    ({"rule": "pebs_ept", "mask": "0x40", "feature_msr": "0x345"}, r"history\[0\]\.rule: no rule named 'pebs_ept'; did "
                                                                   r"you mean pebs_ept_spr"),
    ({"rule": "pebs_ept_spr", "mask": "0x40", "feature_msr": "0x345", "colour": 1},
     r"history\[0\]\.colour: unknown field"),
])
def test_a_profiles_history_is_checked_whole(entry: dict[str, object], error: str) -> None:
    data = profile.load("intel-spr").to_json()
    assert len(data["history"]) == 6, "intel-spr's history round-trips (its PERF_CAPABILITIES by release)"
    data["history"] = [entry]
    with pytest.raises(ProfileError, match=r"^x.json: field " + error):
        profile.read(data, "x.json")


def test_a_misspelt_top_level_profile_key_is_an_error_an_unknown_one_is_not() -> None:
    # "rulset" would otherwise be ignored, and the profile judged under its kernel release's rules
    data = profile.load("intel-spr").to_json()
    data["rulset"] = data.pop("ruleset")
    with pytest.raises(ProfileError, match=r"^x.json: field rulset: unknown field \(did you mean ruleset\?\)$"):
        profile.read(data, "x.json")
    data = profile.load("intel-spr").to_json()
    data["added_by_a_newer_kvmscope"] = {"x": 1}
    assert profile.read(data, "x.json").name == "intel-spr", "an unknown key unlike any known one is ignored"


@pytest.mark.parametrize(("entry", "error"), [
    ({"rule": "vmx_restore_current", "mask": "0x1", "feature_msr": "0x345"},
     r"history\[0\]\.rule: vmx_restore_current is not a change from a release on \(since < 5.10, until 6.0\)"),
    ({"rule": "cpuid_7_2_edx", "mask": "0x1", "feature_msr": "0x345"}, None),
    ({"rule": "pebs_ept_spr", "mask": "0x1", "feature_msr": "0x999"},
     r"history\[0\]: feature_msr 0x999 is not in feature_msrs"),
    ({"rule": "pebs_ept_spr", "mask": "0x1", "feature_msr": "0x345", "register": "eax"},
     r"history\[0\]: a feature_msr entry has no register"),
    ({"rule": "pebs_ept_spr", "mask": "0x1", "cpuid": "0x1234.0", "register": "eax"},
     r"history\[0\]\.cpuid: leaf 0x1234.0 is not in supported_cpuid"),
])
def test_a_history_entry_says_what_a_later_release_changed_on_this_host(entry: dict[str, object],
                                                                          error: str | None) -> None:
    data = profile.load("intel-spr").to_json()
    data["history"] = [entry]
    if error is None:
        assert profile.read(data, "x.json").history[0].rule.key == entry["rule"], "a rule of a release: taken"
        return
    with pytest.raises(ProfileError, match=r"^x.json: field " + error):
        profile.read(data, "x.json")
    data["ruleset"] = "6.2"  # pebs_ept_spr is 6.3's: on a 6.2 host's own kernel the captured value stands
    data["history"] = [{"rule": "pebs_ept_spr", "mask": "0x4fc0", "feature_msr": "0x345", "before": "0x0"}]
    with pytest.raises(ProfileError, match=r"history\[0\]\.rule: pebs_ept_spr \(since 6.3\) is not in force on the "
                                           r"profile's own kernel \(6.2\)"):
        profile.read(data, "x.json")
