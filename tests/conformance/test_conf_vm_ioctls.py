"""The VMM's VM ioctls on both backends: irqchip, PIT, MSI, GSI routing, irqfd, ioeventfd, dirty log, clock, TSS and
identity-map addresses, coalesced MMIO, the VM's TSC rate, KVM_GET_EMULATED_CPUID. Each errno here is the one the live
kernel on this machine gives (docs/binding.md)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from functools import partial

import pytest

from errnos import expect
from kvmscope import guest, uapi
from kvmscope.api import CpuidEntry, System
from kvmscope.errors import KvmError
from kvmscope.model import ModelLimitation


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0)
    yield fd
    os.close(fd)


CAPS = ["KVM_CAP_IRQCHIP", "KVM_CAP_PIT2", "KVM_CAP_PIT_STATE2", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQ_INJECT_STATUS",
        "KVM_CAP_SIGNAL_MSI", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_SET_TSS_ADDR",
        "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_COALESCED_MMIO", "KVM_CAP_EXT_EMUL_CPUID", "KVM_CAP_MP_STATE",
        "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS", "KVM_CAP_XSAVE", "KVM_CAP_XSAVE2", "KVM_CAP_XCRS",
        "KVM_CAP_NESTED_STATE", "KVM_CAP_TSC_CONTROL", "KVM_CAP_GET_TSC_KHZ", "KVM_CAP_VM_TSC_CONTROL",
        "KVM_CAP_KVMCLOCK_CTRL", "KVM_CAP_SET_GUEST_DEBUG", "KVM_CAP_USER_NMI", "KVM_CAP_X86_SMM"]
# What this host's 6.18 PVM kernel answers (KVM_CHECK_EXTENSION on /dev/kvm).
HOST_CAPS = {"KVM_CAP_IRQ_ROUTING": 4096, "KVM_CAP_ADJUST_CLOCK": 14, "KVM_CAP_COALESCED_MMIO": 2,
             "KVM_CAP_XSAVE2": 4096, "KVM_CAP_NESTED_STATE": 0, "KVM_CAP_TSC_CONTROL": 0, "KVM_CAP_VM_TSC_CONTROL": 0,
             "KVM_CAP_X86_SMM": 0}


@pytest.mark.parametrize("cap", CAPS)
def test_capability_of_each_vmm_ioctl(kvm: System, cap: str) -> None:
    got = kvm.check_extension(getattr(uapi, cap))
    assert got == HOST_CAPS.get(cap, 1), f"KVM_CHECK_EXTENSION({cap}): expected {HOST_CAPS.get(cap, 1)}, saw {got}"


def test_emulated_cpuid(kvm: System) -> None:
    assert kvm.get_emulated_cpuid() == [CpuidEntry(0, eax=7), CpuidEntry(1, ecx=1 << 22),
                                        CpuidEntry(7, flags=uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)], (
        "leaf 0 EAX 7, MOVBE in leaf 1, leaf 7 without RDPID (no RDTSCP under PVM)")


def test_irqchip_absent_then_created(kvm: System) -> None:
    with kvm.create_vm() as vm:
        expect(lambda: vm.get_irqchip(0), errno.ENXIO, "KVM_GET_IRQCHIP without an irqchip")
        expect(lambda: vm.irq_line(4, 1), errno.ENXIO, "KVM_IRQ_LINE without an irqchip")
        expect(lambda: vm.irq_line_status(4, 1), errno.ENXIO, "KVM_IRQ_LINE_STATUS without an irqchip")
        expect(lambda: vm.create_pit2(), errno.ENOENT, "KVM_CREATE_PIT2 without an irqchip")
        vm.create_irqchip()
        expect(vm.create_irqchip, errno.EEXIST, "a second KVM_CREATE_IRQCHIP")
        expect(lambda: vm.get_irqchip(3), errno.EINVAL, "KVM_GET_IRQCHIP of chip 3")
        master, slave, ioapic = (vm.get_irqchip(i) for i in range(3))
        assert (master.chip.pic.elcr_mask, slave.chip.pic.elcr_mask) == (0xF8, 0xDE), "ELCR masks at reset"
        assert bytes(master.chip.pic)[:15] == bytes(15) == bytes(slave.chip.pic)[:15], "PICs otherwise zero"
        io = ioapic.chip.ioapic
        assert (io.base_address, io.id, io.irr, io.ioregsel) == (0xFEC00000, 0, 0, 0), "IOAPIC at its default base"
        assert list(io.redirtbl) == [1 << 16] * 24, f"every IOAPIC pin masked at reset, saw {list(io.redirtbl)}"
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        expect(vm.create_irqchip, errno.EINVAL, "KVM_CREATE_IRQCHIP after a vCPU")


def test_irqchip_state_round_trips(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        pic = vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_MASTER)
        pic.chip.pic.imr, pic.chip.pic.irq_base, pic.chip.pic.elcr = 0xFB, 0x08, 0x20
        vm.set_irqchip(pic)
        assert bytes(vm.get_irqchip(0)) == bytes(pic), "the master PIC reads back as set"
        ioapic = vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC)
        ioapic.chip.ioapic.redirtbl[4] = 0x30 | 1 << 56
        ioapic.chip.ioapic.id = 2 << 24
        ioapic.chip.ioapic.irr = 0x10
        vm.set_irqchip(ioapic)
        got = vm.get_irqchip(2).chip.ioapic
        assert (got.redirtbl[4], got.id, got.irr) == (0x30 | 1 << 56, 2 << 24, 0), (
            "pin 4 and the ID read back; the IRR of an unmasked edge pin is delivered, and hidden")
        bad = uapi.kvm_irqchip(chip_id=7)
        expect(lambda: vm.set_irqchip(bad), errno.EINVAL, "KVM_SET_IRQCHIP of chip 7")


def _pit_fields(pit: uapi.kvm_pit_state2) -> list[tuple[int, ...]]:
    # count_load_time of channels 1 and 2 is the host clock when they were loaded: left out.
    return [tuple(getattr(c, f[0]) for f in c._fields_ if f[0] != "count_load_time" or i == 0)
            for i, c in enumerate(pit.channels)] + [(pit.flags, *pit.reserved)]


def test_pit(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        expect(vm.get_pit2, errno.ENXIO, "KVM_GET_PIT2 before KVM_CREATE_PIT2")
        expect(lambda: vm.set_pit2(uapi.kvm_pit_state2()), errno.ENXIO, "KVM_SET_PIT2 before KVM_CREATE_PIT2")
        vm.create_pit2(uapi.KVM_PIT_SPEAKER_DUMMY)
        expect(vm.create_pit2, errno.EEXIST, "a second KVM_CREATE_PIT2")
        pit = vm.get_pit2()
        reset = [(0x10000, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 1, 0), (0x10000, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 1),
                 (0x10000, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 0), (0,) * 10]
        assert _pit_fields(pit) == reset, f"PIT at reset: expected {reset}, saw {_pit_fields(pit)}"
        assert pit.channels[1].count_load_time > 0, "channel 1 records when its count was loaded"
        pit.channels[0].count, pit.channels[1].mode, pit.channels[2].count = 1000, 2, 0
        pit.flags, pit.reserved[0] = 3, 7
        vm.set_pit2(pit)
        got = vm.get_pit2()
        assert (got.channels[0].count, got.channels[1].mode, got.channels[2].count, got.flags, got.reserved[0]) == (
            1000, 2, 0x10000, 3, 0), "counts reload (0 means 0x10000), flags kept, reserved words dropped"


def test_signal_msi(kvm: System) -> None:
    with kvm.create_vm() as vm:
        expect(lambda: vm.signal_msi(0xFEE00000, 0x30), errno.EINVAL, "KVM_SIGNAL_MSI without an irqchip")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        expect(lambda: vm.signal_msi(0xFEE00000, 0x30, flags=2), errno.EINVAL, "KVM_SIGNAL_MSI with unknown flags")
        expect(lambda: vm.signal_msi(0xFEE00000, 0x30), errno.EPERM, "KVM_SIGNAL_MSI with no vCPU (-1)")
        vcpu = vm.create_vcpu(0)
        assert vm.signal_msi(0xFEE00000, 0x30) == 0, "an APIC disabled in software (SPIV bit 8 clear) takes none"
        assert vm.signal_msi(0xFEE05000, 0x30) == 0, "no APIC with ID 5"
        lapic = vcpu.get_lapic()
        lapic.regs[0xF0 + 1] |= 1  # SPIV bit 8: APIC software-enabled
        vcpu.set_lapic(lapic)
        assert vm.signal_msi(0xFEE00000, 0x31) == 1, "the enabled APIC with ID 0 takes it"
        irr = int.from_bytes(bytes(vcpu.get_lapic().regs[0x210:0x214]), "little")
        assert irr == 1 << (0x31 - 32), f"vector 0x31 pending in IRR word 1: saw 0x{irr:x}"


def _route_chip(gsi: int, chip: int, pin: int) -> uapi.kvm_irq_routing_entry:
    e = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
    return e


def _route_msi(gsi: int, flags: int = 0) -> uapi.kvm_irq_routing_entry:
    e = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_MSI, flags=flags)
    e.u.msi.address_lo, e.u.msi.data = 0xFEE00000, 0x31
    return e


def test_gsi_routing(kvm: System) -> None:
    with kvm.create_vm() as vm:
        expect(lambda: vm.set_gsi_routing([_route_chip(1, 2, 1)]), errno.EINVAL, "KVM_SET_GSI_ROUTING without irqchip")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.set_gsi_routing([_route_chip(0, 2, 2), _route_chip(1, 0, 1), _route_chip(1, 2, 1), _route_msi(24),
                            _route_msi(25, flags=uapi.KVM_MSI_VALID_DEVID)])
        vm.set_gsi_routing([])
        for what, entries in [("GSI 4096", [_route_chip(4096, 2, 1)]), ("PIC pin 8", [_route_chip(1, 0, 8)]),
                              ("IOAPIC pin 24", [_route_chip(1, 2, 24)]), ("irqchip 3", [_route_chip(1, 3, 0)]),
                              ("s390 adapter type", [uapi.kvm_irq_routing_entry(gsi=1, type=3)]),
                              ("irqchip entry with flags", [uapi.kvm_irq_routing_entry(gsi=1, type=1, flags=1)]),
                              ("one GSI twice on the IOAPIC", [_route_chip(1, 2, 1), _route_chip(1, 2, 3)]),
                              ("one GSI as irqchip and MSI", [_route_chip(1, 2, 1), _route_msi(1)])]:
            expect(partial(vm.set_gsi_routing, entries), errno.EINVAL, f"KVM_SET_GSI_ROUTING with {what}")


def test_irqfd(kvm: System, eventfd: int) -> None:
    with kvm.create_vm() as vm:
        expect(lambda: vm.irqfd(eventfd, 5), errno.EINVAL, "KVM_IRQFD without an irqchip")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.irqfd(eventfd, 5)
        expect(lambda: vm.irqfd(eventfd, 6), errno.EBUSY, "KVM_IRQFD of an eventfd already attached")
        vm.irqfd(eventfd, 5, uapi.KVM_IRQFD_FLAG_DEASSIGN)
        vm.irqfd(eventfd, 5, uapi.KVM_IRQFD_FLAG_DEASSIGN)  # nothing left to deassign: still success
        vm.irqfd(eventfd, 6)
        expect(lambda: vm.irqfd(eventfd, 7, 4), errno.EINVAL, "KVM_IRQFD with unknown flags")
        r, w = os.pipe()
        try:
            expect(lambda: vm.irqfd(r, 8), errno.EINVAL, "KVM_IRQFD of a pipe")
        finally:
            os.close(r)
            os.close(w)
        expect(lambda: vm.irqfd(r, 8), errno.EBADF, "KVM_IRQFD of a closed fd")


def test_ioeventfd(kvm: System, eventfd: int) -> None:
    pio = uapi.KVM_IOEVENTFD_FLAG_PIO
    gone = pio | uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
    with kvm.create_vm() as vm:
        expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 3, 0, pio), errno.EINVAL, "KVM_IOEVENTFD of length 3")
        expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 0, 0, pio | uapi.KVM_IOEVENTFD_FLAG_DATAMATCH), errno.EINVAL,
               "KVM_IOEVENTFD of length 0 with DATAMATCH")
        expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 1, 0, gone), errno.ENOENT, "deassigning what is not there")
        vm.ioeventfd(eventfd, 0x3F8, 1, 0, pio)
        expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 1, 0, pio), errno.EEXIST, "the same ioeventfd twice")
        vm.ioeventfd(eventfd, 0x3F8, 2, 0, pio)  # another length is another match
        vm.ioeventfd(eventfd, 0xD0000000, 4, 0x55, uapi.KVM_IOEVENTFD_FLAG_DATAMATCH)  # MMIO
        vm.ioeventfd(eventfd, 0x3F8, 1, 0, gone)
        expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 1, 0, gone), errno.ENOENT, "deassigning it twice")


def test_dirty_log_before_any_run(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vm.add_memory(0x100000, 0x4000, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
        expect(lambda: vm.get_dirty_log(0), errno.ENOENT, "KVM_GET_DIRTY_LOG of a slot not logging")
        expect(lambda: vm.get_dirty_log(5), errno.ENOENT, "KVM_GET_DIRTY_LOG of no slot")
        vm.write_memory(0x100000, b"written by userspace")
        assert vm.get_dirty_log(1) == b"\x00", "userspace writes are not logged; no vCPU has run"


def test_clock(kvm: System) -> None:
    with kvm.create_vm() as vm:
        first = vm.get_clock()
        assert first.flags == 0 and first.clock < 10**10, f"a new VM's kvmclock: flags 0, near 0 ns; saw {first.clock}"
        expect(lambda: vm.set_clock(uapi.kvm_clock_data(clock=5, flags=1)), errno.EINVAL, "KVM_SET_CLOCK flag 1")
        vm.set_clock(uapi.kvm_clock_data(clock=10**12))
        got = vm.get_clock()
        assert 10**12 <= got.clock < 10**12 + 10**9, f"the clock runs on from the value set: saw {got.clock}"
        assert got.flags == 0, "no master clock without vCPUs"
        vm.create_vcpu(0)
        assert vm.get_clock().flags == 0, "a vCPU alone does not re-evaluate the master clock"
        vm.set_clock(uapi.kvm_clock_data(clock=10**12))
        flags = vm.get_clock().flags
        assert flags == HOST_CAPS["KVM_CAP_ADJUST_CLOCK"], f"KVM_SET_CLOCK with a vCPU starts the master clock: {flags}"
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, bytes([0xE6, 0x10]))  # out 0x10, al
        assert vcpu.run().name == "IoExit"
        flags = vm.get_clock().flags
        assert flags == HOST_CAPS["KVM_CAP_ADJUST_CLOCK"], f"the first KVM_RUN starts the master clock: {flags}"


def test_tss_identity_map_coalesced(kvm: System) -> None:
    with kvm.create_vm() as vm:
        expect(lambda: vm.set_tss_addr(0xFFFFE000), errno.EINVAL, "KVM_SET_TSS_ADDR above 0xfffd000")
        vm.set_tss_addr(0xFFFFD000)
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        vm.register_coalesced_mmio(0xD0000000, 0x1000)
        vm.register_coalesced_mmio(0x3F8, 8, pio=True)
        vm.unregister_coalesced_mmio(0xD0000000, 0x1000)
        vm.unregister_coalesced_mmio(0x3F8, 8, pio=True)
        vm.unregister_coalesced_mmio(0xE0000000, 0x1000)  # nothing there: still success
        vm.create_vcpu(0)
        expect(lambda: vm.set_identity_map_addr(0xFFFBC000), errno.EINVAL, "KVM_SET_IDENTITY_MAP_ADDR after a vCPU")


def test_vm_tsc_khz_is_the_vcpus_default(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.set_tsc_khz(1_500_000)
        assert vm.get_tsc_khz() == 1_500_000
        vcpu = vm.create_vcpu(0)
        assert vcpu.get_tsc_khz() == 1_500_000, "a new vCPU takes the VM's rate, even without TSC scaling"
        expect(lambda: vm.set_tsc_khz(1_000_000), errno.EINVAL, "the VM's KVM_SET_TSC_KHZ after a vCPU")
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        khz = vcpu.get_tsc_khz()
        assert khz == vm.get_tsc_khz() > 0
        vcpu.set_tsc_khz(khz)
        expect(lambda: vcpu.set_tsc_khz(khz // 2), errno.EINVAL, "another rate without KVM_CAP_TSC_CONTROL")


def test_ioeventfd_checks_in_the_kernels_order(kvm: System, eventfd: int) -> None:
    """KVM_IOEVENTFD (6.12.118 eventfd.c:933-1003): deassigning checks only the eventfd, then looks for the
    registration; assigning checks the length, a range that wraps past 2^64, the flags (mask 0x1f: VIRTIO_CCW_NOTIFY
    and FAST_MMIO are valid), DATAMATCH with length 0, then the eventfd; a length-0 registration collides with any on
    its address, whatever the data."""
    pio, gone = uapi.KVM_IOEVENTFD_FLAG_PIO, uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
    r, w = os.pipe()
    try:
        with kvm.create_vm() as vm:
            expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 3, 0, pio | gone), errno.ENOENT, "deassign skips the length check")
            expect(lambda: vm.ioeventfd(r, 0x3F8, 1, 0, pio | gone), errno.EINVAL, "deassign with a pipe")
            expect(lambda: vm.ioeventfd(0x7FFFFFF0, 0x3F8, 1, 0, pio | gone), errno.EBADF, "deassign with a closed fd")
            expect(lambda: vm.ioeventfd(eventfd, 2**64 - 1, 1, 0, 0), errno.EINVAL, "a range past 2^64")
            expect(lambda: vm.ioeventfd(eventfd, 0x3F8, 1, 0, 0x20), errno.EINVAL, "flag 0x20")
            expect(lambda: vm.ioeventfd(r, 0x3F8, 3, 0, pio), errno.EINVAL, "length first, then the fd")
            vm.ioeventfd(eventfd, 0xD0001000, 1, 0, uapi.KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY)
            vm.ioeventfd(eventfd, 0xD0002000, 4, 0, uapi.KVM_IOEVENTFD_FLAG_FAST_MMIO)
            vm.ioeventfd(eventfd, 0xD0003000, 4, 7, uapi.KVM_IOEVENTFD_FLAG_DATAMATCH)
            expect(lambda: vm.ioeventfd(eventfd, 0xD0003000, 0, 0, 0), errno.EEXIST,
                   "length 0 on an address taken with data")
    finally:
        os.close(r)
        os.close(w)


def test_irqfd_resample_fd_is_checked(kvm: System, eventfd: int) -> None:
    """With KVM_IRQFD_FLAG_RESAMPLE the resample fd must be an eventfd (eventfd.c:360-366), checked before EBUSY."""
    r, w = os.pipe()
    try:
        with kvm.create_vm() as vm:
            vm.create_irqchip()
            flag = uapi.KVM_IRQFD_FLAG_RESAMPLE
            expect(lambda: vm.irqfd(eventfd, 5, flag, 0xFFFFFFFF), errno.EBADF, "a resample fd that is not open")
            expect(lambda: vm.irqfd(eventfd, 5, flag, r), errno.EINVAL, "a pipe as the resample fd")
            vm.irqfd(eventfd, 5)
            expect(lambda: vm.irqfd(eventfd, 6, flag, r), errno.EINVAL, "the resample fd before EBUSY")
    finally:
        os.close(r)
        os.close(w)


def test_set_clock_realtime_moves_the_clock_on(kvm: System) -> None:
    """KVM_SET_CLOCK with KVM_CLOCK_REALTIME adds the wall-clock time since ``realtime`` (never a step back)."""
    import time

    with kvm.create_vm() as vm:
        then = time.time_ns() - 5 * 10**9
        vm.set_clock(uapi.kvm_clock_data(clock=10**12, flags=uapi.KVM_CLOCK_REALTIME, realtime=then))
        moved = vm.get_clock().clock - 10**12
        assert 5 * 10**9 <= moved < 7 * 10**9, f"the clock moved {moved} ns, expected about 5 s"
        vm.set_clock(uapi.kvm_clock_data(clock=10**12, flags=uapi.KVM_CLOCK_REALTIME, realtime=then + 10**12))
        ahead = vm.get_clock().clock - 10**12
        assert 0 <= ahead < 10**9, f"a realtime in the future moves nothing: {ahead} ns"


def test_set_irqchip_injects_the_ioapic_irr_again(kvm: System) -> None:
    """KVM_SET_IRQCHIP injects the IOAPIC's IRR again (kvm_ioapic_inject_all, 6.12.118 ioapic.c:206-276, 442-483):
    a masked pin keeps its bit; a level pin keeps it and gets remote IRR when delivery returns nonzero, which it does
    with no vCPU at all (-1) but not to a vCPU whose APIC is software-disabled (0); an unmasked edge pin is delivered
    and its bit hidden. With a vCPU the vector would reach its APIC:
    the model may refuse that (ModelLimitation), and only that."""
    for with_vcpu in (False, True):
        with kvm.create_vm() as vm:
            vm.create_irqchip()
            if with_vcpu:
                vcpu = vm.create_vcpu(0)
                vcpu.set_cpuid(kvm.get_supported_cpuid())
            chip = vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC)
            io = chip.chip.ioapic
            io.redirtbl[3], io.redirtbl[5], io.redirtbl[6] = 0x30 | 1 << 15, 0x31 | 1 << 16, 0x32
            io.irr = 1 << 3 | 1 << 5 | 1 << 6
            try:
                vm.set_irqchip(chip)
            except ModelLimitation:
                assert kvm.backend == "model" and with_vcpu, "only the model, and only with an APIC to deliver to"
                continue
            got = vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC).chip.ioapic
            seen = (got.irr, got.redirtbl[3], got.redirtbl[5], got.redirtbl[6])
            # with a vCPU whose APIC is still software-disabled, delivery returns 0: no remote IRR
            expected = (1 << 3 | 1 << 5, 0x30 | 1 << 15 | (0 if with_vcpu else 1 << 14), 0x31 | 1 << 16, 0x32)
            assert seen == expected, f"vCPU {with_vcpu}: IRR and pins 3, 5, 6: expected {expected}, saw {seen}"


def test_set_irqchip_cascades_a_slave_request(kvm: System) -> None:
    """A slave PIC request raises the master's IRQ2 at KVM_SET_IRQCHIP (kvm_pic_update_irq, x86.c:5961,
    i8259.c:165-179); the model does not emulate the PIC and refuses (ModelLimitation)."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        slave = vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_SLAVE)
        slave.chip.pic.irr, slave.chip.pic.imr = 1, 0
        try:
            vm.set_irqchip(slave)
        except ModelLimitation:
            assert kvm.backend == "model", "only the model may refuse"
            return
        master = vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr
        assert master == 4, f"the master's IRR: expected IRQ2 (4), saw {master:#x}"


@pytest.mark.parametrize(("cap", "arg"), [(uapi.KVM_CAP_HALT_POLL, 0), (uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0),
                                          (uapi.KVM_CAP_MAX_VCPU_ID, 4), (uapi.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, 0),
                                          (uapi.KVM_CAP_X86_APIC_BUS_CYCLES_NS, 1)])
def test_enable_cap_the_model_does_not_implement(kvm: System, cap: int, arg: int) -> None:
    """Capabilities the kernel takes (kvm_main.c, x86.c kvm_vm_ioctl_enable_cap) that the model does not implement:
    the live kernel takes them; the model says so (ModelLimitation), not EINVAL, which would be made up."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        try:
            vm.enable_cap(cap, arg)
        except ModelLimitation:
            assert kvm.backend == "model", "only the model may refuse"


def test_msi_with_32_bit_ids_refuses_address_hi_low_byte(kvm: System) -> None:
    """With KVM_CAP_X2APIC_API's 32-bit IDs, an MSI whose address_hi has bits 7:0 set is EINVAL, before delivery, as
    KVM_SIGNAL_MSI and as a KVM_SET_GSI_ROUTING entry (kvm_msi_route_invalid, 6.12.118 irq_comm.c:125-137, 317)."""
    with kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_API_USE_32BIT_IDS)
        vm.create_irqchip()
        expect(lambda: vm.signal_msi(0x1_FEE00000, 0x30), errno.EINVAL, "MSI with address_hi 1, no vCPU")
        entry = uapi.kvm_irq_routing_entry(gsi=30, type=uapi.KVM_IRQ_ROUTING_MSI)
        entry.u.msi.address_lo, entry.u.msi.address_hi, entry.u.msi.data = 0xFEE00000, 1, 0x30
        expect(lambda: vm.set_gsi_routing([entry]), errno.EINVAL, "an MSI route with address_hi 1")
        entry.u.msi.address_hi = 0x100  # bits 31:8 hold the high part of a 32-bit ID
        vm.set_gsi_routing([entry])


def test_hv_sint_route_needs_hyperv(kvm: System) -> None:
    """A KVM_IRQ_ROUTING_HV_SINT entry exists only with CONFIG_KVM_HYPERV (irq_comm.c:320-326): this host has none
    (KVM_CAP_HYPERV 0), so it is EINVAL."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        hyperv = kvm.check_extension(uapi.KVM_CAP_HYPERV)
        entry = uapi.kvm_irq_routing_entry(gsi=1, type=4)
        expect(lambda: vm.set_gsi_routing([entry]), 0 if hyperv else errno.EINVAL, f"HV_SINT with KVM_CAP_HYPERV {hyperv}")


@pytest.mark.parametrize("rebuild", ["KVM_SET_LAPIC", "APIC_BASE"])
def test_msi_with_aliased_apic_ids_takes_the_slow_path(kvm: System, rebuild: str) -> None:
    """Two APICs with the same xAPIC ID disable the optimized map (kvm_recalculate_phys_map, lapic.c:289-299): an MSI
    then takes the slow path, which fails with EPERM when no APIC matches (the fast path would say 0). With 32-bit
    IDs a rebuilt map keeps the first of them, but enabling those does not rebuild it: only an APIC's change does
    (a KVM_SET_LAPIC, or APIC_BASE hardware-disabling and enabling another vCPU's APIC)."""
    import struct

    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpus = [vm.create_vcpu(vcpu_id) for vcpu_id in (0, 1, 2)]
        for vcpu in vcpus[:2]:
            raw = bytearray(bytes(vcpu.get_lapic()))
            struct.pack_into("<I", raw, 0x20, 5 << 24)  # xAPIC ID 5
            struct.pack_into("<I", raw, 0xF0, 0x1FF)  # software-enabled
            vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))
        expect(lambda: vm.signal_msi(0xFEE0E000, 0x30), errno.EPERM, "MSI to ID 14, nobody there, IDs aliased")
        assert vm.signal_msi(0xFEE05000, 0x30) == 2, "an MSI to ID 5 reaches both APICs"
        vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_API_USE_32BIT_IDS)
        expect(lambda: vm.signal_msi(0xFEE0E000, 0x30), errno.EPERM, "the same MSI after 32-bit IDs, the map as built")
        if rebuild == "KVM_SET_LAPIC":
            vcpus[1].set_lapic(vcpus[1].get_lapic())  # the same page, IDs still aliased
        else:
            base = vcpus[2].read_msr(0x1B)
            vcpus[2].write_msr(0x1B, base & ~(1 << 11))
            vcpus[2].write_msr(0x1B, base)
        assert vm.signal_msi(0xFEE0E000, 0x30) == 0, f"after {rebuild} rebuilt the map: nobody there, no error"


def test_msi_trigger_mode_sets_tmr_and_32_bit_ids_extend_the_destination(kvm: System) -> None:
    """An MSI's trigger bit (data bit 15, kvm_set_msi_irq: is_level) sets the vector's TMR bit, an edge one clears it
    (__apic_accept_irq); with 32-bit x2APIC IDs, address_hi bits 31:8 extend the destination (MSI_ADDR_EXT_DEST_ID),
    so a destination beyond every vCPU reaches none."""
    import struct

    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        raw = bytearray(bytes(vcpu.get_lapic()))
        struct.pack_into("<I", raw, 0xF0, 0x1FF)
        vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))
        tmr = []
        for data in (0x8030, 0x30):
            assert vm.signal_msi(0xFEE00000, data) == 1, f"MSI data {data:#x} to APIC 0"
            tmr.append(struct.unpack_from("<I", bytes(vcpu.get_lapic()), 0x190)[0] >> 16 & 1)
        assert tmr == [1, 0], f"TMR bit of vector 0x30 after a level, then an edge MSI: {tmr}"
        vm.enable_cap(uapi.KVM_CAP_X2APIC_API, uapi.KVM_X2APIC_API_USE_32BIT_IDS)
        assert vm.signal_msi(0x100_FEE00000, 0x30) == 0, "destination 0x100 (address_hi 0x100): no such APIC"


@pytest.mark.parametrize("cap", [uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL])
def test_dirty_ring_sizes_refused(kvm: System, cap: int) -> None:
    """kvm_vm_ioctl_enable_dirty_log_ring (virt/kvm/kvm_main.c:5009-5045 in 6.12.118): a size (u32) that is not a
    power of two, below a page or the reserved entries, is EINVAL; over the maximum KVM_CHECK_EXTENSION reports,
    E2BIG; a good size once a vCPU was created, even closed, EINVAL. Flags are not looked at. (A size the kernel
    takes is a ModelLimitation in the model, which keeps no ring.)"""
    with kvm.create_vm() as vm:
        top = vm.check_extension(cap)
        assert top == 1 << 20, f"PVM's dirty ring holds 65536 entries of 16 bytes: expected 1 MiB, saw {top:#x}"
        for size, err in ((0, errno.EINVAL), (0x800, errno.EINVAL), (0x3000, errno.EINVAL), (top * 2, errno.E2BIG),
                          ((1 << 32) | top * 2, errno.E2BIG)):
            with pytest.raises(KvmError) as refused:
                vm.enable_cap(cap, size, flags=1)
            assert refused.value.errno == err, f"size {size:#x}: expected {errno.errorcode[err]}, saw {refused.value}"
        vm.create_vcpu(0).close()
        with pytest.raises(KvmError) as late:
            vm.enable_cap(cap, 0x1000)
        assert late.value.errno == errno.EINVAL, f"after a vCPU: expected EINVAL, saw {late.value}"
