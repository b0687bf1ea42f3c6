"""The interface's own helpers (``kvmscope.api``), on both backends: lenient MSR reads, memory presence."""

from __future__ import annotations

import pytest

from kvmscope.api import System
from kvmscope.errors import ClosedError, MsrReadError

UCODE_REV, PLATFORM_INFO, UNKNOWN = 0x8B, 0xCE, 0x12345678


def test_try_read_msr_gives_the_value_or_none(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.write_msr(UCODE_REV, 0x42)
        assert vcpu.try_read_msr(UCODE_REV) == 0x42 == vcpu.read_msr(UCODE_REV)
        assert vcpu.try_read_msr("PLATFORM_INFO") == vcpu.read_msr(PLATFORM_INFO) == 0x80000000, "by name"
        assert vcpu.try_read_msr(UNKNOWN) is None, "KVM_GET_MSRS refuses an MSR KVM does not know"
        with pytest.raises(MsrReadError):
            vcpu.read_msr(UNKNOWN)
    with pytest.raises(ClosedError):
        vcpu.try_read_msr(UCODE_REV)
