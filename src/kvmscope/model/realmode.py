"""The model running real-mode code from guest memory. It knows a handful of instructions: hlt, nop, ``mov al, imm8``,
``out``/``in`` with an 8-bit port, ``jmp rel8``, ``mov [disp16], al``, ``cli`` and ``sti``; anything else is a
``ModelLimitation``.

The instruction that runs ends any interrupt shadow (KVM_SET_VCPU_EVENTS' or an STI's), unless it is a port access
left waiting in userspace (``kvm_run.KvmRunModel._complete_pio`` ends it). ``sti`` starts one when it sets IF (the
CPU), or on PVM, whose emulator runs real mode, unless an STI shadow was on. With ``request_interrupt_window`` and no
in-kernel PIC, upstream KVM asks the CPU for an interrupt-window exit (``enable_irq_window``), which comes at the
first instruction boundary where IF is set and no shadow is on: the run returns KVM_EXIT_IRQ_WINDOW_OPEN there
(6.12.118 x86.c:10292-10296, 10888-10894). PVM (live 6.18) asks for no such exit: the window is checked only after an
exit KVM handles itself, a host interrupt (about 1 ms into a run that loops, live), so the model takes it where it
would look at the clock, and never before an exit to userspace."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import uapi
from ..api import Exit, HltExit, IoExit, IrqWindowOpenExit, MmioExit
from ..errors import InvalidValueError

if TYPE_CHECKING:
    from .vcpu import ModelVcpu

GUEST_BUDGET = 1_000_000  # instructions per KVM_RUN before the run returns as interrupted
DEADLINE_EVERY = 4096  # instructions between looks at the clock in a run with a timeout
X86_EFLAGS_IF = 1 << 9
PIC_PORTS = frozenset({0x20, 0x21, 0xA0, 0xA1})  # with KVM_CREATE_IRQCHIP (kvm_pic_init; ELCR 0x4d0 is out of imm8 reach)


def interpret(vcpu: ModelVcpu, deadline: float | None = None) -> Exit:
    """Run the guest from CS:IP to its next exit: interrupted after GUEST_BUDGET instructions or, given a
    ``deadline`` (time.monotonic), at the deadline only, as the live kernel's kicked run."""
    regs, sregs, vm = vcpu.regs, vcpu.sregs, vcpu.vm
    base = sregs.cs.base
    if sregs.cr0 & 1:
        raise vcpu.limitation("the model interprets real-mode guests only (CR0.PE is set)")
    window = vcpu.irq_window_requested() and vcpu.accepts_extint()  # a split irqchip's LAPIC with LINT0 masked: none
    upstream_window, pvm_window = window and vcpu.profile.vendor != "pvm", window and vcpu.profile.vendor == "pvm"
    interrupt = vcpu.events.interrupt
    shadow = interrupt.shadow
    fast_pio = vcpu.profile.vendor != "pvm"  # upstream exits on the port access itself; PVM emulates the instruction
    budget = GUEST_BUDGET if deadline is None and not pvm_window else DEADLINE_EVERY
    done = 0
    while True:
        for _ in range(budget):
            if upstream_window and not shadow and regs.rflags & X86_EFLAGS_IF:
                return IrqWindowOpenExit()
            held = shadow
            if shadow:  # this instruction ends it, unless it waits in userspace (below)
                interrupt.shadow = shadow = 0
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
            elif op in (0xE6, 0xE4) and vm.irqchip and code[1] in PIC_PORTS:
                raise vcpu.limitation(f"port 0x{code[1]:x} belongs to the in-kernel PIC, which the model does not emulate")
            elif op == 0xE6:  # out imm8, al
                data = bytes([regs.rax & 0xFF])
                if fast_pio and not (code[1] == 0x7E and vcpu.out_7e_inc_rip()):
                    interrupt.shadow = held  # RIP and the shadow stay until the next run completes the OUT
                    vcpu.hold_pio(False, (base + ip) & 0xFFFFFFFF, ip + 2)
                else:
                    regs.rip = ip + 2
                return IoExit(uapi.KVM_EXIT_IO_OUT, 1, code[1], 1, data)
            elif op == 0xE4:  # in al, imm8: RIP and the shadow stay until the next run completes it, on every vendor
                interrupt.shadow = held
                return vcpu.begin_in(code[1], ((base + ip) & 0xFFFFFFFF, ip + 2))
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
            elif op == 0xFA:  # cli
                regs.rflags &= ~X86_EFLAGS_IF
                regs.rip = ip + 1
            elif op == 0xFB:  # sti: interrupts stay blocked until the next instruction ends
                if fast_pio:  # the CPU: blocking by STI only when it sets IF
                    new_shadow = 0 if regs.rflags & X86_EFLAGS_IF else vcpu.sti_shadow()
                else:  # PVM's emulator (em_sti, toggle_interruptibility): always, unless an STI shadow was on
                    new_shadow = 0 if held & uapi.KVM_X86_SHADOW_INT_STI else vcpu.sti_shadow()
                regs.rflags |= X86_EFLAGS_IF
                interrupt.shadow = shadow = new_shadow
                regs.rip = ip + 1
            else:
                raise vcpu.limitation(f"the model cannot interpret opcode 0x{op:02x} at 0x{addr:x}")
        done += budget
        if pvm_window and vcpu.ready_for_injection():
            return IrqWindowOpenExit()
        if deadline is None:
            if done >= GUEST_BUDGET:
                return vcpu.interrupted_at_clock()
        elif time.monotonic() >= deadline:
            return vcpu.interrupted_at_clock()
