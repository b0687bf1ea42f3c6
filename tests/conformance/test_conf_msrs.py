"""Feature MSRs, KVM_GET/SET_MSRS semantics and the freeze, on both backends (feature_msrs_test, platform_info_test)."""

from __future__ import annotations

import errno

import pytest

from kvmscope import guest, uapi
from kvmscope.api import HltExit, InterruptedExit, MsrBatch, System, Vcpu, Vm
from kvmscope.errors import KvmError, MsrWriteError
from kvmscope.kernel.profile import load

UCODE_REV, ARCH_CAP, PERF_CAP, PLATFORM_INFO = 0x8B, 0x10A, 0x345, 0xCE
FEATURES = {UCODE_REV: 0x1000065, ARCH_CAP: 0x400000000C000069, PERF_CAP: 0, PLATFORM_INFO: 0x80000000}


def fresh(kvm: System, cpuid: bool = False) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    if cpuid:
        vcpu.set_cpuid(kvm.get_supported_cpuid())
    return vm, vcpu


def ran(kvm: System, cpuid: bool = False) -> tuple[Vm, Vcpu]:
    vm, vcpu = fresh(kvm, cpuid)
    exit_ = guest.run_to_hlt(vm, vcpu)
    assert isinstance(exit_, HltExit), f"the one-byte HLT guest should exit with HLT, saw {exit_}"
    return vm, vcpu


def test_feature_list_and_system_values(kvm: System) -> None:
    assert kvm.get_msr_feature_index_list() == list(FEATURES), "KVM_GET_MSR_FEATURE_INDEX_LIST on this host"
    assert kvm.read_feature_msrs() == FEATURES, "system KVM_GET_MSRS of each feature MSR"
    assert kvm.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES) == 1


@pytest.mark.parametrize("which", ["KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST"])
def test_index_list_size_protocol(kvm: System, which: str) -> None:
    request = getattr(uapi, which)
    expected = 40 if which == "KVM_GET_MSR_INDEX_LIST" else 4
    with pytest.raises(KvmError) as info:
        kvm.msr_list_raw(request, 0)
    assert info.value.errno == errno.E2BIG and info.value.detail == f"kernel count {expected}", info.value
    count, indices = kvm.msr_list_raw(request, 64)
    assert count == expected == len(indices)


def test_system_get_msrs_follows_unsupported_rule(kvm: System) -> None:
    batch = MsrBatch([(PLATFORM_INFO, 7), (0x10, 7), (0x12345678, 7), (UCODE_REV, 7)])
    assert kvm.get_feature_msrs(batch) == 2, "system KVM_GET_MSRS stops at the unadvertised 0x12345678"
    assert list(batch) == [(PLATFORM_INFO, 0x80000000), (0x10, 0), (0x12345678, 0), (UCODE_REV, 7)], batch


def test_vcpu_defaults_with_quirk(kvm: System) -> None:
    vm, vcpu = fresh(kvm)
    with vm:
        got = {i: vcpu.try_read_msr(i) for i in FEATURES}
    # PVM: UCODE_REV is not stuffed (0, not SVM's 0x01000065); ARCH_CAP and PERF_CAP read 0 (no CPUID bit, no PMU).
    assert got == {UCODE_REV: 0, ARCH_CAP: 0, PERF_CAP: 0, PLATFORM_INFO: 0x80000000}, got


def test_vcpu_defaults_with_quirk_disabled(kvm: System) -> None:
    with kvm.create_vm() as vm:
        early = vm.create_vcpu(0)
        vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS)
        late = vm.create_vcpu(1)
        assert early.try_read_msr(PLATFORM_INFO) == 0x80000000, "the quirk applies when a vCPU is created"
        got = {i: late.try_read_msr(i) for i in FEATURES}
        assert got == {UCODE_REV: 0, ARCH_CAP: 0, PERF_CAP: 0, PLATFORM_INFO: 0}, got


def test_disable_unsupported_quirk_is_einval(kvm: System) -> None:
    with kvm.create_vm() as vm, pytest.raises(KvmError) as info:
        vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, 1 << 31)
    assert info.value.errno == errno.EINVAL


def test_refused_entry_position_and_zeroed_read(kvm: System) -> None:
    vm, vcpu = fresh(kvm)
    with vm:
        batch = MsrBatch([(UCODE_REV, 0x42), (PLATFORM_INFO, 0x80000000), (ARCH_CAP, 1), (UCODE_REV, 0x43)])
        assert vcpu.set_msrs(batch) == 2, "KVM_SET_MSRS stops at ARCH_CAPABILITIES = 1 (entry 2)"
        assert vcpu.try_read_msr(UCODE_REV) == 0x42, "entries before the refusal are written, the one after is not"
        got = MsrBatch([(PLATFORM_INFO, 0x1111), (0x12345678, 0x2222), (UCODE_REV, 0x3333)])
        assert vcpu.get_msrs(got) == 1
        assert list(got) == [(PLATFORM_INFO, 0x80000000), (0x12345678, 0), (UCODE_REV, 0x3333)], (
            f"the failed entry is zeroed, later entries are left as given; saw {got}")


@pytest.mark.parametrize("n", [255, 256, 1000])
def test_batch_limit(kvm: System, n: int) -> None:
    vm, vcpu = fresh(kvm)
    with vm:
        batch = MsrBatch([(UCODE_REV, i) for i in range(n)])
        if n < 256:
            assert vcpu.set_msrs(batch) == n and vcpu.get_msrs(batch) == n
        else:
            for call in (vcpu.set_msrs, vcpu.get_msrs):
                with pytest.raises(KvmError) as info:
                    call(batch)
                assert info.value.errno == errno.E2BIG, f"{n} entries: expected E2BIG, saw {info.value}"


@pytest.mark.parametrize("cpuid", [False, True], ids=["no-cpuid", "supported-cpuid"])
@pytest.mark.parametrize("index", [ARCH_CAP, PERF_CAP])
def test_caps_msrs_take_only_zero(kvm: System, index: int, cpuid: bool) -> None:
    for vm, vcpu in (fresh(kvm, cpuid), ran(kvm, cpuid)):
        with vm:
            assert vcpu.set_msrs({index: 0}) == 1, f"0x{index:x} = 0 is accepted (unsupported, advertised)"
            for value in (1, FEATURES[ARCH_CAP], (1 << 64) - 1):
                assert vcpu.set_msrs({index: value}) == 0, f"0x{index:x} = 0x{value:x} is refused"
            assert vcpu.try_read_msr(index) == 0


@pytest.mark.parametrize("cpuid", [False, True], ids=["no-cpuid", "supported-cpuid"])
def test_platform_info_frozen_after_run(kvm: System, cpuid: bool) -> None:
    # platform_info_test: set with 0xff00 OR'd in *before* the first run; after it the value is immutable (6.13+).
    vm, vcpu = fresh(kvm, cpuid)
    with vm:
        assert vcpu.set_msrs({PLATFORM_INFO: 0x80000000 | 0xFF00}) == 1, "PLATFORM_INFO is writable before a run"
        assert isinstance(guest.run_to_hlt(vm, vcpu), HltExit)
        for changed in (0, 0x80000000, 0x8000FF01, (1 << 64) - 1):
            assert vcpu.set_msrs({PLATFORM_INFO: changed}) == 0, f"PLATFORM_INFO = 0x{changed:x} after KVM_RUN"
        assert vcpu.try_read_msr(PLATFORM_INFO) == 0x8000FF00, "a refused write keeps the old value"
        assert vcpu.set_msrs({PLATFORM_INFO: 0x8000FF00}) == 1, "a same-value write after KVM_RUN is accepted"


def test_ucode_rev_stays_writable(kvm: System) -> None:
    vm, vcpu = ran(kvm)
    with vm:
        for value in (0x1000065, 0, 0x100000000, (1 << 64) - 1, 5):
            assert vcpu.set_msrs({UCODE_REV: value}) == 1, f"UCODE_REV = 0x{value:x} after KVM_RUN"
            assert vcpu.try_read_msr(UCODE_REV) == value


def test_re_stuffing_every_msr_after_run_passes(kvm: System) -> None:
    # What a VMM emulating RESET does: read every feature and index-list MSR, write them all back unchanged.
    vm, vcpu = ran(kvm, cpuid=True)
    with vm:
        # TSC moves on its own; ASYNC_PF_INT refuses every write without an in-kernel LAPIC (upstream
        # kvm_pv_enable_async_pf_int), so a VMM without one never writes it.
        indices = [i for i in kvm.get_msr_index_list() if i not in (0x10, 0x4B564D06)]
        batch = MsrBatch(indices)
        assert vcpu.get_msrs(batch) == len(indices)
        assert vcpu.set_msrs(batch) == len(indices), "re-writing the values just read after KVM_RUN"


def test_immediate_exit_does_not_freeze(kvm: System) -> None:
    vm, vcpu = fresh(kvm)
    with vm:
        guest.load_real_mode(vm, vcpu, guest.HLT)
        vcpu.immediate_exit = True
        assert isinstance(vcpu.run(), InterruptedExit)
        assert vcpu.set_msrs({PLATFORM_INFO: 0}) == 1, "KVM_RUN with immediate_exit entered no guest"
        vcpu.set_cpuid([])  # CPUID is still free too
        vcpu.immediate_exit = False
        assert isinstance(vcpu.run(), HltExit)
        assert vcpu.set_msrs({PLATFORM_INFO: 0x80000000}) == 0, "after a real VM entry the model is frozen"


def test_run_without_memory_fails_and_does_not_freeze(kvm: System) -> None:
    vm, vcpu = fresh(kvm)
    with vm:
        with pytest.raises(KvmError) as info:
            vcpu.run()
        assert (info.value.errno, info.value.ioctl) == (errno.ENOSPC, "KVM_RUN"), info.value
        assert vcpu.set_msrs({PLATFORM_INFO: 0}) == 1, "a KVM_RUN that failed before entry does not freeze"


def test_vcpu_id_limits(kvm: System) -> None:
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        for vid, err in ((0, errno.EEXIST), (4096, errno.EINVAL)):
            with pytest.raises(KvmError) as info:
                vm.create_vcpu(vid)
            assert info.value.errno == err, f"vCPU id {vid}: expected {errno.errorcode[err]}, saw {info.value}"
        assert vm.create_vcpu(4095).get_sregs().apic_base == 0xFEE00800, "a non-BSP vCPU's APIC base"


ORDINARY = {i: b for i, b in load("pvm-6.18").msr_behaviour.items() if b.kind in ("store", "drop", "zero_only", "refuse")}


@pytest.mark.parametrize("index", sorted(ORDINARY), ids=[f"0x{i:x}" for i in sorted(ORDINARY)])
def test_ordinary_msr_behaviour(kvm: System, index: int) -> None:
    b = ORDINARY[index]
    for value in (0, 0x1234, 1 << 40):
        vm, vcpu = fresh(kvm, cpuid=True)
        with vm:
            ok = vcpu.set_msrs({index: value}) == 1
            expected_ok = b.kind in ("store", "drop") or (b.kind == "zero_only" and value == 0)
            assert ok == expected_ok, f"0x{index:x} ({b.kind}) = 0x{value:x}: expected {expected_ok}, saw {ok}"
            expected = value if (ok and b.kind == "store") else b.default if b.readable else None
            assert vcpu.try_read_msr(index) == expected, f"0x{index:x} ({b.kind}) read back after writing 0x{value:x}"


def test_strict_write_error_names_the_msr(kvm: System) -> None:
    vm, vcpu = ran(kvm)
    with vm, pytest.raises(MsrWriteError) as info:
        vcpu.write_msrs([("UCODE_REV", 9), ("PLATFORM_INFO", 0)])
    e = info.value
    assert (e.index, e.name, e.value, e.position, e.total) == (PLATFORM_INFO, "MSR_PLATFORM_INFO", 0, 1, 2)
    if kvm.backend == "model":
        assert e.rule is not None and e.rule.commit == "bc2ca3680b30", (
            f"the model names the PLATFORM_INFO freeze rule, saw {e.rule}")
    else:
        assert e.rule is None, "the live kernel does not say why"


def test_misc_features_enables_takes_anything_on_pvm(kvm: System) -> None:
    # Upstream kvm_set_msr_common refuses reserved bits and CPUID_FAULT without PLATFORM_INFO.CPUID_FAULT (6.12.118
    # x86.c:3695-3701); PVM here stores any value, host and guest side, and the pvm-6.18 profile records that.
    vm, vcpu = fresh(kvm)
    with vm:
        assert vcpu.set_msrs({PLATFORM_INFO: 0}) == 1
        for value in (2, 1, 0xFFFF):
            assert vcpu.set_msrs({0x140: value}) == 1, f"MISC_FEATURES_ENABLES {value:#x} should be taken here"
            assert vcpu.try_read_msr(0x140) == value, f"MISC_FEATURES_ENABLES should read back {value:#x}"
