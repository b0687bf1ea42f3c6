"""Templates judged against kernels and host profiles without the host: apply on the model, the fleet baseline, strip
and fingerprint compare, and the ``kvmscope template`` / ``baseline`` / ``fingerprint`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmscope.cli import main
from kvmscope.fleet import LOW, _msr_baseline, baseline, compare, settle
from kvmscope.kernel.profile import load as load_profile
from kvmscope.model import open_model
from kvmscope.template import Bitmap, MsrModifier, Template, load, parse
from kvmscope.template_apply import apply, strip

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "templates"
FLEET = ("intel-spr", "amd-epyc", "pvm-6.18")


def summary(profile: str, kernel: str | None, name: str) -> tuple[bool, list[str], list[str]]:
    with open_model(kernel=kernel, profile=profile) as system:
        rep = apply(system, load(EXAMPLES / name), 2, boot=())
    return rep.ok, rep.failures, [d.rule for v in rep.vcpus for d in v.diffs if d.rule]


@pytest.mark.parametrize("kernel", ["6.3", "6.18"])
def test_t2s_like_is_taken_on_sapphire_rapids(kernel: str) -> None:
    ok, failures, _ = summary("intel-spr", kernel, "t2s-like.json")
    assert ok, f"intel-spr at {kernel}: expected the template taken, saw {failures}"


def test_hiding_arch_capabilities_cpuid_matters_from_6_13() -> None:
    """The differential: the same template is taken under 6.3 rules and refused under 6.18's, by the rule that rejects
    userspace ARCH_CAPABILITIES access without the CPUID bit (a5d563890b8f, 6.13)."""
    ok, failures, _ = summary("intel-spr", "6.3", "arch-cap-hidden.json")
    assert ok, f"6.3: expected taken, saw {failures}"
    ok, failures, rules = summary("intel-spr", "6.18", "arch-cap-hidden.json")
    assert not ok and failures[0].endswith("refused MSR_IA32_ARCH_CAPABILITIES (0x10a)"), failures
    assert rules and all("a5d563890b8f" in r for r in rules), f"expected the 6.13 rule named, saw {rules}"


def test_msr_rules() -> None:
    assert _msr_baseline(0x10A, "and", {"a": 0b1101, "b": 0b0111}) == (0b0101, "")
    perf = {"a": 0x24C5, "b": 0x0405}  # LBR format 5 on both; PEBS format 4 vs 4; bit 13 only on a
    assert _msr_baseline(0x345, "perf", perf) == (0x0405, ""), "formats kept where equal, other bits ANDed"
    value, _ = _msr_baseline(0x345, "perf", {"a": 0x0405, "b": 0x0305})
    assert value == 0x0005, f"PEBS formats 4 and 3 differ: expected format 0 (LBR 5 kept), saw {value:#x}"
    value, _ = _msr_baseline(0x48D, "controls", {"a": 0xFF_0000_0016, "b": 0x7F_0000_0017})
    assert value == 0x7F_0000_0017, f"allowed-0 ORed, allowed-1 ANDed: saw {value:#x}"
    value, why = _msr_baseline(0x48D, "controls", {"a": 0x01_0000_0001, "b": 0x02_0000_0002})
    assert value is None and "must be 1" in why, (value, why)
    assert _msr_baseline(0x480, "equal", {"a": 5, "b": 6})[0] is None
    value, _ = _msr_baseline(0x10A, "arch_cap", {"a": 0x8_0069, "b": 0x4000_0004})
    assert value == 0x8_0004, f"ARCH_CAPABILITIES: the AND, RSBA (2) and RRSBA (19) ORed: saw {value:#x}"
    assert _msr_baseline(0x8B, "skip", {"a": 5})[0] is None
    assert LOW == 0xFFFFFFFF


def test_fleet_baseline_taken_on_every_host_and_says_who_forces_what() -> None:
    profiles = [load_profile(n) for n in FLEET]
    raw = baseline(profiles)
    arch = next(m for m in raw.template.msr_modifiers if m.addr == 0x10A)
    # the AND, but RRSBA (bit 19: intel-spr has it) set where any host has it: a bug-present bit, as in Firecracker's T2S
    assert arch.bitmap.value == 0x400000000C080069, (
        f"ARCH_CAPABILITIES is the AND with RSBA and RRSBA ORed: saw {arch.bitmap.value:#x}")
    assert not any(f.where.startswith("MSR_IA32_ARCH_CAPABILITIES") and f.bit in (2, 19) and f.value == 0
                   for f in raw.forced), "no host forces RSBA or RRSBA off"
    assert any("different vendors" in n and "Intel: intel-spr" in n for n in raw.notes), raw.notes
    perf = [f for f in raw.forced if f.where.startswith("MSR_IA32_PERF_CAPABILITIES")]
    assert {f.bit for f in perf} == {6, 7, 10, 13} and all(f.hosts == ["amd-epyc", "pvm-6.18"] for f in perf), perf
    # Unsettled, pvm-6.18 refuses it: its KVM_SET_CPUID2 drops the ARCH_CAPABILITIES CPUID bit, and 6.18 then
    # refuses the MSR. Settling takes that out, naming the host and the rule.
    with open_model(profile="pvm-6.18") as system:
        assert not apply(system, raw.template, 1, boot=()).ok, "the raw baseline should be refused on pvm-6.18"
    settled = settle(raw, profiles)
    assert 0x10A not in [m.addr for m in settled.template.msr_modifiers]
    assert any("pvm-6.18 refuses it" in w and "a5d563890b8f" in w for w in settled.left_out), settled.left_out
    for name in FLEET:
        for kernel in (None, "6.3", "6.18"):
            with open_model(kernel=kernel, profile=name) as system:
                rep = apply(system, settled.template, 2, boot=())
            assert rep.ok, f"{name} at {kernel}: expected the baseline taken, saw {rep.failures}"


def test_strip_keeps_only_differing_bits() -> None:
    a = parse('{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1100"}, {"addr": "0xce", "bitmap": "0b1"}]}')
    b = parse('{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1010"}, {"addr": "0xce", "bitmap": "0b1"}]}')
    sa, sb = strip([a, b])
    assert [(m.addr, m.bitmap.mask, m.bitmap.value) for m in sa.msr_modifiers] == [(0x10A, 0b0110, 0b0100)]
    assert [(m.addr, m.bitmap.mask, m.bitmap.value) for m in sb.msr_modifiers] == [(0x10A, 0b0110, 0b0010)]


def test_strip_follows_firecrackers_strip_common() -> None:
    """The vectors of Firecracker's own test of ``strip_common`` (src/cpu-template-helper/src/template/strip/mod.rs):
    a key every template has keeps, in each, the bits whose filtered value differs from the first's somewhere (the
    first template's filter counts too); one a template lacks stays whole where it is."""
    def msrs(*mods: tuple[int, int, int]) -> Template:
        return Template((), (), tuple(MsrModifier(a, Bitmap(64, f, v & f)) for a, v, f in mods), "<t>")

    inputs = [
        msrs((0x0, 0xFF, 0xFF), (0x1, 0xFF, 0xFF), (0x3, 0xFF, 0xFF), (0x4, 0xFF, 0xFF), (0x5, 0xFF, 0xFF)),
        msrs((0x0, 0xFF, 0xFF), (0x2, 0xFF, 0xFF), (0x3, 0x0F, 0xFF), (0x4, 0xF0, 0xFF), (0x5, 0xC0, 0xCC)),
        msrs((0x0, 0xFF, 0xFF), (0x1, 0xFF, 0xFF), (0x3, 0xF0, 0xFF), (0x4, 0xCC, 0xFF), (0x5, 0xA0, 0xF0)),
    ]
    expected = [  # (addr, value, filter), the value within the filter
        [(0x1, 0xFF, 0xFF), (0x3, 0xFF, 0xFF), (0x4, 0x3F, 0x3F), (0x5, 0x7F, 0x7F)],
        [(0x2, 0xFF, 0xFF), (0x3, 0x0F, 0xFF), (0x4, 0x30, 0x3F), (0x5, 0x40, 0x4C)],
        [(0x1, 0xFF, 0xFF), (0x3, 0xF0, 0xFF), (0x4, 0x0C, 0x3F), (0x5, 0x20, 0x70)],
    ]
    got = [[(m.addr, m.bitmap.value, m.bitmap.mask) for m in t.msr_modifiers] for t in strip(inputs)]
    assert got == expected, f"expected {expected}, saw {got}"


def test_strip_keeps_a_leaf_only_some_dumps_have() -> None:
    a = parse('{"cpuid_modifiers": [{"leaf": "0x0", "subleaf": "0x0", "flags": 0, "modifiers": ['
              '{"register": "eax", "bitmap": "0b0"}]}, {"leaf": "0x2", "subleaf": "0x1", "flags": 1, "modifiers": ['
              '{"register": "eax", "bitmap": "0b0"}, {"register": "ebx", "bitmap": "0b0"}]}]}')
    b = parse('{"cpuid_modifiers": [{"leaf": "0x0", "subleaf": "0x0", "flags": 0, "modifiers": ['
              '{"register": "eax", "bitmap": "0b0"}]}, {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": ['
              '{"register": "eax", "bitmap": "0b0"}]}, {"leaf": "0x2", "subleaf": "0x1", "flags": 1, "modifiers": ['
              '{"register": "eax", "bitmap": "0b0"}, {"register": "ebx", "bitmap": "0b1"}]}]}')
    sa, sb = strip([a, b])
    shape = [[(m.leaf, m.subleaf, [(r.register, r.bitmap.mask, r.bitmap.value) for r in m.modifiers])
              for m in t.cpuid_modifiers] for t in (sa, sb)]
    assert shape == [[(2, 1, [("ebx", 1, 0)])], [(1, 0, [("eax", 1, 0)]), (2, 1, [("ebx", 1, 1)])]], shape


def test_fingerprint_compare() -> None:
    spr, epyc = load_profile("intel-spr"), load_profile("amd-epyc")
    assert compare(spr, spr) == []
    d = {(x.what, x.where) for x in compare(spr, epyc)}
    for want in (("vendor", "vendor module"), ("microcode", "MSR_IA32_UCODE_REV (0x8b)"),
                 ("feature_msr", "MSR_IA32_ARCH_CAPABILITIES (0x10a)"), ("feature_msr", "MSR_AMD64_DE_CFG (0xc0011029)")):
        assert want in d, f"expected {want} among the differences, saw {sorted(d)[:8]}"


# --- the commands ------------------------------------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_cli_read_reports_bad_template_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b2"}]\n}\n')
    code, out = run("template", "read", str(bad))
    flat = " ".join(out.split())  # the error console wraps long lines at its width
    assert code == 2 and flat.startswith("error: "), f"expected exit 2 and an error, saw {code}: {out!r}"
    assert f"{bad}:2: field msr_modifiers[0].bitmap: character 3 ('2')" in flat, out
    code, out = run("template", "read", str(EXAMPLES / "t2s-like.json"), "--json", "-o", str(tmp_path / "o.json"))
    assert code == 0 and json.loads(out) == json.loads((tmp_path / "o.json").read_text()), out


def test_cli_apply_compare_and_exit_codes() -> None:
    code, out = run("template", "apply", str(EXAMPLES / "arch-cap-hidden.json"), "--profile", "intel-spr",
                    "--compare", "6.3,6.18", "--no-boot-msrs", "--json")
    assert code == 1, out
    data = json.loads(out)["reports"]
    assert data["6.3"]["ok"] is True and data["6.18"]["ok"] is False, {k: v["summary"] for k, v in data.items()}
    code, out = run("template", "apply", str(EXAMPLES / "t2s-like.json"), "--profile", "intel-spr", "--kernel", "6.3",
                    "--no-boot-msrs")
    assert code == 0 and "OK: taken" in out, out
    code, out = run("template", "apply", str(EXAMPLES / "t2s-like.json"), "--backend", "linux", "--kernel", "6.3")
    assert code == 2 and "choose the model" in out, out


def test_cli_baseline_then_apply_on_each(tmp_path: Path) -> None:
    out_file = tmp_path / "fleet.json"
    code, out = run("baseline", *FLEET, "-o", str(out_file))
    assert code == 0 and "forced to 0 by" in out and "left out" in out, out
    for name in FLEET:
        code, out = run("template", "apply", str(out_file), "--profile", name)
        assert code == 0, f"{name}: {out}"


def test_verify_reports_the_whole_register_as_the_template_leaves_it(tmp_path: Path) -> None:
    # "wanted" means one thing in apply and verify: the fixed bits over the register's other bits.
    from kvmscope.template_apply import verify

    t = Template(msr_modifiers=(MsrModifier(0x10a, Bitmap(64, 0xF0, 0x50)), MsrModifier(0x1234, Bitmap.exact(64, 1))))
    changed, missing = verify(t, [], {0x10a: 0x173})
    assert (changed.kind, changed.wanted, changed.got, changed.bits) == ("changed", 0x153, 0x173, [5]), changed
    assert (missing.kind, missing.got) == ("missing", None), missing
    dump = tmp_path / "spr.json"
    assert run("template", "dump", "--profile", "intel-spr", "-o", str(dump))[0] == 0
    data = json.loads(dump.read_text())
    data["msr_modifiers"] = [m for m in data["msr_modifiers"] if int(m["addr"], 16) != 0x10a]
    dump.write_text(json.dumps(data))
    code, out = run("template", "verify", str(EXAMPLES / "t2s-like.json"), "--state", str(dump))
    wanted = [line for line in out.splitlines() if "MSR_IA32_ARCH_CAPABILITIES" in line]
    assert code == 1 and wanted == ["  MISMATCH MSR_IA32_ARCH_CAPABILITIES (0x10a): not in the state"], out


def test_cli_dump_strip_verify_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run("template", "dump", "--profile", "pvm-6.18", "-o", str(a))[0] == 0
    assert run("template", "dump", "--profile", "intel-spr", "-o", str(b))[0] == 0
    code, out = run("template", "strip", str(a), str(b))
    assert code == 0 and (tmp_path / "a_stripped.json").is_file(), out
    code, out = run("template", "verify", str(a), "--state", str(a))
    assert code == 0 and out.startswith("OK"), out
    code, out = run("template", "verify", str(b), "--state", str(a))
    assert code == 1 and "MISMATCH" in out, out
    code, out = run("fingerprint", "compare", "intel-spr", "amd-epyc")
    assert code == 1 and "vendor module: vmx vs svm" in out, out
    assert run("fingerprint", "compare", "pvm-6.18", "pvm-6.18")[0] == 0


def test_docs_commands_run_with_the_exit_codes_they_show(live: object, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``kvmscope ...  # exit N`` line of docs/templates.md, run in order from a fresh folder holding examples/."""
    import re
    import shlex

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "templates.md").read_text()
    # A documented command: `kvmscope ARGS   # comment   # exit N` (the first "  #" ends the arguments).
    lines = [(m.group(1).split("  #")[0].strip(), m.group(2)) for m in re.finditer(r"^kvmscope (.*# exit (\d))$",
                                                                                   text, re.M)]
    assert len(lines) == 16, f"expected the 16 documented commands, found {lines}"
    for command, code in lines:
        got, out = run(*shlex.split(command))
        assert got == int(code), f"`kvmscope {command}`: documented exit {code}, got {got}: {out[-400:]}"


def test_live_refusals_carry_the_rule_of_the_model_alongside(live: object) -> None:
    code, out = run("template", "apply", str(EXAMPLES / "t2s-like.json"), "--backend", "linux", "--json")
    assert code == 1, out
    data = json.loads(out)
    refused = [d for v in data["vcpus"] for d in v["diffs"] if d["kind"] == "refused"]
    arch = [d for d in refused if d["where"] == "MSR_IA32_ARCH_CAPABILITIES (0x10a)"]
    assert len(arch) == 2 and all("a5d563890b8f" in (d["rule"] or "") for d in arch), refused
    assert not [n for n in data["notes"] if "predicted" in n], f"the model of this host agrees: {data['notes']}"


def test_applied_after_the_first_run_is_refused_from_6_4() -> None:
    """A VMM that writes a template's MSRs to vCPUs that have run: 6.3 takes it, 6.4+ freezes the feature MSRs
    (0094f62c7eaa) and refuses a changed value."""
    t = load(EXAMPLES / "t2s-like.json")
    for kernel, taken in (("6.3", True), ("6.18", False)):
        with open_model(kernel=kernel, profile="intel-spr") as system:
            rep = apply(system, t, 2, boot=(), after_run=True)
        assert rep.ok is taken, f"{kernel}: expected taken={taken}, saw {rep.failures}"
        rules = {d.rule for v in rep.vcpus for d in v.diffs}
        assert taken or (len(rules) == 1 and "0094f62c7eaa" in rules.pop()), rules


def test_restore_on_another_host_meets_its_rules() -> None:
    """A Sapphire Rapids snapshot with T2S-like ARCH_CAPABILITIES restored on the PVM host: Firecracker would stop at
    FEAT_CTL (not an MSR PVM knows), and ARCH_CAPABILITIES is refused by the 6.13 rule once PVM's KVM_SET_CPUID2 drops
    the CPUID bit; restored on Sapphire Rapids under 6.3 it is taken."""
    from kvmscope.template_restore import restore

    t = load(EXAMPLES / "t2s-like.json")
    with open_model(profile="intel-spr") as a, open_model(profile="pvm-6.18") as b:
        rep = restore(a, b, t, 1, boot=())
    assert rep.failures == ["restore: KVM_SET_MSRS on vCPU 0 returned 10 of 32: refused MSR_IA32_FEAT_CTL (0x3a)"], \
        rep.failures
    refused = {d.where: d.rule for d in rep.vcpus[0].diffs if d.kind == "refused"}
    assert set(refused) == {"MSR_IA32_FEAT_CTL (0x3a)", "MSR_IA32_SMBASE (0x9e)",
                            "MSR_IA32_ARCH_CAPABILITIES (0x10a)"}, refused
    assert "a5d563890b8f" in refused["MSR_IA32_ARCH_CAPABILITIES (0x10a)"], refused
    assert "Intel" in rep.cannot_move and "AMD" in rep.cannot_move, f"this PVM host is AMD: {rep.cannot_move!r}"
    with open_model(profile="intel-spr") as a, open_model(profile="intel-spr", kernel="6.3") as b:
        rep = restore(a, b, t, 2, boot=())
    assert rep.ok and not rep.cannot_move, f"expected the restore taken, saw {rep.failures} {rep.cannot_move!r}"


def test_a_snapshot_cannot_move_between_cpu_vendors_whatever_kvm_takes() -> None:
    # AMD to Intel: KVM_SET_CPUID2 and KVM_SET_MSRS take the snapshot (Firecracker would restore it), but the guest
    # chose vendor-specific code at boot: not taken, and said so apart from Firecracker's own failures
    from kvmscope.template_restore import restore

    with open_model(profile="amd-epyc") as a, open_model(profile="intel-spr") as b:
        rep = restore(a, b, load(EXAMPLES / "t2s-like.json"), 1, boot=())
    assert rep.failures == [], f"KVM takes the AMD snapshot on the Intel host: {rep.failures}"
    assert not rep.ok and "AMD" in rep.cannot_move and "Intel" in rep.cannot_move, rep.cannot_move
    assert rep.summary().startswith("the guest cannot move: the source host's CPUs are AMD"), rep.summary()
    assert rep.to_json()["cannot_move"] == rep.cannot_move
    from dataclasses import replace

    spr = load_profile("intel-spr")
    no_leaf0 = replace(spr, supported_cpuid=[e for e in spr.supported_cpuid if e.function != 0])
    with open_model(profile="intel-spr") as a, open_model(profile=no_leaf0) as b:
        rep = restore(a, b, load(EXAMPLES / "t2s-like.json"), 1, boot=())
    assert not rep.cannot_move and any("the CPU vendor of the target is not known" in n for n in rep.notes), (
        f"a vendor unknown on one side is a note, not a verdict: {rep.cannot_move!r} {rep.notes}")
    assert not [d for d in compare(spr, no_leaf0) if d.where == "CPU vendor"], "fingerprint compare does not judge it"
    notes = baseline([spr, no_leaf0]).notes
    assert any("is not known" in n for n in notes) and not any("different vendors" in n for n in notes), notes


def test_restore_reports_template_bits_the_source_did_not_hold(tmp_path: Path) -> None:
    """Firecracker's boot MSRs overwrite MISC_ENABLE on the source: a template fixing bit 22 there never reaches the
    snapshot, so the restore is not taken even though the target takes every saved value."""
    from kvmscope.template_restore import restore

    t = parse(json.dumps({"msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b" + "x" * 41 + "1" + "x" * 22}]}), "t.json")
    with open_model(profile="intel-spr") as a, open_model(profile="intel-spr") as b:
        rep = restore(a, b, t, 1)
    assert not any(v.diffs for v in rep.vcpus), f"expected the target to take the snapshot, saw {rep.vcpus}"
    lost = [(d.where, d.kind, d.bits) for v in rep.source_vcpus or () for d in v.diffs]
    assert lost == [("MSR_IA32_MISC_ENABLE (0x1a0) (msr_modifiers[0])", "overridden", [22])], lost
    assert not rep.ok and rep.summary() == ("Firecracker would restore; on the source 1 register(s) or MSR(s) did "
                                            "not hold the template"), rep.summary()
    assert rep.to_json()["source_vcpus"][0]["diffs"][0]["kind"] == "overridden", rep.to_json()


def test_restore_fails_where_the_source_run_does_not_reach_the_port_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmscope import template_restore
    from kvmscope.api import ShutdownExit

    monkeypatch.setattr(template_restore, "run_once", lambda vm, vcpu, irqchip: ShutdownExit())
    with open_model(profile="intel-spr") as a, open_model(profile="intel-spr") as b:
        rep = template_restore.restore(a, b, load(EXAMPLES / "t2s-like.json"), 1, boot=())
    assert rep.failures[:1] == ["on the source: vCPU 0's first run ended with ShutdownExit(), not at the boot code's "
                                "port write: the VM stops there, before any snapshot"], rep.failures


def test_restore_on_an_older_kernel_names_the_cpuid_it_does_not_offer() -> None:
    """A 6.18 snapshot restored under 5.10: KVM_SET_CPUID2 takes its CPUID, but 5.10's KVM_GET_SUPPORTED_CPUID has no
    7.2, no CET (7.0 EDX[20], 0xD.11/12) and no XFD (0xD.1 EAX[4]): noted with the rules that bring them; the same
    kernel on both sides has nothing to note."""
    from kvmscope.template_restore import restore

    t = load(EXAMPLES / "t2s-like.json")
    with open_model(profile="intel-spr") as a, open_model(profile="intel-spr", kernel="5.10") as b:
        rep = restore(a, b, t, 1, boot=())
    text = "\n".join(rep.notes)
    for want in ("the snapshot has CPUID 0x7.2, which the target's KVM_GET_SUPPORTED_CPUID does not list "
                 "(cpuid_7_2_edx, since 6.8)", "CPUID 0x7.0 edx sets bit(s) 20, 22, 24, 25, 28,",
                 "CPUID 0xd.1 eax sets bit(s) 4,", "xfd_msrs (since 5.17)", "the snapshot has CPUID 0xd.11"):
        assert want in text, f"expected {want!r} among the notes:\n{text}"
    assert "CPUID 0x1.0" not in text and "0x7.1" not in text, (
        f"TSC_DEADLINE, HYPERVISOR, AVX_VNNI and fast REP strings work on 5.10 too (only advertised later):\n{text}")
    assert rep.ok, f"KVM_SET_CPUID2 takes them: the restore itself is taken, saw {rep.failures}"
    assert rep.unbacked == len([n for n in rep.notes if n.startswith("restore: the snapshot")]) > 0, rep.unbacked
    assert f"CPUID features in {rep.unbacked} register(s) or leaves that the target's KVM does not offer" in \
        rep.summary(), f"the verdict line says so: {rep.summary()}"
    with open_model(profile="intel-spr") as a, open_model(profile="intel-spr") as b:
        same = restore(a, b, t, 1, boot=())
    assert not [n for n in same.notes if n.startswith("restore:")], same.notes
    assert same.unbacked == 0 and same.summary() == "taken: every fixed bit holds on every vCPU", same.summary()


def test_cli_restore_defaults_to_the_source_host() -> None:
    code, out = run("template", "restore", str(EXAMPLES / "t2s-like.json"), "--profile", "intel-spr",
                    "--to-kernel", "6.3", "--json")
    data = json.loads(out)
    assert code == 0 and "profile intel-spr" in data["description"].split("->")[1], out
    code, out = run("template", "restore", str(EXAMPLES / "t2s-like.json"), "--profile", "intel-spr",
                    "--to-profile", "pvm-6.18")
    assert code == 1 and "refused MSR_IA32_FEAT_CTL (0x3a)" in out, out


def test_the_apic_id_of_the_cpu_a_capture_ran_on_is_not_a_host_difference() -> None:
    """KVM_GET_SUPPORTED_CPUID reports the calling CPU's APIC IDs (leaf 1 EBX[31:24], 0xB/0x1F EDX): two captures of
    one host on two CPUs differ there, and a VMM sets those fields per vCPU anyway."""
    from dataclasses import replace

    spr = load_profile("intel-spr")
    moved = replace(spr, supported_cpuid=[
        replace(e, ebx=e.ebx ^ 0x03000000) if e.function == 1 else replace(e, edx=e.edx ^ 1) if e.function == 0xB else e
        for e in spr.supported_cpuid])
    assert compare(spr, moved) == [], f"expected no difference, saw {compare(spr, moved)}"
    from kvmscope.model import open_model
    from kvmscope.template_apply import dump

    with open_model(profile="intel-spr") as kvm:
        leaves = {(m.leaf, m.subleaf): {r.register: r.bitmap for r in m.modifiers} for m in dump(kvm).template.cpuid_modifiers}
    assert leaves[(1, 0)]["ebx"].mask == 0x00FFFFFF, f"leaf 1 EBX fixed bits {leaves[(1, 0)]['ebx'].mask:#x}"
    assert all("edx" not in regs for (leaf, _), regs in leaves.items() if leaf in (0xB, 0x1F)), "0xB/0x1F EDX unfixed"


def test_apply_counts_each_refused_bit_once_however_many_vcpus() -> None:
    """arch-cap-hidden.json refuses 6 ARCH_CAPABILITIES bits on Sapphire Rapids under 6.18: on 2 vCPUs still 6 bits."""
    t = load(EXAMPLES / "arch-cap-hidden.json")
    with open_model(kernel="6.18", profile="intel-spr") as system:
        one, two = apply(system, t, 1, boot=()), apply(system, t, 2, boot=())
    assert "; 6 bit(s) refused or changed" in one.summary() and "(on" not in one.summary(), one.summary()
    assert "; 6 bit(s) refused or changed (on 2 vCPUs)" in two.summary(), two.summary()


def test_baseline_under_a_kernel_starts_from_what_that_kernel_reports() -> None:
    """Two Sapphire Rapids hosts under 6.12: the baseline's TRUE_EXIT_CTLS is 6.12's (no LOAD_CET_STATE, 6.18) and is
    kept, where one made from the 6.18 values would be refused on 6.12 and left out whole."""
    from dataclasses import replace

    from kvmscope.fleet import under

    spr = load_profile("intel-spr")
    hosts = [spr, replace(spr, name="spr-2")]
    result = settle(baseline(under(hosts, "6.12")), hosts, "6.12")
    exit_ctls = next(m for m in result.template.msr_modifiers if m.addr == 0x48F)
    assert not exit_ctls.bitmap.value >> 60 & 1, f"TRUE_EXIT_CTLS {exit_ctls.bitmap.value:#x} under 6.12"
    assert not any("0x48f" in line.lower() for line in result.left_out), result.left_out


def test_a_host_is_taken_as_captured_unless_asked_under_a_kernel(tmp_path: Path) -> None:
    """A capture is what its host reported: from a distribution's kernel (RHEL's 5.14.0-427) it holds backports that
    mainline 5.14 lacks, so baseline and fingerprint compare take it as it is, not as the model's 5.14 would. Asked
    under a kernel (HOST@VERSION), a host is what that kernel's KVM reports on it: no GDS_NO/RFDS_NO/ITS_NO or CET
    on 5.10."""
    from dataclasses import replace

    from kvmscope.fleet import host, under

    spr = load_profile("intel-spr")
    rhel = replace(spr, name="spr-rhel", kernel_release="5.14.0-427.13.1.el9_4.x86_64", ruleset="5.14", history=[])
    diffs = compare(*under([rhel, spr], None))
    assert [d.what for d in diffs] == ["kernel"], f"the same data differs only in its kernel: {diffs}"
    (tmp_path / "rhel.json").write_text(json.dumps(rhel.to_json()))
    res = CliRunner().invoke(main, ["fingerprint", "compare", str(tmp_path / "rhel.json"), "intel-spr"])
    assert res.exit_code == 1 and "MSR_IA32_ARCH_CAPABILITIES" not in res.output, res.output
    # the baseline of the same data twice is that data: judged as captured, nothing is refused
    alone = settle(baseline([spr]), [spr])
    both = settle(baseline(under([rhel, spr], None)), [rhel, spr])
    assert [(m.addr, m.bitmap) for m in both.template.msr_modifiers] == [
        (m.addr, m.bitmap) for m in alone.template.msr_modifiers], f"left out: {both.left_out}"
    old, version = host("intel-spr@5.10")
    result = settle(baseline(under([old, spr], None, [version, None])), [old, spr])
    arch = next(m for m in result.template.msr_modifiers if m.addr == 0x10A).bitmap.value
    assert not arch & (1 << 26 | 1 << 27 | 1 << 62), f"ARCH_CAPABILITIES {arch:#x}: 5.10 has no GDS_NO/RFDS_NO/ITS_NO"
    leaf7 = next(m for m in result.template.cpuid_modifiers if (m.leaf, m.subleaf) == (7, 0))
    ecx = next(r for r in leaf7.modifiers if r.register == "ecx").bitmap
    assert ecx.mask >> 7 & 1 and not ecx.value >> 7 & 1, "CPUID 7.0 ECX[7] (CET_SS, 6.18) fixed to 0"
    res = CliRunner().invoke(main, ["fingerprint", "compare", "intel-spr@5.10", "intel-spr"])
    assert res.exit_code == 1 and "MSR_IA32_ARCH_CAPABILITIES" in res.output, res.output
    res = CliRunner().invoke(main, ["fingerprint", "compare", "intel-spr@6.18", "intel-spr"])
    assert res.exit_code == 0, f"the same host under its own kernel: {res.output}"
    res = CliRunner().invoke(main, ["fingerprint", "compare", "intel-spr@7.5", "intel-spr", "--json"])
    assert "newer than the newest" in json.loads(res.output)["notes"][0], res.output[:300]


def test_a_file_named_with_an_at_is_itself(tmp_path: Path) -> None:
    from kvmscope.fleet import host

    path = tmp_path / "spr@6.12.118-fc.json"
    path.write_text(json.dumps(load_profile("intel-spr").to_json()))
    p, version = host(str(path))
    assert (p.name, version) == ("intel-spr", None), "an existing file is read as it is"


def test_profile_names_print_on_one_short_line(tmp_path: Path) -> None:
    # A name is user text: a 5,000-character one is shortened as the other readers do; an empty one, or one that is
    # not one printable line, is refused where the profile is read.
    data = json.loads((ROOT / "src/kvmscope/profiles/intel-spr.json").read_text())
    data["name"] = "x" * 5000
    (tmp_path / "p.json").write_text(json.dumps(data))
    code, out = run("fingerprint", "compare", str(tmp_path / "p.json"), "amd-epyc")
    first = out.splitlines()[0]
    assert code == 1 and first.endswith("(5000 characters) vs amd-epyc") and len(first) < 200, f"saw {first[:300]!r}"
    for name in ("", " ", "a\nb", "a\x1b[31mb"):
        data["name"] = name
        (tmp_path / "p.json").write_text(json.dumps(data))
        code, out = run("template", "apply", str(ROOT / "examples/templates/t2s-like.json"), "--profile",
                        str(tmp_path / "p.json"))
        assert code == 2 and "field name: expected a printable name on one line" in out, f"{name!r}: saw {out!r}"


def test_template_commands_note_a_kernel_newer_than_the_rules() -> None:
    # as probe, check and baseline do: a verdict for 7.3 is the newest ruleset's, and says so
    t = str(EXAMPLES / "t2s-like.json")
    for args in (["template", "apply", t, "--profile", "intel-spr", "--kernel", "7.3"],
                 ["template", "restore", t, "--profile", "intel-spr", "--to-kernel", "7.3"]):
        res = CliRunner().invoke(main, [*args, "--json"])
        notes = json.loads(res.output)["notes"]
        assert notes and "kernel 7.3 is newer than the newest mainline release" in notes[0], (args, res.output[:400])


def test_a_host_at_a_kernel_is_that_host_under_that_kernel(tmp_path: Path) -> None:
    """HOST@VERSION: a fleet on several kernels in one command. Sapphire Rapids on 6.1.192 has no PEBS (0x2000) and no
    DS/DTES64, on 6.12.118 it has (0x24c0): fingerprint compare names them, and the baseline of both keeps 0x2000."""
    from kvmscope.fleet import host

    (old, _), (new, _) = host("intel-spr@6.1.192"), host("intel-spr@6.12.118")
    assert (old.name, old.ruleset, old.kernel_release) == ("intel-spr@6.1.192", "6.1.192", "6.1.192"), old.name
    assert new.feature_msrs == load_profile("intel-spr").feature_msrs, "@VERSION keeps the captured values"
    res = CliRunner().invoke(main, ["fingerprint", "compare", "intel-spr@6.1.192", "intel-spr@6.12.118", "--json"])
    diffs = {d["where"]: (d["a"], d["b"]) for d in json.loads(res.output)["differences"]}
    assert res.exit_code == 1 and diffs.get("MSR_IA32_PERF_CAPABILITIES (0x345)") == ("0x2000", "0x24c0"), diffs
    assert "CPUID 0x1.0 edx" in diffs, f"DS (1.0 EDX[21]) differs: {sorted(diffs)}"
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["baseline", "intel-spr@6.1.192", "intel-spr@6.12.118", "-o", str(out)])
    assert res.exit_code == 0, res.output
    perf = next(m for m in load(out).msr_modifiers if m.addr == 0x345)
    assert perf.bitmap.value == 0x2000, f"the baseline's PERF_CAPABILITIES {perf.bitmap.value:#x}: what 6.1.192 has"
    res = CliRunner().invoke(main, ["baseline", "intel-spr@6.1.192", "intel-spr", "--json"])
    assert json.loads(res.output)["rulesets"] == {"intel-spr@6.1.192": "6.1.153", "intel-spr": "6.18 (as captured)"}, \
        res.output[:300]
    for args, error in ((["baseline", "intel-spr@6.1", "amd-epyc", "--kernel", "6.12"], "--kernel judges every host"),
                        (["baseline", "intel-spr@4.19", "amd-epyc"], "'intel-spr@4.19': kernel '4.19' is older"),
                        (["baseline", "@6.1", "amd-epyc"], "expected HOST@VERSION"),
                        (["fingerprint", "compare", "nosuch@6.1", "amd-epyc"], "no shipped profile named 'nosuch'")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and error in res.output, (args, res.exit_code, res.output)
