"""The model's FPU, XSAVE and XCR0 state and their ioctls (KVM_GET/SET_FPU, KVM_GET/SET_XSAVE, KVM_GET_XSAVE2,
KVM_GET/SET_XCRS), as ``arch/x86/kvm/x86.c`` and ``arch/x86/kernel/fpu/xstate.c`` (v6.12) handle them: one legacy FXSAVE
area that KVM_GET/SET_FPU read and write, XSTATE_BV saying which components hold state, the rest reading as init."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..errors import InvalidValueError, KvmError

if TYPE_CHECKING:
    from ..api import CpuidEntry
    from ..kernel.profile import Profile
    from ..kernel.rulesets import Ruleset

# XSAVE (arch/x86/kernel/fpu/xstate.c copy_xstate_to_uabi_buf / copy_uabi_to_xstate).
XFEATURE_FP, XFEATURE_SSE, XFEATURE_YMM = 1 << 0, 1 << 1, 1 << 2
XFEATURE_BNDREGS, XFEATURE_BNDCSR = 1 << 3, 1 << 4
XFEATURE_AVX512 = 0xE0
XFEATURE_XTILE = 0x60000
XSAVE_SIZE = ctypes.sizeof(uapi.kvm_xsave)
_FP_SPANS = ((0, 24), (32, 160))  # fcw..last_dp, then st0-7: the FP component of the legacy area
_MXCSR, _MXCSR_MASK, _XMM, _SW_BYTES, _HEADER = 24, 28, 160, 464, 512
FCW_INIT, MXCSR_INIT = 0x37F, 0x1F80


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


class FpuStateModel:
    """The FPU/XSAVE/XCR0 part of a model vCPU (mixed into :class:`~kvmscope.model.vcpu_state.VcpuStateModel`)."""

    profile: Profile
    cpuid: list[CpuidEntry]
    rules: Ruleset

    if TYPE_CHECKING:  # provided by ModelVcpu (declared for the type checker only: a body would shadow it)

        def _check_open(self) -> None: ...

    def reset_fpu_state(self) -> None:
        """FCW 0x37f, MXCSR 0 in the legacy area (as KVM_GET_FPU shows it), no component in use, XCR0 = x87."""
        self.xcr0 = XFEATURE_FP
        self.fx = bytearray(512)  # the kernel's legacy FXSAVE area, as KVM_GET/SET_FPU read and write it
        struct.pack_into("<H", self.fx, 0, FCW_INIT)
        struct.pack_into("<I", self.fx, _MXCSR_MASK, mxcsr_mask(self.profile))
        self.xfeatures = 0  # XSTATE_BV: which components hold state (the rest read as their init values)
        self.xstate_ext = bytearray(XSAVE_SIZE)  # the components above SSE at their standard offsets

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
        # MXCSR and MXCSR_MASK as written when SSE or YMM holds state, else the init values (the host's mask)
        if xf & (XFEATURE_SSE | XFEATURE_YMM):
            out[_MXCSR:_MXCSR + 8] = fx[_MXCSR:_MXCSR + 8]
        else:
            struct.pack_into("<II", out, _MXCSR, MXCSR_INIT, mxcsr_mask(self.profile))
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
        if uapi.KVM_CAP_XSAVE2 in self.rules.absent_caps:  # no such ioctl before 5.17: the vCPU ioctl default
            raise KvmError(errno.EINVAL, "KVM_GET_XSAVE2", "no KVM_GET_XSAVE2 before KVM_CAP_XSAVE2 (5.17)")
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
        # copy_uabi_to_xstate: MXCSR is checked when FP, SSE or YMM holds state, and then MXCSR and MXCSR_MASK are
        # taken as given (the FP component's bytes hold both)
        mxcsr = struct.unpack_from("<I", image, _MXCSR)[0]
        if xstate_bv & (XFEATURE_FP | XFEATURE_SSE | XFEATURE_YMM) and mxcsr & ~mxcsr_mask(self.profile):
            raise KvmError(errno.EINVAL, "KVM_SET_XSAVE", f"MXCSR 0x{mxcsr:x} sets reserved bits")
        if xstate_bv & XFEATURE_FP:
            for lo, hi in _FP_SPANS:
                self.fx[lo:hi] = image[lo:hi]
        if xstate_bv & (XFEATURE_FP | XFEATURE_SSE | XFEATURE_YMM):
            self.fx[_MXCSR:_MXCSR + 8] = image[_MXCSR:_MXCSR + 8]
        if xstate_bv & XFEATURE_SSE:
            self.fx[_XMM:416] = image[_XMM:416]
        for bit in range(2, 64):
            if xstate_bv & 1 << bit:
                length, offset, _, _ = _xsave_leaf(self.profile, bit)
                self.xstate_ext[offset : offset + length] = image[offset : offset + length]
        self.xfeatures = xstate_bv

    def fpu_after_run(self, sse_in_use: bool = False) -> None:
        """Each KVM_RUN loads the guest's FPU state and saves it back, whatever its outcome (kvm_load_guest_fpu,
        kvm_put_guest_fpu: 6.12.118 x86.c:11108, 11203). The save drops from XSTATE_BV each component whose values
        are its init values again: x87 (FCW 0x37f, the rest 0), SSE (XMM 0, MXCSR 0x1f80), the others (all 0). The
        live kernel here, even after an immediate exit (``tests/conformance/test_conf_vcpu_state.py``). ``sse_in_use``:
        the CPU tracked SSE as in use (XINUSE) whatever its values, as PVM's long runs leave it (``kvm_run.LONG_RUN``)."""
        xf, fx = self.xfeatures, self.fx
        if xf & XFEATURE_FP and fx[0:2] == FCW_INIT.to_bytes(2, "little") and not any(fx[2:24]) and not any(fx[32:160]):
            xf &= ~XFEATURE_FP
        if xf & XFEATURE_SSE and not any(fx[_XMM:416]) and struct.unpack_from("<I", fx, _MXCSR)[0] == MXCSR_INIT:
            xf &= ~XFEATURE_SSE
        for bit in range(2, 64):
            if xf & 1 << bit:
                length, offset, _, _ = _xsave_leaf(self.profile, bit)
                if not any(self.xstate_ext[offset : offset + length]):
                    xf &= ~(1 << bit)
        if sse_in_use and not xf & XFEATURE_SSE:  # the registers held their init values: saved as they are now
            fx[_XMM:416] = bytes(416 - _XMM)
            if not xf & XFEATURE_YMM:
                struct.pack_into("<II", fx, _MXCSR, MXCSR_INIT, mxcsr_mask(self.profile))
            xf |= XFEATURE_SSE
        self.xfeatures = xf

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
