"""Backend ``linux`` on the real /dev/kvm: every path of the binding, with the kernel's exact semantics."""

from __future__ import annotations

import errno
import os
import signal
import threading

import pytest

from asm import assemble, hlt, in_al, mov_al, mov_to_mem8, out_al
from kvmscope import guest, uapi
from kvmscope.api import CpuidEntry, HltExit, InterruptedExit, IoExit, MmioExit, MsrBatch
from kvmscope.errors import ClosedError, InvalidValueError, KvmError, KvmUnavailableError, MsrWriteError
from kvmscope.linux import LinuxSystem, open_system
from kvmscope.linux.vcpu import LinuxVcpu
from kvmscope.linux.vm import LinuxVm

PLATFORM_INFO, UCODE_REV = 0xCE, 0x8B


def ran_vcpu(system: LinuxSystem) -> tuple[LinuxVm, LinuxVcpu]:
    vm = system.create_vm()
    vcpu = vm.create_vcpu(0)
    exit_ = guest.run_to_hlt(vm, vcpu)
    assert isinstance(exit_, HltExit), f"a one-byte HLT guest should exit with HLT, saw {exit_}"
    return vm, vcpu


# --- system ------------------------------------------------------------------------------------------------------


def test_api_version_is_12(live: LinuxSystem) -> None:
    assert live.api_version() == 12


def test_check_extension(live: LinuxSystem) -> None:
    assert live.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES) == 1, "KVM_CAP_GET_MSR_FEATURES is always 1 on x86"
    assert live.check_extension(uapi.KVM_CAP_USER_MEMORY) == 1
    assert live.check_extension(0x7FFFFFFF) == 0, "an unknown capability should read 0"


def test_feature_msr_list_and_values_equal_system_ioctl(live: LinuxSystem) -> None:
    features = live.get_msr_feature_index_list()
    assert sorted(features) == sorted(set(features)), f"duplicates in the feature list: {features}"
    batch = MsrBatch(features)
    assert live.get_feature_msrs(batch) == len(features), "system KVM_GET_MSRS should read every listed feature MSR"
    assert live.read_feature_msrs() == dict(batch)
    # On this machine (spec section 8): exactly the four generic feature MSRs of a PVM host.
    assert features == [0x8B, 0x10A, 0x345, 0xCE], f"feature list on this host: {[hex(i) for i in features]}"


@pytest.mark.parametrize("request_name", ["KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST"])
def test_index_list_e2big_size_protocol(live: LinuxSystem, request_name: str) -> None:
    request = getattr(uapi, request_name)
    full = live._index_list(request)
    with pytest.raises(KvmError) as info:
        live.msr_list_raw(request, 0)
    assert info.value.errno == errno.E2BIG and info.value.ioctl == request_name
    assert info.value.detail == f"kernel count {len(full)}", "the kernel writes its count back even on E2BIG"
    with pytest.raises(KvmError, match="E2BIG"):
        live.msr_list_raw(request, len(full) - 1)
    count, indices = live.msr_list_raw(request, len(full) + 5)
    assert (count, indices) == (len(full), full), "a larger buffer gets exactly the list and its count"


def test_supported_cpuid_and_mmap_size(live: LinuxSystem) -> None:
    cpuid = live.get_supported_cpuid()
    assert any(e.function == 0 for e in cpuid) and any(e.function == 7 for e in cpuid)
    assert live.vcpu_mmap_size() >= 4096


def test_system_get_msrs_of_non_feature_msrs(live: LinuxSystem) -> None:
    # 0x10 (TSC) is no feature MSR but it is advertised (KVM_GET_MSR_INDEX_LIST): since 6.12 (64a5d7a1091f) a host
    # read that fails gives 0 and succeeds. 0x12345678 is not advertised: the read stops there.
    batch = MsrBatch([PLATFORM_INFO, 0x10, 0x12345678, UCODE_REV])
    assert live.get_feature_msrs(batch) == 2, "system KVM_GET_MSRS should read 0xce and 0x10, then stop"
    assert batch[1] == (0x10, 0), "an advertised but unsupported feature read gives 0"


# --- errors, closing, leaks --------------------------------------------------------------------------------------------


def test_bad_fd_gives_ebadf_naming_the_ioctl() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    system = LinuxSystem(r)
    with pytest.raises(KvmError) as info:
        system.api_version()
    assert info.value.errno == errno.EBADF and info.value.ioctl == "KVM_GET_API_VERSION"
    assert isinstance(info.value, OSError) and "EBADF" in str(info.value)
    system._closed = True  # the fd was never ours to close


def test_ioctl_on_wrong_kind_of_fd_gives_enotty(tmp_path: pytest.TempPathFactory) -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    system = LinuxSystem(fd)
    with system, pytest.raises(KvmError) as info:
        system.check_extension(1)
    assert info.value.errno == errno.ENOTTY and info.value.ioctl == "KVM_CHECK_EXTENSION"


def test_missing_dev_kvm_says_missing(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "kvm")
    with pytest.raises(KvmUnavailableError) as info:
        open_system(path)
    assert info.value.reason == "missing" and "does not exist" in str(info.value)


def test_unpermitted_dev_kvm_says_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*args: object, **kw: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(KvmUnavailableError) as info:
        open_system()
    assert info.value.reason == "permission" and "group" in str(info.value)


def test_closed_objects_raise_clear_errors(live: LinuxSystem) -> None:
    vm = live.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed, "closing a VM closes its vCPUs"
    with pytest.raises(ClosedError, match="vCPU is closed"):
        vcpu.run()
    with pytest.raises(ClosedError, match="vCPU is closed"):
        vcpu.set_msrs({PLATFORM_INFO: 0})
    with pytest.raises(ClosedError, match="VM is closed"):
        vm.create_vcpu(1)
    vm.close()  # closing twice is harmless
    system = open_system()
    system.close()
    with pytest.raises(ClosedError, match="KVM system is closed"):
        system.create_vm()


def test_no_fd_leak_over_many_vm_cycles(live: LinuxSystem) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2000):
        with live.create_vm() as vm:
            vm.add_memory(0, 0x1000)
            vm.create_vcpu(0)
    after = len(os.listdir("/proc/self/fd"))
    assert after == before, f"open fds went from {before} to {after} over 2000 VM create/close cycles"


# --- memory ------------------------------------------------------------------------------------------------------------


def kvm_run_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("anon_inode:kvm-vcpu" in line for line in maps)


def test_kvm_run_is_unmapped_when_its_last_holder_goes(live: LinuxSystem) -> None:
    before = kvm_run_mappings()
    vm = live.create_vm()
    held = vm.create_vcpu(0)
    dropped = vm.create_vcpu(1)
    kept = vm.create_vcpu(2)
    assert kvm_run_mappings() == before + 3, f"3 vCPUs should map 3 kvm_run pages, saw {kvm_run_mappings() - before}"
    view = held.kvm_run[:16]  # a view of its own, as a caller keeps one
    held.close()
    assert kvm_run_mappings() == before + 3, "a closed vCPU's kvm_run must stay mapped while a view of it is held"
    view.release()
    assert kvm_run_mappings() == before + 2, "releasing the last view of a closed vCPU's kvm_run should unmap it"
    del dropped
    assert kvm_run_mappings() == before + 1, "a vCPU dropped unclosed should unmap its kvm_run"
    listed = [v.id for v in vm.vcpus]
    assert listed == [0, 2], f"the VM should list the vCPUs still referenced, 0 and 2, listed {listed}"
    vm.close()
    assert kept.closed, "closing the VM should close its live vCPU"
    assert kvm_run_mappings() == before, f"closing the VM should unmap every kvm_run, {kvm_run_mappings() - before} left"


def test_guest_memory_read_write_and_bad_regions(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        slot = vm.add_memory(0x100000, 0x2000)
        vm.write_memory(0x100ff0, b"hello, guest")
        assert vm.read_memory(0x100ff0, 12) == b"hello, guest"
        with pytest.raises(InvalidValueError, match="overlaps"):
            vm.add_memory(0x101000, 0x1000)
        with pytest.raises(InvalidValueError, match="page-aligned"):
            vm.add_memory(0x200800, 0x1000)
        with pytest.raises(InvalidValueError, match="not inside"):
            vm.read_memory(0x101ff0, 0x20)
        assert [r.slot for r in vm.regions] == [slot], "refused regions must not be added"


# --- registers ---------------------------------------------------------------------------------------------------------


def test_regs_and_sregs_round_trip(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
        regs.rax, regs.r15, regs.rip = 0x1234, 0xDEADBEEF, 0x1000
        vcpu.set_regs(regs)
        got = vcpu.get_regs()
        assert (got.rax, got.r15, got.rip) == (0x1234, 0xDEADBEEF, 0x1000)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cs.selector == 0


# --- MSRs: the kernel's exact semantics --------------------------------------------------------------------------------


def test_refused_msr_in_the_middle_returns_its_position(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        # ARCH_CAPABILITIES takes only 0 here (guest CPUID lacks the bit): entry 2 of 4 is refused.
        batch = MsrBatch([(UCODE_REV, 0x42), (PLATFORM_INFO, 0x80000000), (0x10A, 0x1), (UCODE_REV, 0x43)])
        assert vcpu.set_msrs(batch) == 2, "KVM_SET_MSRS should stop at entry 2 (ARCH_CAPABILITIES = 0x1)"
        assert vcpu.read_msr(UCODE_REV) == 0x42, "entries before the refused one take effect, those after do not"


def test_strict_write_names_msr_value_and_position(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(MsrWriteError) as info:
            vcpu.write_msrs([("UCODE_REV", 1), ("ARCH_CAP", 0x1)])
        e = info.value
        assert (e.index, e.name, e.value, e.position, e.total) == (0x10A, "MSR_IA32_ARCH_CAPABILITIES", 1, 1, 2)
        assert "MSR_IA32_ARCH_CAPABILITIES (0x10a) = 0x1 refused at position 1 of 2" in str(e)


def test_get_msrs_stops_at_unreadable_msr(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        batch = MsrBatch([PLATFORM_INFO, 0x12345678, UCODE_REV])
        assert vcpu.get_msrs(batch) == 1, "KVM_GET_MSRS should stop at the unknown MSR 0x12345678"
        assert batch[0] == (PLATFORM_INFO, 0x80000000)


@pytest.mark.parametrize("n,expect", [(255, 255), (256, "E2BIG"), (300, "E2BIG")])
def test_batch_of_256_or_more_gets_e2big(live: LinuxSystem, n: int, expect: int | str) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        batch = MsrBatch([(UCODE_REV, i) for i in range(n)])
        if expect == "E2BIG":
            with pytest.raises(KvmError) as info:
                vcpu.set_msrs(batch)
            assert info.value.errno == errno.E2BIG and info.value.ioctl == "KVM_SET_MSRS"
        else:
            assert vcpu.set_msrs(batch) == expect


def test_platform_info_frozen_after_run_same_value_ok_ucode_writable(live: LinuxSystem) -> None:
    vm, vcpu = ran_vcpu(live)
    with vm:
        before = vcpu.read_msr(PLATFORM_INFO)
        assert vcpu.set_msrs({PLATFORM_INFO: before ^ 0x80000000}) == 0, "a changed PLATFORM_INFO after KVM_RUN"
        assert vcpu.read_msr(PLATFORM_INFO) == before, "the refused write must keep the old value"
        assert vcpu.set_msrs({PLATFORM_INFO: before}) == 1, "a same-value PLATFORM_INFO write after KVM_RUN"
        for value in (0x1234, 0, (1 << 64) - 1):
            assert vcpu.set_msrs({UCODE_REV: value}) == 1, f"UCODE_REV = {value:#x} after KVM_RUN"
            assert vcpu.read_msr(UCODE_REV) == value


def test_platform_info_writable_before_run(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({PLATFORM_INFO: 0xFF00}) == 1
        assert vcpu.read_msr(PLATFORM_INFO) == 0xFF00


# --- CPUID -------------------------------------------------------------------------------------------------------------


def test_cpuid_set_get_and_e2big(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid([CpuidEntry(0x12345678, 0, 0, 1, 2, 3, 4)])
        assert vcpu.get_cpuid() == [CpuidEntry(0x12345678, 0, 0, 1, 2, 3, 4)]
        with pytest.raises(KvmError) as info:
            vcpu.set_cpuid([CpuidEntry(0x40000000 + i) for i in range(257)])
        assert info.value.errno == errno.E2BIG and info.value.ioctl == "KVM_SET_CPUID2"
        vcpu.set_cpuid(live.get_supported_cpuid())
        n = len(vcpu.get_cpuid())
        with pytest.raises(KvmError) as info:
            vcpu.get_cpuid(max_entries=n - 1)
        assert info.value.errno == errno.E2BIG and info.value.ioctl == "KVM_GET_CPUID2"


def test_cpuid_after_run_only_identical_to_stored(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(live.get_supported_cpuid())
        assert isinstance(guest.run_to_hlt(vm, vcpu), HltExit)
        stored = vcpu.get_cpuid()
        vcpu.set_cpuid(stored)  # identical: accepted
        changed = [CpuidEntry(**{**e.to_dict(), "ebx": e.ebx ^ 1}) if e.function == 7 else e for e in stored]
        with pytest.raises(KvmError) as info:
            vcpu.set_cpuid(changed)
        assert info.value.errno == errno.EINVAL


# --- KVM_RUN and exits -------------------------------------------------------------------------------------------------


def test_io_out_exit_then_hlt(live: LinuxSystem) -> None:
    code = assemble([mov_al(0x42), out_al(0x10), hlt()])
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, code)
        exit_ = vcpu.run()
        assert exit_ == IoExit(uapi.KVM_EXIT_IO_OUT, 1, 0x10, 1, b"\x42"), f"expected OUT 0x10 of 0x42, saw {exit_}"
        assert isinstance(vcpu.run(), HltExit)


def test_io_in_exit_takes_reply(live: LinuxSystem) -> None:
    code = assemble([in_al(0x20), out_al(0x21), hlt()])
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, code)
        exit_ = vcpu.run()
        assert isinstance(exit_, IoExit) and not exit_.is_out and (exit_.port, exit_.size) == (0x20, 1)
        exit_.reply(b"\x99")
        echoed = vcpu.run()
        assert isinstance(echoed, IoExit) and echoed.data == b"\x99", f"guest should echo the IN value, saw {echoed}"


def test_mmio_exit(live: LinuxSystem) -> None:
    code = assemble([mov_al(0x5A), mov_to_mem8(0xF000), hlt()])
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.ensure_memory(vm, 0x8000)  # 0xF000 is beyond memory: MMIO
        guest.load_real_mode(vm, vcpu, code)
        exit_ = vcpu.run()
        assert exit_ == MmioExit(0xF000, b"\x5a", 1, True), f"expected an MMIO write of 0x5a to 0xf000, saw {exit_}"


def test_immediate_exit_is_interrupted_and_does_not_freeze(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, guest.HLT)
        vcpu.immediate_exit = True
        assert isinstance(vcpu.run(), InterruptedExit)
        assert vcpu.set_msrs({PLATFORM_INFO: 0}) == 1, "immediate_exit entered no guest: the model must not freeze"
        vcpu.immediate_exit = False
        assert isinstance(vcpu.run(), HltExit)
        assert vcpu.set_msrs({PLATFORM_INFO: 0x80000000}) == 0, "after a real entry a changed value is refused"


def test_signal_kick_gives_interrupted_exit(live: LinuxSystem) -> None:
    # A guest spinning forever (jmp $), kicked out of KVM_RUN by a signal sent from another thread.
    from iced_x86 import Code, Instruction

    loop = assemble([Instruction.create_branch(Code.JMP_REL8_16, 0x1000)])
    previous = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        with live.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            guest.load_real_mode(vm, vcpu, loop)
            me = threading.get_ident()
            timer = threading.Timer(0.05, signal.pthread_kill, (me, signal.SIGUSR1))
            timer.start()
            exit_ = vcpu.run()
            timer.join()
            assert isinstance(exit_, InterruptedExit), f"a signal during KVM_RUN should interrupt it, saw {exit_}"
            guest.load_real_mode(vm, vcpu, guest.HLT)
            assert isinstance(vcpu.run(), HltExit), "the vCPU keeps working after the interruption"
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("kw", [{"flags": -1}, {"flags": 1 << 32}, {"slot": 1 << 33}])
def test_add_memory_refuses_slot_or_flags_wider_than_32_bits(live: LinuxSystem, kw: dict[str, int]) -> None:
    """The region is packed with struct: a value KVM_SET_USER_MEMORY_REGION's u32 cannot hold is refused, not
    truncated (a ctypes struct used to make slot 1 << 33 into slot 0), and no memory is added."""
    with live.create_vm() as vm:
        with pytest.raises(InvalidValueError, match=r"0x0\.\.0xffffffff .*u32"):
            vm.add_memory(0, 0x1000, **kw)
        assert vm.regions == [], f"expected no region after the refusal, saw {vm.regions}"
        assert vm.add_memory(0, 0x1000) == 0, "slot 0 is still free"


def test_vm_start_asks_the_constant_answers_once(live: LinuxSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM_GET_VCPU_MMAP_SIZE and the memslot limits (KVM_CAP_NR_MEMSLOTS, KVM_CAP_MULTI_ADDRESS_SPACE on the VM) are
    asked for the first VM of a system and kept for the next ones of its type; they are what the kernel answers."""
    asked: list[tuple[str, int]] = []
    vm_check, size = LinuxVm.check_extension, LinuxSystem.vcpu_mmap_size
    monkeypatch.setattr(LinuxVm, "check_extension", lambda self, cap: asked.append(("vm", cap)) or vm_check(self, cap))
    monkeypatch.setattr(LinuxSystem, "vcpu_mmap_size", lambda self: asked.append(("size", 0)) or size(self))
    for round_ in range(3):
        with live.create_vm() as vm:
            vm.add_memory(0, 0x10000)
            vm.create_vcpu(0)
            want = [("size", 0), ("vm", uapi.KVM_CAP_NR_MEMSLOTS), ("vm", uapi.KVM_CAP_MULTI_ADDRESS_SPACE)]
            assert asked == (want if round_ == 0 else []), f"VM {round_}: expected {want if round_ == 0 else []} asked"
            limits = vm._memslot_limits()
            assert limits == (vm_check(vm, uapi.KVM_CAP_NR_MEMSLOTS), vm_check(vm, uapi.KVM_CAP_MULTI_ADDRESS_SPACE)), (
                f"VM {round_}: kept limits {limits} differ from the kernel's answers")
            asked.clear()
