"""The upstream KVM selftests this PVM host can show, translated and run on both backends (live 6.18 and the model
with the ``pvm-6.18`` profile). Each case names the selftest file and lines it translates:

* ``6.12``: Debian linux-source 6.12.118, tools/testing/selftests/kvm/x86_64/
* ``upstream``: torvalds/linux tools/testing/selftests/kvm/x86/ at the commit named.

Where the live kernel here does not do what the selftest expects (PVM is not VMX or SVM), the case asserts what the
live kernel does and names the difference; where the model differs from the live kernel, the model's case is a strict
xfail (listed in /work/notes/issue-12-selftests.md). The same selftests on intel-spr and amd-epyc at other kernel
versions are in tests/test_selftests_model.py.
"""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from kvmscope import uapi
from kvmscope.api import System
from kvmscope.errors import KvmError
from kvmscope.model.system import ModelSystem
from kvmscope.program import Cpuid, GuestException, Halted, Program, Rdmsr, run_program

PLATFORM_INFO, UCODE_REV, ARCH_CAP, DE_CFG, HWCR = 0xCE, 0x8B, 0x10A, 0xC0011029, 0xC0010015
VMX_CR0_FIXED1, VMX_CR4_FIXED1 = 0x487, 0x489
HIDDEN_VMX = {0x481, 0x482, 0x483, 0x484}
STUFF = uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS
GP = GuestException(13, 0)
MANGLED = {(0xD, 0), (0xD, 1)}


def host_cpu_is_intel(kvm: System) -> bool:
    leaf0 = next(e for e in kvm.get_supported_cpuid() if e.function == 0)
    return (leaf0.ebx, leaf0.edx, leaf0.ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)


def model_differs(request: pytest.FixtureRequest, kvm: System, reason: str) -> None:
    """Mark this case a strict xfail on the model backend only: the live kernel is the reference."""
    if isinstance(kvm, ModelSystem):
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"model differs: {reason}"))


def test_get_msr_index_features(kvm: System) -> None:
    """6.12 x86_64/get_msr_index_features.c:28-34: every listed feature MSR reads with a one-entry system
    KVM_GET_MSRS."""
    from kvmscope.api import MsrBatch

    assert kvm.check_extension(uapi.KVM_CAP_GET_MSR_FEATURES)
    assert kvm.get_msr_index_list()
    for index in kvm.get_msr_feature_index_list():
        got = kvm.get_feature_msrs(MsrBatch([index]))
        assert got == 1, f"feature MSR {index:#x}: system KVM_GET_MSRS gave {got} entries, expected 1"


# PVM differs from VMX/SVM here (the live kernel and the model agree): its vendor module does not set UCODE_REV at
# vCPU creation, and its supported CPUID lacks ARCH_CAPABILITIES (7.EDX[29]), so ARCH_CAP reads 0 and the supported
# value is refused (a5d563890b8f, 6.13: a non-zero ARCH_CAP needs the CPUID bit).
PVM_RESET = {UCODE_REV: 0, ARCH_CAP: 0}
PVM_SET_REFUSED = {ARCH_CAP}


def test_feature_msrs(kvm: System) -> None:
    """upstream 946661e3bef8 x86/feature_msrs_test.c:42-94: for each feature MSR, a new vCPU with KVM's CPUID reads
    the supported value (0 for DE_CFG; UCODE_REV 0x100000000 on Intel, 0x01000065 on AMD), takes the supported
    value, and reads 0 when KVM_X86_QUIRK_STUFF_FEATURE_MSRS is disabled. On this PVM host UCODE_REV and ARCH_CAP
    differ from the selftest (PVM_RESET, PVM_SET_REFUSED): the case asserts exactly those differences."""
    quirks = kvm.check_extension(uapi.KVM_CAP_DISABLE_QUIRKS2)
    assert quirks & STUFF, f"6.18 reports KVM_X86_QUIRK_STUFF_FEATURE_MSRS: {quirks:#x}"
    for index, mask in kvm.read_feature_msrs().items():
        if index in (VMX_CR0_FIXED1, VMX_CR4_FIXED1):  # lines 54-55
            continue
        selftest = mask if index != DE_CFG else 0
        if index == UCODE_REV:  # lines 61-62
            selftest = 0x100000000 if host_cpu_is_intel(kvm) else 0x01000065
        want = PVM_RESET.get(index, selftest)
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            got = vcpu.read_msr(index)
            assert got == want, f"lines 70-74: MSR {index:#x} reset expected {want:#x} (selftest {selftest:#x}), " \
                                f"saw {got:#x}"
            if index not in HIDDEN_VMX:
                took = vcpu.set_msrs({index: mask})
                assert took == int(index not in PVM_SET_REFUSED), f"line 76: writing {index:#x}={mask:#x}: {took}"
        if index in HIDDEN_VMX:
            continue
        with kvm.create_vm() as vm:
            vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, STUFF)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.get_supported_cpuid())
            assert vcpu.read_msr(index) == 0, f"lines 86-92: quirk disabled, MSR {index:#x} should read 0"


def test_platform_info(kvm: System) -> None:
    """upstream b2128290c299 x86/platform_info_test.c:24-74 (6.12 x86_64/platform_info_test.c:24-75): the host
    sets MAX_TURBO_RATIO; with the capability on the guest reads it, with it off the guest's RDMSR #GPs. 6.12's line
    75 restored the original value after KVM_RUN; upstream dropped it, and on this 6.18 kernel the restore is refused
    (PLATFORM_INFO is immutable after KVM_RUN since 6.13, bc2ca3680b30)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert kvm.check_extension(uapi.KVM_CAP_MSR_PLATFORM_INFO), "line 48: TEST_REQUIRE"
        original = vcpu.read_msr(PLATFORM_INFO)
        vcpu.write_msr(PLATFORM_INFO, original | 0xFF00)
        vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 1)
        events = run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt())
        assert events == [Rdmsr(PLATFORM_INFO, original | 0xFF00), Halted()], f"lines 29-32: {events}"
        vm.enable_cap(uapi.KVM_CAP_MSR_PLATFORM_INFO, 0)
        events = run_program(vm, vcpu, Program().rdmsr(PLATFORM_INFO).hlt())
        assert events == [GP, Halted()], f"lines 34-36: with the capability off the guest RDMSR #GPs: {events}"
        assert vcpu.set_msrs({PLATFORM_INFO: original}) == 0, "6.12 line 75's restore is refused after KVM_RUN"
        assert vcpu.read_msr(PLATFORM_INFO) == original | 0xFF00


# PVM's KVM_SET_CPUID2 rewrites leaves 1, 7.0 and 7.1 (test_conf_cpuid.py shows 1 and 7.0), so the selftest's
# compare_cpuids (lines 94-99) fails on this host for exactly those entries; the live kernel and the model agree.
PVM_REWRITTEN = {(1, 0), (7, 0), (7, 1)}


def test_cpuid(kvm: System) -> None:
    """6.12 x86_64/cpuid_test.c:28-57, 72-101, 138-183, 192-205 and upstream 6574f01ef95d x86/cpuid_test.c
    set_cpuid_after_run (the CR4.OSXSAVE toggle): KVM_GET_CPUID2 equals what was set (on PVM: except
    PVM_REWRITTEN); the guest's CPUID of every entry equals what KVM holds; KVM's maximum leaf is 0x40000001; after
    KVM_RUN the same CPUID is taken (also after toggling CR4.OSXSAVE), a changed 7.EBX or MAXPHYADDR is EINVAL;
    KVM_GET_CPUID2 with too few entries is E2BIG."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.get_supported_cpuid()
        vcpu.set_cpuid(supported)
        current = vcpu.get_cpuid()
        assert [(e.function, e.index, e.flags) for e in current] == [
            (e.function, e.index, e.flags) for e in supported], "lines 78-89: entries differ"
        differ = {(a.function, a.index) for a, b in zip(current, supported, strict=True) if a != b} - MANGLED
        assert differ == PVM_REWRITTEN, f"lines 94-99: entries that differ from what was set: {sorted(differ)}"
        prog = Program()
        for e in current:
            prog.cpuid(e.function, e.index)
        events = run_program(vm, vcpu, prog.cpuid(0x40000000).hlt())
        seen = vcpu.get_cpuid()
        assert len(events) == len(seen) + 2 and all(isinstance(ev, Cpuid) for ev in events[:-1]), events[-3:]
        for e, ev in zip(seen, events, strict=False):
            assert isinstance(ev, Cpuid)
            if (e.function, e.index) not in MANGLED:
                assert (ev.eax, ev.ebx, ev.ecx, ev.edx) == (e.eax, e.ebx, e.ecx, e.edx), (
                    f"lines 33-42: guest CPUID {e.function:#x}.{e.index} gave {ev}, KVM holds {e}")
        kvm_leaf = events[len(seen)]
        assert isinstance(kvm_leaf, Cpuid) and kvm_leaf.eax == 0x40000001, f"line 54: {kvm_leaf}"
        vcpu.set_cpuid(seen)
        sregs = vcpu.get_sregs()
        sregs.cr4 ^= 1 << 18  # CR4.OSXSAVE: CPUID.1:ECX.OSXSAVE follows it at run time
        vcpu.set_sregs(sregs)
        vcpu.set_cpuid(seen)
        for what, changed in (
                ("7.EBX - 1", [replace(e, ebx=e.ebx - 1) if (e.function, e.index) == (7, 0) else e for e in seen]),
                ("MAXPHYADDR - 1", [replace(e, eax=e.eax & ~0xFF | (e.eax & 0xFF) - 1) if e.function == 0x80000008
                                    else e for e in seen])):
            with pytest.raises(KvmError) as info:
                vcpu.set_cpuid(changed)
            assert info.value.errno == errno.EINVAL, f"lines 148-163: {what} after KVM_RUN: {info.value}"
        assert len(vcpu.get_cpuid(len(seen))) == len(seen), "lines 171-174"
        for n in (0, len(seen) // 2, len(seen) - 1):
            with pytest.raises(KvmError) as info:
                vcpu.get_cpuid(n)
            assert info.value.errno == errno.E2BIG, f"lines 176-181: KVM_GET_CPUID2 with {n} entries: {info.value}"


def test_hwcr(kvm: System, request: pytest.FixtureRequest) -> None:
    """6.12 x86_64/hwcr_msr_test.c:11-42 (upstream unchanged in substance): a host write of each single HWCR bit;
    bits 3, 6 and 8 are taken and ignored (read 0), 18 (McStatusWrEn) and 24 (TscFreqSel) are taken and read back,
    every other bit is refused (6.12.118 x86.c:3436-3451, the same in 6.18)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        ignored, valid = 1 << 3 | 1 << 6 | 1 << 8, 1 << 18 | 1 << 24
        for bit in range(64):
            value = 1 << bit
            took = vcpu.set_msrs({HWCR: value})
            assert took == int(not value & ~(ignored | valid)), f"lines 20-23: HWCR {value:#x} gave {took}"
            got = vcpu.read_msr(HWCR)
            assert got == value & valid, f"lines 25-28: bit {bit}: HWCR reads {got:#x}, expected {value & valid:#x}"
            assert vcpu.set_msrs({HWCR: 0}) == 1, "line 30"


# include/uapi/linux/kvm.h: KVM_CAP_X86_DISABLE_EXITS 143, KVM_X86_DISABLE_EXITS_HLT (1 << 1); KVM_FEATURE_PV_UNHALT
# is bit 7 of KVM_CPUID_FEATURES (0x40000001) EAX (arch/x86/include/uapi/asm/kvm_para.h).
KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT, PV_UNHALT = 143, 1 << 1, 1 << 7


def test_pv_unhalt_with_hlt_in_guest(kvm: System, request: pytest.FixtureRequest) -> None:
    """6.12 x86_64/kvm_pv_test.c:136-171 (upstream 7b2658cb33c7 test_pv_unhalt): with HLT exits disabled,
    KVM_SET_CPUID2 clears KVM_FEATURE_PV_UNHALT from the KVM leaf (__kvm_update_cpuid_runtime). The selftest enables
    the capability after creating the vCPU; this 6.18 kernel refuses that (EINVAL: kvm->created_vcpus, absent from
    6.12.118 x86.c:6123-6149), so the case enables it before, as userspace must here."""
    assert kvm.check_extension(KVM_CAP_X86_DISABLE_EXITS) & DISABLE_EXITS_HLT, "HLT exits can be disabled here"
    with_unhalt = [replace(e, eax=e.eax | PV_UNHALT) if e.function == 0x40000001 else e
                   for e in kvm.get_supported_cpuid()]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(with_unhalt)
        leaf = [e for e in vcpu.get_cpuid() if e.function == 0x40000001]
        assert leaf and leaf[0].eax & PV_UNHALT, f"lines 149-152: PV_UNHALT should stick without the cap: {leaf}"
        with pytest.raises(KvmError) as info:
            vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT)
        assert info.value.errno == errno.EINVAL, f"6.18: the cap after vCPU creation is EINVAL, saw {info.value}"
    with kvm.create_vm() as vm:
        vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, DISABLE_EXITS_HLT)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(with_unhalt)
        leaf = [e for e in vcpu.get_cpuid() if e.function == 0x40000001]
        assert leaf and not leaf[0].eax & PV_UNHALT, f"lines 165-166: PV_UNHALT is cleared with HLT in guest: {leaf}"


def test_disabling_an_exit_the_host_does_not_allow_is_einval(kvm: System) -> None:
    """c829ccd4d9dc (6.14): KVM_ENABLE_CAP(X86_DISABLE_EXITS) of an exit outside KVM_CHECK_EXTENSION's answer is EINVAL
    (this host answers 14: no MWAIT). The model before 6.14 takes it: tests/test_kernel_versions.py."""
    allowed = kvm.check_extension(KVM_CAP_X86_DISABLE_EXITS)
    assert allowed == 0b1110, f"this host allows HLT, PAUSE and CSTATE, not MWAIT: saw {allowed:#x}"
    for arg, taken in ((1, False), (0b1111, False), (0b1110, True)):
        with kvm.create_vm() as vm:
            try:
                vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, arg)
                got = True
            except KvmError as e:
                assert e.errno == errno.EINVAL, f"{arg:#x}: expected EINVAL, saw {e}"
                got = False
        assert got is taken, f"disabling exits {arg:#x}: taken {got}, expected {taken}"


def test_xss_without_xsaves(kvm: System, request: pytest.FixtureRequest) -> None:
    """xss_msr_test.c (6.12 x86_64/xss_msr_test.c:26-32) needs XSAVES, which this host's KVM does not offer; what it
    reads first still holds here: a host read of IA32_XSS gives 0 (6.12.118 x86.c:3991-3996 checks XSAVES only for
    guest reads). A host write, even of 0, is refused: XSS is not in KVM_GET_MSR_INDEX_LIST, so the zero-write rule
    (64a5d7a1091f) does not apply."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        assert 0xDA0 not in kvm.get_msr_index_list()
        assert vcpu.try_read_msr(0xDA0) == 0, "a host read of IA32_XSS gives 0"
        assert vcpu.set_msrs({0xDA0: 0}) == 0, "a host write of 0 without XSAVES is refused"


def assert_xcr0_is_usable(xcr0: int, where: str) -> None:
    """Lines 22-47 and 62-80 (the same check as tests/test_selftests_model.py, kept here so each file stands alone)."""
    sse, ymm, bnd, avx512, xtile = 1 << 1, 1 << 2, 0x3 << 3, 0x7 << 5, 0x3 << 17
    for features, deps in ((ymm, sse), (avx512, sse | ymm)):
        have = xcr0 & (features | deps)
        assert have & features != features or have == features | deps, f"{where}: {features:#x} needs {deps:#x}"
    for features in (bnd, avx512, xtile):
        assert xcr0 & features in (0, features), f"{where}: {features:#x} all or none in {xcr0:#x}"
    assert xcr0 & 1, f"{where}: x87 is always in XCR0: {xcr0:#x}"


def test_xcr0_cpuid(kvm: System) -> None:
    """6.12 x86_64/xcr0_cpuid_test.c:18-80: the XCR0 KVM offers in CPUID 0xD.0 (EDX:EAX) keeps the architectural
    bundles (AVX needs SSE; MPX, AVX-512 and AMX all or none; AVX-512 needs SSE and AVX), in the supported CPUID and as
    the guest reads it."""
    leaf = next(e for e in kvm.get_supported_cpuid() if (e.function, e.index) == (0xD, 0))
    assert_xcr0_is_usable(leaf.edx << 32 | leaf.eax, "supported CPUID")
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        events = run_program(vm, vcpu, Program().cpuid(0xD, 0).hlt())
        seen = events[0]
        assert isinstance(seen, Cpuid), events
        assert_xcr0_is_usable(seen.edx << 32 | seen.eax, "guest CPUID 0xD.0")
