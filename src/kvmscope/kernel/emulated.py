"""Rules for the MSRs KVM emulates in common code (``kvm_set_msr_common``/``kvm_get_msr_common`` and the helpers they
call): the rule each refusal names. Line numbers are in the extracted 6.12 tree (``arch/x86/kvm``); the same code is in
``CachyOS/linux`` ``arch/x86/kvm/x86.c`` @4703912f5e30 (6.18+) unless a rule says otherwise.
"""

from __future__ import annotations

from .rule import Rule

MTRR_VALID = Rule("mtrr_valid", "< 5.10", "mtrr.c kvm_mtrr_valid",
                  "MTRR values: memory types 0, 1, 4, 5, 6 only; MTRRdefType bits 63:12 and 9:8 reserved; a variable "
                  "range's base/mask reserves the bits above the guest MAXPHYADDR and 11:8 (base) or 10:0 (mask)",
                  "write a valid memory type and keep reserved bits clear")
MTRR_UNKNOWN = Rule("mtrr_unknown", "< 5.10", "mtrr.c msr_mtrr_valid (find_mtrr from 6.11)",
                    "an index KVM sends to the MTRR code that is not an MTRR (0x200-0x26F; before 6.5 0x200-0x2FF, "
                    "less 0x280-0x29F from 6.0): the access fails, whatever ignore_msrs says",
                    "only 0x200-0x20F, 0x250, 0x258, 0x259, 0x268-0x26F and 0x2FF are MTRRs")
PAT_VALID = Rule("pat_valid", "< 5.10", "x86.h kvm_pat_valid",
                 "IA32_PAT: every byte must be a memory type 0, 1, 4, 5, 6 or 7", "write valid PAT entries")
APIC_BASE_VALID = Rule("apic_base_valid", "< 5.10", "lapic.c kvm_apic_set_base",
                       "APIC_BASE: bits above MAXPHYADDR, 9 and 7:0 are reserved, x2APIC (bit 10) needs CPUID.X2APIC, "
                       "x2APIC without enable is invalid; a guest may not go x2APIC->xAPIC or disabled->x2APIC",
                       "set CPUID.1:ECX.X2APIC before enabling x2APIC; keep reserved bits clear")
EFER_RESERVED = Rule("efer_reserved", "< 5.10", "x86.c set_efer",
                     "EFER: bits outside efer_reserved_bits' complement (SCE, LME, LMA, NX and the vendor's) are "
                     "refused; a guest also needs the CPUID bit of each (LM, NX, SVM, FFXSR, AUTOIBRS) and may not "
                     "toggle LME with paging on", "write only bits this host's KVM enables")
CANONICAL = Rule("canonical_msr", "< 5.10", "x86.c __kvm_set_msr",
                 "FS_BASE, GS_BASE, KERNEL_GS_BASE, LSTAR, CSTAR must hold canonical addresses (48-bit without LA57)",
                 "sign-extend the address from bit 47")
TSC_AUX = Rule("tsc_aux", "< 5.10", "x86.c __kvm_set_msr/__kvm_get_msr",
               "TSC_AUX: a guest needs CPUID RDTSCP or RDPID; bits 63:32 are reserved for an Intel-compatible guest "
               "CPUID and dropped otherwise", "keep the value in 32 bits, or set an AMD vendor in CPUID leaf 0")
MCE = Rule("mce", "< 5.10", "x86.c set_msr_mce/get_msr_mce",
           "machine-check MSRs: MCG_CTL needs MCG_CAP.CTL_P (only 0 from userspace without it), MCi_CTL takes 0 or all "
           "ones (bits 10 and 0 may be clear), MCi_CTL2 needs CMCI_P, banks beyond MCG_CAP.Count fail, a guest writes "
           "non-zero MCi_STATUS only with an AMD CPUID and HWCR.McStatusWrEn", "stay within MCG_CAP")
HWCR = Rule("hwcr", "< 5.10", "x86.c kvm_set_msr_common (MSR_K7_HWCR)",
            "HWCR: only McStatusWrEn (18) and TscFreqSel (24) may be set (bits 3, 6 and 8 are ignored)", "")
PV_MSR = Rule("kvm_pv_msr", "< 5.10", "x86.c kvm_set_msr_common (MSR_KVM_*)",
              "KVM PV MSRs: STEAL_TIME reserves bits 5:1, POLL_CONTROL takes only bit 0, PV_EOI needs a 4-byte aligned "
              "address inside guest memory when enabled, ASYNC_PF_EN reserves bits 5:4 and needs an in-kernel LAPIC "
              "for a non-zero value, ASYNC_PF_INT needs an in-kernel LAPIC", "create an in-kernel irqchip first")
HOST_ONLY = Rule("host_only", "< 5.10", "x86.c kvm_set_msr_common",
                 "only userspace may write this MSR (SMBASE, SMI_COUNT) or read it (SMBASE)", "")
CPUID_GATED = Rule("needs_cpuid_bit", "< 5.10", "x86.c kvm_set_msr_common/kvm_get_msr_common",
                   "the MSR needs a guest CPUID bit (OSVW, XSAVES for XSS, XFD, FLUSH_L1D, x2APIC mode...)",
                   "set the CPUID bit with KVM_SET_CPUID2 first")
VALUE_RESERVED = Rule("msr_reserved_bits", "< 5.10", "x86.c kvm_set_msr_common",
                      "the value sets bits KVM does not support for this MSR (XSS, XFD, PRED_CMD, FLUSH_CMD, "
                      "MMIO_CONF_BASE...)", "write only supported bits")
SVM_HSAVE_PA = Rule("svm_hsave_pa", "< 5.10", "svm.c svm_set_msr (MSR_VM_HSAVE_PA)",
                    "on SVM the vendor module keeps VM_HSAVE_PA (page-aligned, data & PAGE_MASK) and a guest must "
                    "write a page-aligned address within MAXPHYADDR (5.10.262 svm.c:2547, 2747-2757; 6.12.118 "
                    "svm.c:2980, 3290-3300); elsewhere the write is ignored and reads 0",
                    "write a page-aligned guest-physical address")
MISC_ENABLE_RO = Rule("misc_enable_ro", "6.0", "9fc222967a39",
                      "KVM: x86: Give host userspace full control of MSR_IA32_MISC_ENABLES: a guest may not change "
                      "MISC_ENABLE's BTS/PEBS-unavailable bits (12:11), its writes of EMON (7) are ignored, and a vCPU "
                      "resets with both bits set (0x1800); before, a vCPU resets at 0 and only the MWAIT rule holds "
                      "(5.10.262 x86.c:3224-3233; 6.1.192 x86.c:3672-3694, 12235)", "")
READ_ONLY = Rule("read_only_msr", "< 5.10", "x86.c kvm_get_msr_common",
                 "KVM emulates reads of this MSR only (a constant); a write is unsupported", "")
X2APIC_NO_IRQCHIP = Rule("x2apic_needs_irqchip", "< 5.10", "lapic.c kvm_x2apic_msr_write/read",
                         "x2APIC MSRs need an in-kernel LAPIC in x2APIC mode", "create an in-kernel irqchip")
X2APIC_NOT_READABLE = Rule("x2apic_not_readable", "< 5.10", "lapic.c kvm_lapic_reg_read (kvm_lapic_readable_reg_mask)",
                           "an x2APIC MSR with no readable register: reserved offsets, the write-only EOI and SELF_IPI, "
                           "and ARBPRI, DFR and ICR2, which exist in xAPIC mode only (LVTCMCI needs MCG_CAP.CMCI_P)", "")
X2APIC_NOT_WRITABLE = Rule("x2apic_not_writable", "< 5.10", "lapic.c kvm_lapic_reg_write",
                           "an x2APIC register a write does not change: the ID, LDR, DFR and ICR2 in x2APIC mode, the "
                           "read-only LVR, PPR, ISR, TMR, IRR and TMCCT, reserved offsets (LVTCMCI needs CMCI_P)", "")
X2APIC_ESR_NONZERO = Rule("x2apic_esr_nonzero", "< 5.10", "lapic.c kvm_lapic_reg_write (APIC_ESR)",
                          "x2APIC ESR (0x828) takes only 0, which changes nothing", "write 0")
XSS_NEEDS_XSAVES = Rule("xss_needs_xsaves", "6.18", "CET series, lore 20250919223258.1604852-1-seanjc@google.com",
                        "IA32_XSS needs CPUID.XSAVES from userspace too (KVM_MSR_RET_UNSUPPORTED without it) and takes "
                        "only the guest's supported XSS bits; before, userspace could write any bit KVM supports",
                        "set CPUID.(EAX=0xD,ECX=1):EAX.XSAVES before restoring XSS")
CANONICAL_HOST_WIDTH = Rule("canonical_msr_host_width", "6.13", "is_noncanonical_msr_address (model canonical checks "
                            "more precisely, M. Levitsky)",
                            "MSR addresses are checked, and SYSENTER_ESP/EIP made canonical, with the host's "
                            "virtual-address width (57 with host LA57), not the guest's CR4.LA57; before 6.13 (6.12.41 in "
                            "6.12.y) the guest's CR4.LA57 chose 57 or 48 (6.1.192 x86.c:1872, 6.12.118 x86.c:1456)", "",
                            stable=("6.12.41",))  # Debian's 6.12 changelog lists it under ChangeLog-6.12.41

# The MSRs whose host writes depend on an in-kernel LAPIC (x86.c v6.12 kvm_pv_enable_async_pf, line 3132, and
# kvm_pv_enable_async_pf_int, line 3171); without one the host profile's observed behaviour stands.
ASYNC_PF_INT_NEEDS_LAPIC = Rule(
    "async_pf_int_needs_lapic", "5.8", "2635b5c4a0e4", "KVM: x86: interrupt based APF 'page ready' event delivery",
    "MSR_KVM_ASYNC_PF_INT takes an 8-bit vector, and only with an in-kernel LAPIC (KVM_CREATE_IRQCHIP first)")
ASYNC_PF_EN_NEEDS_LAPIC = Rule(
    "async_pf_en_needs_lapic", "5.8", "2635b5c4a0e4", "KVM: x86: interrupt based APF 'page ready' event delivery",
    "MSR_KVM_ASYNC_PF_EN: bits 4-5 are reserved; enabling it needs an in-kernel LAPIC and its GPA in guest memory")
HWCR_TSCFREQSEL = Rule("hwcr_tscfreqsel", "6.7", "8b0e00fba934",
                       "KVM: x86: Virtualize HWCR.TscFreqSel[bit 24] (with 598a790fc20f: McStatusWrEn can be cleared)",
                       "before 6.7 HWCR takes only McStatusWrEn (bit 18) alone, and a write of 0 does not clear it")

RULES: tuple[Rule, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Rule))
