"""What the live kernel does with the VMM ioctls where the model stops (it does not emulate the PIC, IOAPIC or an
in-kernel halt): shown here on the live kernel; ``test_model_vmm.py`` shows the model's refusal of the same calls."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from kvmscope import guest, uapi
from kvmscope.api import InterruptedExit
from kvmscope.linux import LinuxSystem


@pytest.fixture
def alarm() -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, lambda *_: None)  # a handler, so that KVM_RUN sees the signal (EINTR)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_hlt_with_the_in_kernel_lapic_blocks_until_a_signal(live: LinuxSystem, alarm: None) -> None:
    with live.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, guest.HLT)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        exit_ = vcpu.run()
        assert isinstance(exit_, InterruptedExit), f"no KVM_EXIT_HLT: the vCPU halts in the kernel; saw {exit_}"
        assert vcpu.get_mp_state() == uapi.KVM_MP_STATE_HALTED, "and stays halted"
        assert vcpu.get_regs().rip == guest.DEFAULT_ENTRY + 1, "past the HLT"


def test_irq_line_drives_the_pic(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vm.create_irqchip()
        vm.create_vcpu(0)
        vm.irq_line(3, 1)
        statuses = [vm.irq_line_status(4, 1), vm.irq_line_status(4, 1), vm.irq_line_status(4, 0)]
        assert statuses == [1, 1, 2], f"KVM_IRQ_LINE_STATUS of raise, raise again, lower: {statuses}"
        pic = vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_MASTER).chip.pic
        assert (pic.irr, pic.last_irr) == (0x18, 0x08), f"edges on IRQ 3 and 4 latched in IRR: {pic.irr:#x}"
