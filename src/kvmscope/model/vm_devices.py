"""The model's answers to the VMM's VM ioctls: the in-kernel irqchip and PIT as stored state, GSI routing, irqfds,
ioeventfds, coalesced MMIO zones, kvmclock, dirty logging, TSS and identity-map addresses, the default TSC rate.

The checks and errnos are those of ``virt/kvm/kvm_main.c``, ``virt/kvm/eventfd.c``, ``virt/kvm/irqchip.c`` and
``arch/x86/kvm/{x86.c,irq_comm.c,i8254.c,i8259.c,ioapic.c}`` (v6.12), as the live kernel here shows them. The model keeps
the state; it does not emulate the PIC, IOAPIC or PIT, nor signal eventfds: what would need that raises
:class:`~kvmscope.model.vcpu.ModelLimitation` (``docs/binding.md``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..errors import KvmError, KvmscopeError
from . import x2apic

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from ..memory import MemoryRegion
    from .vcpu import ModelVcpu

MODEL_TSC_KHZ = 1_000_000  # the model's TSC rate when nothing sets one (profiles do not record the host's)
IOAPIC_DEFAULT_BASE = 0xFEC00000
TSS_ADDR_MAX = 0xFFFFD000  # (unsigned int)(-3 * PAGE_SIZE): the TSS takes three pages below 4 GiB
PIC_NUM_PINS = 16
CLOCK_FLAGS = uapi.KVM_CLOCK_TSC_STABLE | uapi.KVM_CLOCK_REALTIME | uapi.KVM_CLOCK_HOST_TSC
U64 = (1 << 64) - 1
IOEVENTFD_FLAGS = 0x1F  # KVM_IOEVENTFD_VALID_FLAG_MASK: DATAMATCH, PIO, DEASSIGN, VIRTIO_CCW_NOTIFY, FAST_MMIO


def _eventfd_error(fd: int, ioctl: str) -> KvmError | None:
    """EBADF for a closed fd, EINVAL for a file that is not an eventfd (eventfd_ctx_fileget)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return KvmError(errno.EBADF, ioctl)
    return None if target == "anon_inode:[eventfd]" else KvmError(errno.EINVAL, ioctl, "not an eventfd")


class VmDevicesModel:
    """The device and timer state of a model VM. Mixed into :class:`~kvmscope.model.vm.ModelVm`, which calls
    :meth:`reset_devices` when it is created."""

    profile: Profile
    vcpus: list[ModelVcpu]
    regions: list[MemoryRegion]

    if TYPE_CHECKING:  # provided by ModelVm (declared for the type checker only: a body would shadow them)
        x2apic_broadcast_quirk_disabled: bool
        x2apic_format: bool
        apic_map_format: bool

        def _check_open(self) -> None: ...

        def _memslot_limits(self) -> tuple[int, int]: ...

        def limitation(self, message: str) -> KvmscopeError: ...

    def reset_devices(self) -> None:
        self.irqchip = False  # the full in-kernel irqchip (pic_in_kernel, irqchip_full)
        self.split_irqchip = False  # KVM_CAP_SPLIT_IRQCHIP: the local APICs in the kernel, the PIC and IOAPIC not
        self.chips: list[uapi.kvm_irqchip] = []
        self.pit: uapi.kvm_pit_state2 | None = None
        self.routing: list[uapi.kvm_irq_routing_entry] = []
        self.irqfds: set[tuple[int, int]] = set()  # (eventfd, gsi)
        self.ioeventfds: list[tuple[int, int, int, int, int | None]] = []  # (bus, addr, len, eventfd, datamatch)
        self.coalesced: list[tuple[int, int, int]] = []  # (addr, size, pio)
        self.tss_addr: int | None = None
        self.identity_map_addr: int | None = None
        self.default_tsc_khz = MODEL_TSC_KHZ
        self._clock_base = time.monotonic_ns()  # kvmclock counts from VM creation, as KVM's kvmclock_offset does
        self._clock_offset = 0
        self._masterclock = False
        self.may_block = False  # KVM_RUN looks at run_limitation() only when set

    def _refresh_may_block(self) -> None:
        self.may_block = bool(self.ioeventfds or self.coalesced)

    def run_limitation(self) -> str | None:
        """What the VM has registered that a model KVM_RUN would not honour, or None."""
        if self.ioeventfds:
            return "ioeventfds are registered (the model's guest accesses do not signal eventfds)"
        if self.coalesced:
            return "coalesced MMIO zones are registered (the model does not batch writes in the ring)"
        return None

    # -- addresses --
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: EINVAL above 0xfffd000 (x86.c kvm_vm_ioctl_set_tss_addr)."""
        self._check_open()
        if addr > TSS_ADDR_MAX:
            raise KvmError(errno.EINVAL, "KVM_SET_TSS_ADDR")
        self.tss_addr = addr

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: EINVAL once a vCPU exists."""
        self._check_open()
        if self.vcpus:
            raise KvmError(errno.EINVAL, "KVM_SET_IDENTITY_MAP_ADDR")
        self.identity_map_addr = addr

    @property
    def lapic_in_kernel(self) -> bool:
        """``irqchip_in_kernel``: new vCPUs get an in-kernel local APIC (a full or a split irqchip)."""
        return self.irqchip or self.split_irqchip

    def _in_kernel(self, ioctl: str) -> bool:
        """``irqchip_in_kernel`` for an ioctl that a split irqchip serves otherwise (routes to the LAPICs, exits to
        userspace for the IOAPIC): the model implements a split irqchip's local APICs only, and stops there."""
        if self.split_irqchip:
            raise self.limitation(f"{ioctl} with a split irqchip: the model implements only its local APICs")
        return self.irqchip

    def enable_split_irqchip(self, reserved_pins: int) -> None:
        """KVM_CAP_SPLIT_IRQCHIP (6.12.118 x86.c:6091-6110): EINVAL for more reserved IOAPIC pins than routes
        (``MAX_NR_RESERVED_IOAPIC_PINS``, 4096); EEXIST with an irqchip already or once a vCPU was created."""
        if reserved_pins > uapi.KVM_MAX_IRQ_ROUTES:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")
        if self.lapic_in_kernel or self.vcpus:
            raise KvmError(errno.EEXIST, "KVM_ENABLE_CAP")
        self.split_irqchip = True

    # -- the irqchip --
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: EEXIST the second time, EINVAL after a vCPU; the PICs and IOAPIC at their reset state
        (i8259.c kvm_pic_reset: ELCR masks 0xf8/0xde; ioapic.c kvm_ioapic_reset: every pin masked)."""
        self._check_open()
        if self.lapic_in_kernel:
            raise KvmError(errno.EEXIST, "KVM_CREATE_IRQCHIP")
        if self.vcpus:
            raise KvmError(errno.EINVAL, "KVM_CREATE_IRQCHIP")
        master = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_PIC_MASTER)
        master.chip.pic.elcr_mask = 0xF8
        slave = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_PIC_SLAVE)
        slave.chip.pic.elcr_mask = 0xDE
        ioapic = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_IOAPIC)
        ioapic.chip.ioapic.base_address = IOAPIC_DEFAULT_BASE
        ioapic.chip.ioapic.redirtbl[:] = [1 << 16] * uapi.KVM_IOAPIC_NUM_PINS
        self.chips = [master, slave, ioapic]
        self.irqchip = True

    def _chip(self, chip_id: int, ioctl: str) -> int:
        if not self.irqchip:
            raise KvmError(errno.ENXIO, ioctl)
        if not 0 <= chip_id < uapi.KVM_NR_IRQCHIPS:
            raise KvmError(errno.EINVAL, ioctl)
        return chip_id

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        self._check_open()
        return uapi.kvm_irqchip.from_buffer_copy(self.chips[self._chip(chip_id, "KVM_GET_IRQCHIP")])

    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP: the chip as given, except the IOAPIC's IRR, which is injected again pin by pin
        (``kvm_set_ioapic``, ``kvm_ioapic_inject_all``, ``ioapic_set_irq``, ``ioapic_service``; 6.12.118
        ioapic.c:206-276, 442-483, 765-776): a masked pin, or a level pin already waiting for its EOI, keeps its IRR
        bit; any other is serviced: an edge pin's bit is then hidden from KVM_GET_IRQCHIP (``irr_delivered``), and a
        level pin keeps it and gets remote IRR, since delivery returns nonzero even when no APIC takes it. Delivery to
        an APIC is not emulated: a pin serviced while vCPUs exist raises ModelLimitation, as does a slave PIC request
        (it raises the master's IRQ2: ``kvm_pic_update_irq``, x86.c:5961, i8259.c:165-179), before anything
        changes."""
        self._check_open()
        i = self._chip(chip.chip_id, "KVM_SET_IRQCHIP")
        serviced = 0
        if i == uapi.KVM_IRQCHIP_IOAPIC:
            io = chip.chip.ioapic
            for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
                entry = io.redirtbl[pin]
                if io.irr >> pin & 1 and not entry >> 16 & 1 and not (entry >> 15 & 1 and entry >> 14 & 1):
                    serviced |= 1 << pin
            if serviced and self.vcpus:
                raise self.limitation("KVM_SET_IRQCHIP: an IOAPIC IRR is delivered to the APICs again, which the "
                                      "model does not emulate")
        slave = chip if i == uapi.KVM_IRQCHIP_PIC_SLAVE else self.chips[uapi.KVM_IRQCHIP_PIC_SLAVE]
        if i != uapi.KVM_IRQCHIP_IOAPIC and slave.chip.pic.irr & ~slave.chip.pic.imr & 0xFF:
            raise self.limitation("KVM_SET_IRQCHIP: a slave PIC request raises the master's IRQ2, which the model "
                                  "does not emulate")
        stored = uapi.kvm_irqchip.from_buffer_copy(chip)
        if i == uapi.KVM_IRQCHIP_IOAPIC:
            io = stored.chip.ioapic
            for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
                if serviced >> pin & 1:
                    if io.redirtbl[pin] >> 15 & 1:  # level: waits for its EOI
                        io.redirtbl[pin] |= 1 << 14
                    else:  # edge: delivered, hidden from KVM_GET_IRQCHIP
                        io.irr &= ~(1 << pin)
            io.irr &= (1 << uapi.KVM_IOAPIC_NUM_PINS) - 1
        self.chips[i] = stored

    def irq_line(self, irq: int, level: int) -> None:
        self._check_open()
        if not self._in_kernel("KVM_IRQ_LINE"):
            raise KvmError(errno.ENXIO, "KVM_IRQ_LINE")
        raise self.limitation("KVM_IRQ_LINE: the model does not emulate the PIC and IOAPIC")

    def irq_line_status(self, irq: int, level: int) -> int:
        self._check_open()
        if not self._in_kernel("KVM_IRQ_LINE_STATUS"):
            raise KvmError(errno.ENXIO, "KVM_IRQ_LINE_STATUS")
        raise self.limitation("KVM_IRQ_LINE_STATUS: the model does not emulate the PIC and IOAPIC")

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI, fixed delivery to a physical destination: EINVAL without an irqchip or with unknown flags,
        EPERM with no vCPU or for a broadcast no present APIC matches, else how many APICs accepted it (an APIC
        disabled in software takes none)."""
        self._check_open()
        if not self._in_kernel("KVM_SIGNAL_MSI") or flags & ~uapi.KVM_MSI_VALID_DEVID:
            raise KvmError(errno.EINVAL, "KVM_SIGNAL_MSI")
        if self.x2apic_format and address >> 32 & 0xFF:  # kvm_msi_route_invalid (6.12.118 irq_comm.c:125-137)
            raise KvmError(errno.EINVAL, "KVM_SIGNAL_MSI", "address_hi bits 7:0 with 32-bit x2APIC IDs")
        if not self.vcpus:
            raise KvmError(errno.EPERM, "KVM_SIGNAL_MSI")
        if address & 1 << 2 or (data >> 8) & 7:
            raise self.limitation("KVM_SIGNAL_MSI: the model delivers fixed MSIs to physical destinations only")
        dest = (address >> 12) & 0xFF
        if self.x2apic_format:  # the extended destination: address_hi bits 31:8 (kvm_set_msi_irq)
            dest |= address >> 32 & 0xFFFFFF00
        quirk_off = self.x2apic_broadcast_quirk_disabled
        targets = [v for v in self.vcpus if x2apic.msi_reaches(v, dest, quirk_off)]
        # The slow path, which fails (EPERM) when no APIC matches, serves a broadcast, and any MSI while two present
        # APICs share a physical ID: the optimized map is then disabled (kvm_recalculate_phys_map, lapic.c:289-299).
        if not targets and (x2apic.msi_is_broadcast(self.vcpus, dest, quirk_off) or (
                not self.apic_map_format and x2apic.physical_ids_aliased(self.vcpus))):
            raise KvmError(errno.EPERM, "KVM_SIGNAL_MSI", "no APIC takes it on the slow path")
        if address & 1 << 3:  # the redirection hint: lowest-priority delivery, to software-enabled APICs only
            raise self.limitation("KVM_SIGNAL_MSI: lowest-priority delivery (the redirection hint)")
        return sum(v.accept_msi(data & 0xFF, bool(data >> 15 & 1)) for v in targets)  # kvm_set_msi_irq: is_level

    # -- the PIT --
    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: EEXIST the second time, ENOENT without the in-kernel PIC; channels as kvm_pit_reset leaves
        them (count 0x10000, mode 0xff, gate high on channels 0 and 1)."""
        self._check_open()
        if self.pit is not None:
            raise KvmError(errno.EEXIST, "KVM_CREATE_PIT2")
        if not self.irqchip:
            raise KvmError(errno.ENOENT, "KVM_CREATE_PIT2")
        pit = uapi.kvm_pit_state2()
        for i, ch in enumerate(pit.channels):
            ch.mode, ch.gate = 0xFF, 1 if i != 2 else 0
        self.pit = pit
        self._load_counts(pit)

    def _load_counts(self, pit: uapi.kvm_pit_state2) -> None:
        # i8254.c pit_load_count: a count of 0 means 0x10000; channels 1 and 2 record when they were loaded.
        for i, ch in enumerate(pit.channels):
            ch.count = ch.count or 0x10000
            if i:
                ch.count_load_time = time.monotonic_ns()

    def get_pit2(self) -> uapi.kvm_pit_state2:
        self._check_open()
        if self.pit is None:
            raise KvmError(errno.ENXIO, "KVM_GET_PIT2")
        return uapi.kvm_pit_state2.from_buffer_copy(self.pit)

    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        """KVM_SET_PIT2: channels and flags as given (reserved words dropped), counts reloaded."""
        self._check_open()
        if self.pit is None:
            raise KvmError(errno.ENXIO, "KVM_SET_PIT2")
        pit = uapi.kvm_pit_state2(flags=state.flags)
        pit.channels[:] = [uapi.kvm_pit_channel_state.from_buffer_copy(ch) for ch in state.channels]
        self._load_counts(pit)
        self.pit = pit

    # -- routing and eventfds --
    def set_gsi_routing(self, entries: Sequence[uapi.kvm_irq_routing_entry]) -> None:
        """KVM_SET_GSI_ROUTING with the checks of kvm_set_irq_routing (irqchip.c) and kvm_set_routing_entry
        (irq_comm.c): GSI below 4096, PIC pins below 8, IOAPIC pins below 24, irqchip or MSI (or Hyper-V SynIC)
        entries, one GSI on two different irqchips at most."""
        self._check_open()
        if not self._in_kernel("KVM_SET_GSI_ROUTING") or len(entries) > uapi.KVM_MAX_IRQ_ROUTES:
            raise KvmError(errno.EINVAL, "KVM_SET_GSI_ROUTING")
        seen: dict[int, list[uapi.kvm_irq_routing_entry]] = {}
        for e in entries:
            bad = e.gsi >= uapi.KVM_MAX_IRQ_ROUTES
            if e.type == uapi.KVM_IRQ_ROUTING_MSI:
                bad |= bool(e.flags & ~uapi.KVM_MSI_VALID_DEVID)
                bad |= self.x2apic_format and bool(e.u.msi.address_hi & 0xFF)  # kvm_msi_route_invalid
            elif e.type == uapi.KVM_IRQ_ROUTING_IRQCHIP:
                chip, pin = e.u.irqchip.irqchip, e.u.irqchip.pin
                limit = {0: PIC_NUM_PINS // 2, 1: PIC_NUM_PINS // 2, 2: uapi.KVM_IOAPIC_NUM_PINS}.get(chip, 0)
                bad |= bool(e.flags) or pin >= limit
            elif e.type == 4:  # KVM_IRQ_ROUTING_HV_SINT: only with CONFIG_KVM_HYPERV (irq_comm.c:320-326)
                bad |= bool(e.flags) or not self.profile.capability(uapi.KVM_CAP_HYPERV)
            else:  # s390 adapters are not x86, Xen needs KVM_XEN_HVM_CONFIG
                bad = True
            for other in seen.get(e.gsi, []):
                both_chips = e.type == other.type == uapi.KVM_IRQ_ROUTING_IRQCHIP
                bad |= not both_chips or e.u.irqchip.irqchip == other.u.irqchip.irqchip
            if bad:
                raise KvmError(errno.EINVAL, "KVM_SET_GSI_ROUTING")
            seen.setdefault(e.gsi, []).append(e)
        self.routing = [uapi.kvm_irq_routing_entry.from_buffer_copy(e) for e in entries]

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """KVM_IRQFD (eventfd.c kvm_irqfd): EINVAL for unknown flags or without an irqchip, EBADF/EINVAL for a bad
        fd and then, with RESAMPLE, a bad resample fd; EBUSY for an eventfd already attached; deassigning what is not
        there succeeds."""
        self._check_open()
        if flags & ~(uapi.KVM_IRQFD_FLAG_DEASSIGN | uapi.KVM_IRQFD_FLAG_RESAMPLE):
            raise KvmError(errno.EINVAL, "KVM_IRQFD")
        if flags & uapi.KVM_IRQFD_FLAG_DEASSIGN:  # kvm_irqfd_deassign: the fd must be an eventfd even then
            err = _eventfd_error(fd, "KVM_IRQFD")
            if err:
                raise err
            self.irqfds.discard((fd, gsi))
            return
        if not self._in_kernel("KVM_IRQFD"):
            raise KvmError(errno.EINVAL, "KVM_IRQFD")
        err = _eventfd_error(fd, "KVM_IRQFD")
        if not err and flags & uapi.KVM_IRQFD_FLAG_RESAMPLE:  # the resample eventfd, before EBUSY (eventfd.c:360-366)
            err = _eventfd_error(resamplefd, "KVM_IRQFD")
        if err:
            raise err
        if any(f == fd for f, _ in self.irqfds):
            raise KvmError(errno.EBUSY, "KVM_IRQFD")
        self.irqfds.add((fd, gsi))

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int = 0, flags: int = 0) -> None:
        """KVM_IOEVENTFD (6.12.118 eventfd.c:997-1003). Deassigning checks only the eventfd (EBADF, EINVAL) and then
        looks for the same registration (ENOENT when there is none, eventfd.c:887-931). Assigning checks, in order: a
        length other than 0/1/2/4/8, an address range that wraps past 2^64, unknown flags (beyond the mask 0x1f) and
        DATAMATCH with length 0 (EINVAL, eventfd.c:950-973); then the eventfd; then EEXIST for one on the same bus
        and address whose length is 0, or the same, with a wildcard or the same data (eventfd.c:801-815)."""
        self._check_open()
        bus = (0 if flags & uapi.KVM_IOEVENTFD_FLAG_PIO else 1 if flags & uapi.KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY
               else 2)  # ioeventfd_bus_from_flags: PIO, VIRTIO_CCW_NOTIFY, MMIO
        match = datamatch if flags & uapi.KVM_IOEVENTFD_FLAG_DATAMATCH else None
        if flags & uapi.KVM_IOEVENTFD_FLAG_DEASSIGN:
            err = _eventfd_error(fd, "KVM_IOEVENTFD")
            if err:
                raise err
            entry = (bus, addr, length, fd, match)
            if entry not in self.ioeventfds:
                raise KvmError(errno.ENOENT, "KVM_IOEVENTFD")
            self.ioeventfds.remove(entry)
            self._refresh_may_block()
            return
        if length not in (0, 1, 2, 4, 8) or (addr + length) & U64 < addr or flags & ~IOEVENTFD_FLAGS:
            raise KvmError(errno.EINVAL, "KVM_IOEVENTFD")
        if not length and match is not None:
            raise KvmError(errno.EINVAL, "KVM_IOEVENTFD")
        err = _eventfd_error(fd, "KVM_IOEVENTFD")
        if err:
            raise err
        for b, a, n, _, m in self.ioeventfds:
            if b == bus and a == addr and (not n or not length or (n == length and (m is None or match in (None, m)))):
                raise KvmError(errno.EEXIST, "KVM_IOEVENTFD")
        self.ioeventfds.append((bus, addr, length, fd, match))
        self._refresh_may_block()

    # -- dirty log, clock, coalesced MMIO, TSC --
    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: ENOENT for a slot without KVM_MEM_LOG_DIRTY_PAGES; no page is dirty until a vCPU runs
        (userspace writes are not logged). After a run the model cannot say which pages the guest wrote."""
        self._check_open()
        # kvm_get_dirty_log_protect (virt/kvm/kvm_main.c): the address space (slot bits 31:16) and the slot id below
        # KVM_USER_MEM_SLOTS are EINVAL; only then is a missing slot or one without a dirty bitmap ENOENT.
        nr_slots, nr_as = self._memslot_limits()
        if slot >> 16 >= max(nr_as, 1) or slot & 0xFFFF >= nr_slots:
            raise KvmError(errno.EINVAL, "KVM_GET_DIRTY_LOG")
        region = next((r for r in self.regions if r.slot == slot), None)
        if region is None or not region.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            raise KvmError(errno.ENOENT, "KVM_GET_DIRTY_LOG")
        if any(v.has_run for v in self.vcpus):
            raise self.limitation("KVM_GET_DIRTY_LOG: the model does not track the pages a guest writes")
        return bytes((region.size // 4096 + 7) // 8)

    def get_clock(self) -> uapi.kvm_clock_data:
        """KVM_GET_CLOCK: nanoseconds since the VM was created, moved by KVM_SET_CLOCK. The flags of a stable master
        clock (as KVM_CAP_ADJUST_CLOCK offers them) appear once KVM has re-evaluated the master clock with vCPUs
        present: at a KVM_SET_CLOCK or a vCPU's first KVM_RUN (KVM_REQ_MASTERCLOCK_UPDATE from kvm_synchronize_tsc;
        pvclock_update_vm_gtod_copy wants every vCPU's TSC matched, so none with no vCPU)."""
        self._check_open()
        now = time.monotonic_ns()
        data = uapi.kvm_clock_data(clock=now - self._clock_base + self._clock_offset)
        if self._masterclock or any(v.has_run for v in self.vcpus):
            data.flags = self.profile.capability(uapi.KVM_CAP_ADJUST_CLOCK) & CLOCK_FLAGS
        if data.flags & uapi.KVM_CLOCK_REALTIME:
            data.realtime = time.time_ns()
        if data.flags & uapi.KVM_CLOCK_HOST_TSC:
            data.host_tsc = now
        return data

    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        """KVM_SET_CLOCK: EINVAL for flags beyond TSC_STABLE, REALTIME and HOST_TSC. With REALTIME the clock moves on
        by the wall-clock time since ``realtime``, never back (6.12.118 x86.c kvm_vm_ioctl_set_clock)."""
        self._check_open()
        if data.flags & ~CLOCK_FLAGS:
            raise KvmError(errno.EINVAL, "KVM_SET_CLOCK")
        clock = data.clock
        if data.flags & uapi.KVM_CLOCK_REALTIME:
            now_real = time.time_ns()
            if now_real > data.realtime:
                clock = (clock + now_real - data.realtime) & U64
        self._clock_offset = clock - (time.monotonic_ns() - self._clock_base)
        self._masterclock = bool(self.vcpus)

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        self._check_open()
        if int(pio) not in (0, 1):
            raise KvmError(errno.EINVAL, "KVM_REGISTER_COALESCED_MMIO")
        self.coalesced.append((addr, size, int(pio)))
        self._refresh_may_block()

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: drops every zone inside the range (none is not an error)."""
        self._check_open()
        if int(pio) not in (0, 1):
            raise KvmError(errno.EINVAL, "KVM_UNREGISTER_COALESCED_MMIO")
        self.coalesced = [z for z in self.coalesced if not (z[2] == int(pio) and addr <= z[0]
                                                             and z[0] + z[1] <= addr + size)]
        self._refresh_may_block()

    def get_tsc_khz(self) -> int:
        self._check_open()
        return self.default_tsc_khz

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the VM: the rate new vCPUs take (0: the host's); EINVAL once a vCPU exists."""
        self._check_open()
        if self.vcpus or not 0 <= khz < 1 << 32:
            raise KvmError(errno.EINVAL, "KVM_SET_TSC_KHZ")
        self.default_tsc_khz = khz or MODEL_TSC_KHZ
