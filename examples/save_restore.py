"""Snapshot a running vCPU and its VM the way a VMM does, restore it onto a fresh VM, and show the guest runs on.

    python examples/save_restore.py          # the live kernel (or the model where /dev/kvm is missing)
    python examples/save_restore.py model    # the model (profile of this project's PVM host)

The guest is a real-mode loop: it reads a number from port 0x30, stores it at 0x2000 and writes it to port 0x10. The
source VM has an in-kernel irqchip and PIT, as QEMU and Firecracker create them. After three rounds the VMM saves the
VM (irqchip, PIT, kvmclock, memory) and the vCPU (regs, sregs, FPU, XSAVE, XCRS, LAPIC, events, MP state, debug
registers, every MSR of KVM_GET_MSR_INDEX_LIST that reads), restores all of it onto a new VM in the order QEMU uses,
checks every piece reads back as saved, and runs the copy on from where the original stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import kvmscope
from kvmscope import guest, uapi
from kvmscope.api import IoExit, MsrBatch, System, Vcpu, Vm

CODE = bytes([
    0xE4, 0x30,              # 0x1000: in al, 0x30 (not 0x20: the in-kernel PIC answers that)
    0x88, 0x06, 0x00, 0x20,  # 0x1002: mov [0x2000], al
    0xE6, 0x10,              # 0x1006: out 0x10, al
    0xEB, 0xF6,              # 0x1008: jmp 0x1000
])  # fmt: skip
ENTRY, MEMORY, TSS = 0x1000, 0x10000, 0xFFFBD000


@dataclass
class Snapshot:
    """What a VMM keeps of a VM with one vCPU."""

    memory: bytes = b""
    irqchips: list[uapi.kvm_irqchip] = field(default_factory=list)
    pit: uapi.kvm_pit_state2 | None = None
    clock: int = 0
    vcpu: dict[str, object] = field(default_factory=dict)
    msrs: dict[int, int] = field(default_factory=dict)


def new_vm(kvm: System) -> tuple[Vm, Vcpu]:
    """A VM as QEMU makes one: TSS, in-kernel irqchip and PIT, memory, then the vCPU with the host's CPUID."""
    vm = kvm.create_vm()
    vm.set_tss_addr(TSS)
    vm.create_irqchip()
    vm.create_pit2(uapi.KVM_PIT_SPEAKER_DUMMY)
    vm.add_memory(0, MEMORY)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    return vm, vcpu


def step(vcpu: Vcpu, value: int) -> int:
    """Run one round of the guest: answer its IN with ``value``; return what it wrote to port 0x10."""
    exit_in = vcpu.run()
    assert isinstance(exit_in, IoExit) and exit_in.port == 0x30, exit_in
    exit_in.reply(bytes([value]))
    exit_out = vcpu.run()
    assert isinstance(exit_out, IoExit) and exit_out.port == 0x10, exit_out
    return exit_out.data[0]


VCPU_STATE = ("regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "vcpu_events", "mp_state", "debugregs")


def save(kvm: System, vm: Vm, vcpu: Vcpu) -> Snapshot:
    snap = Snapshot(memory=vm.read_memory(0, MEMORY), clock=vm.get_clock().clock, pit=vm.get_pit2())
    snap.irqchips = [vm.get_irqchip(chip) for chip in range(uapi.KVM_NR_IRQCHIPS)]
    snap.vcpu = {name: getattr(vcpu, f"get_{name}")() for name in VCPU_STATE}
    for index in kvm.get_msr_index_list():
        value = vcpu.try_read_msr(index)
        if value is not None:
            snap.msrs[index] = value
    return snap


def restore(kvm: System, snap: Snapshot) -> tuple[Vm, Vcpu]:
    """Onto a fresh VM, in QEMU's order (kvm_arch_put_registers): regs, XSAVE (after the FPU), XCRS, sregs, MSRs,
    events, MP state, LAPIC, debug registers; then the VM's irqchip, PIT and clock."""
    vm, vcpu = new_vm(kvm)
    vm.write_memory(0, snap.memory)
    s = snap.vcpu
    vcpu.set_regs(s["regs"])  # type: ignore[arg-type]
    vcpu.set_fpu(s["fpu"])  # type: ignore[arg-type]
    vcpu.set_xsave(s["xsave"])  # type: ignore[arg-type]
    vcpu.set_xcrs(s["xcrs"])  # type: ignore[arg-type]
    vcpu.set_sregs(s["sregs"])  # type: ignore[arg-type]
    vcpu.write_msrs(MsrBatch(snap.msrs))
    vcpu.set_vcpu_events(s["vcpu_events"])  # type: ignore[arg-type]
    vcpu.set_mp_state(s["mp_state"])  # type: ignore[arg-type]
    vcpu.set_lapic(s["lapic"])  # type: ignore[arg-type]
    vcpu.set_debugregs(s["debugregs"])  # type: ignore[arg-type]
    for chip in snap.irqchips:
        vm.set_irqchip(chip)
    assert snap.pit is not None
    vm.set_pit2(snap.pit)
    vm.set_clock(uapi.kvm_clock_data(clock=snap.clock))
    return vm, vcpu


def differences(kvm: System, snap: Snapshot, vm: Vm, vcpu: Vcpu) -> list[str]:
    """What of the snapshot does not read back from the restored VM (empty when all of it does)."""
    again = save(kvm, vm, vcpu)
    out = [name for name in VCPU_STATE if _raw(snap.vcpu[name]) != _raw(again.vcpu[name])]
    out += [f"MSR 0x{i:x}" for i, v in snap.msrs.items() if again.msrs.get(i) != v and i != 0x10]  # TSC runs on
    out += [f"irqchip {c.chip_id}" for c, d in zip(snap.irqchips, again.irqchips, strict=True) if bytes(c) != bytes(d)]
    out += ["memory"] if again.memory != snap.memory else []
    return out


def _raw(value: object) -> object:
    return bytes(value) if not isinstance(value, int) else value  # type: ignore[call-overload]


def main(backend: str | None = None, profile: str | None = None) -> int:
    options = {"profile": profile} if profile else {}
    with kvmscope.open(backend, **options) as kvm:
        print(kvm.describe())
        vm, vcpu = new_vm(kvm)
        vm.write_memory(ENTRY, CODE)
        guest.setup_real_mode(vcpu, ENTRY)
        print("source VM writes:", [step(vcpu, n) for n in (1, 2, 3)])
        snap = save(kvm, vm, vcpu)
        print(f"saved: memory {len(snap.memory)} bytes, {len(snap.irqchips)} irqchips, PIT, kvmclock, "
              f"{len(snap.vcpu)} vCPU states, {len(snap.msrs)} MSRs")
        vm.close()
        copy, vcpu = restore(kvm, snap)
        with copy:
            missing = differences(kvm, snap, copy, vcpu)
            print("restored state reads back:", "all of it" if not missing else f"except {missing}")
            print(f"restored vCPU at RIP 0x{vcpu.get_regs().rip:x}, memory[0x2000] = {copy.read_memory(0x2000, 1)[0]}")
            print("restored VM writes:", [step(vcpu, n) for n in (4, 5)])
            print(f"memory[0x2000] = {copy.read_memory(0x2000, 1)[0]}")
        return 1 if missing else 0


if __name__ == "__main__":
    if len(sys.argv) > 3 or any(a.startswith("-") for a in sys.argv[1:]):
        sys.exit(__doc__)
    try:
        sys.exit(main(*sys.argv[1:3]))
    except kvmscope.KvmscopeError as e:
        sys.exit(f"error: {e}")
