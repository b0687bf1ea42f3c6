"""Small vCPU set-ups the tests repeat: RFLAGS and the interrupt shadow, each written as a VMM writes it."""

from __future__ import annotations

from kvmscope import uapi
from kvmscope.api import Vcpu


def set_rflags(vcpu: Vcpu, rflags: int) -> None:
    """KVM_SET_REGS of ``rflags``, the other registers as KVM_GET_REGS read them."""
    regs = vcpu.get_regs()
    regs.rflags = rflags
    vcpu.set_regs(regs)


def set_shadow(vcpu: Vcpu, shadow: int) -> None:
    """KVM_SET_VCPU_EVENTS of the interrupt shadow alone (KVM_VCPUEVENT_VALID_SHADOW)."""
    events = vcpu.get_vcpu_events()
    events.interrupt.shadow, events.flags = shadow, uapi.KVM_VCPUEVENT_VALID_SHADOW
    vcpu.set_vcpu_events(events)
