"""The model running real-mode code from guest memory. It knows a handful of instructions: hlt, nop, ``mov al, imm8``,
``out``/``in`` with an 8-bit port, ``jmp rel8`` and ``mov [disp16], al``; anything else is a ``ModelLimitation``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import uapi
from ..api import Exit, HltExit, InterruptedExit, IoExit, MmioExit
from ..errors import InvalidValueError

if TYPE_CHECKING:
    from .vcpu import ModelVcpu

GUEST_BUDGET = 1_000_000  # instructions per KVM_RUN before the run returns as interrupted
DEADLINE_EVERY = 4096  # instructions between looks at the clock in a run with a timeout


def interpret(vcpu: ModelVcpu, deadline: float | None = None) -> Exit:
    """Run the guest from CS:IP to its next exit: interrupted after GUEST_BUDGET instructions or, given a
    ``deadline`` (time.monotonic), at the deadline only, as the live kernel's kicked run."""
    regs, sregs, vm = vcpu.regs, vcpu.sregs, vcpu.vm
    base = sregs.cs.base
    if sregs.cr0 & 1:
        raise vcpu.limitation("the model interprets real-mode guests only (CR0.PE is set)")
    budget = GUEST_BUDGET if deadline is None else DEADLINE_EVERY
    while True:
        for _ in range(budget):
            ip = regs.rip & 0xFFFF
            addr = base + ip
            code = vm.fetch(addr, 4)
            if not code:
                raise vcpu.limitation(f"guest code at 0x{addr:x} is outside guest memory")
            code = code.ljust(4, b"\0")
            op = code[0]
            if op == 0xF4:  # hlt
                regs.rip = ip + 1
                return HltExit()
            if op == 0x90:  # nop
                regs.rip = ip + 1
            elif op == 0xB0:  # mov al, imm8
                regs.rax = (regs.rax & ~0xFF) | code[1]
                regs.rip = ip + 2
            elif op == 0xE6:  # out imm8, al
                regs.rip = ip + 2
                return IoExit(uapi.KVM_EXIT_IO_OUT, 1, code[1], 1, bytes([regs.rax & 0xFF]))
            elif op == 0xE4:  # in al, imm8
                regs.rip = ip + 2
                return vcpu.begin_in(code[1])
            elif op == 0xEB:  # jmp rel8
                regs.rip = (ip + 2 + int.from_bytes(code[1:2], "little", signed=True)) & 0xFFFF
            elif op == 0x88 and code[1] == 0x06:  # mov [disp16], al
                target = sregs.ds.base + int.from_bytes(code[2:4], "little")
                regs.rip = ip + 4
                value = bytes([regs.rax & 0xFF])
                try:
                    vm.write_memory(target, value)
                except InvalidValueError:
                    return MmioExit(target, value, 1, True)
            else:
                raise vcpu.limitation(f"the model cannot interpret opcode 0x{op:02x} at 0x{addr:x}")
        if deadline is None or time.monotonic() >= deadline:
            return InterruptedExit()
