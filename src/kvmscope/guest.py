"""Tiny guests: put code in guest memory, set up the CPU mode, run to an exit.

Works on both backends (the model interprets what the live kernel executes). Guest code comes from the caller; tests
assemble it with ``iced-x86``.
"""

from __future__ import annotations

from . import uapi
from .api import Exit, Vcpu, Vm

DEFAULT_MEMORY = 0x10000
DEFAULT_ENTRY = 0x1000


def ensure_memory(vm: Vm, size: int = DEFAULT_MEMORY) -> None:
    """Give the VM ``size`` bytes of memory at guest-physical 0 unless it already has memory there."""
    if not vm.has_memory(0):
        vm.add_memory(0, size)


def _real_mode_segment(seg_type: int) -> bytes:
    """The members of a real-mode ``kvm_segment`` from ``base`` to ``unusable``, as bytes: usable (the kernel's
    emulator refuses an unusable segment outside 64-bit mode, and a guest left so faults at its first access)."""
    seg = uapi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=seg_type, present=1, dpl=0, db=0, s=1, l=0, g=0,
                           avl=0, unusable=0)
    return bytes(seg)[: uapi.kvm_segment.padding.offset]


_CODE, _DATA = _real_mode_segment(11), _real_mode_segment(3)
# cs, ds, es, fs, gs, ss: where each starts in kvm_sregs, and what it gets
_SEGMENTS = [(getattr(uapi.kvm_sregs, name).offset, _CODE if name == "cs" else _DATA)
             for name in ("cs", "ds", "es", "fs", "gs", "ss")]


def setup_real_mode(vcpu: Vcpu, entry: int = DEFAULT_ENTRY) -> None:
    """Point the vCPU at ``entry`` in 16-bit real mode (CS base 0, paging and long mode off), RFLAGS at reset."""
    sregs = vcpu.get_sregs()
    # Six slice writes, not sixty ctypes attribute writes: VM start runs this once per VM (benchmarks/run.py).
    raw = memoryview(sregs).cast("B")
    for offset, seg in _SEGMENTS:
        raw[offset : offset + len(seg)] = seg
    raw.release()
    sregs.cr0 &= ~(1 << 0 | 1 << 31)  # PE, PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def load_real_mode(vm: Vm, vcpu: Vcpu, code: bytes, entry: int = DEFAULT_ENTRY) -> None:
    """Load ``code`` at ``entry`` (giving the VM memory at 0 if it has none) and set the vCPU up to run it."""
    ensure_memory(vm)
    vm.write_memory(entry, code)
    setup_real_mode(vcpu, entry)


HLT = b"\xf4"
# With an in-kernel LAPIC a guest HLT halts inside KVM_RUN (until an interrupt): such a guest leaves by a port write.
OUT_THEN_HLT = b"\xe6\x30\xf4"  # out 0x30, al; hlt


def run_to_hlt(vm: Vm, vcpu: Vcpu) -> Exit:
    """The smallest real VM entry: a one-byte guest that halts. Returns the exit (HltExit on a working host)."""
    load_real_mode(vm, vcpu, HLT)
    return vcpu.run()
