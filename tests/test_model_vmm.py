"""Where the model stops on the VMM ioctls: what it does not emulate raises ModelLimitation (never a made-up answer),
leaving the state the kernel would leave. ``test_linux_vmm.py`` shows the live kernel on the same calls."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmscope import guest, uapi
from kvmscope.api import HltExit
from kvmscope.model import ModelLimitation, ModelSystem, open_model


@pytest.fixture
def model() -> Iterator[ModelSystem]:
    system = open_model(profile="pvm-6.18")
    yield system
    system.close()


def test_hlt_with_the_in_kernel_lapic_leaves_the_vcpu_halted(model: ModelSystem) -> None:
    with model.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, guest.HLT)
        with pytest.raises(ModelLimitation, match="halted with an in-kernel LAPIC"):
            vcpu.run()
        assert vcpu.get_mp_state() == uapi.KVM_MP_STATE_HALTED and vcpu.get_regs().rip == guest.DEFAULT_ENTRY + 1
        with pytest.raises(ModelLimitation, match="MP state 3"):
            vcpu.run()
        vcpu.immediate_exit = True
        assert vcpu.run().name == "InterruptedExit", "immediate_exit still returns before anything else"


def test_irq_line_with_the_irqchip_is_not_emulated(model: ModelSystem) -> None:
    with model.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(ModelLimitation, match="PIC and IOAPIC"):
            vm.irq_line(4, 1)
        with pytest.raises(ModelLimitation, match="PIC and IOAPIC"):
            vm.irq_line_status(4, 1)
        vm.create_vcpu(0)
        with pytest.raises(ModelLimitation, match="physical destinations"):
            vm.signal_msi(0xFEE00004, 0x30)  # logical destination mode


@pytest.mark.parametrize("queue", ["nmi", "interrupt", "interrupt_bitmap", "inject_db", "mp_state", "singlestep",
                                   "tsc_deadline"])
def test_run_refuses_what_it_cannot_deliver(model: ModelSystem, queue: str) -> None:
    with model.create_vm() as vm:
        if queue in ("mp_state", "tsc_deadline"):
            vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10]))
        if queue == "nmi":
            vcpu.nmi()
        elif queue == "interrupt":
            vcpu.interrupt(0x20)
        elif queue == "interrupt_bitmap":  # KVM_SET_SREGS queues the lowest vector set (found by the state fuzzer)
            sregs = vcpu.get_sregs()
            sregs.interrupt_bitmap[2] = 1 << 51
            vcpu.set_sregs(sregs)
        elif queue == "inject_db":
            vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_INJECT_DB)
        elif queue == "mp_state":
            vcpu.set_mp_state(uapi.KVM_MP_STATE_HALTED)
        elif queue == "tsc_deadline":
            vcpu.set_cpuid(model.get_supported_cpuid())
            lapic = vcpu.get_lapic()
            lapic.regs[0x322] = 0x05  # LVTT: masked, TSC-deadline mode
            vcpu.set_lapic(lapic)
            vcpu.write_msr(0x6E0, 1 << 40)
        else:
            vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP)
        with pytest.raises(ModelLimitation, match="KVM_RUN"):
            vcpu.run()
        assert not vcpu.has_run, "nothing ran"


def test_run_refuses_with_eventfds_or_coalesced_zones(model: ModelSystem) -> None:
    fd = os.eventfd(0)
    try:
        with model.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10]))
            vm.ioeventfd(fd, 0x10, 1, 0, uapi.KVM_IOEVENTFD_FLAG_PIO)
            with pytest.raises(ModelLimitation, match="ioeventfds"):
                vcpu.run()
            vm.ioeventfd(fd, 0x10, 1, 0, uapi.KVM_IOEVENTFD_FLAG_PIO | uapi.KVM_IOEVENTFD_FLAG_DEASSIGN)
            vm.register_coalesced_mmio(0xD0000000, 0x1000)
            with pytest.raises(ModelLimitation, match="coalesced"):
                vcpu.run()
            vm.unregister_coalesced_mmio(0xD0000000, 0x1000)
            assert vcpu.run().name == "IoExit", "runs once nothing unmodelled is registered"
    finally:
        os.close(fd)


def test_dirty_log_after_a_run_and_translate_with_paging(model: ModelSystem) -> None:
    with model.create_vm() as vm:
        vm.add_memory(0, 0x10000, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10]))
        vcpu.run()
        with pytest.raises(ModelLimitation, match="pages a guest writes"):
            vm.get_dirty_log(0)
        sregs = vcpu.get_sregs()
        sregs.cr0 |= 1 << 31 | 1
        sregs.cr4 |= 1 << 5
        sregs.efer |= 0x500  # long mode: PVM (this profile) pages only there, as the live kernel shows
        vcpu.set_sregs(sregs)
        with pytest.raises(ModelLimitation, match="page tables"):
            vcpu.translate(0x1000)


def test_smm_and_nested_state_where_the_profile_has_them() -> None:
    with open_model(profile="intel-spr") as system, system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(ModelLimitation, match="SMM"):
            vcpu.smi()
        events = uapi.kvm_vcpu_events(flags=uapi.KVM_VCPUEVENT_VALID_SMM)
        events.smi.pending = 1
        with pytest.raises(ModelLimitation, match="SMM"):
            vcpu.set_vcpu_events(events)
        with pytest.raises(ModelLimitation, match="nested"):
            vcpu.get_nested_state()


def test_svm_reports_both_shadow_bits() -> None:
    with open_model(profile="amd-epyc") as system, system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        events = uapi.kvm_vcpu_events(flags=uapi.KVM_VCPUEVENT_VALID_SHADOW)
        events.interrupt.shadow = uapi.KVM_X86_SHADOW_INT_STI
        vcpu.set_vcpu_events(events)
        assert vcpu.get_vcpu_events().interrupt.shadow == 3, "SVM keeps one shadow bit (svm_get_interrupt_shadow)"


@pytest.mark.parametrize(("profile", "given", "kept"), [("intel-spr", 3, 1), ("intel-spr", 2, 2), ("amd-epyc", 2, 3),
                                                        ("pvm-6.18", 0xFF, 0xFF)])
def test_interrupt_shadow_by_vendor(profile: str, given: int, kept: int) -> None:
    """KVM_SET_VCPU_EVENTS' interrupt shadow as each vendor keeps it: VMX MOV_SS, else STI (6.12.118
    vmx.c:1607-1616); SVM one bit reported as both; PVM the byte as given (the live kernel here: conformance)."""
    with open_model(profile=profile) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        events = vcpu.get_vcpu_events()
        events.flags, events.interrupt.shadow = uapi.KVM_VCPUEVENT_VALID_SHADOW, given
        vcpu.set_vcpu_events(events)
        got = vcpu.get_vcpu_events().interrupt.shadow
        assert got == kept, f"{profile}: shadow {given:#x} read back {got:#x}, expected {kept:#x}"


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
def test_upstream_keeps_rflags_vm_and_paging(profile: str) -> None:
    """Upstream VMX and SVM keep RFLAGS.VM and CR0.PG without long mode (kvm_set_rflags, set_cr0); only PVM drops
    them (conf_vcpu_state::test_pvm_drops_rflags_vm_and_paging_outside_long_mode)."""
    with open_model(profile=profile) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
        regs.rflags = 1 << 17 | 0x2
        vcpu.set_regs(regs)
        sregs = vcpu.get_sregs()
        sregs.cr0, sregs.cr3 = 0x80000011, 0x2000
        vcpu.set_sregs(sregs)
        assert (vcpu.get_regs().rflags, vcpu.get_sregs().cr0) == (1 << 17 | 0x2, 0x80000011), profile


def test_dr7_breakpoints_are_a_limitation_at_run() -> None:
    """A breakpoint DR7 enables (L0-L3, G0-G3) would raise #DB in the guest, which the model does not trap: KVM_RUN
    is a ModelLimitation until DR7 enables none (the live kernel here runs into the guest's #DB handler)."""
    with open_model(profile="pvm-6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, guest.HLT)
        for dr7 in (1 << 1, 1 << 6, 0x4830F772):
            regs = uapi.kvm_debugregs(dr7=dr7)
            regs.db[0] = guest.DEFAULT_ENTRY
            vcpu.set_debugregs(regs)
            with pytest.raises(ModelLimitation, match="DR7"):
                vcpu.run()
        vcpu.set_debugregs(uapi.kvm_debugregs(dr7=0x400 | 0xFF00))  # no enable bit: conditions alone trap nothing
        assert isinstance(vcpu.run(), HltExit), "DR7 without an enabled breakpoint: the guest runs"


@pytest.mark.parametrize(("profile", "smallest"), [("intel-spr", 0x4000), ("amd-epyc", 0x1000), ("pvm-6.18", 0x1000)])
def test_a_dirty_ring_the_kernel_takes_is_a_limitation(profile: str, smallest: int) -> None:
    """The smallest ring holds the 64 reserved entries and, on VMX, the PML log's 512 (kvm_dirty_ring_get_rsvd_entries)
    in a power of two of at least a page; the model keeps no ring, so a size the kernel takes is a ModelLimitation."""
    from kvmscope.errors import KvmError
    from kvmscope.model import open_model

    with open_model(profile=profile, kernel="6.12" if profile != "pvm-6.18" else None) as kvm, kvm.create_vm() as vm:
        if not vm.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING):
            pytest.skip(f"{profile}'s profile has no dirty ring")
        with pytest.raises(KvmError):
            vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, smallest // 2)
        with pytest.raises(ModelLimitation, match="dirty ring"):
            vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, smallest)
