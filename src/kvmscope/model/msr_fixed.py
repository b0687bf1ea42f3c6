"""The MSRs ``kvm_get_msr_common``/``kvm_set_msr_common`` answer with constants (arch/x86/kvm/x86.c of the extracted 6.12
tree): fixed reads, ignored writes, and the legacy PMU with the PMU off. ``msr_misc`` gives them their handlers."""

from __future__ import annotations

# kvm_get_msr_common's constant reads (x86.c:3786-3811, 3901-3917, 3940-3945): the value; writes are unsupported.
READ_ONLY: dict[int, int] = {
    0x17: 0, 0x2A: 0, 0x1DB: 0, 0x1DC: 0, 0x1DD: 0, 0x1DE: 0,  # PLATFORM_ID, EBL_CR_POWERON, LBR/LER from/to
    0xC0010010: 0, 0xC0010112: 0, 0xC0010113: 0, 0xC0010055: 0,  # SYSCFG, TSEG_ADDR/MASK, INT_PENDING_MSG
    0x199: 0, 0x606: 0, 0x639: 0, 0x641: 0, 0x611: 0, 0x619: 0,  # PERF_CTL, RAPL unit and energy status
    0xCD: 3, 0x2C: 1 << 24, 0x198: 1000 | 4 << 40,  # FSB frequency, EBC_FREQUENCY_ID, PERF_STATUS
}
# kvm_set_msr_common's ignored writes (x86.c:3354-3362, 3592-3601, 3621-3626) and what a read gives (None: the read
# is unsupported).
WRITE_IGNORED: dict[int, int | None] = {
    0xC001001F: 0, 0xC0010117: 0, 0xC001102A: 0, 0xC0011022: 0, 0xC0011023: 0, 0xC001102C: 0,  # NB_CFG .. EX_CFG
    0x79: None, 0xC0010020: None,  # UCODE_WRITE, PATCH_LOADER
    0xC001001B: 0x20000000, 0x11E: 0xBE702111,  # K7_CLK_CTL, BBL_CR_CTL3
}
# The legacy PMU MSRs with the PMU off (kvm.enable_pmu=N): kvm_pmu_is_valid_msr is false, reads give 0, writes drop.
LEGACY_PMU = frozenset((*range(0xC0010000, 0xC0010008), 0xC1, 0xC2, 0x186, 0x187))
