"""The KVM userspace ABI for x86-64, in one declarative place.

Every number and struct here mirrors ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``; each struct's
docstring quotes its C definition. ``tests/test_uapi.py`` compiles a C program against the system headers and checks the
sizes, offsets and request numbers below against it.
"""

from __future__ import annotations

import ctypes
from typing import Final

# --- ioctl request encoding (asm-generic/ioctl.h) -------------------------------------------------------------------

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

# Limits from arch/x86/kvm: MAX_IO_MSRS (x86.c) and KVM_MAX_CPUID_ENTRIES (kvm_host.h).
MAX_IO_MSRS: Final = 256
KVM_MAX_CPUID_ENTRIES: Final = 256


# --- structs -----------------------------------------------------------------------------------------------------------


class kvm_msr_entry(ctypes.Structure):
    """``struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };``"""

    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class kvm_msrs(ctypes.Structure):
    """``struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };`` (header only)"""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """``struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };`` (header only)"""

    _fields_ = [("nmsrs", ctypes.c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2 { __u32 function, index, flags, eax, ebx, ecx, edx; __u32 padding[3]; };``"""

    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0


class kvm_cpuid2(ctypes.Structure):
    """``struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };`` (header only)"""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class kvm_regs(ctypes.Structure):
    """``struct kvm_regs { __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags; };``"""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    """``struct kvm_segment { __u64 base; __u32 limit; __u16 selector; __u8 type, present, dpl, db, s, l, g, avl;
    __u8 unusable; __u8 padding; };``"""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    """``struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };``"""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(ctypes.Structure):
    """``struct kvm_sregs { struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt; struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64]; };``"""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    """``struct kvm_userspace_memory_region { __u32 slot; __u32 flags; __u64 guest_phys_addr;
    __u64 memory_size; __u64 userspace_addr; };``"""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1


class kvm_enable_cap(ctypes.Structure):
    """``struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; };``"""

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class kvm_msr_filter_range(ctypes.Structure):
    """``struct kvm_msr_filter_range { __u32 flags; __u32 nmsrs; __u32 base; __u8 *bitmap; };``"""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("nmsrs", ctypes.c_uint32),
        ("base", ctypes.c_uint32),
        ("bitmap", ctypes.c_void_p),
    ]


KVM_MSR_FILTER_MAX_RANGES: Final = 16
KVM_MSR_FILTER_READ: Final = 1 << 0
KVM_MSR_FILTER_WRITE: Final = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW: Final = 0
KVM_MSR_FILTER_DEFAULT_DENY: Final = 1
# arch/x86/include/uapi/asm/kvm.h: the flags each range and the filter take, and the largest bitmap one range reads.
KVM_MSR_FILTER_RANGE_VALID_MASK: Final = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_VALID_MASK: Final = KVM_MSR_FILTER_DEFAULT_DENY
KVM_MSR_FILTER_MAX_BITMAP_SIZE: Final = 0x600


class kvm_msr_filter(ctypes.Structure):
    """``struct kvm_msr_filter { __u32 flags; struct kvm_msr_filter_range ranges[16]; };``"""

    _fields_ = [("flags", ctypes.c_uint32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


# --- interrupt controllers, timers, clocks (VM ioctls) ------------------------------------------------------------------


class kvm_pic_state(ctypes.Structure):
    """``struct kvm_pic_state { __u8 last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll,
    special_mask, init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode, init4, elcr, elcr_mask; };``"""

    _fields_ = [
        (name, ctypes.c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll", "special_mask",
            "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


KVM_IOAPIC_NUM_PINS: Final = 24


class kvm_ioapic_state(ctypes.Structure):
    """``struct kvm_ioapic_state { __u64 base_address; __u32 ioregsel; __u32 id; __u32 irr; __u32 pad;
    union { __u64 bits; struct { ... } fields; } redirtbl[KVM_IOAPIC_NUM_PINS]; };`` (each entry as its ``bits``)"""

    _fields_ = [
        ("base_address", ctypes.c_uint64),
        ("ioregsel", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("irr", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("redirtbl", ctypes.c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip_chip(ctypes.Union):
    """``union { char dummy[512]; struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; } chip;``"""

    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
KVM_NR_IRQCHIPS: Final = 3


class kvm_irqchip(ctypes.Structure):
    """``struct kvm_irqchip { __u32 chip_id; __u32 pad; union { char dummy[512]; struct kvm_pic_state pic;
    struct kvm_ioapic_state ioapic; } chip; };``"""

    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("chip", kvm_irqchip_chip)]


class kvm_irq_level(ctypes.Structure):
    """``struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; };`` (``irq`` in, ``status`` out as
    the same word: KVM_IRQ_LINE_STATUS overwrites it)"""

    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]

    @property
    def status(self) -> int:
        """The ``__s32 status`` view of the first word (what KVM_IRQ_LINE_STATUS wrote back)."""
        return ctypes.c_int32(self.irq).value


class kvm_pit_config(ctypes.Structure):
    """``struct kvm_pit_config { __u32 flags; __u32 pad[15]; };``"""

    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY: Final = 1


class kvm_pit_channel_state(ctypes.Structure):
    """``struct kvm_pit_channel_state { __u32 count; __u16 latched_count; __u8 count_latched, status_latched, status,
    read_state, write_state, write_latch, rw_mode, mode, bcd, gate; __s64 count_load_time; };``"""

    _fields_ = [
        ("count", ctypes.c_uint32),
        ("latched_count", ctypes.c_uint16),
        *[(n, ctypes.c_uint8) for n in ("count_latched", "status_latched", "status", "read_state", "write_state",
                                        "write_latch", "rw_mode", "mode", "bcd", "gate")],
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    """``struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; __u32 flags; __u32 reserved[9]; };``"""

    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32 * 9)]


KVM_PIT_FLAGS_HPET_LEGACY: Final = 0x00000001
KVM_PIT_FLAGS_SPEAKER_DATA_ON: Final = 0x00000002


class kvm_msi(ctypes.Structure):
    """``struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; __u8 pad[12]; };``"""

    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    ]


KVM_MSI_VALID_DEVID: Final = 1 << 0


class kvm_irq_routing_irqchip(ctypes.Structure):
    """``struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };``"""

    _fields_ = [("irqchip", ctypes.c_uint32), ("pin", ctypes.c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    """``struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; union { __u32 pad; __u32 devid;
    }; };``"""

    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32), ("data", ctypes.c_uint32),
                ("devid", ctypes.c_uint32)]


class kvm_irq_routing_entry_u(ctypes.Union):
    """``union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; ...; __u32 pad[8]; } u;``
    (the x86 members)"""

    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", ctypes.c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    """``struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; __u32 pad; union { ... } u; };``"""

    _fields_ = [("gsi", ctypes.c_uint32), ("type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("u", kvm_irq_routing_entry_u)]


KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2
# KVM_MAX_IRQ_ROUTES (include/linux/kvm_host.h): KVM_SET_GSI_ROUTING refuses more entries with EINVAL.
KVM_MAX_IRQ_ROUTES: Final = 4096


class kvm_irq_routing(ctypes.Structure):
    """``struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };`` (header only)"""

    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class kvm_irqfd(ctypes.Structure):
    """``struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; __u8 pad[16]; };``"""

    _fields_ = [("fd", ctypes.c_uint32), ("gsi", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("resamplefd", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1


class kvm_ioeventfd(ctypes.Structure):
    """``struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; __u8 pad[36]; };``"""

    _fields_ = [("datamatch", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("fd", ctypes.c_int32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY: Final = 1 << 3
KVM_IOEVENTFD_FLAG_FAST_MMIO: Final = 1 << 4


class kvm_dirty_log(ctypes.Structure):
    """``struct kvm_dirty_log { __u32 slot; __u32 padding1; union { void *dirty_bitmap; __u64 padding2; }; };``"""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class kvm_clock_data(ctypes.Structure):
    """``struct kvm_clock_data { __u64 clock; __u32 flags; __u32 pad0; __u64 realtime; __u64 host_tsc;
    __u32 pad[4]; };``"""

    _fields_ = [("clock", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("pad0", ctypes.c_uint32),
                ("realtime", ctypes.c_uint64), ("host_tsc", ctypes.c_uint64), ("pad", ctypes.c_uint32 * 4)]


KVM_CLOCK_TSC_STABLE: Final = 2
KVM_CLOCK_REALTIME: Final = 1 << 2
KVM_CLOCK_HOST_TSC: Final = 1 << 3


class kvm_coalesced_mmio_zone(ctypes.Structure):
    """``struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; union { __u32 pad; __u32 pio; }; };``"""

    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint32), ("pio", ctypes.c_uint32)]


# --- vCPU state (the save/restore set) ---------------------------------------------------------------------------------

KVM_APIC_REG_SIZE: Final = 0x400


class kvm_lapic_state(ctypes.Structure):
    """``struct kvm_lapic_state { char regs[KVM_APIC_REG_SIZE]; };`` (the APIC page: register at offset ``0x10 * n``)"""

    _fields_ = [("regs", ctypes.c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_fpu(ctypes.Structure):
    """``struct kvm_fpu { __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; __u32 pad2; };``"""

    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class kvm_xsave(ctypes.Structure):
    """``struct kvm_xsave { __u32 region[1024]; __u32 extra[]; };`` (KVM_GET_XSAVE2 may need more than 4096 bytes:
    KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM says how many)"""

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


KVM_MAX_XCRS: Final = 16


class kvm_xcr(ctypes.Structure):
    """``struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };``"""

    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class kvm_xcrs(ctypes.Structure):
    """``struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[KVM_MAX_XCRS]; __u64 padding[16]; };``"""

    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", ctypes.c_uint64 * 16)]


class kvm_debugregs(ctypes.Structure):
    """``struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; __u64 reserved[9]; };``"""

    _fields_ = [("db", ctypes.c_uint64 * 4), ("dr6", ctypes.c_uint64), ("dr7", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("reserved", ctypes.c_uint64 * 9)]


class kvm_vcpu_events_exception(ctypes.Structure):
    """``struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;``"""

    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("has_error_code", ctypes.c_uint8),
                ("pending", ctypes.c_uint8), ("error_code", ctypes.c_uint32)]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    """``struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;``"""

    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("soft", ctypes.c_uint8),
                ("shadow", ctypes.c_uint8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    """``struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;``"""

    _fields_ = [("injected", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("masked", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    """``struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;``"""

    _fields_ = [("smm", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("smm_inside_nmi", ctypes.c_uint8),
                ("latched_init", ctypes.c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    """``struct kvm_vcpu_events { struct {...} exception; struct {...} interrupt; struct {...} nmi; __u32 sipi_vector;
    __u32 flags; struct {...} smi; struct { __u8 pending; } triple_fault; __u8 reserved[26];
    __u8 exception_has_payload; __u64 exception_payload; };``"""

    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault_pending", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW: Final = 0x00000004
KVM_VCPUEVENT_VALID_SMM: Final = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD: Final = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT: Final = 0x00000020

KVM_X86_SHADOW_INT_MOV_SS: Final = 0x01
KVM_X86_SHADOW_INT_STI: Final = 0x02


class kvm_mp_state(ctypes.Structure):
    """``struct kvm_mp_state { __u32 mp_state; };``"""

    _fields_ = [("mp_state", ctypes.c_uint32)]


KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_MP_STATE_INIT_RECEIVED: Final = 2
KVM_MP_STATE_HALTED: Final = 3
KVM_MP_STATE_SIPI_RECEIVED: Final = 4
KVM_MP_STATE_STOPPED: Final = 5
KVM_MP_STATE_CHECK_STOP: Final = 6
KVM_MP_STATE_OPERATING: Final = 7
KVM_MP_STATE_LOAD: Final = 8
KVM_MP_STATE_AP_RESET_HOLD: Final = 9
KVM_MP_STATE_SUSPENDED: Final = 10


class kvm_nested_state(ctypes.Structure):
    """``struct kvm_nested_state { __u16 flags; __u16 format; __u32 size; union { struct kvm_vmx_nested_state_hdr vmx;
    struct kvm_svm_nested_state_hdr svm; __u8 pad[120]; } hdr; union { ... } data; };`` (the 128-byte header; ``size``
    says how many bytes the whole state takes)"""

    _fields_ = [("flags", ctypes.c_uint16), ("format", ctypes.c_uint16), ("size", ctypes.c_uint32),
                ("hdr", ctypes.c_uint8 * 120)]


KVM_STATE_NESTED_FORMAT_VMX: Final = 0
KVM_STATE_NESTED_FORMAT_SVM: Final = 1
KVM_STATE_NESTED_GUEST_MODE: Final = 0x00000001
KVM_STATE_NESTED_RUN_PENDING: Final = 0x00000002


class kvm_guest_debug_arch(ctypes.Structure):
    """``struct kvm_guest_debug_arch { __u64 debugreg[8]; };``"""

    _fields_ = [("debugreg", ctypes.c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    """``struct kvm_guest_debug { __u32 control; __u32 pad; struct kvm_guest_debug_arch arch; };``"""

    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE: Final = 0x00000001
KVM_GUESTDBG_SINGLESTEP: Final = 0x00000002
KVM_GUESTDBG_USE_SW_BP: Final = 0x00010000
KVM_GUESTDBG_USE_HW_BP: Final = 0x00020000
KVM_GUESTDBG_INJECT_DB: Final = 0x00040000
KVM_GUESTDBG_INJECT_BP: Final = 0x00080000
KVM_GUESTDBG_BLOCKIRQ: Final = 0x00100000


class kvm_translation(ctypes.Structure):
    """``struct kvm_translation { __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable;
    __u8 usermode; __u8 pad[5]; };``"""

    _fields_ = [("linear_address", ctypes.c_uint64), ("physical_address", ctypes.c_uint64), ("valid", ctypes.c_uint8),
                ("writeable", ctypes.c_uint8), ("usermode", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5)]


class kvm_interrupt(ctypes.Structure):
    """``struct kvm_interrupt { __u32 irq; };``"""

    _fields_ = [("irq", ctypes.c_uint32)]


class kvm_signal_mask(ctypes.Structure):
    """``struct kvm_signal_mask { __u32 len; __u8 sigset[]; };`` (header only; x86-64 takes an 8-byte sigset)"""

    _fields_ = [("len", ctypes.c_uint32)]


# --- struct kvm_run ---------------------------------------------------------------------------------------------------


class kvm_run_io(ctypes.Structure):
    """``struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;`` (KVM_EXIT_IO)"""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    """``struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;`` (KVM_EXIT_MMIO)"""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class kvm_run_fail_entry(ctypes.Structure):
    """``struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;`` (KVM_EXIT_FAIL_ENTRY)"""

    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class kvm_run_internal(ctypes.Structure):
    """``struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;`` (KVM_EXIT_INTERNAL_ERROR)"""

    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    """``struct { __u32 type; __u32 ndata; union { __u64 flags; __u64 data[16]; }; } system_event;``"""

    _fields_ = [("type", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class kvm_run_msr(ctypes.Structure):
    """``struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;``
    (KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR)"""

    _fields_ = [
        ("error", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
        ("reason", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    ]


class kvm_run_exit(ctypes.Union):
    """The exit-reason union of ``struct kvm_run`` (256 bytes), with the members kvmscope decodes."""

    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr),
        ("hardware_exit_reason", ctypes.c_uint64),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """``struct kvm_run { __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6]; __u32 exit_reason;
    __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags; __u64 cr8; __u64 apic_base;
    union { ... } ; __u64 kvm_valid_regs; __u64 kvm_dirty_regs; union { ...; char padding[2048]; } s; };``"""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", ctypes.c_char * 2048),
    ]


# Offsets into the mmapped kvm_run that the hot path reads without building a ctypes object.
KVM_RUN_IMMEDIATE_EXIT_OFFSET: Final = kvm_run.immediate_exit.offset
KVM_RUN_EXIT_REASON_OFFSET: Final = kvm_run.exit_reason.offset
KVM_RUN_EXIT_OFFSET: Final = kvm_run.exit.offset

# kvm_run.flags, set by KVM_RUN as it returns (arch/x86/include/uapi/asm/kvm.h; GUEST_MODE from 6.11, 85542adb65ec)
KVM_RUN_X86_SMM: Final = 1 << 0
KVM_RUN_X86_BUS_LOCK: Final = 1 << 1
KVM_RUN_X86_GUEST_MODE: Final = 1 << 2


# --- the structs as struct-module formats -------------------------------------------------------------------------------
# For code that reads a mapped struct (kvm_run) with the struct module instead of building ctypes objects: the formats
# are derived from the ctypes structs above, so that the layout has one source.

_INT_CODES: Final[dict[type, str]] = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
                                      ctypes.c_uint64: "Q"}


def field_code(cls: type[ctypes.Structure], name: str) -> str:
    """The :mod:`struct` code of field ``name`` of ``cls``: ``B``/``H``/``I``/``Q`` for an unsigned integer, ``Ns`` for
    a ``__u8[N]`` (read as bytes), ``NQ`` (and so on) for another integer array."""
    ctype = dict((f[0], f[1]) for f in cls._fields_)[name]
    size = getattr(cls, name).size
    if ctype in _INT_CODES:
        return _INT_CODES[ctype]
    if ctype == ctypes.c_uint8 * size:
        return f"{size}s"
    for element, code in _INT_CODES.items():
        if ctype == element * (size // ctypes.sizeof(element)):
            return f"{size // ctypes.sizeof(element)}{code}"
    raise TypeError(f"{cls.__name__}.{name}: no struct code for {ctype.__name__}")


def struct_format(cls: type[ctypes.Structure], *names: str) -> str:
    """The little-endian :mod:`struct` format that reads fields ``names`` of ``cls`` (in the order they are laid out)
    from the start of a ``cls``, skipping the bytes between them: ``unpack`` gives those fields' values in that order."""
    fmt, end = "<", 0
    for name in names:
        field = getattr(cls, name)
        if field.offset < end:
            raise ValueError(f"{cls.__name__}.{name} (offset {field.offset}) is not after the previous field")
        fmt += (f"{field.offset - end}x" if field.offset > end else "") + field_code(cls, name)
        end = field.offset + field.size
    return fmt


# --- ioctl request numbers ------------------------------------------------------------------------------------------

# System ioctls (/dev/kvm).
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST: Final = _iowr(0x0A, kvm_msr_list)
KVM_GET_EMULATED_CPUID: Final = _iowr(0x09, kvm_cpuid2)

# VM ioctls.
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_ENABLE_CAP: Final = _iow(0xA3, kvm_enable_cap)
KVM_X86_SET_MSR_FILTER: Final = _iow(0xC6, kvm_msr_filter)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, kvm_dirty_log)
KVM_SET_IDENTITY_MAP_ADDR: Final = _ioc(_IOC_WRITE, 0x48, 8)  # _IOW(KVMIO, 0x48, __u64)
KVM_CREATE_IRQCHIP: Final = _io(0x60)
KVM_IRQ_LINE: Final = _iow(0x61, kvm_irq_level)
KVM_GET_IRQCHIP: Final = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP: Final = _ior(0x63, kvm_irqchip)  # _IOR, not _IOW: a historical slip kept for ABI compatibility
KVM_IRQ_LINE_STATUS: Final = _iowr(0x67, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO: Final = _iow(0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO: Final = _iow(0x68, kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING: Final = _iow(0x6A, kvm_irq_routing)
KVM_IRQFD: Final = _iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2: Final = _iow(0x77, kvm_pit_config)
KVM_IOEVENTFD: Final = _iow(0x79, kvm_ioeventfd)
KVM_SET_CLOCK: Final = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK: Final = _ior(0x7C, kvm_clock_data)
KVM_GET_PIT2: Final = _ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2: Final = _iow(0xA0, kvm_pit_state2)
KVM_SIGNAL_MSI: Final = _iow(0xA5, kvm_msi)
# KVM_SET_TSC_KHZ / KVM_GET_TSC_KHZ work on a vCPU, and on the VM (the default for new vCPUs) with
# KVM_CAP_VM_TSC_CONTROL.
KVM_SET_TSC_KHZ: Final = _io(0xA2)
KVM_GET_TSC_KHZ: Final = _io(0xA3)

# vCPU ioctls (KVM_GET_MSRS also works on /dev/kvm for feature MSRs).
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, kvm_regs)
KVM_SET_REGS: Final = _iow(0x82, kvm_regs)
KVM_GET_SREGS: Final = _ior(0x83, kvm_sregs)
KVM_SET_SREGS: Final = _iow(0x84, kvm_sregs)
KVM_GET_MSRS: Final = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS: Final = _iow(0x89, kvm_msrs)
KVM_SET_CPUID2: Final = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2: Final = _iowr(0x91, kvm_cpuid2)
KVM_TRANSLATE: Final = _iowr(0x85, kvm_translation)
KVM_INTERRUPT: Final = _iow(0x86, kvm_interrupt)
KVM_SET_SIGNAL_MASK: Final = _iow(0x8B, kvm_signal_mask)
KVM_GET_FPU: Final = _ior(0x8C, kvm_fpu)
KVM_SET_FPU: Final = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC: Final = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC: Final = _iow(0x8F, kvm_lapic_state)
KVM_GET_MP_STATE: Final = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE: Final = _iow(0x99, kvm_mp_state)
KVM_NMI: Final = _io(0x9A)
KVM_SET_GUEST_DEBUG: Final = _iow(0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS: Final = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS: Final = _iow(0xA2, kvm_debugregs)
KVM_GET_XSAVE: Final = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE: Final = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS: Final = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS: Final = _iow(0xA7, kvm_xcrs)
KVM_KVMCLOCK_CTRL: Final = _io(0xAD)
KVM_SMI: Final = _io(0xB7)
KVM_GET_NESTED_STATE: Final = _iowr(0xBE, kvm_nested_state)
KVM_SET_NESTED_STATE: Final = _iow(0xBF, kvm_nested_state)
KVM_GET_XSAVE2: Final = _ior(0xCF, kvm_xsave)

IOCTL_NAMES: Final[dict[int, str]] = {
    globals()[name]: name
    for name in (
        "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_FEATURE_INDEX_LIST", "KVM_CREATE_VCPU",
        "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_ENABLE_CAP", "KVM_X86_SET_MSR_FILTER", "KVM_RUN",
        "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS",
        "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_EMULATED_CPUID", "KVM_GET_DIRTY_LOG", "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_IRQ_LINE_STATUS",
        "KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO", "KVM_SET_GSI_ROUTING", "KVM_IRQFD",
        "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_SET_CLOCK", "KVM_GET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2",
        "KVM_SIGNAL_MSI", "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ", "KVM_TRANSLATE", "KVM_INTERRUPT",
        "KVM_SET_SIGNAL_MASK", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_GET_MP_STATE",
        "KVM_SET_MP_STATE", "KVM_NMI", "KVM_SET_GUEST_DEBUG", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
        "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS",
        "KVM_KVMCLOCK_CTRL", "KVM_SMI", "KVM_GET_NESTED_STATE", "KVM_SET_NESTED_STATE", "KVM_GET_XSAVE2",
    )
}  # fmt: skip
"""Request number to ioctl name, for error messages."""

# --- exit reasons ------------------------------------------------------------------------------------------------------

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
KVM_SYSTEM_EVENT_RESET: Final = 2
KVM_SYSTEM_EVENT_CRASH: Final = 3

# KVM_CAP_X86_USER_SPACE_MSR reasons (kvm_run.msr.reason and the enable_cap bitmask).
KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2

# --- capabilities ------------------------------------------------------------------------------------------------------

KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_HLT: Final = 1
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_EXT_CPUID: Final = 7
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_PIT: Final = 11
KVM_CAP_MP_STATE: Final = 14
KVM_CAP_COALESCED_MMIO: Final = 15
KVM_CAP_USER_NMI: Final = 22
KVM_CAP_SET_GUEST_DEBUG: Final = 23
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_IRQ_INJECT_STATUS: Final = 26
KVM_CAP_IRQFD: Final = 32
KVM_CAP_PIT2: Final = 33
KVM_CAP_PIT_STATE2: Final = 35
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_DEBUGREGS: Final = 50
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_TSC_CONTROL: Final = 60
KVM_CAP_GET_TSC_KHZ: Final = 61
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_ONE_REG: Final = 70
KVM_CAP_KVMCLOCK_CTRL: Final = 76
KVM_CAP_SIGNAL_MSI: Final = 77
KVM_CAP_EXT_EMUL_CPUID: Final = 95
KVM_CAP_ENABLE_CAP_VM: Final = 98
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_DISABLE_QUIRKS: Final = 116
KVM_CAP_X86_SMM: Final = 117
KVM_CAP_SPLIT_IRQCHIP: Final = 121
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_X2APIC_API: Final = 129
KVM_X2APIC_API_USE_32BIT_IDS: Final = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK: Final = 1 << 1
KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST: Final = 1 << 2
KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST: Final = 1 << 3
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_X86_DISABLE_EXITS: Final = 143
KVM_CAP_GET_MSR_FEATURES: Final = 153
KVM_CAP_NESTED_STATE: Final = 157
KVM_CAP_MSR_PLATFORM_INFO: Final = 159
KVM_CAP_EXCEPTION_PAYLOAD: Final = 164
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_CAP_X86_BUS_LOCK_EXIT: Final = 193
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_EXIT_ON_EMULATION_FAILURE: Final = 204
KVM_CAP_X86_TRIPLE_FAULT_EVENT: Final = 218
KVM_CAP_X86_NOTIFY_VMEXIT: Final = 219
KVM_CAP_HYPERV: Final = 44
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_HALT_POLL: Final = 182
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL: Final = 223
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES: Final = 220
KVM_CAP_X86_APIC_BUS_CYCLES_NS: Final = 237
KVM_CAP_X86_MSR_FILTER: Final = 189
KVM_CAP_XSAVE2: Final = 208
KVM_CAP_DISABLE_QUIRKS2: Final = 213
KVM_CAP_VM_TSC_CONTROL: Final = 214

# The other capabilities of <linux/kvm.h> (the installed header's and 6.12's), for their names in reports (a traced
# KVM_CHECK_EXTENSION, a template's kvm_capabilities); kvmscope does not use them.
KVM_CAP_MMU_SHADOW_CACHE_CONTROL: Final = 2
KVM_CAP_VAPIC: Final = 6
KVM_CAP_CLOCKSOURCE: Final = 8
KVM_CAP_NOP_IO_DELAY: Final = 12
KVM_CAP_PV_MMU: Final = 13
KVM_CAP_IOMMU: Final = 18
KVM_CAP_DESTROY_MEMORY_REGION_WORKS: Final = 21
KVM_CAP_REINJECT_CONTROL: Final = 24
KVM_CAP_ASSIGN_DEV_IRQ: Final = 29
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS: Final = 30
KVM_CAP_MCE: Final = 31
KVM_CAP_SET_BOOT_CPU_ID: Final = 34
KVM_CAP_XEN_HVM: Final = 38
KVM_CAP_INTERNAL_ERROR_DATA: Final = 40
KVM_CAP_S390_PSW: Final = 42
KVM_CAP_PPC_SEGSTATE: Final = 43
KVM_CAP_HYPERV_VAPIC: Final = 45
KVM_CAP_HYPERV_SPIN: Final = 46
KVM_CAP_PCI_SEGMENT: Final = 47
KVM_CAP_PPC_PAIRED_SINGLES: Final = 48
KVM_CAP_INTR_SHADOW: Final = 49
KVM_CAP_X86_ROBUST_SINGLESTEP: Final = 51
KVM_CAP_PPC_OSI: Final = 52
KVM_CAP_PPC_UNSET_IRQ: Final = 53
KVM_CAP_ENABLE_CAP: Final = 54
KVM_CAP_PPC_GET_PVINFO: Final = 57
KVM_CAP_PPC_IRQ_LEVEL: Final = 58
KVM_CAP_ASYNC_PF: Final = 59
KVM_CAP_PPC_BOOKE_SREGS: Final = 62
KVM_CAP_SPAPR_TCE: Final = 63
KVM_CAP_PPC_SMT: Final = 64
KVM_CAP_PPC_RMA: Final = 65
KVM_CAP_PPC_HIOR: Final = 67
KVM_CAP_PPC_PAPR: Final = 68
KVM_CAP_SW_TLB: Final = 69
KVM_CAP_S390_GMAP: Final = 71
KVM_CAP_TSC_DEADLINE_TIMER: Final = 72
KVM_CAP_S390_UCONTROL: Final = 73
KVM_CAP_SYNC_REGS: Final = 74
KVM_CAP_PCI_2_3: Final = 75
KVM_CAP_PPC_GET_SMMU_INFO: Final = 78
KVM_CAP_S390_COW: Final = 79
KVM_CAP_PPC_ALLOC_HTAB: Final = 80
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IRQFD_RESAMPLE: Final = 82
KVM_CAP_PPC_BOOKE_WATCHDOG: Final = 83
KVM_CAP_PPC_HTAB_FD: Final = 84
KVM_CAP_S390_CSS_SUPPORT: Final = 85
KVM_CAP_PPC_EPR: Final = 86
KVM_CAP_ARM_PSCI: Final = 87
KVM_CAP_ARM_SET_DEVICE_ADDR: Final = 88
KVM_CAP_DEVICE_CTRL: Final = 89
KVM_CAP_IRQ_MPIC: Final = 90
KVM_CAP_PPC_RTAS: Final = 91
KVM_CAP_IRQ_XICS: Final = 92
KVM_CAP_ARM_EL1_32BIT: Final = 93
KVM_CAP_SPAPR_MULTITCE: Final = 94
KVM_CAP_HYPERV_TIME: Final = 96
KVM_CAP_IOAPIC_POLARITY_IGNORED: Final = 97
KVM_CAP_S390_IRQCHIP: Final = 99
KVM_CAP_IOEVENTFD_NO_LENGTH: Final = 100
KVM_CAP_VM_ATTRIBUTES: Final = 101
KVM_CAP_ARM_PSCI_0_2: Final = 102
KVM_CAP_PPC_FIXUP_HCALL: Final = 103
KVM_CAP_PPC_ENABLE_HCALL: Final = 104
KVM_CAP_S390_USER_SIGP: Final = 106
KVM_CAP_S390_VECTOR_REGISTERS: Final = 107
KVM_CAP_S390_MEM_OP: Final = 108
KVM_CAP_S390_USER_STSI: Final = 109
KVM_CAP_S390_SKEYS: Final = 110
KVM_CAP_MIPS_FPU: Final = 111
KVM_CAP_MIPS_MSA: Final = 112
KVM_CAP_S390_INJECT_IRQ: Final = 113
KVM_CAP_S390_IRQ_STATE: Final = 114
KVM_CAP_PPC_HWRNG: Final = 115
KVM_CAP_GUEST_DEBUG_HW_BPS: Final = 119
KVM_CAP_GUEST_DEBUG_HW_WPS: Final = 120
KVM_CAP_IOEVENTFD_ANY_LENGTH: Final = 122
KVM_CAP_HYPERV_SYNIC: Final = 123
KVM_CAP_S390_RI: Final = 124
KVM_CAP_SPAPR_TCE_64: Final = 125
KVM_CAP_ARM_PMU_V3: Final = 126
KVM_CAP_VCPU_ATTRIBUTES: Final = 127
KVM_CAP_S390_USER_INSTR0: Final = 130
KVM_CAP_MSI_DEVID: Final = 131
KVM_CAP_PPC_HTM: Final = 132
KVM_CAP_SPAPR_RESIZE_HPT: Final = 133
KVM_CAP_PPC_MMU_RADIX: Final = 134
KVM_CAP_PPC_MMU_HASH_V3: Final = 135
KVM_CAP_MIPS_VZ: Final = 137
KVM_CAP_MIPS_TE: Final = 138
KVM_CAP_MIPS_64BIT: Final = 139
KVM_CAP_S390_GS: Final = 140
KVM_CAP_S390_AIS: Final = 141
KVM_CAP_SPAPR_TCE_VFIO: Final = 142
KVM_CAP_ARM_USER_IRQ: Final = 144
KVM_CAP_S390_CMMA_MIGRATION: Final = 145
KVM_CAP_PPC_FWNMI: Final = 146
KVM_CAP_PPC_SMT_POSSIBLE: Final = 147
KVM_CAP_HYPERV_SYNIC2: Final = 148
KVM_CAP_HYPERV_VP_INDEX: Final = 149
KVM_CAP_S390_AIS_MIGRATION: Final = 150
KVM_CAP_PPC_GET_CPU_CHAR: Final = 151
KVM_CAP_S390_BPB: Final = 152
KVM_CAP_HYPERV_EVENTFD: Final = 154
KVM_CAP_HYPERV_TLBFLUSH: Final = 155
KVM_CAP_S390_HPAGE_1M: Final = 156
KVM_CAP_ARM_INJECT_SERROR_ESR: Final = 158
KVM_CAP_PPC_NESTED_HV: Final = 160
KVM_CAP_HYPERV_SEND_IPI: Final = 161
KVM_CAP_COALESCED_PIO: Final = 162
KVM_CAP_HYPERV_ENLIGHTENED_VMCS: Final = 163
KVM_CAP_ARM_VM_IPA_SIZE: Final = 165
KVM_CAP_HYPERV_CPUID: Final = 167
KVM_CAP_PPC_IRQ_XIVE: Final = 169
KVM_CAP_ARM_SVE: Final = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS: Final = 171
KVM_CAP_ARM_PTRAUTH_GENERIC: Final = 172
KVM_CAP_PMU_EVENT_FILTER: Final = 173
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2: Final = 174
KVM_CAP_HYPERV_DIRECT_TLBFLUSH: Final = 175
KVM_CAP_PPC_GUEST_DEBUG_SSTEP: Final = 176
KVM_CAP_ARM_NISV_TO_USER: Final = 177
KVM_CAP_ARM_INJECT_EXT_DABT: Final = 178
KVM_CAP_S390_VCPU_RESETS: Final = 179
KVM_CAP_S390_PROTECTED: Final = 180
KVM_CAP_PPC_SECURE_GUEST: Final = 181
KVM_CAP_ASYNC_PF_INT: Final = 183
KVM_CAP_LAST_CPU: Final = 184
KVM_CAP_SMALLER_MAXPHYADDR: Final = 185
KVM_CAP_S390_DIAG318: Final = 186
KVM_CAP_STEAL_TIME: Final = 187
KVM_CAP_ENFORCE_PV_FEATURE_CPUID: Final = 190
KVM_CAP_SYS_HYPERV_CPUID: Final = 191
KVM_CAP_PPC_DAWR1: Final = 194
KVM_CAP_SET_GUEST_DEBUG2: Final = 195
KVM_CAP_SGX_ATTRIBUTE: Final = 196
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: Final = 197
KVM_CAP_PTP_KVM: Final = 198
KVM_CAP_HYPERV_ENFORCE_CPUID: Final = 199
KVM_CAP_SREGS2: Final = 200
KVM_CAP_PPC_RPT_INVALIDATE: Final = 202
KVM_CAP_BINARY_STATS_FD: Final = 203
KVM_CAP_ARM_MTE: Final = 205
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: Final = 206
KVM_CAP_VM_GPA_BITS: Final = 207
KVM_CAP_SYS_ATTRIBUTES: Final = 209
KVM_CAP_PPC_AIL_MODE_3: Final = 210
KVM_CAP_S390_MEM_OP_EXTENSION: Final = 211
KVM_CAP_PMU_CAPABILITY: Final = 212
KVM_CAP_SYSTEM_EVENT_DATA: Final = 215
KVM_CAP_ARM_SYSTEM_SUSPEND: Final = 216
KVM_CAP_S390_PROTECTED_DUMP: Final = 217
KVM_CAP_S390_ZPCI_OP: Final = 221
KVM_CAP_S390_CPU_TOPOLOGY: Final = 222
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT: Final = 166
KVM_CAP_S390_PROTECTED_ASYNC_DISABLE: Final = 224
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: Final = 225
KVM_CAP_PMU_EVENT_MASKED_EVENTS: Final = 226
KVM_CAP_COUNTER_OFFSET: Final = 227
KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE: Final = 228
KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES: Final = 229
KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES: Final = 230
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_X86_GUEST_MODE: Final = 238
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244  # 6.18 include/uapi/linux/kvm.h (newer than this machine's headers)

CAPABILITY_NAMES: Final[dict[int, str]] = {
    value: name for name, value in list(globals().items()) if name.startswith("KVM_CAP_") and isinstance(value, int)
}

KVM_X86_DISABLE_EXITS_MWAIT: Final = 1 << 0
KVM_X86_DISABLE_EXITS_HLT: Final = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE: Final = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE: Final = 1 << 3
# the exits KVM_ENABLE_CAP(KVM_CAP_X86_DISABLE_EXITS) took before 6.14 (dropped from the header by af5366bea2cb)
KVM_X86_DISABLE_VALID_EXITS: Final = 0xF

# --- quirks (arch/x86/include/uapi/asm/kvm.h) ------------------------------------------------------------------------

KVM_X86_QUIRK_LINT0_REENABLED: Final = 1 << 0
KVM_X86_QUIRK_CD_NW_CLEARED: Final = 1 << 1
KVM_X86_QUIRK_LAPIC_MMIO_HOLE: Final = 1 << 2
KVM_X86_QUIRK_OUT_7E_INC_RIP: Final = 1 << 3
KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT: Final = 1 << 4
KVM_X86_QUIRK_FIX_HYPERCALL_INSN: Final = 1 << 5
KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS: Final = 1 << 6
KVM_X86_QUIRK_SLOT_ZAP_ALL: Final = 1 << 7
# Added in v6.13 by dcb988cdac85 ("KVM: x86: Quirk initialization of feature MSRs to KVM's max configuration").
KVM_X86_QUIRK_STUFF_FEATURE_MSRS: Final = 1 << 8


# --- every KVMIO ioctl on x86, by request number (for `kvmscope trace`; checked against linux/kvm.h by
# tests/test_trace.py). Kept apart from IOCTL_NAMES, which lists the ioctls kvmscope itself issues. ----------------

TRACE_IOCTL_NAMES: Final[dict[int, str]] = {
    0x0000ae00: "KVM_GET_API_VERSION",
    0x0000ae01: "KVM_CREATE_VM",
    0xc004ae02: "KVM_GET_MSR_INDEX_LIST",
    0x0000ae03: "KVM_CHECK_EXTENSION",
    0x0000ae04: "KVM_GET_VCPU_MMAP_SIZE",
    0xc008ae05: "KVM_GET_SUPPORTED_CPUID",
    0xc008ae09: "KVM_GET_EMULATED_CPUID",
    0xc004ae0a: "KVM_GET_MSR_FEATURE_INDEX_LIST",
    0x0000ae41: "KVM_CREATE_VCPU",
    0x4010ae42: "KVM_GET_DIRTY_LOG",
    0x4020ae46: "KVM_SET_USER_MEMORY_REGION",
    0x0000ae47: "KVM_SET_TSS_ADDR",
    0x4008ae48: "KVM_SET_IDENTITY_MAP_ADDR",
    0x0000ae60: "KVM_CREATE_IRQCHIP",
    0x4008ae61: "KVM_IRQ_LINE",
    0xc208ae62: "KVM_GET_IRQCHIP",
    0x8208ae63: "KVM_SET_IRQCHIP",
    0x0000ae64: "KVM_CREATE_PIT",
    0xc008ae67: "KVM_IRQ_LINE_STATUS",
    0x4010ae67: "KVM_REGISTER_COALESCED_MMIO",
    0x4010ae68: "KVM_UNREGISTER_COALESCED_MMIO",
    0x4008ae6a: "KVM_SET_GSI_ROUTING",
    0x4020ae76: "KVM_IRQFD",
    0x4040ae77: "KVM_CREATE_PIT2",
    0x0000ae78: "KVM_SET_BOOT_CPU_ID",
    0x4040ae79: "KVM_IOEVENTFD",
    0x4030ae7b: "KVM_SET_CLOCK",
    0x8030ae7c: "KVM_GET_CLOCK",
    0x8070ae9f: "KVM_GET_PIT2",
    0x4070aea0: "KVM_SET_PIT2",
    0x4068aea3: "KVM_ENABLE_CAP",
    0x4020aea5: "KVM_SIGNAL_MSI",
    0x4020aeb2: "KVM_SET_PMU_EVENT_FILTER",
    0xc018aec0: "KVM_CLEAR_DIRTY_LOG",
    0x4188aec6: "KVM_X86_SET_MSR_FILTER",
    0x0000aec7: "KVM_RESET_DIRTY_RINGS",
    0xc00caee0: "KVM_CREATE_DEVICE",
    0x4018aee1: "KVM_SET_DEVICE_ATTR",
    0x4018aee2: "KVM_GET_DEVICE_ATTR",
    0x4018aee3: "KVM_HAS_DEVICE_ATTR",
    0x0000ae80: "KVM_RUN",
    0x8090ae81: "KVM_GET_REGS",
    0x4090ae82: "KVM_SET_REGS",
    0x8138ae83: "KVM_GET_SREGS",
    0x4138ae84: "KVM_SET_SREGS",
    0xc018ae85: "KVM_TRANSLATE",
    0x4004ae86: "KVM_INTERRUPT",
    0xc008ae88: "KVM_GET_MSRS",
    0x4008ae89: "KVM_SET_MSRS",
    0x4008ae8a: "KVM_SET_CPUID",
    0x4004ae8b: "KVM_SET_SIGNAL_MASK",
    0x81a0ae8c: "KVM_GET_FPU",
    0x41a0ae8d: "KVM_SET_FPU",
    0x8400ae8e: "KVM_GET_LAPIC",
    0x4400ae8f: "KVM_SET_LAPIC",
    0x4008ae90: "KVM_SET_CPUID2",
    0xc008ae91: "KVM_GET_CPUID2",
    0xc028ae92: "KVM_TPR_ACCESS_REPORTING",
    0x4008ae93: "KVM_SET_VAPIC_ADDR",
    0x8004ae98: "KVM_GET_MP_STATE",
    0x4004ae99: "KVM_SET_MP_STATE",
    0x0000ae9a: "KVM_NMI",
    0x4048ae9b: "KVM_SET_GUEST_DEBUG",
    0x4008ae9c: "KVM_X86_SETUP_MCE",
    0x8008ae9d: "KVM_X86_GET_MCE_CAP_SUPPORTED",
    0x4040ae9e: "KVM_X86_SET_MCE",
    0x8040ae9f: "KVM_GET_VCPU_EVENTS",
    0x4040aea0: "KVM_SET_VCPU_EVENTS",
    0x8080aea1: "KVM_GET_DEBUGREGS",
    0x4080aea2: "KVM_SET_DEBUGREGS",
    0x9000aea4: "KVM_GET_XSAVE",
    0x5000aea5: "KVM_SET_XSAVE",
    0x8188aea6: "KVM_GET_XCRS",
    0x4188aea7: "KVM_SET_XCRS",
    0x0000aea2: "KVM_SET_TSC_KHZ",
    0x0000aea3: "KVM_GET_TSC_KHZ",
    0x4010aeab: "KVM_GET_ONE_REG",
    0x4010aeac: "KVM_SET_ONE_REG",
    0x0000aead: "KVM_KVMCLOCK_CTRL",
    0x0000aeb7: "KVM_SMI",
    0xc080aebe: "KVM_GET_NESTED_STATE",
    0x4080aebf: "KVM_SET_NESTED_STATE",
    0xc008aec1: "KVM_GET_SUPPORTED_HV_CPUID",
    0x0000aece: "KVM_GET_STATS_FD",
    0x9000aecf: "KVM_GET_XSAVE2",
    0xc008aeba: "KVM_MEMORY_ENCRYPT_OP",
    0x8140aecc: "KVM_GET_SREGS2",
    0x4140aecd: "KVM_SET_SREGS2",
}  # fmt: skip
"""Request number to name, for every KVMIO ioctl a VMM may issue on x86 (the recorder names what it traps)."""

TRACE_SKIPPED: Final[tuple[str, ...]] = ("KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS", "KVM_SIGNAL_MSI", "KVM_INTERRUPT")
"""Interrupt-injection ioctls, issued at device rate: the recorder's seccomp filter lets them run untrapped."""

KVM_X86_SETUP_MCE_TRACED: Final = 0x4008AE9C
"""KVM_X86_SETUP_MCE (``_IOW(KVMIO, 0x9c, __u64)``), which a faithful replay of a recording repeats on the live kernel."""
