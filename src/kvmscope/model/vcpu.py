"""The model's vCPU: the kernel's host-MSR, CPUID and KVM_RUN rules for one vCPU, for a ruleset and a host profile.

Return codes inside follow the kernel: 0 success, 1 failure, ``UNSUPPORTED`` (``KVM_MSR_RET_UNSUPPORTED``), negative
errnos. Each refusal records the rule behind it (``refusal_rule``), which the strict helpers and ``kvmscope check`` name.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from .. import msrs as M
from .. import uapi
from ..api import (
    LITTLE_ENDIAN,
    CpuidEntry,
    Exit,
    HltExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    MsrBatch,
    MsrItems,
    Vcpu,
    as_batch,
    find_cpuid,
)
from ..errors import InvalidValueError, KvmError, KvmscopeError
from ..kernel import rulesets as R
from ..program import Program
from . import cpuid as C
from . import vmx
from .guest_exec import ProgramState
from .guest_exec import run_program as run_guest_program

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from .vm import ModelVm

OK, FAIL, UNSUPPORTED = 0, 1, 2
KEPT = 3  # internal to set_msrs: the write was accepted and stored nothing (a frozen MSR given its own value)
EINVAL = -errno.EINVAL
_ENTRY = struct.Struct("<IIQ")
GUEST_BUDGET = 1_000_000

# CPUID bits the MSR rules consult: (function, index, register, bit).
ARCH_CAPABILITIES_BIT = (7, 0, "edx", 29)
PDCM_BIT = (1, 0, "ecx", 15)
VMX_BIT = (1, 0, "ecx", 5)
DS_BIT = (1, 0, "edx", 21)
DTES64_BIT = (1, 0, "ecx", 2)
XSAVE_BIT = (1, 0, "ecx", 26)

# kvmclock MSRs share storage (x86.c kvm_set_msr_common): the old and new wall-clock MSRs both set the VM-wide
# kvm->arch.wall_clock; the old and new system-time MSRs both set the vCPU's arch.time.
MSR_ALIASES = {0x4B564D00: 0x11, 0x4B564D01: 0x12}
VM_WIDE_MSRS = frozenset({0x11})
MSR_MISC_FEATURES_ENABLES = 0x140
_PLATFORM_INFO = M.MSR_PLATFORM_INFO
_CPUID_FAULT = M.PLATFORM_INFO_CPUID_FAULT
_PLAN_CACHE = 256  # batch plans kept per vCPU
# A batch's write plan: the entries with rules (position, index, the MSR's setter if it has one), the store-only
# indices, how to pick their values from the batch's list of values, and all the indices when the batch can be stored
# whole (see _plan).
FrozenCheck = tuple[Callable[[list[int]], object], Callable[[dict[int, int]], object]]
WritePlan = tuple[
    "tuple[tuple[int, int, Callable[[int], int] | None], ...]",
    tuple[int, ...],
    "Callable[[list[int]], Sequence[int]] | None",
    "tuple[int, ...] | None",
    "FrozenCheck | None",
]


def _always_mismatch(values: list[int]) -> object:
    return object()


def _nothing(store: dict[int, int]) -> object:
    return None


def store_only_msrs(profile: Profile, immutable: frozenset[int]) -> frozenset[int]:
    """The MSRs for which ``_do_set`` always succeeds and does nothing but store the value under its own index:
    UCODE_REV and the profile's ordinary MSRs that accept any value, less every MSR with a rule of its own and every
    MSR a rule reads (MISC_FEATURES_ENABLES, which PLATFORM_INFO's order check reads), so that no rule depends on a
    store-only write: ``set_msrs`` relies on it to run a batch's ruled entries first."""
    ruled = {
        MSR_MISC_FEATURES_ENABLES,
        *MSR_ALIASES.values(),
        M.MSR_IA32_ARCH_CAPABILITIES,
        M.MSR_IA32_PERF_CAPABILITIES,
        M.MSR_PLATFORM_INFO,
        M.MSR_AMD64_DE_CFG,
        vmx.MSR_IA32_FEAT_CTL,
        *MSR_ALIASES,
        *VM_WIDE_MSRS,
        *immutable,
    }
    ordinary = {i for i, b in profile.msr_behaviour.items() if b.kind not in ("refuse", "zero_only", "drop")}
    return frozenset(({M.MSR_IA32_UCODE_REV} | ordinary) - ruled - set(range(M.VMX_FIRST, M.VMX_LAST + 1)))


class ModelLimitation(KvmscopeError):
    """The model met guest code or a request it does not implement (the live kernel would do something)."""


def _struct_from(cls: type[ctypes.Structure], fields: dict[str, object], base: ctypes.Structure) -> None:
    for name, value in fields.items():
        target = getattr(base, name)
        if isinstance(value, dict):
            _struct_from(type(target), value, target)
        else:
            setattr(base, name, value)


def reset_sregs(profile_sregs: dict[str, object], vcpu_id: int) -> uapi.kvm_sregs:
    s = uapi.kvm_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        seg.limit, seg.type, seg.present, seg.s = 0xFFFF, 3, 1, 1
    s.cs.selector, s.cs.base, s.cs.type = 0xF000, 0xFFFF0000, 11
    s.tr.limit, s.tr.type, s.tr.present = 0xFFFF, 11, 1
    s.ldt.limit, s.ldt.type, s.ldt.present = 0xFFFF, 2, 1
    s.gdt.limit = s.idt.limit = 0xFFFF
    s.cr0 = 0x60000010
    s.apic_base = 0xFEE00000 | 1 << 11 | (1 << 8 if vcpu_id == 0 else 0)
    _struct_from(uapi.kvm_sregs, profile_sregs, s)
    return s


class ModelVcpu(Vcpu):
    """A vCPU of the software KVM."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.profile = vm.profile
        self.rules = vm.rules
        self.has_run = False
        self._immediate_exit = False
        self._refusals: dict[int, R.Rule] = {}
        self._pending_in: tuple[int, int] | None = None  # (size, count) of an IN awaiting data
        self._in_data = b""
        p, rs = self.profile, self.rules
        self._advertised = vm.system.advertised
        # kvm_is_immutable_feature_msr: the generic list plus the VMX range, computed once so the check stays cheap.
        self._immutable_set = frozenset(M.VMX_RANGE) | self.rules.immutable_generic
        # The MSRs frozen right now: empty until the first real VM entry, then the immutable set (if the ruleset
        # freezes), so the per-entry check is one set lookup.
        self._frozen: frozenset[int] = frozenset()
        # MSRs whose do_get_msr is a plain read of the stored value (no CPUID gate): the check reads them directly.
        self._plain = frozenset({M.MSR_PLATFORM_INFO} | ({M.MSR_AMD64_DE_CFG} if vm.profile.vendor == "svm" else set()))
        self._store_only = store_only_msrs(p, self._immutable_set)
        self._setters = self._msr_setters()
        self._same_value_real_write = rs.same_value_real_write
        self._plans: dict[bytes, WritePlan] = {}
        features = p.feature_msrs
        quirk = (not rs.stuff_quirk) or not vm.disabled_quirks & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS
        self._msr: dict[int, int] = {
            M.MSR_IA32_ARCH_CAPABILITIES: features.get(M.MSR_IA32_ARCH_CAPABILITIES, 0) if quirk else 0,
            M.MSR_PLATFORM_INFO: M.PLATFORM_INFO_CPUID_FAULT if quirk else 0,
            M.MSR_IA32_PERF_CAPABILITIES: p.supported_perf_cap if quirk else 0,
            M.MSR_IA32_UCODE_REV: (p.ucode_rev_reset or 0) if quirk else 0,
            M.MSR_AMD64_DE_CFG: 0,
        }
        for index, b in p.msr_behaviour.items():
            self._msr.setdefault(index, b.default)
        self._vmx_kvm = vmx.slots_from(features) if p.nested_vmx else {}
        self._vmx = dict(self._vmx_kvm) if (quirk and p.nested_vmx) else vmx.slots_from({})
        self._cpuid: list[CpuidEntry] = []
        self._raw_cpuid: list[CpuidEntry] = []
        sregs = reset_sregs(p.reset_sregs, vcpu_id)
        self._sregs = sregs
        self._regs = uapi.kvm_regs(rflags=2, rip=0xFFF0)
        for name, value in p.reset_regs.items():
            setattr(self._regs, name, value)
        self._runtime = C.RuntimeState(cr4=sregs.cr4, apic_base=sregs.apic_base)
        self._program: ProgramState | None = None

    # -- plumbing --
    def close(self) -> None:
        self._closed = True

    def attach_program(self, program: Program) -> None:
        """Run ``program`` (kvmscope.program) on the next KVM_RUNs: the model interprets its operations directly."""
        self._check_open()
        self._program = ProgramState(list(program.ops))

    def limitation(self, message: str) -> ModelLimitation:
        return ModelLimitation(message)

    def _reply_msr(self, error: int, value: int) -> None:
        if self._program is not None:
            self._program.reply = (error, value)

    def refusal_rule(self, index: int) -> R.Rule | None:
        return self._refusals.get(index)

    def _refuse(self, index: int, rule: R.Rule, code: int) -> int:
        self._refusals[index] = rule
        return code

    def _cpuid_has(self, bit: tuple[int, int, str, int]) -> bool:
        return C.has_feature(self._cpuid, *bit)

    @property
    def immediate_exit(self) -> bool:
        self._check_open()
        return self._immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._check_open()
        self._immediate_exit = bool(value)

    # -- registers --
    def get_regs(self) -> uapi.kvm_regs:
        self._check_open()
        return uapi.kvm_regs.from_buffer_copy(self._regs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self._check_open()
        self._regs = uapi.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        self._check_open()
        return uapi.kvm_sregs.from_buffer_copy(self._sregs)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS with ``kvm_is_valid_sregs``'s long-mode consistency checks."""
        self._check_open()
        lme, lma, pg, pae = sregs.efer & 1 << 8, sregs.efer & 1 << 10, sregs.cr0 & 1 << 31, sregs.cr4 & 1 << 5
        if (lme and pg and (not pae or not lma)) or (not (lme and pg) and (lma or sregs.cs.l)):
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS")
        self._sregs = uapi.kvm_sregs.from_buffer_copy(sregs)
        if not sregs.cr0 & 1:
            self._program = None  # back in real mode: run the code in guest memory again
        self._runtime.cr4 = sregs.cr4
        self._runtime.apic_base = sregs.apic_base

    # -- MSR handlers: the kernel's per-MSR host rules --
    def _get(self, index: int) -> tuple[int, int]:
        """``do_get_msr`` before the unsupported-MSR rule: (code, value)."""
        p, rs = self.profile, self.rules
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            if p.vendor != "vmx" or not p.nested_vmx:
                return UNSUPPORTED, 0
            if not self._cpuid_has(VMX_BIT):
                return self._refuse(index, R.VMX_RESTORE, FAIL), 0
            value = vmx.read(self._vmx, index)
            return (OK, value) if value is not None else (FAIL, 0)
        if index == M.MSR_IA32_ARCH_CAPABILITIES:
            if rs.cpuid_gated_caps and not self._cpuid_has(ARCH_CAPABILITIES_BIT):
                return self._refuse(index, R.ARCH_CAP_NEEDS_CPUID, UNSUPPORTED), 0
            return OK, self._msr[index]
        if index == M.MSR_IA32_PERF_CAPABILITIES:
            if rs.cpuid_gated_caps and not self._cpuid_has(PDCM_BIT):
                return self._refuse(index, R.PERF_CAP_NEEDS_PDCM, UNSUPPORTED), 0
            return OK, self._msr[index]
        if index in (M.MSR_PLATFORM_INFO, M.MSR_IA32_UCODE_REV):
            return OK, self._msr[index]
        if index == M.MSR_AMD64_DE_CFG:
            return (OK, self._msr[index]) if p.vendor == "svm" else (UNSUPPORTED, 0)
        b = p.msr_behaviour.get(index)
        if b is None:
            return self._refuse(index, R.UNKNOWN_MSR, UNSUPPORTED), 0
        if not b.readable:
            return self._refuse(index, R.HOST_PROFILE, FAIL), 0
        if b.kind == "drop":
            return OK, b.default
        key = MSR_ALIASES.get(index, index)
        store = self.vm.msrs if key in VM_WIDE_MSRS else self._msr
        return OK, store.get(key, b.default)

    def _set(self, index: int, data: int) -> int:
        """``kvm_set_msr_ignored_check`` before the unsupported-MSR rule."""
        setter = self._setters.get(index)
        if setter is not None:
            return setter(data)
        p = self.profile
        if M.VMX_FIRST <= index <= M.VMX_LAST:
            if p.vendor != "vmx" or not p.nested_vmx:
                return self._refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
            if not self._cpuid_has(VMX_BIT):
                return self._refuse(index, R.VMX_RESTORE, FAIL)
            code = vmx.write(self._vmx, self._vmx_kvm, index, data)
            return self._refuse(index, R.VMX_RESTORE, code) if code else OK
        b = p.msr_behaviour.get(index)
        if b is None:
            return self._refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
        if b.kind == "refuse" or (b.kind == "zero_only" and data):
            return self._refuse(index, R.HOST_PROFILE, FAIL)
        if b.kind != "drop":
            key = MSR_ALIASES.get(index, index)
            (self.vm.msrs if key in VM_WIDE_MSRS else self._msr)[key] = data
        return OK

    def _msr_setters(self) -> dict[int, Callable[[int], int]]:
        """The MSRs with a host-write rule of their own, and the rule. A setter that returns OK has stored the value
        verbatim under its own index in ``_msr``: ``set_msrs`` relies on it (see ``_plan``)."""
        setters: dict[int, Callable[[int], int]] = {
            M.MSR_IA32_ARCH_CAPABILITIES: self._set_arch_cap,
            M.MSR_IA32_PERF_CAPABILITIES: self._set_perf_cap,
            M.MSR_PLATFORM_INFO: self._set_platform_info,
            M.MSR_IA32_UCODE_REV: self._set_ucode_rev,
            M.MSR_AMD64_DE_CFG: self._set_de_cfg,
        }
        if self.profile.vendor == "vmx":
            setters[vmx.MSR_IA32_FEAT_CTL] = self._set_feat_ctl
        return setters

    def _set_arch_cap(self, data: int) -> int:
        index = M.MSR_IA32_ARCH_CAPABILITIES
        if self.rules.cpuid_gated_caps and not self._cpuid_has(ARCH_CAPABILITIES_BIT):
            return self._refuse(index, R.ARCH_CAP_NEEDS_CPUID, UNSUPPORTED)
        self._msr[index] = data
        return OK

    def _set_platform_info(self, data: int) -> int:
        if (
            self.rules.platform_info_order_check
            and not data & _CPUID_FAULT
            and self._msr.get(MSR_MISC_FEATURES_ENABLES, 0) & 1
        ):
            return self._refuse(M.MSR_PLATFORM_INFO, R.PLATFORM_INFO_ORDER_CHECK, FAIL)
        self._msr[_PLATFORM_INFO] = data
        return OK

    def _set_ucode_rev(self, data: int) -> int:
        self._msr[M.MSR_IA32_UCODE_REV] = data
        return OK

    def _set_de_cfg(self, data: int) -> int:
        index, p = M.MSR_AMD64_DE_CFG, self.profile
        if p.vendor != "svm":
            return self._refuse(index, R.UNKNOWN_MSR, UNSUPPORTED)
        if data & ~p.feature_msrs.get(index, 0):
            return self._refuse(index, R.DE_CFG_SUBSET, FAIL)
        self._msr[index] = data
        return OK

    def _set_feat_ctl(self, data: int) -> int:
        # vmx_set_msr: userspace may set any bit KVM supports (is_vmx_feature_control_msr_valid).
        if data & ~vmx.KVM_SUPPORTED_FEATURE_CONTROL:
            return self._refuse(vmx.MSR_IA32_FEAT_CTL, R.HOST_PROFILE, FAIL)
        self._msr[vmx.MSR_IA32_FEAT_CTL] = data
        return OK

    def perf_cap_vendor_check(self, data: int) -> int:
        """``vmx_set_msr``'s LBR and PEBS format checks, which run before the common code, for host and guest."""
        index, p, rs = M.MSR_IA32_PERF_CAPABILITIES, self.profile, self.rules
        supported = p.supported_perf_cap
        if p.vendor == "vmx":
            host = next((e for e in p.supported_cpuid if e.function == 1), None)
            guest = find_cpuid(self._cpuid, 1)
            consistent = host is not None and guest is not None and C.x86_model(host.eax) == C.x86_model(guest.eax)
            if data & M.PERF_CAP_LBR_FMT and ((data ^ supported) & M.PERF_CAP_LBR_FMT or not consistent):
                return self._refuse(index, R.PERF_CAP_SUBSET, FAIL)
            if data & M.PERF_CAP_PEBS_FORMAT and (
                (data ^ supported) & rs.perf_cap_pebs_mask
                or not self._cpuid_has(DS_BIT)
                or not self._cpuid_has(DTES64_BIT)
                or not consistent
            ):
                return self._refuse(index, R.PERF_CAP_SUBSET, FAIL)
            if rs.perf_cap_pmu_version and data:
                pmu = find_cpuid(self._cpuid, 0xA)
                if pmu is None or not pmu.eax & 0xFF:
                    return self._refuse(index, R.PERF_CAP_SUBSET, FAIL)
        return OK

    def _set_perf_cap(self, data: int) -> int:
        index, p, rs = M.MSR_IA32_PERF_CAPABILITIES, self.profile, self.rules
        supported = p.supported_perf_cap
        code = self.perf_cap_vendor_check(data)
        if code:
            return code
        if rs.cpuid_gated_caps and not self._cpuid_has(PDCM_BIT):
            return self._refuse(index, R.PERF_CAP_NEEDS_PDCM, UNSUPPORTED)
        if data & ~supported:
            return self._refuse(index, R.PERF_CAP_SUBSET, FAIL)
        self._msr[index] = data
        return OK

    # -- kvm_do_msr_access and do_set_msr --
    def _access_get(self, index: int) -> tuple[int, int]:
        code, value = self._get(index)
        if code == UNSUPPORTED and (
            (self.rules.unsupported_zero and index in self._advertised) or self.profile.ignore_msrs
        ):
            return OK, 0
        return code, value if code == OK else 0

    def _do_set(self, index: int, data: int) -> int:
        """``do_set_msr`` of one host-initiated write: 0 when it took effect (or was ignored), else the code."""
        code = self._try_set(index, data)
        if code == KEPT or (code == UNSUPPORTED and self._unsupported_ok(index, data)):
            return OK
        return code

    def _try_set(self, index: int, data: int) -> int:
        """The write with the freeze check, before unsupported MSRs are forgiven (``_unsupported_ok``); ``KEPT`` when a
        frozen MSR took its own value without a real write (before 6.10)."""
        if self._refusals:
            self._refusals.pop(index, None)  # the rule behind the last refusal only, not an older one
        if index in self._frozen:
            if index in self._plain:
                current: int | None = self._msr[index]
            else:
                code, value = self._access_get(index)
                current = None if code else value
            if current != data:
                rule = R.PLATFORM_INFO_IMMUTABLE if index == M.MSR_PLATFORM_INFO else R.FREEZE
                return self._refuse(index, rule, EINVAL)
            if not self._same_value_real_write:
                return KEPT
        setter = self._setters.get(index)
        return setter(data) if setter is not None else self._set(index, data)

    def _unsupported_ok(self, index: int, data: int) -> bool:
        """kvm_do_msr_access: an unsupported MSR's write of 0 passes when the MSR is advertised (6.12+), and any
        write passes with ``ignore_msrs``; nothing is stored either way."""
        return (self.rules.unsupported_zero and data == 0 and index in self._advertised) or self.profile.ignore_msrs

    # -- raw ioctls --
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        self._check_open()
        n = len(batch)
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_GET_MSRS")
        buf = batch.buffer
        for i in range(n):
            off = 8 + 16 * i
            index = _ENTRY.unpack_from(buf, off)[0]
            code, value = self._access_get(index)
            struct.pack_into("<Q", buf, off + 8, value if code == OK else 0)
            if code:
                if strict:
                    raise self.short_read(batch, i)
                return i
        return n

    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        if self._closed:
            self._check_open()
        batch = entries if type(entries) is MsrBatch else as_batch(entries)
        n = batch.nmsrs
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_SET_MSRS")
        # The batch's indices, packed, key its plan; its values come out as one list (both one C-level call each).
        key = batch.words32[2::4].tobytes()
        plan = self._plans.get(key) or self._plan(key)
        values: list[int] = batch.words64[2::2].tolist() if LITTLE_ENDIAN else batch.values
        specials, store_indices, pick, verbatim, frozen = plan
        # Frozen MSRs keep their value through the batch (a different one is refused), so their freeze check can run
        # for the whole batch at once: when every frozen entry carries the value it has, each entry with a setter
        # goes straight to it, as _try_set would; otherwise every entry takes the full path.
        fast = frozen is None or (frozen[0](values) == frozen[1](self._msr) and self._same_value_real_write)
        for pos, index, setter in specials:
            data = values[pos]
            if setter is None or not fast:
                code = self._try_set(index, data)
            else:
                if self._refusals:
                    self._refusals.pop(index, None)
                code = setter(data)
            if code:
                if code == KEPT or (code == UNSUPPORTED and self._unsupported_ok(index, data)):
                    verbatim = None  # taken without storing: the bulk store below must leave it alone
                    continue
                indices = batch.indices
                for i in range(pos):  # the store-only entries before the refused one took effect
                    if indices[i] in self._store_only:
                        self._store(indices[i], values[i])
                if strict:
                    raise self.short_write(batch, pos)
                return pos
        if verbatim is not None:
            # Every entry with a rule stored its value verbatim under its own index (the setters do), so storing the
            # whole batch in order changes nothing for them and stores the store-only entries: no picking needed.
            self._msr.update(zip(verbatim, values))  # noqa: B905 (same length by construction)
        elif pick is not None:
            self._msr.update(zip(store_indices, pick(values)))  # noqa: B905
        if self._refusals:
            for index in store_indices:
                self._refusals.pop(index, None)
        return n

    def _frozen_check(self, specials: tuple[tuple[int, int, Callable[[int], int] | None], ...]) -> FrozenCheck | None:
        """For a plan: how to get the values a batch gives its frozen MSRs that have setters, and the values they
        hold, so that one comparison does their freeze check (None when no such entry). The values held are read
        straight from ``_msr``, so only plain MSRs qualify: any other frozen MSR with a setter gets a check that
        always fails, which sends the batch down the full path."""
        positions = [(pos, index) for pos, index, setter in specials if setter is not None and index in self._frozen]
        if not positions:
            return None
        if any(index not in self._plain for _, index in positions):
            return (_always_mismatch, _nothing)
        return (itemgetter(*(pos for pos, _ in positions)), itemgetter(*(index for _, index in positions)))

    def _store(self, index: int, data: int) -> None:
        """``_do_set`` of a store-only MSR."""
        self._refusals.pop(index, None)
        self._msr[index] = data

    def _plan(self, key: bytes) -> WritePlan:
        """How to write a batch naming these MSRs. Store-only MSRs always succeed and only store their value under
        their own index, and no rule reads them (``store_only_msrs``), so the entries with rules can run first, in
        order, and the store-only ones follow in one C-level update: the outcome is the kernel's entry-by-entry one.
        Which MSRs are store-only depends only on the profile and ruleset; the freeze check depends on which MSRs are
        frozen, so plans are rebuilt once, at the freeze."""
        indices = struct.unpack(f"<{len(key) // 4}I", key)  # the raw bytes of the little-endian batch
        store_only = self._store_only
        specials = tuple((i, index, self._setters.get(index)) for i, index in enumerate(indices) if index not in store_only)
        positions = [i for i, index in enumerate(indices) if index in store_only]
        pick: Callable[[list[int]], Sequence[int]] | None = None
        if len(positions) == 1:  # itemgetter of one item gives the item, of a slice a list
            pick = itemgetter(slice(positions[0], positions[0] + 1))
        elif positions:
            pick = itemgetter(*positions)
        # When every entry with a rule is one of the setters' MSRs, which store the value verbatim when they accept
        # it, the whole batch can be stored in order after the rules ran (see set_msrs).
        verbatim = tuple(indices) if all(setter is not None for _, _, setter in specials) else None
        plan = (specials, tuple(indices[i] for i in positions), pick, verbatim, self._frozen_check(specials))
        if len(self._plans) >= _PLAN_CACHE:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def get_cpuid(self, max_entries: int = uapi.KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        self._check_open()
        if max_entries < len(self._cpuid):
            raise KvmError(errno.E2BIG, "KVM_GET_CPUID2")
        return C.runtime_update(self._cpuid, self._runtime, self.profile)

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        self._check_open()
        entries = list(entries)
        if len(entries) > uapi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(errno.E2BIG, "KVM_SET_CPUID2")
        if self.has_run:
            incoming = C.runtime_update(entries, self._runtime, self.profile)
            if incoming != C.runtime_update(self._cpuid, self._runtime, self.profile):
                self._refusals[-1] = R.CPUID_AFTER_RUN_IDENTICAL
                raise KvmError(errno.EINVAL, "KVM_SET_CPUID2", "CPUID differs from the vCPU's after KVM_RUN")
            self._cpuid = incoming
            return
        err = C.check(entries, self.profile)
        if err:
            raise KvmError(err, "KVM_SET_CPUID2")
        self._raw_cpuid = entries
        self._cpuid = C.rewrite(entries, self.profile)
        self._after_set_cpuid()

    def _after_set_cpuid(self) -> None:
        """``vmx_vcpu_after_set_cpuid``: KVM re-derives some nested VMX MSRs from the new CPUID."""
        if self.profile.vendor != "vmx" or not self.profile.nested_vmx:
            return
        raw, supported = self._raw_cpuid, self.profile.supported_cpuid
        if not self.rules.stuff_quirk or not self.vm.disabled_quirks & uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS:
            high = self._vmx[0x48B]
            for bit, sources in vmx.SECONDARY_ADJUST:
                if self._vmx_kvm[0x48B] >> 32 >> bit & 1:
                    # guest_cpu_cap_has: the guest's CPUID bit, and KVM supports the feature
                    on = any(C.has_feature(raw, *s) and C.has_feature(supported, *s) for s in sources)
                    if bit == 20:  # vmx_vcpu_after_set_cpuid drops XSAVES from the guest caps without XSAVE first
                        on = on and C.has_feature(raw, *XSAVE_BIT)
                    high = high | 1 << (32 + bit) if on else high & ~(1 << (32 + bit))
            self._vmx[0x48B] = high
        if C.has_feature(raw, *VMX_BIT):
            self._vmx[0x487] = 0xFFFFFFFF
            cr4 = 1 << 8  # PCE is always allowed
            for source, allowed in vmx.CR4_FIXED1_MAP:
                if allowed == 1 << 28 and not self.rules.cr4_fixed1_lam:
                    continue
                if allowed == 1 << 23 and not self.rules.cr4_fixed1_cet:
                    continue
                if C.has_feature(raw, *source):
                    cr4 |= allowed
            self._vmx[0x489] = cr4

    # -- KVM_RUN --
    def run(self) -> Exit:
        """Enter the guest: interpret its code until an exit. ``immediate_exit`` returns before entering."""
        self._check_open()
        if self._immediate_exit:
            return InterruptedExit()
        if not self.vm.regions and self.profile.run_without_memory_errno:
            raise KvmError(self.profile.run_without_memory_errno, "KVM_RUN")
        self.has_run = True
        if self.rules.freeze and not self._frozen:
            self._frozen = self._immutable_set
            self._plans.clear()  # plans know which of their MSRs are frozen
        if self._pending_in is not None:
            size, count = self._pending_in
            data = self._in_data.ljust(size * count, b"\0")
            mask = (1 << (8 * size)) - 1
            self._regs.rax = (self._regs.rax & ~mask) | int.from_bytes(data[:size], "little")
            self._pending_in = None
            self._in_data = b""
        if self._program is not None:
            return run_guest_program(self, self._program)
        return self._interpret()

    def _reply_in(self, data: bytes) -> None:
        self._in_data = data

    def _interpret(self) -> Exit:
        regs, base = self._regs, self._sregs.cs.base
        if self._sregs.cr0 & 1:
            raise ModelLimitation("the model interprets real-mode guests only (CR0.PE is set)")
        for _ in range(GUEST_BUDGET):
            ip = regs.rip & 0xFFFF
            addr = base + ip
            code = self.vm.fetch(addr, 4)
            if not code:
                raise ModelLimitation(f"guest code at 0x{addr:x} is outside guest memory")
            code = code.ljust(4, b"\0")
            op = code[0]
            if op == 0xF4:  # hlt
                regs.rip = ip + 1
                return HltExit()
            if op == 0x90:  # nop
                regs.rip = ip + 1
            elif op == 0xB0:  # mov al, imm8
                regs.rax = (regs.rax & ~0xFF) | code[1]
                regs.rip = ip + 2
            elif op == 0xE6:  # out imm8, al
                regs.rip = ip + 2
                return IoExit(uapi.KVM_EXIT_IO_OUT, 1, code[1], 1, bytes([regs.rax & 0xFF]))
            elif op == 0xE4:  # in al, imm8
                regs.rip = ip + 2
                self._pending_in = (1, 1)
                return IoExit(uapi.KVM_EXIT_IO_IN, 1, code[1], 1, b"", self._reply_in)
            elif op == 0xEB:  # jmp rel8
                regs.rip = (ip + 2 + int.from_bytes(code[1:2], "little", signed=True)) & 0xFFFF
            elif op == 0x88 and code[1] == 0x06:  # mov [disp16], al
                target = self._sregs.ds.base + int.from_bytes(code[2:4], "little")
                regs.rip = ip + 4
                value = bytes([regs.rax & 0xFF])
                try:
                    self.vm.write_memory(target, value)
                except InvalidValueError:
                    return MmioExit(target, value, 1, True)
            else:
                raise ModelLimitation(f"the model cannot interpret opcode 0x{op:02x} at 0x{addr:x}")
        return InterruptedExit()
