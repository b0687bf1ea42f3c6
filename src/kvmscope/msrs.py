"""The MSR catalogue: names and indices, the feature-MSR set, the VMX range and field decoders.

Names follow the kernel's ``arch/x86/include/asm/msr-index.h``; lookups accept the kernel name
(``MSR_IA32_ARCH_CAPABILITIES``), the name without its ``MSR_``, ``MSR_IA32_`` or ``MSR_AMD64_`` prefix
(``IA32_ARCH_CAPABILITIES``, ``ARCH_CAPABILITIES``, ``PLATFORM_INFO``), a short alias (``ARCH_CAP``), an int, or a
string holding an int (``"0xce"``, ``"206"``). Case does not matter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import InvalidTypeError, InvalidValueError, MsrLookupError, shown

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# --- the feature MSRs (arch/x86/kvm/x86.c, v6.18) --------------------------------------------------------------------

MSR_IA32_UCODE_REV = 0x8B
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_PERF_CAPABILITIES = 0x345
MSR_PLATFORM_INFO = 0xCE
MSR_AMD64_DE_CFG = 0xC0011029

# KVM_FIRST_EMULATED_VMX_MSR .. KVM_LAST_EMULATED_VMX_MSR (5757f5b95622, v6.4): one range, 18 MSRs.
VMX_FIRST = 0x480
VMX_LAST = 0x491
VMX_RANGE = range(VMX_FIRST, VMX_LAST + 1)

# msr_based_features_all_except_vmx, in the kernel's order (9eb6ba31db27, v6.4; PLATFORM_INFO added by bc2ca3680b30).
GENERIC_FEATURE_MSRS: tuple[int, ...] = (
    MSR_AMD64_DE_CFG,
    MSR_IA32_UCODE_REV,
    MSR_IA32_ARCH_CAPABILITIES,
    MSR_IA32_PERF_CAPABILITIES,
    MSR_PLATFORM_INFO,
)


def is_feature_msr(index: int) -> bool:
    """True for every MSR the kernel may list in KVM_GET_MSR_FEATURE_INDEX_LIST (generic list or VMX range)."""
    return VMX_FIRST <= index <= VMX_LAST or index in GENERIC_FEATURE_MSRS


# --- decoders ------------------------------------------------------------------------------------------------------------

Fields = dict[str, int | bool]


def _bits(value: int, names: dict[int, str]) -> Fields:
    out: Fields = {}
    for bit, name in names.items():
        out[name] = bool(value >> bit & 1)
    unknown = value & ~sum(1 << b for b in names)
    if unknown:
        out["other_bits"] = unknown
    return out


# ARCH_CAP_* in arch/x86/include/asm/msr-index.h, and the Intel SDM for bits 9-12 and 16.
ARCH_CAPABILITIES_BITS: dict[int, str] = {
    0: "RDCL_NO",
    1: "IBRS_ALL",
    2: "RSBA",
    3: "SKIP_VMENTRY_L1DFLUSH",
    4: "SSB_NO",
    5: "MDS_NO",
    6: "PSCHANGE_MC_NO",
    7: "TSX_CTRL_MSR",
    8: "TAA_NO",
    9: "MCU_CONTROL",
    10: "MISC_PACKAGE_CTRLS",
    11: "ENERGY_FILTERING_CTL",
    12: "DOITM",
    13: "SBDR_SSDP_NO",
    14: "FBSDP_NO",
    15: "PSDP_NO",
    17: "FB_CLEAR",
    18: "FB_CLEAR_CTRL",
    19: "RRSBA",
    20: "BHI_NO",
    24: "PBRSB_NO",
    25: "GDS_CTRL",
    26: "GDS_NO",
    27: "RFDS_NO",
    28: "RFDS_CLEAR",
    62: "ITS_NO",
}


def decode_arch_capabilities(value: int) -> Fields:
    """Each named bit of IA32_ARCH_CAPABILITIES (0x10A)."""
    return _bits(value, ARCH_CAPABILITIES_BITS)


# PERF_CAP_* in arch/x86/include/asm/msr-index.h / perf_event.h.
PERF_CAP_LBR_FMT = 0x3F
PERF_CAP_PEBS_TRAP = 1 << 6
PERF_CAP_ARCH_REG = 1 << 7
PERF_CAP_PEBS_FORMAT = 0xF00
PERF_CAP_FREEZE_WHILE_SMM = 1 << 12
PERF_CAP_FW_WRITES = 1 << 13
PERF_CAP_PEBS_BASELINE = 1 << 14
PERF_CAP_PERF_METRICS = 1 << 15
PERF_CAP_PEBS_OUTPUT_PT = 1 << 16
PERF_CAP_PEBS_TIMING_INFO = 1 << 17


def decode_perf_capabilities(value: int) -> Fields:
    """IA32_PERF_CAPABILITIES (0x345): LBR format, PEBS fields, full-width writes, ..."""
    out: Fields = {
        "LBR_FMT": value & PERF_CAP_LBR_FMT,
        "PEBS_TRAP": bool(value & PERF_CAP_PEBS_TRAP),
        "PEBS_ARCH_REG": bool(value & PERF_CAP_ARCH_REG),
        "PEBS_FMT": (value & PERF_CAP_PEBS_FORMAT) >> 8,
        "FREEZE_WHILE_SMM": bool(value & PERF_CAP_FREEZE_WHILE_SMM),
        "FW_WRITES": bool(value & PERF_CAP_FW_WRITES),
        "PEBS_BASELINE": bool(value & PERF_CAP_PEBS_BASELINE),
        "PERF_METRICS": bool(value & PERF_CAP_PERF_METRICS),
        "PEBS_OUTPUT_PT": bool(value & PERF_CAP_PEBS_OUTPUT_PT),
        "PEBS_TIMING_INFO": bool(value & PERF_CAP_PEBS_TIMING_INFO),
    }
    other = value & ~((1 << 18) - 1)
    if other:
        out["other_bits"] = other
    return out


PLATFORM_INFO_CPUID_FAULT = 1 << 31


def decode_platform_info(value: int) -> Fields:
    """MSR_PLATFORM_INFO (0xCE): ratios and the CPUID_FAULT bit KVM emulates."""
    return {
        "MAX_NON_TURBO_RATIO": value >> 8 & 0xFF,
        "PROG_RATIO_LIMIT_TURBO": bool(value >> 28 & 1),
        "PROG_TDP_LIMIT": bool(value >> 29 & 1),
        "PROG_TJ_OFFSET": bool(value >> 30 & 1),
        "CPUID_FAULT": bool(value & PLATFORM_INFO_CPUID_FAULT),
        "MAX_EFFICIENCY_RATIO": value >> 40 & 0xFF,
    }


def decode_vmx_basic(value: int) -> Fields:
    """IA32_VMX_BASIC (0x480), per the SDM appendix A.1."""
    return {
        "REVISION_ID": value & 0x7FFFFFFF,
        "VMCS_SIZE": value >> 32 & 0x1FFF,
        "PHYS_ADDR_32BIT": bool(value >> 48 & 1),
        "DUAL_MONITOR_SMM": bool(value >> 49 & 1),
        "MEMORY_TYPE": value >> 50 & 0xF,
        "INOUT": bool(value >> 54 & 1),
        "TRUE_CTLS": bool(value >> 55 & 1),
        "NO_HW_ERROR_CODE_CC": bool(value >> 56 & 1),
    }


def decode_vmx_controls(value: int) -> Fields:
    """A VMX control capability MSR: allowed-0 settings (low half, must be 1) and allowed-1 (high half, may be 1)."""
    return {"ALLOWED_0": value & U32_MAX, "ALLOWED_1": value >> 32}


def cpu_vendor(vendor_string: str) -> str | None:
    """``"intel"`` or ``"amd"`` from a CPUID leaf 0 vendor string (Hygon decodes as AMD), else None."""
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "amd"}.get(vendor_string)


def decode_ucode_rev(value: int, vendor: str | None = None) -> Fields:
    """IA32_UCODE_REV (0x8B): Intel keeps the microcode revision in bits 63:32 (SDM vol. 3A 10.11.7); AMD the patch
    level in bits 31:0 (MSR_AMD64_PATCH_LEVEL, the same index). KVM's own defaults follow suit: VMX 0x100000000,
    SVM 0x01000065. Without a vendor both readings are given."""
    if vendor == "intel":
        return {"REVISION": value >> 32}
    if vendor == "amd":
        return {"PATCH_LEVEL": value & U32_MAX}
    return {"REVISION_INTEL": value >> 32, "PATCH_LEVEL_AMD": value & U32_MAX}


def decode_de_cfg(value: int) -> Fields:
    """AMD DE_CFG (0xC0011029): KVM only knows LFENCE_SERIALIZE (bit 1)."""
    return _bits(value, {1: "LFENCE_SERIALIZE"})


# --- the catalogue ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Msr:
    """One MSR: its index, the kernel's name, aliases, and a decoder for its fields where kvmscope has one."""

    index: int
    name: str
    aliases: tuple[str, ...] = ()
    decoder: Callable[[int], Fields] | None = field(default=None, compare=False)

    @property
    def feature(self) -> bool:
        return is_feature_msr(self.index)

    def decode(self, value: int, vendor: str | None = None) -> Fields:
        """The named fields of ``value``; ``vendor`` (``"intel"``/``"amd"``) picks the reading where they differ."""
        if self.index == MSR_IA32_UCODE_REV:
            return decode_ucode_rev(value, vendor)
        return self.decoder(value) if self.decoder else {}

    def __str__(self) -> str:
        return f"{self.name} (0x{self.index:x})"


_CATALOGUE: list[Msr] = [
    # The generic feature MSRs.
    Msr(MSR_IA32_UCODE_REV, "MSR_IA32_UCODE_REV", ("UCODE_REV",)),
    Msr(MSR_IA32_ARCH_CAPABILITIES, "MSR_IA32_ARCH_CAPABILITIES", ("ARCH_CAP", "ARCH_CAPS"), decode_arch_capabilities),
    Msr(MSR_IA32_PERF_CAPABILITIES, "MSR_IA32_PERF_CAPABILITIES", ("PERF_CAP", "PERF_CAPS"), decode_perf_capabilities),
    Msr(MSR_PLATFORM_INFO, "MSR_PLATFORM_INFO", (), decode_platform_info),
    Msr(MSR_AMD64_DE_CFG, "MSR_AMD64_DE_CFG", ("DE_CFG", "MSR_F10H_DECFG", "F10H_DECFG"), decode_de_cfg),
    # The VMX capability MSRs, 0x480-0x491.
    Msr(0x480, "MSR_IA32_VMX_BASIC", ("VMX_BASIC",), decode_vmx_basic),
    Msr(0x481, "MSR_IA32_VMX_PINBASED_CTLS", ("VMX_PINBASED_CTLS",), decode_vmx_controls),
    Msr(0x482, "MSR_IA32_VMX_PROCBASED_CTLS", ("VMX_PROCBASED_CTLS",), decode_vmx_controls),
    Msr(0x483, "MSR_IA32_VMX_EXIT_CTLS", ("VMX_EXIT_CTLS",), decode_vmx_controls),
    Msr(0x484, "MSR_IA32_VMX_ENTRY_CTLS", ("VMX_ENTRY_CTLS",), decode_vmx_controls),
    Msr(0x485, "MSR_IA32_VMX_MISC", ("VMX_MISC",)),
    Msr(0x486, "MSR_IA32_VMX_CR0_FIXED0", ("VMX_CR0_FIXED0",)),
    Msr(0x487, "MSR_IA32_VMX_CR0_FIXED1", ("VMX_CR0_FIXED1",)),
    Msr(0x488, "MSR_IA32_VMX_CR4_FIXED0", ("VMX_CR4_FIXED0",)),
    Msr(0x489, "MSR_IA32_VMX_CR4_FIXED1", ("VMX_CR4_FIXED1",)),
    Msr(0x48A, "MSR_IA32_VMX_VMCS_ENUM", ("VMX_VMCS_ENUM",)),
    Msr(0x48B, "MSR_IA32_VMX_PROCBASED_CTLS2", ("VMX_PROCBASED_CTLS2",), decode_vmx_controls),
    Msr(0x48C, "MSR_IA32_VMX_EPT_VPID_CAP", ("VMX_EPT_VPID_CAP",)),
    Msr(0x48D, "MSR_IA32_VMX_TRUE_PINBASED_CTLS", ("VMX_TRUE_PINBASED_CTLS",), decode_vmx_controls),
    Msr(0x48E, "MSR_IA32_VMX_TRUE_PROCBASED_CTLS", ("VMX_TRUE_PROCBASED_CTLS",), decode_vmx_controls),
    Msr(0x48F, "MSR_IA32_VMX_TRUE_EXIT_CTLS", ("VMX_TRUE_EXIT_CTLS",), decode_vmx_controls),
    Msr(0x490, "MSR_IA32_VMX_TRUE_ENTRY_CTLS", ("VMX_TRUE_ENTRY_CTLS",), decode_vmx_controls),
    Msr(0x491, "MSR_IA32_VMX_VMFUNC", ("VMX_VMFUNC",)),
    # Architectural and KVM MSRs seen in KVM_GET_MSR_INDEX_LIST (msrs_to_save and emulated_msrs).
    Msr(0x10, "MSR_IA32_TSC", ("TSC",)),
    Msr(0x11, "MSR_KVM_WALL_CLOCK"),
    Msr(0x12, "MSR_KVM_SYSTEM_TIME"),
    Msr(0x1B, "MSR_IA32_APICBASE", ("APIC_BASE",)),
    Msr(0x34, "MSR_SMI_COUNT"),
    Msr(0x3A, "MSR_IA32_FEAT_CTL", ("IA32_FEATURE_CONTROL", "FEATURE_CONTROL")),
    Msr(0x3B, "MSR_IA32_TSC_ADJUST", ("TSC_ADJUST",)),
    Msr(0x48, "MSR_IA32_SPEC_CTRL", ("SPEC_CTRL",)),
    Msr(0x49, "MSR_IA32_PRED_CMD", ("PRED_CMD",)),
    Msr(0x9E, "MSR_IA32_SMBASE", ("SMBASE",)),
    Msr(0x122, "MSR_IA32_TSX_CTRL", ("TSX_CTRL",)),
    Msr(0x140, "MSR_MISC_FEATURES_ENABLES", ("MISC_FEATURES_ENABLES",)),
    Msr(0x174, "MSR_IA32_SYSENTER_CS", ("SYSENTER_CS",)),
    Msr(0x175, "MSR_IA32_SYSENTER_ESP", ("SYSENTER_ESP",)),
    Msr(0x176, "MSR_IA32_SYSENTER_EIP", ("SYSENTER_EIP",)),
    Msr(0x179, "MSR_IA32_MCG_CAP", ("MCG_CAP",)),
    Msr(0x17A, "MSR_IA32_MCG_STATUS", ("MCG_STATUS",)),
    Msr(0x17B, "MSR_IA32_MCG_CTL", ("MCG_CTL",)),
    Msr(0x1A0, "MSR_IA32_MISC_ENABLE", ("MISC_ENABLE",)),
    Msr(0x1D9, "MSR_IA32_DEBUGCTLMSR", ("DEBUGCTL", "IA32_DEBUGCTL")),
    Msr(0x1DB, "MSR_IA32_LASTBRANCHFROMIP", ("LASTBRANCHFROMIP",)),
    Msr(0x1DC, "MSR_IA32_LASTBRANCHTOIP", ("LASTBRANCHTOIP",)),
    Msr(0x1DD, "MSR_IA32_LASTINTFROMIP", ("LASTINTFROMIP",)),
    Msr(0x1DE, "MSR_IA32_LASTINTTOIP", ("LASTINTTOIP",)),
    Msr(0x1FC, "MSR_IA32_POWER_CTL", ("POWER_CTL",)),
    Msr(0x277, "MSR_IA32_CR_PAT", ("PAT", "IA32_PAT")),
    # AMX's XFD (5.17) and CET's MSRs (6.18), which KVM lists from those releases (rulesets.MSR_ARRIVALS)
    Msr(0x1C4, "MSR_IA32_XFD", ("XFD", "IA32_XFD")),
    Msr(0x1C5, "MSR_IA32_XFD_ERR", ("XFD_ERR", "IA32_XFD_ERR")),
    Msr(0x6A0, "MSR_IA32_U_CET", ("U_CET", "IA32_U_CET")),
    Msr(0x6A2, "MSR_IA32_S_CET", ("S_CET", "IA32_S_CET")),
    *(Msr(0x6A4 + n, f"MSR_IA32_PL{n}_SSP", (f"PL{n}_SSP", f"IA32_PL{n}_SSP")) for n in range(4)),
    Msr(0x6A8, "MSR_IA32_INT_SSP_TAB", ("INT_SSP_TAB", "IA32_INT_SSP_TAB")),
    # The MTRRs (KVM emulates them, arch/x86/kvm/mtrr.c; Firecracker writes MTRRdefType at boot).
    Msr(0xFE, "MSR_MTRRcap", ("MTRRCAP", "IA32_MTRRCAP")),
    Msr(0x2FF, "MSR_MTRRdefType", ("MTRR_DEF_TYPE", "IA32_MTRR_DEF_TYPE")),
    *(Msr(0x200 + 2 * n + half, f"MSR_MTRRphys{kind}{n}", (f"IA32_MTRR_PHYS{kind.upper()}{n}",))
      for n in range(10) for half, kind in ((0, "Base"), (1, "Mask"))),
    Msr(0x250, "MSR_MTRRfix64K_00000"),
    Msr(0x258, "MSR_MTRRfix16K_80000"),
    Msr(0x259, "MSR_MTRRfix16K_A0000"),
    Msr(0x268, "MSR_MTRRfix4K_C0000"),
    Msr(0x269, "MSR_MTRRfix4K_C8000"),
    Msr(0x26A, "MSR_MTRRfix4K_D0000"),
    Msr(0x26B, "MSR_MTRRfix4K_D8000"),
    Msr(0x26C, "MSR_MTRRfix4K_E0000"),
    Msr(0x26D, "MSR_MTRRfix4K_E8000"),
    Msr(0x26E, "MSR_MTRRfix4K_F0000"),
    Msr(0x26F, "MSR_MTRRfix4K_F8000"),
    # The PMU MSRs KVM lists (msrs_to_save_pmu; the counters KVM_GET_MSR_INDEX_LIST gives depend on the host's PMU)
    *(Msr(0xC1 + n, f"MSR_IA32_PERFCTR{n}", (f"IA32_PMC{n}", f"PMC{n}")) for n in range(8)),
    *(Msr(0x186 + n, f"MSR_P6_EVNTSEL{n}", (f"IA32_PERFEVTSEL{n}", f"PERFEVTSEL{n}")) for n in range(8)),
    *(Msr(0x309 + n, f"MSR_CORE_PERF_FIXED_CTR{n}", (f"IA32_FIXED_CTR{n}", f"FIXED_CTR{n}")) for n in range(3)),
    Msr(0x38D, "MSR_CORE_PERF_FIXED_CTR_CTRL", ("IA32_FIXED_CTR_CTRL", "FIXED_CTR_CTRL")),
    Msr(0x38E, "MSR_CORE_PERF_GLOBAL_STATUS", ("IA32_PERF_GLOBAL_STATUS", "PERF_GLOBAL_STATUS")),
    Msr(0x38F, "MSR_CORE_PERF_GLOBAL_CTRL", ("IA32_PERF_GLOBAL_CTRL", "PERF_GLOBAL_CTRL")),
    Msr(0x390, "MSR_CORE_PERF_GLOBAL_OVF_CTRL", ("IA32_PERF_GLOBAL_OVF_CTRL", "PERF_GLOBAL_OVF_CTRL")),
    Msr(0x3F1, "MSR_IA32_PEBS_ENABLE", ("PEBS_ENABLE",)),
    Msr(0x3F2, "MSR_PEBS_DATA_CFG", ("PEBS_DATA_CFG",)),
    Msr(0x600, "MSR_IA32_DS_AREA", ("DS_AREA",)),
    # Hyper-V's synthetic MSRs that KVM lists with CONFIG_KVM_HYPERV (emulated_msrs_all; hyperv-tlfs.h names)
    *(Msr(i, f"HV_X64_MSR_{n}") for i, n in (
        (0x40000000, "GUEST_OS_ID"), (0x40000001, "HYPERCALL"), (0x40000002, "VP_INDEX"), (0x40000003, "RESET"),
        (0x40000010, "VP_RUNTIME"), (0x40000020, "TIME_REF_COUNT"), (0x40000021, "REFERENCE_TSC"),
        (0x40000022, "TSC_FREQUENCY"), (0x40000023, "APIC_FREQUENCY"), (0x40000073, "VP_ASSIST_PAGE"),
        (0x40000080, "SCONTROL"), (0x400000B0, "STIMER0_CONFIG"), (0x400000F1, "SYNDBG_CONTROL"),
        (0x400000F2, "SYNDBG_STATUS"), (0x400000F3, "SYNDBG_SEND_BUFFER"), (0x400000F4, "SYNDBG_RECV_BUFFER"),
        (0x400000F5, "SYNDBG_PENDING_BUFFER"), (0x400000FF, "SYNDBG_OPTIONS"),
        *((0x40000100 + n, f"CRASH_P{n}") for n in range(5)), (0x40000105, "CRASH_CTL"),
        (0x40000106, "REENLIGHTENMENT_CONTROL"), (0x40000107, "TSC_EMULATION_CONTROL"),
        (0x40000108, "TSC_EMULATION_STATUS"), (0x40000118, "TSC_INVARIANT_CONTROL"))),
    # AMD's PMU MSRs KVM lists (the legacy K7 counters and the F15H interleaved ones, PerfMonV2's globals)
    *(Msr(0xC0010000 + n, f"MSR_K7_EVNTSEL{n}", (f"K7_EVNTSEL{n}",)) for n in range(4)),
    *(Msr(0xC0010004 + n, f"MSR_K7_PERFCTR{n}", (f"K7_PERFCTR{n}",)) for n in range(4)),
    *(Msr(0xC0010200 + 2 * n + half, f"MSR_F15H_PERF_{kind}{n}", (f"F15H_PERF_{kind}{n}",))
      for n in range(6) for half, kind in ((0, "CTL"), (1, "CTR"))),
    Msr(0xC0000300, "MSR_AMD64_PERF_CNTR_GLOBAL_STATUS", ("PERF_CNTR_GLOBAL_STATUS",)),
    Msr(0xC0000301, "MSR_AMD64_PERF_CNTR_GLOBAL_CTL", ("PERF_CNTR_GLOBAL_CTL",)),
    Msr(0xC0000302, "MSR_AMD64_PERF_CNTR_GLOBAL_STATUS_CLR", ("PERF_CNTR_GLOBAL_STATUS_CLR",)),
    Msr(0xC0000303, "MSR_AMD64_PERF_CNTR_GLOBAL_STATUS_SET", ("PERF_CNTR_GLOBAL_STATUS_SET",)),
    Msr(0x4D0, "MSR_IA32_MCG_EXT_CTL", ("MCG_EXT_CTL",)),
    Msr(0x6E0, "MSR_IA32_TSC_DEADLINE", ("TSC_DEADLINE",)),
    Msr(0xC0000080, "MSR_EFER", ("EFER", "IA32_EFER")),
    Msr(0xC0000081, "MSR_STAR", ("STAR",)),
    Msr(0xC0000082, "MSR_LSTAR", ("LSTAR",)),
    Msr(0xC0000083, "MSR_CSTAR", ("CSTAR",)),
    Msr(0xC0000084, "MSR_SYSCALL_MASK", ("SYSCALL_MASK", "FMASK")),
    Msr(0xC0000100, "MSR_FS_BASE", ("FS_BASE",)),
    Msr(0xC0000101, "MSR_GS_BASE", ("GS_BASE",)),
    Msr(0xC0000102, "MSR_KERNEL_GS_BASE", ("KERNEL_GS_BASE",)),
    Msr(0xC0000103, "MSR_TSC_AUX", ("TSC_AUX",)),
    Msr(0xC0010015, "MSR_K7_HWCR", ("HWCR", "K7_HWCR")),
    Msr(0xC001011F, "MSR_AMD64_VIRT_SPEC_CTRL", ("VIRT_SPEC_CTRL",)),
    Msr(0xC0010117, "MSR_VM_HSAVE_PA", ("VM_HSAVE_PA",)),
    Msr(0x4B564D00, "MSR_KVM_WALL_CLOCK_NEW"),
    Msr(0x4B564D01, "MSR_KVM_SYSTEM_TIME_NEW"),
    Msr(0x4B564D02, "MSR_KVM_ASYNC_PF_EN"),
    Msr(0x4B564D03, "MSR_KVM_STEAL_TIME"),
    Msr(0x4B564D04, "MSR_KVM_PV_EOI_EN"),
    Msr(0x4B564D05, "MSR_KVM_POLL_CONTROL"),
    Msr(0x4B564D06, "MSR_KVM_ASYNC_PF_INT"),
    Msr(0x4B564D07, "MSR_KVM_ASYNC_PF_ACK"),
]

BY_INDEX: dict[int, Msr] = {m.index: m for m in _CATALOGUE}


# Prefixes a user may leave out: MSR_IA32_ARCH_CAPABILITIES is also IA32_ARCH_CAPABILITIES and ARCH_CAPABILITIES.
_PREFIXES = ("MSR_IA32_", "MSR_AMD64_", "MSR_", "IA32_")


def _keys(m: Msr) -> Iterable[str]:
    todo = [n.upper() for n in (m.name, *m.aliases)]
    while todo:
        key = todo.pop()
        yield key
        todo.extend(key[len(p):] for p in _PREFIXES if key.startswith(p) and len(key) > len(p))


def _by_name() -> dict[str, Msr]:
    out: dict[str, Msr] = {}
    for m in _CATALOGUE:
        for key in _keys(m):
            # A short form two MSRs share would be a guess: the first (generic) one keeps it, and the test names any.
            out.setdefault(key, m)
    return out


BY_NAME: dict[str, Msr] = _by_name()


def catalogue() -> list[Msr]:
    """Every MSR kvmscope knows by name, in index order."""
    return sorted(_CATALOGUE, key=lambda m: m.index)


def check_index(index: int) -> int:
    """Return ``index`` if it is a valid 32-bit MSR index, else raise :class:`InvalidValueError`."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidTypeError(f"MSR index must be an int, not {type(index).__name__} ({index!r:.60})")
    if not 0 <= index <= U32_MAX:
        raise InvalidValueError(f"MSR index {index:#x} is outside 0..0xffffffff")
    return index


def check_value(value: int, what: str = "MSR value") -> int:
    """Return ``value`` if it fits in 64 bits unsigned, else raise :class:`InvalidValueError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{what} must be an int, not {type(value).__name__} ({value!r:.60})")
    if not 0 <= value <= U64_MAX:
        raise InvalidValueError(f"{what} {value:#x} is outside 0..0xffffffffffffffff (64 bits)")
    return value


_NUMBER = re.compile(r"[+-]?(0x[0-9a-f]+(_[0-9a-f]+)*|0b[01]+(_[01]+)*|0o[0-7]+(_[0-7]+)*|[0-9]+(_[0-9]+)*)", re.I)


def is_number(text: str) -> bool:
    """Whether ``text`` is written as :func:`parse_int` reads a number (its range aside)."""
    return bool(_NUMBER.fullmatch(text.strip()))


def parse_int(text: str, what: str = "value") -> int:
    """An integer written as hex (``0x10a``), decimal (``266``), binary (``0b1``) or octal (``0o7``); anything else is an
    :class:`InvalidValueError` that says what was expected."""
    s = text.strip()
    if len(s) > 100 or not _NUMBER.fullmatch(s):
        if len(s) > 100 and _NUMBER.fullmatch(s):
            raise InvalidValueError(f"{what} {shown(text)} is a number too long to be one: expected at most 100 "
                                    "characters (the largest 64-bit value is 0xffffffffffffffff)")
        raise InvalidValueError(f"{what} {shown(text)} is not a number: expected hex such as 0x80000000 or decimal")
    digits = s.lstrip("+-")
    # int(x, 0) refuses decimal with leading zeros ("010"); read those as decimal, as a user means them.
    plain = digits.replace("_", "")
    value = int(plain, 10) if plain.isdigit() else int(digits, 0)
    return -value if s.startswith("-") else value


def parse_value(text: str, what: str = "MSR value") -> int:
    """An MSR value from the command line: :func:`parse_int`, then 0..2**64-1."""
    return check_value(parse_int(text, what), what)


def index_of(msr: int | str) -> int:
    """The index of an MSR given by index, name, alias or numeric string."""
    if isinstance(msr, str):
        key = msr.strip().upper()
        found = BY_NAME.get(key)
        if found is not None:
            return found.index
        if _NUMBER.fullmatch(key):
            return check_index(parse_int(key, "MSR index"))
        import difflib  # here: only a misspelt name needs it (and it maps _heapq into every kvmscope process)

        close = difflib.get_close_matches(key, BY_NAME.keys(), n=3, cutoff=0.6) if len(key) <= 100 else []
        hint = (f"; did you mean {', '.join(close)}?" if close else
                "; expected a name such as MSR_PLATFORM_INFO or PLATFORM_INFO, or an index such as 0xce "
                "(`kvmscope msrs` lists them)")
        raise MsrLookupError(f"unknown MSR name {shown(msr)}{hint}")
    return check_index(msr)


def lookup(msr: int | str) -> Msr:
    """The catalogue entry for an MSR; an index kvmscope has no name for gets ``MSR_0x<index>``."""
    index = index_of(msr)
    return BY_INDEX.get(index) or Msr(index, f"MSR_{index:#x}")


def name_of(index: int) -> str:
    """The kernel name of an MSR index, or ``MSR_0x<index>``."""
    m = BY_INDEX.get(index)
    return m.name if m else f"MSR_{index:#x}"
