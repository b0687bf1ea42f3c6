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


# --- B3: profiles larger than a vCPU holds; long MSR index lists; a refused KVM_SET_CPUID2 -----------------------------


def cpuid_entry(function: int) -> dict[str, Any]:
    return {"function": hex(function), "index": 0, "flags": 0, "eax": "0x0", "ebx": "0x0", "ecx": "0x0", "edx": "0x0"}


@pytest.mark.parametrize("command", [["probe", "--backend", "model", "--profile"], ["template", "dump", "--profile"],
                                     ["baseline", "intel-spr"]])
def test_profile_with_257_cpuid_entries_is_refused(tmp_path: Path, command: list[str]) -> None:
    data = json.loads(SPR.read_text())
    pad = [cpuid_entry(0x40000100 + i) for i in range(257 - len(data["supported_cpuid"]))]
    path = profile_with(tmp_path, "cpuid257", supported_cpuid=data["supported_cpuid"] + pad)
    r = run(*command, str(path))
    no_traceback(r)
    want = f"error: {path}: field supported_cpuid: 257 entries; a vCPU holds at most 256"
    assert r.exit_code == 2 and r.output.startswith(want) and r.output.count("\n") == 1, (
        f"expected exit 2 and one line {want!r}..., saw {r.exit_code}:\n{r.output[:600]}")


def test_profile_whose_append_rules_overflow_is_refused(tmp_path: Path) -> None:
    data = json.loads(SPR.read_text())
    first = data["supported_cpuid"][0]
    rule = {"trigger": f"{first['function']}.{first['index']}", "entries": [cpuid_entry(0x40000100 + i)
                                                                              for i in range(300)]}
    path = profile_with(tmp_path, "append300", cpuid={**data.get("cpuid", {}), "append": [rule]})
    r = run("template", "dump", "--profile", str(path))
    no_traceback(r)
    assert r.exit_code == 2 and f"{path}: field cpuid.append[0].entries: " in r.output, (
        f"expected exit 2 naming cpuid.append[0].entries, saw {r.exit_code}:\n{r.output[:600]}")


@pytest.mark.parametrize("command", ["dump", "verify"])
def test_dump_and_verify_read_a_long_msr_index_list(tmp_path: Path, command: str) -> None:
    """300 more MSRs than KVM_GET_MSRS takes in one call: read in batches, all dumped."""
    path = profile_with(tmp_path, "idx300", extra_msrs=300)
    out = tmp_path / "dump.json"
    args = ["-o", str(out)] if command == "dump" else [str(ROOT / "examples" / "templates" / "t2s-like.json")]
    r = run("template", command, "--profile", str(path), *args)
    no_traceback(r)
    if command == "dump":
        dumped = {int(m["addr"], 16) for m in json.loads(out.read_text())["msr_modifiers"]}
        missing = sorted({EXTRA + i for i in range(300)} - dumped)
        assert r.exit_code == 0 and not missing, f"expected every extra MSR dumped, missing {missing[:5]}: {r.output}"
    else:
        assert r.exit_code == 1 and "MISMATCH" in r.output, f"expected a verdict (exit 1), saw {r.output[-600:]}"


def bad_cpuid_profile(tmp_path: Path) -> Path:
    """intel-spr with 48 virtual address bits changed to 40: kvm_check_cpuid refuses the list (EINVAL)."""
    data = json.loads(SPR.read_text())
    for e in data["supported_cpuid"]:
        if int(e["function"], 16) == 0x80000008:
            e["eax"] = hex(int(e["eax"], 16) & ~0xFF00 | 40 << 8)
    return profile_with(tmp_path, "badva", supported_cpuid=data["supported_cpuid"])


@pytest.mark.parametrize("command", [["probe", "--backend", "model", "--profile"], ["template", "dump", "--profile"],
                                     ["baseline", "intel-spr"]])
def test_refused_set_cpuid2_stops_the_command(tmp_path: Path, command: list[str]) -> None:
    """Before: probe and dump gave a traceback, baseline exited 0 with verdicts of a vCPU without CPUID."""
    r = run(*command, str(bad_cpuid_profile(tmp_path)))
    no_traceback(r)
    assert r.exit_code == 2 and "KVM_SET_CPUID2" in r.output and "EINVAL" in r.output and r.output.count("\n") == 1, (
        f"expected exit 2 and one line naming KVM_SET_CPUID2 and EINVAL, saw {r.exit_code}:\n{r.output[-800:]}")


# --- C3: several modifiers of one MSR, leaf or register -----------------------------------------------------------------


CONFLICT = {"msr_modifiers": [{"addr": "0x8b", "bitmap": "0b" + "0" * 32 + "x" * 32},
                              {"addr": "0x8b", "bitmap": "0b" + "1" * 32 + "x" * 32}]}
REG_CONFLICT = {"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
    {"register": "eax", "bitmap": "0b1"}, {"register": "eax", "bitmap": "0b0"}]}]}


@pytest.mark.parametrize(("template", "where"), [(CONFLICT, "(0x8b) (msr_modifiers[0])"),
                                                 (REG_CONFLICT, "CPUID 0x1.0 eax (cpuid_modifiers[0].modifiers[0])")])
def test_apply_checks_every_modifier_not_only_the_last(template: dict[str, Any], where: str) -> None:
    """Firecracker accepts both and applies them in turn (the last wins), so the first one's fixed bits cannot hold:
    before, apply said every fixed bit holds."""
    with open_model(profile="intel-spr") as system:
        rep = apply(system, parse(json.dumps(template), "dup.json"), 1, boot=())
    diffs = [(d.kind, d.where) for v in rep.vcpus for d in v.diffs]
    assert not rep.ok and any(k == "overridden" and w.endswith(where) for k, w in diffs), (
        f"expected the first modifier reported overridden at {where!r}, saw ok={rep.ok} {diffs}")
    assert "overridden (by a later one or a boot MSR)" in rep.summary(), rep.summary()


@pytest.mark.parametrize(("bitmap", "taken"), [("0b1" + "x" * 22, False), ("0b1", True)])
def test_a_boot_msr_overrides_the_templates_fixed_bits(bitmap: str, taken: bool) -> None:
    # Firecracker writes MISC_ENABLE = 0x1 (fast strings) over the template's value: bit 22 fixed to 1 cannot hold.
    template = parse(json.dumps({"msr_modifiers": [{"addr": "0x1a0", "bitmap": bitmap}]}), "misc.json")
    with open_model(profile="intel-spr") as system:
        rep = apply(system, template, 1)
    diffs = [(d.kind, d.where, d.bits) for v in rep.vcpus for d in v.diffs]
    expected = [] if taken else [("overridden", "MSR_IA32_MISC_ENABLE (0x1a0) (msr_modifiers[0])", [22])]
    assert rep.ok is taken and diffs == expected, f"{bitmap}: expected ok={taken} and {expected}, saw {rep.ok} {diffs}"


def test_same_modifier_twice_holds() -> None:
    same = {"msr_modifiers": [CONFLICT["msr_modifiers"][0]] * 2}
    with open_model(profile="intel-spr") as system:
        rep = apply(system, parse(json.dumps(same), "same.json"), 1, boot=())
    assert rep.ok, f"expected two identical modifiers taken, saw {rep.summary()}"


# --- C4: template strip never writes over its inputs -----------------------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["a.json", "b.json", "--suffix", ""], "--suffix '': each output would be written over its input"),
    (["a.json", "./a.json"], "./a.json: the same dump is given twice (a.json)"),
    (["a.json", "b.json", "--suffix", "/../x"], "expected a part of a file name, without '/'"),
    (["a.json", "a_s.json", "--suffix", "_s"], "a_s.json: the output for a.json would overwrite the dump a_s.json"),
    (["a", "a.json"], "a_stripped.json: the outputs for a and a.json would be the same file"),
])
def test_strip_refuses_to_overwrite_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                   says: str) -> None:
    monkeypatch.chdir(tmp_path)
    dump = (ROOT / "examples" / "templates" / "t2s-like.json").read_text()
    for name in ("a.json", "b.json", "a_s.json", "a"):
        (tmp_path / name).write_text(dump)
    r = run("template", "strip", *args)
    no_traceback(r)
    assert r.exit_code == 2 and r.output.startswith("error: ") and says in r.output and r.output.count("\n") == 1, (
        f"expected exit 2 and one error line saying {says!r}, saw {r.exit_code}: {r.output!r}")
    changed = [p.name for p in tmp_path.iterdir() if p.read_text() != dump]
    new = sorted(p.name for p in tmp_path.iterdir()) != sorted(["a.json", "b.json", "a_s.json", "a"])
    assert not changed and not new, f"expected nothing written, saw changed {changed}, files {list(tmp_path.iterdir())}"


# --- E1, E4: error lines stay short and speak JSON ---------------------------------------------------------------------


HUGE = "e" * 100_000


@pytest.mark.parametrize(("template", "says"), [
    ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
        {"register": HUGE, "bitmap": "0b1"}]}]}, "(100,002 characters) is not one of eax"),
    ({"cpuid_modifiers": [{"leaf": "0x" + "f" * 100_000, "subleaf": "0x0", "flags": 0, "modifiers": []}]},
     "(100,004 characters) does not fit 32 bits"),
    ({"msr_modifiers": [{"addr": "z" + HUGE, "bitmap": "0b1"}]}, "(100,003 characters) must start with 0x"),
    ({"kvm_capabilities": [HUGE]}, "(100,002 characters) is not a capability"),
    ({"kvm_capabilities": ["9" * 5000]}, "(5,002 characters) is not a capability"),  # int() of 4,301+ digits raises
    ({HUGE: 1}, "field 'eeee"),
    ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": True, "modifiers": []}]},
     "field cpuid_modifiers[0].flags: expected an integer from 0 to 4294967295, got true"),
    ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": None, "modifiers": []}]}, "got null"),
    ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": "1", "modifiers": []}]}, 'got "1"'),
])
def test_template_errors_are_short_and_in_json_terms(tmp_path: Path, template: dict[str, Any], says: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(template))
    r = run("template", "read", str(path))
    no_traceback(r)
    assert r.exit_code == 2 and says in r.output and len(r.output) < 400 and r.output.count("\n") == 1, (
        f"expected exit 2 and one line under 400 characters saying {says!r}, saw {r.exit_code}, "
        f"{len(r.output)} characters: {r.output[:300]!r}")


@pytest.mark.parametrize("command", [["read"], ["read", "--json"], ["apply", "--profile", "intel-spr"],
                                     ["verify", "--profile", "intel-spr"], ["strip", "good.json"],
                                     ["restore", "--profile", "intel-spr", "--to-kernel", "6.3"]])
@pytest.mark.parametrize("number", ["9" * 4301, "-" + "1" * 5000, "1" * 100 + ".5", "1" * 2000 + "e5"])
def test_a_number_too_long_is_one_line_in_every_template_command(tmp_path: Path, command: list[str],
                                                                  number: str) -> None:
    # int() of more than 4,300 digits raises in CPython 3.11: it must not reach the reader (an unknown key too).
    path = tmp_path / "t.json"
    path.write_text('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "modifiers": [], "flags": ' + number
                    + '}], "other": ' + number + "}")
    (tmp_path / "good.json").write_text("{}")
    r = run("template", command[0], str(path), *(str(tmp_path / a) if a.endswith(".json") else a for a in command[1:]))
    no_traceback(r)
    says = f"{path}:1: not valid JSON: a number of {len(number):,} characters: the limit is 80"
    assert r.exit_code == 2 and says in r.stderr and r.stderr.count("\n") == 1, (
        f"template {command}: expected exit 2 and one line saying {says!r}, saw {r.exit_code}: {r.stderr[:300]!r}")


def test_template_not_utf8_names_line_byte_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{\n  "msr_modifiers": [{"addr": "0x10a", "bitmap": "\xe9"}]}')
    r = run("template", "read", str(path))
    want = f"error: {path}:2: not UTF-8 text (byte 0xe9 at offset 51)"
    assert r.exit_code == 2 and r.output.strip() == want, f"expected {want!r}, saw {r.exit_code}: {r.output!r}"


@pytest.mark.parametrize(("args", "says"), [
    (["z" * 100_000], "(100,002 characters); expected a name such as"),
    (["ARCH_CAP", "9" * 100_000], "(100,002 characters) is a number too long to be one"),
    (["ARCH_CAP", "q" * 100_000], "(100,002 characters) is not a number"),
])
def test_decode_echoes_long_arguments_shortened(args: list[str], says: str) -> None:
    r = run("decode", *args)
    no_traceback(r)
    assert r.exit_code == 2 and says in r.output and len(r.output) < 400, (
        f"expected exit 2 and a short line saying {says!r}, saw {r.exit_code}, {len(r.output)} characters: "
        f"{r.output[:300]!r}")


# --- E5: --profile NAME where NAME is a file ---------------------------------------------------------------------------


def test_profile_word_loads_a_file_of_that_name_after_shipped_names(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`probe --save myhost` writes `myhost`; `--profile myhost` loads it (it used to say no shipped profile). A
    shipped name still means the shipped profile; ./NAME is the file."""
    monkeypatch.chdir(tmp_path)
    profile_with(tmp_path, "myhost").rename(tmp_path / "myhost")
    (tmp_path / "intel-spr").write_bytes((tmp_path / "myhost").read_bytes())
    for spec, name in (("myhost", "myhost"), ("intel-spr", "intel-spr"), ("./intel-spr", "myhost")):
        r = run("probe", "--backend", "model", "--profile", spec, "--json")
        assert r.exit_code == 0 and f"profile {name} (vmx)" in json.loads(r.output)["description"], (
            f"--profile {spec}: expected profile {name}, saw {r.exit_code}: {r.output[:300]}")
    r = run("probe", "--backend", "model", "--profile", "nope")
    assert r.exit_code == 2 and "no shipped profile named 'nope' and no file of that name" in r.output, r.output


def test_template_read_notes_modifiers_a_later_one_overrides(tmp_path: Path) -> None:
    # Firecracker takes two modifiers of one MSR or register and applies both in turn: `read` says which bits of the
    # earlier one cannot hold, before anything is applied (`apply` reports them as overridden afterwards).
    zeros, ones = "0b" + "0" * 32 + "x" * 32, "0b" + "1" * 32 + "x" * 32
    f = tmp_path / "t.json"
    f.write_text(json.dumps({
        "msr_modifiers": [{"addr": "0x8b", "bitmap": zeros}, {"addr": "0x8b", "bitmap": ones},
                          {"addr": "0x10a", "bitmap": "0b1"}],
        "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
            {"register": "eax", "bitmap": "0b1" + "x" * 31}, {"register": "ebx", "bitmap": "0b0" + "x" * 31},
            {"register": "eax", "bitmap": "0b0" + "x" * 31}]}]}))
    result = CliRunner().invoke(main, ["template", "read", str(f)])
    assert result.exit_code == 0, f"the template is valid for Firecracker; got {result.exit_code}: {result.stderr!r}"
    notes = [line for line in result.stdout.splitlines() if line.startswith("  note:")]
    assert notes == [
        "  note: msr_modifiers[1] (MSR 0x8b) overrides msr_modifiers[0] (MSR 0x8b) at bits 0xffffffff00000000: "
        "Firecracker applies both in turn, so the later one's bits win",
        "  note: cpuid_modifiers[0].modifiers[2] (CPUID 0x1.0 eax) overrides cpuid_modifiers[0].modifiers[0] (CPUID "
        "0x1.0 eax) at bits 0x80000000: Firecracker applies both in turn, so the later one's bits win",
    ], f"expected one note per overridden modifier (not for 0x10a or ebx), got {notes}"


def test_what_the_model_cannot_judge_is_said_not_a_traceback(tmp_path: Path) -> None:
    # A leaf 0xD modifier with flags 0 on the PVM model: KVM_SET_CPUID2 raises ModelLimitation.
    path = tmp_path / "d0.json"
    path.write_text('{"cpuid_modifiers": [{"leaf": "0xd", "subleaf": "0x1", "flags": 0, "modifiers": '
                    '[{"register": "eax", "bitmap": "0bx"}]}]}')
    r = run("template", "apply", str(path), "--backend", "model", "--profile", "pvm-6.18", "--vcpus", "1")
    no_traceback(r)
    assert r.exit_code == 2 and "the model cannot judge this template" in r.stderr, (
        f"expected exit 2 saying the model cannot judge it, saw {r.exit_code}: {r.stderr!r}")


@pytest.mark.parametrize(("flags", "noted"), [(0, True), (1, False)])
def test_an_indexed_leaf_without_the_significant_index_flag_is_noted(flags: int, noted: bool) -> None:
    # Firecracker copies the template's flags: leaf 7 with flags 0 is taken by KVM's lookup for every subleaf of 7.
    template = parse(json.dumps({"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": flags, "modifiers": [
        {"register": "ebx", "bitmap": "0bx"}]}]}), "f.json")
    with open_model(profile="intel-spr") as system:
        notes = apply(system, template, 1, boot=()).notes
    got = any("cpuid_modifiers[0]: leaf 0x7 has subleaves" in n and f"flags {flags}" in n for n in notes)
    assert got is noted, f"flags {flags}: expected the note {'' if noted else 'not '}to be there, saw {notes}"
