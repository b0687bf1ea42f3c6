"""`kvmscope trace`: the seccomp filter, the ioctl names, and real recordings of QEMU on this machine."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmscope import uapi
from kvmscope.api import CpuidEntry
from kvmscope.cli import main
from kvmscope.linux import LinuxSystem
from kvmscope.scenario import Traced, load
from kvmscope.trace import seccomp
from kvmscope.trace.recorder import record

QEMU = shutil.which("qemu-system-x86_64")
# A QEMU that stops before the guest runs (-S), with nothing attached; it aborts at vCPU creation with -cpu host here.
QEMU_ARGS = ["-enable-kvm", "-nographic", "-nodefaults", "-nic", "none", "-S", "-display", "none"]
BY_NAME = {v: k for k, v in uapi.TRACE_IOCTL_NAMES.items()}
REGS = ("eax", "ebx", "ecx", "edx")
TCGETS = 0x5401


def _qemu(cpu: str) -> list[str]:
    assert QEMU, "qemu-system-x86_64 is missing: .ci/run installs Debian's qemu-system-x86"
    return [QEMU, *QEMU_ARGS, "-cpu", cpu]


# --- the filter -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nr", "request_", "arch", "expected"), [
    (seccomp.NR_IOCTL, uapi.KVM_RUN, seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_TRACE),
    (seccomp.NR_IOCTL, uapi.KVM_SET_MSRS, seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_TRACE),
    (seccomp.NR_IOCTL, 0xFFFFFFFF_C008AE88 & 0xFFFFFFFF, seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_TRACE),
    (seccomp.NR_IOCTL, TCGETS, seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_ALLOW),
    (seccomp.NR_IOCTL, BY_NAME["KVM_IRQ_LINE"], seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_ALLOW),
    (seccomp.NR_IOCTL, BY_NAME["KVM_SIGNAL_MSI"], seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_ALLOW),
    (0, uapi.KVM_RUN, seccomp.AUDIT_ARCH_X86_64, seccomp.SECCOMP_RET_ALLOW),  # read(), whatever its args
    (seccomp.NR_IOCTL, uapi.KVM_RUN, 0x40000003, seccomp.SECCOMP_RET_ALLOW),  # not x86_64
])
def test_filter_program(nr: int, request_: int, arch: int, expected: int) -> None:
    skip = [BY_NAME[n] for n in uapi.TRACE_SKIPPED]
    got = seccomp.run_filter(seccomp.program(skip), nr, request_, arch)
    assert got == expected, f"syscall {nr} request 0x{request_:x} arch 0x{arch:x}: expected 0x{expected:x}, got 0x{got:x}"


def test_filter_in_the_kernel(live: LinuxSystem) -> None:
    """Installed for real without a tracer, a TRACE verdict fails the call with ENOSYS: only KVMIO ioctls get it."""
    pid = os.fork()
    if pid == 0:  # the child reports each outcome as one bit of its exit code
        code = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            kvm = os.open("/dev/kvm", os.O_RDWR)
            seccomp.install([BY_NAME[n] for n in uapi.TRACE_SKIPPED])
            if libc.ioctl(kvm, uapi.KVM_GET_API_VERSION, 0) == -1 and ctypes.get_errno() == errno.ENOSYS:
                code |= 1
            if libc.ioctl(kvm, TCGETS, 0) == -1 and ctypes.get_errno() != errno.ENOSYS:  # KVM: EINVAL
                code |= 2
            if libc.ioctl(kvm, BY_NAME["KVM_IRQ_LINE"], 0) == -1 and ctypes.get_errno() != errno.ENOSYS:
                code |= 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the filtered child did not exit within 10 s")
    assert os.WEXITSTATUS(done[1]) == 7, (
        f"expected ENOSYS for KVM_GET_API_VERSION, a real error for TCGETS and for KVM_IRQ_LINE (bits 1|2|4), "
        f"got bits {os.WEXITSTATUS(done[1])}")


def test_ioctl_names_match_the_header() -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "needs a C compiler (gcc) to check against linux/kvm.h"
    lines = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    lines += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in uapi.TRACE_IOCTL_NAMES.values()]
    lines += ["return 0;", "}"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "names.c"
        src.write_text("\n".join(lines))
        subprocess.run([cc, "-o", f"{tmp}/names", str(src)], check=True, capture_output=True, timeout=60)
        out = subprocess.run([f"{tmp}/names"], check=True, capture_output=True, text=True, timeout=10).stdout
    header = {name: int(v) for name, v in (line.split() for line in out.splitlines())}
    wrong = {n: (hex(r), hex(header[n])) for r, n in uapi.TRACE_IOCTL_NAMES.items() if header[n] != r}
    assert not wrong, f"request numbers (ours, kvm.h's) that differ: {wrong}"


# --- real recordings ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`kvmscope trace` of QEMU -cpu host, which aborts at vCPU creation on this host."""
    out = tmp_path_factory.mktemp("trace") / "cpu-host.yaml"
    result = CliRunner().invoke(main, ["trace", "--out", str(out), "--timeout", "60", "--", *_qemu("host")],
                                terminal_width=250)
    return out, " ".join(result.output.split())  # the report wraps at the terminal's width (80 off a terminal)


def test_trace_records_the_arch_capabilities_abort(live: LinuxSystem, host_recording: tuple[Path, str]) -> None:
    path, output = host_recording
    assert "killed by signal 6 (SIGABRT)" in output, f"expected QEMU to abort, got:\n{output}"
    assert re.search(r"refused: KVM_SET_MSRS on vCPU 0: returned 0 of \d+, refused MSR_IA32_ARCH_CAPABILITIES "
                     r"\(0x10a\) = 0x69", output), f"expected the refused ARCH_CAPABILITIES write, got:\n{output}"
    scenario = load(path)
    assert scenario.faithful, "a recording replays faithfully"
    sets = [s for s in scenario.steps if getattr(s, "name", "") == "KVM_SET_MSRS"]
    assert sets and (0x10A, 0x69) in sets[-1].msrs and sets[-1].returned == 0, (  # type: ignore[attr-defined]
        f"expected the last KVM_SET_MSRS to hold 0x10a=0x69 and return 0, got {sets[-1:]}")
    names = [s.name for s in scenario.steps if isinstance(s, Traced)]
    assert "KVM_CREATE_VM" in names and "KVM_X86_SETUP_MCE" in names, f"expected the other ioctls kept, got {names}"
    assert "KVM_IRQ_LINE" not in names, "IRQ_LINE is not trapped"
    # the lists QEMU builds its vCPU model from are kept whole, as KVM gave them
    lists = {s.name: s for s in scenario.steps if isinstance(s, Traced) and (s.indices or s.entries)}
    assert lists["KVM_GET_MSR_INDEX_LIST"].indices == live.get_msr_index_list(), "the index list as KVM gave it"
    assert lists["KVM_GET_MSR_FEATURE_INDEX_LIST"].indices == live.get_msr_feature_index_list()
    from dataclasses import replace

    from kvmscope.template import PER_CPU_BITS

    def mine(entries: list[CpuidEntry]) -> list[CpuidEntry]:  # the APIC ID of the CPU each call ran on left out
        return [replace(e, **{r: getattr(e, r) & ~PER_CPU_BITS.get((e.function, r), 0) for r in REGS}) for e in entries]

    recorded = lists["KVM_GET_SUPPORTED_CPUID"].entries or []
    assert mine(recorded) == mine(live.get_supported_cpuid()), "the supported CPUID as KVM gave it"
    failed = [s for s in scenario.steps if isinstance(s, Traced) and s.errno and (s.indices or s.entries)]
    assert not failed, f"a failed query (E2BIG) keeps no list: {failed[:1]}"


@pytest.mark.parametrize("backend", ["model", "linux"])
def test_check_explains_the_recording(live: LinuxSystem, host_recording: tuple[Path, str], backend: str) -> None:
    """Replayed on the live kernel and on the model (this host's profile), every recorded result comes back."""
    path, _ = host_recording
    result = CliRunner().invoke(main, ["check", str(path), "--backend", backend, "--profile", "pvm-6.18"],
                                terminal_width=250)
    assert result.exit_code == 0, f"expected every recorded result reproduced on {backend}, got:\n{result.output}"
    for text in ("refused MSR_IA32_ARCH_CAPABILITIES (0x10a)", "a5d563890b8f", "since 6.13",
                 "CPUID.7.0:EDX[29]", "expected: count 0 -> met"):
        assert text in result.output, f"expected {text!r} in the {backend} report, got:\n{result.output}"


def test_compare_names_the_kernels_that_accept_it(host_recording: tuple[Path, str]) -> None:
    path, _ = host_recording
    result = CliRunner().invoke(main, ["check", str(path), "--compare", "6.3,6.12,6.13,6.18", "--profile",
                                       "pvm-6.18"], terminal_width=300)
    flat = " ".join(result.output.split())
    assert re.search(r"ioctl: accepted on 6\.3, 6\.12 \(this kernel takes what the recording's kernel refused: the VMM "
                     r"gets further here\); refused at MSR_IA32_ARCH_CAPABILITIES on 6\.13, 6\.18 by a5d563890b8f "
                     r"\(since 6\.13:", flat), f"expected 6.3-6.12 to accept, got:\n{result.output}"
    assert result.exit_code == 0 and "got further than the recording on 6.3, 6.12" in flat, result.output[-300:]


def _vcpu_ioctls(path: Path) -> list[str]:
    """The vCPU ioctls of a recording, in order (typed steps by name, traced ones too)."""
    out = []
    for s in load(path).steps:
        name = getattr(s, "name", "")
        if isinstance(s, Traced) and s.on != "vcpu":
            continue
        if name:
            out.append(name)
    return out


def test_faithful_replay_issues_only_the_recorded_ioctls(live: LinuxSystem, host_recording: tuple[Path, str],
                                                         tmp_path: Path) -> None:
    """The tracer records `check --backend linux` replaying a recording: the replay's vCPU ioctls are exactly the
    VMM's vCPU-model ones. Without ``faithful`` the replay adds register set-up and reads, and the test sees it."""
    path, _ = host_recording
    replayed = ("KVM_CREATE_VCPU", "KVM_X86_SETUP_MCE", "KVM_SET_CPUID2", "KVM_SET_MSRS", "KVM_GET_MSRS", "KVM_RUN")
    recorded = [n for n in _vcpu_ioctls(path) if n in replayed]
    unfaithful = tmp_path / "unfaithful.yaml"
    unfaithful.write_text(path.read_text().replace("faithful: true\n", ""))
    seen = {}
    for name, scenario in (("faithful", path), ("unfaithful", unfaithful)):
        replay = tmp_path / f"replay-{name}.yaml"
        with open(replay, "w") as out:
            r = record([str(Path(sys.executable).parent / "kvmscope"), "check", str(scenario), "--backend", "linux",
                        "--profile", "pvm-6.18"], out, timeout=120)
        assert r.exit_code == 0, f"the replay of {name} failed: {r.ended}"
        seen[name] = _vcpu_ioctls(replay)
    assert seen["faithful"] == recorded, f"expected the replay's vCPU ioctls {recorded}, got {seen['faithful']}"
    assert "KVM_SET_SREGS" in seen["unfaithful"], f"expected extra set-up without faithful: {seen['unfaithful']}"


def test_timeout_kills_the_command_and_its_threads(live: LinuxSystem, tmp_path: Path) -> None:
    with open(tmp_path / "q.yaml", "w") as out:
        r = record(_qemu("qemu64"), out, timeout=2)
    assert r.timed_out and r.signal == 9, f"expected QEMU -S killed after 2 s, got {r.ended}"
    assert r.summary.vcpus == [0] and r.summary.runs.get(0, 0) == 0, f"expected a vCPU that never ran: {r.summary}"
    assert not Path(f"/proc/{r.pid}").exists(), f"expected QEMU (pid {r.pid}) gone, it is still there"


# --- what-if: the corpus matrix and proposed rules ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus" / "qemu-7.2"
REVERT = ROOT / "examples" / "proposals" / "revert-arch-cap-check.toml"


def test_corpus_matrix_names_the_kernels_and_the_proposal() -> None:
    result = CliRunner().invoke(main, ["check", "--corpus", str(CORPUS), "--compare", f"6.12,6.18,{REVERT}", "--json"])
    assert result.exit_code == 0, result.output
    cells = {(c["recording"], c["kernel"]): c for c in __import__("json").loads(result.output)["cells"]}
    recordings = {r for r, _ in cells}
    assert {"qemu64", "skylake-server", "host-arch-cap-off", "host", "reset", "hotplug", "savevm-loadvm",
            "migrate-out", "migrate-in"} <= recordings, f"expected the whole corpus, got {sorted(recordings)}"
    assert cells[("host", "6.12")]["ok"], f"expected 6.12 to accept -cpu host's writes: {cells[('host', '6.12')]}"
    on_618 = cells[("host", "6.18")]
    assert not on_618["ok"] and "MSR_IA32_ARCH_CAPABILITIES (0x10a) = 0x69" in on_618["text"] \
        and on_618["rule"] == "a5d563890b8f" and on_618["as_recorded"], f"expected the 6.13 refusal: {on_618}"
    assert cells[("host", str(REVERT))]["ok"], f"expected the proposal to accept it: {cells[('host', str(REVERT))]}"


FREEZE_SCENARIO = """scenario: 1
steps:
  - create_vcpu: 0
  - set_msrs: {vcpu: 0, msrs: {UCODE_REV: 0x100000000}}
  - run: 0
  - set_msrs: {vcpu: 0, msrs: {UCODE_REV: 0x200000000}}
"""


def test_a_proposed_freeze_refuses_what_the_kernel_accepts(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(FREEZE_SCENARIO)
    (tmp_path / "freeze-ucode.toml").write_text('base = "6.18"\nimmutable = ["UCODE_REV"]\n')
    outcomes = {}
    for kernel in ("6.18", str(tmp_path / "freeze-ucode.toml")):
        result = CliRunner().invoke(main, ["check", str(tmp_path / "s.yaml"), "--kernel", kernel, "--json"])
        outcomes[kernel] = __import__("json").loads(result.output)["steps"][3]["outcome"]
    assert outcomes == {"6.18": "accepted", str(tmp_path / "freeze-ucode.toml"): "refused"}, (
        f"expected UCODE_REV writable on 6.18 and frozen by the proposal, got {outcomes}")


@pytest.mark.parametrize(("text", "message"), [
    ('base = "6.18"\nimmutable = ["NO_SUCH_MSR"]\n', "NO_SUCH_MSR"),
    ('base = "6.18"\nremove = ["no_such_rule"]\n', "no rule named 'no_such_rule'"),
    ('immutable = []\n', "base: expected a kernel version"),
    ('base = "6.18"\nfreeze = true\n', "unknown field(s) ['freeze']"),
    ('base = 6.18.1\n', "not valid TOML"),
])
def test_a_bad_proposal_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "s.yaml").write_text(FREEZE_SCENARIO)
    (tmp_path / "p.toml").write_text(text)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "s.yaml"), "--kernel", str(tmp_path / "p.toml")])
    said = "".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "".join(message.split()) in said and str(tmp_path / "p.toml") in said, (
        f"expected exit 2 naming the file and {message!r}, got {result.exit_code}: {result.output}")


def test_trace_boot_records_the_first_run_and_counts_the_rest(live: LinuxSystem, tmp_path: Path) -> None:
    """A real SeaBIOS boot (QEMU -cpu qemu64 to "No bootable device", then quit through the monitor)."""
    from kvmscope.trace.corpus import CASES, run_case

    seconds, result, drove = run_case(CASES[0], tmp_path, tmp_path / "qemu64.yaml", timeout=120)
    assert result is not None and drove.error is None and result.exit_code == 0, (
        f"expected QEMU to boot and quit, got {result.ended if result else None}, driver: {drove.error}")
    steps = load(tmp_path / "qemu64.yaml").steps
    first = [s for s in steps if getattr(s, "name", "") == "KVM_RUN" and not isinstance(s, Traced)]
    counted = sum(s.count for s in steps if isinstance(s, Traced) and s.name == "KVM_RUN")
    assert len(first) == 1 and "first run" in first[0].label, f"expected one first KVM_RUN step, got {first}"
    assert counted + 1 >= result.summary.runs[0] - 5 and counted > 100, (
        f"expected the later runs counted (summary {result.summary.runs}), got {counted}")
    writes = [s for s in steps if getattr(s, "name", "") == "KVM_SET_MSRS"]
    mtrr = [s for s in writes if any(i == 0x2FF for i, _ in s.msrs)]  # type: ignore[attr-defined]
    assert mtrr and all(s.returned == len(s.msrs) for s in mtrr), (  # type: ignore[attr-defined]
        "expected QEMU's MTRRdefType writes, all accepted by the live kernel")


@pytest.mark.parametrize("recording", sorted(p.stem for p in CORPUS.glob("*.yaml")))
def test_corpus_replays_identically_on_the_live_kernel_and_the_model(live: LinuxSystem, recording: str) -> None:
    """Every recorded result comes back on the kernel that recorded it, and the model of this host gives the same
    outcome and exit at every step. KVM_X86_SETUP_MCE (without it QEMU's MCG_CTL write is refused) and
    KVM_CREATE_IRQCHIP (ASYNC_PF_INT needs the in-kernel LAPIC) are replayed on both."""
    import json

    outcomes = {}
    for backend in ("linux", "model"):
        result = CliRunner().invoke(main, ["check", str(CORPUS / f"{recording}.yaml"), "--backend", backend,
                                           "--profile", "pvm-6.18", "--json"])
        report = json.loads(result.output)
        unmet = [s for s in report["steps"] if s.get("met") is False]
        assert result.exit_code == 0 and not unmet, f"{backend}: expected every recorded result, got {unmet[:3]}"
        outcomes[backend] = [(s["kind"], s["outcome"], s.get("exit")) for s in report["steps"]]
        asked = [s["summary"] for s in report["steps"] if s["outcome"] == "differs"]
        assert not asked, f"{backend}: every capability QEMU asked for answers as recorded, saw {asked[:3]}"
    differ = [(n, a, b) for n, (a, b) in enumerate(zip(outcomes["linux"], outcomes["model"], strict=True)) if a != b]
    assert not differ, f"{recording}: live and model differ at (step, live, model) {differ[:3]}"


_ASKING = """scenario: 1
name: asking
faithful: true
steps:
- {traced: {on: "system", name: "KVM_CHECK_EXTENSION", detail: "KVM_CAP_XSAVE2", returned: 4096}}
- {traced: {on: "vm", name: "KVM_CHECK_EXTENSION", detail: "capability 218", returned: 1}}
- {traced: {on: "vm", name: "KVM_ENABLE_CAP", returned: 0,
            detail: "KVM_CAP_X86_TRIPLE_FAULT_EVENT flags 0x0 args [0x1, 0x0, 0x0, 0x0]"}}
- {traced: {on: "system", name: "KVM_CHECK_EXTENSION", detail: "KVM_CAP_USER_MEMORY", returned: 1}}
- {ioctl: {vcpu: 0, name: "KVM_CREATE_VCPU", returned: 0}}
"""


@pytest.mark.parametrize(("kernel", "asked"), [
    ("5.10", ["KVM_CAP_XSAVE2 = 0", "KVM_CAP_X86_TRIPLE_FAULT_EVENT = 0",
              "KVM_CAP_X86_TRIPLE_FAULT_EVENT not offered"]),
    ("5.17", ["KVM_CAP_X86_TRIPLE_FAULT_EVENT = 0", "KVM_CAP_X86_TRIPLE_FAULT_EVENT not offered"]),
    ("6.0", [])])
def test_a_recorded_capability_query_is_asked_again(tmp_path: Path, kernel: str, asked: list[str]) -> None:
    """The capabilities a VMM asked for (recorded on 6.18) set against what an older kernel answers: where it answers
    otherwise the VMM would have taken another path, "differs", with the rule that brings the capability."""
    import json

    from kvmscope.trace.whatif import first_refusal

    (tmp_path / "asking.yaml").write_text(_ASKING)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "asking.yaml"), "--kernel", kernel, "--json"])
    steps = json.loads(result.output)["steps"]
    got = [s["asked"] for s in steps if s["outcome"] == "differs"]
    assert result.exit_code == 0 and got == asked, f"{kernel}: expected {asked}, saw {got} (exit {result.exit_code})"
    assert all(any("since 5.17" in n or "since 6.0" in n for n in s["notes"]) for s in steps
               if s["outcome"] == "differs"), f"{kernel}: each difference names its rule: {steps}"
    cell = first_refusal(tmp_path / "asking.yaml", kernel, "pvm-6.18")
    names = list(dict.fromkeys(a.split()[0] for a in asked))
    assert cell.ok and (cell.differs, cell.capabilities) == (len(names), names), f"{kernel}: the cell names them: {cell}"


@pytest.mark.parametrize(("kernel", "lists"), [
    ("5.10", {"KVM_GET_MSR_FEATURE_INDEX_LIST": ["MSR_PLATFORM_INFO (0xce) (platform_info_immutable, since 6.13)"],
              "KVM_GET_SUPPORTED_CPUID": ["CPUID 0x80000021.0 (leaf) (cpuid_80000021, since 5.18)",
                                          "CPUID 0x80000008.0 ebx bit(s) 28 (cpuid_amd_psfd, since 5.16)"]}),
    # 6.12 lacks only HYPERVISOR and TSC_DEADLINE in leaf 1, which QEMU sets itself: its CPUID answer is no other path
    ("6.12", {"KVM_GET_MSR_FEATURE_INDEX_LIST": ["MSR_PLATFORM_INFO (0xce) (platform_info_immutable, since 6.13)"]}),
    ("6.18", {})])
def test_a_recorded_list_is_set_against_the_kernel_replayed(kernel: str, lists: dict[str, list[str]]) -> None:
    """QEMU builds its vCPU model from KVM_GET_MSR_FEATURE_INDEX_LIST and KVM_GET_SUPPORTED_CPUID: where an older kernel
    lists less than the recording's 6.18, the step "differs", naming what is missing and the rule that brings it."""
    import json

    result = CliRunner().invoke(main, ["check", str(CORPUS / "host.yaml"), "--kernel", kernel, "--profile", "pvm-6.18",
                                       "--json"])
    report = json.loads(result.output)
    steps = {s["summary"].split(":")[0].removeprefix("recorded "): s for s in report["steps"]
             if s["outcome"] == "differs" and s["asked"].startswith("KVM_GET_")}
    assert result.exit_code == 0 and sorted(steps) == sorted(lists), f"{kernel}: lists differing {sorted(steps)}"
    for name, wants in lists.items():
        for want in wants:
            assert want in steps[name]["summary"], f"{kernel}: expected {want!r} in {steps[name]['summary']!r}"
    assert sorted(report["lists_answer_otherwise"]) == sorted(lists), report["lists_answer_otherwise"]
    assert all(not c.startswith("KVM_GET_") for c in report["capabilities_answer_otherwise"])
    assert not any("cpuid_hypervisor" in s["summary"] or "cpuid_tsc_deadline" in s["summary"] for s in steps.values())
    # replayed on another host, the lists differ with no release to explain it: noted, not "differs"
    result = CliRunner().invoke(main, ["check", str(CORPUS / "host.yaml"), "--kernel", kernel, "--profile",
                                       "intel-spr", "--json"])
    report = json.loads(result.output)
    noted = [n for s in report["steps"] for n in s["notes"] if "no release in the rules explains" in n]
    # what intel-spr never has (AMD's leaves, PVM's MSRs) is another host's answer on every kernel; only PLATFORM_INFO,
    # a feature MSR intel-spr has from 6.13, is a release's
    want = [] if kernel == "6.18" else ["KVM_GET_MSR_FEATURE_INDEX_LIST"]
    assert report["lists_answer_otherwise"] == want, f"{kernel} on intel-spr: {report['lists_answer_otherwise']}"
    assert len(noted) >= 2, f"{kernel} on intel-spr: the host's other lists are noted, saw {noted}"


def test_a_recording_replayed_where_the_kernel_takes_more_is_not_a_failure() -> None:
    """QEMU's ARCH_CAPABILITIES write was refused on the recording's 6.18 host (a5d563890b8f, 6.13); 6.1 takes it. The
    step misses its recorded expectation in the VMM's favour: "beyond the recording", not a failure. The capability
    KVM_ENABLE_CAP took on 6.18 (MAX_VCPU_ID) cannot be enabled before 6.0 (35875316384b)."""
    import json

    for kernel, beyond in (("6.1", True), ("6.18", False)):
        result = CliRunner().invoke(main, ["check", str(CORPUS / "host.yaml"), "--kernel", kernel, "--profile",
                                           "pvm-6.18", "--json"])
        steps = json.loads(result.output)["steps"]
        further = [s["number"] for s in steps if s["beyond_recording"]]
        assert result.exit_code == 0 and bool(further) is beyond, f"{kernel}: exit {result.exit_code}, {further}"
    result = CliRunner().invoke(main, ["check", str(CORPUS / "host.yaml"), "--compare", "5.10,6.18", "--profile",
                                       "pvm-6.18"])
    assert result.exit_code == 0 and "got further than the recording on 5.10" in result.output, result.output[-400:]
    result = CliRunner().invoke(main, ["check", str(CORPUS / "host.yaml"), "--kernel", "5.19", "--profile", "pvm-6.18",
                                       "--json"])
    asked = [s["asked"] for s in json.loads(result.output)["steps"] if s["outcome"] == "differs"]
    assert "KVM_CAP_MAX_VCPU_ID not enabled" in asked, asked


def test_a_command_that_stops_itself_goes_on(tmp_path: Path) -> None:
    """A SIGSTOP the traced command sends itself is a group-stop: resumed, not re-injected forever."""
    with open(tmp_path / "sh.yaml", "w") as out:
        r = record(["sh", "-c", "kill -STOP $$; exit 3"], out, timeout=20)
    assert not r.timed_out and r.exit_code == 3, f"expected the shell to go on and exit 3, got: {r.ended}"
    assert r.summary.calls == 0 and load(tmp_path / "sh.yaml").steps == [], "no KVM ioctl, no step"


def test_attach_records_a_running_vmm_and_lets_it_go(live: LinuxSystem, tmp_path: Path) -> None:
    from kvmscope.trace.corpus import CASES, prepare, qemu_argv

    prepare(CASES[0], tmp_path)
    qemu = subprocess.Popen(qemu_argv(CASES[0], tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # SeaBIOS is running
        out = tmp_path / "attached.yaml"
        result = CliRunner().invoke(main, ["trace", "--attach", str(qemu.pid), "--timeout", "3", "--out", str(out)],
                                    terminal_width=250)
        said = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code == 0 and "runs on (kvmscope trace detached from it)" in said, result.output
        time.sleep(0.5)
        assert qemu.poll() is None, f"expected QEMU to run on after the detach, it exited with {qemu.returncode}"
        state = Path(f"/proc/{qemu.pid}/status").read_text().split("\n")[2]
        assert "T (" not in state, f"expected QEMU not stopped after the detach, got {state!r}"
        steps = load(out).steps
        assert steps[0].kind == "create_vcpu" and "existed at attach" in steps[0].label, steps[:1]
        runs = [s for s in steps if getattr(s, "name", "") == "KVM_RUN"]
        assert runs and all(getattr(s, "pid", None) is None for s in runs), (
            f"expected KVM_RUNs recorded as the followed VM's (no pid), saw {runs[:3]}")
    finally:
        qemu.kill()
        # A killed QEMU exits once the kernel has torn its VM down: over 10 s once under a full test run, over 120 s
        # once more (4 December, the detach checked above had passed). That is the host's teardown, not what this
        # test checks: wait for it, and say so if it lasts.
        try:
            qemu.wait(timeout=300)
        except subprocess.TimeoutExpired:
            warnings.warn(f"QEMU {qemu.pid} still tearing down 300 s after SIGKILL", stacklevel=1)


def test_trace_needs_a_command_or_attach() -> None:
    for args in (["trace"], ["trace", "--attach", "1", "--", "true"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "give a COMMAND to run, or --attach PID" in result.output, result.output


def test_overhead_benchmark_runs(live: LinuxSystem) -> None:
    """The per-call figures of docs/performance.md come from this command (smoke run: tiny counts)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_overhead.py"), "--per-call", "300",
                           "--runs", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = __import__("json").loads(done.stdout)
    assert figures["kvm"]["traced_us"] > figures["kvm"]["untraced_us"], f"a trapped ioctl costs more: {figures}"
    assert set(figures) == {"kvm", "getppid"}, figures


def test_writer_steps_counts_and_phases() -> None:
    """Calls as the tracer hands them over, to the steps the scenario reader gets back."""
    import io

    from kvmscope.scenario import DisableQuirks, Ioctl, parse
    from kvmscope.trace.decode import Call, Writer

    out = io.StringIO()
    w = Writer(out, "unit", "synthetic calls")

    def call(name: str, obj: str = "vcpu", result: int = 0, **data: object) -> Call:
        request = BY_NAME[name]
        fd = {"system": 3, "vm": 4}.get(obj, 6)  # /dev/kvm, the VM KVM_CREATE_VM made, its vCPU
        return Call(0.5, 100, 100, fd, obj, 0, request, 0, name, dict(data), result)

    w.add(call("KVM_CREATE_VM", "system", 4))
    w.add(call("KVM_ENABLE_CAP", "vm", 0, cap=uapi.KVM_CAP_DISABLE_QUIRKS2, flags=0, args=[0x100, 0, 0, 0]))
    w.add(call("KVM_CREATE_VCPU", "vm", 6, value=0))
    for _ in range(3):
        w.add(call("KVM_GET_REGS"))
    assert w.run(call("KVM_RUN"))
    w.add(call("KVM_RUN", result=-errno.EINTR))  # an interrupted first try: the next one is still the first
    assert w.run(call("KVM_RUN"))
    w.add(call("KVM_RUN", exit_reason=uapi.KVM_EXIT_IO))
    assert not w.run(call("KVM_RUN")) and not w.run(call("KVM_RUN")), "later runs are counted"
    w.add(call("KVM_SET_MSRS", result=0, msrs=[(0xCE, 0)]))
    summary = w.close()
    steps = parse(out.getvalue(), "unit.yaml").steps
    kinds = [(s.kind, getattr(s, "name", ""), getattr(s, "count", None)) for s in steps]
    assert kinds == [
        ("traced", "KVM_CREATE_VM", 1), ("disable_quirks", "", None), ("ioctl", "KVM_CREATE_VCPU", None),
        ("traced", "KVM_GET_REGS", 3), ("traced", "KVM_RUN", 1), ("ioctl", "KVM_RUN", None),
        ("traced", "KVM_RUN", 2), ("ioctl", "KVM_SET_MSRS", None)], kinds
    assert isinstance(steps[1], DisableQuirks) and steps[1].quirks == 0x100
    assert isinstance(steps[7], Ioctl) and steps[7].returned == 0 and steps[7].msrs == [(0xCE, 0)]
    phases = [s.label.split()[3] for s in steps]
    assert phases[:3] == ["creation"] * 3 and phases[5] == "run" and phases[7] == "reload", phases
    assert summary.runs == {0: 4} and summary.refused == [
        "KVM_SET_MSRS on vCPU 0: returned 0 of 1, refused MSR_PLATFORM_INFO (0xce) = 0x0"], summary


def test_counted_runs_carry_the_span_of_their_times() -> None:
    """Later runs are counted into one step, written when the vCPU's next step comes: the label gives the first and the
    last run's time, since another thread's step can fall between them."""
    import io

    from kvmscope.scenario import parse
    from kvmscope.trace.decode import Call, Writer

    out = io.StringIO()
    w = Writer(out, "unit", "runs over time")

    def call(t: float, name: str, obj: str = "vcpu", result: int = 0, **data: object) -> Call:
        fd = {"system": 3, "vm": 4}.get(obj, 6)
        return Call(t, 100, 100, fd, obj, 0, BY_NAME[name], 0, name, dict(data), result)

    w.add(call(0.1, "KVM_CREATE_VM", "system", 4))
    w.add(call(0.2, "KVM_CREATE_VCPU", "vm", 6, value=0))
    assert w.run(call(0.3, "KVM_RUN"))
    w.add(call(0.3, "KVM_RUN", exit_reason=uapi.KVM_EXIT_IO))
    for t in (1.0, 1.5, 2.0):
        assert not w.run(call(t, "KVM_RUN")), f"the run at t={t} should be counted"
    w.add(call(2.5, "KVM_SET_MSRS", result=1, msrs=[(0xCE, 0)]))
    w.close()
    runs = [s for s in parse(out.getvalue(), "unit.yaml").steps if getattr(s, "count", 0) == 3]
    assert [r.label.split(" pid")[0] for r in runs] == ["t=1.000000..2.000000"], out.getvalue()


def test_writer_follows_one_vm_of_a_process_that_makes_several() -> None:
    """kvmscope probe (and a VMM that restarts its VM) creates several VMs in one process: only the first VM's vCPU
    calls become replayed steps; another VM's, with the same vCPU id, are traced with their pid, and replay does not
    repeat another VM's KVM_CREATE_IRQCHIP."""
    import io

    from kvmscope.scenario import parse
    from kvmscope.trace.decode import Call, Writer

    out = io.StringIO()
    w = Writer(out, "unit", "two VMs in one process")

    def call(name: str, fd: int, obj: str, result: int = 0, **data: object) -> Call:
        return Call(0.5, 100, 100, fd, obj, 0, BY_NAME[name], 0, name, dict(data), result)

    w.add(call("KVM_CREATE_VM", 3, "system", 4))
    w.add(call("KVM_CREATE_VCPU", 4, "vm", 5, value=0))
    w.add(call("KVM_SET_MSRS", 5, "vcpu", 1, msrs=[(0xCE, 0)]))
    w.add(call("KVM_CREATE_VM", 3, "system", 6))  # a second VM while the first is open
    w.add(call("KVM_CREATE_IRQCHIP", 6, "vm"))
    w.add(call("KVM_CREATE_VCPU", 6, "vm", 7, value=0))
    w.add(call("KVM_SET_MSRS", 7, "vcpu", 1, msrs=[(0xCE, 0)]))
    w.add(call("KVM_SET_MSRS", 5, "vcpu", 1, msrs=[(0x8B, 0)]))
    summary = w.close()
    steps = parse(out.getvalue(), "unit.yaml").steps
    kinds = [(s.kind, getattr(s, "name", ""), getattr(s, "pid", None)) for s in steps]
    assert kinds == [
        ("traced", "KVM_CREATE_VM", None), ("ioctl", "KVM_CREATE_VCPU", None), ("ioctl", "KVM_SET_MSRS", None),
        ("traced", "KVM_CREATE_VM", None), ("traced", "KVM_CREATE_IRQCHIP", 100), ("traced", "KVM_CREATE_VCPU", 100),
        ("traced", "KVM_SET_MSRS", 100), ("ioctl", "KVM_SET_MSRS", None)], kinds
    assert summary.other_vms == 1, summary
    from kvmscope.check import replay
    from kvmscope.model import open_model

    with open_model() as kvm:
        result = replay(parse(out.getvalue(), "unit.yaml"), kvm)
    assert result.ok, [r.summary for r in result.steps if not r.ok]
    irqchip = next(r for r in result.steps if "KVM_CREATE_IRQCHIP" in r.summary)
    assert "not replayed" in irqchip.summary, f"another VM's KVM_CREATE_IRQCHIP was replayed: {irqchip.summary}"


def test_corpus_takes_json_and_yml_scenarios_too(tmp_path: Path) -> None:
    shutil.copy(CORPUS / "reset.yaml", tmp_path / "a.yaml")
    shutil.copy(ROOT / "examples" / "platform-info-after-run.yaml", tmp_path / "b.yml")
    (tmp_path / "c.json").write_text('{"scenario": 1, "steps": [{"create_vcpu": 0}]}')
    result = CliRunner().invoke(main, ["check", "--corpus", str(tmp_path), "--compare", "6.12,6.18", "--json"])
    names = {c["recording"] for c in __import__("json").loads(result.output)["cells"]}
    assert names == {"a", "b", "c"}, f"expected every scenario of the folder, got {sorted(names)}"


def test_corpus_honours_each_scenarios_profile_and_skips_other_json(tmp_path: Path) -> None:
    # A scenario that names its host is replayed on it (it ran on pvm-6.18 and was OK on 6.18); a profile or a template
    # kept next to the scenarios is not one (it made the whole folder exit 2).
    import shutil

    for name in ("sandbox-reset-snapshot-intel.yaml", "platform-info-after-run.yaml", "templates/t2s-like.json"):
        shutil.copy(ROOT / "examples" / name, tmp_path)
    shutil.copy(ROOT / "src/kvmscope/profiles/intel-spr.json", tmp_path / "myhost.json")
    result = CliRunner().invoke(main, ["check", "--corpus", str(tmp_path), "--compare", "6.3,6.18", "--json"])
    assert result.exit_code == 0, result.output
    cells = {(c["recording"], c["kernel"]): c for c in __import__("json").loads(result.output)["cells"]}
    assert set(cells) == {(r, k) for r in ("sandbox-reset-snapshot-intel", "platform-info-after-run")
                          for k in ("6.3", "6.18")}, sorted(cells)
    intel = cells["sandbox-reset-snapshot-intel", "6.18"]
    assert intel["profile"] == "intel-spr" and not intel["ok"] and intel["rule"] == "0094f62c7eaa", intel


def test_only_a_recording_gets_further_than_its_expectation(tmp_path: Path) -> None:
    """"Beyond the recording" is for `kvmscope trace` recordings (faithful: true): an author's `ioctl` step that expects
    PLATFORM_INFO refused after KVM_RUN (docs/scenarios.md) still fails on a kernel that takes the write (6.12)."""
    steps = """steps:
- {ioctl: {name: KVM_CREATE_VCPU, vcpu: 0, returned: 0}}
- {ioctl: {name: KVM_RUN, vcpu: 0, returned: 0}}
- {ioctl: {name: KVM_SET_MSRS, vcpu: 0, msrs: {0xce: 0}, returned: 0}}
"""
    for faithful, code in (("", 1), ("faithful: true\n", 0)):
        (tmp_path / "s.yaml").write_text(f"scenario: 1\n{faithful}{steps}")
        result = CliRunner().invoke(main, ["check", str(tmp_path / "s.yaml"), "--kernel", "6.12", "--profile",
                                           "intel-spr"])
        assert result.exit_code == code, f"faithful={bool(faithful)}: expected exit {code}, got:\n{result.output}"


def test_a_recorded_enable_cap_with_flags_the_kernel_lacks_differs(tmp_path: Path) -> None:
    """KVM_ENABLE_CAP(X2APIC_API) with DISABLE_SUPPRESS_EOI_BROADCAST (0x8, 6.18.17) on 6.1, which takes only 0x3 (6.12.118
    x86.c:6111-6114 checks the flags against KVM_X2APIC_API_VALID_FLAGS)."""
    import json

    (tmp_path / "x.yaml").write_text("""scenario: 1
faithful: true
steps:
- {traced: {on: "vm", name: "KVM_ENABLE_CAP", returned: 0,
            detail: "KVM_CAP_X2APIC_API flags 0x0 args [0x8, 0x0, 0x0, 0x0]"}}
""")
    for kernel, asked in (("6.1", ["KVM_CAP_X2APIC_API flags 0x8 not taken"]), ("6.18.17", [])):
        result = CliRunner().invoke(main, ["check", str(tmp_path / "x.yaml"), "--kernel", kernel, "--json"])
        steps = json.loads(result.output)["steps"]
        got = [s["asked"] for s in steps if s["outcome"] == "differs"]
        assert got == asked, f"{kernel}: expected {asked}, saw {got}"
        assert not asked or "6517dfbcc918" in steps[0]["notes"][0], f"{kernel}: the rule for the flags: {steps[0]}"



def test_a_batch_holding_an_msr_the_kernel_does_not_list_is_not_its_failure(tmp_path: Path) -> None:
    """A recording from a 6.18 Sapphire Rapids host whose VMM saved XFD, which the recorded KVM_GET_MSR_INDEX_LIST
    named, replayed on 5.10 (no XFD before 5.17): the VMM takes its batch from that list, so it would not have sent XFD
    there. The refusal is marked so, with the rule, and is not a failure; without the recorded list it is one."""
    import json

    from kvmscope.kernel.profile import load as load_profile
    from kvmscope.trace.whatif import first_refusal

    listed = ", ".join(f"0x{i:x}" for i in load_profile("intel-spr").msr_index_list)
    steps = ['- {ioctl: {name: "KVM_CREATE_VCPU", vcpu: 0, returned: 12}}',
             '- {ioctl: {name: "KVM_SET_MSRS", vcpu: 0, msrs: [[0x1c4, 0x0], [0x10, 0x0]], returned: 2}}']
    head = "scenario: 1\nname: xfd\nprofile: intel-spr\nfaithful: true\nsteps:\n"
    with_list = tmp_path / "xfd.yaml"
    with_list.write_text(head + "\n".join([f'- {{traced: {{on: "system", name: "KVM_GET_MSR_INDEX_LIST", indices: '
                                            f'[{listed}], returned: 0}}}}', *steps]) + "\n")
    result = CliRunner().invoke(main, ["check", str(with_list), "--kernel", "5.10", "--json"])
    report = json.loads(result.output)
    batch = report["steps"][-1]
    assert result.exit_code == 0 and batch["not_listed"] and report["not_listed"] == 1, (result.exit_code, batch)
    assert batch["met"] is False and any("xfd_msrs, since 5.17" in n for n in batch["notes"]), batch["notes"]
    assert first_refusal(with_list, "5.10", None).ok, "the corpus cell does not stop at it"
    result = CliRunner().invoke(main, ["check", str(with_list), "--kernel", "6.18", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["not_listed"] == 0, result.output[-300:]
    without = tmp_path / "xfd-no-list.yaml"
    without.write_text(head + "\n".join(steps) + "\n")
    result = CliRunner().invoke(main, ["check", str(without), "--kernel", "5.10"])
    assert result.exit_code == 1, f"without the recorded list the refusal is a failure: {result.output[-300:]}"


def test_a_recorded_list_on_the_live_kernel_is_judged_with_its_model(live: LinuxSystem, tmp_path: Path) -> None:
    """On the live kernel the model alongside (this host) explains the lists: one a 6.12 host would have recorded,
    without PLATFORM_INFO in the feature-MSR list, gets a note that this kernel gives more; an item no release
    explains (an MSR nothing lists) gets a note too; neither is a failure."""
    import json

    text = (CORPUS / "host.yaml").read_text()
    old = text.replace('name: "KVM_GET_MSR_FEATURE_INDEX_LIST", indices: [0x8b, 0x10a, 0x345, 0xce]',
                       'name: "KVM_GET_MSR_FEATURE_INDEX_LIST", indices: [0x8b, 0x10a, 0x345, 0x999]')
    assert old != text, "the corpus recording has the feature-MSR list this test edits"
    (tmp_path / "old.yaml").write_text(old)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "old.yaml"), "--backend", "linux", "--json"])
    report = json.loads(result.output)
    step = next(s for s in report["steps"] if "KVM_GET_MSR_FEATURE_INDEX_LIST" in s["summary"] and s["kind"] == "traced"
                and "(not replayed)" in s["summary"] and "errno" not in s["summary"] and s["notes"])
    notes = " ".join(step["notes"])
    assert step["outcome"] == "ok" and "1 recorded item(s) this kernel lacks" in notes and "gives 1 item(s)" in notes, (
        f"expected the two notes on the live kernel, saw {step['outcome']}: {step['notes']}")
    assert result.exit_code == 0, result.output[-300:]
