"""The lifecycle of VMs and vCPUs on both backends: who keeps whom alive, closing under a running thread, and
``run(timeout=...)``, the way out of a guest that never exits."""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref

import pytest
from iced_x86 import Code, Instruction

from asm import assemble, hlt, mov_al, out_al
from kvmscope import guest, uapi
from kvmscope.api import HltExit, InterruptedExit, IoExit, System
from kvmscope.errors import ClosedError, InvalidValueError


def _spin() -> bytes:
    """``jmp $``: a guest that never exits on its own."""
    jmp = Instruction.create_branch(Code.JMP_REL8_16, guest.DEFAULT_ENTRY)
    code = assemble([jmp], ip=guest.DEFAULT_ENTRY)
    assert code == b"\xeb\xfe", code.hex()
    return code


def _pio_loop() -> bytes:
    """``mov al, 7; out 0x10, al; jmp`` back to the OUT: a guest that exits forever."""
    body = assemble([mov_al(7), out_al(0x10)], ip=guest.DEFAULT_ENTRY)
    back = Instruction.create_branch(Code.JMP_REL8_16, guest.DEFAULT_ENTRY + 2)
    return body + assemble([back], ip=guest.DEFAULT_ENTRY + len(body))


def test_a_vcpu_keeps_its_vm_alive(kvm: System) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    guest.load_real_mode(vm, vcpu, guest.HLT)
    ref = weakref.ref(vm)
    del vm
    gc.collect()
    assert ref() is not None, "expected the vCPU to keep its VM alive, saw the VM collected"
    assert vcpu.run() == HltExit(), "expected the vCPU of a dropped VM to run to its HLT"
    assert not vcpu.closed
    del vcpu
    gc.collect()
    assert ref() is None, "expected the VM to go with its last vCPU, saw it kept alive"


def test_closing_the_vm_under_a_running_thread_raises_closed_error(kvm: System) -> None:
    """A thread in a run() loop when another closes the VM gets ClosedError (not a ValueError from a released
    buffer), on every try."""
    for attempt in range(20):
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, _pio_loop())
        seen: list[BaseException] = []
        running = threading.Event()

        def loop() -> None:
            try:
                while True:
                    vcpu.run()  # noqa: B023 - joined before the next attempt
                    running.set()  # noqa: B023
            except BaseException as e:  # reported below
                seen.append(e)  # noqa: B023

        t = threading.Thread(target=loop)
        t.start()
        assert running.wait(10), "the vCPU thread took no exit in 10 s"
        (vm if attempt % 2 else vcpu).close()  # the VM, or the vCPU itself
        t.join(10)
        assert not t.is_alive(), "the vCPU thread did not stop after the close"
        assert len(seen) == 1 and type(seen[0]) is ClosedError, \
            f"attempt {attempt}: expected ClosedError in the running thread, saw {seen!r}"
        vm.close()


def test_run_timeout_leaves_a_spinning_guest_and_the_vcpu_keeps_working(kvm: System) -> None:
    timeout = 0.2
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, _spin())
        for _ in range(2):
            start = time.monotonic()
            exit_ = vcpu.run(timeout=timeout)
            took = time.monotonic() - start
            assert exit_ == InterruptedExit(), f"expected InterruptedExit from a jmp $ guest, saw {exit_}"
            assert timeout <= took < 5 * timeout + 0.5, f"expected the run to end at {timeout} s, it took {took:.3f} s"
            assert vcpu.get_regs().rip == guest.DEFAULT_ENTRY, "expected RIP still on the jmp $"
            assert vcpu.immediate_exit is False, "expected immediate_exit as it was before the run"
        vm.write_memory(guest.DEFAULT_ENTRY, guest.HLT)
        assert vcpu.run() == HltExit(), "expected the vCPU to run on after a timed-out run"


def test_run_timeout_from_another_thread(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, _spin())
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(vcpu.run(timeout=0.1)))
        t.start()
        t.join(5)
        assert not t.is_alive() and seen == [InterruptedExit()], f"expected InterruptedExit in the thread, saw {seen}"


def test_run_timeout_on_a_guest_that_exits_first_leaves_no_kick_behind(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, _pio_loop())
        for i in range(200):
            exit_ = vcpu.run(timeout=0.05)
            assert exit_ == IoExit(uapi.KVM_EXIT_IO_OUT, 1, 0x10, 1, b"\x07"), f"run {i}: expected the OUT, saw {exit_}"
        time.sleep(0.1)  # past every deadline above: a kick still armed would land in the runs below
        for i in range(200):
            exit_ = vcpu.run()
            assert isinstance(exit_, IoExit), f"plain run {i}: expected the OUT, saw {exit_}"
        guest.load_real_mode(vm, vcpu, assemble([hlt()]))
        assert vcpu.run(timeout=0) in (HltExit(), InterruptedExit())


@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, "1", True, [1]])
def test_run_timeout_bad_values_are_refused_before_the_run(kvm: System, bad: object) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, guest.HLT)
        with pytest.raises(InvalidValueError, match="timeout"):
            vcpu.run(timeout=bad)  # type: ignore[arg-type]
        assert vcpu.get_regs().rip == guest.DEFAULT_ENTRY, "expected a refused run not to enter the guest"
        assert vcpu.run() == HltExit()


def test_run_timeout_stops_a_long_guest_program(kvm: System) -> None:
    """A guest program in a loop of 2**31 register writes (the model interprets it, the live kernel runs it as long-mode
    code) is interrupted at the deadline on both backends, then runs on."""
    from kvmscope.program import Program, load_program

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        load_program(vm, vcpu, Program().loop(1 << 31, Program().set_reg("rax", 1)).hlt())
        for _ in range(2):
            start = time.monotonic()
            exit_ = vcpu.run(timeout=0.1)
            took = time.monotonic() - start
            assert exit_ == InterruptedExit(), f"expected the long loop interrupted, saw {exit_}"
            assert 0.1 <= took < 1.0, f"expected the run to end at 0.1 s, it took {took:.3f} s"


def test_closing_the_vm_under_a_timed_run_of_a_spinning_guest(kvm: System) -> None:
    """The guest never exits, the VM is closed under it: the timed run still ends at its deadline, with ClosedError."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    guest.load_real_mode(vm, vcpu, _spin())
    seen: list[object] = []

    def timed() -> None:
        try:
            seen.append(vcpu.run(timeout=0.3))
        except BaseException as e:  # reported below
            seen.append(e)

    t = threading.Thread(target=timed)
    t.start()
    time.sleep(0.05)
    vm.close()
    t.join(5)
    assert not t.is_alive(), "expected the timed run to end at its deadline after the close"
    assert len(seen) == 1 and type(seen[0]) is ClosedError, f"expected ClosedError, saw {seen!r}"
