"""``kvmscope trace --attach PID``: record a VMM that is already running.

A seccomp filter can only be installed by a process on itself, so an attached tracer stops at every system call
(PTRACE_SEIZE of each thread, PTRACE_SYSCALL) and keeps the KVMIO ioctls: slower for the VMM than a traced start. The
recording begins mid-life: the vCPUs that exist at attach time are written as ``create_vcpu`` steps marked so, and
the first KVM_RUN seen of each is the first *seen*. At the deadline (or ^C) every thread is interrupted and detached;
the VMM runs on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TextIO

from . import ptrace
from .decode import Writer, classify
from .recorder import SYSCALL_STOP, WALL, Result, Tracer, _skip_requests

ATTACH_OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK
                  | ptrace.PTRACE_O_TRACEVFORK | ptrace.PTRACE_O_TRACEEXEC)


class _Deadline(Exception):
    pass


class AttachedTracer(Tracer):
    """The tracer for a process it did not start: every syscall stops; only KVMIO ioctls are recorded."""

    def __init__(self, writer: Writer) -> None:
        super().__init__(writer)
        self.skip = set(_skip_requests())

    def resume(self, tid: int, sig: int = 0) -> None:
        ptrace.syscall(tid, sig)

    def _stop(self, tid: int, sig: int, event: int) -> None:
        if sig == SYSCALL_STOP:
            if ptrace.syscall_op(tid) == ptrace.PTRACE_SYSCALL_INFO_ENTRY:
                regs = ptrace.getregs(tid)
                request = regs.rsi & 0xFFFFFFFF
                if regs.orig_rax == 16 and (request >> 8) & 0xFF == 0xAE and request not in self.skip:
                    return self.entry(tid)
            elif tid in self.at_entry:
                return self.exit(tid)
            return self.resume(tid)
        if event in (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK):
            self.tasks.add(ptrace.geteventmsg(tid))
            return self.resume(tid)
        if event == ptrace.PTRACE_EVENT_STOP or (sig == signal.SIGTRAP and event != 0):
            return self.resume(tid)  # a group-stop, an interrupt, exec: nothing to deliver
        return self.resume(tid, sig)


def _threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def attach(pid: int, out: TextIO, seconds: float | None = None) -> Result:
    """Record ``pid`` (all its threads) for ``seconds`` (until it exits when None, or ^C), then detach."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as e:
        raise OSError(e.errno, f"no process {pid}: {e.strerror}") from None
    argv = [a.decode(errors="replace") for a in cmdline if a]
    writer = Writer(out, os.path.basename(argv[0]) if argv else str(pid),
                    f"recorded by kvmscope trace --attach {pid} on Linux {os.uname().release}: " + " ".join(argv))
    tracer = AttachedTracer(writer)
    _existing_vcpus(pid, writer)
    started = time.monotonic()
    while True:  # threads may appear while we attach
        todo = _threads(pid) - tracer.tasks
        if not todo:
            break
        for tid in todo:
            ptrace.seize(tid, ATTACH_OPTIONS)
            ptrace.interrupt(tid)
            tracer.tasks.add(tid)
    tracer.seen |= tracer.tasks

    def deadline(signum: int, frame: object) -> None:
        raise _Deadline

    old = signal.signal(signal.SIGALRM, deadline)
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    timed_out, status = False, 0
    try:
        status = tracer.loop(pid)
    except (_Deadline, KeyboardInterrupt):
        timed_out = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _detach_all(tracer)
    summary = writer.close()
    exited = not timed_out
    return Result(argv, pid, os.WEXITSTATUS(status) if exited and os.WIFEXITED(status) else None,
                  os.WTERMSIG(status) if exited and os.WIFSIGNALED(status) else None, False,
                  time.monotonic() - started, summary, tracer.errors, detached=timed_out)


def _existing_vcpus(pid: int, writer: Writer) -> None:
    """The vCPUs created before the attach, as create_vcpu steps (no ioctl was seen for them)."""
    ids = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            obj, vcpu = classify(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if obj == "vcpu":  # /proc does not say which VM a vCPU fd is of: each is taken as the followed VM's
            ids.append(vcpu)
            writer.vcpu_fds.add(int(fd))
        elif obj == "vm" and writer.vm is None:
            writer.vm = (pid, int(fd))
            writer.pid = pid
    for v in sorted(ids):
        writer.existing(v)


def _detach_all(tracer: Tracer) -> None:
    """Interrupt every thread, detach each as it stops (a thread inside a syscall is detached at its stop)."""
    pending = set(tracer.tasks)
    for tid in pending:
        ptrace.interrupt(tid)
    end = time.monotonic() + 5
    while pending and time.monotonic() < end:
        try:
            tid, status = os.waitpid(-1, WALL | os.WNOHANG)
        except ChildProcessError:
            return
        if tid == 0:
            time.sleep(0.005)
            continue
        if os.WIFSTOPPED(status):
            event = status >> 16
            sig = os.WSTOPSIG(status)
            deliver = 0 if sig in (signal.SIGTRAP, SYSCALL_STOP) or event == ptrace.PTRACE_EVENT_STOP else sig
            ptrace.detach(tid, deliver)
        pending.discard(tid)
