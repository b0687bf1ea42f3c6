"""The recorded corpus: QEMU (Debian's 7.2) driven through its phases under ``kvmscope trace``.

Each case boots SeaBIOS to "No bootable device" (seen on the isa-debugcon port 0x402), then drives the HMP monitor on
a unix socket (``system_reset``, ``device_add`` of a vCPU, ``savevm``/``loadvm``, migration to a file), then ``quit``.
``record_case`` runs one case under the tracer (or, for overhead figures, untraced) with a deadline on everything;
``python -m kvmscope.trace.corpus DIR`` records them all into DIR.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .recorder import Result, record

BOOTED = b"No bootable device"


@dataclass(frozen=True)
class Case:
    """One corpus recording: QEMU's ``-cpu``, extra arguments, and the monitor commands after the boot."""

    name: str
    cpu: str
    args: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()  # HMP commands; "wait-boot" waits for one more "No bootable device"
    boots: bool = True  # False: QEMU ends by itself (e.g. aborts) before the guest runs
    disk: bool = False
    incoming: bool = False  # restore from the migration file written by the case before


CASES: tuple[Case, ...] = (
    Case("qemu64", "qemu64"),
    Case("skylake-server", "Skylake-Server"),
    Case("host-arch-cap-off", "host,arch-capabilities=off"),
    Case("host", "host", boots=False),
    Case("reset", "qemu64", actions=("system_reset", "wait-boot")),
    Case("hotplug", "qemu64", ("-smp", "1,sockets=2,cores=1,threads=1,maxcpus=2"),
         actions=("device_add qemu64-x86_64-cpu,id=cpu1,socket-id=1,core-id=0,thread-id=0", "sleep 1")),
    Case("savevm-loadvm", "qemu64", actions=("savevm snap1", "loadvm snap1", "sleep 1"), disk=True),
    Case("migrate-out", "qemu64", actions=("stop", "migrate exec:cat>MIGFILE", "wait-migrate")),
    Case("migrate-in", "qemu64", actions=("cont", "sleep 1"), incoming=True),
    # the local APICs in the kernel, the PIC and IOAPIC in QEMU (KVM_CAP_SPLIT_IRQCHIP), as Cloud Hypervisor and crosvm
    # have them: ASYNC_PF_INT needs the in-kernel LAPIC
    Case("split-irqchip", "qemu64,kvm-asyncpf-int=on", ("-machine", "q35,kernel-irqchip=split")),
)


class Monitor:
    """QEMU's HMP monitor on a unix socket: one command at a time, answered up to the next prompt."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QEMU monitor at {path}") from None
                time.sleep(0.05)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self._until_prompt()

    def _until_prompt(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self._until_prompt()

    def close(self) -> None:
        self.sock.close()


def qemu_argv(case: Case, work: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    argv = [qemu, "-enable-kvm", "-cpu", case.cpu, "-m", "64", "-nographic", "-nodefaults", "-nic", "none",
            "-chardev", f"file,id=dbg,path={work / 'debugcon.log'}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-monitor", f"unix:{work / 'monitor.sock'},server,nowait", *case.args]
    if case.disk:
        argv += ["-drive", f"file={work / 'disk.qcow2'},format=qcow2,if=ide"]
    if case.incoming:
        argv += ["-incoming", f"exec:cat {work / 'migration.bin'}"]
    return argv


@dataclass
class Drive:
    """What the driver did (its errors, if any, end the run: the recording is then incomplete)."""

    log: list[str] = field(default_factory=list)
    error: str | None = None


def _wait_boots(log: Path, count: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(BOOTED) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"SeaBIOS did not reach {BOOTED.decode()!r} ({count}) before the deadline")


def drive(case: Case, work: Path, deadline: float, drove: Drive) -> None:
    """Drive QEMU through the case's phases and quit it (runs beside the tracer, in a thread)."""
    try:
        mon = Monitor(work / "monitor.sock", deadline)
        try:
            boots = 0
            if not case.incoming:
                boots = 1
                _wait_boots(work / "debugcon.log", boots, deadline)
            for action in case.actions:
                if action == "wait-boot":
                    boots += 1
                    _wait_boots(work / "debugcon.log", boots, deadline)
                elif action.startswith("sleep "):
                    time.sleep(float(action.split()[1]))
                elif action == "wait-migrate":
                    while "completed" not in (status := mon.command("info migrate")):
                        if time.monotonic() > deadline or "failed" in status:
                            raise TimeoutError(f"migration did not complete: {status[-200:]}")
                        time.sleep(0.1)
                else:
                    # HMP echoes the line as typed (with terminal escapes): keep what follows it.
                    answer = mon.command(action.replace("MIGFILE", str(work / "migration.bin")))
                    answer = answer.rsplit("\x1b[K", 1)[-1].removesuffix("(qemu) ").strip()
                    drove.log.append(f"{action}: {answer}")
                    if "Error" in answer or "error" in answer:
                        raise OSError(f"{action}: {answer}")
            mon.command("quit")  # answered by the socket closing as QEMU exits (closing first loses the command)
        finally:
            mon.close()
    except (OSError, TimeoutError) as e:
        drove.error = f"{case.name}: {e}"


def prepare(case: Case, work: Path) -> None:
    if case.disk and not (work / "disk.qcow2").exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "disk.qcow2"), "16M"], check=True,
                       timeout=30)
    for stale in ("debugcon.log", "monitor.sock"):
        (work / stale).unlink(missing_ok=True)


def run_case(case: Case, work: Path, out: Path | None, timeout: float = 90) -> tuple[float, Result | None, Drive]:
    """Run ``case`` in ``work`` (traced into ``out``, or untraced when ``out`` is None): wall seconds, the trace
    result, what the driver did. QEMU is killed at ``timeout`` whatever happens."""
    prepare(case, work)
    argv = qemu_argv(case, work)
    drove = Drive()
    deadline = time.monotonic() + timeout
    driver = threading.Thread(target=drive, args=(case, work, deadline, drove), daemon=True) if case.boots else None
    start = time.monotonic()
    result = None
    if driver:
        driver.start()
    if out is not None:
        with open(out, "w") as f:
            result = record(argv, f, timeout=timeout, name=f"qemu-{case.name}")
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            drove.error = f"{case.name}: killed after {timeout} s"
    seconds = time.monotonic() - start
    if driver:
        driver.join(timeout=5)
    return seconds, result, drove


def record_corpus(directory: Path, cases: tuple[Case, ...] = CASES,
                  progress: Callable[[str], None] = print) -> list[tuple[Case, Result | None, Drive]]:
    """Record every case into ``directory`` (NAME.yaml); the migration cases share one working directory."""
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    with tempfile.TemporaryDirectory(prefix="kvmscope-corpus-") as tmp:
        for case in cases:
            seconds, result, drove = run_case(case, Path(tmp), directory / f"{case.name}.yaml")
            progress(f"{case.name}: {seconds:.2f} s, {result.ended if result else '-'}"
                     + (f"; driver: {drove.error}" if drove.error else ""))
            done.append((case, result, drove))
    return done


if __name__ == "__main__":
    record_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus"))
