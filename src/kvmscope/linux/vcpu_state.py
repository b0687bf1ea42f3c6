"""The VMM's vCPU ioctls on a vCPU fd: save/restore state, injection, debugging. One thin method per ioctl, no policy.

Kept apart from ``vcpu.py`` (KVM_RUN and the MSR hot paths): :class:`LinuxVcpu` takes these by inheritance.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

from .. import uapi
from ..errors import InvalidValueError
from ._ioctl import ioctl_buf, ioctl_int

_NESTED_SIZE = struct.Struct("<HHI")  # struct kvm_nested_state: flags, format, size
SIGSET_BYTES = 8  # the kernel's sigset_t on x86-64: KVM_SET_SIGNAL_MASK wants len == sizeof(sigset_t)


class VcpuStateIoctls:
    """KVM_GET/SET_FPU, LAPIC, XSAVE(2), XCRS, DEBUGREGS, VCPU_EVENTS, MP_STATE, NESTED_STATE, TSC_KHZ and
    KVMCLOCK_CTRL, SET_GUEST_DEBUG, TRANSLATE, NMI, SMI, INTERRUPT, SET_SIGNAL_MASK."""

    @property
    def fd(self) -> int:
        raise NotImplementedError

    def get_fpu(self) -> uapi.kvm_fpu:
        fpu = uapi.kvm_fpu()
        ioctl_buf(self.fd, uapi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_FPU, fpu)

    def get_lapic(self) -> uapi.kvm_lapic_state:
        lapic = uapi.kvm_lapic_state()
        ioctl_buf(self.fd, uapi.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_LAPIC, lapic)

    def get_xsave(self) -> uapi.kvm_xsave:
        xsave = uapi.kvm_xsave()
        ioctl_buf(self.fd, uapi.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: uapi.kvm_xsave | bytes) -> None:
        area = bytes(xsave)
        if len(area) < ctypes.sizeof(uapi.kvm_xsave):
            raise InvalidValueError(f"an XSAVE area is at least 4096 bytes, not {len(area)}")
        # The kernel reads the VM's XSAVE2 size: zeros past the caller's area (components XSTATE_BV does not name).
        buf = bytearray(max(len(area), 0x10000))
        buf[: len(area)] = area
        ioctl_buf(self.fd, uapi.KVM_SET_XSAVE, buf)

    def get_xsave2(self, size: int) -> bytes:
        if size < ctypes.sizeof(uapi.kvm_xsave):
            raise InvalidValueError(f"KVM_GET_XSAVE2 needs at least 4096 bytes (KVM_CAP_XSAVE2), not {size}")
        # The kernel writes as many bytes as the VM's KVM_CAP_XSAVE2 says whatever ``size`` is: a buffer of at least
        # 64 KiB (more than any XSAVE layout) keeps a too-small ``size`` from becoming a heap overrun.
        buf = bytearray(max(size, 0x10000))
        ioctl_buf(self.fd, uapi.KVM_GET_XSAVE2, buf)
        return bytes(buf[:size])

    def get_xcrs(self) -> uapi.kvm_xcrs:
        xcrs = uapi.kvm_xcrs()
        ioctl_buf(self.fd, uapi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        dr = uapi.kvm_debugregs()
        ioctl_buf(self.fd, uapi.KVM_GET_DEBUGREGS, dr)
        return dr

    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_DEBUGREGS, debugregs)

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        events = uapi.kvm_vcpu_events()
        ioctl_buf(self.fd, uapi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        mp = uapi.kvm_mp_state()
        ioctl_buf(self.fd, uapi.KVM_GET_MP_STATE, mp)
        return int(mp.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state))

    def setup_mce(self, mcg_cap: int) -> None:
        ioctl_buf(self.fd, uapi.KVM_X86_SETUP_MCE_TRACED, bytearray(struct.pack("<Q", mcg_cap)))

    def get_nested_state(self, size: int = 0x2000 + 128) -> bytes:
        if size < ctypes.sizeof(uapi.kvm_nested_state):
            raise InvalidValueError(f"KVM_GET_NESTED_STATE needs at least 128 bytes, not {size}")
        buf = bytearray(size)
        _NESTED_SIZE.pack_into(buf, 0, 0, 0, size)  # the kernel reads the buffer's size from the header
        ioctl_buf(self.fd, uapi.KVM_GET_NESTED_STATE, buf)
        used = _NESTED_SIZE.unpack_from(buf)[2]
        return bytes(buf[: max(used, ctypes.sizeof(uapi.kvm_nested_state))])

    def set_nested_state(self, state: bytes) -> None:
        ioctl_buf(self.fd, uapi.KVM_SET_NESTED_STATE, bytearray(state))

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, uapi.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        ioctl_int(self.fd, uapi.KVM_KVMCLOCK_CTRL)

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        if len(debugreg) > 8:
            raise InvalidValueError("KVM_SET_GUEST_DEBUG takes at most 8 debug registers")
        dbg = uapi.kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        ioctl_buf(self.fd, uapi.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, linear_address: int) -> uapi.kvm_translation:
        tr = uapi.kvm_translation(linear_address=linear_address)
        ioctl_buf(self.fd, uapi.KVM_TRANSLATE, tr)
        return tr

    def nmi(self) -> None:
        ioctl_int(self.fd, uapi.KVM_NMI)

    def smi(self) -> None:
        ioctl_int(self.fd, uapi.KVM_SMI)

    def interrupt(self, irq: int) -> None:
        ioctl_buf(self.fd, uapi.KVM_INTERRUPT, uapi.kvm_interrupt(irq))

    _signal_mask: bytes | None = None  # the caller's last KVM_SET_SIGNAL_MASK: run(timeout=...) puts it back

    def set_signal_mask(self, sigset: bytes | None) -> None:
        self._set_kvm_sigmask(sigset)
        self._signal_mask = None if sigset is None else bytes(sigset)

    def _set_kvm_sigmask(self, sigset: bytes | None) -> None:
        if sigset is None:
            ioctl_int(self.fd, uapi.KVM_SET_SIGNAL_MASK, 0)  # NULL: no mask while in KVM_RUN
            return
        buf = bytearray(4 + len(sigset))
        struct.pack_into(f"<I{len(sigset)}s", buf, 0, len(sigset), bytes(sigset))
        ioctl_buf(self.fd, uapi.KVM_SET_SIGNAL_MASK, buf)
