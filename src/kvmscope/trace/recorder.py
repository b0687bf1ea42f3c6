"""Run a VMM under ptrace and record its KVM ioctls (``kvmscope trace``).

The child installs a seccomp filter (:mod:`.seccomp`) before it execs the VMM: only ``ioctl`` calls of type KVMIO stop
it (PTRACE_EVENT_SECCOMP), every other syscall runs at full speed. At each stop the tracer reads the arguments, tells
the fd's object from ``/proc/TID/fd/N``, reads the payload with process_vm_readv, and asks for the syscall-exit stop
to see the result (except for a vCPU's later KVM_RUNs, only counted). Threads and children are followed
(PTRACE_O_TRACECLONE/FORK/VFORK); if the tracer dies the kernel kills the tracees (PTRACE_O_EXITKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import _exit  # the documented exit for a forked child (no cleanup of the parent's state)
from typing import TextIO

from .. import uapi
from . import ptrace, seccomp
from .decode import Call, Reader, Summary, Writer, classify, name_of, read_entry, read_exit

WALL = 0x40000000  # __WALL: wait for threads too
SYSCALL_STOP = signal.SIGTRAP | 0x80  # with PTRACE_O_TRACESYSGOOD
STOPPING = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
KVM_RUN_EXIT_REASON = 8  # offsetof(struct kvm_run, exit_reason)


def shortened(command: str) -> str:
    """A command line for a message: its start and end when it is long (a command line can be megabytes)."""
    return command if len(command) <= 200 else f"{command[:150]}...{command[-30:]} ({len(command):,} characters)"


class TraceError(OSError):
    """The VMM could not be started or traced."""


@dataclass
class Result:
    """How the traced command ended and what was recorded."""

    argv: list[str]
    pid: int
    exit_code: int | None  # the command's exit status, or None when a signal ended it
    signal: int | None
    timed_out: bool
    seconds: float
    summary: Summary
    errors: list[str] = field(default_factory=list)  # payloads that could not be read, etc.
    detached: bool = False  # --attach: the tracer let go of a command that runs on

    @property
    def ended(self) -> str:
        """How the command ended, in words."""
        if self.detached:
            return "runs on (kvmscope trace detached from it)"
        if self.timed_out:
            return "was killed by kvmscope trace after the timeout"
        if self.signal is not None:
            return f"was killed by signal {self.signal} ({signal.Signals(self.signal).name})"
        return f"exited with status {self.exit_code}"

    def to_json(self) -> dict[str, object]:
        s = self.summary
        return {"traced_command": self.argv, "exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
                "ended": self.ended, "detached": self.detached, "seconds": round(self.seconds, 6), "ioctls": s.calls,
                "steps": s.steps,
                "vcpus": s.vcpus, "runs": {str(k): v for k, v in s.runs.items()}, "by_name": s.by_name,
                "refused": s.refused, "failed": s.failed, "other_vms": s.other_vms, "errors": self.errors}


def _skip_requests() -> list[int]:
    by_name = {v: k for k, v in uapi.TRACE_IOCTL_NAMES.items()}
    return [by_name[n] for n in uapi.TRACE_SKIPPED]


class Tracer:
    """One traced command: its tasks, the calls stopped at entry and waiting for their exit, the writer."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.t0 = time.monotonic()
        self.tasks: set[int] = set()
        self.seen: set[int] = set()  # tasks whose first (attach) stop has been handled
        self.tgid: dict[int, int] = {}
        self.at_entry: dict[int, Call] = {}
        self.runs: dict[tuple[int, int], int] = {}  # (pid, fd) -> vCPU id, for the hot KVM_RUN path
        self.errors: list[str] = []

    def resume(self, tid: int, sig: int = 0) -> None:
        """Let ``tid`` run on to its next trapped ioctl."""
        ptrace.cont(tid, sig)

    def _pid_of(self, tid: int) -> int:
        pid = self.tgid.get(tid)
        if pid is None:
            pid = tid
            try:
                with open(f"/proc/{tid}/status") as f:
                    for line in f:
                        if line.startswith("Tgid:"):
                            pid = int(line.split()[1])
                            break
            except OSError:
                pass
            self.tgid[tid] = pid
        return pid

    def _read(self, tid: int) -> Reader:
        return lambda address, size: ptrace.read_memory(tid, address, size)

    def entry(self, tid: int) -> None:
        """A seccomp stop: an ioctl of type KVMIO is about to run."""
        regs = ptrace.getregs(tid)
        fd, request, arg = regs.rdi & 0xFFFFFFFF, regs.rsi & 0xFFFFFFFF, regs.rdx
        pid = self._pid_of(tid)
        now = time.monotonic() - self.t0
        if request == uapi.KVM_RUN and (pid, fd) in self.runs:
            call = Call(now, pid, tid, fd, "vcpu", self.runs[(pid, fd)], request, arg, "KVM_RUN")
            if not self.writer.run(call):
                self.resume(tid)
                return
        else:
            try:
                link = os.readlink(f"/proc/{tid}/fd/{fd}")
            except OSError:
                link = ""
            obj, vcpu = classify(link)
            call = Call(now, pid, tid, fd, obj, vcpu, request, arg, name_of(request))
            if call.name == "KVM_RUN" and obj == "vcpu":
                self.runs[(pid, fd)] = vcpu
                if not self.writer.run(call):
                    self.resume(tid)
                    return
            try:
                read_entry(call, self._read(tid))
            except (OSError, struct.error) as e:
                self.errors.append(f"{call.name} at t={now:.6f}: cannot read its argument: {e}")
                call.data.clear()
        self.at_entry[tid] = call
        ptrace.syscall(tid)

    def exit(self, tid: int) -> None:
        """The syscall-exit stop of a call seen at entry."""
        call = self.at_entry.pop(tid, None)
        if call is None:
            self.resume(tid)
            return
        rax = ptrace.getregs(tid).rax
        call.result = struct.unpack("<q", struct.pack("<Q", rax))[0]
        if -516 <= call.result <= -512:  # ERESTART*: the kernel restarts it; the VMM saw an interruption
            call.result = -4
        try:
            read_exit(call, self._read(tid))
            if call.name == "KVM_RUN":
                call.data["exit_reason"] = self._exit_reason(tid, call.vcpu)
        except (OSError, struct.error) as e:
            self.errors.append(f"{call.name} at t={call.time:.6f}: cannot read its result: {e}")
        if call.name in ("KVM_CREATE_VCPU", "KVM_CREATE_VM") and call.result is not None and call.result >= 0:
            self.runs.pop((call.pid, call.result), None)  # that fd number now names a new object
        self.resume(tid)
        self.writer.add(call)

    def _exit_reason(self, tid: int, vcpu: int) -> int:
        """kvm_run.exit_reason of ``vcpu``, from its mapping in the VMM (``anon_inode:kvm-vcpu:N`` in maps)."""
        with open(f"/proc/{tid}/maps") as f:
            for line in f:
                if line.rstrip().endswith(f"anon_inode:kvm-vcpu:{vcpu}"):
                    start = int(line.split("-", 1)[0], 16)
                    return int(struct.unpack("<I", ptrace.read_memory(tid, start + KVM_RUN_EXIT_REASON, 4))[0])
        return -1

    def loop(self, leader: int) -> int:
        """Handle stops until every task is gone; returns the leader's wait status."""
        status_of_leader = 0
        while self.tasks:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            except KeyboardInterrupt:  # ^C: let the VMM end cleanly; what it does meanwhile is recorded
                _signal_all(self.tasks, signal.SIGTERM)
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.tasks.discard(tid)
                self.at_entry.pop(tid, None)
                if tid == leader:
                    status_of_leader = status
                continue
            if not os.WIFSTOPPED(status):
                continue
            self.tasks.add(tid)
            sig, event = os.WSTOPSIG(status), status >> 16
            try:
                self._stop(tid, sig, event)
            except ProcessLookupError:  # killed meanwhile (a timeout, the VMM's exit_group): its exit comes next
                self.at_entry.pop(tid, None)
            except OSError as e:
                if e.errno != 3:
                    raise
        return status_of_leader

    def _stop(self, tid: int, sig: int, event: int) -> None:
        if tid not in self.seen:
            self.seen.add(tid)
            if sig == signal.SIGSTOP and event == 0:  # the stop of a new task attached by PTRACE_O_TRACECLONE
                ptrace.cont(tid)
                return
        if sig == signal.SIGTRAP and event == ptrace.PTRACE_EVENT_SECCOMP:
            self.entry(tid)
        elif sig == SYSCALL_STOP:
            self.exit(tid)
        elif sig == signal.SIGTRAP and event in (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK,
                                                 ptrace.PTRACE_EVENT_VFORK):
            self.tasks.add(ptrace.geteventmsg(tid))
            ptrace.cont(tid)
        elif (sig == signal.SIGTRAP and event != 0) or (sig in STOPPING and ptrace.is_group_stop(tid)):
            # exec and the other events; a group-stop (the stop already happened: injecting it again would loop)
            ptrace.cont(tid)
        else:  # a signal for the VMM: deliver it
            ptrace.cont(tid, sig)


def _signal_all(tasks: set[int], sig: int) -> None:
    for t in list(tasks):
        with contextlib.suppress(OSError):  # gone already
            os.kill(t, sig)


def _child(argv: Sequence[str], filt: seccomp.Filter, failed: int) -> None:
    """In the forked child: be traced, stop until the tracer is ready, install the filter, exec. Never returns. Why
    the exec failed goes to the parent through ``failed`` (closed on exec), so that the parent says it once."""
    try:
        os.setpgid(0, 0)
        ptrace.traceme()
        os.kill(os.getpid(), signal.SIGSTOP)
        seccomp.install(filt)
        os.execvp(argv[0], list(argv))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(failed, f"{e.errno or 0} {e.strerror or e}".encode())
    finally:
        _exit(127)


def _exec_failure(failed: int) -> tuple[int, str] | None:
    """What the child wrote to ``failed`` before exiting (errno, text), or None when its exec succeeded."""
    try:
        os.set_blocking(failed, False)  # never wait here, whatever the child did
        said = os.read(failed, 4096).decode(errors="replace")
    except BlockingIOError:
        said = ""
    finally:
        os.close(failed)
    if not said:
        return None
    err, _, text = said.partition(" ")
    return int(err) if err.isdigit() else 0, text


def record(argv: Sequence[str], out: TextIO, timeout: float | None = None, name: str | None = None) -> Result:
    """Run ``argv`` under the tracer, writing the scenario to ``out``; kill it after ``timeout`` seconds."""
    if not argv:
        raise TraceError(22, "no command to trace")
    description = (f"recorded by kvmscope trace on Linux {os.uname().release} ({os.uname().nodename}): "
                   + " ".join(argv))
    writer = Writer(out, name or os.path.basename(argv[0]), description)
    tracer = Tracer(writer)
    started = time.monotonic()
    filt = seccomp.Filter(_skip_requests())  # built before fork: the child only installs it
    failed_r, failed_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(failed_r)
        _child(argv, filt, failed_w)
    os.close(failed_w)  # from here the child (until its exec) holds the only writing end
    timed_out = threading.Event()

    def kill_all() -> None:
        timed_out.set()
        _signal_all(tracer.tasks | {pid}, signal.SIGKILL)

    timer = threading.Timer(timeout, kill_all) if timeout else None
    try:
        _, status = os.waitpid(pid, WALL)
        if not os.WIFSTOPPED(status):
            raise TraceError(10, f"{shortened(argv[0])} did not start under the tracer (status 0x{status:x})")
        tracer.tasks.add(pid)
        tracer.seen.add(pid)
        ptrace.setoptions(pid)
        if timer:
            timer.start()
        ptrace.cont(pid)
        status = tracer.loop(pid)
    except BaseException:
        _signal_all(tracer.tasks | {pid}, signal.SIGKILL)
        _reap(tracer.tasks | {pid})
        os.close(failed_r)
        raise
    finally:
        if timer:
            timer.cancel()
    failure = _exec_failure(failed_r)  # the child has exited: the pipe holds its reason, or nothing
    if failure is not None:
        raise TraceError(failure[0], f"cannot run {shortened(argv[0])}: {failure[1]}")
    summary = writer.close()
    return Result(list(argv), pid, os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, timed_out.is_set(),
                  time.monotonic() - started, summary, tracer.errors)


def _reap(tasks: set[int]) -> None:
    """Wait for killed tasks so that none is left as a zombie or a stopped orphan."""
    deadline = time.monotonic() + 5
    while tasks and time.monotonic() < deadline:
        try:
            tid, status = os.waitpid(-1, WALL | os.WNOHANG)
        except ChildProcessError:
            return
        if tid == 0:
            time.sleep(0.01)
        elif os.WIFEXITED(status) or os.WIFSIGNALED(status):
            tasks.discard(tid)
