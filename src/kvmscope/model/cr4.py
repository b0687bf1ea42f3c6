"""CR4 on KVM_SET_SREGS: the bits KVM refuses with EINVAL before it changes anything (``kvm_is_valid_sregs`` calls
``kvm_is_valid_cr4``: 6.12.118 regs.c:357-361, 538-562; x86.c:1129-1139; 6.1.192 x86.c:1140-1156, 11624-11647).

A bit is refused when KVM does not know it (``CR4_RESERVED_BITS``, kvm_host.h), when it needs a CPU feature that KVM
lacks (``cr4_reserved_bits``: ``__cr4_reserved_bits`` over ``kvm_cpu_caps`` since 5.7, 139f7425fdf5, which the
supported CPUID shows), or one that the guest lacks (``vcpu->arch.cr4_guest_rsvd_bits``, set by KVM_SET_CPUID2:
6.12.118 cpuid.c:417-418; from 6.14 also at vCPU creation, from the empty CPUID: ``cr4_guest_at_create``). VMX also
refuses VMXE in SMM and, after VMXON, a CR4 outside the nested fixed bits (``vmx_is_valid_cr4``, 6.12.118
vmx.c:3472-3486): the model enters neither (SMM and nested state are a ModelLimitation). SVM refuses nothing more
(svm.c:1959-1962). Before ``cr4_vendor_hook`` (5.11; 5.10.137) VMX's refusal of VMXE was not EINVAL: the call
succeeded and left CR4 as it was (``vmxe_dropped``).

On upstream hosts the supported CPUID decides the host part at every version. PVM here takes a fixed set whatever
the CPUIDs say (the live kernel: no CPUID, an empty one or every bit set change nothing, and it takes PKE, which
neither its supported CPUID nor its CPU has; ``tests/conformance/test_conf_cr4.py``): the profile records that set
(``Profile.cr4_accepted``, measured by ``kvmscope probe --save``), and on PVM the guest part is left out.
"""

from __future__ import annotations

from collections.abc import Callable

from ..kernel import rulesets as R

Feature = tuple[int, int, str, int]

VMXE = 1 << 13
LAM_SUP = 1 << 28
CET = 1 << 23
# CR4_RESERVED_BITS' complement, the bits KVM knows: VME through OSXMMEXCPT (0-10), UMIP, LA57, VMXE, FSGSBASE,
# PCIDE, OSXSAVE, SMEP, SMAP, PKE (0x773fff; 5.10.262 kvm_host.h:97-103, 6.1.192 :117-123); LAM_SUP from 6.8 and CET
# from 6.18 (``known``).
KNOWN = 0x7FF | 1 << 11 | 1 << 12 | VMXE | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 20 | 1 << 21 | 1 << 22
VMX: Feature = (1, 0, "ecx", 5)
# __cr4_reserved_bits (5.10.262 x86.h:384-406, 6.12.118 x86.h:583-606): each bit, the features of which any makes it
# usable, and the rule that brought the test (None: every version).
GATED: tuple[tuple[int, tuple[Feature, ...], R.Rule | None], ...] = (
    (1 << 18, ((1, 0, "ecx", 26),), None),  # OSXSAVE: XSAVE
    (1 << 20, ((7, 0, "ebx", 7),), None),  # SMEP
    (1 << 21, ((7, 0, "ebx", 20),), None),  # SMAP
    (1 << 16, ((7, 0, "ebx", 0),), None),  # FSGSBASE
    (1 << 22, ((7, 0, "ecx", 3),), None),  # PKE: PKU
    (1 << 12, ((7, 0, "ecx", 16),), None),  # LA57
    (1 << 11, ((7, 0, "ecx", 2),), None),  # UMIP
    (VMXE, (VMX,), None),  # VMXE: VMX (KVM's caps have it only with nested VMX)
    (1 << 17, ((1, 0, "ecx", 17),), R.CR4_PCIDE_GATED),  # PCIDE: PCID
    (LAM_SUP, ((7, 1, "eax", 26),), None),  # LAM_SUP: LAM (known from 6.8)
    (CET, ((7, 0, "ecx", 7), (7, 0, "edx", 20)), None),  # CET: SHSTK or IBT (known from 6.18)
)


def known(rules: R.Ruleset) -> int:
    """The CR4 bits this version's KVM knows at all."""
    return KNOWN | (LAM_SUP if rules.has(R.CR4_LAM_SUP) else 0) | (CET if rules.has(R.CR4_CET) else 0)


def gated(mask: int, has: Callable[[Feature], bool], rules: R.Ruleset) -> int:
    """The bits of ``mask`` whose features ``has`` lacks (``__cr4_reserved_bits`` over ``has``, in this version)."""
    return sum(bit for bit, features, since in GATED
               if mask & bit and (since is None or rules.has(since)) and not any(map(has, features)))


def refused(cr4: int, host_accepted: int, guest_has: Callable[[Feature], bool] | None, rules: R.Ruleset) -> int:
    """The bits of ``cr4`` that KVM_SET_SREGS refuses, given the bits the host takes and the guest's features (None:
    the guest reserves nothing, as before the first KVM_SET_CPUID2 until 6.14, or on a host that ignores them)."""
    bad = cr4 & ~host_accepted
    if guest_has is not None:
        bad |= gated(cr4, guest_has, rules)
    return bad


def vmxe_dropped(cr4: int, rules: R.Ruleset, vendor: str, nested_vmx: bool, guest_has: Callable[[Feature], bool]
                 ) -> bool:
    """Before ``cr4_vendor_hook``: whether VMX's ``vmx_set_cr4`` refuses this CR4's VMXE (``nested_vmx_allowed``:
    nested on and VMX in the guest's CPUID), which KVM_SET_SREGS ignored, keeping the old CR4 (5.10.13)."""
    return (vendor == "vmx" and bool(cr4 & VMXE) and not rules.has(R.CR4_VENDOR_HOOK)
            and not (nested_vmx and guest_has(VMX)))
