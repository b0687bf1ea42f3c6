"""The model's system object: what /dev/kvm answers, from the host profile and the kernel ruleset."""

from __future__ import annotations

import errno
import struct
from dataclasses import replace
from typing import ClassVar

from .. import uapi
from ..api import CpuidEntry, MsrBatch, System, find_cpuid
from ..errors import InvalidValueError, KvmError
from ..kernel import rulesets as R
from ..kernel.profile import Profile
from ..kernel.rulesets import Ruleset
from .cpuid import filter_xtile_cfg, within_limits, without_bits, xsave_leaves
from .vm import ModelVm


class ModelSystem(System):
    """A software KVM for ``profile`` under ``rules``."""

    backend: ClassVar[str] = "model"

    def __init__(self, profile: Profile, rules: Ruleset, as_captured: bool = False) -> None:
        """``as_captured``: the profile's values as they are, under ``rules`` (a capture from a distribution's kernel
        holds backports that the mainline release of its number lacks), not as that release would report them."""
        self.captured = profile  # as its host reported it, before this version's KVM leaves out what came later
        absent = rules.absent_msrs if not as_captured else frozenset()
        if absent & {*profile.msr_index_list, *profile.behaviours}:
            # a profile taken on a later kernel lists MSRs this version's KVM does not know yet: unknown here
            profile = replace(profile, msr_index_list=[i for i in profile.msr_index_list if i not in absent],
                              msr_behaviour={i: b for i, b in profile.msr_behaviour.items() if i not in absent},
                              vendor_msrs={i: b for i, b in profile.vendor_msrs.items() if i not in absent})
        absent_bits = rules.absent_cpuid + tuple(  # and offers CPUID bits and leaves this version does not
            (*a.leaf, a.register, b) for a in profile.history if a.leaf is not None and a.rule not in rules.rules
            for b in range(32) if a.mask >> b & 1) if not as_captured else ()
        if absent_bits or (rules.cpuid_limits and not as_captured):
            entries = within_limits(without_bits(profile.supported_cpuid, absent_bits), rules.cpuid_limits)
            if _xsave_bits(entries) != _xsave_bits(profile.supported_cpuid):
                entries = xsave_leaves(entries)
            profile = replace(profile, supported_cpuid=entries)
        # what the host's CPU offers nested VMX (vmx_vcpu_after_set_cpuid asks the CPU), before this version's KVM hides
        # what it does not advertise yet (FEATURE_ARRIVALS)
        self.hardware_features = dict(profile.feature_msrs)
        absent_fields = rules.absent_fields((a.rule, a.msr, a.mask, a.before) for a in profile.history
                                            if a.msr is not None) if not as_captured else {}
        if absent_fields.keys() & profile.feature_msrs.keys():
            profile = replace(profile, feature_msrs={
                i: v if i not in absent_fields else v & ~absent_fields[i][0] | absent_fields[i][1]
                for i, v in profile.feature_msrs.items()})
        self.profile = profile
        self.rules = rules
        self.advertised = frozenset(profile.msr_index_list)
        self.warning: str | None = None  # set when the kernel asked for is newer than the newest ruleset
        self.as_captured = as_captured

    def describe(self) -> str:
        return f"model backend: kernel {self.rules.version} rules, profile {self.profile.name} ({self.profile.vendor})"

    def host_info(self) -> dict[str, object]:
        p = self.profile
        info: dict[str, object] = {
            "kernel_release": p.kernel_release,
            "vendor_module": {"vmx": "kvm_intel", "svm": "kvm_amd", "pvm": "kvm_pvm"}[p.vendor],
            "vendor": p.vendor,
            "module_parameters": dict(p.module_parameters),
            "profile": p.name,
            "ruleset": self.rules.version,
        }
        if self.warning:
            info["ruleset_warning"] = self.warning
        return info

    def api_version(self) -> int:
        self._check_open()
        return self.profile.api_version

    def check_extension(self, cap: int) -> int:
        self._check_open()
        return self.capability(cap)

    def capability(self, cap: int, vm: bool = False) -> int:
        """The profile's capability as this kernel version reports it: 0 for one that came later (``CAP_ARRIVALS``),
        and the quirks and x2APIC flags it does not have yet left out."""
        if self.as_captured:  # what the capture's kernel answered
            return self.profile.capability(cap, vm)
        if cap in self.rules.absent_caps or (cap == uapi.KVM_CAP_GUEST_MEMFD and vm and not self.rules.guest_memfd_on_any_vm):
            return 0
        if cap == uapi.KVM_CAP_VAPIC and not self.rules.vapic_on(
                self.profile.vendor, self.profile.module_parameters.get("kvm_intel.flexpriority", "Y") in ("Y", "1")):
            return 0
        value = self.profile.capability(cap, vm)
        if cap in (uapi.KVM_CAP_NR_MEMSLOTS, uapi.KVM_CAP_MAX_VCPUS, uapi.KVM_CAP_MAX_VCPU_ID, uapi.KVM_CAP_NR_VCPUS):
            return self.rules.cap_limit(cap, value)
        if cap == uapi.KVM_CAP_DISABLE_QUIRKS2:
            return self.rules.supported_quirks(value)
        if cap == uapi.KVM_CAP_X2APIC_API:  # a model VM has no split IRQCHIP: a VM's report leaves ENABLE out
            value = self.rules.x2apic_api_flags(value)
            return value & ~uapi.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST if vm else value
        return value

    @property
    def features(self) -> dict[int, int]:
        """The feature MSRs (index: value) this kernel version lists on this host."""
        return {i: v for i, v in self.profile.feature_msrs.items() if self.rules.feature_msr(i)}

    def vcpu_mmap_size(self) -> int:
        self._check_open()
        return self.profile.vcpu_mmap_size

    def get_msr_index_list(self) -> list[int]:
        self._check_open()
        return list(self.profile.msr_index_list)

    def get_msr_feature_index_list(self) -> list[int]:
        self._check_open()
        return list(self.features)

    def msr_list_raw(self, request: int, nmsrs: int) -> tuple[int, list[int]]:
        """The index-list ioctls with a caller-chosen ``nmsrs`` (E2BIG when too small, the count in ``detail``)."""
        if request not in (uapi.KVM_GET_MSR_INDEX_LIST, uapi.KVM_GET_MSR_FEATURE_INDEX_LIST):
            raise InvalidValueError(f"System.msr_list_raw: request must be KVM_GET_MSR_INDEX_LIST or "
                                    f"KVM_GET_MSR_FEATURE_INDEX_LIST, not {request:#x}", argument="request")
        full = self.get_msr_index_list() if request == uapi.KVM_GET_MSR_INDEX_LIST else self.get_msr_feature_index_list()
        if nmsrs < len(full):
            raise KvmError(errno.E2BIG, uapi.IOCTL_NAMES[request], f"kernel count {len(full)}")
        return len(full), full

    def get_feature_msrs(self, batch: MsrBatch) -> int:
        """System KVM_GET_MSRS: feature MSRs read their value; others follow the unsupported-MSR rule (6.12+)."""
        self._check_open()
        n = len(batch)
        if n >= uapi.MAX_IO_MSRS:
            raise KvmError(errno.E2BIG, "KVM_GET_MSRS")
        features = self.features
        for i in range(n):
            index = struct.unpack_from("<I", batch.buffer, 8 + 16 * i)[0]
            if index in features:
                value = features[index]
            elif (self.rules.unsupported_zero and index in self.advertised) or self.profile.ignore_msrs:
                value = 0
            else:
                struct.pack_into("<Q", batch.buffer, 16 + 16 * i, 0)
                return i
            struct.pack_into("<Q", batch.buffer, 16 + 16 * i, value)
        return n

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        self._check_open()
        entries = list(self.profile.supported_cpuid)
        return filter_xtile_cfg(entries) if self.rules.has(R.XTILE_CFG_FILTER) else entries

    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID as cpuid.c __do_cpuid_func_emulated (v6.12 lines 935-968) builds it: leaf 0 with
        EAX 7, MOVBE in leaf 1, leaf 7 with RDPID when the host has RDTSCP."""
        self._check_open()
        ext = next((e for e in self.profile.supported_cpuid if e.function == 0x80000001), None)
        rdpid = 1 << 22 if ext is not None and ext.edx & 1 << 27 else 0
        return [CpuidEntry(0, eax=7), CpuidEntry(1, ecx=1 << 22),
                CpuidEntry(7, flags=uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ecx=rdpid)]

    def create_vm(self) -> ModelVm:
        self._check_open()
        return ModelVm(self)


def _xsave_bits(entries: list[CpuidEntry]) -> tuple[int, int]:
    """The XCR0 and XSS bits a supported CPUID offers (0xD.0 EAX/EDX, 0xD.1 ECX/EDX)."""
    leaf0, leaf1 = find_cpuid(entries, 0xD, 0), find_cpuid(entries, 0xD, 1)
    return (0 if leaf0 is None else leaf0.eax | leaf0.edx << 32, 0 if leaf1 is None else leaf1.ecx | leaf1.edx << 32)
