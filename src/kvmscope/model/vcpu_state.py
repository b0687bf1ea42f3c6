"""The model's answers to the VMM's vCPU ioctls: LAPIC, MP state, vCPU events, debug registers, TSC frequency,
injection and the rest (FPU, XSAVE and XCRS in ``fpu_state``), as ``arch/x86/kvm/x86.c`` and ``lapic.c`` (v6.12) handle them.

What the model keeps is the state these ioctls save and restore, with the kernel's checks on the way in. What it does
not emulate (interrupt delivery into the guest, single-stepping, paging for KVM_TRANSLATE, nested state, SMM where the
profile has it) raises :class:`~kvmscope.model.vcpu.ModelLimitation`, or the errno the profiled kernel gives where it
refuses the ioctl itself. ``docs/binding.md`` lists each.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import uapi
from ..api import HltExit
from ..errors import InvalidValueError, KvmError, KvmscopeError
from ..kernel import rulesets as R
from ..kernel.emulated import ASYNC_PF_EN_NEEDS_LAPIC, ASYNC_PF_INT_NEEDS_LAPIC
from . import x2apic
from .fpu_state import FpuStateModel
from .msr_rules import FAIL as _FAIL
from .msr_rules import OK as _OK
from .vm_devices import MODEL_TSC_KHZ

if TYPE_CHECKING:
    from ..api import CpuidEntry, Exit
    from ..kernel.profile import Profile
    from .msr_batch import BatchedMsrRules
    from .vm import ModelVm

# The local APIC page at reset (lapic.c kvm_lapic_reset, v6.12 lines 2806-2870; values as KVM_GET_LAPIC shows them).
APIC_ID, APIC_LVR, APIC_DFR, APIC_SPIV = 0x20, 0x30, 0xE0, 0xF0
APIC_LVT = (0x320, 0x330, 0x340, 0x350, 0x360, 0x370)  # timer, thermal, PMC, LINT0, LINT1, error
APIC_TPR, APIC_PPR, APIC_ISR, APIC_IRR = 0x80, 0xA0, 0x100, 0x200
APIC_LVT0, APIC_LVT_MASKED, APIC_MODE_EXTINT = 0x350, 1 << 16, 0x700
APIC_VERSION = 0x14 | (len(APIC_LVT) - 1) << 16  # integrated APIC, six LVT entries
APIC_SPIV_ENABLED, MSR_APIC_BASE_ENABLE = 1 << 8, 1 << 11
MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT = 0x4B564D01, 0x4B564D02, 0x4B564D06
MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_LVTT, APIC_TMICT, APIC_TMCCT = 0x320, 0x380, 0x390
LVTT_MODE_SHIFT, LVTT_TSC_DEADLINE = 17, 2
GUESTDBG_RUN_CHANGING = uapi.KVM_GUESTDBG_SINGLESTEP | uapi.KVM_GUESTDBG_USE_SW_BP | uapi.KVM_GUESTDBG_USE_HW_BP


def _highest_isr(page: bytes | bytearray) -> int:
    """The highest vector in service in an APIC page, or -1."""
    return max((32 * i + w.bit_length() - 1 for i in range(8)
                if (w := struct.unpack_from("<I", page, APIC_ISR + 0x10 * i)[0])), default=-1)


class VcpuStateModel(FpuStateModel):
    """The save/restore state of a model vCPU and its ioctls. Mixed into :class:`~kvmscope.model.vcpu.ModelVcpu`,
    which calls :meth:`reset_vcpu_state` when it is created."""

    vm: ModelVm
    id: int
    msr_rules: BatchedMsrRules
    profile: Profile
    rules: R.Ruleset
    regs: uapi.kvm_regs
    sregs: uapi.kvm_sregs
    cpuid: list[CpuidEntry]

    if TYPE_CHECKING:  # provided by ModelVcpu (declared here for the type checker only: a body would shadow them)

        def _check_open(self) -> None: ...

        def limitation(self, message: str) -> KvmscopeError: ...

        def try_read_msr(self, msr: int | str) -> int | None: ...

    # -- reset (kvm_arch_vcpu_create, kvm_vcpu_reset, kvm_lapic_reset) --
    def reset_vcpu_state(self) -> None:
        """The state a new vCPU has: a LAPIC page when the VM has an in-kernel irqchip, the BSP runnable and the APs
        waiting for INIT/SIPI (only with an in-kernel LAPIC), nothing pending."""
        bsp = self.id == 0
        self.lapic: bytearray | None = None
        if self.vm.lapic_in_kernel:
            lapic = bytearray(uapi.KVM_APIC_REG_SIZE)
            for offset, value in ((APIC_ID, self.id << 24), (APIC_LVR, APIC_VERSION), (APIC_DFR, 0xFFFFFFFF),
                                  (APIC_SPIV, 0xFF), *((lvt, APIC_LVT_MASKED) for lvt in APIC_LVT)):
                struct.pack_into("<I", lapic, offset, value)
            if bsp and not self.vm.disabled_quirks & uapi.KVM_X86_QUIRK_LINT0_REENABLED:
                struct.pack_into("<I", lapic, APIC_LVT0, APIC_MODE_EXTINT)
            self.lapic = lapic
            self.vm.apic_map_format = self.vm.x2apic_format  # kvm_lapic_reset rebuilds the APIC map
        self.mp_state = uapi.KVM_MP_STATE_RUNNABLE if bsp or not self.lapic else uapi.KVM_MP_STATE_UNINITIALIZED
        self.events: uapi.kvm_vcpu_events = uapi.kvm_vcpu_events()  # the kernel's fields, reported as x86.c does
        self.nmi_pending = 0
        self.sipi_vector, self.sipi_pending = 0, False  # a SIPI set by KVM_SET_MP_STATE waits (KVM_APIC_SIPI)
        self.debugregs = uapi.kvm_debugregs(dr6=0xFFFF0FF0, dr7=0x400)
        self.reset_fpu_state()
        self.tsc_khz = self.vm.default_tsc_khz
        self.guest_debug = 0
        self.signal_mask: bytes | None = None
        self.tsc_deadline_mode = False  # apic->lapic_timer.timer_mode == TSC deadline (set by KVM_SET_LAPIC)
        if self.lapic is not None:
            # with an in-kernel LAPIC these follow it (below), not the no-irqchip answers of msr_pv and msr_misc
            self.msr_rules.take_rules({MSR_KVM_ASYNC_PF_EN: self._set_async_pf_en,
                                       MSR_KVM_ASYNC_PF_INT: self._set_async_pf_int},
                                      (MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_IA32_TSC_DEADLINE))
        self.refresh_may_block()

    def refresh_may_block(self) -> None:
        """Recompute :attr:`may_block`, the one flag KVM_RUN reads before looking at :meth:`injection_pending`."""
        self.may_block = self.lapic is not None or self.injection_pending() is not None  # a LAPIC: its IRR, timer

    def update_lvtt(self, page: bytearray) -> None:
        """apic_update_lvtt (lapic.c): the timer mode is LVTT bits 17-18 under the mask CPUID allows (TSC-deadline
        only with CPUID.1:ECX[24]); entering or leaving TSC-deadline mode stops the timer: TMICT and the deadline 0."""
        mask = 3 if any(e.function == 1 and e.ecx >> 24 & 1 for e in self.cpuid) else 1
        mode = struct.unpack_from("<I", page, APIC_LVTT)[0] >> LVTT_MODE_SHIFT & mask
        if (mode == LVTT_TSC_DEADLINE) == self.tsc_deadline_mode:
            return
        struct.pack_into("<I", page, APIC_TMICT, 0)
        self.msr_rules.stored[MSR_IA32_TSC_DEADLINE] = 0
        self.tsc_deadline_mode = mode == LVTT_TSC_DEADLINE
        self.tsc_deadline_rule()

    def tsc_deadline_rule(self) -> None:
        """kvm_set/get_lapic_tscdeadline_msr: with the APIC present (hardware-enabled: APIC_BASE bit 11) and in
        TSC-deadline mode the MSR keeps what is written (host or guest); otherwise writes are ignored and it reads 0,
        which is the profile's observed "drop" (6.12.118 lapic.c:2577-2597). The MSR rules read the profile per
        access, so this vCPU's rules get the profile with the MSR as "store" while both hold."""
        keeps = self.tsc_deadline_mode and bool(self.sregs.apic_base & MSR_APIC_BASE_ENABLE)
        if keeps == (self.msr_rules.profile is not self.profile):
            return
        if keeps:
            behaviour = dict(self.profile.msr_behaviour)
            if MSR_IA32_TSC_DEADLINE in behaviour:
                behaviour[MSR_IA32_TSC_DEADLINE] = replace(behaviour[MSR_IA32_TSC_DEADLINE], kind="store")
            self.msr_rules.profile = replace(self.profile, msr_behaviour=behaviour)
        else:
            self.msr_rules.profile = self.profile
        self.msr_rules.behaviour = self.msr_rules.profile.behaviours
        self.msr_rules.rules_changed()  # the batches' table of plain MSRs is made from the behaviours

    # -- the MSRs an in-kernel LAPIC changes (host writes, through the MSR rules' setters) --
    def _set_async_pf_int(self, data: int) -> int:
        if data >> 8:
            return self.msr_rules.refuse(MSR_KVM_ASYNC_PF_INT, ASYNC_PF_INT_NEEDS_LAPIC, _FAIL)
        self.msr_rules.stored[MSR_KVM_ASYNC_PF_INT] = data
        return _OK

    def _set_async_pf_en(self, data: int) -> int:
        if data & 0x30:
            return self.msr_rules.refuse(MSR_KVM_ASYNC_PF_EN, ASYNC_PF_EN_NEEDS_LAPIC, _FAIL)
        self.msr_rules.stored[MSR_KVM_ASYNC_PF_EN] = data  # msr_en_val is set before the GPA is checked
        enabled = data & 0x9 == 0x9  # KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        if enabled and not self.vm.has_memory(data & ~0x3F, 8):
            return self.msr_rules.refuse(MSR_KVM_ASYNC_PF_EN, ASYNC_PF_EN_NEEDS_LAPIC, _FAIL)
        return _OK

    def injection_pending(self) -> str | None:
        """What a KVM_RUN would have to deliver or wait for that the model does not emulate, or None."""
        if self.mp_state != uapi.KVM_MP_STATE_RUNNABLE:
            return f"the vCPU is in MP state {self.mp_state} (KVM_RUN would wait for INIT/SIPI or an interrupt)"
        e = self.events
        if e.exception.injected or e.exception.pending or e.interrupt.injected or self.nmi_pending or e.nmi.injected:
            return "an exception, interrupt or NMI is queued (the model does not deliver events into the guest)"
        if self.tsc_deadline_mode and self.msr_rules.stored.get(MSR_IA32_TSC_DEADLINE):
            return "the APIC timer is armed (TSC deadline; the model runs no APIC timer)"
        if self.guest_debug & uapi.KVM_GUESTDBG_ENABLE and self.guest_debug & GUESTDBG_RUN_CHANGING:
            return "guest debugging is on (the model does not single-step or trap breakpoints)"
        if self.debugregs.dr7 & 0xFF:  # L0-L3/G0-G3: the guest's own breakpoints would raise #DB in it
            return f"DR7 {self.debugregs.dr7:#x} enables a hardware breakpoint (the model does not trap breakpoints)"
        return x2apic.run_blocker(self)  # type: ignore[arg-type]

    def halted_in_kernel(self, exit_: Exit) -> Exit:
        """``exit_``, unless it is a HLT with an in-kernel LAPIC: then the kernel keeps the vCPU halted (MP state
        HALTED) and KVM_RUN blocks until an interrupt or a signal (the live kernel returns EINTR on a signal), which
        the model cannot do: it raises :class:`ModelLimitation` with the vCPU left halted."""
        if self.lapic is not None and isinstance(exit_, HltExit):
            self.mp_state = uapi.KVM_MP_STATE_HALTED
            self.may_block = True
            raise self.limitation("KVM_RUN: the guest halted with an in-kernel LAPIC (it would block for an interrupt)")
        return exit_

    # -- debug registers, guest debugging --
    def get_debugregs(self) -> uapi.kvm_debugregs:
        self._check_open()
        out = uapi.kvm_debugregs(dr6=self.debugregs.dr6, dr7=self.debugregs.dr7)
        out.db[:] = list(self.debugregs.db)
        return out

    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS: EINVAL for flags or DR6/DR7 bits above 31 (kvm_dr6_valid, kvm_dr7_valid)."""
        self._check_open()
        if debugregs.flags or debugregs.dr6 >> 32 or debugregs.dr7 >> 32:
            raise KvmError(errno.EINVAL, "KVM_SET_DEBUGREGS")
        self.debugregs = uapi.kvm_debugregs.from_buffer_copy(debugregs)
        self.refresh_may_block()

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: INJECT_DB/BP queue #DB/#BP (EBUSY over a pending exception); single-step and
        breakpoints make the next KVM_RUN a :class:`ModelLimitation`, as DR7's own breakpoints do."""
        self._check_open()
        if len(debugreg) > 8:
            raise InvalidValueError("KVM_SET_GUEST_DEBUG takes at most 8 debug registers")
        if control & (uapi.KVM_GUESTDBG_INJECT_DB | uapi.KVM_GUESTDBG_INJECT_BP):
            ex = self.events.exception  # EBUSY only for a pending one (kvm_is_exception_pending); an injected one is
            if ex.pending:  # replaced by the benign #DB/#BP (kvm_multiple_exception), unless it is #DF: triple fault
                raise KvmError(errno.EBUSY, "KVM_SET_GUEST_DEBUG")
            if ex.injected and ex.nr == 8:
                raise self.limitation("KVM_SET_GUEST_DEBUG: an injection on top of #DF is a triple fault")
            ex.pending, ex.injected, ex.has_error_code, ex.error_code, self.events.exception_payload = 1, 0, 0, 0, 0
            ex.nr = 1 if control & uapi.KVM_GUESTDBG_INJECT_DB else 3
        self.guest_debug = control
        self.refresh_may_block()

    # -- vCPU events, MP state, injection --
    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS as kvm_vcpu_ioctl_x86_get_vcpu_events (x86.c v6.12 lines 4946-5014) reports it."""
        self._check_open()
        e, out = self.events, uapi.kvm_vcpu_events()
        if e.exception.nr not in (3, 4):  # software exceptions (#BP, #OF) are not reported as injected
            out.exception.injected = e.exception.injected | e.exception.pending  # no KVM_CAP_EXCEPTION_PAYLOAD
            out.exception.pending = e.exception.pending
        out.exception.nr, out.exception.has_error_code = e.exception.nr, e.exception.has_error_code
        out.exception.error_code, out.exception_payload = e.exception.error_code, e.exception_payload
        out.interrupt.injected = e.interrupt.injected and not e.interrupt.soft
        out.interrupt.nr, out.interrupt.shadow = e.interrupt.nr, e.interrupt.shadow
        out.nmi.injected, out.nmi.masked = e.nmi.injected, e.nmi.masked
        self._process_nmi()  # a count from 6.4 (nmi_pending_count), whether any before
        out.nmi.pending = self.nmi_pending if self.rules.has(R.NMI_PENDING_COUNT) else int(self.nmi_pending != 0)
        out.flags = (uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SHADOW
                     | uapi.KVM_VCPUEVENT_VALID_SMM)
        return out

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS with the checks of kvm_vcpu_ioctl_x86_set_vcpu_events (x86.c v6.12 lines 5016-5110)."""
        self._check_open()
        f = events.flags
        valid = (uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                 | uapi.KVM_VCPUEVENT_VALID_SHADOW | uapi.KVM_VCPUEVENT_VALID_SMM | uapi.KVM_VCPUEVENT_VALID_PAYLOAD
                 | uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
        # PAYLOAD needs KVM_CAP_EXCEPTION_PAYLOAD (not offered): refused first. SMM state without CONFIG_KVM_SMM, and
        # TRIPLE_FAULT without its cap, are refused only after the rest is applied (x86.c v6.12 5107-5123).
        ex, smi, smm_flag = events.exception, events.smi, f & uapi.KVM_VCPUEVENT_VALID_SMM
        if f & ~valid or f & uapi.KVM_VCPUEVENT_VALID_PAYLOAD or (ex.injected and (ex.nr > 31 or ex.nr == 2)) or (
                smm_flag and (smi.smm or smi.pending) and self.mp_state == uapi.KVM_MP_STATE_INIT_RECEIVED):
            raise KvmError(errno.EINVAL, "KVM_SET_VCPU_EVENTS")
        smm = smm_flag and (smi.smm or smi.pending or smi.smm_inside_nmi)
        if smm and self.profile.capability(uapi.KVM_CAP_X86_SMM):
            raise self.limitation("KVM_SET_VCPU_EVENTS: the model does not implement SMM")
        if smm_flag and not smm and smi.latched_init and self.lapic is not None:
            raise self.limitation("KVM_SET_VCPU_EVENTS: a latched INIT (the next KVM_GET_MP_STATE resets the vCPU)")
        self._process_nmi()  # under the NMI state as it was (6.12.118 x86.c:5049; 6.1.192 :5201)
        e = self.events  # the kernel keeps the flags as bools (a byte of 2-255 reads back 1), and the payload always
        e.exception.injected, e.exception.pending = bool(ex.injected), 0  # pending only with VALID_PAYLOAD
        e.exception.nr, e.exception.has_error_code = ex.nr, bool(ex.has_error_code)
        e.exception.error_code, e.exception_payload = ex.error_code, events.exception_payload
        e.interrupt.injected, e.interrupt.nr = bool(events.interrupt.injected), events.interrupt.nr
        e.interrupt.soft = bool(events.interrupt.soft)
        if f & uapi.KVM_VCPUEVENT_VALID_SHADOW:
            e.interrupt.shadow = self._shadow(events.interrupt.shadow)
        e.nmi.injected, e.nmi.masked = bool(events.nmi.injected), 1 if events.nmi.masked else 0
        if f & uapi.KVM_VCPUEVENT_VALID_NMI_PENDING:
            self.nmi_pending = events.nmi.pending
        if f & uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR and self.lapic is not None:
            self.sipi_vector = events.sipi_vector
        self.refresh_may_block()
        if smm or f & uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT:  # the state above is applied all the same
            raise KvmError(errno.EINVAL, "KVM_SET_VCPU_EVENTS", "SMM state without SMM, or TRIPLE_FAULT without its cap")

    def _shadow(self, mask: int) -> int:
        """The interrupt shadow as the vendor module keeps it: SVM has one bit and reports both (svm.c
        svm_get_interrupt_shadow); VMX keeps MOV_SS, else STI (6.12.118 vmx.c:1607-1616); PVM echoes the byte."""
        if self.profile.vendor == "pvm":
            return mask & 0xFF
        mask &= uapi.KVM_X86_SHADOW_INT_MOV_SS | uapi.KVM_X86_SHADOW_INT_STI
        if self.profile.vendor == "svm":
            return 3 if mask else 0
        return mask & uapi.KVM_X86_SHADOW_INT_MOV_SS or mask

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE, after kvm_apic_accept_events: a pending SIPI, taken in INIT_RECEIVED, starts the vCPU at
        the SIPI vector (kvm_vcpu_deliver_sipi_vector: CS selector vector << 8, base vector << 12, RIP 0)."""
        self._check_open()
        pending, self.sipi_pending = self.sipi_pending, False
        if pending and self.mp_state == uapi.KVM_MP_STATE_INIT_RECEIVED:
            v = self.sipi_vector & 0xFF  # kvm_vcpu_deliver_sipi_vector takes a u8
            self.sregs.cs.selector, self.sregs.cs.base, self.regs.rip = v << 8, v << 12, 0
            self.mp_state = uapi.KVM_MP_STATE_RUNNABLE
            self.refresh_may_block()
        return self.mp_state

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE (x86.c v6.12 kvm_vcpu_x86_setup_mce): 1-32 banks and supported capability bits (CTL_P,
        SER_P, and on VMX CMCI_P and LMCE_P, plus bits 23:16); MCG_CTL all ones with CTL_P, each MCi_CTL all ones.
        CMCI_P came with the MCi_CTL2 MSRs in 6.0 (281b52780b57; 6.1.192 vmx.c:8531-8532)."""
        self._check_open()
        banks = mcg_cap & 0xFF
        vmx_caps = (1 << 10 if self.msr_rules.rules.mci_ctl2 else 0) | 1 << 27
        supported = 1 << 8 | 1 << 24 | (vmx_caps if self.profile.vendor == "vmx" else 0)
        if not 0 < banks <= 32 or mcg_cap & ~(supported | 0xFF | 0xFF0000):
            raise KvmError(errno.EINVAL, "KVM_X86_SETUP_MCE")
        stored = self.msr_rules.stored
        stored[0x179] = mcg_cap
        self.msr_rules.config_changed()
        x2apic.mcg_cap_changed(self)  # type: ignore[arg-type]
        if mcg_cap & 1 << 8:
            stored[0x17B] = (1 << 64) - 1
        for bank in range(banks):
            stored[0x400 + 4 * bank] = (1 << 64) - 1
            if mcg_cap & 1 << 10:
                stored[0x280 + bank] = 0

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (x86.c v6.12 kvm_arch_vcpu_ioctl_set_mpstate, line 11246): anything but RUNNABLE needs
        the in-kernel LAPIC; STOPPED, SUSPENDED and others are EINVAL on x86."""
        self._check_open()
        needs_lapic = (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_AP_RESET_HOLD,
                       uapi.KVM_MP_STATE_INIT_RECEIVED, uapi.KVM_MP_STATE_SIPI_RECEIVED)
        if mp_state != uapi.KVM_MP_STATE_RUNNABLE and (mp_state not in needs_lapic or self.lapic is None):
            raise KvmError(errno.EINVAL, "KVM_SET_MP_STATE")
        sipi = mp_state == uapi.KVM_MP_STATE_SIPI_RECEIVED  # INIT_RECEIVED with the SIPI pending
        self.mp_state = uapi.KVM_MP_STATE_INIT_RECEIVED if sipi else mp_state
        self.sipi_pending |= sipi
        self.refresh_may_block()

    def _process_nmi(self) -> None:
        """process_nmi: the NMIs queued and pending, at most 2, or 1 while NMIs are masked or one is being injected."""
        self.nmi_pending = min(self.nmi_pending, 1 if self.events.nmi.masked or self.events.nmi.injected else 2)

    def nmi(self) -> None:
        """KVM_NMI: one more NMI queued (reported up to the limit process_nmi applies)."""
        self._check_open()
        self.nmi_pending += 1
        self.refresh_may_block()

    def smi(self) -> None:
        """KVM_SMI: ENOTTY where the profiled kernel has no SMM (KVM_CAP_X86_SMM 0, as on this host)."""
        self._check_open()
        if not self.profile.capability(uapi.KVM_CAP_X86_SMM):
            raise KvmError(errno.ENOTTY, "KVM_SMI")
        raise self.limitation("KVM_SMI: the model does not implement SMM")

    def interrupt(self, irq: int) -> None:
        """KVM_INTERRUPT (x86.c v6.12 line 4746): queued as injected without an irqchip, ENXIO with the in-kernel PIC."""
        self._check_open()
        if irq >= uapi.KVM_NR_INTERRUPTS:
            raise KvmError(errno.EINVAL, "KVM_INTERRUPT")
        if self.vm.lapic_in_kernel:  # split: queued for the local APIC's ExtINT (pending_external_vector)
            raise KvmError(errno.ENXIO, "KVM_INTERRUPT") if self.vm.irqchip else self.limitation(
                "KVM_INTERRUPT with a split irqchip: the model does not implement it")
        i = self.events.interrupt
        i.injected, i.nr, i.soft = 1, irq, 0
        self.refresh_may_block()

    # -- LAPIC --
    def get_lapic(self) -> uapi.kvm_lapic_state:
        self._check_open()
        if self.lapic is None:
            raise KvmError(errno.EINVAL, "KVM_GET_LAPIC")
        page = bytearray(self.lapic)
        x2apic.shown(self, page)  # type: ignore[arg-type]
        return uapi.kvm_lapic_state.from_buffer_copy(page)

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC: the page as given, with the PPR recomputed from TPR and the highest in-service vector
        (lapic.c apic_update_ppr); the model runs no APIC timer."""
        self._check_open()
        if self.lapic is None:
            raise KvmError(errno.EINVAL, "KVM_SET_LAPIC")
        page = bytearray(bytes(lapic))
        x2apic.taken(self, page)  # type: ignore[arg-type]
        page[APIC_LVR : APIC_LVR + 4] = self.lapic[APIC_LVR : APIC_LVR + 4]  # kvm_apic_set_version: KVM's own
        page[APIC_TMCCT : APIC_TMCCT + 4] = bytes(4)  # the kernel's page holds 0; the count is computed on a read
        tpr = struct.unpack_from("<I", page, APIC_TPR)[0] & 0xFF
        # kvm_apic_set_state (lapic.c v6.12 line 3180) updates the PPR before it recounts the in-service vectors: an
        # in-service vector counts only when the page it replaces had one in service too.
        isrv = _highest_isr(page) if _highest_isr(self.lapic) >= 0 else 0
        struct.pack_into("<I", page, APIC_PPR, tpr if (tpr & 0xF0) >= (max(isrv, 0) & 0xF0) else isrv & 0xF0)
        self.update_lvtt(page)
        self.lapic, self.vm.apic_map_format = page, self.vm.x2apic_format  # kvm_apic_set_state rebuilds the map
        self.refresh_may_block()

    def accept_msi(self, vector: int, level: bool = False) -> int:
        """An MSI with ``vector`` for this vCPU's APIC: 1, the vector's IRR bit set and its TMR bit set or cleared by
        the trigger mode, when the APIC is enabled in software (SPIV bit 8), else 0 (lapic.c __apic_accept_irq)."""
        if self.lapic is None or not struct.unpack_from("<I", self.lapic, APIC_SPIV)[0] & APIC_SPIV_ENABLED:
            return 0
        (x2apic.set_bit if level else x2apic.clear_bit)(self.lapic, x2apic.TMR, vector)
        x2apic.set_bit(self.lapic, APIC_IRR, vector)
        return 1

    @property
    def apic_id(self) -> int | None:
        """The xAPIC ID in the LAPIC page, or None when the APIC is off (no irqchip, or APIC_BASE bit 11 clear)."""
        if self.lapic is None or not self.sregs.apic_base & MSR_APIC_BASE_ENABLE:
            return None
        return int(struct.unpack_from("<I", self.lapic, APIC_ID)[0] >> 24)

    # -- nested state, TSC, kvmclock, translation, signal mask --
    def get_nested_state(self, size: int = 0x2000 + 128) -> bytes:
        self._check_open()
        if not self.profile.capability(uapi.KVM_CAP_NESTED_STATE):
            raise KvmError(errno.EINVAL, "KVM_GET_NESTED_STATE")
        raise self.limitation("KVM_GET_NESTED_STATE: the model does not implement nested virtualization state")

    def set_nested_state(self, state: bytes) -> None:
        self._check_open()
        if not self.profile.capability(uapi.KVM_CAP_NESTED_STATE):
            raise KvmError(errno.EINVAL, "KVM_SET_NESTED_STATE")
        raise self.limitation("KVM_SET_NESTED_STATE: the model does not implement nested virtualization state")

    def get_tsc_khz(self) -> int:
        self._check_open()
        return self.tsc_khz

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ as x86.c (6.12) lines 5703-5720 and kvm_set_tsc_khz/set_tsc_khz (2010-2075) take it: 0 means
        the host's rate; the rate is recorded (KVM_GET_TSC_KHZ reads it) before it is judged, so a refused one still
        reads back (seen on the live kernel). Within tsc_tolerance_ppm (250) of the host's rate nothing is scaled;
        without TSC scaling (KVM_CAP_TSC_CONTROL 0) a faster rate is caught up in software and a slower one is EINVAL.
        The host's rate is the model's (MODEL_TSC_KHZ): profiles do not record it."""
        self._check_open()
        host = MODEL_TSC_KHZ
        khz = khz or host
        self.tsc_khz = khz
        within = host * (1_000_000 - 250) // 1_000_000 <= khz <= host * (1_000_000 + 250) // 1_000_000
        if not (within or khz > host or self.profile.capability(uapi.KVM_CAP_TSC_CONTROL)):
            raise KvmError(errno.EINVAL, "KVM_SET_TSC_KHZ", "a rate below the host's without TSC scaling")

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: EINVAL unless the guest enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW bit 0)."""
        self._check_open()
        if not (self.try_read_msr(MSR_KVM_SYSTEM_TIME_NEW) or 0) & 1:
            raise KvmError(errno.EINVAL, "KVM_KVMCLOCK_CTRL", "kvmclock is not enabled by the guest")

    def translate(self, linear_address: int) -> uapi.kvm_translation:
        """KVM_TRANSLATE: with paging off the address is the physical one (kvm_arch_vcpu_ioctl_translate)."""
        self._check_open()
        if self.sregs.cr0 & 1 << 31:
            raise self.limitation("KVM_TRANSLATE: the model does not walk guest page tables")
        return uapi.kvm_translation(linear_address=linear_address, physical_address=linear_address, valid=1,
                                    writeable=1)

    def set_signal_mask(self, sigset: bytes | None) -> None:
        """KVM_SET_SIGNAL_MASK: an 8-byte sigset (EINVAL otherwise) or None; the model takes no signals."""
        self._check_open()
        if sigset is not None and len(sigset) != 8:
            raise KvmError(errno.EINVAL, "KVM_SET_SIGNAL_MASK")
        self.signal_mask = None if sigset is None else bytes(sigset)
