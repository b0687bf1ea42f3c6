"""KVM_RUN exits on both backends: the same guest gives the same exits."""

from __future__ import annotations

import errno

import pytest

from kvmscope import guest, uapi
from kvmscope.api import HltExit, InterruptedExit, IoExit, MmioExit, System, Vcpu
from kvmscope.errors import InvalidTypeError, InvalidValueError, KvmError


def test_real_mode_guest_exits(kvm: System) -> None:
    # mov al, 0x42; out 0x10, al; in al, 0x20; out 0x21, al; mov [0xf000], al; hlt  (assembled with iced-x86)
    from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

    enc = BlockEncoder(16)
    enc.add_many([
        Instruction.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, 0x42),
        Instruction.create_u32_reg(Code.OUT_IMM8_AL, 0x10, Register.AL),
        Instruction.create_reg_u32(Code.IN_AL_IMM8, Register.AL, 0x20),
        Instruction.create_u32_reg(Code.OUT_IMM8_AL, 0x21, Register.AL),
        Instruction.create_mem_reg(Code.MOV_RM8_R8, MemoryOperand(displ=0xF000, displ_size=2), Register.AL),
        Instruction.create(Code.HLT),
    ])
    code = bytes(enc.encode(0x1000))
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.ensure_memory(vm, 0x8000)
        guest.load_real_mode(vm, vcpu, code)
        exits = [vcpu.run()]
        assert exits[0] == IoExit(uapi.KVM_EXIT_IO_OUT, 1, 0x10, 1, b"\x42"), exits
        in_exit = vcpu.run()
        assert isinstance(in_exit, IoExit) and (in_exit.direction, in_exit.port) == (uapi.KVM_EXIT_IO_IN, 0x20)
        in_exit.reply(b"\x77")
        assert vcpu.run() == IoExit(uapi.KVM_EXIT_IO_OUT, 1, 0x21, 1, b"\x77"), "the guest echoes the IN value"
        assert vcpu.run() == MmioExit(0xF000, b"\x77", 1, True), "a write beyond memory is MMIO"
        assert vcpu.run() == HltExit()
        assert vcpu.get_regs().rip == 0x1000 + len(code), "RIP is past the HLT"


def test_run_raw_loop(kvm: System) -> None:
    # out 0x10, al; jmp $-2 : the tight loop the benchmarks use, read through run_raw and io_port.
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10, 0xEB, 0xFC]))
        for _ in range(50):
            assert vcpu.run_raw() == uapi.KVM_EXIT_IO and vcpu.io_port == 0x10
        assert vcpu.last_exit() == IoExit(uapi.KVM_EXIT_IO_OUT, 1, 0x10, 1, b"\x00")
        vcpu.immediate_exit = True
        assert vcpu.run_raw() == uapi.KVM_EXIT_INTR
        assert vcpu.last_exit().name == "InterruptedExit"


def cr8s(vcpu: Vcpu) -> tuple[int, int]:
    return vcpu.get_sregs().cr8, vcpu.run_cr8


def set_cr8(vcpu: Vcpu, value: int) -> None:
    sregs = vcpu.get_sregs()
    sregs.cr8 = value
    vcpu.set_sregs(sregs)


def test_kvm_run_cr8_is_loaded_at_each_run_without_an_irqchip(kvm: System) -> None:
    """Without an in-kernel LAPIC, KVM_RUN loads kvm_run.cr8 into CR8 before anything else (immediate_exit, the
    missing-memory ENOSPC), EINVAL above 15; every return leaves the vCPU's CR8 in kvm_run.cr8 (post_kvm_run_save)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert cr8s(vcpu) == (0, 0), f"a new vCPU: expected CR8 0 and kvm_run.cr8 0, saw {cr8s(vcpu)}"
        set_cr8(vcpu, 5)
        with pytest.raises(KvmError) as failed:  # no memory yet: ENOSPC on PVM, after the reload
            vcpu.run()
        assert cr8s(vcpu) == (0, 0), f"KVM_SET_SREGS' CR8 5, then a failed run: expected (0, 0), saw {cr8s(vcpu)}"
        guest.load_real_mode(vm, vcpu, b"\xf4" * 8)
        set_cr8(vcpu, 5)
        assert isinstance(vcpu.run(), HltExit), "the guest halts"
        assert cr8s(vcpu) == (0, 0), f"CR8 5 by KVM_SET_SREGS, then a run: expected (0, 0), saw {cr8s(vcpu)}"
        vcpu.run_cr8 = 9
        assert cr8s(vcpu) == (0, 9), f"kvm_run.cr8 written: expected (0, 9) before the run, saw {cr8s(vcpu)}"
        assert isinstance(vcpu.run(), HltExit), "the guest halts"
        assert cr8s(vcpu) == (9, 9), f"kvm_run.cr8 9, then a run: expected (9, 9), saw {cr8s(vcpu)}"
        set_cr8(vcpu, 7)
        vcpu.immediate_exit = True
        assert isinstance(vcpu.run(), InterruptedExit), "immediate_exit: EINTR"
        vcpu.immediate_exit = False
        assert cr8s(vcpu) == (9, 9), f"CR8 7, then an immediate exit: expected (9, 9), saw {cr8s(vcpu)}"
        vcpu.run_cr8 = 16
        with pytest.raises(KvmError) as refused:
            vcpu.run()
        assert refused.value.errno == errno.EINVAL, f"kvm_run.cr8 16: expected EINVAL, saw {refused.value}"
        assert cr8s(vcpu) == (9, 9), f"kvm_run.cr8 16 refused: expected (9, 9), saw {cr8s(vcpu)}"
    assert failed.value.errno == errno.ENOSPC, f"a run without memory on PVM: expected ENOSPC, saw {failed.value}"


def test_kvm_run_cr8_is_not_loaded_with_an_irqchip(kvm: System) -> None:
    """With an in-kernel LAPIC CR8 is the TPR: KVM_RUN does not load kvm_run.cr8, and reports the TPR's class there."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        set_cr8(vcpu, 5)
        vcpu.run_cr8 = 3
        vcpu.immediate_exit = True
        assert isinstance(vcpu.run(), InterruptedExit), "immediate_exit: EINTR"
        assert cr8s(vcpu) == (5, 5), f"CR8 5 with an irqchip, kvm_run.cr8 3, a run: expected (5, 5), saw {cr8s(vcpu)}"


@pytest.mark.parametrize(("value", "error"), [("9", InvalidTypeError), (True, InvalidTypeError),
                                              (-1, InvalidValueError), (1 << 64, InvalidValueError)])
def test_kvm_run_cr8_takes_a_u64(kvm: System, value: object, error: type[Exception]) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(error, match="run_cr8"):
            vcpu.run_cr8 = value  # type: ignore[assignment]
        assert vcpu.run_cr8 == 0, "a refused value changes nothing"


def test_pvm_shuts_down_the_next_run_after_paging_outside_long_mode(kvm: System) -> None:
    """PVM drops CR0.PG given without EFER.LME, and the next KVM_RUN that would enter the guest ends in a shutdown
    instead: no instruction runs and no state changes, even with no memory yet (before ENOSPC), and it is no VM entry
    (the feature MSRs stay writable). immediate_exit leaves it pending; the run after the shutdown enters as usual."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cr0, sregs.efer = 0x80000011, 0
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cr0 == 0x11, f"CR0.PG without long mode: expected 0x11 read back, saw {vcpu.get_sregs().cr0:#x}"
        vcpu.immediate_exit = True
        assert isinstance(vcpu.run(), InterruptedExit), "immediate_exit: EINTR, the shutdown still pending"
        vcpu.immediate_exit = False
        before = bytes(vcpu.get_regs()), bytes(vcpu.get_sregs())
        exit_ = vcpu.run(timeout=2)
        assert exit_.reason == uapi.KVM_EXIT_SHUTDOWN, f"the next run, with no memory: expected a shutdown, saw {exit_}"
        assert (bytes(vcpu.get_regs()), bytes(vcpu.get_sregs())) == before, "the shutdown changed no register"
        platform_info = vcpu.read_msr(0xCE)
        assert vcpu.set_msrs({0xCE: platform_info ^ 1 << 31}) == 1, "the shutdown was no VM entry: no freeze"
        vcpu.set_msrs({0xCE: platform_info})
        guest.load_real_mode(vm, vcpu, b"\xf4")
        assert isinstance(vcpu.run(timeout=2), HltExit), "the run after the shutdown enters the guest"
