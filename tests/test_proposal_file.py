"""Bad proposal TOML files (``--kernel p.toml``, ``--compare 6.18,p.toml``): one line naming the file once (and the
line where the parser gives one), exit 2, at once; never a hang, a traceback or a megabyte echoed back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmscope.cli import main

SCENARIO = "scenario: 1\nsteps:\n  - create_vcpu: 0\n"
MEMORY_LIMIT = 768 << 20


def _limited() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(args: list[str], stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """``kvmscope ARGS`` in a child under a memory limit; a hang is reported as what it is."""
    code = "import sys; from kvmscope.cli import main; sys.argv[0] = 'kvmscope'; main()"
    try:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=20,
                              preexec_fn=_limited, stdin=stdin)
    except subprocess.TimeoutExpired:
        pytest.fail(f"expected {args} to be refused at once, saw it still running after 20 s")


def assert_one_line(code: int, err: str, args: list[str], name: str, expected: str) -> None:
    assert code == 2, f"expected exit 2 for {args}, saw {code}: {err[-500:]!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr for {args}, saw {err[:500]!r}"
    assert expected in err, f"expected {expected!r} in the error for {args}, saw {err[:500]!r}"
    assert err.count(name) == 1, f"expected the file {name!r} named once, saw {err[:500]!r}"
    assert len(err) < 400, f"expected a short line, saw {len(err):,} characters: {err[:300]!r}..."


@pytest.mark.parametrize(("kind", "expected"), [
    ("fifo", "cannot read a proposal from a FIFO: expected a regular file"),
    ("device", "cannot read a proposal from a device: expected a regular file"),
    ("directory", "cannot read a proposal from a directory: expected a regular file"),
    ("stdin", "cannot read a proposal from a FIFO: expected a regular file"),
])
@pytest.mark.parametrize("where", ["--kernel", "--compare", "probe", "baseline"])
def test_a_proposal_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str, expected: str,
                                                                where: str) -> None:
    p = tmp_path / f"{kind}.toml"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "device":
        p.symlink_to("/dev/zero")  # read whole, it would fill memory
    elif kind == "directory":
        p.mkdir()
    else:
        p.symlink_to("/dev/stdin")  # a pipe here, a terminal for a user: both would wait
    s = tmp_path / "s.yaml"
    s.write_text(SCENARIO)
    args = {"--kernel": ["check", str(s), "--kernel", str(p)], "--compare": ["check", str(s), "--compare", f"6.18,{p}"],
            "probe": ["probe", "--backend", "model", "--kernel", str(p)],
            "baseline": ["baseline", "intel-spr", "amd-epyc", "--kernel", str(p)]}[where]
    r = run_limited(args, stdin=subprocess.PIPE if kind == "stdin" else subprocess.DEVNULL)
    assert_one_line(r.returncode, r.stderr, args, str(p), expected)


BAD: dict[str, tuple[str, str]] = {
    "5000-digit title": ('name = "x"\nbase = "6.18"\ntitle = ' + "9" * 5000 + "\n",
                         ":3: not valid TOML here: a number of more than 4,300 digits"),
    "5000-digit unknown key": ('base = "6.18"\nfoo = ' + "9" * 5000 + "\n",
                               ":2: not valid TOML here: a number of more than 4,300 digits"),
    "deep nesting": ('base = "6.18"\nadd = ' + "[" * 2000 + "]" * 2000 + "\n", ": not valid TOML here: arrays or "
                     "tables nested too deeply"),
    "syntax": ('base = "6.18"\nbase = 6.18.1\n', ":2: not valid TOML: "),
    "not UTF-8": ('name = "caf\xe9"\nbase = "6.18"\n', ":1: not UTF-8 text (byte 0xe9 at offset 11)"),
    "list of ints": ('base = "6.18"\nimmutable = [16]\n', ": immutable: expected a list of strings, got [16]"),
    "huge MSR index": ('base = "6.18"\nimmutable = ["0x' + "f" * 10_000 + '"]\n', ": immutable[0]: '0xfff"),
    "huge rule key": ('base = "6.18"\nadd = ["' + "n" * 200_000 + '"]\n', ": add[0]: 'nnnnn"),
    "bad base": ('base = "[/]"\n', ": base: kernel version '[/]' is not like 6.18"),
    "title a number": ('base = "6.18"\ntitle = 5\n', ": title: expected a string, got 5"),
    "title nan": ('base = "6.18"\ntitle = nan\n', ": title: expected a string, got nan"),
    "unknown MSR": ('base = "6.18"\nimmutable = ["NO_SUCH_MSR"]\n', ": immutable: unknown MSR name 'NO_SUCH_MSR'"),
    # without the freeze (before 6.4, or removed) an immutable MSR would silently stay writable
    "immutable before 6.4": ('base = "6.3"\nimmutable = ["TSC"]\n', ": immutable needs the freeze after the first "
                             "run, which base 6.3 does not have (KVM: x86: Disallow writes"),
    "remove a rule the base lacks": ('base = "6.3"\nremove = ["arch_cap_needs_cpuid"]\n',
                                     ": remove: 'arch_cap_needs_cpuid' is not among the rules of base 6.3 (it applies "
                                     "from 6.13)"),
    "freeze removed": ('base = "6.18"\nremove = ["freeze"]\nadd = ["platform_info_immutable"]\n',
                       ': add = ["platform_info_immutable"] needs the freeze after the first run, which `remove` takes '
                       'out'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_proposal_is_one_short_line_naming_the_file_once(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    p = tmp_path / "p.toml"
    p.write_bytes(text.encode("latin-1"))
    s = tmp_path / "s.yaml"
    s.write_text(SCENARIO)
    args = ["check", str(s), "--kernel", str(p)]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"expected exit 2 for {case}, saw the exception {result.exception!r}")
    assert_one_line(result.exit_code, result.stderr, args, str(p), str(p) + expected)


def test_a_base_newer_than_the_rulesets_is_noted_as_for_kernel(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('base = "99.1"\n')
    for args in (["probe", "--backend", "model", "--profile", "intel-spr", "--kernel", str(p)],
                 ["probe", "--backend", "model", "--profile", "intel-spr", "--kernel", "99.1"]):
        result = CliRunner().invoke(main, args)
        said = "".join(result.stderr.split())
        assert result.exit_code == 0 and "kernel99.1isnewerthanthenewestmainlinerelease" in said, (
            f"expected exit 0 and a note that 99.1 is newer than the rulesets for {args}, saw {result.exit_code}: "
            f"{result.stderr!r}")
