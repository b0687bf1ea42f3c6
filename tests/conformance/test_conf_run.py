"""KVM_RUN exits on both backends: the same guest gives the same exits."""

from __future__ import annotations

from kvmscope import guest, uapi
from kvmscope.api import HltExit, IoExit, MmioExit, System


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
