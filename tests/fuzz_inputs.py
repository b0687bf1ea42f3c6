"""A byte-level fuzzer for every file reader and the CLI, under a memory limit and a per-input timeout (issue 13).

Each input is bytes: a seed (the example scenarios, the shipped profiles, CPUID lists, the example CPU templates and
proposal TOML files, known-bad files) mutated at the byte level (flips, cuts, splices, repeated runs, YAML/JSON/TOML
tokens, invalid UTF-8, control characters). Each is given to every reader of its kind and to the command that reads it
(`kvmscope check`, `probe --profile`, `probe --kernel p.toml`, `template read` and `template apply`); a finding is any of:

- an exception that is not kvmscope's own error (a traceback), a hang (over ``--timeout`` seconds), ``MemoryError``
  (the address space is limited to ``--memory`` MiB);
- a CLI run that exits other than 0, 1 or 2, or whose exit-2 error is not one line naming the file;
- two readers of the same scenario that disagree (``load`` and ``stream``; the table and ``--json``).

    python tests/fuzz_inputs.py --seconds 600          # a long run; prints what it did, exits 1 on a finding

tests/test_fuzz_inputs.py runs it for a few seconds in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from kvmscope import template
from kvmscope.cli import main as cli_main
from kvmscope.errors import InvalidValueError, ProfileError, ScenarioError
from kvmscope.kernel import profile, proposal
from kvmscope.scenario import load, stream
from kvmscope.template import TemplateError

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [b"&a ", b"*a", b"!!timestamp ", b"!!int ", b"!!bool ", b"!!binary ", b"!!python/object ", b"<<: ", b"---\n",
          b"...\n", b"[", b"]", b"{", b"}", b": ", b"- ", b"\n", b"\t", b"#", b"'", b'"', b"\\ud800", b"\\u0000",
          b"\x00", b"\xff", b"\xfe\xff", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\x1b[31m", b"[/]", b"[bold]", b"9" * 90,
          b"0x" + b"f" * 40, b"2001-13-45", b"1e999", b"NaN", b"-1", b"null", b"~", b"yes", b"steps:\n", b"scenario: 1\n",
          b"errno: __spec__", b"vcpu: ", b"set_cpuid: {vcpu: 0, file: /dev/zero}", b"file: c.yaml", b"? ", b"|\n",
          b">\n", b"%YAML 1.1\n", b"%TAG ! tag:x,2000:\n", b" = ", b"[[", b'"""', b"base = ", b"title = ", b"nan",
          b"9" * 5000]


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout()


def seeds() -> dict[str, list[bytes]]:
    """Seed files by kind: scenario (YAML), scenario JSON, profile, CPUID list, CPU template (Firecracker's JSON)."""
    yaml_seeds = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.yaml"))]
    yaml_seeds.append(b"scenario: 1\nsteps:\n  - create_vcpu: 0\n  - set_cpuid: {vcpu: 0, file: c.yaml}\n  - run: 0\n")
    json_seeds = [b'{"scenario": 1, "name": "j", "steps": [{"create_vcpu": 0}, {"run": 0, "expect": {"exit": "HltExit"}},'
                  b' {"set_msrs": {"vcpu": 0, "msrs": [["0xce", 0]]}, "expect": "refused"}]}']
    profiles = [(ROOT / "src/kvmscope/profiles" / f"{n}.json").read_bytes() for n in profile.shipped()]
    cpuid = [b"- {function: 0x7, index: 0, edx: 0x10}\n- {function: 1, eax: 0x806f8}\n",
             b'[{"function": "0x7", "ebx": "0x1"}]\n']
    templates = [p.read_bytes() for p in sorted((ROOT / "examples/templates").glob("*.json"))]
    proposals = [p.read_bytes() for p in sorted((ROOT / "examples/proposals").glob("*.toml"))]
    return {"yaml": yaml_seeds, "json": json_seeds, "profile": profiles, "cpuid": cpuid, "template": templates,
            "proposal": proposals}


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        op = rng.randrange(8)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a byte
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a token
            out[at:at] = rng.choice(TOKENS)
        elif op == 2:  # cut a range
            del out[at:at + rng.randrange(1, 64)]
        elif op == 3:  # repeat a range
            chunk = bytes(out[at:at + rng.randrange(1, 32)])
            out[at:at] = chunk * rng.randrange(2, 200)
        elif op == 4:  # splice from another seed
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            out[at:at] = other[start:start + rng.randrange(1, 200)]
        elif op == 5:  # truncate
            del out[at:]
        elif op == 6:  # deep nesting
            n = rng.choice((10, 70, 1000, 20000))
            out[at:at] = b"[" * n + b"]" * n
        else:  # random bytes
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(out)


def verdict(fn: Callable[[], Any], errors: tuple[type[Exception], ...]) -> tuple[str, Any]:
    """("ok", value) or ("error", message); anything else propagates as a finding."""
    try:
        return "ok", fn()
    except errors as e:
        return "error", str(e)


def check_scenario(path: Path) -> None:
    loaded = verdict(lambda: load(path), (ScenarioError,))

    def streamed() -> Any:
        s = stream(path)
        steps = list(s.steps)
        s.header.steps = steps
        return s.header

    streamed_v = verdict(streamed, (ScenarioError,))
    # One verdict per file: a file over the whole-file limits may stream; otherwise both agree.
    if "the limit for a" not in str(loaded[1]):
        assert loaded == streamed_v, f"load and stream disagree: {loaded!r} vs {streamed_v!r}"
    for args in ([], ["--json"]):
        result = CliRunner().invoke(cli_main, ["check", str(path), *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code in (0, 1, 2), f"exit {result.exit_code}: {result.stderr!r}"
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and str(path) in result.stderr, f"not one line: {result.stderr!r}"
        # A file the reader refuses exits 2 (a file it takes may still name a kernel or profile that does not exist).
        assert loaded[0] == "ok" or result.exit_code == 2, (
            f"the CLI's exit {result.exit_code} disagrees with the reader's verdict {loaded!r}")


def check_profile(path: Path) -> None:
    verdict(lambda: profile.load(path), (ProfileError,))
    result = CliRunner().invoke(cli_main, ["probe", "--backend", "model", "--profile", str(path), "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.stderr!r}"
    if result.exit_code == 2:
        assert result.stderr.count("\n") == 1, f"not one line: {result.stderr!r}"


def check_template(path: Path) -> None:
    verdict(lambda: template.load(path), (TemplateError,))
    for args in (["read", str(path), "--json"], ["apply", str(path), "--backend", "model", "--vcpus", "1", "--json"]):
        result = CliRunner().invoke(cli_main, ["template", *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code in (0, 1, 2), f"exit {result.exit_code}: {result.stderr!r}"
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and str(path) in result.stderr, f"not one line: {result.stderr!r}"


def check_proposal(path: Path) -> None:
    verdict(lambda: proposal.load(path), (InvalidValueError,))
    result = CliRunner().invoke(cli_main, ["probe", "--backend", "model", "--profile", "intel-spr", "--kernel",
                                           str(path), "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.stderr!r}"
    if result.exit_code == 2:
        assert result.stderr.count("\n") == 1 and result.stderr.count(str(path)) == 1 and len(result.stderr) < 2000, (
            f"not one short line naming the file once: {result.stderr[:500]!r}")


def run(seconds: float, seed: int, timeout: int, memory_mib: int, log: Any = sys.stdout,
        known: dict[str, int] | None = None) -> int:
    """Fuzz for ``seconds``; returns the number of findings (each printed with a reproducer file). ``known``: names of
    exception types counted apart rather than as findings (a class being fixed elsewhere)."""
    known = dict(known or {})
    resource.setrlimit(resource.RLIMIT_AS, (memory_mib << 20, memory_mib << 20))
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(seed)
    pools = seeds()
    everything = [s for pool in pools.values() for s in pool]
    counts = dict.fromkeys(pools, 0)
    findings = 0
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "c.yaml").write_bytes(pools["cpuid"][0])
        while time.monotonic() < end:
            kind = rng.choice(list(pools))
            data = mutate(rng, rng.choice(pools[kind]), everything)
            target = {"yaml": d / "s.yaml", "json": d / "s.json", "profile": d / "p.json", "cpuid": d / "c.yaml",
                      "template": d / "t.json", "proposal": d / "p.toml"}[kind]
            target.write_bytes(data)
            signal.alarm(timeout)
            try:
                if kind == "profile":
                    check_profile(target)
                elif kind == "template":
                    check_template(target)
                elif kind == "proposal":
                    check_proposal(target)
                else:
                    check_scenario(d / "s.yaml" if kind == "cpuid" else target)
            except Exception as e:  # a finding: anything but kvmscope's own errors, a hang, MemoryError, a disagreement
                if type(e).__name__ in known:
                    known[type(e).__name__] += 1
                    continue
                findings += 1
                fd, name = tempfile.mkstemp(prefix=f"kvmscope-fuzz-{kind}-", suffix=target.suffix)
                os.close(fd)
                keep = Path(name)
                keep.write_bytes(data)
                kind_of = "hang" if isinstance(e, Timeout) else type(e).__name__
                print(f"FINDING ({kind_of}) on {kind} input saved to {keep}:", file=log)
                traceback.print_exception(e, file=log, limit=6)
            finally:
                signal.alarm(0)
                if kind == "cpuid":
                    (d / "c.yaml").write_bytes(pools["cpuid"][0])
            counts[kind] += 1
    total = sum(counts.values())
    print(f"fuzzed {total} inputs in {seconds:.0f} s (seed {seed}, {memory_mib} MiB address space, {timeout} s each): "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())}; {findings} findings"
          + "".join(f"; {v} known {k}" for k, v in known.items()), file=log)
    return findings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--memory", type=int, default=1024, help="address space limit in MiB")
    ap.add_argument("--known", action="append", default=[], metavar="EXCEPTION",
                    help="count this exception type apart instead of as a finding (repeatable)")
    args = ap.parse_args()
    if args.seconds > CHUNK:
        sys.exit(1 if chunked(args) else 0)
    known = dict.fromkeys(args.known, 0)
    sys.exit(1 if run(args.seconds, args.seed, args.timeout, args.memory, known=known) else 0)


CHUNK = 300.0
"""Seconds per child process in a long run: the harness (click's CliRunner) keeps a little of each run alive, about
3 MiB per thousand inputs, which would reach the memory limit in an hour; kvmscope's readers keep nothing."""


def chunked(args: argparse.Namespace) -> int:
    """A long run as children of ``CHUNK`` seconds each (seeds ``seed``, ``seed + 1``, ...); the number of findings."""
    findings = inputs = 0
    left, seed = args.seconds, args.seed
    while left > 0:
        cmd = [sys.executable, __file__, "--seconds", str(min(CHUNK, left)), "--seed", str(seed), "--timeout",
               str(args.timeout), "--memory", str(args.memory), *(a for k in args.known for a in ("--known", k))]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        print(out, end="", flush=True)
        summary = out.rpartition("fuzzed ")[2]
        if not summary:
            findings += 1
            print(f"FINDING: the child with seed {seed} printed no summary", flush=True)
        else:
            inputs += int(summary.split()[0])
            findings += int(summary.split("; ")[1].split()[0])
        left, seed = left - CHUNK, seed + 1
    print(f"in all: fuzzed {inputs} inputs in {args.seconds:.0f} s; {findings} findings")
    return findings


if __name__ == "__main__":
    main()
