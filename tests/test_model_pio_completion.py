"""Upstream's fast PIO path, which this host (PVM, which emulates the instruction) cannot show: the model against
the kernel source. An IN or OUT that exits to userspace leaves RIP on the instruction and the interrupt shadow as it
was; the next KVM_RUN, before it looks at ``immediate_exit``, finishes it unless RIP moved meanwhile: the IN's data
merged into AL, RIP past the instruction, the shadow gone (``kvm_fast_pio_in``/``_out``, ``complete_fast_pio_in``/
``_out``: 6.12.118 x86.c:8900-8978; ``complete_userspace_io`` at x86.c:11180-11189). An OUT to port 0x7E moves RIP
at once while KVM_X86_QUIRK_OUT_7E_INC_RIP is on. The PVM side is tests/conformance/test_conf_pio_completion.py."""

from __future__ import annotations

import pytest

from kvmscope import guest, uapi
from kvmscope.api import InterruptedExit, IoExit, IrqWindowOpenExit, Vcpu
from kvmscope.model import open_model

UPSTREAM = ["intel-spr", "amd-epyc"]
STI_SHADOW = {"intel-spr": uapi.KVM_X86_SHADOW_INT_STI, "amd-epyc": 3}  # SVM reports its one bit as both


def state(vcpu: Vcpu) -> tuple[int, int, int, bool]:
    regs = vcpu.get_regs()
    return regs.rip, regs.rax & 0xFFFF, vcpu.get_vcpu_events().interrupt.shadow, vcpu.ready_for_interrupt_injection


def finish(vcpu: Vcpu) -> None:
    vcpu.immediate_exit = True
    assert isinstance(vcpu.run(), InterruptedExit), "immediate_exit: EINTR, after the completion"
    vcpu.immediate_exit = False


@pytest.mark.parametrize("profile", UPSTREAM)
def test_an_out_waits_on_its_instruction(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xfb\xe6\x10\xf4")  # sti; out 0x10, al; hlt
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit) and exit_.port == 0x10, f"expected the OUT, saw {exit_!r}"
        seen = state(vcpu)
        assert seen == (0x1001, 0, STI_SHADOW[profile], False), \
            f"after the OUT's exit: expected RIP on the OUT and STI's shadow kept, saw (rip, ax, shadow, ready) {seen}"
        finish(vcpu)
        assert state(vcpu) == (0x1003, 0, 0, True), f"completed: expected RIP past the OUT, saw {state(vcpu)}"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_a_moved_rip_cancels_the_completion(profile: str) -> None:
    for code in (b"\xe6\x10\xf4\xf4", b"\xe4\x20\xf4\xf4"):
        with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, code)
            exit_ = vcpu.run()
            if exit_.direction == uapi.KVM_EXIT_IO_IN:  # type: ignore[attr-defined]
                exit_.reply(b"\x12")  # type: ignore[attr-defined]
            regs = vcpu.get_regs()
            regs.rip = 0x1003
            vcpu.set_regs(regs)
            finish(vcpu)
            assert state(vcpu)[:2] == (0x1003, 0), f"{code.hex()}: RIP moved to 0x1003: expected it kept and no data, " \
                f"saw {state(vcpu)}"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_an_in_merges_into_rax_as_set(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xe4\x20\xf4")
        exit_ = vcpu.run()
        assert state(vcpu)[0] == 0x1000, "RIP on the IN"
        regs = vcpu.get_regs()
        regs.rax = 0xAB00
        vcpu.set_regs(regs)  # RIP unchanged: the completion goes ahead
        exit_.reply(b"\x12")  # type: ignore[attr-defined]
        finish(vcpu)
        assert state(vcpu)[:2] == (0x1002, 0xAB12), f"expected AX 0xab12 and RIP past the IN, saw {state(vcpu)}"


@pytest.mark.parametrize("disabled", [False, True])
def test_out_0x7e_moves_rip_at_once_under_its_quirk(disabled: bool) -> None:
    with open_model(profile="intel-spr", kernel="6.12") as kvm, kvm.create_vm() as vm:
        if disabled:
            vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, uapi.KVM_X86_QUIRK_OUT_7E_INC_RIP)
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xe6\x7e\xf4")
        assert isinstance(vcpu.run(), IoExit)
        expected = 0x1000 if disabled else 0x1002
        assert state(vcpu)[0] == expected, f"quirk {'off' if disabled else 'on'}: expected RIP {expected:#x} after " \
            f"the exit, saw {state(vcpu)[0]:#x}"
        finish(vcpu)
        assert state(vcpu)[0] == 0x1002


@pytest.mark.parametrize("profile", UPSTREAM)
def test_the_window_opens_once_the_out_is_finished(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xfb\xe6\x10\xf4")  # sti; out: the OUT runs in STI's shadow
        vcpu.request_interrupt_window = True
        assert isinstance(vcpu.run(), IoExit), "the OUT in the shadow exits to userspace first"
        exit_ = vcpu.run()
        assert (exit_, vcpu.get_regs().rip) == (IrqWindowOpenExit(), 0x1003), \
            f"the completion ends the shadow: expected the window exit past the OUT, saw {exit_!r}"


@pytest.mark.parametrize("code", [b"\xe4\x20\xf4", b"\xe6\xa1\xf4"])
def test_the_in_kernel_pics_ports_are_a_limitation(code: bytes) -> None:
    """With KVM_CREATE_IRQCHIP the kernel's PIC takes ports 0x20-0x21 and 0xA0-0xA1 (i8259.c kvm_pic_init): no exit
    on the live kernel, and the model, which does not emulate the PIC, says so."""
    from kvmscope.model import ModelLimitation

    with open_model(profile="pvm-6.18") as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, code)
        with pytest.raises(ModelLimitation, match="in-kernel PIC"):
            vcpu.run()
    with open_model(profile="pvm-6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, code)
        assert isinstance(vcpu.run(), IoExit), "without an irqchip the port exits to userspace"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_sti_blocks_only_when_it_sets_if(profile: str) -> None:
    """The CPU's STI: blocking by STI only when IF was clear (SDM; VMX's interruptibility state, SVM's shadow)."""
    for rflags, expected in ((0x2, STI_SHADOW[profile]), (0x202, 0)):
        with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, b"\xfb\xe4\x20\xf4")
            regs = vcpu.get_regs()
            regs.rflags = rflags
            vcpu.set_regs(regs)
            assert isinstance(vcpu.run(), IoExit)
            seen = vcpu.get_vcpu_events().interrupt.shadow
            assert seen == expected, f"RFLAGS {rflags:#x}, sti; in: expected shadow {expected}, saw {seen}"
