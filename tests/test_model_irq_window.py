"""request_interrupt_window on upstream VMX and SVM, which this host (PVM) cannot show: the model against the kernel
source. With the window requested and no in-kernel PIC, vcpu_enter_guest asks the CPU for an interrupt-window exit
(``enable_irq_window``: VMX's CPU_BASED_INTR_WINDOW_EXITING, SVM's V_IRQ with the VINTR intercept; 6.12.118
x86.c:10292-10296), which comes at the first instruction boundary where RFLAGS.IF is set and no STI or MOV SS shadow
blocks interrupts; KVM handles it (r = 1) and vcpu_run returns KVM_EXIT_IRQ_WINDOW_OPEN (x86.c:10888-10894). The same
cases on PVM are in tests/conformance/test_conf_irq_window.py."""

from __future__ import annotations

import pytest

from kvmscope import guest, uapi
from kvmscope.api import HltExit, IoExit, IrqWindowOpenExit, Vcpu
from kvmscope.model import ModelLimitation, open_model
from kvmscope.program import Program, load_program
from vcpu_setup import set_rflags, set_shadow

UPSTREAM = ["intel-spr", "amd-epyc"]
IF = 0x202


def prepare(vcpu: Vcpu, rflags: int, shadow: int = 0) -> None:
    set_rflags(vcpu, rflags)
    if shadow:
        set_shadow(vcpu, shadow)
    vcpu.request_interrupt_window = True


def frozen(vcpu: Vcpu, fresh: Vcpu) -> bool:
    """Whether ``vcpu`` has entered the guest: a change of ARCH_CAPABILITIES (DE_CFG on AMD) that ``fresh`` (a vCPU
    that has not run) takes is refused from then on (6.4+)."""
    msr = 0xC0011029 if vcpu.profile.vendor == "svm" else 0x10A  # type: ignore[attr-defined]
    value = fresh.read_msr(msr)
    changes = [value & (value - 1)] if value else [1 << bit for bit in range(64)]
    taken = next((c for c in changes if fresh.set_msrs({msr: c}) == 1), None)
    assert taken is not None, f"a vCPU that has not run takes no change of MSR {msr:#x}"
    return vcpu.set_msrs({msr: taken}) == 0


@pytest.mark.parametrize("profile", UPSTREAM)
def test_window_open_at_entry_exits_before_any_instruction(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\x90\xf4")
        prepare(vcpu, IF)
        exit_ = vcpu.run()
        assert exit_ == IrqWindowOpenExit(), f"IF set, no shadow: expected the window exit, saw {exit_!r}"
        assert vcpu.get_regs().rip == 0x1000, f"no instruction ran: expected RIP 0x1000, saw {vcpu.get_regs().rip:#x}"
        assert (vcpu.if_flag, vcpu.ready_for_interrupt_injection) == (True, True), "kvm_run reports the open window"
        assert frozen(vcpu, vm.create_vcpu(1)), "the window exit follows a VM entry: the vCPU's model is frozen"
        vcpu.request_interrupt_window = False
        assert vcpu.run() == HltExit(), "without the request the guest runs on"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_a_shadow_lets_one_instruction_run(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\x90\x90\xf4")
        prepare(vcpu, IF, shadow=uapi.KVM_X86_SHADOW_INT_STI)
        assert vcpu.ready_for_interrupt_injection is False, "not run yet"
        exit_ = vcpu.run()
        rip, shadow = vcpu.get_regs().rip, vcpu.get_vcpu_events().interrupt.shadow
        assert (exit_, rip, shadow) == (IrqWindowOpenExit(), 0x1001, 0), \
            f"STI shadow: expected the window exit after one instruction with the shadow gone, saw {exit_!r} at {rip:#x}, " \
            f"shadow {shadow}"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_sti_opens_the_window_after_the_next_instruction(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\x90\xfb\x90\x90\xf4")  # nop; sti; nop; nop; hlt
        prepare(vcpu, 0x2)
        exit_ = vcpu.run()
        assert (exit_, vcpu.get_regs().rip) == (IrqWindowOpenExit(), 0x1003), \
            f"sti at 0x1001: expected the window exit after the nop at 0x1002, saw {exit_!r} at {vcpu.get_regs().rip:#x}"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_sti_hlt_halts_first_and_the_next_run_opens_the_window(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xfb\xf4\x90")  # sti; hlt: the HLT runs in STI's shadow
        prepare(vcpu, 0x2)
        assert vcpu.run() == HltExit(), "the HLT in STI's shadow exits to userspace first"
        assert vcpu.get_vcpu_events().interrupt.shadow == 0, "the HLT ended the shadow"
        assert vcpu.ready_for_interrupt_injection, "and then interrupts are allowed"
        assert (vcpu.run(), vcpu.get_regs().rip) == (IrqWindowOpenExit(), 0x1002), "the next run opens the window"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_the_window_stays_shut_while_if_is_clear(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xfa\xe6\x10\xf4")  # cli; out 0x10, al; hlt
        prepare(vcpu, IF, shadow=uapi.KVM_X86_SHADOW_INT_MOV_SS)
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit) and exit_.port == 0x10, f"CLI in the shadow: expected the OUT, saw {exit_!r}"
        assert vcpu.run() == HltExit(), "IF clear: no window"
        assert vcpu.ready_for_interrupt_injection is False


@pytest.mark.parametrize("profile", UPSTREAM)
def test_an_in_kernel_pic_ignores_the_request(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\xe6\x10\xf4")
        prepare(vcpu, IF)
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit), f"dm_request_for_irq_injection is false with a PIC: expected the OUT, saw {exit_!r}"
        assert vcpu.ready_for_interrupt_injection, "with an in-kernel PIC kvm_run always reports ready"


@pytest.mark.parametrize("profile", UPSTREAM)
def test_programs_take_the_window_at_entry(profile: str) -> None:
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        load_program(vm, vcpu, Program().out(0x10, 1).hlt())
        prepare(vcpu, IF)
        assert vcpu.run() == IrqWindowOpenExit(), "IF set at entry: the window exit before the program's first operation"
        prepare(vcpu, IF, shadow=uapi.KVM_X86_SHADOW_INT_STI)
        with pytest.raises(ModelLimitation, match="inside the program"):
            vcpu.run()  # the window would open inside the first operation's code


def test_pvm_runs_to_the_exit_with_the_window_requested() -> None:
    """The contrast, on the PVM profile (live here: test_conf_irq_window.py): no exit before an exit to userspace."""
    with open_model(profile="pvm-6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\x90\xf4")
        prepare(vcpu, IF)
        assert vcpu.run() == HltExit()


@pytest.mark.parametrize("profile", UPSTREAM)
def test_a_program_with_an_msr_reply_pending_is_a_limitation(profile: str) -> None:
    """The reply completes first (a #GP would clear IF on its way into the handler): the model, which runs programs
    by operation, says so instead of guessing."""
    with open_model(profile=profile, kernel="6.12") as kvm, kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN)
        vcpu = vm.create_vcpu(0)
        load_program(vm, vcpu, Program().rdmsr(0x12345678).hlt())
        prepare(vcpu, IF)
        vcpu.request_interrupt_window = False
        exit_ = vcpu.run()
        assert exit_.reason == uapi.KVM_EXIT_X86_RDMSR, f"expected the RDMSR in userspace, saw {exit_!r}"
        exit_.reply(1)  # type: ignore[attr-defined]
        vcpu.request_interrupt_window = True
        with pytest.raises(ModelLimitation, match="inside the program"):
            vcpu.run()


def test_svm_with_cr8_15_is_a_limitation() -> None:
    """SVM asks for the window with a virtual interrupt of priority 15 (svm.c svm_set_vintr), which a V_TPR of 15
    (CR8, synced before each VMRUN) masks per the AMD APM: not confirmed on hardware, so the model does not guess."""
    with open_model(profile="amd-epyc", kernel="6.12") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, b"\x90\xf4")
        prepare(vcpu, IF)
        vcpu.run_cr8 = 15
        with pytest.raises(ModelLimitation, match="CR8 15"):
            vcpu.run()
        vcpu.run_cr8 = 14
        assert vcpu.run() == IrqWindowOpenExit(), "CR8 14: the priority-15 interrupt is taken"
