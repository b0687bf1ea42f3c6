"""The model's answers to the VMM's vCPU ioctls: LAPIC, MP state, vCPU events, debug registers, XCRS, FPU/XSAVE, TSC
frequency, injection and the rest, as ``arch/x86/kvm/x86.c`` and ``lapic.c`` (v6.12) handle them.

What the model keeps is the state these ioctls save and restore, with the kernel's checks on the way in. What it does
not emulate (interrupt delivery into the guest, single-stepping, paging for KVM_TRANSLATE, nested state, SMM where the
profile has it) raises :class:`~kvmscope.model.vcpu.ModelLimitation`, or the errno the profiled kernel gives where it
refuses the ioctl itself. ``docs/binding.md`` lists each.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..api import HltExit
from ..errors import InvalidValueError, KvmError, KvmscopeError
from ..kernel.rulesets import Rule

if TYPE_CHECKING:
    from ..api import CpuidEntry, Exit
    from ..kernel.profile import Profile
    from .msr_batch import BatchedMsrRules
    from .vm import ModelVm

# The local APIC page at reset (lapic.c kvm_lapic_reset, v6.12 lines 2806-2870; values as KVM_GET_LAPIC shows them).
APIC_ID, APIC_LVR, APIC_DFR, APIC_SPIV = 0x20, 0x30, 0xE0, 0xF0
APIC_LVT = (0x320, 0x330, 0x340, 0x350, 0x360, 0x370)  # timer, thermal, PMC, LINT0, LINT1, error
APIC_LVT0 = 0x350
APIC_TPR, APIC_PPR, APIC_ISR, APIC_IRR = 0x80, 0xA0, 0x100, 0x200
APIC_LVT_MASKED = 1 << 16
APIC_MODE_EXTINT = 0x700
APIC_VERSION = 0x14 | (len(APIC_LVT) - 1) << 16  # integrated APIC, six LVT entries
APIC_SPIV_ENABLED = 1 << 8
MSR_APIC_BASE_ENABLE = 1 << 11

# XSAVE (arch/x86/kernel/fpu/xstate.c copy_xstate_to_uabi_buf / copy_uabi_to_xstate).
XFEATURE_FP, XFEATURE_SSE, XFEATURE_YMM = 1 << 0, 1 << 1, 1 << 2
XFEATURE_BNDREGS, XFEATURE_BNDCSR = 1 << 3, 1 << 4
XFEATURE_AVX512 = 0xE0
XFEATURE_XTILE = 0x60000
XSAVE_SIZE = ctypes.sizeof(uapi.kvm_xsave)
_FP_SPANS = ((0, 24), (32, 160))  # fcw..last_dp, then st0-7: the FP component of the legacy area
_MXCSR, _MXCSR_MASK, _XMM, _SW_BYTES, _HEADER = 24, 28, 160, 464, 512
FCW_INIT, MXCSR_INIT = 0x37F, 0x1F80

MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01

MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT = 0x4B564D02, 0x4B564D06
_OK, _FAIL = 0, 1  # the MSR rules' return codes (model.msr_rules OK and FAIL)
# The MSRs whose host writes depend on an in-kernel LAPIC (x86.c v6.12 kvm_pv_enable_async_pf, line 3132, and
# kvm_pv_enable_async_pf_int, line 3171); without one the host profile's observed behaviour stands.
ASYNC_PF_INT_NEEDS_LAPIC = Rule(
    "async_pf_int_needs_lapic", "5.8", "2635b5c4a0e4", "KVM: x86: interrupt based APF 'page ready' event delivery",
    "MSR_KVM_ASYNC_PF_INT takes an 8-bit vector, and only with an in-kernel LAPIC (KVM_CREATE_IRQCHIP first)")
ASYNC_PF_EN_NEEDS_LAPIC = Rule(
    "async_pf_en_needs_lapic", "5.8", "2635b5c4a0e4", "KVM: x86: interrupt based APF 'page ready' event delivery",
    "MSR_KVM_ASYNC_PF_EN: bits 4-5 are reserved; enabling it needs an in-kernel LAPIC and its GPA in guest memory")

GUESTDBG_RUN_CHANGING = uapi.KVM_GUESTDBG_SINGLESTEP | uapi.KVM_GUESTDBG_USE_SW_BP | uapi.KVM_GUESTDBG_USE_HW_BP


def _xsave_leaf(profile: Profile, index: int) -> tuple[int, int, int, int]:
    for e in profile.supported_cpuid:
        if e.function == 0xD and e.index == index:
            return e.eax, e.ebx, e.ecx, e.edx
    return 0, 0, 0, 0


def supported_xcr0(profile: Profile) -> int:
    """The XSAVE features this KVM supports: KVM_GET_SUPPORTED_CPUID leaf 0xD.0 EDX:EAX."""
    eax, _, _, edx = _xsave_leaf(profile, 0)
    return eax | edx << 32


def guest_xcr0(cpuid: Sequence[CpuidEntry], profile: Profile) -> int:
    """``vcpu->arch.guest_supported_xcr0``: the guest's CPUID 0xD.0 within what KVM supports (0 without CPUID)."""
    for e in cpuid:
        if e.function == 0xD and e.index == 0:
            return (e.eax | e.edx << 32) & supported_xcr0(profile)
    return 0


def xcr0_error(xcr0: int, guest_supported: int) -> bool:
    """``__kvm_set_xcr`` (x86.c) refuses ``xcr0``: the checks in its order."""
    if not xcr0 & XFEATURE_FP or (xcr0 & XFEATURE_YMM and not xcr0 & XFEATURE_SSE):
        return True
    if xcr0 & ~(guest_supported | XFEATURE_FP):
        return True
    if bool(xcr0 & XFEATURE_BNDREGS) != bool(xcr0 & XFEATURE_BNDCSR):
        return True
    if xcr0 & XFEATURE_AVX512 and (not xcr0 & XFEATURE_YMM or xcr0 & XFEATURE_AVX512 != XFEATURE_AVX512):
        return True
    return bool(xcr0 & XFEATURE_XTILE and xcr0 & XFEATURE_XTILE != XFEATURE_XTILE)


def mxcsr_mask(profile: Profile) -> int:
    """FXSAVE's MXCSR_MASK on the profiled host: AMD sets bit 17 (misaligned SSE), Intel does not."""
    vendor = next((e for e in profile.supported_cpuid if e.function == 0), None)
    return 0x2FFFF if vendor is not None and vendor.ebx == 0x68747541 else 0xFFFF  # "Auth"enticAMD


def _highest_isr(page: bytes | bytearray) -> int:
    """The highest vector in service in an APIC page, or -1."""
    return max((32 * i + w.bit_length() - 1 for i in range(8)
                if (w := struct.unpack_from("<I", page, APIC_ISR + 0x10 * i)[0])), default=-1)


class VcpuStateModel:
    """The save/restore state of a model vCPU and its ioctls. Mixed into :class:`~kvmscope.model.vcpu.ModelVcpu`,
    which calls :meth:`reset_vcpu_state` when it is created."""

    vm: ModelVm
    id: int
    msr_rules: BatchedMsrRules
    profile: Profile
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
        p, bsp = self.profile, self.id == 0
        self.lapic: bytearray | None = None
        if self.vm.irqchip:
            lapic = bytearray(uapi.KVM_APIC_REG_SIZE)
            for offset, value in ((APIC_ID, self.id << 24), (APIC_LVR, APIC_VERSION), (APIC_DFR, 0xFFFFFFFF),
                                  (APIC_SPIV, 0xFF), *((lvt, APIC_LVT_MASKED) for lvt in APIC_LVT)):
                struct.pack_into("<I", lapic, offset, value)
            if bsp and not self.vm.disabled_quirks & uapi.KVM_X86_QUIRK_LINT0_REENABLED:
                struct.pack_into("<I", lapic, APIC_LVT0, APIC_MODE_EXTINT)
            self.lapic = lapic
        self.mp_state = uapi.KVM_MP_STATE_RUNNABLE if bsp or not self.vm.irqchip else uapi.KVM_MP_STATE_UNINITIALIZED
        self.events = uapi.kvm_vcpu_events()  # the kernel's fields; get_vcpu_events reports them as x86.c does
        self.nmi_pending = 0
        self.sipi_vector = 0
        self.debugregs = uapi.kvm_debugregs(dr6=0xFFFF0FF0, dr7=0x400)
        self.xcr0 = XFEATURE_FP
        self.fx = bytearray(512)  # the kernel's legacy FXSAVE area, as KVM_GET/SET_FPU read and write it
        struct.pack_into("<H", self.fx, 0, FCW_INIT)
        struct.pack_into("<I", self.fx, _MXCSR_MASK, mxcsr_mask(p))
        self.xfeatures = 0  # XSTATE_BV: which components hold state (the rest read as their init values)
        self.xstate_ext = bytearray(XSAVE_SIZE)  # the components above SSE at their standard offsets
        self.tsc_khz = self.vm.default_tsc_khz
        self.guest_debug = 0
        self.signal_mask: bytes | None = None
        if self.lapic is not None:
            setters = self.msr_rules.setters
            setters[MSR_KVM_ASYNC_PF_EN] = self._set_async_pf_en
            setters[MSR_KVM_ASYNC_PF_INT] = self._set_async_pf_int

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
        if self.guest_debug & uapi.KVM_GUESTDBG_ENABLE and self.guest_debug & GUESTDBG_RUN_CHANGING:
            return "guest debugging is on (the model does not single-step or trap breakpoints)"
        return None

    def halted_in_kernel(self, exit_: Exit) -> Exit:
        """``exit_``, unless it is a HLT with an in-kernel LAPIC: then the kernel keeps the vCPU halted (MP state
        HALTED) and KVM_RUN blocks until an interrupt or a signal (the live kernel returns EINTR on a signal), which
        the model cannot do: it raises :class:`ModelLimitation` with the vCPU left halted."""
        if self.lapic is not None and isinstance(exit_, HltExit):
            self.mp_state = uapi.KVM_MP_STATE_HALTED
            raise self.limitation("KVM_RUN: the guest halted with an in-kernel LAPIC; the kernel would block until an "
                                  "interrupt or a signal")
        return exit_

    # -- FPU and XSAVE --
    def get_fpu(self) -> uapi.kvm_fpu:
        self._check_open()
        fx, fpu = self.fx, uapi.kvm_fpu()
        ctypes.memmove(ctypes.addressof(fpu.fpr), bytes(fx[32:160]), 128)
        fpu.fcw, fpu.fsw, fpu.ftwx, _, fpu.last_opcode, fpu.last_ip, fpu.last_dp = struct.unpack_from("<HHBBHQQ", fx)
        ctypes.memmove(ctypes.addressof(fpu.xmm), bytes(fx[160:416]), 256)
        return fpu  # MXCSR is neither read nor written by KVM_GET/SET_FPU: kvm_fpu.mxcsr stays 0

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        """KVM_SET_FPU writes the legacy area but MXCSR and leaves XSTATE_BV alone (x86.c v6.12
        kvm_arch_vcpu_ioctl_set_fpu, line 11465)."""
        self._check_open()
        fx = self.fx
        fx[32:160] = bytes(fpu.fpr)
        struct.pack_into("<HHBBHQQ", fx, 0, fpu.fcw, fpu.fsw, fpu.ftwx, 0, fpu.last_opcode, fpu.last_ip, fpu.last_dp)
        fx[160:416] = bytes(fpu.xmm)

    def _xsave_image(self, size: int) -> bytearray:
        # The components the guest may use (fpstate->user_xfeatures: guest_supported_xcr0 | FP | SSE, from CPUID):
        # the others read as their init state.
        user = guest_xcr0(self.cpuid, self.profile) | XFEATURE_FP | XFEATURE_SSE
        out, fx, xf = bytearray(size), self.fx, self.xfeatures & user
        if xf & XFEATURE_FP:
            for lo, hi in _FP_SPANS:
                out[lo:hi] = fx[lo:hi]
        else:
            struct.pack_into("<H", out, 0, FCW_INIT)
        mxcsr = struct.unpack_from("<I", fx, _MXCSR)[0] if xf & (XFEATURE_SSE | XFEATURE_YMM) else MXCSR_INIT
        struct.pack_into("<II", out, _MXCSR, mxcsr, mxcsr_mask(self.profile))
        if xf & XFEATURE_SSE:
            out[_XMM:416] = fx[_XMM:416]
        struct.pack_into("<Q", out, _SW_BYTES, supported_xcr0(self.profile))
        struct.pack_into("<Q", out, _HEADER, xf)
        for bit in range(2, 64):
            if xf & 1 << bit:
                length, offset, _, _ = _xsave_leaf(self.profile, bit)
                out[offset : offset + length] = self.xstate_ext[offset : offset + length]
        return out

    def get_xsave(self) -> uapi.kvm_xsave:
        self._check_open()
        return uapi.kvm_xsave.from_buffer_copy(self._xsave_image(XSAVE_SIZE))

    def get_xsave2(self, size: int) -> bytes:
        self._check_open()
        if size < XSAVE_SIZE:
            raise InvalidValueError(f"KVM_GET_XSAVE2 needs at least 4096 bytes (KVM_CAP_XSAVE2), not {size}")
        return bytes(self._xsave_image(size))

    def set_xsave(self, xsave: uapi.kvm_xsave | bytes) -> None:
        """KVM_SET_XSAVE: the header checks of validate_user_xstate_header and the MXCSR check, then the components
        XSTATE_BV names (copy_uabi_to_xstate)."""
        self._check_open()
        image = bytes(xsave)
        if len(image) < XSAVE_SIZE:
            raise InvalidValueError(f"an XSAVE area is at least 4096 bytes, not {len(image)}")
        xstate_bv, xcomp_bv = struct.unpack_from("<QQ", image, _HEADER)
        if xstate_bv & ~supported_xcr0(self.profile) or xcomp_bv or any(image[_HEADER + 16 : _HEADER + 64]):
            raise KvmError(errno.EINVAL, "KVM_SET_XSAVE", "XSAVE header: unsupported features or reserved bits")
        mxcsr = struct.unpack_from("<I", image, _MXCSR)[0]
        if xstate_bv & (XFEATURE_SSE | XFEATURE_YMM) and mxcsr & ~mxcsr_mask(self.profile):
            raise KvmError(errno.EINVAL, "KVM_SET_XSAVE", f"MXCSR 0x{mxcsr:x} sets reserved bits")
        if xstate_bv & XFEATURE_FP:
            for lo, hi in _FP_SPANS:
                self.fx[lo:hi] = image[lo:hi]
        if xstate_bv & (XFEATURE_SSE | XFEATURE_YMM):
            struct.pack_into("<I", self.fx, _MXCSR, mxcsr)
        if xstate_bv & XFEATURE_SSE:
            self.fx[_XMM:416] = image[_XMM:416]
        for bit in range(2, 64):
            if xstate_bv & 1 << bit:
                length, offset, _, _ = _xsave_leaf(self.profile, bit)
                self.xstate_ext[offset : offset + length] = image[offset : offset + length]
        self.xfeatures = xstate_bv

    def get_xcrs(self) -> uapi.kvm_xcrs:
        self._check_open()
        xcrs = uapi.kvm_xcrs(nr_xcrs=1)
        xcrs.xcrs[0].value = self.xcr0
        return xcrs

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        """KVM_SET_XCRS: the first XCR0 entry through ``__kvm_set_xcr`` (others ignored), EINVAL on refusal."""
        self._check_open()
        if xcrs.nr_xcrs > uapi.KVM_MAX_XCRS or xcrs.flags:
            raise KvmError(errno.EINVAL, "KVM_SET_XCRS")
        for i in range(xcrs.nr_xcrs):
            if xcrs.xcrs[i].xcr == 0:
                value = xcrs.xcrs[i].value
                if xcr0_error(value, guest_xcr0(self.cpuid, self.profile)):
                    raise KvmError(errno.EINVAL, "KVM_SET_XCRS", f"XCR0 0x{value:x} refused by __kvm_set_xcr")
                self.xcr0 = value
                return

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
        self.debugregs = uapi.kvm_debugregs(dr6=debugregs.dr6, dr7=debugregs.dr7)
        self.debugregs.db[:] = list(debugregs.db)

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: INJECT_DB/INJECT_BP queue #DB/#BP (EBUSY with an exception queued); single-step and
        breakpoints are kept but make the next KVM_RUN a :class:`ModelLimitation`."""
        self._check_open()
        if len(debugreg) > 8:
            raise InvalidValueError("KVM_SET_GUEST_DEBUG takes at most 8 debug registers")
        if control & (uapi.KVM_GUESTDBG_INJECT_DB | uapi.KVM_GUESTDBG_INJECT_BP):
            ex = self.events.exception
            if ex.injected or ex.pending:
                raise KvmError(errno.EBUSY, "KVM_SET_GUEST_DEBUG")
            ex.pending, ex.injected, ex.has_error_code, ex.error_code = 1, 0, 0, 0
            ex.nr = 1 if control & uapi.KVM_GUESTDBG_INJECT_DB else 3
        self.guest_debug = control

    # -- vCPU events, MP state, injection --
    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS as kvm_vcpu_ioctl_x86_get_vcpu_events (x86.c v6.12 lines 4946-5014) reports it."""
        self._check_open()
        e, out = self.events, uapi.kvm_vcpu_events()
        if e.exception.nr not in (3, 4):  # software exceptions (#BP, #OF) are not reported as injected
            out.exception.injected = e.exception.injected | e.exception.pending  # no KVM_CAP_EXCEPTION_PAYLOAD
            out.exception.pending = e.exception.pending
        out.exception.nr, out.exception.has_error_code = e.exception.nr, e.exception.has_error_code
        out.exception.error_code = e.exception.error_code
        out.interrupt.injected = e.interrupt.injected and not e.interrupt.soft
        out.interrupt.nr, out.interrupt.shadow = e.interrupt.nr, e.interrupt.shadow
        out.nmi.injected, out.nmi.masked = e.nmi.injected, e.nmi.masked
        limit = 1 if e.nmi.masked or e.nmi.injected else 2  # process_nmi
        self.nmi_pending = min(self.nmi_pending, limit)
        out.nmi.pending = self.nmi_pending
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
        # PAYLOAD and TRIPLE_FAULT need KVM_CAP_EXCEPTION_PAYLOAD / KVM_CAP_X86_TRIPLE_FAULT_EVENT enabled, which the
        # model does not offer; without CONFIG_KVM_SMM (KVM_CAP_X86_SMM 0) any SMM state is refused.
        refused = f & ~valid or f & (uapi.KVM_VCPUEVENT_VALID_PAYLOAD | uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
        ex = events.exception
        if refused or (ex.injected and (ex.nr > 31 or ex.nr == 2)):
            raise KvmError(errno.EINVAL, "KVM_SET_VCPU_EVENTS")
        smi = events.smi
        if f & uapi.KVM_VCPUEVENT_VALID_SMM and (smi.smm or smi.pending or smi.smm_inside_nmi):
            if not self.profile.capability(uapi.KVM_CAP_X86_SMM):
                raise KvmError(errno.EINVAL, "KVM_SET_VCPU_EVENTS", "SMM state without KVM_CAP_X86_SMM")
            raise self.limitation("KVM_SET_VCPU_EVENTS: the model does not implement SMM")
        e = self.events
        e.exception.injected, e.exception.pending = ex.injected, 0  # pending only with VALID_PAYLOAD
        e.exception.nr, e.exception.has_error_code = ex.nr, ex.has_error_code
        e.exception.error_code = ex.error_code
        e.interrupt.injected, e.interrupt.nr = events.interrupt.injected, events.interrupt.nr
        e.interrupt.soft = events.interrupt.soft
        if f & uapi.KVM_VCPUEVENT_VALID_SHADOW:
            e.interrupt.shadow = self._shadow(events.interrupt.shadow)
        e.nmi.injected, e.nmi.masked = events.nmi.injected, 1 if events.nmi.masked else 0
        if f & uapi.KVM_VCPUEVENT_VALID_NMI_PENDING:
            self.nmi_pending = events.nmi.pending
        if f & uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR and self.lapic is not None:
            self.sipi_vector = events.sipi_vector

    def _shadow(self, mask: int) -> int:
        """The interrupt shadow as the vendor module keeps it: SVM has one bit and reports both (svm.c
        svm_get_interrupt_shadow); VMX and PVM keep the two."""
        mask &= uapi.KVM_X86_SHADOW_INT_MOV_SS | uapi.KVM_X86_SHADOW_INT_STI
        return 3 if self.profile.vendor == "svm" and mask else mask

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE, after kvm_apic_accept_events: a SIPI received in INIT_RECEIVED starts the vCPU at the
        SIPI vector (kvm_vcpu_deliver_sipi_vector: CS selector vector << 8, base vector << 12, RIP 0)."""
        self._check_open()
        if self.mp_state == uapi.KVM_MP_STATE_SIPI_RECEIVED:
            v = self.sipi_vector
            self.sregs.cs.selector, self.sregs.cs.base, self.regs.rip = v << 8, v << 12, 0
            self.mp_state = uapi.KVM_MP_STATE_RUNNABLE
        return self.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (x86.c v6.12 kvm_arch_vcpu_ioctl_set_mpstate, line 11246): anything but RUNNABLE needs
        the in-kernel LAPIC; STOPPED, SUSPENDED and others are EINVAL on x86."""
        self._check_open()
        needs_lapic = (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_AP_RESET_HOLD,
                       uapi.KVM_MP_STATE_INIT_RECEIVED, uapi.KVM_MP_STATE_SIPI_RECEIVED)
        if mp_state != uapi.KVM_MP_STATE_RUNNABLE and (mp_state not in needs_lapic or self.lapic is None):
            raise KvmError(errno.EINVAL, "KVM_SET_MP_STATE")
        self.mp_state = mp_state

    def nmi(self) -> None:
        """KVM_NMI: one more NMI queued (reported up to the limit process_nmi applies)."""
        self._check_open()
        self.nmi_pending += 1

    def smi(self) -> None:
        """KVM_SMI: ENOTTY where the profiled kernel has no SMM (KVM_CAP_X86_SMM 0, as on this host)."""
        self._check_open()
        if not self.profile.capability(uapi.KVM_CAP_X86_SMM):
            raise KvmError(errno.ENOTTY, "KVM_SMI")
        raise self.limitation("KVM_SMI: the model does not implement SMM")

    def interrupt(self, irq: int) -> None:
        """KVM_INTERRUPT (x86.c v6.12 line 4746): without an irqchip the vector is queued as injected; with the
        in-kernel PIC, ENXIO."""
        self._check_open()
        if irq >= uapi.KVM_NR_INTERRUPTS:
            raise KvmError(errno.EINVAL, "KVM_INTERRUPT")
        if self.vm.irqchip:
            raise KvmError(errno.ENXIO, "KVM_INTERRUPT")
        i = self.events.interrupt
        i.injected, i.nr, i.soft = 1, irq, 0

    # -- LAPIC --
    def get_lapic(self) -> uapi.kvm_lapic_state:
        self._check_open()
        if self.lapic is None:
            raise KvmError(errno.EINVAL, "KVM_GET_LAPIC")
        return uapi.kvm_lapic_state.from_buffer_copy(self.lapic)

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC: the page as given, with the PPR recomputed from TPR and the highest in-service vector
        (lapic.c apic_update_ppr); the model runs no APIC timer."""
        self._check_open()
        if self.lapic is None:
            raise KvmError(errno.EINVAL, "KVM_SET_LAPIC")
        page = bytearray(bytes(lapic))
        tpr = struct.unpack_from("<I", page, APIC_TPR)[0] & 0xFF
        # kvm_apic_set_state (lapic.c v6.12 line 3180) updates the PPR before it recounts the in-service vectors: an
        # in-service vector counts only when the page it replaces had one in service too.
        isrv = _highest_isr(page) if _highest_isr(self.lapic) >= 0 else 0
        struct.pack_into("<I", page, APIC_PPR, tpr if (tpr & 0xF0) >= (max(isrv, 0) & 0xF0) else isrv & 0xF0)
        self.lapic = page

    def accept_msi(self, vector: int) -> int:
        """An MSI with ``vector`` for this vCPU's APIC: 1 and the vector's IRR bit set when the APIC is enabled in
        software (SPIV bit 8), else 0 (lapic.c __apic_accept_irq)."""
        if self.lapic is None or not struct.unpack_from("<I", self.lapic, APIC_SPIV)[0] & APIC_SPIV_ENABLED:
            return 0
        offset = APIC_IRR + (vector >> 5) * 0x10
        struct.pack_into("<I", self.lapic, offset, struct.unpack_from("<I", self.lapic, offset)[0] | 1 << (vector & 31))
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
        """KVM_SET_TSC_KHZ: without TSC scaling (KVM_CAP_TSC_CONTROL 0) only the current rate is accepted."""
        self._check_open()
        if khz != self.tsc_khz and not self.profile.capability(uapi.KVM_CAP_TSC_CONTROL):
            raise KvmError(errno.EINVAL, "KVM_SET_TSC_KHZ", "no TSC scaling on this host")
        if not 0 < khz < 1 << 32:
            raise KvmError(errno.EINVAL, "KVM_SET_TSC_KHZ")
        self.tsc_khz = khz

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
