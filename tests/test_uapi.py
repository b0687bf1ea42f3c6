"""The ABI in kvmscope.uapi against linux/kvm.h, checked by compiling a C program (no /dev/kvm needed)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmscope import uapi

HEADER = Path("/usr/include/linux/kvm.h")

SIZES = ["kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_regs", "kvm_sregs",
         "kvm_segment", "kvm_dtable", "kvm_userspace_memory_region", "kvm_enable_cap", "kvm_run",
         "kvm_msr_filter_range", "kvm_msr_filter", "kvm_pic_state", "kvm_ioapic_state", "kvm_irqchip", "kvm_irq_level",
         "kvm_pit_config", "kvm_pit_channel_state", "kvm_pit_state2", "kvm_msi", "kvm_irq_routing_irqchip",
         "kvm_irq_routing_msi", "kvm_irq_routing_entry", "kvm_irq_routing", "kvm_irqfd", "kvm_ioeventfd", "kvm_dirty_log",
         "kvm_clock_data", "kvm_coalesced_mmio_zone", "kvm_lapic_state", "kvm_fpu", "kvm_xsave", "kvm_xcr", "kvm_xcrs",
         "kvm_debugregs", "kvm_vcpu_events", "kvm_mp_state", "kvm_nested_state", "kvm_guest_debug_arch",
         "kvm_guest_debug", "kvm_translation", "kvm_interrupt", "kvm_signal_mask"]
IOCTLS = [name for name in uapi.IOCTL_NAMES.values()]
CONSTANTS = [n for n in dir(uapi) if n.startswith(("KVM_EXIT_", "KVM_CAP_", "KVM_X86_QUIRK_", "KVM_MSR_EXIT_REASON_",
                                                   "KVM_SYSTEM_EVENT_", "KVM_MSR_FILTER_", "KVM_MEM_",
                                                   "KVM_IRQCHIP_", "KVM_PIT_", "KVM_MSI_", "KVM_IRQ_ROUTING_",
                                                   "KVM_IRQFD_", "KVM_IOEVENTFD_", "KVM_CLOCK_", "KVM_VCPUEVENT_",
                                                   "KVM_X86_SHADOW_", "KVM_MP_STATE_", "KVM_STATE_NESTED_",
                                                   "KVM_GUESTDBG_", "KVM_IOAPIC_", "KVM_APIC_", "KVM_MAX_XCRS", "KVM_RUN_X86_"))
             and isinstance(getattr(uapi, n), int)]
OFFSETS = [("kvm_run", "request_interrupt_window"), ("kvm_run", "immediate_exit"),
           ("kvm_run", "ready_for_interrupt_injection"), ("kvm_run", "if_flag"), ("kvm_run", "flags"),
           ("kvm_run", "cr8"), ("kvm_run", "apic_base"), ("kvm_run", "exit_reason"), ("kvm_run", "io"), ("kvm_run", "mmio"),
           ("kvm_run", "fail_entry"), ("kvm_run", "internal"), ("kvm_run", "system_event"), ("kvm_run", "msr"),
           ("kvm_run", "kvm_valid_regs"), ("kvm_run", "s"), ("kvm_sregs", "cr0"), ("kvm_sregs", "efer"),
           ("kvm_sregs", "interrupt_bitmap")]
# The members of the save/restore structs whose layout is not plain (unions, nested structs, padding).
OFFSETS += [("kvm_irqchip", "chip"), ("kvm_ioapic_state", "redirtbl"), ("kvm_pit_state2", "flags"),
            ("kvm_pit_channel_state", "count_load_time"), ("kvm_irq_routing_entry", "u"), ("kvm_ioeventfd", "fd"),
            ("kvm_ioeventfd", "flags"), ("kvm_dirty_log", "dirty_bitmap"), ("kvm_clock_data", "realtime"),
            ("kvm_clock_data", "host_tsc"), ("kvm_coalesced_mmio_zone", "pio"), ("kvm_fpu", "fcw"), ("kvm_fpu", "last_ip"),
            ("kvm_fpu", "xmm"), ("kvm_fpu", "mxcsr"), ("kvm_xcrs", "xcrs"), ("kvm_xcrs", "padding"),
            ("kvm_debugregs", "dr6"), ("kvm_debugregs", "flags"), ("kvm_vcpu_events", "interrupt"),
            ("kvm_vcpu_events", "nmi"), ("kvm_vcpu_events", "sipi_vector"), ("kvm_vcpu_events", "flags"),
            ("kvm_vcpu_events", "smi"), ("kvm_vcpu_events", "exception_has_payload"),
            ("kvm_vcpu_events", "exception_payload"), ("kvm_nested_state", "hdr"), ("kvm_guest_debug", "arch"),
            ("kvm_translation", "valid"), ("kvm_msi", "devid")]
# Members whose C name differs from ours: (struct, C member, our member).
RENAMED = {("kvm_vcpu_events", "triple_fault"): "triple_fault_pending"}
OFFSETS += [("kvm_vcpu_events", "triple_fault")]
# Every member of the kvm_run exits that kvmscope.linux reads from the mapping (struct formats derived from these).
OFFSETS += [("kvm_run", f"{union}.{f[0]}") for union, cls in uapi.kvm_run_exit._fields_ if isinstance(cls, type)
            and issubclass(cls, ctypes.Structure) for f in cls._fields_ if f[0] != "pad"]


@pytest.fixture(scope="module")
def header_values() -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not HEADER.exists():
        pytest.skip("needs a C compiler and linux/kvm.h (Debian: gcc, linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for s in SIZES:
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for name in CONSTANTS:
        lines.append(f'#ifdef {name}\nprintf("{name} %lld\\n", (long long){name});\n#endif')
    for struct, member in OFFSETS:
        lines.append(f'printf("offsetof {struct}.{member} %zu\\n", offsetof(struct {struct}, {member}));')
    lines += ["return 0;", "}"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "abi.c"
        src.write_text("\n".join(lines))
        subprocess.run([cc, "-o", str(Path(tmp) / "abi"), str(src)], check=True, capture_output=True)
        out = subprocess.run([str(Path(tmp) / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    return values


@pytest.mark.parametrize("name", SIZES)
def test_struct_size_matches_header(header_values: dict[str, int], name: str) -> None:
    ours = ctypes.sizeof(getattr(uapi, name))
    assert ours == header_values[f"sizeof {name}"], (
        f"sizeof(struct {name}): kvm.h says {header_values[f'sizeof {name}']}, kvmscope.uapi has {ours}")


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_header(header_values: dict[str, int], name: str) -> None:
    assert getattr(uapi, name) == header_values[name], (
        f"{name}: kvm.h says {header_values[name]:#x}, kvmscope.uapi has {getattr(uapi, name):#x}")


def test_constants_match_header(header_values: dict[str, int]) -> None:
    checked = [n for n in CONSTANTS if n in header_values]
    assert len(checked) > 30, f"expected most constants to be in kvm.h, found only {checked}"
    wrong = {n: (getattr(uapi, n), header_values[n]) for n in checked if getattr(uapi, n) != header_values[n]}
    assert not wrong, f"constants differing from kvm.h (kvmscope, header): {wrong}"


@pytest.mark.parametrize("struct,member", OFFSETS)
def test_offsets_match_header(header_values: dict[str, int], struct: str, member: str) -> None:
    cls = getattr(uapi, struct)
    union, _, inner = member.partition(".")
    if union in ("io", "mmio", "fail_entry", "internal", "system_event", "msr"):
        ours = cls.exit.offset + (getattr(dict(uapi.kvm_run_exit._fields_)[union], inner).offset if inner else 0)
    else:
        ours = getattr(cls, RENAMED.get((struct, member), member)).offset
    expected = header_values[f"offsetof {struct}.{member}"]
    assert ours == expected, f"offsetof({struct}, {member}): kvm.h says {expected}, kvmscope.uapi has {ours}"


def test_stuff_feature_msrs_quirk_value() -> None:
    # Not in this machine's 6.1 headers: added in v6.13 (dcb988cdac85) as BIT(8).
    assert uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS == 0x100


def test_every_capability_of_the_header_has_its_name() -> None:
    # A traced KVM_CHECK_EXTENSION or a template's kvm_capabilities names the capability, not "capability 203".
    import re

    header = Path("/usr/include/linux/kvm.h")
    if not header.is_file():
        pytest.skip("needs <linux/kvm.h> (linux-libc-dev)")
    caps = {int(v): n for n, v in re.findall(r"^#define (KVM_CAP_\w+)\s+(\d+)\b", header.read_text(), re.M)}
    missing = {v: n for v, n in caps.items() if uapi.CAPABILITY_NAMES.get(v) != n}
    assert not missing, f"capabilities of {header} without their name in uapi: {missing}"
