"""A guest reads its IA32_ARCH_CAPABILITIES and the host decodes what it saw.

    python examples/guest_arch_caps.py                 # the live kernel (or the model where /dev/kvm is missing)
    python examples/guest_arch_caps.py model intel-spr # the model with the derived Sapphire Rapids profile

On our PVM hosts KVM_SET_CPUID2 strips CPUID.7.0:EDX[29], so the guest's RDMSR of 0x10A gets #GP; on an Intel host
profile the guest sees KVM's value and its bits.
"""

from __future__ import annotations

import sys

import kvmscope
from kvmscope import msrs
from kvmscope.program import GuestException, Program, Rdmsr, run_program


def main(backend: str | None = None, profile: str | None = None) -> int:
    options = {"profile": profile} if profile else {}
    with kvmscope.open(backend, **options) as kvm, kvm.create_vm() as vm:
        print(kvm.describe())
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.get_supported_cpuid())
        for event in run_program(vm, vcpu, Program().rdmsr("ARCH_CAP").hlt()):
            if isinstance(event, Rdmsr):
                print(f"guest read IA32_ARCH_CAPABILITIES = 0x{event.value:x}")
                for name, on in msrs.decode_arch_capabilities(event.value).items():
                    if on:
                        print(f"  {name}")
            elif isinstance(event, GuestException) and event.vector == 13:
                print("guest RDMSR 0x10a raised #GP: the vCPU's CPUID lacks ARCH_CAPABILITIES (7.0:EDX[29])")
            elif isinstance(event, GuestException):
                print(f"guest RDMSR 0x10a raised exception {event.vector} (error code {event.error_code:#x})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 or any(a.startswith("-") for a in sys.argv[1:]):
        sys.exit(__doc__)
    try:
        sys.exit(main(*sys.argv[1:3]))
    except kvmscope.KvmscopeError as e:
        sys.exit(f"error: {e}")
