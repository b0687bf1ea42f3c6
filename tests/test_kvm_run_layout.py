"""``struct kvm_run`` has one layout source, the ctypes structs in ``kvmscope.uapi`` (checked against linux/kvm.h by
test_uapi.py): the struct formats derived from them read what ctypes lays out, and the linux backend decodes (and
answers) every exit where those structs put its members."""

from __future__ import annotations

import ctypes

import pytest

from kvmscope import uapi
from kvmscope.api import (
    FailEntryExit,
    InternalErrorExit,
    IoExit,
    MmioExit,
    OtherExit,
    RdmsrExit,
    SystemEventExit,
    WrmsrExit,
)
from kvmscope.linux import LinuxSystem
from kvmscope.linux.vcpu import LinuxVcpu

EXIT_MEMBERS = [cls for _, cls in uapi.kvm_run_exit._fields_ if isinstance(cls, type) and issubclass(cls, ctypes.Structure)]


@pytest.mark.parametrize("cls", EXIT_MEMBERS, ids=lambda c: c.__name__)
def test_struct_format_reads_the_ctypes_layout(cls: type[ctypes.Structure]) -> None:
    import struct

    raw = bytes(range(1, ctypes.sizeof(cls) + 1))  # a distinct value in every byte
    value = cls.from_buffer_copy(raw)
    names = [f[0] for f in cls._fields_ if f[0] != "pad"]
    expected: list[object] = []
    for name in names:
        v = getattr(value, name)
        if isinstance(v, ctypes.Array) and uapi.field_code(cls, name).endswith("s"):
            expected.append(bytes(v))
        elif isinstance(v, ctypes.Array):
            expected.extend(v)
        else:
            expected.append(v)
    got = struct.unpack_from(uapi.struct_format(cls, *names), raw)
    assert list(got) == expected, f"{cls.__name__}: {uapi.struct_format(cls, *names)} reads {got}, ctypes {expected}"
    with pytest.raises(ValueError):
        uapi.struct_format(cls, names[-1], names[0])


def _write(vcpu: LinuxVcpu, run: uapi.kvm_run) -> None:
    vcpu.kvm_run[: ctypes.sizeof(run)] = bytes(run)


def _read(vcpu: LinuxVcpu) -> uapi.kvm_run:
    return uapi.kvm_run.from_buffer_copy(vcpu.kvm_run[: ctypes.sizeof(uapi.kvm_run)])


def test_linux_decodes_and_answers_each_exit_where_uapi_lays_it_out(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        data_at = ctypes.sizeof(uapi.kvm_run) + 16

        run = uapi.kvm_run(exit_reason=uapi.KVM_EXIT_IO)
        run.exit.io = uapi.kvm_run_io(uapi.KVM_EXIT_IO_OUT, 2, 0x1234, 2, data_at)
        _write(vcpu, run)
        vcpu.kvm_run[data_at : data_at + 4] = b"\x01\x02\x03\x04"
        assert vcpu.last_exit() == IoExit(uapi.KVM_EXIT_IO_OUT, 2, 0x1234, 2, b"\x01\x02\x03\x04")
        assert vcpu.io_port == 0x1234

        run.exit.io = uapi.kvm_run_io(uapi.KVM_EXIT_IO_IN, 1, 0x20, 3, data_at)
        _write(vcpu, run)
        in_exit = vcpu.last_exit()
        assert in_exit == IoExit(uapi.KVM_EXIT_IO_IN, 1, 0x20, 3, b"")
        assert isinstance(in_exit, IoExit)
        in_exit.reply(b"\x77\x78\x79")
        assert bytes(vcpu.kvm_run[data_at : data_at + 4]) == b"\x77\x78\x79\x04", "the reply lands at data_offset"

        run = uapi.kvm_run(exit_reason=uapi.KVM_EXIT_MMIO)
        run.exit.mmio = uapi.kvm_run_mmio(0xFEE00000, (ctypes.c_uint8 * 8)(*range(1, 9)), 4, 1)
        _write(vcpu, run)
        assert vcpu.last_exit() == MmioExit(0xFEE00000, b"\x01\x02\x03\x04", 4, True)

        run = uapi.kvm_run(exit_reason=uapi.KVM_EXIT_FAIL_ENTRY)
        run.exit.fail_entry = uapi.kvm_run_fail_entry(0x80000021, 7)
        _write(vcpu, run)
        assert vcpu.last_exit() == FailEntryExit(0x80000021, 7)

        for reason, cls, member in ((uapi.KVM_EXIT_INTERNAL_ERROR, InternalErrorExit, "internal"),
                                    (uapi.KVM_EXIT_SYSTEM_EVENT, SystemEventExit, "system_event")):
            run = uapi.kvm_run(exit_reason=reason)
            getattr(run.exit, member).__init__(2, 3, (ctypes.c_uint64 * 16)(*range(100, 116)))
            _write(vcpu, run)
            assert vcpu.last_exit() == cls(2, (100, 101, 102)), f"{member}: ndata words of data"
            getattr(run.exit, member).ndata = 40  # more than the array holds: all 16
            _write(vcpu, run)
            assert vcpu.last_exit() == cls(2, tuple(range(100, 116))), f"{member}: ndata beyond the array"

        for reason, cls in ((uapi.KVM_EXIT_X86_RDMSR, RdmsrExit), (uapi.KVM_EXIT_X86_WRMSR, WrmsrExit)):
            run = uapi.kvm_run(exit_reason=reason)
            run.exit.msr = uapi.kvm_run_msr(0, (ctypes.c_uint8 * 7)(), uapi.KVM_MSR_EXIT_REASON_FILTER, 0x1234, 0x55)
            _write(vcpu, run)
            msr_exit = vcpu.last_exit()
            assert msr_exit == cls(0x1234, 0x55, uapi.KVM_MSR_EXIT_REASON_FILTER)
            assert isinstance(msr_exit, cls)
            msr_exit.reply(0xDEADBEEF)
            got = _read(vcpu).exit.msr
            assert (got.error, got.reason, got.index, got.data) == (0, uapi.KVM_MSR_EXIT_REASON_FILTER, 0x1234, 0xDEADBEEF)
            msr_exit.inject_gp()
            got = _read(vcpu).exit.msr
            assert (got.error, got.reason, got.index, got.data) == (1, uapi.KVM_MSR_EXIT_REASON_FILTER, 0x1234, 0x55)

        _write(vcpu, uapi.kvm_run(exit_reason=0x7777))
        assert vcpu.last_exit() == OtherExit(0x7777)
