"""Every file kvmscope writes behaves as ``probe --save`` does: a FIFO, a device or a directory is refused with one line,
exit 2, before any work (never a hang, never a write into /dev/null); ``trace`` leaves an existing ``--out`` as it was
when it exits 2, and a failed write names the file. Run in child processes: a FIFO would hang the test otherwise."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmscope import template
from kvmscope.template import TemplateError

ROOT = Path(__file__).parent.parent
T2S = ROOT / "examples" / "templates" / "t2s-like.json"
RECORDING = ROOT / "examples" / "platform-info-after-run.yaml"


def run(args: list[str], cwd: Path | None = None, preexec: Callable[[], None] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``kvmscope ARGS`` in a child; a hang is reported as what it is."""
    code = "import sys; from kvmscope.cli import main; sys.argv[0] = 'kvmscope'; main()"
    try:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=20,
                              cwd=cwd, preexec_fn=preexec, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"expected {args} to end at once, saw it still running after 20 s")


def assert_one_line_exit_2(r: subprocess.CompletedProcess[str], expected: str) -> None:
    assert r.returncode == 2, f"expected exit 2 for {r.args[3:]}, saw {r.returncode}: {r.stderr[-500:]!r}"
    assert r.stderr.count("\n") == 1 and expected in r.stderr, (
        f"expected one line with {expected!r} for {r.args[3:]}, saw {r.stderr[-500:]!r}")
    assert r.stdout == "", f"expected nothing on stdout for {r.args[3:]}, saw {r.stdout[:300]!r}"


WRITERS = {
    "template read -o": lambda out: ["template", "read", str(T2S), "-o", out],
    "template dump -o": lambda out: ["template", "dump", "--profile", "intel-spr", "-o", out],
    "baseline -o": lambda out: ["baseline", "intel-spr", "amd-epyc", "-o", out],
    "trace --out": lambda out: ["trace", "--out", out, "--", "true"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "no folder"])
def test_an_output_that_is_no_regular_file_is_refused_before_any_work(tmp_path: Path, command: str, kind: str) -> None:
    target, expected = {
        "fifo": (str(tmp_path / "fifo.json"), "it is a FIFO, expected a regular file"),
        "device": ("/dev/null", "it is a device, expected a regular file"),
        "directory": (str(tmp_path), "it is a directory, expected a regular file"),
        "no folder": (str(tmp_path / "none" / "x.json"), f"{tmp_path / 'none'} is not a writable directory"),
    }[kind]
    if kind == "fifo":
        os.mkfifo(target)
    assert_one_line_exit_2(run(WRITERS[command](target)), f"cannot write {target}: {expected}")


def test_strip_checks_every_output_before_it_writes_one(tmp_path: Path) -> None:
    for name in ("a.json", "c.json"):
        shutil.copy(T2S, tmp_path / name)
    os.mkfifo(tmp_path / "c_stripped.json")
    r = run(["template", "strip", "a.json", "c.json"], cwd=tmp_path)
    assert_one_line_exit_2(r, "cannot write c_stripped.json: it is a FIFO")
    assert not (tmp_path / "a_stripped.json").exists(), "expected no output written when one is refused, saw one"


def test_template_save_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a save that opens it goes on (and is seen) at once
    try:
        with pytest.raises(TemplateError, match="it is a FIFO"):  # the API writes no template into a FIFO either
            template.load(T2S).save(fifo)
    finally:
        os.close(reader)


@pytest.mark.parametrize(("args", "expected"), [
    (["--", "/nonexistent/binary"], "kvmscope trace: cannot run /nonexistent/binary: No such file or directory"),
    (["--attach", "999999"], "kvmscope trace: no process 999999"),
])
def test_a_trace_that_exits_2_leaves_the_old_recording(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "precious.yaml"
    shutil.copy(RECORDING, out)
    assert_one_line_exit_2(run(["trace", "--out", str(out), *args]), expected)
    assert out.read_bytes() == RECORDING.read_bytes(), (
        f"expected {out.name} unchanged on exit 2, saw {len(out.read_bytes())} bytes: {out.read_text()[:200]!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.yaml"], (
        f"expected no temporary file left, saw {sorted(p.name for p in tmp_path.iterdir())}")


def test_a_trace_replaces_its_out_file_and_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "old.yaml"
    shutil.copy(RECORDING, out)
    out.chmod(0o640)
    r = run(["trace", "--out", str(out), "--", "true"])
    assert r.returncode == 0 and out.read_text().startswith("scenario: 1\n"), (
        f"expected exit 0 and a new recording, saw {r.returncode}: {r.stderr!r} {out.read_text()[:100]!r}")
    assert out.stat().st_mode & 0o777 == 0o640, f"expected mode 0640 kept, saw {out.stat().st_mode & 0o777:o}"


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1"])
def test_trace_refuses_a_timeout_no_timer_takes(tmp_path: Path, value: str) -> None:
    out = tmp_path / "t.yaml"
    r = run(["trace", "--out", str(out), "--timeout", value, "--", "true"])
    expected = "--timeout" if value != "-1" else "-1"
    assert r.returncode == 2 and "Traceback" not in r.stderr and expected in r.stderr, (
        f"expected exit 2 refusing --timeout {value}, saw {r.returncode}: {r.stderr[-500:]!r}")
    if value != "-1":  # a negative number is click's own FloatRange error (a usage block)
        assert_one_line_exit_2(r, f"--timeout {value.replace('1e308', '1e+308')}: expected seconds from 0")
    assert not out.exists(), f"expected no recording for --timeout {value}, saw {out.read_text()[:100]!r}"


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))


def test_a_failed_write_names_the_out_file(tmp_path: Path) -> None:
    out = tmp_path / "small.yaml"
    r = run(["trace", "--out", str(out), "--", "true"], preexec=_file_size_limit)
    assert_one_line_exit_2(r, f"cannot write {out}: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], (
        f"expected no file left, saw {sorted(p.name for p in tmp_path.iterdir())}")


def test_trace_shortens_a_huge_command_and_keeps_markup_as_text(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvmscope.cli import main

    r = CliRunner().invoke(main, ["trace", "--out", str(tmp_path / "t.yaml"), "--", "b" * 100_000])
    assert r.exit_code != 0 and len(r.stderr) < 400, f"one short line, saw {len(r.stderr)} characters"
    assert "(100,000 characters)" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["trace", "--out", str(tmp_path / "m.yaml"), "--", "echo", "[/]", "[bold]x"])
    assert r.exit_code == 0 and "recorded echo [/] [bold]x to" in " ".join(r.output.split()), r.output
