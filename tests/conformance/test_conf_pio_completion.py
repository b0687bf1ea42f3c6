"""A port access that exits to userspace is finished by the next KVM_RUN (``complete_userspace_io``, which runs before
``immediate_exit`` is looked at: 6.12.118 x86.c:11180-11194). What PVM does here, on both backends; upstream's fast
PIO path (RIP left on the OUT too) is in tests/test_model_pio_completion.py."""

from __future__ import annotations

from kvmscope import guest
from kvmscope.api import InterruptedExit, IoExit, System, Vcpu
from vcpu_setup import set_rflags, set_shadow

IN_20, OUT_10, HLT = b"\xe4\x20", b"\xe6\x10", b"\xf4"


def state(vcpu: Vcpu) -> tuple[int, int, int, bool]:
    regs = vcpu.get_regs()
    return regs.rip, regs.rax & 0xFFFF, vcpu.get_vcpu_events().interrupt.shadow, vcpu.ready_for_interrupt_injection


def start(vcpu: Vcpu, shadow: int = 0) -> None:
    set_rflags(vcpu, 0x202)
    if shadow:
        set_shadow(vcpu, shadow)


def finish(vcpu: Vcpu) -> None:
    vcpu.immediate_exit = True
    assert isinstance(vcpu.run(), InterruptedExit), "immediate_exit: EINTR"
    vcpu.immediate_exit = False


def test_an_in_waits_on_its_instruction_until_the_next_run(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, IN_20 + HLT)
        start(vcpu, shadow=1)
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit) and exit_.port == 0x20, f"expected the IN, saw {exit_!r}"
        seen = state(vcpu)
        assert seen == (0x1000, 0, 1, False), f"after the IN's exit: expected RIP on the IN, the shadow kept and not " \
            f"ready, saw (rip, ax, shadow, ready) {seen}"
        exit_.reply(b"\x77")
        finish(vcpu)
        seen = state(vcpu)
        assert seen == (0x1002, 0x77, 0, True), f"an immediate exit still completes the IN: expected (0x1002, 0x77, 0, " \
            f"True), saw {seen}"


def test_set_regs_before_the_completion_drops_the_data(kvm: System) -> None:
    """PVM emulates the IN: KVM_SET_REGS in between (even of the same values) makes the completion keep the
    registers as set, but for RIP, moved past the IN all the same, and RFLAGS, put back as it was at the exit (the
    emulator writes back both)."""
    for rip in (0x1000, 0x1003):
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, IN_20 + HLT * 4)
            start(vcpu)
            exit_ = vcpu.run()
            regs = vcpu.get_regs()
            regs.rip, regs.rax, regs.rflags, regs.rsi = rip, 0xAB00, 0x246, 0x77
            vcpu.set_regs(regs)
            exit_.reply(b"\x12")  # type: ignore[attr-defined]
            finish(vcpu)
            seen = state(vcpu)
            after = vcpu.get_regs()
            assert seen[:2] == (0x1002, 0xAB00), f"KVM_SET_REGS (RIP {rip:#x}, AX 0xab00) before the completion: " \
                f"expected RIP 0x1002 and AX 0xab00, saw {seen}"
            assert (after.rflags, after.rsi) == (0x202, 0x77), f"expected RFLAGS 0x202 (as at the exit) and RSI as " \
                f"set, saw {after.rflags:#x} and {after.rsi:#x}"


def test_an_out_is_finished_at_its_exit(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, OUT_10 + HLT)
        start(vcpu, shadow=1)
        assert isinstance(vcpu.run(), IoExit)
        seen = state(vcpu)
        assert seen == (0x1002, 0, 0, True), f"after the OUT's exit: expected RIP past it and the shadow gone, saw {seen}"


def test_sti_in_the_emulator_blocks_whatever_if_was(kvm: System) -> None:
    """PVM emulates real-mode code: its STI (em_sti) sets the STI shadow even when IF was already set, unless an STI
    shadow is already on (toggle_interruptibility's "sti; sti"). An IN in that shadow keeps it until its completion.
    The CPU's STI blocks only when it sets IF: tests/test_model_pio_completion.py."""
    for rflags, shadow_before, expected in ((0x202, 0, 2), (0x2, 0, 2), (0x2, 0x8F, 0), (0x202, 0x2, 0), (0x2, 1, 2)):
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, b"\xfb" + IN_20 + HLT)
            set_rflags(vcpu, rflags)
            if shadow_before:
                set_shadow(vcpu, shadow_before)
            assert isinstance(vcpu.run(), IoExit)
            seen = vcpu.get_vcpu_events().interrupt.shadow
            assert seen == expected, f"RFLAGS {rflags:#x}, shadow {shadow_before:#x}, then sti; in: expected shadow " \
                f"{expected} at the IN's exit, saw {seen}"


def test_an_mmu_reset_cancels_a_pending_in(kvm: System) -> None:
    """PVM: KVM_SET_SREGS that changes CR0, CR3, CR4 or EFER (what makes __set_sregs reset the MMU) drops a pending IN:
    RIP stays on it, the data never lands, and the next run executes it again. Other changes (CR2, CR8, segments,
    APIC_BASE, the GDT) do not."""
    changes = {"cr0": lambda s: setattr(s, "cr0", s.cr0 | 8), "cr3": lambda s: setattr(s, "cr3", 0x5000),
               "cr4": lambda s: setattr(s, "cr4", s.cr4 | 0x20), "efer": lambda s: setattr(s, "efer", s.efer | 1),
               "cr2": lambda s: setattr(s, "cr2", 0x5000), "cr8": lambda s: setattr(s, "cr8", 5),
               "cs.base": lambda s: setattr(s.cs, "base", 0x10), "gdt": lambda s: setattr(s.gdt, "base", 0x5000)}
    for name, change in changes.items():
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            guest.load_real_mode(vm, vcpu, IN_20 + HLT)
            exit_ = vcpu.run()
            exit_.reply(b"\x12")  # type: ignore[attr-defined]
            sregs = vcpu.get_sregs()
            change(sregs)
            vcpu.set_sregs(sregs)
            finish(vcpu)
            cancelled = name in ("cr0", "cr3", "cr4", "efer")
            seen = state(vcpu)[:2]
            expected = (0x1000, 0) if cancelled else (0x1002, 0x12)
            assert seen == expected, f"{name} changed before the completion: expected (rip, ax) {expected}, saw {seen}"
