"""The interface's own helpers (``kvmscope.api``), on both backends: lenient MSR reads, memory presence, the optional
program runner."""

from __future__ import annotations

import pytest

from kvmscope import guest
from kvmscope.api import ProgramRunner, System
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


def test_has_memory_any_region_or_a_range(kvm: System) -> None:
    vm = kvm.create_vm()
    with vm:
        assert not vm.has_memory() and not vm.has_memory(0)
        vm.add_memory(0x10000, 0x2000)
        assert vm.has_memory(), "a region is set"
        assert not vm.has_memory(0), "nothing at guest-physical 0"
        assert vm.has_memory(0x10000, 0x2000) and vm.has_memory(0x11FFF)
        assert not vm.has_memory(0x11000, 0x2000), "the range runs past the region's end"
        guest.ensure_memory(vm, 0x8000)
        assert vm.has_memory(0, 0x8000) and len(vm.regions) == 2
        guest.ensure_memory(vm)
        assert len(vm.regions) == 2, "memory at 0 is there already"
    with pytest.raises(ClosedError):
        vm.has_memory()
    with pytest.raises(ClosedError):
        guest.ensure_memory(vm)  # not taken for "no memory yet"


def test_program_runner_is_optional_and_structural(kvm: System) -> None:
    from kvmscope.program import Halted, Program, Rdmsr, run_program

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        # Only the model interprets programs; the live kernel executes them assembled: same events either way.
        assert isinstance(vcpu, ProgramRunner) is (kvm.backend == "model")
        assert run_program(vm, vcpu, Program().rdmsr(UCODE_REV).hlt()) == [Rdmsr(UCODE_REV, 0), Halted()]


@pytest.mark.parametrize("name", ["System", "Vm", "Vcpu"])
def test_interface_declares_what_both_backends_offer(name: str) -> None:
    # A method both backends have but the interface lacks is reached around it (getattr, isinstance checks).
    from kvmscope import api, linux, model

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    interface = getattr(api, name)
    declared = public(interface) | {n for c in interface.__mro__ for n in getattr(c, "__annotations__", {})}
    both = public(getattr(linux, f"Linux{name}")) & public(getattr(model, f"Model{name}"))
    assert both <= declared, f"on both backends but not on api.{name}: {sorted(both - declared)}"
    undocumented = [n for n in public(interface) if callable(getattr(interface, n)) and not getattr(interface, n).__doc__]
    assert not undocumented, f"api.{name} methods without a docstring: {undocumented}"
