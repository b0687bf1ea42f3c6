"""Bad input, class by class (issue 13), at the CLI: every malformed file, on every path that reads it, is one line
on stderr naming the file, exit 2, nothing on stdout, nothing opened (no backend chosen, no /dev/kvm touched), within
seconds and in bounded memory. The hangs and memory classes run in a subprocess under a memory limit and a timeout.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import kvmscope
from kvmscope import backends, inputs
from kvmscope import scenario as scenario_module
from kvmscope.cli import main
from kvmscope.errors import ProfileError, ScenarioError
from kvmscope.kernel import profile

PROFILE = profile.load("pvm-6.18").to_json()
MEMORY_LIMIT = 768 << 20  # address space of a whole `kvmscope` process (the interpreter and libraries: ~300 MiB)


@pytest.fixture
def untouched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Records any attempt to open a backend: bad input must be refused before."""
    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise AssertionError(f"a backend was opened for bad input: {args} {kwargs}")

    monkeypatch.setattr(backends, "choose", refuse)
    monkeypatch.setattr(backends, "live_with_explainer", refuse)
    yield calls
    assert calls == [], f"expected no backend to be opened, saw {calls}"


def one_line_exit_2(args: list[str], expected: str, name: str) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr naming ``name`` and ``expected``, and on stdout
    nothing, or with --json only the error as JSON."""
    result = CliRunner().invoke(main, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"expected exit 2, saw the exception {result.exception!r} for {args}")
    err = result.stderr
    assert result.exit_code == 2, f"expected exit 2 for {args}, saw {result.exit_code}: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr for {args}, saw {err!r}"
    assert name in err and expected in err, f"expected {name!r} and {expected!r} in the error for {args}, saw {err!r}"
    if "--json" in args:
        doc = json.loads(result.stdout)
        command = doc.pop("command", None)
        assert doc == {"schema_version": 1, "error": err[len("error: "):-1], "exit_code": 2}, (
            f"expected only the error as JSON on stdout for {args}, saw {result.stdout[:200]!r}")
        name, _, option = command.partition(" --") if command else ("", "", "")
        assert name and " ".join(args).startswith(name) and (not option or f"--{option}" in args), (
            f"expected the command of {args}, saw {command!r}")
    else:
        assert result.stdout == "", f"expected nothing on stdout for {args}, saw {result.stdout[:200]!r}"
    return err


PATHS = {"stream": [], "json": ["--json"], "compare": ["--compare", "6.3,6.18"]}
"""The three ways `kvmscope check` reads a file: streamed (the table), whole (--json), whole under each kernel."""

HEAD = "scenario: 1\nsteps:\n  - create_vcpu: 0\n"
BOMB = HEAD + "  - run:\n      a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"      {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
BAD_TEXT: dict[str, tuple[str, str]] = {
    "alias bomb": (BOMB, ":6: anchors and aliases (*name) are not supported"),
    "!!timestamp": (HEAD.replace("scenario: 1", "scenario: 1\nname: !!timestamp 2001-01-01"),
                    ":2: the tag !!timestamp is not supported"),
    "!!python on the steps": (HEAD.replace("steps:", "steps: !!python/object:os.system"),
                              ":2: the tag !!python/object:os.system is not supported"),
    "!!set on the top": ("!!set\n" + HEAD, ":1: the tag !!set is not supported"),
    "!!int abc": (HEAD + "  - run: !!int abc\n", ":4: expected an integer, got 'abc'"),
    "!!bool maybe": (HEAD + "  - run: 0\n    expect: {accepted: !!bool maybe}\n", ":5: expected true or false"),
    "bad date": (HEAD + "  - run: 2001-13-45\n", ":4: steps[1].run: expected an integer like 0x1f or 31, got '2001-13-45'"),
    "5000 digits": (HEAD + "  - microcode_load: " + "9" * 5000 + "\n", ":4: a number of 5,000 characters: the limit"),
    "5000 digits quoted": (HEAD + "  - microcode_load: '" + "9" * 5000 + "'\n",
                           ":4: steps[1].microcode_load: expected an integer like 0x1f or 31, got '99999"),
    "deep nesting": (HEAD + "  - label: " + "[" * 100 + "]" * 100 + "\n", ":4: nested more than 64 levels deep"),
    "very deep nesting": (HEAD + "  - label: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest"),  # libyaml: its own limit
    "errno attribute": (HEAD + "  - run: 0\n    expect: {errno: __spec__}\n", ":5: expect.errno: expected an errno name"),
    "errno table": (HEAD + "  - run: 0\n    expect: {errno: errorcode}\n", ":5: expect.errno: expected an errno name"),
    "trailing garbage": (HEAD + "garbage\n", ":5: not valid YAML: could not find expected ':'"),
    "second document": (HEAD + "---\n{broken: [\n", ":4: a second YAML document: expected one"),
    "duplicate steps": (HEAD + "steps:\n  - run: 0\n", ":4: duplicate key 'steps'"),
    "duplicate key in a step": (HEAD + "  - run: {vcpu: 0, vcpu: 1}\n", ":4: duplicate key 'vcpu'"),
    "header after steps": (HEAD + "name: [1]\n", ":4: name: expected a string, got a list"),
    "long key": (HEAD + "  - run: {" + "k" * 300 + ": 0}\n", ":4: a key of 300 characters: the limit is 256"),
    "lone surrogate": (HEAD.replace("scenario: 1", 'scenario: 1\nname: "\\ud800"'), ":2: "),
    "two names for one MSR": (HEAD + "  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFO: 1, MSR_PLATFORM_INFO: 0}}\n",
                              ":4: steps[1].set_msrs.msrs.MSR_PLATFORM_INFO: 'PLATFORM_INFO' and 'MSR_PLATFORM_INFO' "
                              "name the same MSR (0xce); give it once"),
    "base-60 number": (HEAD + "  - create_vcpu: 1:30\n", ":4: '1:30' is a base-60 number in YAML 1.1"),
    "leading-zero octal": (HEAD + "  - create_vcpu: 010\n", ":4: '010' is octal in YAML 1.1 (a leading 0): write 10"),
    "vCPU id beyond a C int": (HEAD + "  - ioctl: {name: KVM_CREATE_VCPU, vcpu: 0xffffffff, errno: EINVAL}\n",
                               ":4: steps[1].ioctl.vcpu: 0xffffffff does not fit in 31 bits unsigned (a vCPU id is a "
                               "C int"),
    "infinity for an integer": (HEAD + "  - create_vcpu: .inf\n", ":4: steps[1].create_vcpu: expected an integer, got "
                                                                    "infinity"),
    "NaN for an integer": (HEAD + "  - create_vcpu: .nan\n", ":4: steps[1].create_vcpu: expected an integer, got NaN"),
    "typo on the last line": (HEAD + "  - run: 0\n  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFOO: 1}}\n",
                              ":5: steps[2].set_msrs.msrs.PLATFORM_INFOO: unknown MSR name"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_scenario_is_one_line_exit_2_on_every_path(tmp_path: Path, untouched: list[Any], case: str,
                                                       path: str) -> None:
    text, expected = BAD_TEXT[case]
    f = tmp_path / "s.yaml"
    f.write_text(text)
    start = time.monotonic()
    one_line_exit_2(["check", str(f), *PATHS[path]], expected, str(f))
    assert time.monotonic() - start < 10, f"expected {case} refused within seconds, took {time.monotonic() - start:.1f}s"


BAD_JSON: dict[str, tuple[str, str]] = {
    "version as text": ('{"scenario": "1", "steps": []}', ":1: scenario: expected the number 1, got the text '1'"),
    "5000 digits": ('{"scenario": 1, "steps": [{"microcode_load": ' + "9" * 5000 + "}]}", "a number of 5,000 digits"),
    "deep nesting": ('{"scenario": 1, "steps": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels"),
    "lone surrogate in a name": ('{"scenario": 1, "name": "\\ud800", "steps": []}', "a lone surrogate ('\\ud800')"),
    "duplicate steps": ('{"scenario": 1, "steps": [],\n "steps": [{"run": 0}]}', ":2: duplicate key 'steps'"),
    "trailing garbage": ('{"scenario": 1, "steps": []}\n]', ":2: not valid JSON: Extra data"),
    "NaN": ('{"scenario": 1, "steps": [{"run": NaN}]}', "NaN is not a JSON number"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_scenario_is_one_line_exit_2_on_every_path(tmp_path: Path, untouched: list[Any], case: str,
                                                            path: str) -> None:
    text, expected = BAD_JSON[case]
    f = tmp_path / "s.json"
    f.write_text(text)
    one_line_exit_2(["check", str(f), *PATHS[path]], expected, str(f))


BAD_BYTES: dict[str, tuple[bytes, str]] = {
    "UTF-16": (HEAD.encode("utf-16"), ":1: UTF-16 text: expected UTF-8"),
    "invalid UTF-8": (HEAD.encode() + b"  - label: \xff\xfe\n    run: 0\n", ":4: not UTF-8 text (byte 0xff"),
    "NUL byte": (HEAD.encode() + b"  - label: a\x00b\n    run: 0\n", ":4: the character U+0000 is not allowed"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("case", sorted(BAD_BYTES))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_bytes_are_one_line_exit_2_on_every_path(tmp_path: Path, untouched: list[Any], case: str, path: str,
                                                     suffix: str) -> None:
    data, expected = BAD_BYTES[case]
    f = tmp_path / f"s{suffix}"
    f.write_bytes(data)
    if suffix == ".json":
        expected = expected.split(":", 2)[-1] if "UTF" in expected else "not valid JSON"
    one_line_exit_2(["check", str(f), *PATHS[path]], expected.strip(), str(f))


def test_bad_file_names_are_one_line_exit_2(tmp_path: Path, untouched: list[Any]) -> None:
    one_line_exit_2(["check", "a\0b.yaml"], "a file name cannot contain a NUL byte", "a\\x00b.yaml")
    one_line_exit_2(["check", "x" * 5000], "File name too long", "(5000 characters)")
    one_line_exit_2(["check", str(tmp_path)], "cannot read a scenario from a directory", str(tmp_path))
    one_line_exit_2(["check", "new\nline.yaml"], "No such file", "new\\nline.yaml")


def test_bad_profile_names_are_one_line_exit_2(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD)
    one_line_exit_2(["check", str(ok), "--profile", "a\0b.json"], "a file name cannot contain a NUL byte", "a\\x00b")
    one_line_exit_2(["check", str(ok), "--profile", "p" * 5000], "no shipped profile named", "(5000 characters)")
    one_line_exit_2(["probe", "--profile", "[/]"], "cannot read a profile file: No such file", "[/]")


def _profile_with(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(PROFILE))
    for key, value in changes.items():
        target = data
        *parents, last = key.split("__")
        for p in parents:
            target = target[p]
        target[last] = value
    return data


BAD_PROFILES: dict[str, tuple[bytes, str]] = {
    "5000 digits": (json.dumps(PROFILE).replace('"api_version": 12', '"api_version": ' + "9" * 5000).encode(),
                    "a number of 5,000 digits"),
    "deep nesting": (b'{"source": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 64 levels"),
    "UTF-16": (json.dumps(PROFILE).encode("utf-16"), ":1: UTF-16 text: expected UTF-8"),
    "invalid UTF-8": (json.dumps(PROFILE).replace('"name": "pvm-6.18"', '"name": "pvm-\udcff"').encode(
        "utf-8", "surrogateescape"), ":1: not UTF-8 text (byte 0xff"),
    "lone surrogate": (json.dumps(_profile_with(name="\ud800")).encode(), "a lone surrogate"),
    "reset_sregs of the wrong type": (json.dumps(_profile_with(vcpu__reset_sregs={"cs": {"base": "x"}})).encode(),
                                      "field vcpu.reset_sregs.cs.base: expected an integer"),
    "reset_sregs unknown field": (json.dumps(_profile_with(vcpu__reset_sregs={"cr9": 0})).encode(),
                                  "field vcpu.reset_sregs.cr9: not a field of struct kvm_sregs"),
    "reset_sregs array": (json.dumps(_profile_with(vcpu__reset_sregs={"interrupt_bitmap": [0, 0, 0, 0]})).encode(),
                          "field vcpu.reset_sregs.interrupt_bitmap: not a field"),
    "reset_regs unknown register": (json.dumps(_profile_with(vcpu__reset_regs={"eip": 0})).encode(),
                                    "field vcpu.reset_regs.eip: not a field of struct kvm_regs"),
    "duplicate key": (b'{"schema": 1, "schema": 1}', "duplicate key 'schema'"),
    "long key": (json.dumps(_profile_with(source={"k" * 300: 1})).encode(), "a key of 300 characters"),
    "long ruleset": (json.dumps(_profile_with(ruleset="6." + "9" * 5000)).encode(), "field ruleset: "),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_is_one_line_exit_2_where_it_is_given(tmp_path: Path, case: str) -> None:
    data, expected = BAD_PROFILES[case]
    p = tmp_path / "p.json"
    p.write_bytes(data)
    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD)
    with pytest.raises(ProfileError):  # the API: a typed error at load, never later when a vCPU is made
        profile.load(p)
    for args in (["check", str(ok), "--profile", str(p)], ["check", str(ok), "--profile", str(p), "--json"],
                 ["probe", "--backend", "model", "--profile", str(p)]):
        one_line_exit_2(args, expected, str(p))


def test_cpuid_file_classes_name_the_step_and_the_file(tmp_path: Path, untouched: list[Any]) -> None:
    f = tmp_path / "s.yaml"
    for content, expected in ((b"- {function: 0x" + b"f" * 5000 + b"}\n", "a number of 5,002 characters"),
                              ("- {function: 1}\n".encode("utf-16"), "UTF-16 text"),
                              (b"- {function: 1, eax: \xff}\n", "not UTF-8 text"),
                              (b"- &a {function: 1}\n- *a\n", "anchors and aliases")):
        (tmp_path / "c.yaml").write_bytes(content)
        f.write_text(HEAD + "  - set_cpuid: {vcpu: 0, file: c.yaml}\n")
        one_line_exit_2(["check", str(f)], expected, "c.yaml")
    for target, expected in (("/dev/zero", "cannot read a CPUID list from a device"),
                             (str(tmp_path), "cannot read a CPUID list from a directory")):
        f.write_text(HEAD + f"  - set_cpuid: {{vcpu: 0, file: {target}}}\n")
        one_line_exit_2(["check", str(f), "--json"], expected, f"{f}:4: steps[1].set_cpuid.file")


def test_limits_name_the_limit(tmp_path: Path, untouched: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(HEAD + "  - run: 0\n  - run: 0\n")
    monkeypatch.setattr(scenario_module, "MAX_STEPS", 2)
    for args in PATHS.values():
        if args:
            one_line_exit_2(["check", str(f), *args], "more than 2 steps, the limit for a scenario read whole", str(f))
    f.write_text(HEAD + "  - label: " + "x" * (2 * inputs.MAX_VALUE) + "\n    run: 0\n")
    for args in PATHS.values():
        one_line_exit_2(["check", str(f), *args], ":4: a value (or comment) after this line is longer than 1 MiB",
                        str(f))
    f.write_text(HEAD + "  - get_msrs: {vcpu: 0, msrs: [" + "0, " * inputs.MAX_NODES + "]}\n")
    for args in PATHS.values():
        one_line_exit_2(["check", str(f), *args], ":4: more than 200,000 values in one entry: the limit", str(f))
    f.write_text(HEAD + ("# a comment line to make the file large\n" * (inputs.MAX_FILE // 40 + 1)))
    for args in PATHS.values():
        if args:
            one_line_exit_2(["check", str(f), *args], "larger than 16 MiB, the limit for a file read whole", str(f))


def test_a_live_replay_touches_nothing_before_the_whole_file_is_read(tmp_path: Path, untouched: list[Any]) -> None:
    # Line 7 holds a typo: nothing may be opened, let alone KVM_RUN, before it is found.
    f = tmp_path / "s.yaml"
    f.write_text("scenario: 1\nsteps:\n  - create_vcpu: 0\n  - run: 0\n  - run: 0\n  - run: 0\n  - runn: 0\n")
    one_line_exit_2(["check", str(f), "--backend", "linux"], ":7: steps[4].runn: unknown step", str(f))


def test_a_bad_profile_for_a_live_replay_is_refused_before_dev_kvm_opens(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmscope.linux

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("/dev/kvm was opened before the profile was read")

    monkeypatch.setattr(kvmscope.linux, "open_system", refuse)
    f = tmp_path / "s.yaml"
    f.write_text(HEAD)
    p = tmp_path / "p.json"
    p.write_bytes(BAD_PROFILES["UTF-16"][0])
    one_line_exit_2(["check", str(f), "--backend", "linux", "--profile", str(p)], "UTF-16 text", str(p))


def test_probe_save_target_is_checked_before_anything_opens(tmp_path: Path, untouched: list[Any]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, expected in ((str(fifo), "it is a FIFO, expected a regular file"),
                             (str(tmp_path), "it is a directory"),
                             ("/dev/null", "it is a device"),
                             (str(tmp_path / "no" / "p.json"), "is not a writable directory"),
                             ("a\0b", "a file name cannot contain a NUL byte")):
        one_line_exit_2(["probe", "--save", target], expected, target.replace("\0", "\\x00"))
    with pytest.raises(ProfileError, match="it is a FIFO"):  # the API writes no profile into a FIFO either
        profile.load("pvm-6.18").save(fifo)
    assert fifo.is_fifo()


# --- hangs and unbounded memory: in a subprocess, under a memory limit and a timeout -------------------------------------


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``kvmscope ARGS`` in a child with its address space limited; a hang fails the test at ``timeout``."""
    code = "import sys; from kvmscope.cli import main; sys.argv[0] = 'kvmscope'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limited, env={**os.environ, "COLUMNS": "80"})


def assert_one_line_exit_2(r: subprocess.CompletedProcess[str], expected: str) -> None:
    assert r.returncode == 2, f"expected exit 2, saw {r.returncode}: {r.stderr[-500:]!r}"
    assert r.stderr.count("\n") == 1 and expected in r.stderr, f"expected one line with {expected!r}, saw {r.stderr!r}"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    return path


def test_fifos_and_devices_never_hang_or_fill_memory(tmp_path: Path, fifo: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD)
    cases = [
        (["check", "/dev/zero"], "/dev/zero: cannot read a scenario from a device"),
        (["check", "/dev/zero", "--json"], "/dev/zero: cannot read a scenario from a device"),
        (["check", str(fifo)], "cannot read a scenario from a FIFO"),
        (["check", str(fifo), "--compare", "6.3,6.18"], "cannot read a scenario from a FIFO"),
        (["check", str(ok), "--profile", "/dev/zero"], "cannot read a profile from a device"),
        (["check", str(ok), "--profile", str(fifo)], "cannot read a profile from a FIFO"),
        (["probe", "--backend", "model", "--profile", str(fifo)], "cannot read a profile from a FIFO"),
        (["probe", "--save", str(fifo)], "cannot write"),
    ]
    for target in ("/dev/zero", str(fifo)):
        s = tmp_path / f"cpuid-{len(target)}.yaml"
        s.write_text(HEAD + f"  - set_cpuid: {{vcpu: 0, file: {target}}}\n")
        cases.append((["check", str(s)], "steps[1].set_cpuid.file"))
    for args, expected in cases:
        start = time.monotonic()
        assert_one_line_exit_2(run_limited(args), expected)
        assert time.monotonic() - start < 20, f"expected {args} refused within seconds"


def test_one_huge_value_streams_in_bounded_memory(tmp_path: Path) -> None:
    # 64 MiB in one scalar, on the streaming path (no file size limit there): refused at 1 MiB, the memory limit holds.
    f = tmp_path / "s.yaml"
    with f.open("w") as out:
        out.write(HEAD + "  - label: ")
        chunk = "x" * (1 << 20)
        for _ in range(64):
            out.write(chunk)
        out.write("\n    run: 0\n")
    assert_one_line_exit_2(run_limited(["check", str(f)]), ":4: a value (or comment) after this line is longer")


def test_errors_are_one_line_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    f = tmp_path / ("long-name-" * 12 + ".yaml")
    f.write_text(HEAD + "  - set_msrs: {vcpu: 0, msrs: {PLATFORM_INFOO: 1, ARCH_CAPABILITIESS: 2}}\n")
    r = run_limited(["check", str(f)])
    assert_one_line_exit_2(r, "unknown MSR name")
    assert len(r.stderr) > 80, "expected a message longer than the 80 columns it used to wrap at"


def test_api_readers_raise_typed_errors() -> None:
    with pytest.raises(ScenarioError, match="anchors and aliases"):
        scenario_module.parse(BOMB, "bomb.yaml")
    with pytest.raises(ScenarioError, match="a second YAML document"):
        scenario_module.parse(BAD_TEXT["second document"][0], "x.yaml")
    with pytest.raises(ProfileError, match="no shipped profile named"):
        profile.load("nul\0name")
    with pytest.raises(ProfileError, match="a file name cannot contain a NUL byte"):
        profile.load("x/\0.json")
    with pytest.raises(ProfileError, match="field vcpu.reset_sregs.cs.base"):
        profile.read(_profile_with(vcpu__reset_sregs={"cs": {"base": None}}), "p.json")
    for bad in (5, b"x", ["a"]):
        with pytest.raises(ProfileError, match="a profile is a shipped name or a path"):
            kvmscope.open("model", profile=bad)  # type: ignore[arg-type]
    with pytest.raises(kvmscope.InvalidValueError, match="is not like 6.18"):
        kvmscope.open("model", kernel="6." + "9" * 5000)


def test_bad_kernel_versions_are_one_line_exit_2(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD)
    one_line_exit_2(["check", str(ok), "--kernel", "6." + "9" * 5000], "is not like 6.18", "kernel version")
    one_line_exit_2(["probe", "--kernel", "[/]"], "is not like 6.18", "[/]")
    ok.write_text(HEAD.replace("scenario: 1", "scenario: 1\nkernel: '6." + "9" * 5000 + "'"))
    one_line_exit_2(["check", str(ok)], "is not like 6.18", str(ok))


def test_user_text_in_errors_is_printed_as_text() -> None:
    # Errors print user text as it is: "[/]" was read as rich markup and crashed the CLI.
    one_line_exit_2(["decode", "[/]"], "unknown MSR name '[/]'", "[/]")
    one_line_exit_2(["decode", "ARCH_CAP", "[bold]1[/]"], "'[bold]1[/]' is not a number", "[bold]1[/]")
    one_line_exit_2(["check", "[/].yaml"], "cannot read a scenario file", "[/].yaml")
    one_line_exit_2(["check", "esc\x1b[31m.yaml"], "cannot read a scenario file", "esc\\x1b[31m.yaml")
