"""The model's vCPU lifecycle where only the model can show it: what creating many vCPUs costs."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator

import pytest

from kvmscope.errors import KvmError
from kvmscope.model import ModelSystem, ModelVm, open_model


@pytest.fixture
def model() -> Iterator[ModelSystem]:
    system = open_model(profile="pvm-6.18")
    yield system
    system.close()


def _calls_to_create(vm: ModelVm, vcpu_id: int) -> int:
    """Python-level calls (each generator step counts as one) made by one KVM_CREATE_VCPU."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        vm.create_vcpu(vcpu_id)
    finally:
        sys.setprofile(None)
    return calls


def test_creating_a_vcpu_costs_the_same_with_a_thousand_others(model: ModelSystem) -> None:
    """The duplicate-id check is a set lookup: the 1000th vCPU costs no more calls than the 10th (a scan of the vCPUs
    costs one generator step per vCPU, quadratic in all). Ids stay taken after close, as in KVM."""
    with model.create_vm() as vm:
        for i in range(9):
            vm.create_vcpu(i)
        early = _calls_to_create(vm, 9)
        for i in range(10, 999):
            vm.create_vcpu(i).close()
        late = _calls_to_create(vm, 999)
        assert late <= early + 20, f"expected creating vCPU 999 to cost about as many calls as vCPU 9 ({early}), " \
                                   f"saw {late}: the cost grows with the number of vCPUs"
        for taken in (0, 9, 500, 999):
            with pytest.raises(KvmError) as info:
                vm.create_vcpu(taken)
            assert info.value.errno == errno.EEXIST, f"vCPU id {taken}: expected EEXIST, saw {info.value}"
