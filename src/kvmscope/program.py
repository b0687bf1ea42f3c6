"""Guest programs: a short list of operations that run on both backends with identical results.

The ``linux`` backend assembles a program with iced-x86 into 64-bit long-mode code (identity-mapped 2 MB page, GDT,
an IDT whose handlers report exceptions); the model interprets the same operations directly. Results reach the host
through a mailbox in guest memory and an ``out`` to :data:`REPORT_PORT`, and come back from :func:`run_program` as
typed events::

    prog = Program().rdmsr("PLATFORM_INFO").wrmsr("PLATFORM_INFO", 0).cpuid(7).hlt()
    events = run_program(vm, vcpu, prog)
    # [Rdmsr(0xce, 0x80000000), GuestException(13, 0, op=1), Cpuid(7, 0, ...), Halted()]
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import msrs as M
from . import uapi
from .api import Exit, HltExit, IoExit, MsrExit, ProgramRunner, RdmsrExit, Vcpu, Vm, WrmsrExit
from .errors import InvalidValueError

# --- guest memory layout (guest-physical = guest-virtual), clear of the low 64 KB that real-mode guests use ---------
MEMORY_SIZE = 0x200000
GDT = 0x20000
PML4, PDPT, PD = 0x21000, 0x22000, 0x23000
IDT = 0x24000
MAILBOX = 0x25000  # +0 tag (u32) +4 index/vector (u32) +8 .. +24: values
RESUME = 0x25100  # where an exception handler resumes: the next operation
STUBS = 0x26000
CODE = 0x30000
STACK_TOP = 0x80000
REPORT_PORT = 0xF0

TAG_RDMSR, TAG_WRMSR, TAG_CPUID, TAG_EXCEPTION = 1, 2, 3, 4
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_MAILBOX = struct.Struct("<IIQQQ")  # tag, index/vector, a, b, c


# --- operations -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One guest operation."""


@dataclass(frozen=True)
class SetReg(Op):
    register: str  # rax, rbx, rcx, rdx, rsi, rdi, r8 .. r13
    value: int


@dataclass(frozen=True)
class RdmsrOp(Op):
    index: int


@dataclass(frozen=True)
class WrmsrOp(Op):
    index: int
    value: int


@dataclass(frozen=True)
class CpuidOp(Op):
    leaf: int
    subleaf: int = 0


@dataclass(frozen=True)
class OutOp(Op):
    port: int
    value: int


@dataclass(frozen=True)
class InOp(Op):
    port: int


@dataclass(frozen=True)
class HltOp(Op):
    pass


@dataclass(frozen=True)
class LoopOp(Op):
    count: int
    body: tuple[Op, ...]


REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13")


@dataclass
class Program:
    """A guest program: build it with the chaining methods, run it with :func:`run_program`."""

    ops: list[Op] = field(default_factory=list)

    def _add(self, op: Op) -> Program:
        self.ops.append(op)
        return self

    def set_reg(self, register: str, value: int) -> Program:
        if register not in REGISTERS:
            raise InvalidValueError(f"register must be one of {', '.join(REGISTERS)}, not {register!r}")
        return self._add(SetReg(register, M.check_value(value, "register value")))

    def rdmsr(self, msr: int | str) -> Program:
        return self._add(RdmsrOp(M.index_of(msr)))

    def wrmsr(self, msr: int | str, value: int) -> Program:
        return self._add(WrmsrOp(M.index_of(msr), M.check_value(value)))

    def cpuid(self, leaf: int, subleaf: int = 0) -> Program:
        for v in (leaf, subleaf):
            if not 0 <= v <= M.U32_MAX:
                raise InvalidValueError(f"CPUID leaf {v:#x} is not a 32-bit value")
        return self._add(CpuidOp(leaf, subleaf))

    def out(self, port: int, value: int) -> Program:
        if not 0 <= port <= 0xFF or port == REPORT_PORT or not 0 <= value <= 0xFF:
            raise InvalidValueError(f"out takes a port 0..0xff other than 0x{REPORT_PORT:x} and a byte value")
        return self._add(OutOp(port, value))

    def inb(self, port: int) -> Program:
        """``in al, port``: the host answers through ``run_program(..., on_in=...)`` (default 0)."""
        if not 0 <= port <= 0xFF or port == REPORT_PORT:
            raise InvalidValueError(f"in takes a port 0..0xff other than 0x{REPORT_PORT:x}")
        return self._add(InOp(port))

    def hlt(self) -> Program:
        return self._add(HltOp())

    def loop(self, count: int, body: Program) -> Program:
        if not 1 <= count <= 1 << 31 or any(isinstance(o, LoopOp) for o in body.ops):
            raise InvalidValueError("loop takes a count of 1..2**31 and a body without loops")
        return self._add(LoopOp(count, tuple(body.ops)))


# --- events -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """What the host saw of the guest."""


@dataclass(frozen=True)
class Rdmsr(Event):
    index: int
    value: int


@dataclass(frozen=True)
class Wrmsr(Event):
    index: int


@dataclass(frozen=True)
class Cpuid(Event):
    leaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class GuestException(Event):
    vector: int
    error_code: int


@dataclass(frozen=True)
class Out(Event):
    port: int
    value: int


@dataclass(frozen=True)
class In(Event):
    """The guest read a port; ``value`` is what the host answered."""

    port: int
    value: int


@dataclass(frozen=True)
class UserMsr(Event):
    """A guest RDMSR/WRMSR sent to userspace (KVM_CAP_X86_USER_SPACE_MSR), and how the handler answered."""

    write: bool
    index: int
    data: int
    reason: int
    answer: str  # "value 0x..", "ok" or "#GP"


@dataclass(frozen=True)
class Halted(Event):
    pass


@dataclass(frozen=True)
class Stopped(Event):
    """The guest stopped with an exit the runner does not handle (e.g. SHUTDOWN)."""

    exit: str


# --- assembly for the live kernel -------------------------------------------------------------------------------------


def _encode(instructions: Sequence[object], ip: int) -> bytes:
    from iced_x86 import BlockEncoder

    enc = BlockEncoder(64)
    enc.add_many(instructions)  # type: ignore[arg-type]
    return bytes(enc.encode(ip))


def _op_instructions(op: Op, next_ip: int, loop_start: int = 0) -> list[object]:
    from iced_x86 import Code, Instruction, MemoryOperand, Register

    R = {n: getattr(Register, n.upper()) for n in REGISTERS}

    def mem(addr: int) -> MemoryOperand:
        return MemoryOperand(displ=addr, displ_size=4)

    def report(tag: int, index: int) -> list[Instruction]:
        return [
            Instruction.create_mem_u32(Code.MOV_RM32_IMM32, mem(MAILBOX + 4), index),
            Instruction.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, tag),
            Instruction.create_u32_reg(Code.OUT_IMM8_AL, REPORT_PORT, Register.AL),
        ]

    resume = [
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, next_ip),
        Instruction.create_mem_reg(Code.MOV_RM64_R64, mem(RESUME), Register.RAX),
    ]
    if isinstance(op, SetReg):
        return [Instruction.create_reg_u64(Code.MOV_R64_IMM64, R[op.register], op.value)]
    if isinstance(op, RdmsrOp):
        return [*resume, Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, op.index),
                Instruction.create(Code.RDMSR),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 8), Register.EAX),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 12), Register.EDX),
                *report(TAG_RDMSR, op.index)]
    if isinstance(op, WrmsrOp):
        return [*resume, Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, op.index),
                Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, op.value & M.U32_MAX),
                Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, op.value >> 32),
                Instruction.create(Code.WRMSR), *report(TAG_WRMSR, op.index)]
    if isinstance(op, CpuidOp):
        return [*resume, Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, op.leaf),
                Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, op.subleaf),
                Instruction.create(Code.CPUID),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 8), Register.EAX),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 12), Register.EBX),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 16), Register.ECX),
                Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(MAILBOX + 20), Register.EDX),
                *report(TAG_CPUID, op.leaf)]
    if isinstance(op, OutOp):
        return [Instruction.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, op.value),
                Instruction.create_u32_reg(Code.OUT_IMM8_AL, op.port, Register.AL)]
    if isinstance(op, InOp):
        return [Instruction.create_reg_u32(Code.IN_AL_IMM8, Register.AL, op.port)]
    if isinstance(op, HltOp):
        return [*resume, Instruction.create(Code.HLT)]
    raise InvalidValueError(f"cannot assemble {op!r}")


def _assemble_ops(ops: list[Op], base: int) -> bytes:
    # Two passes: every instruction form used has a fixed length, so lengths from a first pass with placeholder
    # addresses hold for the second.
    from iced_x86 import Code, Instruction, Register

    def pieces(addresses: list[int]) -> list[list[object]]:
        out: list[list[object]] = []
        for i, op in enumerate(ops):
            nxt = addresses[i + 1]
            if isinstance(op, LoopOp):
                body = _assemble_ops(list(op.body), addresses[i] + 10)
                start = addresses[i] + 10
                out.append([
                    Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R14, op.count),
                    *[Instruction.create_declare_byte_1(b) for b in body],
                    Instruction.create_reg(Code.DEC_RM64, Register.R14),
                    Instruction.create_branch(Code.JNE_REL32_64, start),
                ])
            else:
                out.append(_op_instructions(op, nxt))
        return out

    placeholder = [base + 0x1000 * i for i in range(len(ops) + 1)]
    lengths = [len(_encode(p, placeholder[i])) for i, p in enumerate(pieces(placeholder))]
    addresses = [base]
    for n in lengths:
        addresses.append(addresses[-1] + n)
    return b"".join(_encode(p, addresses[i]) for i, p in enumerate(pieces(addresses)))


def _stubs() -> tuple[bytes, list[int]]:
    """Exception stubs for vectors 0-31 and the common tail: report vector and error code, resume at [RESUME]."""
    from iced_x86 import Code, Instruction, MemoryOperand, Register

    def mem(addr: int) -> MemoryOperand:
        return MemoryOperand(displ=addr, displ_size=4)

    common = STUBS + 0x800
    tail = _encode([
        Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, mem(RESUME)),
        Instruction.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RSP), Register.RAX),
        Instruction.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, TAG_EXCEPTION),
        Instruction.create_u32_reg(Code.OUT_IMM8_AL, REPORT_PORT, Register.AL),
        Instruction.create(Code.IRETQ),
    ], common)
    code = bytearray(0x800)
    entries = []
    for v in range(32):
        addr = STUBS + 0x40 * v
        ins = [Instruction.create_mem_u32(Code.MOV_RM32_IMM32, mem(MAILBOX + 4), v)]
        if v in ERROR_CODE_VECTORS:
            ins += [Instruction.create_reg(Code.POP_R64, Register.RAX),
                    Instruction.create_mem_reg(Code.MOV_RM64_R64, mem(MAILBOX + 8), Register.RAX)]
        else:
            ins.append(Instruction.create_mem_i32(Code.MOV_RM64_IMM32, mem(MAILBOX + 8), 0))
        ins.append(Instruction.create_branch(Code.JMP_REL32_64, common))
        blob = _encode(ins, addr)
        code[0x40 * v: 0x40 * v + len(blob)] = blob
        entries.append(addr)
    return bytes(code) + tail, entries


def _long_mode_image(program: Program) -> dict[int, bytes]:
    gdt = struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    pml4 = struct.pack("<Q", PDPT | 3)
    pdpt = struct.pack("<Q", PD | 3)
    pd = struct.pack("<Q", 0x83)  # one 2 MB page at 0
    stubs, entries = _stubs()
    idt = b"".join(struct.pack("<HHBBHII", a & 0xFFFF, 8, 0, 0x8E, a >> 16 & 0xFFFF, a >> 32, 0) for a in entries)
    return {GDT: gdt, PML4: pml4, PDPT: pdpt, PD: pd, IDT: idt, STUBS: stubs, MAILBOX: bytes(0x108),
            CODE: _assemble_ops(program.ops, CODE)}


def _long_mode_sregs(vcpu: Vcpu) -> None:
    s = vcpu.get_sregs()
    code = dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0, db=0, s=1, l=1, g=1)
    data = dict(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, dpl=0, db=1, s=1, l=0, g=1)
    for name, value in code.items():
        setattr(s.cs, name, value)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        for name, value in data.items():
            setattr(seg, name, value)
    s.gdt.base, s.gdt.limit = GDT, 23
    s.idt.base, s.idt.limit = IDT, 32 * 16 - 1
    s.cr3, s.cr4, s.cr0, s.efer = PML4, 0x20, 0x80050033, 0x500
    vcpu.set_sregs(s)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = CODE, STACK_TOP, 2
    vcpu.set_regs(regs)


def load_program(vm: Vm, vcpu: Vcpu, program: Program) -> None:
    """Put ``program`` in the VM (2 MB of memory at 0 are added if the VM has none) and point the vCPU at it."""
    if not vm.has_memory(0, MEMORY_SIZE):
        vm.add_memory(0, MEMORY_SIZE)
    if isinstance(vcpu, ProgramRunner):  # the model interprets the operations instead of executing code
        vm.write_memory(MAILBOX, bytes(0x108))
        _long_mode_sregs(vcpu)
        vcpu.attach_program(program)
        return
    for addr, blob in _long_mode_image(program).items():
        vm.write_memory(addr, blob)
    _long_mode_sregs(vcpu)


MsrHandler = Callable[[MsrExit], "int | None"]
InHandler = Callable[[int], int]


def run_program(vm: Vm, vcpu: Vcpu, program: Program, on_msr: MsrHandler | None = None,
                on_in: InHandler | None = None, max_exits: int = 100_000) -> list[Event]:
    """Load and run ``program`` to its halt; return what the host saw.

    ``on_msr`` answers guest MSR accesses sent to userspace: return the value for a RDMSR (anything for a WRMSR) to
    complete it, or None to inject #GP. ``on_in(port)`` answers an ``in`` with a byte (default 0).
    """
    load_program(vm, vcpu, program)
    events: list[Event] = []
    for _ in range(max_exits):
        exit_ = vcpu.run()
        event = _event(vm, exit_, on_msr, on_in)
        events.append(event)
        if isinstance(event, (Halted, Stopped)):
            return events
    events.append(Stopped(f"no halt after {max_exits} exits"))
    return events


def _event(vm: Vm, exit_: Exit, on_msr: MsrHandler | None, on_in: InHandler | None = None) -> Event:
    if isinstance(exit_, HltExit):
        return Halted()
    if isinstance(exit_, IoExit) and not exit_.is_out and exit_.size == 1 and exit_.count == 1:
        value = (on_in(exit_.port) if on_in is not None else 0) & 0xFF
        exit_.reply(bytes([value]))
        return In(exit_.port, value)
    if isinstance(exit_, IoExit) and exit_.is_out and exit_.size == 1:
        if exit_.port != REPORT_PORT:
            return Out(exit_.port, exit_.data[0])
        tag, index, a, b, _c = _MAILBOX.unpack(vm.read_memory(MAILBOX, _MAILBOX.size))
        tag = exit_.data[0]
        if tag == TAG_RDMSR:
            return Rdmsr(index, a)
        if tag == TAG_WRMSR:
            return Wrmsr(index)
        if tag == TAG_CPUID:
            return Cpuid(index, a & M.U32_MAX, a >> 32, b & M.U32_MAX, b >> 32)
        if tag == TAG_EXCEPTION:
            return GuestException(index, a)
    if isinstance(exit_, (RdmsrExit, WrmsrExit)):
        write = isinstance(exit_, WrmsrExit)
        answer = on_msr(exit_) if on_msr is not None else None
        if answer is None:
            exit_.inject_gp()
            return UserMsr(write, exit_.index, exit_.data, exit_.msr_reason, "#GP")
        exit_.reply(0 if write else answer)
        return UserMsr(write, exit_.index, exit_.data, exit_.msr_reason, "ok" if write else f"value 0x{answer:x}")
    return Stopped(exit_.name)


__all__ = [
    "Cpuid", "Event", "GuestException", "Halted", "In", "Out", "Program", "Rdmsr", "Stopped", "UserMsr", "Wrmsr",
    "load_program", "run_program", "uapi",
]
