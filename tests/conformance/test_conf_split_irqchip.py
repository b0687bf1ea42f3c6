"""KVM_CAP_SPLIT_IRQCHIP on both backends: the local APICs in the kernel, the PIC and IOAPIC in userspace (QEMU's
``kernel-irqchip=split``, Cloud Hypervisor, crosvm). The rules are 6.12.118 x86.c:6091-6110 (enable), x86.c
KVM_CREATE_IRQCHIP, and ``kvm_vcpu_ready_for_interrupt_injection`` with ``kvm_apic_accept_pic_intr``."""

from __future__ import annotations

import errno
import struct

import pytest

from errnos import expect
from kvmscope import guest, uapi
from kvmscope.api import IoExit, MsrBatch, System, Vcpu, Vm
from vcpu_setup import set_rflags

RESERVED_PINS = 24  # what QEMU passes (its IOAPIC's pins)
ASYNC_PF_INT = 0x4B564D06
LVT0, MASKED = 0x350, 1 << 16


def test_split_irqchip_is_taken_once_and_before_any_vcpu(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
        expect(lambda: vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS), errno.EEXIST, "a second split irqchip")
        expect(vm.create_irqchip, errno.EEXIST, "KVM_CREATE_IRQCHIP after a split irqchip")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        expect(lambda: vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 0), errno.EEXIST, "a split irqchip after a full one")
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        expect(lambda: vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 0), errno.EEXIST, "a split irqchip after a vCPU")
    with kvm.create_vm() as vm:
        expect(lambda: vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, uapi.KVM_MAX_IRQ_ROUTES + 1), errno.EINVAL,
               "more reserved IOAPIC pins than routes")
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, uapi.KVM_MAX_IRQ_ROUTES)


def test_split_irqchip_gives_each_vcpu_a_local_apic_and_nothing_else(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
        bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
        ids = [struct.unpack_from("<I", v.get_lapic(), 0x20)[0] >> 24 for v in (bsp, ap)]
        assert ids == [0, 1], f"each vCPU's in-kernel LAPIC has its APIC ID: expected [0, 1], saw {ids}"
        states = [bsp.get_mp_state(), ap.get_mp_state()]
        assert states == [uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_UNINITIALIZED], (
            f"the BSP runnable, the AP waiting for INIT/SIPI: saw {states}")
        taken = bsp.set_msrs(MsrBatch([(ASYNC_PF_INT, 0)]))
        assert taken == 1, f"MSR_KVM_ASYNC_PF_INT needs an in-kernel LAPIC: expected it taken (1), saw {taken}"
        expect(lambda: vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_MASTER), errno.ENXIO, "KVM_GET_IRQCHIP: no in-kernel PIC")
        expect(lambda: vm.create_pit2(), errno.ENOENT, "KVM_CREATE_PIT2: no in-kernel PIC")
    with kvm.create_vm() as vm:
        taken = vm.create_vcpu(0).set_msrs(MsrBatch([(ASYNC_PF_INT, 0)]))
        assert taken == 0, f"without an irqchip MSR_KVM_ASYNC_PF_INT is refused: expected 0, saw {taken}"


def _split_bsp(vm: Vm, lvt0_masked: bool) -> Vcpu:
    """A split irqchip's BSP about to run OUT then HLT with IF set, LVT0 as at reset (ExtINT) or masked."""
    vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
    vcpu = vm.create_vcpu(0)
    guest.load_real_mode(vm, vcpu, guest.OUT_THEN_HLT)
    set_rflags(vcpu, 0x202)
    if lvt0_masked:
        lapic = vcpu.get_lapic()
        struct.pack_into("<I", lapic, LVT0, struct.unpack_from("<I", lapic, LVT0)[0] | MASKED)
        vcpu.set_lapic(lapic)
    return vcpu


@pytest.mark.parametrize(("lvt0_masked", "apic_enabled", "ready"), [(False, True, True), (True, True, False),
                                                                    (True, False, True)])
def test_ready_for_injection_asks_the_local_apic(kvm: System, lvt0_masked: bool, apic_enabled: bool,
                                                 ready: bool) -> None:
    # Without an in-kernel PIC, KVM says ready only if the LAPIC would take an ExtINT: LVT0 unmasked in ExtINT mode
    # (the BSP's at reset), or the APIC disabled in hardware (kvm_apic_accept_pic_intr).
    with kvm.create_vm() as vm:
        vcpu = _split_bsp(vm, lvt0_masked)
        if not apic_enabled:
            sregs = vcpu.get_sregs()
            sregs.apic_base &= ~(1 << 11)
            vcpu.set_sregs(sregs)
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit), f"expected the OUT's exit, saw {exit_}"
        assert vcpu.ready_for_interrupt_injection is ready, (
            f"LVT0 {'masked' if lvt0_masked else 'ExtINT'}, APIC {'on' if apic_enabled else 'off'}, IF set: expected "
            f"ready_for_interrupt_injection {ready}, saw {vcpu.ready_for_interrupt_injection}")


def test_x2apic_api_offers_enable_suppress_eoi_broadcast_only_with_a_split_irqchip(kvm: System) -> None:
    enable = uapi.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST
    system = kvm.check_extension(uapi.KVM_CAP_X2APIC_API)
    for split in (False, True):
        with kvm.create_vm() as vm:
            if split:
                vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
            got = vm.check_extension(uapi.KVM_CAP_X2APIC_API)
            want = system if split else system & ~enable
            assert got == want, f"split={split}: expected the VM's KVM_CAP_X2APIC_API {want:#x}, saw {got:#x}"


@pytest.mark.parametrize("call", ["interrupt", "irq_line", "irq_line_status", "signal_msi", "gsi_routing"])
def test_what_a_split_irqchip_routes_is_the_kernels_or_a_model_limitation(kvm: System, call: str) -> None:
    """The kernel serves these on a split irqchip (the LAPICs, or an exit to userspace); the model says it does not
    implement them (ModelLimitation), not an errno, which would be made up."""
    from kvmscope.model import ModelLimitation

    with kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
        vcpu = vm.create_vcpu(0)
        calls = {"interrupt": lambda: vcpu.interrupt(0x20), "irq_line": lambda: vm.irq_line(4, 1),
                 "irq_line_status": lambda: vm.irq_line_status(4, 1),
                 "signal_msi": lambda: vm.signal_msi(0xFEE00000, 0x30), "gsi_routing": lambda: vm.set_gsi_routing([])}
        try:
            calls[call]()
        except ModelLimitation:
            assert kvm.backend == "model", "only the model may refuse"
        else:
            assert kvm.backend == "linux", f"{call}: the model should say it does not implement this on a split irqchip"


def _window_run(kvm: System, lvt0_masked: bool) -> object:
    """The exit of a run with an interrupt window requested, IF set, on a split irqchip's BSP (LVT0 ExtINT at reset)."""
    with kvm.create_vm() as vm:
        vcpu = _split_bsp(vm, lvt0_masked)
        vcpu.request_interrupt_window = True
        return vcpu.run()


@pytest.mark.parametrize("lvt0_masked", [False, True])
def test_a_window_request_asks_the_local_apic(kvm: System, lvt0_masked: bool) -> None:
    # No window exit while the LAPIC would not take an ExtINT (dm_request_for_irq_injection and
    # kvm_vcpu_ready_for_interrupt_injection): the guest runs on to its OUT. PVM opens a window only at a host tick
    # (docs/live-kernel.md), so a short run mostly reaches the OUT with LVT0 in ExtINT mode too; a tick during the run
    # opens the window there (seen in CI), which the model, with no host tick, does not do.
    from kvmscope.api import IrqWindowOpenExit

    exit_ = _window_run(kvm, lvt0_masked)
    either = kvm.backend == "linux" and not lvt0_masked
    assert isinstance(exit_, (IoExit, IrqWindowOpenExit) if either else IoExit), (
        f"LVT0 {'masked' if lvt0_masked else 'ExtINT'}: expected the OUT{' or a window at a tick' if either else ''}, "
        f"saw {exit_}")


@pytest.mark.parametrize("profile", ["intel-spr", "amd-epyc"])
def test_upstream_window_exits_ask_the_local_apic_too(profile: str) -> None:
    # 6.12.118 x86.c vcpu_run: KVM_EXIT_IRQ_WINDOW_OPEN only when ready; upstream VMX/SVM exit before any instruction.
    from kvmscope.api import IrqWindowOpenExit
    from kvmscope.model import open_model

    with open_model(profile=profile) as kvm:
        masked, extint = _window_run(kvm, True), _window_run(kvm, False)
    assert isinstance(masked, IoExit) and isinstance(extint, IrqWindowOpenExit), (
        f"{profile}: expected the OUT with LVT0 masked and a window exit with LVT0 ExtINT, saw {masked}, {extint}")


def _irqchip_vcpu(vm: Vm, split: bool) -> Vcpu:
    """vCPU 0 of ``vm`` after a split irqchip (KVM_CAP_SPLIT_IRQCHIP) or a full one (KVM_CREATE_IRQCHIP)."""
    if split:
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, RESERVED_PINS)
    else:
        vm.create_irqchip()
    return vm.create_vcpu(0)


@pytest.mark.parametrize("split", [True, False])
def test_the_lvr_offers_directed_eoi_without_an_in_kernel_ioapic(kvm: System, split: bool) -> None:
    # kvm_apic_set_version (6.12.118 lapic.c:584-605) at KVM_SET_CPUID2: a guest with x2APIC, no in-kernel IOAPIC.
    with kvm.create_vm() as vm:
        vcpu = _irqchip_vcpu(vm, split)
        before = struct.unpack_from("<I", vcpu.get_lapic(), 0x30)[0]
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        after = struct.unpack_from("<I", vcpu.get_lapic(), 0x30)[0]
    assert (before >> 24 & 1, after >> 24 & 1) == (0, int(split)), (
        f"split={split}: LVR directed-EOI bit before and after KVM_SET_CPUID2: expected (0, {int(split)}), "
        f"saw {before:#x}, {after:#x}")


def _lapic_run(kvm: System, split: bool, change: str) -> object:
    """A run after an in-kernel LAPIC was given something to deliver: the exit, or the model's limitation."""
    from kvmscope.model import ModelLimitation

    with kvm.create_vm() as vm:
        vcpu = _irqchip_vcpu(vm, split)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        guest.load_real_mode(vm, vcpu, guest.OUT_THEN_HLT)
        lapic = vcpu.get_lapic()
        struct.pack_into("<I", lapic, 0xF0, 0x1FF)  # SPIV: enabled in software
        if change == "irr":
            struct.pack_into("<I", lapic, 0x200 + 0x10 * (0x68 >> 5), 1 << (0x68 & 31))
        elif change == "timer":
            struct.pack_into("<I", lapic, 0x320, 0x50)  # LVTT: one-shot, vector 0x50, unmasked
            struct.pack_into("<I", lapic, 0x380, 0x10000000)  # TMICT
        vcpu.set_lapic(lapic)
        if change == "async_pf":
            assert vcpu.set_msrs(MsrBatch([(0x4B564D06, 0x40), (0x4B564D02, 0x2000 | 0x9)])) == 2, "async PF on"
        try:
            return vcpu.run()
        except ModelLimitation:
            return ModelLimitation


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("change", ["irr", "timer", "async_pf"])
def test_what_a_local_apic_delivers_at_a_run_is_the_kernels_or_a_model_limitation(kvm: System, split: bool,
                                                                                 change: str) -> None:
    # An IRR vector (delivered even with IF clear here: live), a one-shot timer, and async PF's "wakeup all"
    # (kvm_pv_enable_async_pf): the kernel delivers them; the model does not, and says so.
    from kvmscope.model import ModelLimitation

    got = _lapic_run(kvm, split, change)
    if kvm.backend == "model":
        assert got is ModelLimitation, f"{change}: the model should say it does not deliver this, saw {got}"
    else:
        assert isinstance(got, IoExit), f"{change}: expected the live run to reach the OUT, saw {got}"
