"""``struct kvm_run`` in the model: the fields userspace sets before KVM_RUN and reads after it, and the port access
that waits in userspace between two runs (``complete_userspace_io``). Mixed into
:class:`~kvmscope.model.vcpu.ModelVcpu`, which calls :meth:`reset_kvm_run` when it is created."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import uapi
from ..api import InterruptedExit, IoExit, check_flag, check_run_cr8

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from .vm import ModelVm

X86_EFLAGS_IF = 1 << 9
_APIC_LVT0, _LVT_MASKED, _APIC_BASE_ENABLE = 0x350, 1 << 16, 1 << 11  # LVT0, its mask bit, APIC_BASE's global enable
# PVM (live): a guest that runs this long (seconds) before it is kicked has taken enough host interrupts that its
# saved FPU state always marks SSE in use (XSTATE_BV bit 1), whatever XCR0 and the registers hold: in 70 of 70 runs of
# 10-50 ms, 39 of 40 of 5 ms, 21, 13 and 10 of 30 of 2, 1 and 0.5 ms, 0 of 300 short runs to a HLT. Shorter runs are
# a coin toss the model does not take.
LONG_RUN = 0.01


class KvmRunModel:
    """The vCPU's ``kvm_run`` page as KVM reads and writes it."""

    vm: ModelVm
    profile: Profile
    regs: uapi.kvm_regs
    sregs: uapi.kvm_sregs
    events: uapi.kvm_vcpu_events
    lapic: bytearray | None
    _shutdown_pending: bool

    if TYPE_CHECKING:  # provided by ModelVcpu and VcpuStateModel

        def _check_open(self) -> None: ...

        def _cr8(self) -> int: ...

        def _shadow(self, mask: int) -> int: ...

    def reset_kvm_run(self) -> None:
        """A new vCPU's page: zeroed."""
        self._immediate_exit = False
        self._run_cr8 = 0
        self._irq_window = False  # request_interrupt_window
        self._run_out = (False, False, 0, 0)  # ready_for_interrupt_injection, if_flag, apic_base, flags
        # a port access that exited to userspace, completed at the next KVM_RUN: (IN?, (linear RIP, IP after it, RFLAGS)
        # or None)
        self._pio: tuple[bool, tuple[int, int, int] | None] | None = None
        self._in_data = b""
        self._regs_set = False  # KVM_SET_REGS since the access (PVM then drops an IN's data)
        self._ran_long = False  # this run went on until the clock or the budget stopped it

    def interrupted_at_clock(self) -> InterruptedExit:
        """The exit of a run the model stops at its deadline (the live kick) or its instruction budget."""
        self._ran_long = True
        return InterruptedExit()

    @property
    def immediate_exit(self) -> bool:
        self._check_open()
        return self._immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._check_open()
        self._immediate_exit = bool(value)

    @property
    def run_cr8(self) -> int:
        self._check_open()
        return self._run_cr8

    @run_cr8.setter
    def run_cr8(self, value: int) -> None:
        value = check_run_cr8(value)
        self._check_open()
        self._run_cr8 = value

    @property
    def request_interrupt_window(self) -> bool:
        self._check_open()
        return self._irq_window

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        flag = check_flag("Vcpu.request_interrupt_window", value)
        self._check_open()
        self._irq_window = flag

    @property
    def ready_for_interrupt_injection(self) -> bool:
        self._check_open()
        return self._run_out[0]

    @property
    def if_flag(self) -> bool:
        self._check_open()
        return self._run_out[1]

    @property
    def run_apic_base(self) -> int:
        self._check_open()
        return self._run_out[2]

    @property
    def run_flags(self) -> int:
        self._check_open()
        return self._run_out[3]

    def ready_for_injection(self) -> bool:
        """``kvm_vcpu_ready_for_interrupt_injection`` without an in-kernel PIC (6.12.118 x86.c:4715-4744): interrupts
        allowed (IF set, no interrupt shadow: any shadow byte on PVM, live), no interrupt from KVM_INTERRUPT waiting
        (``kvm_cpu_has_extint``), nothing to reinject, no exception or triple fault pending (PVM's pending
        shutdown is one: 0 here, live). With an in-kernel LAPIC (a split irqchip) also ``kvm_apic_accept_pic_intr``
        (lapic.c:3034-3044): the APIC disabled in hardware, or LVT0 unmasked in ExtINT mode."""
        e = self.events
        return bool(self.regs.rflags & X86_EFLAGS_IF and not e.interrupt.shadow and not e.interrupt.injected
                    and not e.exception.injected and not e.nmi.injected and not e.exception.pending
                    and not self._shutdown_pending and self.accepts_extint())

    def accepts_extint(self) -> bool:
        """``kvm_cpu_accept_dm_intr``'s LAPIC half: no in-kernel LAPIC, or one that takes an ExtINT."""
        if self.lapic is None:
            return True
        lvt0 = int.from_bytes(self.lapic[_APIC_LVT0 : _APIC_LVT0 + 4], "little")
        return not self.sregs.apic_base & _APIC_BASE_ENABLE or not lvt0 & _LVT_MASKED and lvt0 & 0x700 == 0x700

    def sti_shadow(self) -> int:
        """The interrupt shadow of an STI, as KVM_GET_VCPU_EVENTS reports it for this vendor."""
        return self._shadow(uapi.KVM_X86_SHADOW_INT_STI)

    def irq_window_requested(self) -> bool:
        """``dm_request_for_irq_injection``: ``request_interrupt_window`` set and no in-kernel PIC."""
        return self._irq_window and not self.vm.irqchip

    def _post_run_save(self) -> None:
        """What KVM_RUN leaves in kvm_run as it returns, whatever its outcome (``post_kvm_run_save``, 6.12.118
        x86.c:9765-9781). Flags stay 0: the model has no SMM (a limitation), bus-lock exits or nested guest mode."""
        self._run_cr8 = self._cr8()
        self._run_out = (self.vm.irqchip or self.ready_for_injection(), bool(self.regs.rflags & X86_EFLAGS_IF),
                         self.sregs.apic_base, 0)

    def begin_in(self, port: int, at: tuple[int, int] | None = None) -> IoExit:
        """The exit of a one-byte IN from ``port``: the data userspace gives it lands in AL at the next KVM_RUN, which
        moves RIP past the IN (``at``: its linear address and the IP after it; None for a guest program)."""
        self.hold_pio(True, *(at or (None, None)))
        return IoExit(uapi.KVM_EXIT_IO_IN, 1, port, 1, b"", self._reply_in)

    def hold_pio(self, is_in: bool, linear: int | None, next_ip: int | None) -> None:
        """A port access left waiting in userspace, for :meth:`_complete_pio` (no address: a guest program's)."""
        self._pio = (is_in, None if linear is None or next_ip is None else (linear, next_ip, self.regs.rflags))
        self._in_data, self._regs_set = b"", False

    def cancel_pio(self) -> None:
        """Forget a port access waiting in userspace: the next KVM_RUN neither moves RIP nor takes the IN's data."""
        self._pio, self._in_data = None, b""

    def out_7e_inc_rip(self) -> bool:
        """KVM_X86_QUIRK_OUT_7E_INC_RIP (on unless disabled): an OUT to port 0x7E moves RIP before the exit."""
        return not self.vm.disabled_quirks & uapi.KVM_X86_QUIRK_OUT_7E_INC_RIP

    def _complete_pio(self) -> None:
        """``complete_userspace_io`` at the start of KVM_RUN, before ``immediate_exit`` (6.12.118 x86.c:11180-11189).
        Upstream (``complete_fast_pio_in``/``_out``, x86.c:8900-8955): unless RIP moved since the exit, AL takes the
        IN's data and RIP and the shadow move past the instruction. PVM (live) emulates the IN: RIP moves past it
        whatever KVM_SET_REGS did meanwhile, with RFLAGS as it was at the exit (the emulator's writeback), and a
        KVM_SET_REGS drops the data."""
        pending, self._pio = self._pio, None
        if pending is None:
            return
        is_in, at = pending
        data, self._in_data = self._in_data[:1].ljust(1, b"\0"), b""
        if at is not None:
            linear, next_ip, rflags = at
            if self.profile.vendor == "pvm":
                is_in = is_in and not self._regs_set
                self.regs.rflags = rflags
            elif (self.sregs.cs.base + self.regs.rip) & 0xFFFFFFFF != linear:
                return
            self.regs.rip = next_ip
            self.events.interrupt.shadow = 0
        if is_in:
            self.regs.rax = (self.regs.rax & ~0xFF) | data[0]

    def _reply_in(self, data: bytes) -> None:
        self._in_data = data
