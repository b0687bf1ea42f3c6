"""What a user sees: the probe, the reports and the names, rendered at 80 and 160 columns, on a terminal and off one,
asserted on the text (issue 14), and user text that looks like rich markup (issue 13)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmscope import msrs as M
from kvmscope import render
from kvmscope.cli import main
from kvmscope.kernel.rulesets import KNOWN
from kvmscope.linux import LinuxSystem

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
KVMSCOPE = Path(sys.executable).with_name("kvmscope")


def cli(args: list[str], columns: int | None = None, terminal: bool = False,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str]:
    """Run the CLI as a user would (stdout and stderr together), ANSI styling stripped."""
    env = {"COLUMNS": str(columns) if columns else None}
    if monkeypatch is not None:
        monkeypatch.setattr(render, "_terminal", lambda: terminal)
    result = CliRunner().invoke(main, args, env=env)
    out = ANSI.sub("", result.output)
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit), (
        f"kvmscope {' '.join(args)} crashed: {result.exception!r}\n{out}")
    return result.exit_code, out


def whole(token: str, text: str) -> bool:
    """``token`` appears in ``text`` unbroken (not split over two lines, not part of a longer word)."""
    return re.search(rf"(?<![0-9A-Za-z_]){re.escape(token)}(?![0-9A-Za-z_])", text) is not None


def probe_tokens(report: dict[str, object]) -> set[str]:
    """Every hex value and MSR name a probe report shows."""
    tokens = set()
    for m in report["msrs"]:  # type: ignore[attr-defined]
        tokens.add(m["name"])
        for k in ("index", "value", "vcpu_default", "after_run_readback"):
            if m[k] is not None:
                tokens.add(m[k])
        tokens.add(m["changed_value"] or m["tried"])  # the value taken, else the first value refused
    return tokens


def assert_fits(out: str, width: int, tokens: set[str], what: str) -> None:
    long = [ln for ln in out.splitlines() if len(ln.rstrip()) > width]
    assert not long, f"{what}: expected every line within {width} columns, saw {len(long)} longer: {long[:3]}"
    split = sorted(t for t in tokens if not whole(t, out))
    assert not split, f"{what}: expected every hex value and MSR name whole, saw these split or missing: {split}"


def explained(m: dict[str, str], out: str) -> bool:
    """The row of ``m`` says why: in its stacked block (``why: ...``) or in a note under the table."""
    flat = " ".join(out.split())
    head = f"{m['index']} {m['name']}: "
    stacked = flat.find(f"{head}{m['verdict']}")
    return f"{head}{m['why']}" in flat or (stacked >= 0 and flat.find(f"why: {m['why']}", stacked) > stacked)


PROFILES = sorted(p.stem for p in (ROOT / "src/kvmscope/profiles").glob("*.json"))
COMBOS = [(p, k) for p in PROFILES for k in KNOWN]


@pytest.mark.parametrize(("profile", "kernel"), COMBOS, ids=[f"{p}-{k}" for p, k in COMBOS])
def test_probe_every_profile_and_ruleset_fits_80_and_160(profile: str, kernel: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["probe", "--backend", "model", "--profile", profile, "--kernel", kernel]
    code, out = cli([*args, "--json"])
    assert code == 0, out
    report = json.loads(out)
    tokens = probe_tokens(report)
    for width, terminal in ((80, False), (80, True), (160, False), (160, True)):
        code, out = cli(args, width, terminal, monkeypatch)
        what = f"probe {profile} {kernel} at {width} columns{' on a terminal' if terminal else ''}"
        assert code == 0, out
        assert_fits(out, width, tokens, what)
        assert f"model backend: kernel {kernel} rules, profile {profile}" in out, f"{what}: header:\n{out[:400]}"
        assert f"profile {profile} captured from kernel" in out, f"{what}: the profile's kernel is named as its own"
        assert "Conclusion: " in out and "cannot tell" not in out, f"{what}: expected a verdict, saw:\n{out[-600:]}"
        for m in report["msrs"]:
            assert m["verdict"] in out or render.SHORT_VERDICT.get(m["verdict"], "\0") in out, (
                f"{what}: {m['name']} has no verdict in the text")
            if m["verdict"] == "refused even before a run (not settable here)":
                assert m["why"] and explained(m, out), f"{what}: the not-settable row {m['name']} should say why:\n{out}"


def test_probe_live_kernel_at_80_and_160(live: LinuxSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = cli(["probe", "--backend", "linux", "--json"])
    assert code == 0, out
    report = json.loads(out)
    assert report["schema_version"] == 1, f"probe --json carries schema_version 1, saw {report.get('schema_version')}"
    tokens = probe_tokens(report)
    for width, terminal in ((80, False), (80, True), (160, False), (160, True)):
        code, out = cli(["probe", "--backend", "linux"], width, terminal, monkeypatch)
        what = f"live probe at {width} columns{' on a terminal' if terminal else ''}"
        assert code == 0, out
        assert_fits(out, width, tokens, what)
        flat = " ".join(out.split())
        for text in (
            "LIVE KERNEL", "vendor module kvm_pvm",
            # UCODE_REV as an AMD patch level (this host is AMD), not "(none set)".
            "MSR_IA32_UCODE_REV", "PATCH_LEVEL=0x1000065",
            # the quirks mask by name
            "quirks KVM can disable (0x5ff): LINT0_REENABLED", "STUFF_FEATURE_MSRS",
            # the refused-before-a-run rows: the value tried, and why
            "0x400000000c000069",
            "the vCPU's CPUID (KVM_GET_CPUID2) lacks 7.0:EDX[29] (ARCH_CAPABILITIES), so KVM takes only 0",
            "the vCPU's CPUID (KVM_GET_CPUID2) lacks 1.0:ECX[15] (PDCM), so KVM takes only 0",
            "Conclusion: this kernel enforces the freeze",
        ):
            assert text in flat, f"{what}: expected {text!r} in:\n{out}"
        for m in report["msrs"]:
            assert not m["why"] or explained(m, out), f"{what}: {m['name']} should say why ({m['why']}):\n{out}"
        assert "(none set)" not in out and "True" not in out and "False" not in out, f"{what}:\n{out}"
    arch = next(m for m in report["msrs"] if m["index"] == "0x10a")
    assert arch["tried"] == arch["value"] and arch["tried_count"] > 1, f"ARCH_CAP tried the feature value first: {arch}"


def test_width_off_a_terminal_follows_columns_or_defaults_to_80(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    args = ["probe", "--backend", "model", "--profile", "intel-spr"]
    _, narrow = cli(args, None, False, monkeypatch)
    assert max(map(len, narrow.splitlines())) <= 80, "without COLUMNS the output is 80 columns wide"
    assert "┃" not in narrow.split("Feature MSRs")[1], "at 80 columns the feature MSRs are stacked, not a table"
    _, wide = cli(args, 160, False, monkeypatch)
    assert "┃ decoded" in wide and max(map(len, wide.splitlines())) > 80, "COLUMNS=160 gives the tables"


def _pty_run(args: list[str], columns: int) -> str:
    """Run the installed ``kvmscope`` on a real pseudo-terminal ``columns`` wide; its screen output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([str(KVMSCOPE), *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@pytest.mark.skipif(not KVMSCOPE.exists(), reason="the kvmscope script is installed with the package")
def test_probe_on_a_real_80_column_terminal() -> None:
    out = _pty_run(["probe", "--backend", "model", "--profile", "intel-spr", "--kernel", "6.13"], 80)
    report = json.loads(subprocess.run([str(KVMSCOPE), "probe", "--backend", "model", "--profile", "intel-spr",
                                        "--kernel", "6.13", "--json"], capture_output=True, text=True).stdout)
    assert_fits(out, 80, probe_tokens(report), "probe on an 80-column pty")
    assert "0x10a MSR_IA32_ARCH_CAPABILITIES = 0xc08e0eb" in out, out  # 6.13: no ITS_NO yet (6.15)


def test_diff_carets_sit_under_the_differing_digits() -> None:
    for path, kernel in ((EXAMPLES / "sandbox-reset-snapshot-intel.yaml", "6.18"),
                         (EXAMPLES / "platform-info-after-run.yaml", "6.18"),
                         (EXAMPLES / "sandbox-reset-snapshot-intel.yaml", "6.3")):
        _, out = cli(["check", str(path), "--kernel", kernel])
        lines = out.splitlines()
        olds = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("old 0x")]
        assert olds, f"{path.name} on {kernel}: expected an old/new pair in:\n{out}"
        for i in olds:
            old, new, marks = lines[i], lines[i + 1], lines[i + 2].split("  bits differing")[0]
            assert old.index("0x") == new.index("0x"), f"old and new values line up:\n{old}\n{new}"
            start = old.index("0x") + 2
            for col in range(start, start + 16):
                differs = old[col] != new[col]
                marked = col < len(marks) and marks[col] == "^"
                assert differs == marked, (f"column {col}: digit {old[col]} vs {new[col]} expected "
                                           f"{'a' if differs else 'no'} caret, saw {marks[col:col + 1]!r}:\n"
                                           f"{old}\n{new}\n{marks}")
            assert "^" not in marks[:start], f"no caret under the 0x prefix:\n{old}\n{marks}"


def test_diff_marks_unit() -> None:
    assert render.diff_marks(0x400000000C08E0EB, 0) == "  ^        ^ ^^ ^^", repr(render.diff_marks(0x400000000C08E0EB, 0))


def test_compare_names_every_kernel_and_its_exit_code_is_documented() -> None:
    code, out = cli(["check", str(EXAMPLES / "sandbox-reset-snapshot.yaml"), "--compare", "all"])
    assert code == 1, f"the expectation (refused) fails before 6.13: exit 1, saw {code}"
    flat = " ".join(out.split())
    # the runs of kernels as "FIRST to LAST (N kernels)" (80 names would fill the line twice; --json lists each)
    before = [v for v in KNOWN if tuple(map(int, v.split("."))) < (6, 13)]
    after = [v for v in KNOWN if tuple(map(int, v.split("."))) >= (6, 13)]
    span = {k: f"{k[0]} to {k[-1]} ({len(k)} kernels)" for k in (tuple(before), tuple(after), tuple(KNOWN))}
    expected = (f"accepted on {span[tuple(before)]}; refused at MSR_PLATFORM_INFO on {span[tuple(after)]} by "
                "bc2ca3680b30 (since 6.13:")
    assert expected in flat, f"expected {expected!r} in:\n{out}"
    assert f"FAILED: a step did not do what it expected on {span[tuple(before)]}" in flat, out
    assert f"on kernels {span[tuple(KNOWN)]}" in flat, out
    code, out = cli(["check", str(EXAMPLES / "sandbox-reset-snapshot.yaml"), "--compare", "all", "--json"])
    assert list(json.loads(out)["kernels"]) == KNOWN, "the JSON names every kernel"
    code, out = cli(["check", str(EXAMPLES / "platform-info-after-run.yaml"), "--compare", "6.13,6.18"])
    assert code == 0 and "no step changes outcome" in out and "OK: every step" in out, out
    _, help_text = cli(["check", "--help"])
    assert "with --compare: on every kernel compared" in help_text and "1 not (with --compare" in help_text, help_text


def _scenario(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("scenario: 1\n" + body)
    return path


def test_expected_refusal_that_was_accepted_keeps_the_evidence(tmp_path: Path) -> None:
    code, out = cli(["check", str(EXAMPLES / "sandbox-reset-snapshot-intel.yaml"), "--kernel", "6.3"])
    assert code == 1, out
    for text in ("MSR_IA32_ARCH_CAPABILITIES (0x10a) was accepted", "old 0x000000000008e0eb",  # 6.3: no *_NO yet
                 "new 0x0000000000000000", "bits differing: 0, 1, 3", "NOT met"):
        assert text in out, f"expected {text!r} in:\n{out}"
    same = _scenario(tmp_path, "same.yaml", """name: same value after run
steps:
  - create_vcpu: 0
  - run: 0
  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0x80000000}}
    expect: {refused: PLATFORM_INFO}
""")
    code, out = cli(["check", str(same)])
    assert code == 1, out
    assert "MSR_PLATFORM_INFO (0xce) was accepted" in out and "(same value)" in out, out
    assert "old 0x0000000080000000" in out and "new 0x0000000080000000" in out, out


def test_refused_set_cpuid_names_leaf_subleaf_and_register(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "cpuid.yaml", """name: cpuid edited after run
steps:
  - create_vcpu: 0
  - set_cpuid: {vcpu: 0, from: supported}
  - run: 0
  - set_cpuid: {vcpu: 0, from: stored, edits: [{leaf: "0xd.0", register: eax, set_bits: [9]}]}
    expect: refused
""")
    code, out = cli(["check", str(path)])
    assert code == 0, out
    assert "KVM_SET_CPUID2 failed: EINVAL" in out, out
    assert "CPUID leaf 0xd.0 EAX differs: given 0x000002e7, the vCPU has 0x000000e7 (bits 9)" in out, out


# --- names ------------------------------------------------------------------------------------------------------------

SPELLINGS = {
    0x10A: ["MSR_IA32_ARCH_CAPABILITIES", "IA32_ARCH_CAPABILITIES", "ARCH_CAPABILITIES", "ARCH_CAP", "arch_cap",
            "msr_ia32_arch_capabilities", "0x10a", "0X10A", "266"],
    0x345: ["MSR_IA32_PERF_CAPABILITIES", "PERF_CAPABILITIES", "perf_capabilities", "PERF_CAP", "0x345"],
    0xCE: ["MSR_PLATFORM_INFO", "PLATFORM_INFO", "platform_info", "0xce", "206"],
    0x8B: ["MSR_IA32_UCODE_REV", "UCODE_REV", "ucode_rev", "0x8b"],
    0xC0011029: ["MSR_AMD64_DE_CFG", "AMD64_DE_CFG", "DE_CFG", "de_cfg", "0xc0011029"],
    0x480: ["MSR_IA32_VMX_BASIC", "VMX_BASIC", "ia32_vmx_basic", "0x480"],
}


@pytest.mark.parametrize("index", sorted(SPELLINGS), ids=hex)
def test_every_spelling_of_an_msr_name(index: int) -> None:
    for spelling in SPELLINGS[index]:
        assert M.index_of(spelling) == index, f"{spelling!r} names 0x{index:x}"
        code, out = cli(["decode", spelling, "--json"])
        assert code == 0 and json.loads(out)["index"] == f"0x{index:x}", f"decode {spelling}: {out}"


def test_short_names_are_unambiguous() -> None:
    seen: dict[str, int] = {}
    clashes = []
    for m in M.catalogue():
        for key in set(M._keys(m)):  # noqa: SLF001 - the catalogue's own key derivation is what is under test
            if key in seen and seen[key] != m.index:
                clashes.append((key, hex(seen[key]), hex(m.index)))
            seen[key] = m.index
    assert not clashes, f"a short name must name one MSR; these name two: {clashes}"


@pytest.mark.parametrize(("args", "expected"), [
    (["decode", "0xce", "12abc"], "value for MSR_PLATFORM_INFO '12abc' is not a number: expected hex such as"),
    (["decode", "0xce", "0x"], "is not a number: expected hex"),
    (["decode", "0xce", str(1 << 64)], "is outside 0..0xffffffffffffffff (64 bits)"),
    (["decode", "NOPE_MSR"], "unknown MSR name 'NOPE_MSR'; expected a name such as MSR_PLATFORM_INFO"),
    (["decode", "ARCH_CAPABILITES"], "did you mean ARCH_CAPABILITIES"),
])
def test_bad_names_and_values_say_what_was_expected(args: list[str], expected: str) -> None:
    code, out = cli(args)
    assert code == 2, f"exit 2 for bad input, saw {code}: {out}"
    assert expected in out and "invalid literal" not in out, f"expected {expected!r}, saw {out!r}"
    assert len(out.strip().splitlines()) == 1, f"one line: {out!r}"


def test_decode_prints_names_and_numbers_not_python_booleans() -> None:
    _, out = cli(["decode", "PERF_CAPABILITIES", "0x24c5"])
    assert out.splitlines() == ["MSR_IA32_PERF_CAPABILITIES (0x345), a feature MSR", "value 0x24c5",
                                "  set: PEBS_TRAP PEBS_ARCH_REG FW_WRITES", "  LBR_FMT = 5", "  PEBS_FMT = 4"], out
    _, out = cli(["decode", "ARCH_CAP", "0x400000000c000069"])
    assert "  set: RDCL_NO SKIP_VMENTRY_L1DFLUSH MDS_NO PSCHANGE_MC_NO GDS_NO RFDS_NO ITS_NO" in out, out
    _, out = cli(["decode", "UCODE_REV", "0x2b0000c000000000"])
    assert "REVISION_INTEL = 0x2b0000c0" in out and "True" not in out and "False" not in out, out
    _, out = cli(["decode", "PLATFORM_INFO", "0"])
    assert "(no bit set)" in out, out


# --- markup: user text is printed as itself --------------------------------------------------------------------------

MARKUP = "[/]"


def _markup_cases(tmp_path: Path) -> list[tuple[list[str], int, list[str]]]:
    """(arguments, exit code, texts the output must show as they are)."""
    odd = tmp_path / "odd["
    odd.mkdir()
    scenario = odd / "]s[bold].yaml"
    scenario.write_text("scenario: 1\nname: 'n [/] [red]x'\nsteps:\n  - create_vcpu: 0\n  - run: 0\n"
                        "  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 0}}\n    label: 'l [/]'\n")
    bad = odd / "]bad.yaml"
    bad.write_text("scenario: 1\nname: x\nsteps:\n  - bogus[/]: 1\n")
    profile = json.loads((ROOT / "src/kvmscope/profiles/pvm-6.18.json").read_text())
    profile["name"] = "p [/] [bold]"
    pfile = odd / "]profile.json"
    pfile.write_text(json.dumps(profile))
    s, b, p, missing = str(scenario), str(bad), str(pfile), str(odd / "]missing[/].yaml")
    shown = ["n [/] [red]x", "(l [/])", s]
    return [
        (["decode", MARKUP], 2, [f"unknown MSR name '{MARKUP}'"]),
        (["decode", "0xce", MARKUP], 2, [f"'{MARKUP}' is not a number"]),
        (["decode", "[bold]"], 2, ["'[bold]'"]),
        (["probe", "--backend", "model", "--kernel", MARKUP], 2, [f"kernel version '{MARKUP}'"]),
        (["probe", "--backend", "model", "--profile", MARKUP], 2, [f"{MARKUP}: cannot read a profile file"]),
        (["probe", "--backend", "model", "--profile", p], 0, ["profile p [/] [bold]"]),
        (["check", s], 1, shown),
        (["check", s, "--json"], 1, ['"scenario": "n [/] [red]x"', '"label": "l [/]"']),
        (["check", s, "--compare", "6.3,6.18"], 1, ["n [/] [red]x on kernels 6.3, 6.18"]),
        (["check", s, "--compare", f"6.3,{MARKUP}"], 2, [f"kernel version '{MARKUP}'"]),
        (["check", s, "--kernel", MARKUP], 2, [f"kernel version '{MARKUP}'"]),
        (["check", s, "--profile", MARKUP], 2, [f"{MARKUP}: cannot read a profile file"]),
        (["check", s, "--profile", p], 1, [*shown, "profile p [/] [bold]"]),
        (["check", b], 2, [f"{b}:4: steps[0].bogus[/]: unknown step"]),
        (["check", b, "--json"], 2, [f"{b}:4: steps[0].bogus[/]: unknown step"]),
        (["check", missing], 2, [f"{missing}: cannot read"]),
        (["probe", "--backend", "model", "--save", str(odd / "]no-dir" / "x.json")], 2, ["odd[/]no-dir"]),
    ]


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_markup_in_user_text_prints_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              terminal: bool) -> None:
    for args, code, texts in _markup_cases(tmp_path):
        got, out = cli(args, 1000, terminal, monkeypatch)
        assert "MarkupError" not in out, f"kvmscope {' '.join(args)}: {out}"
        assert got == code, f"kvmscope {' '.join(args)}: expected exit {code}, saw {got}:\n{out}"
        for t in texts:
            assert t in out, f"kvmscope {' '.join(args)}: expected {t!r} shown as it is, saw:\n{out}"


def test_live_check_with_markup_in_names(tmp_path: Path, live: LinuxSystem) -> None:
    for args, code, texts in _markup_cases(tmp_path):
        if args[0] == "check" and len(args) == 2:
            got, out = cli([*args, "--backend", "linux"])
            assert got == code and "MarkupError" not in out, f"kvmscope {' '.join(args)} --backend linux: {got}\n{out}"
            for t in texts:
                assert t in out, f"kvmscope {' '.join(args)} --backend linux: expected {t!r}, saw:\n{out}"


# --- the small things a newcomer trips on ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["msrs"], ["msrs", "--json"], ["probe", "--backend", "model"],
                                  ["check", str(EXAMPLES / "reset-restuff.yaml")],
                                  ["check", str(EXAMPLES / "reset-restuff.yaml"), "--compare", "all"],
                                  ["decode", "ARCH_CAP", "0x400000000c000069"]], ids=" ".join)
@pytest.mark.skipif(not KVMSCOPE.exists(), reason="the kvmscope script is installed with the package")
def test_a_reader_that_goes_away_ends_quietly_with_141(args: list[str]) -> None:
    """The output was cut short, so no verdict: 141 (128 + SIGPIPE), what `cat` gives under `set -o pipefail`."""
    read, write = os.pipe()
    os.close(read)  # like `| head -1` that has already gone
    proc = subprocess.run([str(KVMSCOPE), *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    quiet = all(ln.startswith("note: ") for ln in proc.stderr.splitlines())  # the default-profile note may show
    assert proc.returncode == 141 and quiet, f"kvmscope {' '.join(args)} into a closed pipe: {proc}"


def test_probe_name_without_save_is_an_error() -> None:
    code, out = cli(["probe", "--backend", "model", "--name", "x"])
    assert code == 2 and "--name names the profile --save writes; add --save FILE" in out, out


def test_errors_are_one_line_however_long(tmp_path: Path) -> None:
    long_name = tmp_path / ("d" * 150) / "x.yaml"
    code, out = cli(["check", str(long_name)], 80)
    assert code == 2 and len(out.strip().splitlines()) == 1, f"one line, saw:\n{out}"


def test_install_and_readme_for_newcomers() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "MIT"$', pyproject, re.M), "license as an SPDX string (no setuptools warning)"
    readme = (ROOT / "README.md").read_text()
    assert "kvmscope msrs" in readme, "the README shows `kvmscope msrs`"
    assert re.search(r"make test.*install", readme, re.S | re.I), "the README says what `make test` installs"
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md")) + readme
    assert "our machine" not in docs.lower(), "the docs speak to users: this host, not our machines"


# --- the default profile -----------------------------------------------------------------------------------------------


def test_check_uses_this_hosts_profile_captured_once(live: LinuxSystem, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMSCOPE_CACHE", str(tmp_path / "cache"))
    release = live.host_info()["kernel_release"]
    example = str(EXAMPLES / "platform-info-after-run.yaml")
    code, first = cli(["check", example])
    assert code == 0, first
    assert "note: the model uses this host's profile, captured from /dev/kvm now (cached in" in first, first
    assert f"profile pvm-{release} (pvm)" in first, f"the report names the captured profile:\n{first}"
    cached = list((tmp_path / "cache").glob("host-*.json"))
    assert len(cached) == 1, f"one cached profile, saw {cached}"
    code, second = cli(["check", example])
    assert code == 0 and f"captured from /dev/kvm earlier ({cached[0]})" in second, second
    code, out = cli(["check", example, "--json"])
    assert code == 0 and json.loads(out)["description"].endswith(f"profile pvm-{release} (pvm)"), out
    code, out = cli(["check", example, "--profile", "amd-epyc"])
    assert code == 0 and "note:" not in out and "profile amd-epyc" in out, "an explicit --profile is used as is"


def test_a_new_ruleset_label_captures_this_host_again(live: LinuxSystem, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached capture records the ruleset label of its kernel (6.18.17 for 6.18.44): once kvmscope knows a backport
    that changes that label, the cache is not used, and the host is captured again with the new label."""
    from kvmscope import backends
    from kvmscope.kernel import rulesets

    monkeypatch.setenv("KVMSCOPE_CACHE", str(tmp_path / "cache"))
    first, why = backends.default_profile(live)
    assert "captured from /dev/kvm now" in why and not isinstance(first, str), why
    real = rulesets.resolve
    monkeypatch.setattr(rulesets, "resolve", lambda version: replace(real(version), version="6.18.99"))
    second, why = backends.default_profile(live)
    assert "captured from /dev/kvm now" in why, f"expected a new capture under a new label, saw: {why}"
    assert not isinstance(second, str) and second.ruleset == "6.18.99", f"the new capture's label: {second}"
    assert len(list((tmp_path / "cache").glob("host-*.json"))) == 2, "one cached capture per label"


def test_check_without_kvm_says_which_shipped_profile_and_how_to_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmscope.errors import KvmUnavailableError

    def unavailable(*a: object, **k: object) -> LinuxSystem:
        raise KvmUnavailableError("/dev/kvm", "missing", "/dev/kvm does not exist: this kernel has no KVM")

    monkeypatch.setattr("kvmscope.linux.open_system", unavailable)
    code, out = cli(["check", str(EXAMPLES / "platform-info-after-run.yaml")])
    assert code == 0, out
    expected = ("note: no usable /dev/kvm (/dev/kvm does not exist: this kernel has no KVM): the model uses the shipped "
                "profile pvm-6.18; choose another with --profile (amd-epyc, intel-spr, pvm-6.18, or a FILE from "
                "`kvmscope probe --save FILE`)")
    assert expected in out, f"expected {expected!r} in:\n{out}"
    assert "profile pvm-6.18 (pvm)" in out, out
    docs = " ".join((ROOT / "docs/scenarios.md").read_text().split())
    assert "captured once and cached" in docs and "shipped `pvm-6.18`" in docs, "docs/scenarios.md says the same"


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_check_report_keeps_values_whole_at_80(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(EXAMPLES / "sandbox-reset-snapshot-intel.yaml")
    _, out = cli(["check", path, "--json"])
    steps = json.loads(out)["steps"]
    tokens = {f"0x{int(s['refusal'][k], 16):016x}" for s in steps if s["refusal"] for k in ("old", "new")}
    tokens |= {s["refusal"]["name"] for s in steps if s["refusal"]}
    assert tokens, "the example has a refusal to show"
    code, out = cli(["check", path], 80, terminal, monkeypatch)
    assert code == 0, out
    split = sorted(t for t in tokens if not whole(t, out))
    assert not split, f"expected old/new values and MSR names whole at 80 columns, saw split: {split}\n{out}"
    if terminal:
        assert all(len(ln) <= 80 for ln in out.splitlines()), f"a terminal report wraps at 80 columns:\n{out}"


# --- properties -------------------------------------------------------------------------------------------------------

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(PRINTABLE)
def test_any_user_text_in_an_error_or_a_report_line_prints_as_itself(text: str) -> None:
    real = sys.stderr, sys.stdout
    sys.stderr, sys.stdout = io.StringIO(), io.StringIO()
    try:
        render.error(text)
        render.note(text)
        render.check_title(render.console(), text, text, text)
        err, out = sys.stderr.getvalue(), sys.stdout.getvalue()
    finally:
        sys.stderr, sys.stdout = real
    assert err == f"error: {text}\nnote: {text}\n", f"expected the text as given, saw {err!r}"
    assert out == f"{text} ({text}) on {text}\n", f"expected the text as given, saw {out!r}"


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_numbers_read_back_in_every_base(n: int) -> None:
    for text in (hex(n), hex(n).upper().replace("X", "x"), str(n), bin(n), oct(n), f"{n:_}", f"0x{n:_x}"):
        assert M.parse_value(text) == n, f"{text!r} reads as {n}"


def test_probe_fits_every_width_between(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the two widths the issue names, the table/stacked choice still never splits a value."""
    args = ["probe", "--backend", "model", "--profile", "intel-spr"]
    tokens = probe_tokens(json.loads(cli([*args, "--json"])[1]))
    for width in range(60, 221, 16):
        assert_fits(cli(args, width, False, monkeypatch)[1], width, tokens, f"intel-spr probe at {width} columns")


def test_compare_names_a_step_that_fails_on_every_kernel() -> None:
    code, out = cli(["check", str(EXAMPLES / "platform-info-after-run.yaml"), "--compare", "6.8,6.9"])
    flat = " ".join(out.split())
    assert code == 1, out
    assert "no step changes outcome between these kernels" in flat, out
    expected = "[4] line 13 set_msrs: accepted on every kernel compared: KVM_SET_MSRS wrote all 1 MSR (expected refused"
    assert expected in flat, f"expected the failing step named: {expected!r} in:\n{out}"
