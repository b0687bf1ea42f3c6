"""Guest code for tests, assembled with iced-x86."""

from __future__ import annotations

from iced_x86 import BlockEncoder, Code, Instruction, Register


def assemble(instructions: list[Instruction], bitness: int = 16, ip: int = 0x1000) -> bytes:
    enc = BlockEncoder(bitness)
    enc.add_many(instructions)
    return bytes(enc.encode(ip))


def mov_al(value: int) -> Instruction:
    return Instruction.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, value)


def out_al(port: int) -> Instruction:
    return Instruction.create_u32_reg(Code.OUT_IMM8_AL, port, Register.AL)


def in_al(port: int) -> Instruction:
    return Instruction.create_reg_u32(Code.IN_AL_IMM8, Register.AL, port)


def hlt() -> Instruction:
    return Instruction.create(Code.HLT)


def mov_to_mem8(addr: int) -> Instruction:
    """``mov [addr], al`` (16-bit addressing)."""
    from iced_x86 import MemoryOperand

    return Instruction.create_mem_reg(Code.MOV_RM8_R8, MemoryOperand(displ=addr, displ_size=2), Register.AL)
