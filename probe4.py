import kvmscope, errno
from kvmscope import uapi
from kvmscope.errors import KvmError
def tryit(f):
    try: return f()
    except KvmError as e: return errno.errorcode[e.errno]
for b in ("linux","model"):
    a=[]
    with kvmscope.open(b) as kvm:
        # SIPI pending survives a later KVM_SET_MP_STATE
        with kvm.create_vm() as vm:
            vm.create_irqchip(); vm.create_vcpu(0); ap=vm.create_vcpu(1)
            e=ap.get_vcpu_events(); e.flags=2; e.sipi_vector=0x12; ap.set_vcpu_events(e)
            ap.set_mp_state(4); ap.set_mp_state(2)
            a.append(("SIPI then INIT_RECEIVED", ap.get_mp_state(), hex(ap.get_sregs().cs.base)))
        with kvm.create_vm() as vm:
            vm.create_irqchip(); vm.create_vcpu(0); ap=vm.create_vcpu(1)
            e=ap.get_vcpu_events(); e.flags=2; e.sipi_vector=0x12; ap.set_vcpu_events(e)
            ap.set_mp_state(4); ap.set_mp_state(1); s1=ap.get_mp_state(); ap.set_mp_state(2)
            a.append(("SIPI, UNINIT, get, INIT_RECEIVED", s1, ap.get_mp_state()))
        # SIPI vector above 0xFF
        with kvm.create_vm() as vm:
            vm.create_irqchip(); vm.create_vcpu(0); ap=vm.create_vcpu(1)
            e=ap.get_vcpu_events(); e.flags=2; e.sipi_vector=0x112; ap.set_vcpu_events(e)
            ap.set_mp_state(4); m=ap.get_mp_state(); s=ap.get_sregs().cs
            a.append(("SIPI vector 0x112", m, hex(s.selector), hex(s.base)))
        # latched INIT via VALID_SMM
        for vid in (0,1):
          with kvm.create_vm() as vm:
            vm.create_irqchip(); v0=vm.create_vcpu(0); ap=vm.create_vcpu(1) ; v=[v0,ap][vid]
            r=v.get_regs(); r.rip=0x1234; r.rax=7; v.set_regs(r)
            e=uapi.kvm_vcpu_events(flags=8); e.smi.latched_init=1; x=tryit(lambda: v.set_vcpu_events(e))
            li=v.get_vcpu_events().smi.latched_init
            v.set_mp_state(0)
            a.append((f"latched INIT vcpu{vid}", x, "reported", li, "mp", v.get_mp_state(), "rip", hex(v.get_regs().rip), "rax", v.get_regs().rax))
        # latched_init without irqchip
        with kvm.create_vm() as vm:
            v=vm.create_vcpu(0); e=uapi.kvm_vcpu_events(flags=8); e.smi.latched_init=1
            a.append(("latched INIT no irqchip", tryit(lambda: v.set_vcpu_events(e)), v.get_vcpu_events().smi.latched_init))
        # NMI clamp at set time
        with kvm.create_vm() as vm:
            v=vm.create_vcpu(0)
            e=uapi.kvm_vcpu_events(flags=1); e.nmi.pending=5; e.nmi.masked=1; v.set_vcpu_events(e)
            v.set_vcpu_events(uapi.kvm_vcpu_events(flags=0))
            a.append(("NMI pending 5 masked, then unmask", v.get_vcpu_events().nmi.pending))
        with kvm.create_vm() as vm:
            v=vm.create_vcpu(0)
            e=uapi.kvm_vcpu_events(flags=1); e.nmi.masked=1; v.set_vcpu_events(e)
            v.nmi(); v.nmi(); v.nmi()
            v.set_vcpu_events(uapi.kvm_vcpu_events(flags=0))
            a.append(("masked, 3 KVM_NMI, then unmask", v.get_vcpu_events().nmi.pending))
    print(b); [print("   ",x) for x in a]
