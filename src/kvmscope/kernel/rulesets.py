"""Kernel versions as data: each rule names the kernel version (and stable releases) that brought it and its commit.

A :class:`Ruleset` is the set of rules in force at one kernel version, computed from the rules' own versions: a new
kernel behaviour is one :class:`Rule` line, a stable backport one entry in its ``stable`` tuple.

Sources: the kernel commits named below, read in ``arch/x86/kvm/x86.c`` (CachyOS/linux @4703912f5e30, 6.18+),
``vmx/nested.c``, ``vmx/vmx.c``, ``svm/svm.c`` and ``cpuid.c``; see docs/rules.md for the rule table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from ..errors import InvalidValueError, shown
from . import emulated
from .rule import AFTER_KNOWN
from .rule import OLDEST as OLDEST
from .rule import Rule as Rule
from .rule import Version as Version
from .rule import label as _label
from .rule import parse_version as parse_version

# Long-term kernels fleets run and migrate from: each is a ruleset of its own even where no rule changed in it. Sources
# read for them: Debian's linux-source 5.10.262, 6.1.192 and 6.12.118 trees; 5.15 and 6.6 from mainline history and the
# stable lists (docs/rules.md says which cells are inferred).
LTS: tuple[str, ...] = ("5.10", "5.15", "6.1", "6.6", "6.12")


# --- behaviours that change with the kernel version -------------------------------------------------------------------
FREEZE = Rule("freeze", "6.4", "0094f62c7eaa",
              "KVM: x86: Disallow writes to immutable feature MSRs after KVM_RUN",
              "write feature MSRs before the first KVM_RUN; after it, write only the value the vCPU already "
              "has (read it back with KVM_GET_MSRS)")
SAME_VALUE_REAL_WRITE = Rule("same_value_real_write", "6.10", "1d294dfaba8c",
                             "KVM: x86: Allow, don't ignore, same-value writes to immutable MSRs")
UNSUPPORTED_ZERO = Rule("unsupported_zero", "6.12", "64a5d7a1091f",
                        "KVM: x86: Suppress failures on userspace access to advertised, unsupported MSRs")
PLATFORM_INFO_IMMUTABLE = Rule("platform_info_immutable", "6.13", "bc2ca3680b30",
                               "KVM: x86: Disallow changing MSR_PLATFORM_INFO after vCPU has run",
                               "set MSR_PLATFORM_INFO before the first KVM_RUN (immutable after it since 6.13)")
STUFF_QUIRK = Rule("stuff_quirk", "6.13", "dcb988cdac85",
                   "KVM: x86: Quirk initialization of feature MSRs to KVM's max configuration",
                   # 6.12.78 took the series as a Stable-dep-of e2ffe85b6d2b, without bc2ca3680b30, d75cac366f44,
                   # a5d563890b8f, a1039111192b or 1ded7a57b805 (6.12.118 x86.c:439-444, 3370-3390, 3688-3694)
                   stable=("6.12.78",))
QUIRKS2 = Rule("disable_quirks2", "5.18", "6d8491910fcd",
               "KVM_CAP_DISABLE_QUIRKS2 reports the quirks a VMM may disable and refuses unknown ones",
               "before 5.18 only KVM_CAP_DISABLE_QUIRKS exists (bits 0-4)")
SLOT_ZAP_ALL_QUIRK = Rule("slot_zap_all_quirk", "6.12", "aa8d1f48d353",
                          "KVM: x86/mmu: Introduce a quirk to control memslot zap behavior (quirk bit 7)")
PERF_CAP_NEEDS_PDCM = Rule("perf_cap_needs_pdcm", "6.13", "d75cac366f44",
                           "KVM: x86: Reject userspace attempts to access PERF_CAPABILITIES w/o PDCM",
                           "set CPUID.1:ECX[15] (PDCM) with KVM_SET_CPUID2 before writing it, or write 0")
ARCH_CAP_NEEDS_CPUID = Rule("arch_cap_needs_cpuid", "6.13", "a5d563890b8f",
                            "KVM: x86: Reject userspace attempts to access ARCH_CAPABILITIES w/o support",
                            "set CPUID.7.0:EDX[29] (ARCH_CAPABILITIES) with KVM_SET_CPUID2 before writing it, or "
                            "write 0")
PLATFORM_INFO_ORDER_CHECK = Rule("platform_info_no_order_check", "< 5.10", "kvm_set_msr_common",
                                 "PLATFORM_INFO.CPUID_FAULT cannot be cleared while MISC_FEATURES_ENABLES.CPUID_FAULT "
                                 "is set", "set PLATFORM_INFO.CPUID_FAULT before enabling "
                                 "MISC_FEATURES_ENABLES.CPUID_FAULT", until="6.13", removed_by="1ded7a57b805")
PERF_CAP_PMU_VERSION = Rule("perf_cap_pmu_version", "5.12", "c646236344e9",
                            "vmx_set_msr: a non-zero PERF_CAPABILITIES needs a PMU version > 0 in CPUID.0xA "
                            "(absent in 5.10.262 vmx.c; 6.1.192 vmx.c:2401, 6.12.118 vmx.c:2488)",
                            until="6.13", removed_by="a1039111192b")
PEBS_TIMING_INFO = Rule("pebs_timing_info", "6.18", "PERF_CAP_PEBS_MASK",
                        "PERF_CAP_PEBS_MASK includes PEBS_TIMING_INFO (bit 17)")
# --- what KVM's PERF_CAPABILITIES (vmx_get_perf_capabilities) takes from the host's, by release: a host profile names
# the ones that change its value in its "history" (intel-spr: 0x2000 on 5.10 and 6.1.29+, 0x203f 5.12-6.2, 0x64ff on
# 6.3, 0x64c0 6.4-6.8, 0x24c0 from 6.9; docs/profiles-derived.md; 5.10.262 vmx/capabilities.h:372-379, 6.1.192
# vmx.c:7772-7817, 6.12.118 vmx.c:7905-7957)
PERF_CAP_LBR_FMT = Rule("perf_cap_lbr_fmt", "5.12", "be635e34c284",
                        "KVM: vmx/pmu: Expose LBR_FMT in the MSR_IA32_PERF_CAPABILITIES (the host's LBR format, "
                        "bits 5:0; 5.10 reports FULL_WIDTH_WRITES alone)")
PERF_CAP_NO_LEGACY_LBR = Rule("perf_cap_no_legacy_lbr", "6.4", "098f4c061ea1",
                              "KVM: x86/pmu: Disallow legacy LBRs if architectural LBRs are available (no LBR format "
                              "in PERF_CAPABILITIES on an arch-LBR host)", stable=("6.1.29",))
PEBS_EPT_SPR = Rule("pebs_ept_spr", "6.3", "13738a364736",
                    "perf/x86/intel: Expose EPT-friendly PEBS for SPR and future models (KVM offers PEBS, its "
                    "PERF_CAPABILITIES fields and CPUID DS and DTES64, only where perf sets pebs_ept: on Sapphire "
                    "Rapids from 6.3, in no 6.1.y)")
ADAPTIVE_PEBS_OFF = Rule("adaptive_pebs_off", "6.9", "9e985cbf2942",
                         "KVM: x86/pmu: Disable support for adaptive PEBS (PERF_CAPABILITIES without PEBS_BASELINE)",
                         # 6.1.88 by its stable review thread; 6.6.29 by the linux-6.6.y stable-rc push of 2024-04-23
                         # (ca48817556c5); 6.8.8 is the same batch (2024-04-27), not read
                         stable=("6.1.88", "6.6.29", "6.8.8"))
CR4_FIXED1_LAM = Rule("cr4_fixed1_lam", "6.8", "nested_vmx_cr_fixed1_bits_update",
                      "nested CR4_FIXED1 allows LAM_SUP when guest CPUID.7.1:EAX.LAM is set")
CR4_FIXED1_CET = Rule("cr4_fixed1_cet", "6.18", "nested_vmx_cr_fixed1_bits_update",
                      "nested CR4_FIXED1 allows CET when guest CPUID has SHSTK or IBT (the CET series)")
DE_CFG_GUEST_EXACT = Rule("de_cfg_guest_exact", "< 5.10", "svm_set_msr",
                          "a guest WRMSR of DE_CFG must write exactly KVM's supported value (5.10.262 svm.c:2764-2780, "
                          "6.1.192 svm.c:3095-3111)", until="6.12", removed_by="74a0e79df68a")
DE_CFG_GUEST_SAME_ONLY = Rule("de_cfg_guest_same_only", "6.12", "74a0e79df68a",
                              "the guest may only rewrite DE_CFG's current value",
                              until="6.13", removed_by="4d5163cba43f",
                              stable_until=("6.12.7",))  # Cc stable: lets it write any subset again
MCI_CTL2 = Rule("mci_ctl2", "6.0", "281b52780b57",
                "KVM: x86: Add emulation for MSR_IA32_MCx_CTL2 MSRs (and aebc3ca19063, CMCI_P in KVM_X86_SETUP_MCE): "
                "before 6.0, 0x280-0x29F are no MCi_CTL2 MSRs but fall in the MTRR range and fail (5.10.13 x86.c "
                "`case 0x200 ... 0x2ff`)",
                "before 6.0, leave MCi_CTL2 out and CMCI_P out of KVM_X86_SETUP_MCE")
MTRR_MSR_RANGES = Rule("mtrr_msr_ranges", "6.5", "34a83deac31c",
                       "KVM: x86: Use MTRR macros to define possible MTRR MSR ranges: only 0x200-0x26F and 0x2FF go "
                       "to the MTRR code; before, 0x270-0x2FF did too (but the MCi_CTL2 banks from 6.0) and failed "
                       "there whatever ignore_msrs said (6.1.192 x86.c:3649-3651, 4058-4060)")
MTRR_AS_WRITTEN = Rule("mtrr_as_written", "6.11", "0a7b73559b39",
                       "KVM: x86: Remove VMX support for virtualizing guest MTRR memtypes: a variable MTRR reads back "
                       "as written; before, a PHYSMASK was stored with the reserved GPA bits set and both PHYSBASE and "
                       "PHYSMASK read with those of the current MAXPHYADDR cleared (6.1.192 mtrr.c:357-361, 429)")
INTEL_GUEST_CHECKS = Rule("intel_guest_checks", "5.13", "adc2a23734ac, 61a05d444d2c",
                          "KVM: nSVM: improve SYSENTER emulation on AMD; KVM: x86: Tie Intel and AMD behavior for "
                          "MSR_TSC_AUX to guest CPU model: the guest's CPUID vendor decides, not the vendor module. On "
                          "SVM, SYSENTER_ESP/EIP keep bits 63:32 only for a GenuineIntel guest; TSC_AUX refuses bits "
                          "63:32 for a GenuineIntel guest and drops them for any other; a guest reaches TSC_AUX with "
                          "RDTSCP or RDPID. Before: SVM keeps all 64 bits of both, VMX refuses TSC_AUX's bits 63:32 for "
                          "any guest, and a guest needs RDTSCP (5.10.262 svm.c:2513-2525, 2707-2729, vmx.c:2021-2024, "
                          "2290-2297; 6.1.192 svm.c:2783-2791, 3015-3028, x86.c:1874-1896)",
                          until="6.10", removed_by="dc2b8b2b524a, 6463e5e41842")
INTEL_COMPATIBLE_CHECKS = Rule("intel_compatible_checks", "6.10", "dc2b8b2b524a, 6463e5e41842",
                               "KVM: SVM: Emulate SYSENTER RIP/RSP behavior for all Intel compat vCPUs (and TSC_AUX "
                               "alike): every guest CPUID that is not AMD or Hygon, none included, gets the Intel "
                               "behaviour (6.12.118 svm.c:2952-2960, 3192-3196, x86.c:1458-1478)")
APIC_BASE_BSP_FORCED = Rule("apic_base_bsp_forced", "< 5.10", "kvm_lapic_set_base",
                            "without an in-kernel LAPIC every APIC_BASE write (KVM_SET_MSRS, KVM_SET_SREGS, the guest) "
                            "sets the BSP bit, and on VMX every vCPU resets to 0xFEE00900 through that path; SVM sets "
                            "the reset value directly (5.10.262 lapic.c:2274-2282, vmx.c:4527-4533, svm.c:1272-1275)",
                            until="5.15", removed_by="01913c57c225")
EFER_AUTOIBRS = Rule("efer_autoibrs", "6.3", "8c19b6f257fa",
                     "KVM: x86: Propagate the AMD Automatic IBRS feature to the guest: on SVM, EFER.AUTOIBRS (bit 21) "
                     "may be set when the host has Automatic IBRS; before 6.3 the bit is reserved (6.1.192 "
                     "svm.c:5063-5105 enables no EFER_AUTOIBRS; 6.12.118 svm.c:5518-5519)",
                     "leave EFER.AUTOIBRS clear before 6.3")
PV_EOI_STORED_ON_FAILURE = Rule("pv_eoi_stored_on_failure", "< 5.10", "kvm_lapic_enable_pv_eoi",
                                "a PV_EOI_EN write that enables an address outside guest memory fails, but the MSR "
                                "keeps the new value (5.10.262 lapic.c:2868-2887)",
                                until="5.16", removed_by="afd67ee3cbbd")
XFD_MSRS = Rule("xfd_msrs", "5.17", "820a6ee944e7",
                "kvm: x86: Add emulation for IA32_XFD (and IA32_XFD_ERR, the AMX series): before 5.17 KVM does not "
                "know 0x1C4/0x1C5 (5.10.262 x86.c has no case for them)",
                "leave IA32_XFD and IA32_XFD_ERR out before 5.17")
CET_MSRS = Rule("cet_msrs", "6.18", "kvm_set_xstate_msr (the CET series)",
                "KVM emulates and lists the CET MSRs (U_CET, S_CET, PL0-3_SSP, INT_SSP_TAB); before 6.18 it does not "
                "know them (6.12.118 arch/x86/kvm has no MSR_IA32_U_CET)",
                "leave the CET MSRs out before 6.18")
FLUSH_CMD_MSR = Rule("flush_cmd_msr", "6.4", "da3db168fb67",
                     "KVM: x86: Virtualize FLUSH_L1D and passthrough MSR_IA32_FLUSH_CMD: before 6.4 KVM does not know "
                     "IA32_FLUSH_CMD (0x10B; 6.1.192 x86.c, vmx.c and svm.c have no case for it)",
                     "leave IA32_FLUSH_CMD out before 6.4")
# --- what KVM's nested VMX advertises (nested_vmx_setup_ctls_msrs): the VMX feature MSRs' values by version ----------
VMX_WAIT_SIPI = Rule("vmx_wait_sipi", "5.11", "bf0cd88ce363",
                     "KVM: x86: emulate wait-for-SIPI and SIPI-VMExit: VMX_MISC (0x485) advertises the wait-for-SIPI "
                     "activity state (bit 8); before, only HLT (5.10.262 nested.c:6615-6622)",
                     "leave VMX_MISC bit 8 (wait-for-SIPI) out of a VMX state restored before 5.11")
VMX_TSC_SCALING = Rule("vmx_tsc_scaling", "5.14", "d041b5ea9335",
                       "KVM: nVMX: Enable nested TSC scaling: PROCBASED_CTLS2 (0x48B) allows TSC scaling (bit 57), and "
                       "vmcs12 gains TSC_MULTIPLIER (3c0f99366e34), so VMX_VMCS_ENUM's highest field index grows from "
                       "0x17 (5.10.262 vmcs12.h:210) to 0x19 (ba1f82456ba8 computes it: 6.1.192 nested.c:6800-6826)",
                       "leave TSC scaling out of PROCBASED_CTLS2 and use VMCS_ENUM 0x2e before 5.14")
VMX_USR_WAIT_PAUSE = Rule("vmx_usr_wait_pause", "6.2", "31de69f4eea7",
                          "KVM: nVMX: Properly expose ENABLE_USR_WAIT_PAUSE control to L1: KVM's PROCBASED_CTLS2 "
                          "(0x48B) allows USR_WAIT_PAUSE (bit 58) where the CPU has it. Before, only a vCPU whose CPUID "
                          "has WAITPKG got the bit (vmx_adjust_secondary_exec_control, 6.1.192 vmx.c:4498-4503), and "
                          "writing that vCPU's own value back was EINVAL (the restore is checked against KVM's value)",
                          "clear PROCBASED_CTLS2 bit 58 (USR_WAIT_PAUSE) before restoring VMX MSRs on this kernel",
                          stable=("5.15.87", "6.1.4"))
VMX_NESTED_CET = Rule("vmx_nested_cet", "6.18", "42ae6448531b",
                      "KVM: nVMX: Advertise new VM-Entry/Exit control bits for CET state: the exit controls (0x483, "
                      "0x48F) allow LOAD_CET_STATE (bit 60) and the entry controls (0x484, 0x490) theirs (bit 52); with "
                      "it VMX_BASIC (0x480) passes the host's NO_HW_ERROR_CODE_CC (bit 56, 033cc166f020)",
                      "leave the CET load controls and VMX_BASIC bit 56 out of a VMX state restored before 6.18")
# --- what kvm_get_arch_capabilities adds for a host the bug does not affect (the synthesized *_NO bits) ---------------
ARCH_CAP_GDS_NO = Rule("arch_cap_gds_no", "6.5", "81ac7e5d7417",
                       "KVM: Add GDS_NO support to KVM: IA32_ARCH_CAPABILITIES reports GDS_NO (bit 26) for a host "
                       "without the GDS bug (or with it mitigated by microcode)",
                       stable=("5.10.189", "5.15.125", "6.1.44", "6.4.9"))
ARCH_CAP_RFDS_NO = Rule("arch_cap_rfds_no", "6.9", "2a0180129d72",
                        "KVM/x86: Export RFDS_NO and RFDS_CLEAR to guests: IA32_ARCH_CAPABILITIES reports RFDS_NO (bit "
                        "27) for a host without the RFDS bug (5.15.y: the backport's release is not established)",
                        stable=("5.10.215", "6.1.82", "6.6.22", "6.7.10", "6.8.1"))
ARCH_CAP_ITS_NO = Rule("arch_cap_its_no", "6.15", "159013a7ca18",
                       "x86/its: Enumerate Indirect Target Selection (ITS) bug: IA32_ARCH_CAPABILITIES reports ITS_NO "
                       "(bit 62) for a host without the ITS bug",
                       stable=("5.10.240", "5.15.184", "6.1.139", "6.6.91", "6.12.29", "6.14.7"))
# --- IA32_DEBUGCTL (model/msr_debugctl.py) ----------------------------------------------------------------------------
DEBUGCTL_COMMON = Rule("debugctl_common", "< 5.10", "kvm_set_msr_common",
                       "IA32_DEBUGCTL on VMX in the common code: 0, and LBR or BTF alone, are taken and ignored (reads "
                       "0); any other bit fails (5.10.262 x86.c:3190-3201)",
                       "write 0 to IA32_DEBUGCTL on this kernel (LBR and BTF alone are taken and ignored)",
                       until="5.12", removed_by="the guest LBR series (KVM: x86: Move common set/get handler of "
                                                "MSR_IA32_DEBUGCTLMSR to VMX)")
DEBUGCTL_VMX = Rule("debugctl_vmx", "5.12", "the guest LBR series (KVM: x86: Move common set/get handler of "
                                          "MSR_IA32_DEBUGCTLMSR to VMX)",
                    "IA32_DEBUGCTL on VMX: only BUS_LOCK_DETECT (host CPU), LBR and FREEZE_LBRS_ON_PMI (an LBR format in "
                    "KVM's PERF_CAPABILITIES) and RTM_DEBUG (host RTM, 6.17) are supported, each also in the guest's "
                    "model for a guest write; unsupported LBR and BTF are dropped, any other bit fails (6.1.192 "
                    "vmx.c:2078-2108, 2177-2195; 6.12.118 vmx.c:2195-2224, 2294-2311)",
                    "write only the DEBUGCTL bits this host supports (BUS_LOCK_DETECT, LBR with an LBR format, RTM_DEBUG "
                    "with RTM); LBR and BTF are dropped when unsupported")
DEBUGCTL_HOST_IGNORES_CPUID = Rule("debugctl_host_ignores_cpuid", "6.1", "b333b8ebb85d",
                                   "KVM: VMX: Ignore guest CPUID for host userspace writes to DEBUGCTL: before, a host "
                                   "write needed each bit in the guest's model too (BUS_LOCK_DETECT in its CPUID, an "
                                   "LBR format in its PERF_CAPABILITIES)",
                                   "set the guest CPUID (and PERF_CAPABILITIES) before restoring DEBUGCTL",
                                   stable=("6.0.8",))
DEBUGCTL_RTM_DEBUG = Rule("debugctl_rtm_debug", "6.17", "17ec2f965344",
                          "KVM: VMX: Allow guest to set DEBUGCTL.RTM_DEBUG if RTM is supported (bit 15)",
                          stable=("5.15.190", "6.1.149", "6.6.102", "6.12.43"))
DEBUGCTL_SVM = Rule("debugctl_svm", "< 5.10", "svm_set_msr",
                    "IA32_DEBUGCTL on SVM with LBR virtualization: bits 6 and up fail, bits 0-5 are stored as written "
                    "(5.10.262 svm.c:2731-2745); from ee89e8013383 any bit but BTF and LBR fails, after bits 5:2 are "
                    "dropped (6.12.118 svm.c:3222-3256); without LBR virtualization every value is taken and ignored",
                    "write only LBR (and BTF, before d0eac42f5cec) to DEBUGCTL on this host")
DEBUGCTL_SVM_PINS_DROPPED = Rule("debugctl_svm_pins_dropped", "6.14", "ee89e8013383",
                                 "KVM: SVM: Drop DEBUGCTL[5:2] from guest's effective value",
                                 stable=("6.1.131", "6.6.83", "6.12.19"))
DEBUGCTL_SVM_BTF_DROPPED = Rule("debugctl_svm_btf_dropped", "6.14", "d0eac42f5cec",
                                "KVM: SVM: Suppress DEBUGCTL.BTF on AMD", stable=("6.12.19",))
# --- KVM_CHECK_EXTENSION: the capabilities x86 KVM reports from a release on (CAP_ARRIVALS) ---------------------------
# Read in the 5.10.262, 6.1.192 and 6.12.118 switches (x86.c kvm_vm_ioctl_check_extension, kvm_main.c
# kvm_vm_ioctl_check_extension_generic) against 6.18's and this host's; each commit's release from the KVM pull requests,
# mainline pushes and <linux/kvm.h> syncs that carry it. A release's rc fixes count for it (209: 5.17-rc2; 54: 5.17-rc6;
# 215: 5.18-rc). Not followed: caps a build leaves out by config (HYPERV, XEN, SMM, guest_memfd), which a profile records.
CAPS_5_11 = Rule("caps_5_11", "5.11", "c21d54f0307f, fb04a1eddb1a",
                 "KVM_CHECK_EXTENSION reports SYS_HYPERV_CPUID (191) and DIRTY_LOG_RING (192)")
CAPS_5_12 = Rule("caps_5_12", "5.12", "fe6b6bc802b4", "KVM_CHECK_EXTENSION reports X86_BUS_LOCK_EXIT (193)")
CAPS_5_13 = Rule("caps_5_13", "5.13", "7e582ccbbd73, fe7e948837f3, 54526d1fd593",
                 "KVM_CHECK_EXTENSION reports SET_GUEST_DEBUG2 (195), SGX_ATTRIBUTE (196) and "
                 "VM_COPY_ENC_CONTEXT_FROM (197)")
CAPS_5_14 = Rule("caps_5_14", "5.14", "644f706719f0, 6dba94035203, 0dbb11230437, cb082bfab59a, 19238e75bd8e",
                 "KVM_CHECK_EXTENSION reports HYPERV_ENFORCE_CPUID (199), SREGS2 (200), EXIT_HYPERCALL (201), "
                 "BINARY_STATS_FD (203) and EXIT_ON_EMULATION_FAILURE (204)")
CAPS_5_16 = Rule("caps_5_16", "5.16", "828ca89628bf, b56639318bb2",
                 "KVM_CHECK_EXTENSION reports VCPU_ATTRIBUTES (127) and VM_MOVE_ENC_CONTEXT_FROM (206)")
CAPS_5_17 = Rule("caps_5_17", "5.17", "be50b2065dfa, dd6e63122018, 127770ac0d04",
                 "KVM_CHECK_EXTENSION reports XSAVE2 (208), SYS_ATTRIBUTES (209) and ENABLE_CAP (54)")
CAPS_5_18 = Rule("caps_5_18", "5.18", "ba7bb663f554, 6d8491910fcd, d495f942f40a, 8a2897853c53",
                 "KVM_CHECK_EXTENSION reports PMU_CAPABILITY (212), DISABLE_QUIRKS2 (213) and SYSTEM_EVENT_DATA "
                 "(215), and VAPIC (6) also on a VMX host with TPR acceleration (before: 0 there)")
CAPS_5_19 = Rule("caps_5_19", "5.19", "ffbb61d09fc5",
                 "KVM_CHECK_EXTENSION reports VM_TSC_CONTROL (214; left out of 5.18, whose second KVM pull was not "
                 "taken)")
CAPS_6_0 = Rule("caps_6_0", "6.0", "ed2351174e38, 2f4073e08f4c, 084cc29f8bbb",
                "KVM_CHECK_EXTENSION reports X86_TRIPLE_FAULT_EVENT (218), X86_NOTIFY_VMEXIT (219) and "
                "VM_DISABLE_NX_HUGE_PAGES (220)")
CAPS_6_1 = Rule("caps_6_1", "6.1", "17601bfed909", "KVM_CHECK_EXTENSION reports DIRTY_LOG_RING_ACQ_REL (223)")
CAPS_6_3 = Rule("caps_6_3", "6.3", "651daa44b11c", "KVM_CHECK_EXTENSION reports PMU_EVENT_MASKED_EVENTS (226)")
CAPS_6_8 = Rule("caps_6_8", "6.8", "63912245c19d, bb58b90b1a8f, 16f95f3b95ca, a7800aa80ea4, 89ea60c2c7b5",
                "KVM_CHECK_EXTENSION reports DEVICE_CTRL (89), USER_MEMORY2 (231), MEMORY_FAULT_INFO (232), "
                "GUEST_MEMFD (234; where built in, and on a VM only of a type with private memory: 6.12.118 "
                "kvm_main.c:4999-5002) and VM_TYPES (235)")
CAPS_6_11 = Rule("caps_6_11", "6.11", "6e01b7601dfe, 6fef518594bc, 85542adb65ec",
                 "KVM_CHECK_EXTENSION reports PRE_FAULT_MEMORY (236), X86_APIC_BUS_CYCLES_NS (237) and "
                 "X86_GUEST_MODE (238)")
CAPS_6_18 = Rule("caps_6_18", "6.18", "06f2969c6a12, the guest_memfd mmap series",
                 "KVM_CHECK_EXTENSION reports ONE_REG (70) and GUEST_MEMFD_FLAGS (244), and GUEST_MEMFD (234) on "
                 "every VM where built in (6.18 kvm_main.c; 6.12.118's header stops at 238)")
ENABLE_MAX_VCPU_ID = Rule("enable_max_vcpu_id", "6.0", "35875316384b",
                          "KVM: x86: Allow userspace to set maximum VCPU id for VM (KVM_ENABLE_CAP of MAX_VCPU_ID, "
                          "which KVM_CHECK_EXTENSION reported long before; 5.10.262 x86.c has no enable case; in the "
                          "'KVM changes for Linux 5.20 merge window' pull)")
# The limits KVM_CHECK_EXTENSION reports, raised at a release (a profile taken later reports its own, which the model
# keeps from the rule on): 5.10.262 x86.c:3906-3913 and kvm_host.h:40-46 (KVM_MAX_VCPUS 288, KVM_SOFT_MAX_VCPUS 240,
# KVM_MAX_VCPU_ID 1023, KVM_USER_MEM_SLOTS 509); 6.12.118 x86.c:4322-4330 (min(online CPUs, KVM_MAX_VCPUS),
# KVM_MAX_VCPU_IDS = 4 x KVM_MAX_VCPUS). Releases from their KVM pull requests (/work/notes/cap-limits.md).
CAP_MEMSLOTS_32764 = Rule("cap_memslots_32764", "5.12", "4fc096a99e01",
                          "KVM: Raise the maximum number of user memslots (KVM_CAP_NR_MEMSLOTS 509 -> 32764)")
CAP_MAX_VCPUS_1024 = Rule("cap_max_vcpus_1024", "5.15", "074c82c8f7cf, 4ddacd525a2f",
                          "kvm: x86: Increase MAX_VCPUS to 1024 (KVM_CAP_MAX_VCPUS 288 -> 1024); kvm: x86: Set "
                          "KVM_MAX_VCPU_ID to 4*KVM_MAX_VCPUS (KVM_CAP_MAX_VCPU_ID 1023 -> 4096)")
CAP_NR_VCPUS_710 = Rule("cap_nr_vcpus_710", "5.15", "1dbaf04cb91b",
                        "kvm: x86: Increase KVM_SOFT_MAX_VCPUS to 710 (KVM_CAP_NR_VCPUS 240 -> 710)")
CAP_NR_VCPUS_ONLINE = Rule("cap_nr_vcpus_online", "5.16", "da1bfd52b930, 2845e7353bc3",
                           "KVM: x86: Drop arbitrary KVM_SOFT_MAX_VCPUS; Cap KVM_CAP_NR_VCPUS by KVM_CAP_MAX_VCPUS "
                           "(KVM_CAP_NR_VCPUS: the online CPUs, at most KVM_MAX_VCPUS)")
CAP_LIMITS = (CAP_MEMSLOTS_32764, CAP_MAX_VCPUS_1024, CAP_NR_VCPUS_710, CAP_NR_VCPUS_ONLINE)
# Capabilities KVM_CHECK_EXTENSION reported before KVM_ENABLE_CAP took them: EINVAL until the rule.
ENABLE_ARRIVALS: dict[Rule, tuple[int, ...]] = {ENABLE_MAX_VCPU_ID: (128,)}
# Capabilities whose KVM_CHECK_EXTENSION answer is the mask of flags KVM_ENABLE_CAP takes (kvm_vm_ioctl_enable_cap:
# EINVAL for any other flag; 6.12.118 x86.c:6079-6083, 6111-6114, 6169-6172, 6214-6218, 6229-6232): X2APIC_API,
# DISABLE_QUIRKS2, EXIT_HYPERCALL, X86_BUS_LOCK_EXIT, PMU_CAPABILITY. Not X86_DISABLE_EXITS, which before
# DISABLE_EXITS_ALLOWED_ONLY (6.14) takes any valid exit.
FLAG_MASK_CAPS = frozenset({129, 213, 201, 193, 212})
CAP_ARRIVALS: dict[Rule, tuple[int, ...]] = {
    CAPS_5_11: (191, 192), CAPS_5_12: (193,), CAPS_5_13: (195, 196, 197), CAPS_5_14: (199, 200, 201, 203, 204),
    CAPS_5_16: (127, 206), CAPS_5_17: (54, 208, 209), CAPS_5_18: (212, 213, 215), CAPS_5_19: (214,),
    CAPS_6_0: (218, 219, 220), CAPS_6_1: (223,), CAPS_6_3: (226,), CAPS_6_8: (89, 231, 232, 234, 235),
    CAPS_6_11: (236, 237, 238), CAPS_6_18: (70, 244),
}
# --- KVM_GET_SUPPORTED_CPUID bits and the release that offered them (CPUID_ARRIVALS) ---------------------------------
# Read in the 5.10.262, 6.1.192 and 6.12.118 cpuid.c (kvm_set_cpu_caps) against 6.18's; the commits and releases as
# pull requests and stable changelogs date them.
CPUID_AVX512_FP16 = Rule("cpuid_avx512_fp16", "5.11", "2224fc9efb2d",
                         "KVM: x86: Expose AVX512_FP16 for supported CPUID")
CPUID_AVX_VNNI = Rule("cpuid_avx_vnni", "5.12", "1085a6b585d7", "KVM: Expose AVX_VNNI instruction to guset")
CPUID_BUS_LOCK_DETECT = Rule("cpuid_bus_lock_detect", "5.13", "76ea438b4afc",
                             "KVM: X86: Expose bus lock debug exception to guest")
CPUID_AMD_PSFD = Rule("cpuid_amd_psfd", "5.16", "b73a54321ad8",
                      "KVM: x86: Expose Predictive Store Forwarding Disable")
CPUID_X87_DEPRECATED = Rule("cpuid_x87_deprecated", "5.17", "e3bcfda012ed",
                            "KVM: x86: Report deprecated x87 features in supported CPUID", stable=("5.16.10",))
CPUID_80000021 = Rule("cpuid_80000021", "5.18", "58b3d12c0a86",
                      "KVM: x86: add support for CPUID leaf 0x80000021", stable=("5.10.240", "5.15.187"))
CPUID_NO_SMM_CTL_MSR = Rule("cpuid_no_smm_ctl", "6.2", "74bee0cad8dc",
                            "KVM: x86: Advertise that the SMM_CTL MSR is not supported (0x80000021 EAX[9]; 5.10.262 "
                            "cpuid.c:904 masks the leaf to bits 0, 2, 5 and 6; in 6.1.y with the backport of 'Move "
                            "open-coded CPUID leaf 0x80000021 EAX bit propagation code', 6.1.153 by Debian's changelog; "
                            "6.1.192 cpuid.c:762)", stable=("6.1.153",))
CPUID_DS_DTES64 = Rule("cpuid_ds_dtes64", "6.0", "cf8e55fe50df",
                       "KVM: x86/pmu: Expose CPUIDs feature bits PDCM, DS, DTES64 (where the host's PEBS is "
                       "virtualized: on Sapphire Rapids only from 6.3, pebs_ept_spr)")
CPUID_FAST_REP_STRINGS = Rule("cpuid_fast_rep_strings", "6.3", "2a4209d6a9cb",
                              "KVM: x86: Advertise fast REP string features inherent to the CPU")
CPUID_PERFMON_V2 = Rule("cpuid_perfmon_v2", "6.5", "4a2771895ca6",
                        "KVM: x86/svm/pmu: Add AMD PerfMonV2 support (leaf 0x80000022)")
CPUID_7_2_EDX = Rule("cpuid_7_2_edx", "6.8", "eefe5e668209",
                     "KVM: x86: Advertise CPUID.(EAX=7,ECX=2):EDX[5:0] to userspace", stable=("6.1.84", "6.7.12"))
CPUID_AVX10 = Rule("cpuid_avx10", "6.12", "1c450ffef589",
                   "KVM: x86: Advertise AVX10.1 CPUID to userspace (leaf 0x24: the basic leaves go up to 0x24, before "
                   "to 0x1f; 6.1.192 cpuid.c:908, 6.12.118 cpuid.c:987)")
CPUID_TSC_DEADLINE = Rule("cpuid_tsc_deadline", "6.14", "9be4ec35d668",
                          "KVM: x86: Advertise TSC_DEADLINE_TIMER in KVM_GET_SUPPORTED_CPUID")
CPUID_HYPERVISOR = Rule("cpuid_hypervisor", "6.14", "9aa470f5ddb2",
                        "KVM: x86: Advertise HYPERVISOR in KVM_GET_SUPPORTED_CPUID")
SREGS_EFER_CHECKED = Rule("sregs_efer_checked", "> 6.18", "184bd464bdb6",
                          "KVM: x86: Check EFER validity on KVM_SET_SREGS*: KVM_SET_SREGS checks EFER as a guest "
                          "write would (kvm_valid_efer): reserved bits (SVME or LMSLE without nested, FFXSR without "
                          "the host's) and the guest CPUID bit of each bit set (LME/LMA need CPUID LM, NX needs NX), "
                          "else EINVAL; a 2026 fix marked for stable, in 6.12.112 (Debian's 6.12 changelog; 6.12.118 "
                          "regs.c:538-561), not in 6.1.192 or the live 6.18.44; in mainline by August 2026 through "
                          "the KVM pull of the 7.3 merge window (release not pinned)",
                          "set CPUID (KVM_SET_CPUID2) before KVM_SET_SREGS, and only EFER bits this host's KVM allows",
                          stable=("6.12.112",))
APIC_BASE_SAME_VALUE = Rule("apic_base_same_value", "6.13", "a75b7bb46a83",
                            "KVM: x86: Short-circuit all of kvm_apic_set_base() if MSR value is unchanged: from 6.13 "
                            "a write of APIC_BASE's current value (KVM_SET_MSRS, KVM_SET_SREGS, the guest) succeeds "
                            "before any check, so a value a later CPUID made invalid (x2APIC mode without "
                            "CPUID.X2APIC) is still taken back; before, the checks run (6.12.118 lapic.c:2687-2705)",
                            "")
GUEST_CPU_CAPS = Rule("guest_cpu_caps", "6.14", "8f2a27752e80, e592ec657d84",
                      "KVM: x86: Replace (almost) all guest CPUID feature queries with cpu_caps: an MSR gated on a "
                      "guest CPUID feature (OSVW, XFD, TSC_AUX, TSC_ADJUST, PRED_CMD, FLUSH_CMD, MISC_ENABLE's MWAIT, "
                      "EFER's bits, x2APIC, ARCH_CAPABILITIES, PERF_CAPABILITIES and its PEBS format) needs the "
                      "feature in KVM's caps too: KVM_GET_SUPPORTED_CPUID, or emulated (RDPID on a host with RDTSCP); "
                      "before 6.14 the guest's CPUID bit alone decides (6.12.118 x86.c:1314, 1458, 3474, 3500, 3678, "
                      "3703, 3831, 3837; lapic.c:2692; vmx.c:2501-2503). XSS keeps the raw CPUID bit",
                      "from 6.14 set only CPUID bits this host's KVM supports for the MSRs they open")
PRED_CMD_SBPB = Rule("pred_cmd_sbpb", "6.7", "e47d86083c66",
                     "KVM: x86: Add SBPB support: IA32_PRED_CMD takes SBPB (bit 7) where the guest (for a guest write) "
                     "and the host have it, and 0 on a host without IBPB; before 6.7 only IBPB (bit 0), a guest needs "
                     "CPUID SPEC_CTRL or AMD_IBPB, and a host without IBPB refuses every write, 0 included (6.1.192 "
                     "vmx.c:2254-2266, svm.c:2964-2977; the common code of 6.4, 903358c7eddb, kept it)",
                     "write only IBPB (1) or 0 before 6.7")
# The local APIC in x2APIC mode (model/x2apic.py); research with file:line in docs/rules.md.
X2APIC_ICR_64BIT = Rule("x2apic_icr_64bit", "5.18", "a57a31684d7b",
                        "KVM: x86: Treat x2APIC's ICR as a 64-bit register, not two 32-bit regs: an x2APIC ICR write "
                        "keeps its high half "
                        "at 0x304 (one 64-bit register), which KVM_GET_LAPIC shows as ICR2 (0x310); the xAPIC ICR2 "
                        "stays hidden at 0x310 until x2APIC mode is left; before, the high half went to ICR2", "")
X2APIC_ICR_SPLIT_SVM = Rule("x2apic_icr_split_svm", "6.12", "73b42dc69be8",
                            "KVM: x86: Re-split x2APIC ICR into ICR+ICR2 for AMD (x2AVIC): on SVM the ICR's high "
                            "half goes to ICR2 again (x2apic_icr_is_split)", "",
                            stable=("6.1.149", "6.6.78", "6.10.13"))
X2APIC_ICR_RESERVED = Rule("x2apic_icr_reserved", "6.12", "71bf395a276f",
                           "KVM: x86: Enforce x2APIC's must-be-zero reserved ICR bits: an x2APIC ICR write with bits "
                           "31:20, 17:16 or 13 set is refused (6.12.118 lapic.c:2489-2493)",
                           "clear the ICR's reserved bits", stable=("6.1.113", "6.6.54", "6.10.13"))
X2APIC_HIGH_BITS = Rule("x2apic_high_bits", "6.3", "ab52be1b310b",
                        "KVM: x86: Inject #GP on x2APIC WRMSR that sets reserved bits 63:32: a write of any x2APIC "
                        "register but the ICR with bits 63:32 set is refused (6.12.118 lapic.c:3360-3362); before, "
                        "they were dropped", "write a 32-bit value", stable=("6.1.16",))
X2APIC_SELF_IPI_VECTOR = Rule("x2apic_self_ipi_vector", "6.3", "ba5838abb053",
                              "KVM: x86: Inject #GP if WRMSR sets reserved bits in APIC Self-IPI: SELF_IPI takes a "
                              "vector (bits 7:0) alone (6.12.118 lapic.c:2425-2434); before, the other bits were "
                              "ignored", "write the vector alone", stable=("6.1.16",))
X2APIC_SELF_IPI_KEEPS_ICR = Rule("x2apic_self_ipi_keeps_icr", "5.18", "d22a81b304a2",
                                 "KVM: x86: Do not change ICR on write to APIC_SELF_IPI: before, a SELF_IPI write was an "
                                 "ICR write of 0x40000 | vector (the ICR kept it)", "",
                                 stable=("5.10.115", "5.15.39", "5.17.7"))
X2APIC_LEAVE_SETS_XAPIC_ID = Rule("x2apic_leave_sets_xapic_id", "6.3", "052c3b99cbc8",
                                  "KVM: x86: leaving x2APIC mode for xAPIC mode (host APIC_BASE write) sets the xAPIC "
                                  "ID from the vCPU id (6.12.118 lapic.c:2665-2670); before, the ID register kept the "
                                  "x2APIC ID", "")
X2APIC_ID_READONLY = Rule("x2apic_id_readonly", "6.11", "4b7c3f6d04bd",
                          "KVM: x86: Make x2APIC ID 100% readonly: KVM_SET_LAPIC in x2APIC mode ignores the given ID "
                          "and keeps the vCPU id (6.12.118 lapic.c:3115-3118); before, the given ID shifted right 24 "
                          "became the x2APIC ID (6.1.192 lapic.c:2799-2803)", "",
                          stable=("6.6.78", "6.10.13"))
SMBASE_NEEDS_SMM = Rule("smbase_needs_smm", "6.2", "4b8e1b32013d",
                        "KVM: allow compiling out SMM support: without CONFIG_KVM_SMM (KVM_CAP_X86_SMM 0) a host read "
                        "or write of SMBASE fails too (6.12.118 x86.c:3511-3513, 3905-3907); before, only a guest "
                        "access failed and the host's always passed (6.1.192 x86.c:3696-3700, 4092-4096)")
X2APIC_SUPPRESS_EOI_FLAGS = Rule("x2apic_suppress_eoi_flags", "> 6.18", "6517dfbcc918",
                                 "KVM: x86: Add x2APIC \"features\" to control EOI broadcast suppression: "
                                 "KVM_CAP_X2APIC_API takes KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST (bit 2, only with "
                                 "a split IRQCHIP, and left out of a VM's report without one) and "
                                 "KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST (bit 3), not both (EINVAL); before, only "
                                 "bits 0-1 (6.12.118 x86.c:6111-6122); mainline 7.0 (the KVM pull for 7.0, 13 February 2026), "
                                 "stable 6.18.17 (its patch, x86.c and lapic.c); the live 6.18.44 reports 15 (11 on a "
                                 "VM). DISABLE also lets an EOI reach the in-kernel IOAPIC despite SPIV's directed-EOI "
                                 "bit (kvm_lapic_suppress_eoi_broadcast)",
                                 stable=("6.18.17",))
# CR4 on KVM_SET_SREGS (model/cr4.py; docs/rules.md). The bits KVM knows and each feature test, from 5.10.262, 6.1.192
# and 6.12.118 kvm_host.h CR4_RESERVED_BITS and x86.h __cr4_reserved_bits, and the 6.18 commits named.
NMI_PENDING_COUNT = Rule("nmi_pending_count", "6.4", "ab2ee212a57b",
                         "KVM: x86: Save/restore all NMIs when multiple NMIs are pending: KVM_GET_VCPU_EVENTS reports "
                         "how many NMIs are pending, up to process_nmi's limit (2, or 1 while NMIs are masked or one "
                         "is being injected); before, only whether any is (6.1.192 x86.c:5143 `nmi_pending != 0`). "
                         "Both run process_nmi at KVM_GET_VCPU_EVENTS and at the start of KVM_SET_VCPU_EVENTS, under "
                         "the NMI state as it was (6.12.118 x86.c:4952, 5049; 6.1.192 :5079, 5201)",
                         "restore the NMI count a 6.4+ kernel saved as at most 1 on an older one")
CR4_PCIDE_GATED = Rule("cr4_pcide_gated", "5.12", "4683d758f48e",
                       "KVM: x86: Supplement __cr4_reserved_bits() with X86_FEATURE_PCID check: CR4.PCIDE needs PCID in "
                       "KVM's caps (and, after KVM_SET_CPUID2, the guest's CPUID); before, KVM_SET_SREGS took it on any "
                       "host. Stable: 5.10.23 (Debian's 5.10 changelog)",
                       "set CR4.PCIDE only where the host and the guest's CPUID have PCID", stable=("5.10.23",))
CR4_VENDOR_HOOK = Rule("cr4_vendor_hook", "5.11", "c2fe3cd4604a, d3a9e4146a6f",
                       "KVM: x86: Move vendor CR4 validity check to dedicated kvm_x86_ops hook (and KVM: VMX: Drop "
                       "guest CPUID check for VMXE in vmx_set_cr4()): VMX's remaining CR4 checks (VMXE in SMM, the "
                       "nested fixed bits after VMXON) run before anything changes, and VMXE no longer needs VMX in the "
                       "guest's CPUID there (cr4_guest_rsvd_bits refuses it once the guest has a CPUID without VMX; on "
                       "a vCPU never given one it is taken). Before, vmx_set_cr4 refused VMXE without nested VMX for "
                       "the guest (nested off, or no VMX in its CPUID) or in SMM, and __set_sregs ignored that: "
                       "KVM_SET_SREGS succeeded, took the other registers and left CR4 as it was (5.10.13 "
                       "__set_sregs). Stable: 5.10.137 (Debian's 5.10 changelog)",
                       "give the guest VMX in its CPUID (KVM_SET_CPUID2) before setting CR4.VMXE", stable=("5.10.137",))
CR4_LAM_SUP = Rule("cr4_lam_sup", "6.8", "93d1c9f498a7",
                   "KVM: x86: Virtualize LAM for supervisor pointer: CR4.LAM_SUP (bit 28) becomes a CR4 bit KVM knows, "
                   "usable with LAM (CPUID.7.1:EAX[26]) in KVM's caps and the guest's CPUID; before, KVM_SET_SREGS "
                   "refuses it (6.1.192 kvm_host.h:117-123; 6.12.118 kvm_host.h:135-142)",
                   "leave CR4.LAM_SUP clear")
CR4_CET = Rule("cr4_cet", "6.18", "b3744c59ebc5",
               "KVM: x86: Allow setting CR4.CET if IBT or SHSTK is supported: CR4.CET (bit 23) becomes a CR4 bit KVM "
               "knows, usable when KVM's caps and the guest's CPUID have SHSTK or IBT; before, KVM_SET_SREGS refuses it",
               "leave CR4.CET clear")
CR4_GUEST_AT_CREATE = Rule("cr4_guest_at_create", "6.14", "85e5ba83c016",
                           "KVM: x86: Do all post-set CPUID processing during vCPU creation: a new vCPU's CR4 reserved "
                           "bits come from its (empty) CPUID at once, so until KVM_SET_CPUID2 gives it the features, "
                           "KVM_SET_SREGS refuses every feature-gated CR4 bit (OSXSAVE, SMEP, SMAP, FSGSBASE, PKE, LA57, "
                           "UMIP, VMXE, PCIDE, LAM_SUP, CET) and takes only bits 0-10. Before, the guest reserved nothing "
                           "until its first KVM_SET_CPUID2 (6.12.118 cpuid.c:417-418, 504; x86.c:11530)",
                           "call KVM_SET_CPUID2 before KVM_SET_SREGS")
SREGS_CR0_CHECKED = Rule("sregs_cr0_checked", "6.5", "26a0652cb453",
                         "KVM: x86: Disallow KVM_SET_SREGS{2} if incoming CR0 is invalid: bits 63:32, NW without CD "
                         "or PG without PE are EINVAL (kvm_is_valid_cr0, 6.12.118 regs.c:203-216, 559-560); before, "
                         "KVM_SET_SREGS took any CR0. Stable: 6.1.43 and 6.4.8 inferred (the stable batch of 31 July "
                         "2023; 6.1.192 has it), not 5.10 (the backport failed)",
                         stable=("6.1.43", "6.4.8"))
REFUSED_READ_ZEROED = Rule("refused_read_zeroed", "6.12", "1cec2034980a",
                           "KVM: x86: Funnel all fancy MSR return value handling into a common helper: the entry a "
                           "KVM_GET_MSRS stops at reads 0 (kvm_do_msr_access, 6.12.118 x86.c:503-505); before, only a "
                           "refusal as unsupported (KVM_MSR_RET_UNSUPPORTED/INVALID) zeroes it and a handler's own "
                           "refusal (return 1: x2APIC, MCE banks, MTRR indices, OSVW, ...) leaves what userspace put "
                           "there (6.1.192 x86.c:1945-1963)", "")
# The MSRs KVM learned at a version: before it they are unknown MSRs, left out of KVM_GET_MSR_INDEX_LIST and of a
# profile's inventory taken on a later kernel (ModelSystem), with no handler of their own (msr_misc).
MSR_ARRIVALS: dict[Rule, tuple[int, ...]] = {XFD_MSRS: (0x1C4, 0x1C5), CET_MSRS: (0x6A0, 0x6A2, *range(0x6A4, 0x6A9)),
                                             FLUSH_CMD_MSR: (0x10B,)}
# The KVM_GET_SUPPORTED_CPUID bits that came with them, (function, index, register, bit): a profile's supported CPUID
# taken on a later kernel loses them too (ModelSystem). XFD and AMX (XFD, AMX_BF16/TILE/INT8, XCR0 17-18: 6.1.192
# cpuid.c:585, 659; none in 5.10.262 cpuid.c), FLUSH_L1D (6.12.118 cpuid.c:707; none in 6.1.192), SHSTK and IBT (the
# CET series), AutoIBRS (6.12.118 cpuid.c:818; none in 6.1.192).
CPUID_ARRIVALS: dict[Rule, tuple[tuple[int, int, str, int], ...]] = {
    XFD_MSRS: ((0xD, 1, "eax", 4), (7, 0, "edx", 22), (7, 0, "edx", 24), (7, 0, "edx", 25), (0xD, 0, "eax", 17),
               (0xD, 0, "eax", 18)),
    FLUSH_CMD_MSR: ((7, 0, "edx", 28),),
    CET_MSRS: ((7, 0, "ecx", 7), (7, 0, "edx", 20), (0xD, 1, "ecx", 11), (0xD, 1, "ecx", 12)),
    CPUID_AVX512_FP16: ((7, 0, "edx", 23),),
    CPUID_AVX_VNNI: ((7, 1, "eax", 4),),
    CPUID_BUS_LOCK_DETECT: ((7, 0, "ecx", 24),),
    CPUID_AMD_PSFD: ((0x80000008, 0, "ebx", 28),),
    CPUID_X87_DEPRECATED: ((7, 0, "ebx", 6), (7, 0, "ebx", 13)),
    CPUID_80000021: ((0x80000021, 0, "eax", 0), (0x80000021, 0, "eax", 2), (0x80000021, 0, "eax", 6)),
    CPUID_NO_SMM_CTL_MSR: ((0x80000021, 0, "eax", 9),),  # set whatever the host (6.1.192 cpuid.c:762)
    CPUID_DS_DTES64: ((1, 0, "ecx", 2), (1, 0, "edx", 21)),
    CPUID_FAST_REP_STRINGS: ((7, 1, "eax", 10), (7, 1, "eax", 11), (7, 1, "eax", 12)),
    CPUID_PERFMON_V2: ((0x80000022, 0, "eax", 0),),
    CPUID_7_2_EDX: ((7, 2, "edx", 0), (7, 2, "edx", 1), (7, 2, "edx", 2), (7, 2, "edx", 4)),
    CPUID_TSC_DEADLINE: ((1, 0, "ecx", 24),),
    CPUID_HYPERVISOR: ((1, 0, "ecx", 31),),
    EFER_AUTOIBRS: ((0x80000021, 0, "eax", 8),),
    PRED_CMD_SBPB: ((0x80000021, 0, "eax", 27),),
    CPUID_AVX10: ((7, 1, "edx", 19),),
}
# The CPUID_ARRIVALS whose bits an older kernel supports as well though it did not advertise them: they describe the
# CPU (x87 deprecations, fast REP strings, 0x80000021's properties), run natively (AVX512_FP16, AVX_VNNI), only
# enumerate (AVX10, HYPERVISOR), or name what KVM always emulated (TSC_DEADLINE with the in-kernel LAPIC).
ADVERTISED_ONLY = frozenset({CPUID_X87_DEPRECATED, CPUID_FAST_REP_STRINGS, CPUID_80000021, CPUID_NO_SMM_CTL_MSR,
                             CPUID_AVX512_FP16, CPUID_AVX_VNNI, CPUID_AVX10, CPUID_HYPERVISOR, CPUID_TSC_DEADLINE})
# Of those, the bits a VMM sets whatever KVM_GET_SUPPORTED_CPUID says: QEMU's kvm_arch_get_supported_cpuid
# (target/i386/kvm/kvm.c) adds HYPERVISOR ("even if KVM does not return it") and TSC_DEADLINE (with an in-kernel irqchip
# and KVM_CAP_TSC_DEADLINE_TIMER), so a list without them changes nothing it does.
VMM_SETS_ITSELF = frozenset({CPUID_HYPERVISOR, CPUID_TSC_DEADLINE})
# The leaves KVM_GET_SUPPORTED_CPUID stops at before a version raised the limit, (function, limit before): leaf 0's and
# 0x80000000's EAX (the highest basic and extended leaf, ``min(host, limit)``) and 7.0's EAX (the highest sub-leaf of
# leaf 7). A profile taken on a later kernel reads, under an earlier one, the lower limit and no leaf above it.
# Basic: 0x1f before 0x24 (1c450ffef589). Extended: 0x8000001f before 0x80000021 (5.10.262 cpuid.c:822 with the
# backport, 6.1.192:1166), 0x80000022 from 6.5 (94cdeebd8211, with PerfMonV2; 6.12.118:1263). Leaf 7: sub-leaf 1 before
# 7.2 (5.10.262 cpuid.c:665 min(eax, 1u); 6.1.192:953 min(eax, 2u) with the backport).
CPUID_LIMITS: dict[Rule, tuple[int, int]] = {
    CPUID_AVX10: (0, 0x1F),
    CPUID_80000021: (0x80000000, 0x8000001F),
    CPUID_PERFMON_V2: (0x80000000, 0x80000021),
    CPUID_7_2_EDX: (7, 1),
}
# The feature-MSR bits KVM reports from a version on, (MSR, field mask, field before): a profile taken on a later
# kernel reads, under an earlier one, ``value & ~mask | before`` (ModelSystem). The non-true VMX controls 0x483/0x484
# carry their TRUE twins' bits. Not modelled: what earlier kernels reported that later ones hide, which depends on the
# host's raw MSRs: ENCLS exiting (0x48B bit 47), which 5.13-6.0 advertised with kvm_intel.sgx=1 even where the CPU
# cannot exit on ENCLS (fixed by 1c1a41497ab8: 6.1, 5.15.78, 6.0.8); the raw ARCH_CAPABILITIES bits passed through
# before KVM masked them (0204750bd4c6: 6.0, 5.10.142, 5.15.66); PERF_CAPABILITIES' LBR and PEBS fields before 6.9.
FEATURE_ARRIVALS: dict[Rule, tuple[tuple[int, int, int], ...]] = {
    VMX_WAIT_SIPI: ((0x485, 1 << 8, 0),),
    VMX_TSC_SCALING: ((0x48B, 1 << 57, 0), (0x48A, 0x3FE, 0x17 << 1)),
    VMX_USR_WAIT_PAUSE: ((0x48B, 1 << 58, 0),),
    VMX_NESTED_CET: ((0x480, 1 << 56, 0), (0x483, 1 << 60, 0), (0x48F, 1 << 60, 0), (0x484, 1 << 52, 0),
                     (0x490, 1 << 52, 0)),
    ARCH_CAP_GDS_NO: ((0x10A, 1 << 26, 0),),
    ARCH_CAP_RFDS_NO: ((0x10A, 1 << 27, 0),),
    ARCH_CAP_ITS_NO: ((0x10A, 1 << 62, 0),),
}
# The rules that refuse an MSR for want of a guest CPUID bit (6.13): the MSR, the bit (function, index, register, bit)
# and its name. msr_rules checks them; probe and `kvmscope check` name them.
CPUID_GATES: dict[Rule, tuple[int, tuple[int, int, str, int], str]] = {
    ARCH_CAP_NEEDS_CPUID: (0x10A, (7, 0, "edx", 29), "ARCH_CAPABILITIES"),
    PERF_CAP_NEEDS_PDCM: (0x345, (1, 0, "ecx", 15), "PDCM"),
}
# --- refusal reasons that hold on every version the model knows ---------------------------------------------------
CPUID_AFTER_RUN_FORBIDDEN = Rule("cpuid_after_run_forbidden", "5.16", "feb627e8d6f6",
                                 "KVM: x86: Forbid KVM_SET_CPUID{,2} after KVM_RUN",
                                 "set CPUID before the first KVM_RUN", until="5.17", removed_by="c6617c61e8fe",
                                 stable_until=("5.16.3",))
CPUID_AFTER_RUN_IDENTICAL = Rule("cpuid_after_run_identical", "5.17", "c6617c61e8fe",
                                 "KVM: x86: Partially allow KVM_SET_CPUID{,2} after KVM_RUN",
                                 "after KVM_RUN, re-send exactly what KVM_GET_CPUID2 returns (KVM may have rewritten "
                                 "what you first gave it)", stable=("5.16.3",))
VMX_RESTORE_CURRENT = Rule("vmx_restore_current", "< 5.10", "vmx_restore_control_msr",
                           "nVMX MSR restores are checked against the vCPU's current values: a restricted value "
                           "cannot be widened again", "restore VMX MSRs into a fresh vCPU",
                           until="6.0", removed_by="KVM: nVMX: Let userspace set nVMX MSR to any _host_ supported value",
                           # 5.10.137 (Debian changelog); 5.15.61 is the same stable batch (not read in a 5.15 tree)
                           stable_until=("5.10.137", "5.15.61"))
MSR_IO_LIMIT = Rule("msr_io_limit", "2.6.x", "MAX_IO_MSRS",
                    "msr_io: batches of MAX_IO_MSRS (256) or more entries get E2BIG",
                    "split the batch into chunks of at most 255 MSRs")
FEAT_CTL_HOST_ANY_SUPPORTED = Rule("feat_ctl_host_any_supported", "6.2", "d2a00af2061d",
                                   "KVM: VMX: Allow userspace to set all supported FEATURE_CONTROL bits")
FEAT_CTL_GUEST_CPUID = Rule("feat_ctl_guest_cpuid", "< 5.10", "vmx_feature_control_msr_valid",
                            "IA32_FEATURE_CONTROL takes only the bits the guest CPUID grants (VMX, SGX, SGX_LC)",
                            "set the guest CPUID (VMX, SGX, SGX_LC) before writing FEATURE_CONTROL",
                            until="6.2", removed_by="d2a00af2061d")
DISABLE_EXITS_BEFORE_VCPUS = Rule("disable_exits_before_vcpus", "6.14", "04cd8f8628d8",
                                  "KVM: x86: Disallow KVM_CAP_X86_DISABLE_EXITS after vCPU creation",
                                  "enable KVM_CAP_X86_DISABLE_EXITS before creating any vCPU")
DISABLE_EXITS_ALLOWED_ONLY = Rule("disable_exits_allowed_only", "6.14", "c829ccd4d9dc",
                                  "KVM: x86: Reject disabling of MWAIT/HLT interception when not allowed: an exit the "
                                  "host may not disable is EINVAL; before, any valid exit (0xF) was taken and MWAIT "
                                  "was ignored where the host cannot (6.12.118 x86.c:6123-6147)",
                                  "ask KVM_CHECK_EXTENSION(KVM_CAP_X86_DISABLE_EXITS) for the exits this host allows")
XTILE_CFG_FILTER = Rule("xtile_cfg_filter", "6.4", "55cd57b596e8",
                        "KVM: x86: Filter out XTILE_CFG if XTILE_DATA isn't permitted (supported CPUID 0xD.0)")
MISC_FEATURES_CPUID_FAULT = Rule("misc_features_cpuid_fault", "< 5.10", "kvm_set_msr_common",
                                 "MISC_FEATURES_ENABLES takes only CPUID_FAULT (bit 0), and only when PLATFORM_INFO "
                                 "has CPUID_FAULT (bit 31)", "set PLATFORM_INFO.CPUID_FAULT first; write 0 or 1 only")
VMX_RESTORE = Rule("vmx_restore", "< 5.10", "vmx_set_vmx_msr",
                   "nVMX: host writes of VMX MSRs must be restorable against KVM's nested capabilities",
                   "VMX MSRs may only restrict KVM's nested capabilities (system KVM_GET_MSRS); 0x481-0x484, "
                   "CR0_FIXED1 and CR4_FIXED1 are never writable; set CPUID.1:ECX.VMX first")
PERF_CAP_SUBSET = Rule("perf_cap_subset", "< 5.10", "kvm_set_msr_common",
                       "PERF_CAPABILITIES must be a subset of kvm_caps.supported_perf_cap",
                       "write a subset of the PERF_CAPABILITIES feature value (system KVM_GET_MSRS), with the host's "
                       "LBR and PEBS formats")
DE_CFG_SUBSET = Rule("de_cfg_subset", "< 5.10", "svm_set_msr",
                     "DE_CFG writes must be a subset of the supported bits (LFENCE_SERIALIZE)",
                     "write a subset of the DE_CFG feature value")
UNSUPPORTED = Rule("unsupported", "-", "-", "the MSR is not supported for this vCPU and the value is not 0")
UNKNOWN_MSR = Rule("unknown_msr", "-", "-", "KVM does not know this MSR (not advertised, ignore_msrs=N)",
                   "this KVM does not know the MSR: leave it out (see KVM_GET_MSR_INDEX_LIST)")
HOST_PROFILE = Rule("host_profile", "-", "-",
                    "this host's KVM refuses the value (observed behaviour recorded in the profile)",
                    "this host's KVM refuses this value for this MSR (see the profile's msr_behaviour)")

RULES: dict[str, Rule] = {
    r.key: r
    for r in (FREEZE, SAME_VALUE_REAL_WRITE, UNSUPPORTED_ZERO, PLATFORM_INFO_IMMUTABLE, STUFF_QUIRK, PERF_CAP_NEEDS_PDCM,
              ARCH_CAP_NEEDS_CPUID, PLATFORM_INFO_ORDER_CHECK, PERF_CAP_PMU_VERSION, PEBS_TIMING_INFO, PERF_CAP_LBR_FMT,
              PERF_CAP_NO_LEGACY_LBR, PEBS_EPT_SPR, ADAPTIVE_PEBS_OFF, CR4_FIXED1_LAM,
              CR4_FIXED1_CET, DE_CFG_GUEST_EXACT, DE_CFG_GUEST_SAME_ONLY, CPUID_AFTER_RUN_FORBIDDEN,
              CPUID_AFTER_RUN_IDENTICAL, VMX_RESTORE_CURRENT, QUIRKS2, MISC_FEATURES_CPUID_FAULT, FEAT_CTL_HOST_ANY_SUPPORTED,
              FEAT_CTL_GUEST_CPUID, DISABLE_EXITS_BEFORE_VCPUS, DISABLE_EXITS_ALLOWED_ONLY, XTILE_CFG_FILTER,
              SLOT_ZAP_ALL_QUIRK, MSR_IO_LIMIT, VMX_RESTORE,
              PERF_CAP_SUBSET, DE_CFG_SUBSET, MCI_CTL2, MTRR_MSR_RANGES, MTRR_AS_WRITTEN, XFD_MSRS, CET_MSRS, FLUSH_CMD_MSR,
              APIC_BASE_BSP_FORCED, EFER_AUTOIBRS, PV_EOI_STORED_ON_FAILURE, GUEST_CPU_CAPS, APIC_BASE_SAME_VALUE,
              SREGS_EFER_CHECKED, PRED_CMD_SBPB, VMX_WAIT_SIPI, VMX_TSC_SCALING, VMX_USR_WAIT_PAUSE,
              VMX_NESTED_CET, ARCH_CAP_GDS_NO, ARCH_CAP_RFDS_NO, ARCH_CAP_ITS_NO, DEBUGCTL_COMMON, DEBUGCTL_VMX,
              DEBUGCTL_HOST_IGNORES_CPUID, DEBUGCTL_RTM_DEBUG, DEBUGCTL_SVM, DEBUGCTL_SVM_PINS_DROPPED,
              DEBUGCTL_SVM_BTF_DROPPED, CPUID_AVX512_FP16, CPUID_AVX_VNNI, CPUID_BUS_LOCK_DETECT, CPUID_AMD_PSFD,
              CPUID_X87_DEPRECATED, CPUID_80000021, CPUID_NO_SMM_CTL_MSR, CPUID_DS_DTES64, CPUID_FAST_REP_STRINGS,
              CPUID_PERFMON_V2, CPUID_7_2_EDX, CPUID_AVX10, CPUID_TSC_DEADLINE, CPUID_HYPERVISOR, *CAP_ARRIVALS,
              *ENABLE_ARRIVALS, *CAP_LIMITS,
              X2APIC_ICR_64BIT, X2APIC_ICR_SPLIT_SVM, X2APIC_ICR_RESERVED,
              X2APIC_HIGH_BITS, X2APIC_SELF_IPI_VECTOR, X2APIC_SELF_IPI_KEEPS_ICR,
              X2APIC_LEAVE_SETS_XAPIC_ID, X2APIC_ID_READONLY,
              REFUSED_READ_ZEROED, SMBASE_NEEDS_SMM, X2APIC_SUPPRESS_EOI_FLAGS, SREGS_CR0_CHECKED, CR4_PCIDE_GATED,
              CR4_VENDOR_HOOK, CR4_LAM_SUP, CR4_CET, CR4_GUEST_AT_CREATE, NMI_PENDING_COUNT,
              INTEL_GUEST_CHECKS, INTEL_COMPATIBLE_CHECKS, UNSUPPORTED, UNKNOWN_MSR,
              HOST_PROFILE, *emulated.RULES)
}


def rule(key: str) -> Rule:
    """The rule named ``key``; an unknown key is an error, not a fallback."""
    try:
        return RULES[key]
    except KeyError:
        import difflib  # only for the message (kept out of `import kvmscope`: tests/test_import_footprint.py)

        close = difflib.get_close_matches(key, RULES, n=3) if isinstance(key, str) and len(key) <= 100 else []
        hint = f"did you mean {', '.join(close)}?" if close else f"{len(RULES)} rules, listed in docs/rules.md"
        raise InvalidValueError(f"no rule named {shown(key)}; {hint}") from None


PEBS_MASK = 0x4FC0  # PERF_CAP_PEBS_MASK before PEBS_TIMING_INFO


@dataclass(frozen=True)
class Ruleset:
    """What one kernel version does with the vCPU model: the rules in force there. Its flags are cached properties
    (a ruleset never changes): the model's MSR rules read them on every entry."""

    version: str
    rules: frozenset[Rule]

    def has(self, r: Rule) -> bool:
        return r in self.rules

    @cached_property
    def freeze(self) -> bool:
        return FREEZE in self.rules

    @cached_property
    def same_value_real_write(self) -> bool:
        return SAME_VALUE_REAL_WRITE in self.rules

    @cached_property
    def unsupported_zero(self) -> bool:
        return UNSUPPORTED_ZERO in self.rules

    @cached_property
    def platform_info_immutable(self) -> bool:
        return PLATFORM_INFO_IMMUTABLE in self.rules

    @cached_property
    def stuff_quirk(self) -> bool:
        return STUFF_QUIRK in self.rules

    @cached_property
    def cpuid_gated_caps(self) -> bool:
        """ARCH_CAP needs CPUID.7.0:EDX[29] and PERF_CAP needs PDCM, for host and guest accesses (6.13)."""
        return ARCH_CAP_NEEDS_CPUID in self.rules and PERF_CAP_NEEDS_PDCM in self.rules

    @cached_property
    def platform_info_order_check(self) -> bool:
        return PLATFORM_INFO_ORDER_CHECK in self.rules

    @cached_property
    def perf_cap_pmu_version(self) -> bool:
        return PERF_CAP_PMU_VERSION in self.rules

    @cached_property
    def perf_cap_pebs_mask(self) -> int:
        return PEBS_MASK | (1 << 17 if PEBS_TIMING_INFO in self.rules else 0)

    @cached_property
    def cr4_fixed1_lam(self) -> bool:
        return CR4_FIXED1_LAM in self.rules

    @cached_property
    def cr4_fixed1_cet(self) -> bool:
        return CR4_FIXED1_CET in self.rules

    @cached_property
    def de_cfg_guest_same_only(self) -> bool:
        return DE_CFG_GUEST_SAME_ONLY in self.rules

    @cached_property
    def guest_cpu_caps(self) -> bool:
        """A guest CPUID feature counts for the MSR code only when KVM supports it too (6.14, ``guest_cpu_cap_has``);
        before, the guest's bit alone (``guest_cpuid_has``)."""
        return GUEST_CPU_CAPS in self.rules

    @cached_property
    def absent_cpuid(self) -> tuple[tuple[int, int, str, int], ...]:
        """The supported-CPUID bits this version's KVM does not offer yet (``CPUID_ARRIVALS``)."""
        return tuple(bit for r, bits in CPUID_ARRIVALS.items() if r not in self.rules for bit in bits)

    @cached_property
    def cpuid_limits(self) -> dict[int, int]:
        """The leaf limits this version's KVM has not raised yet (``CPUID_LIMITS``): function -> the lowest limit."""
        out: dict[int, int] = {}
        for r, (function, limit) in CPUID_LIMITS.items():
            if r not in self.rules:
                out[function] = min(out.get(function, limit), limit)
        return out

    @cached_property
    def guest_vendor_checks(self) -> str:
        """Who decides SVM's SYSENTER high halves and TSC_AUX's bits 63:32: "vendor" (the vendor module, before 5.13),
        "intel" (a GenuineIntel guest CPUID, 5.13-6.9) or "intel_compatible" (any but AMD or Hygon, 6.10)."""
        if INTEL_COMPATIBLE_CHECKS in self.rules:
            return "intel_compatible"
        return "intel" if INTEL_GUEST_CHECKS in self.rules else "vendor"

    @cached_property
    def absent_features(self) -> dict[int, tuple[int, int]]:
        """The feature-MSR fields this version's KVM does not advertise yet (``FEATURE_ARRIVALS``): index -> (mask, the
        field's value before)."""
        return self.absent_fields()

    def absent_fields(self, host: Iterable[tuple[Rule, int, int, int]] = ()) -> dict[int, tuple[int, int]]:
        """``absent_features`` with a host's own arrivals, (rule, index, mask, before) each (a profile's ``history``).
        Where two fields overlap the older rule's value wins: before it, the later one had nothing to change (intel-spr's
        PEBS_BASELINE, kept 6.3-6.8, is not there before 6.3 brings PEBS)."""
        out: dict[int, tuple[int, int]] = {}
        # newest first, so that an older release's value wins; at one release a host's own entry wins (applied last)
        for _, index, mask, before in sorted(self.absent_arrivals(host), key=lambda a: a[0].start or OLDEST,
                                             reverse=True):
            m, b = out.get(index, (0, 0))
            out[index] = (m | mask, b & ~mask | before)
        return out

    def absent_arrivals(self, host: Iterable[tuple[Rule, int, int, int]] = ()) -> list[tuple[Rule, int, int, int]]:
        """The feature-MSR arrivals not in force here, (rule, index, mask, before), ``FEATURE_ARRIVALS`` and a host's
        own, the oldest release first."""
        absent = [(r, *f) for r, fields in FEATURE_ARRIVALS.items() for f in fields if r not in self.rules]
        absent += [a for a in host if a[0] not in self.rules]
        return sorted(absent, key=lambda a: a[0].start or OLDEST)

    @cached_property
    def absent_caps(self) -> frozenset[int]:
        """The capabilities this version's KVM_CHECK_EXTENSION does not report yet (``CAP_ARRIVALS``)."""
        return frozenset(c for r, caps in CAP_ARRIVALS.items() if r not in self.rules for c in caps)

    @property
    def guest_memfd_on_any_vm(self) -> bool:
        """KVM_CAP_GUEST_MEMFD (234) on a VM: 6.8-6.17 ``kvm_arch_has_private_mem(kvm)``, 0 for a default VM (6.12.118
        kvm_main.c:4999-5002); from 6.18 1 wherever guest_memfd is built in."""
        return CAPS_6_18 in self.rules

    def leaf_arrival(self, function: int, index: int) -> Rule | None:
        """The rule that makes KVM_GET_SUPPORTED_CPUID list leaf ``function``.``index`` after this version, if it has
        not come yet: a raised limit (``CPUID_LIMITS``), or for a sub-leaf of 0xD the XCR0 or XSS bit it describes."""
        if function == 7:
            key, n = 7, index
        elif function < 0x40000000:
            key, n = 0, function
        else:
            key, n = (0x80000000 if 0x80000000 <= function <= 0x8FFFFFFF else -1), function
        for r, (f, limit) in CPUID_LIMITS.items():
            if r not in self.rules and f == key and n > limit:
                return r
        if function == 0xD and index >= 2:
            bit = [(0xD, 0, "eax" if index < 32 else "edx", index % 32), (0xD, 1, "ecx" if index < 32 else "edx",
                                                                          index % 32)]
            return next((r for r, bits in CPUID_ARRIVALS.items() if r not in self.rules and set(bits) & set(bit)),
                        None)
        return None

    def cap_arrival(self, cap: int) -> Rule | None:
        """The rule that brings ``cap`` after this version (``CAP_ARRIVALS``), if it has not come yet."""
        return next((r for r, caps in CAP_ARRIVALS.items() if cap in caps and r not in self.rules), None)

    def cap_limit(self, cap: int, reported: int) -> int:
        """KVM_CAP_NR_MEMSLOTS, MAX_VCPUS, MAX_VCPU_ID and NR_VCPUS at this version, for a host whose own kernel reports
        ``reported`` (``CAP_LIMITS``)."""
        if cap == 10 and CAP_MEMSLOTS_32764 not in self.rules:
            return 509
        if cap in (66, 128) and CAP_MAX_VCPUS_1024 not in self.rules:
            return 288 if cap == 66 else 1023
        if cap == 9 and CAP_NR_VCPUS_ONLINE not in self.rules:
            return 710 if CAP_NR_VCPUS_710 in self.rules else 240
        return reported

    def limit_rule(self, cap: int) -> Rule | None:
        """The rule that raises ``cap``'s limit after this version (``CAP_LIMITS``), if it has not come yet."""
        by_cap = {10: (CAP_MEMSLOTS_32764,), 66: (CAP_MAX_VCPUS_1024,), 128: (CAP_MAX_VCPUS_1024,),
                  9: (CAP_NR_VCPUS_710, CAP_NR_VCPUS_ONLINE)}
        return next((r for r in by_cap.get(cap, ()) if r not in self.rules), None)

    def flags_arrival(self, cap: int, flags: int) -> Rule | None:
        """The rule that lets KVM_ENABLE_CAP take ``flags`` of ``cap`` after this version, if not come yet: the
        suppress-EOI flags of X2APIC_API (bits 2-3), and the quirks of DISABLE_QUIRKS2 (bit 7; bits 8-10)."""
        candidates = {129: ((0xC, X2APIC_SUPPRESS_EOI_FLAGS),),
                      213: ((0x80, SLOT_ZAP_ALL_QUIRK), (0x700, STUFF_QUIRK))}.get(cap, ())
        return next((r for mask, r in candidates if flags & mask and r not in self.rules), None)

    def enable_arrival(self, cap: int) -> Rule | None:
        """The rule that lets KVM_ENABLE_CAP take ``cap`` after this version (``ENABLE_ARRIVALS``), if not come yet."""
        return next((r for r, caps in ENABLE_ARRIVALS.items() if cap in caps and r not in self.rules), None)

    def vapic_on(self, vendor: str, flexpriority: bool = True) -> bool:
        """KVM_CAP_VAPIC: before 5.18 (8a2897853c53) 0 where the vendor accelerates the TPR (``!cpu_has_accelerated_tpr``:
        VMX with ``kvm_intel.flexpriority``; 5.10.262 x86.c:3903)."""
        return vendor != "vmx" or not flexpriority or CAPS_5_18 in self.rules

    @cached_property
    def absent_msrs(self) -> frozenset[int]:
        """The MSRs this version's KVM does not know yet (``MSR_ARRIVALS``)."""
        return frozenset(i for r, indices in MSR_ARRIVALS.items() if r not in self.rules for i in indices)

    @cached_property
    def mci_ctl2(self) -> bool:
        """0x280-0x29F are the MCi_CTL2 MSRs (6.0); before, they are in the MTRR range."""
        return MCI_CTL2 in self.rules

    @cached_property
    def mtrr_msr_ranges(self) -> bool:
        """Only the MTRRs' own ranges go to the MTRR code (6.5); before, 0x200-0x2FF less the MCi_CTL2 banks."""
        return MTRR_MSR_RANGES in self.rules

    @cached_property
    def mtrr_as_written(self) -> bool:
        """Variable MTRRs read back as written (6.11); before, with the reserved GPA bits of the time."""
        return MTRR_AS_WRITTEN in self.rules

    @property
    def cpuid_after_run(self) -> str:
        """What KVM_SET_CPUID2 after KVM_RUN does: "free" (before 5.16), "forbidden" (5.16.0-5.16.2) or "identical"."""
        if CPUID_AFTER_RUN_IDENTICAL in self.rules:
            return "identical"
        return "forbidden" if CPUID_AFTER_RUN_FORBIDDEN in self.rules else "free"

    def supported_quirks(self, reported: int) -> int:
        """KVM_CAP_DISABLE_QUIRKS2 at this version, for a host whose own kernel reports ``reported``: 0 before the
        capability (5.18); bits 0-6 up to 6.11 (6.1.192 kvm_host.h:2134-2141); SLOT_ZAP_ALL (bit 7) from 6.12; bits
        8-10 (STUFF_FEATURE_MSRS, IGNORE_GUEST_PAT, VMCS12_ALLOW_FREEZE_IN_SMM) with the quirk series (6.13, 6.12.78:
        6.12.118 kvm_host.h:2397-2408). The host's own report caps it: a vendor may withhold a quirk."""
        if QUIRKS2 not in self.rules:
            return 0
        mask = 0x7F | (0x80 if SLOT_ZAP_ALL_QUIRK in self.rules else 0) | (0x700 if STUFF_QUIRK in self.rules else 0)
        return reported & mask

    def x2apic_api_flags(self, reported: int) -> int:
        """KVM_CAP_X2APIC_API at this version, for a host whose own kernel reports ``reported``: bits 0-1
        (KVM_X2APIC_VALID_FLAGS before 6517dfbcc918), bits 2-3 with the suppress-EOI-broadcast flags."""
        return reported & (0xF if X2APIC_SUPPRESS_EOI_FLAGS in self.rules else 0x3)

    def feature_msr(self, index: int) -> bool:
        """Whether this version lists ``index`` among the feature MSRs (if the host offers it): PLATFORM_INFO joined
        ``msr_based_features_all_except_vmx`` with bc2ca3680b30 (6.13), not backported (6.12.118 x86.c:439-444)."""
        from .. import msrs

        return index != msrs.MSR_PLATFORM_INFO or self.platform_info_immutable

    @cached_property
    def immutable_generic(self) -> frozenset[int]:
        """The generic feature MSRs that are immutable after the first run (kvm_is_immutable_feature_msr)."""
        from .. import msrs

        base = {msrs.MSR_AMD64_DE_CFG, msrs.MSR_IA32_ARCH_CAPABILITIES, msrs.MSR_IA32_PERF_CAPABILITIES}
        if self.platform_info_immutable:
            base.add(msrs.MSR_PLATFORM_INFO)
        return frozenset(base)


KNOWN: list[str] = sorted({_label(v) for r in RULES.values() for v in r.versions() if v >= OLDEST} | set(LTS)
                          | {_label(OLDEST)}, key=parse_version)
NEWEST = max((v for v in KNOWN if parse_version(v)[2] == 0), key=parse_version)  # the newest mainline release known


def resolve(version: str) -> Ruleset:
    """The ruleset in force for a kernel version, labelled with the newest release where a rule changed at or before
    it: ``"6.9"`` gets the 6.8 rules; ``"6.18.44-fc"`` the 6.18 ones; a stable release gets its series' backports."""
    wanted = parse_version(version)
    if wanted < OLDEST:
        raise InvalidValueError(f"kernel {version!r} is older than the oldest ruleset ({KNOWN[0]}); known: {KNOWN[0]} to "
                                f"{KNOWN[-1]}, {len(KNOWN)} releases (docs/rules.md, 'Rules by kernel version')")
    boundaries = [v for v in map(parse_version, KNOWN) if v <= wanted and (v[2] == 0 or v[:2] == wanted[:2])]
    label = _label(max(boundaries))
    return Ruleset(label, frozenset(r for r in RULES.values() if r.in_force(wanted)))


def changes_at(version: str) -> list[str]:
    """What changes at ``version`` (a label in ``KNOWN``) against the ruleset before it: "+key" for a rule that starts,
    "-key" for one that ends. The oldest version lists every rule in force there."""
    i = KNOWN.index(version)
    now = resolve(version).rules
    if i == 0:
        return sorted(f"+{r.key}" for r in now)
    wanted = parse_version(version)
    # the ruleset just before: the previous release of the same series for a stable one, else the previous mainline
    earlier = [v for v in map(parse_version, KNOWN[:i]) if v[2] == 0 or v[:2] == wanted[:2]]
    before = resolve(_label(max(earlier))).rules if wanted[2] else resolve(_label(max(
        v for v in earlier if v[2] == 0))).rules
    return sorted([f"+{r.key}" for r in now - before] + [f"-{r.key}" for r in before - now])


def version_table() -> str:
    """The "Rules by kernel version" table of docs/rules.md (Markdown), one row per known version."""
    rows = ["| Version | Changes |", "|---|---|"]
    for v in KNOWN:
        changes = changes_at(v)
        rows.append(f"| {v} | {', '.join(f'`{c}`' for c in changes) if changes else 'no rule changes (LTS)'} |")
    return "\n".join(rows)


def newer_than_known(version: str) -> str | None:
    """A warning when ``version`` is a release after the newest one the rules were read at (its rules may have
    changed since), naming the ruleset in force; None otherwise."""
    wanted, newest = parse_version(version), parse_version(NEWEST)
    if wanted[:2] <= newest[:2]:
        return None
    later = sorted(r.key for r in RULES.values() if r.start == AFTER_KNOWN)
    unpinned = f", without the later changes it knows but has not pinned to a release ({', '.join(later)})" if later else ""
    return (f"kernel {version} is newer than the newest mainline release the model knows ({NEWEST}): using the "
            f"{NEWEST} rules{unpinned}, which may miss other later changes")
