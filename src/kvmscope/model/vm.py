"""The model's VM: guest memory as bytearrays, vCPUs, and the VM capabilities the vCPU model depends on."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..api import Vm
from ..errors import InvalidValueError, KvmError
from ..kernel import rulesets as R
from ..memory import MemoryRegion, map_guest_memory
from .vcpu import ModelLimitation, ModelVcpu
from .vm_devices import VmDevicesModel

if TYPE_CHECKING:
    from .system import ModelSystem


# Capabilities x86's kvm_vm_ioctl_enable_cap (x86.c) takes that the model does not implement.
UNMODELLED_VM_CAPS = frozenset({
    uapi.KVM_CAP_EXCEPTION_PAYLOAD, uapi.KVM_CAP_X86_BUS_LOCK_EXIT,
    uapi.KVM_CAP_EXIT_HYPERCALL, uapi.KVM_CAP_EXIT_ON_EMULATION_FAILURE, uapi.KVM_CAP_X86_TRIPLE_FAULT_EVENT,
    uapi.KVM_CAP_X86_NOTIFY_VMEXIT, uapi.KVM_CAP_HALT_POLL, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    uapi.KVM_CAP_MAX_VCPU_ID, uapi.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, uapi.KVM_CAP_X86_APIC_BUS_CYCLES_NS})


class ModelVm(VmDevicesModel, Vm):
    """A VM of the software KVM; the irqchip, PIT, routing, eventfds and clock are in :class:`VmDevicesModel`."""

    def __init__(self, system: ModelSystem) -> None:
        self.system = system
        self.profile = system.profile
        self.rules = system.rules
        self.regions: list[MemoryRegion] = []
        self.vcpus: list[ModelVcpu] = []
        self._vcpu_ids: set[int] = set()  # every id ever created: KVM keeps a closed vCPU (and its id) until VM teardown
        self.disabled_quirks = 0
        self.x2apic_format = False  # KVM_CAP_X2APIC_API: 32-bit x2APIC IDs in KVM_GET/SET_LAPIC
        # x2apic_format as the APIC map was last rebuilt: enabling the capability does not rebuild it, only a change of
        # an APIC does (kvm_recalculate_apic_map after apic_map_dirty; 6.12.118 lapic.c:385-490, x86.c:6116-6117)
        self.apic_map_format = False
        self.x2apic_broadcast_quirk_disabled = False  # ... and an MSI to 0xFF not taken as an x2APIC broadcast
        self.suppress_eoi_broadcast = "quirked"  # ... KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST makes it "disabled"
        self.disabled_exits = 0  # KVM_CAP_X86_DISABLE_EXITS
        self.msrs: dict[int, int] = {}  # VM-wide MSR state (kvmclock wall clock)
        self.platform_info_readable = True
        self.user_space_msr = 0
        self.msr_filter: tuple[int, tuple[tuple[int, int, int, bytes], ...]] = (0, ())
        self.reset_devices()

    def limitation(self, message: str) -> ModelLimitation:
        return ModelLimitation(message)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vcpu in self.vcpus:
            vcpu.close()
        self.regions.clear()

    def check_extension(self, cap: int) -> int:
        self._check_open()
        # a VM's KVM_CAP_X2APIC_API leaves ENABLE_SUPPRESS_EOI_BROADCAST out without a split irqchip (x86.c)
        return self.system.capability(cap, vm=not (cap == uapi.KVM_CAP_X2APIC_API and self.split_irqchip))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP for the capabilities that shape the vCPU model; one the profile's kernel lacks gets EINVAL,
        and one it has that the model does not implement (KVM_CAP_SPLIT_IRQCHIP, ...) raises ModelLimitation."""
        self._check_open()
        if len(args) > 4:
            raise InvalidValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        arg0 = args[0] if args else 0
        supported = self.system.capability(cap, vm=True)
        if cap in (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) and supported:
            self._enable_dirty_ring(arg0, supported)  # generic code: flags are not looked at
        later_enable = self.system.rules.enable_arrival(cap)
        if later_enable is not None:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} cannot be enabled yet: "
                           f"{later_enable.key}, {later_enable.cite()}")
        if flags or not supported:
            later = self.system.rules.cap_arrival(cap)
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} comes later: {later.key}, {later.cite()}"
                           if later is not None else "")
        if cap == uapi.KVM_CAP_DISABLE_QUIRKS2:
            if arg0 & ~supported:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "quirk not supported by this kernel")
            self.disabled_quirks |= arg0
        elif cap == uapi.KVM_CAP_DISABLE_QUIRKS:
            self.disabled_quirks |= arg0
        elif cap == uapi.KVM_CAP_X86_DISABLE_EXITS:
            # kvm_vm_ioctl_enable_cap: from 6.14 only the exits this host may disable (c829ccd4d9dc; before, any
            # valid one, an MWAIT the host cannot disable ignored) and only before any vCPU exists (04cd8f8628d8).
            # With HLT exits disabled KVM_SET_CPUID2 clears KVM_FEATURE_PV_UNHALT.
            allowed = supported if self.rules.has(R.DISABLE_EXITS_ALLOWED_ONLY) else uapi.KVM_X86_DISABLE_VALID_EXITS
            if arg0 & ~allowed or (self.vcpus and self.rules.has(R.DISABLE_EXITS_BEFORE_VCPUS)):
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")
            self.disabled_exits |= arg0 & supported
        elif cap == uapi.KVM_CAP_SPLIT_IRQCHIP:
            self.enable_split_irqchip(arg0)
        elif cap == uapi.KVM_CAP_MSR_PLATFORM_INFO:
            self.platform_info_readable = bool(arg0)
        elif cap == uapi.KVM_CAP_X86_USER_SPACE_MSR:
            if arg0 & ~(uapi.KVM_MSR_EXIT_REASON_INVAL | uapi.KVM_MSR_EXIT_REASON_UNKNOWN
                        | uapi.KVM_MSR_EXIT_REASON_FILTER):
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")
            self.user_space_msr = arg0
        elif cap == uapi.KVM_CAP_X2APIC_API:  # x86.c:6111-6122 (6.12.118); 6.18.17's patch for bits 2-3
            # A flag the version lacks is EINVAL, and so is ENABLE: it needs a split IRQCHIP, which a model VM never
            # has (the VM's report leaves it out), and with DISABLE it is EINVAL anyway.
            enable, disable = uapi.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST, uapi.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST
            if arg0 & ~self.system.rules.x2apic_api_flags(0xF) or arg0 & enable and (arg0 & disable or not
                                                                                         self.split_irqchip):
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")
            if arg0 & enable:
                raise self.limitation("KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST: the model does not implement it")
            self.x2apic_format |= bool(arg0 & uapi.KVM_X2APIC_API_USE_32BIT_IDS)
            self.x2apic_broadcast_quirk_disabled |= bool(arg0 & uapi.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)
            # DISABLE: a SPIV with the directed-EOI bit (set by KVM_SET_LAPIC) no longer keeps EOIs from the in-kernel
            # IOAPIC (x2apic.ioapic_may_take_eoi). The LVR never advertised that bit with the in-kernel IOAPIC anyway
            # (kvm_lapic_advertise_suppress_eoi_broadcast).
            if arg0 & disable:
                self.suppress_eoi_broadcast = "disabled"
        elif cap in UNMODELLED_VM_CAPS:  # the profile's kernel takes it (checked above): EINVAL would be made up
            raise self.limitation(f"KVM_ENABLE_CAP {cap}: the model does not implement this capability")
        else:  # a capability kvm_vm_ioctl_enable_cap does not take
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")

    def _enable_dirty_ring(self, size: int, max_bytes: int) -> None:
        """``kvm_vm_ioctl_enable_dirty_log_ring`` (6.12.118 virt/kvm/kvm_main.c:5009-5045): the size (a u32) a power of
        two holding the reserved entries (64, plus the 512 of VMX's page-modification log) of 16 bytes and at least a
        page, else EINVAL; over the cap's maximum, E2BIG; once a vCPU was created, EINVAL. The model keeps no ring: a
        size the kernel takes is a ModelLimitation."""
        size &= 0xFFFFFFFF
        reserved = (64 + (512 if self.profile.vendor == "vmx" else 0)) * 16
        if not size or size & (size - 1) or size < max(reserved, 4096):
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"dirty ring size {size:#x}")
        if size > max_bytes:
            raise KvmError(errno.E2BIG, "KVM_ENABLE_CAP", f"dirty ring size {size:#x} over {max_bytes:#x}")
        if self.vcpus:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "a dirty ring once vCPUs exist")
        raise self.limitation("KVM_ENABLE_CAP: the model does not implement the dirty ring")

    def set_msr_filter(self, flags: int, ranges: Sequence[tuple[int, int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER with kvm_vm_ioctl_set_msr_filter's and kvm_add_msr_filter's checks (x86.c in 6.12,
        lines 6392-6410 and 6358-6376; the same in 6.18): EINVAL for unknown filter flags, a default-deny filter
        with no range, a range with unknown or no flags, or a bitmap over KVM_MSR_FILTER_MAX_BITMAP_SIZE. Ranges with
        nmsrs 0 are skipped unchecked. The old filter stays when the new one is refused."""
        self._check_open()
        if len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:
            raise InvalidValueError(f"at most {uapi.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges")
        if flags & ~uapi.KVM_MSR_FILTER_VALID_MASK:
            raise KvmError(errno.EINVAL, "KVM_X86_SET_MSR_FILTER", f"filter flags {flags:#x}")
        used = [r for r in ranges if r[2]]
        if not used and flags & uapi.KVM_MSR_FILTER_DEFAULT_DENY:
            raise KvmError(errno.EINVAL, "KVM_X86_SET_MSR_FILTER", "default deny with no range")
        for i, (rflags, _base, nmsrs, _bitmap) in enumerate(ranges):
            if not nmsrs:
                continue
            if rflags & ~uapi.KVM_MSR_FILTER_RANGE_VALID_MASK or not rflags:
                raise KvmError(errno.EINVAL, "KVM_X86_SET_MSR_FILTER", f"range {i} flags {rflags:#x}")
            if (nmsrs + 63) // 64 * 8 > uapi.KVM_MSR_FILTER_MAX_BITMAP_SIZE:
                raise KvmError(errno.EINVAL, "KVM_X86_SET_MSR_FILTER", f"range {i}: {nmsrs} MSRs need a bitmap over "
                               f"{uapi.KVM_MSR_FILTER_MAX_BITMAP_SIZE:#x} bytes")
        self.msr_filter = (flags, tuple((f, b, n, bytes(bm)) for f, b, n, bm in used))

    def add_memory(self, guest_phys_addr: int, size: int, slot: int | None = None, flags: int = 0) -> int:
        slot = self._claim_slot(guest_phys_addr, size, slot, flags)
        # The same lazy anonymous mapping as the live backend: a 4 GiB slot costs nothing until its pages are touched.
        self.regions.append(MemoryRegion(slot, guest_phys_addr, size, flags, map_guest_memory(size, slot)))
        return slot

    def fetch(self, gpa: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``gpa`` from the region holding it (fewer at its end; empty outside memory)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size:
                off = gpa - r.guest_phys_addr
                return bytes(r.mem[off : off + length])
        return b""

    def create_vcpu(self, vcpu_id: int = 0) -> ModelVcpu:
        """KVM_CREATE_VCPU: ids up to KVM_CAP_MAX_VCPU_ID, at most KVM_CAP_MAX_VCPUS, each id once."""
        self._check_open()
        if isinstance(vcpu_id, bool) or not isinstance(vcpu_id, int):
            raise InvalidValueError(f"vCPU id must be an int, not {vcpu_id!r}")
        max_id = self.system.capability(uapi.KVM_CAP_MAX_VCPU_ID) or 1024
        max_vcpus = self.system.capability(uapi.KVM_CAP_MAX_VCPUS) or 1024
        if not 0 <= vcpu_id < max_id or len(self.vcpus) >= max_vcpus:
            raise KvmError(errno.EINVAL, "KVM_CREATE_VCPU")
        # Closing a vCPU fd does not free its id: KVM keeps the vCPU until the VM goes away. A set, not a scan of the
        # vCPUs, so that creating n vCPUs costs O(n) in all, not O(n^2).
        if vcpu_id in self._vcpu_ids:
            raise KvmError(errno.EEXIST, "KVM_CREATE_VCPU")
        vcpu = ModelVcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        self._vcpu_ids.add(vcpu_id)
        return vcpu
