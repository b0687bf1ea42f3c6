"""The model running guest programs (:mod:`kvmscope.program`): guest MSR access, userspace MSR exits, guest CPUID.

Guest WRMSR/RDMSR follow ``kvm_emulate_msr_write``/``kvm_emulate_msr_read`` in x86.c (v6.18): the MSR filter first,
then the handler with ``host_initiated`` false (``MsrRules.guest_get``/``guest_set`` in ``msr_rules``, next to the
host-side rule of each MSR); a failure becomes a #GP, or an exit to userspace when
``KVM_CAP_X86_USER_SPACE_MSR`` asks for that failure's reason (UNKNOWN for ``KVM_MSR_RET_UNSUPPORTED``, INVAL for
other failures, FILTER for a filtered MSR). No immutability check applies to the guest (that rule is host-only).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import program as P
from .. import uapi
from ..api import Exit, HltExit, IoExit, RdmsrExit, WrmsrExit, find_cpuid
from .msr_rules import OK, UNSUPPORTED
from .realmode import DEADLINE_EVERY, PIC_PORTS

if TYPE_CHECKING:
    from .vcpu import ModelVcpu

GP = 13


@dataclass
class ProgramState:
    """Where a guest program is: the operation to run next, the loop being run, an MSR access awaiting userspace."""

    ops: list[P.Op]
    pc: int = 0
    loop_body: tuple[P.Op, ...] = ()
    loop_pc: int = 0
    loop_left: int = 0
    pending: tuple[bool, int, int] | None = None  # (write, index, data) sent to userspace
    reply: tuple[int, int] | None = None  # (error, value) from userspace


def filter_allows(vcpu: ModelVcpu, index: int, write: bool) -> bool:
    """``kvm_msr_allowed``: the VM's MSR filter; with no filter every MSR is allowed."""
    flags, ranges = vcpu.vm.msr_filter
    if not ranges and flags == uapi.KVM_MSR_FILTER_DEFAULT_ALLOW:
        return True
    kind = uapi.KVM_MSR_FILTER_WRITE if write else uapi.KVM_MSR_FILTER_READ
    for rflags, base, nmsrs, bitmap in ranges:
        if rflags & kind and base <= index < base + nmsrs:
            bit = index - base
            return bool(bitmap[bit // 8] >> (bit % 8) & 1)
    return not flags & uapi.KVM_MSR_FILTER_DEFAULT_DENY


def guest_cpuid(vcpu: ModelVcpu, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """``kvm_cpuid``: the vCPU's stored CPUID (runtime bits applied). A missing leaf reads as zeros; for vendors other
    than AMD and Hygon a leaf beyond the top of its range reads as the highest basic leaf
    (``get_out_of_range_cpuid_entry``)."""
    entries = vcpu.get_cpuid()
    e = find_cpuid(entries, leaf, subleaf)
    if e is None:
        basic = find_cpuid(entries, 0)
        amd_like = basic is not None and basic.ebx in (0x68747541, 0x6F677948)  # "Auth"enticAMD, "Hygo"nGenuine
        if basic is not None and not amd_like:
            if 0x40000000 <= leaf <= 0x4FFFFFFF:
                top = find_cpuid(entries, leaf & 0xFFFFFF00)
            elif leaf >= 0xC0000000:
                top = find_cpuid(entries, 0xC0000000)
            else:
                top = find_cpuid(entries, leaf & 0x80000000)
            if top is None or leaf > top.eax:
                e = find_cpuid(entries, basic.eax, subleaf)
    return (e.eax, e.ebx, e.ecx, e.edx) if e is not None else (0, 0, 0, 0)


def _report(vcpu: ModelVcpu, tag: int, index: int, payload: bytes = b"") -> Exit:
    vcpu.vm.write_memory(P.MAILBOX + 4, struct.pack("<I", index) + payload)
    return IoExit(uapi.KVM_EXIT_IO_OUT, 1, P.REPORT_PORT, 1, bytes([tag]))


def _exception(vcpu: ModelVcpu, vector: int, error_code: int) -> Exit:
    return _report(vcpu, P.TAG_EXCEPTION, vector, struct.pack("<Q", error_code))


def _msr_outcome(vcpu: ModelVcpu, state: ProgramState, write: bool, index: int, data: int) -> Exit:
    """Finish a guest RDMSR/WRMSR: report its result, a #GP, or exit to userspace."""
    vm = vcpu.vm
    if not filter_allows(vcpu, index, write):
        code, value, reason = -1, 0, uapi.KVM_MSR_EXIT_REASON_FILTER
    elif write:
        code, value = vcpu.msr_rules.guest_set(index, data), 0
        reason = uapi.KVM_MSR_EXIT_REASON_UNKNOWN if code == UNSUPPORTED else uapi.KVM_MSR_EXIT_REASON_INVAL
    else:
        code, value = vcpu.msr_rules.guest_get(index)
        reason = uapi.KVM_MSR_EXIT_REASON_UNKNOWN if code == UNSUPPORTED else uapi.KVM_MSR_EXIT_REASON_INVAL
    if code == UNSUPPORTED and vcpu.profile.ignore_msrs:
        code, value = OK, 0
    if code == OK:
        return _msr_done(vcpu, write, index, value)
    if vm.user_space_msr & reason:
        state.pending = (write, index, data)
        cls = WrmsrExit if write else RdmsrExit
        return cls(index, data if write else 0, reason, vcpu.reply_msr)
    return _exception(vcpu, GP, 0)


def _msr_done(vcpu: ModelVcpu, write: bool, index: int, value: int) -> Exit:
    if write:
        return _report(vcpu, P.TAG_WRMSR, index)
    return _report(vcpu, P.TAG_RDMSR, index, struct.pack("<Q", value))


def _next_op(state: ProgramState) -> P.Op | None:
    if state.loop_left:
        op = state.loop_body[state.loop_pc]
        state.loop_pc += 1
        if state.loop_pc == len(state.loop_body):
            state.loop_pc = 0
            state.loop_left -= 1
        return op
    if state.pc >= len(state.ops):
        return None
    op = state.ops[state.pc]
    state.pc += 1
    if isinstance(op, P.LoopOp):
        state.loop_body, state.loop_pc, state.loop_left = op.body, 0, op.count
        return _next_op(state) if op.body else None
    return op


def run_program(vcpu: ModelVcpu, state: ProgramState, deadline: float | None = None) -> Exit:
    """Run the program from where it stopped to its next exit; interrupted at ``deadline`` (time.monotonic) if given
    (before an operation: the next run starts with it)."""
    if state.pending is not None:
        write, index, data = state.pending
        error, value = state.reply if state.reply is not None else (0, 0)
        state.pending = state.reply = None
        if error:
            return _exception(vcpu, GP, 0)
        return _msr_done(vcpu, write, index, value)
    steps = 0
    while True:
        if deadline is not None:
            steps += 1
            if not steps % DEADLINE_EVERY and time.monotonic() >= deadline:
                return vcpu.interrupted_at_clock()
        op = _next_op(state)
        if op is None:
            raise vcpu.limitation("the guest program ran past its end without a HLT")
        if isinstance(op, P.SetReg):
            setattr(vcpu.regs, op.register, op.value)
        elif isinstance(op, P.RdmsrOp):
            return _msr_outcome(vcpu, state, False, op.index, 0)
        elif isinstance(op, P.WrmsrOp):
            return _msr_outcome(vcpu, state, True, op.index, op.value)
        elif isinstance(op, P.CpuidOp):
            a, b, c, d = guest_cpuid(vcpu, op.leaf, op.subleaf)
            return _report(vcpu, P.TAG_CPUID, op.leaf, struct.pack("<IIII", a, b, c, d))
        elif isinstance(op, (P.OutOp, P.InOp)) and vcpu.vm.irqchip and op.port in PIC_PORTS:
            raise vcpu.limitation(f"port 0x{op.port:x} belongs to the in-kernel PIC, which the model does not emulate")
        elif isinstance(op, P.OutOp):
            return IoExit(uapi.KVM_EXIT_IO_OUT, 1, op.port, 1, bytes([op.value]))
        elif isinstance(op, P.InOp):
            return vcpu.begin_in(op.port)
        elif isinstance(op, P.HltOp):
            return HltExit()
