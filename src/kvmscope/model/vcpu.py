"""The model's vCPU: registers, CPUID and KVM_RUN for one vCPU, wired to its MSR rules and guest executors.

The MSRs (state, host and guest rules, the batch ioctls) are in ``msr_rules`` and ``msr_batch``; the guest code runs in
``realmode`` (code in guest memory) or ``guest_exec`` (:mod:`kvmscope.program` programs).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import uapi
from ..api import (
    CpuidEntry,
    Exit,
    InterruptedExit,
    IrqWindowOpenExit,
    MsrBatch,
    MsrItems,
    ShutdownExit,
    Vcpu,
    check_timeout,
)
from ..errors import ClosedError, InvalidTypeError, KvmError, KvmscopeError
from ..kernel import rulesets as R
from ..program import Program
from . import cpuid as C
from . import cr4, x2apic
from .guest_exec import ProgramState
from .guest_exec import run_program as run_guest_program
from .kvm_run import LONG_RUN, X86_EFLAGS_IF, KvmRunModel
from .msr_batch import BatchedMsrRules
from .msr_misc import MSR_XSS
from .mtrr import maxphyaddr
from .realmode import interpret
from .vcpu_state import VcpuStateModel

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from .vm import ModelVm


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


class ModelVcpu(VcpuStateModel, KvmRunModel, Vcpu):
    """A vCPU of the software KVM. ``regs``, ``sregs`` and ``cpuid`` are its state as KVM holds it (the ioctls
    return copies); ``msr_rules`` holds its MSRs and their rules; the save/restore state (LAPIC, MP state, events,
    FPU/XSAVE, ...) is in :class:`~kvmscope.model.vcpu_state.VcpuStateModel`."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.profile: Profile = vm.profile
        self.rules: R.Ruleset = vm.rules
        p = self.profile
        self.has_run = False
        self._shutdown_pending = False  # PVM: CR0.PG given outside long mode (set_sregs)
        self.reset_kvm_run()
        self.cpuid: list[CpuidEntry] = []
        self.cpuid_set = False  # no KVM_SET_CPUID2 yet
        sregs = reset_sregs(p.reset_sregs, vcpu_id)
        # before 5.15 the BSP bit is forced without an in-kernel LAPIC, and VMX resets through that path
        self._bsp_forced = self.rules.has(R.APIC_BASE_BSP_FORCED) and not vm.lapic_in_kernel
        self._sregs_efer_checked = self.rules.has(R.SREGS_EFER_CHECKED)
        if self._bsp_forced and p.vendor != "svm":
            sregs.apic_base |= 1 << 8
        self.sregs = sregs
        self.regs = uapi.kvm_regs(rflags=2, rip=0xFFF0)
        for name, value in p.reset_regs.items():
            setattr(self.regs, name, value)
        self._runtime = C.RuntimeState(cr4=sregs.cr4, apic_base=sregs.apic_base)
        self._program: ProgramState | None = None
        self.msr_rules = msrs = BatchedMsrRules(self)
        # The batch ioctls are the MSR rules' own methods, bound here so that a call costs no extra frame (the model's
        # hot path); the methods below stand for them in the class.
        self.get_msrs = msrs.get_msrs  # type: ignore[method-assign]
        self.set_msrs = msrs.set_msrs  # type: ignore[method-assign]
        self.reset_vcpu_state()

    # -- plumbing --
    def close(self) -> None:
        self._closed = True
        self.msr_rules.close()

    def attach_program(self, program: Program) -> None:
        """Run ``program`` (kvmscope.program) on the next KVM_RUNs: the model interprets its operations directly."""
        self._check_open()
        if not isinstance(program, Program):
            raise InvalidTypeError(f"Vcpu.attach_program: program must be a kvmscope.program.Program, not "
                                   f"{type(program).__name__} {program!r:.60}", argument="program",
                                   expected="a kvmscope.program.Program", given=program)
        self._program = ProgramState(list(program.ops))

    def limitation(self, message: str) -> ModelLimitation:
        return ModelLimitation(message)

    def reply_msr(self, error: int, value: int) -> None:
        """Userspace's answer to an MSR exit (``kvm_run.msr.error`` and ``data``) for the guest program."""
        if self._program is not None:
            self._program.reply = (error, value)

    def refusal_rule(self, index: int) -> R.Rule | None:
        return self.msr_rules.refusal_rule(index)

    # -- registers --
    def get_regs(self) -> uapi.kvm_regs:
        self._check_open()
        return uapi.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS: RFLAGS with its fixed bit 1 set (``kvm_set_rflags(regs->rflags | X86_EFLAGS_FIXED)``)."""
        self._check_open()
        self.regs = uapi.kvm_regs.from_buffer_copy(regs)
        self.regs.rflags |= 2
        self._regs_set = True
        if self.profile.vendor == "pvm":  # PVM clears RFLAGS.VM (the live kernel here; upstream keeps it)
            self.regs.rflags &= ~(1 << 17)
        self.events.exception.pending = 0  # __set_regs drops a pending exception (6.12.118 regs.c:129)

    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS; with an in-kernel LAPIC, CR8 is the TPR's class (``kvm_lapic_get_cr8``)."""
        self._check_open()
        out = uapi.kvm_sregs.from_buffer_copy(self.sregs)
        interrupt = self.events.interrupt  # the bitmap shows the injected hard interrupt (__get_sregs)
        out.interrupt_bitmap[:] = (0, 0, 0, 0)
        if interrupt.injected and not interrupt.soft:
            out.interrupt_bitmap[interrupt.nr >> 6] = 1 << (interrupt.nr & 63)
        out.cr8 = self._cr8()
        return out

    def _cr8(self) -> int:
        """``kvm_get_cr8``: with an in-kernel LAPIC, the TPR's class."""
        return self.sregs.cr8 if self.lapic is None else x2apic.reg32(self.lapic, x2apic.TPR) >> 4 & 0xF

    @functools.cached_property
    def _cr4_host_accepted(self) -> int:
        """The CR4 bits this host's KVM takes whatever the guest. Upstream: those this version knows, less those whose
        feature ``kvm_cpu_caps`` lacks, which KVM_GET_SUPPORTED_CPUID reports verbatim for every gating feature
        (6.12.118 cpuid.c:991, 1034, 1043), so the supported CPUID decides, at every version. PVM: the profile's
        measured set; a PVM profile that measured none is not checked."""
        if self.profile.vendor == "pvm":
            return (1 << 64) - 1 if self.profile.cr4_accepted is None else self.profile.cr4_accepted
        known = cr4.known(self.rules)
        return known & ~cr4.gated(known, self.msr_rules.supported, self.rules)

    def _cr4_guest_has(self) -> Callable[[cr4.Feature], bool] | None:
        """The guest's features as ``cr4_guest_rsvd_bits`` reads them (KVM's ``cap`` rule); None where the guest
        reserves nothing: before the first KVM_SET_CPUID2 until 6.14 (``cr4_guest_at_create``), and on PVM (the live
        kernel ignores the guest's CPUID here)."""
        if self.profile.vendor == "pvm" or not (self.cpuid_set or self.rules.has(R.CR4_GUEST_AT_CREATE)):
            return None
        return self.msr_rules.cap

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS with ``kvm_is_valid_sregs``'s checks (6.12.118 regs.c:538-562): long-mode consistency, in long
        mode a CR3 within the guest's MAXPHYADDR (``kvm_vcpu_is_legal_cr3``; LAM's bits 61-62 with CPUID.LAM), CR4
        (``model/cr4.py``), CR0 from 6.5 (``sregs_cr0_checked``); then APIC_BASE's MSR rule. The GDT and IDT padding
        reads back 0 (KVM keeps base and limit only)."""
        self._check_open()
        lme, lma, pg, pae = sregs.efer & 1 << 8, sregs.efer & 1 << 10, sregs.cr0 & 1 << 31, sregs.cr4 & 1 << 5
        if (lme and pg and (not pae or not lma)) or (not (lme and pg) and (lma or sregs.cs.l)):
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS")
        if lme and pg:
            lam = 3 << 61 if C.has_feature(self.cpuid, 7, 1, "eax", 26) else 0
            if (sregs.cr3 & ~lam) >> maxphyaddr(self.msr_rules):
                raise KvmError(errno.EINVAL, "KVM_SET_SREGS", f"CR3 {sregs.cr3:#x} beyond MAXPHYADDR")
        bad = cr4.refused(sregs.cr4, self._cr4_host_accepted, self._cr4_guest_has(), self.rules)
        if bad:
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS", f"CR4 {sregs.cr4:#x} refused: bits {bad:#x} reserved "
                                                          "(kvm_is_valid_cr4)")
        cr0 = sregs.cr0
        if self.rules.has(R.SREGS_CR0_CHECKED) and (cr0 >> 32 or (cr0 & 1 << 29 and not cr0 & 1 << 30)
                                                    or (cr0 & 1 << 31 and not cr0 & 1)):
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS", f"CR0 {cr0:#x} refused (kvm_is_valid_cr0)")
        efer_rule = self.msr_rules.families.get(0xC0000080)
        if self._sregs_efer_checked and efer_rule is not None and not efer_rule.efer_valid(sregs.efer):  # type: ignore[attr-defined]
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS", f"EFER {sregs.efer:#x} refused (kvm_valid_efer)")
        apic_rule = self.msr_rules.families.get(0x1B)  # __set_sregs_common: kvm_apic_set_base(host_initiated) first
        if apic_rule is not None and apic_rule.set(0x1B, sregs.apic_base, True):
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS", f"APIC_BASE {sregs.apic_base:#x} refused")
        old_cr8, old_cr4 = self.sregs.cr8, self.sregs.cr4
        if self.profile.vendor == "pvm" and (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) != (
                self.sregs.cr0, self.sregs.cr3, old_cr4, self.sregs.efer):
            self.cancel_pio()  # PVM (live): an MMU reset (__set_sregs' mmu_reset_needed) drops a pending port access
        self.sregs = uapi.kvm_sregs.from_buffer_copy(sregs)
        if cr4.vmxe_dropped(sregs.cr4, self.rules, self.profile.vendor, self.profile.nested_vmx, self.msr_rules.cpuid_has):
            self.sregs.cr4 = old_cr4  # vmx_set_cr4 refused it, and __set_sregs took the rest
        if sregs.cr8 >> 4:  # kvm_set_cr8 refuses it, and __set_sregs_common ignores that (6.12.118 regs.c:436-445)
            self.sregs.cr8 = old_cr8
        for table in (self.sregs.gdt, self.sregs.idt):
            table.padding[:] = (0, 0, 0)
        if self.profile.vendor == "pvm" and not sregs.efer & 1 << 8:  # PVM pages only in long mode: CR0.PG dropped
            self.sregs.cr0 &= ~(1 << 31)
            # and the next KVM_RUN that would enter ends in a shutdown instead, state untouched and no entry made (no
            # freeze), even before a missing memslot's ENOSPC, as a pending KVM_REQ_TRIPLE_FAULT does: the live kernel
            # here (tests/conformance/test_conf_run.py); immediate_exit leaves it pending, later sregs do not clear it
            self._shutdown_pending |= bool(sregs.cr0 & 1 << 31)
        bits = next(((i, word) for i, word in enumerate(sregs.interrupt_bitmap) if word), None)
        if bits is not None:  # the lowest vector set is queued as an injected interrupt (6.12.118 regs.c:648-655)
            interrupt = self.events.interrupt
            interrupt.injected, interrupt.soft = 1, 0
            interrupt.nr = 64 * bits[0] + (bits[1] & -bits[1]).bit_length() - 1
            self.refresh_may_block()  # the next KVM_RUN would deliver it
        if not sregs.cr0 & 1:
            self._program = None  # back in real mode: run the code in guest memory again
        self._runtime.cr4 = self.sregs.cr4
        self.set_apic_base(sregs.apic_base)
        if self.lapic is not None and not sregs.cr8 >> 4:  # kvm_lapic_set_tpr: CR8 becomes the TPR's class
            x2apic.set_reg32(self.lapic, x2apic.TPR, (sregs.cr8 & 0xF) << 4)
            x2apic.update_ppr(self.lapic)
        # "Older userspace won't unhalt the vcpu on reset" (6.12.118 regs.c:625-629): a BSP at the reset CS:RIP in
        # real mode is made runnable
        if (self.sregs.apic_base & 1 << 8 and self.regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000
                and sregs.cs.base == 0xFFFF0000 and not sregs.cr0 & 1):
            self.mp_state = uapi.KVM_MP_STATE_RUNNABLE
            self.refresh_may_block()

    def set_apic_base(self, value: int) -> None:
        """``__kvm_apic_set_base``: the new APIC_BASE (KVM_GET_SREGS shows it; CPUID.1:EDX.APIC follows its enable bit);
        before 5.15, with the BSP bit set when there is no in-kernel LAPIC (``kvm_lapic_set_base``)."""
        if self._bsp_forced:
            value |= 1 << 8
        x2apic.base_changed(self, self.sregs.apic_base, value)
        self.sregs.apic_base = value
        self._runtime.apic_base = value
        if self.lapic is not None and self.tsc_deadline_mode:  # the deadline MSR follows the APIC's enable bit
            self.tsc_deadline_rule()

    # -- MSRs: KVM_GET_MSRS and KVM_SET_MSRS run in msr_rules (bound in __init__) --
    def get_msrs(self, batch: MsrBatch, strict: bool = False) -> int:
        return self.msr_rules.get_msrs(batch, strict)

    def set_msrs(self, entries: MsrBatch | MsrItems, strict: bool = False) -> int:
        return self.msr_rules.set_msrs(entries, strict)

    # -- CPUID --
    def get_cpuid(self, max_entries: int = uapi.KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        self._check_open()
        if max_entries < len(self.cpuid):
            raise KvmError(errno.E2BIG, "KVM_GET_CPUID2")
        return C.runtime_update(self.cpuid, self.runtime_state(), self.profile)

    def runtime_state(self) -> C.RuntimeState:
        """``kvm_update_cpuid_runtime``'s inputs as they are now. KVM updates CPUID when ``__kvm_set_xcr`` changes XCR0's
        extended bits and at every XSS write (6.12.118 x86.c:1109-1112, 3539-3540), so 0xD.0/0xD.1 EBX always follow
        XCR0 (the size of FP and SSE alone is fixed). 0xD.1 EBX counts XSS from 6.18 (CET; 6.12.118 cpuid.c:322 takes
        XCR0 alone): before, KVM supports no XSS bit, so XSS is 0 here whatever the version."""
        self._runtime.xcr0, self._runtime.xss = self.xcr0, self.msr_rules.stored.get(MSR_XSS, 0)
        return self._runtime

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        self._check_open()
        entries = list(entries)
        if len(entries) > uapi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(errno.E2BIG, "KVM_SET_CPUID2")
        self._runtime.hlt_in_guest = bool(self.vm.disabled_exits & uapi.KVM_X86_DISABLE_EXITS_HLT)
        after_run = self.rules.cpuid_after_run if self.has_run else "free"
        if after_run == "forbidden":  # feb627e8d6f6 (5.16.0-5.16.2): no KVM_SET_CPUID2 once the vCPU has run
            self.msr_rules.refuse(-1, R.CPUID_AFTER_RUN_FORBIDDEN, 0)
            raise KvmError(errno.EINVAL, "KVM_SET_CPUID2", "KVM_SET_CPUID2 after KVM_RUN (5.16.0-5.16.2)")
        if after_run == "identical":
            incoming = C.runtime_update(entries, self.runtime_state(), self.profile)
            if incoming != C.runtime_update(self.cpuid, self._runtime, self.profile):
                self.msr_rules.refuse(-1, R.CPUID_AFTER_RUN_IDENTICAL, 0)  # recorded under index -1: not an MSR
                raise KvmError(errno.EINVAL, "KVM_SET_CPUID2", "CPUID differs from the vCPU's after KVM_RUN")
            self.cpuid = incoming
            self.msr_rules.config_changed()
            return
        err = C.check(entries, self.profile, dynamic_xfeatures=self.rules.has(R.XFD_MSRS))
        if err:
            raise KvmError(err, "KVM_SET_CPUID2")
        if self.profile.cpuid_rewrite and any(e.function == 0xD and not e.flags & 1 for e in entries):
            raise self.limitation("KVM_SET_CPUID2: a leaf 0xD entry without KVM_CPUID_FLAG_SIGNIFCANT_INDEX, which this "
                                  "vendor module's rewrite of leaves 1, 7 and 0xD then follows in ways not modelled")
        self.cpuid = C.rewrite(entries, self.profile)
        x2apic.set_version(self)  # kvm_vcpu_after_set_cpuid
        self.cpuid_set = True  # kvm_vcpu_after_set_cpuid: the guest's CR4 reserved bits from here on
        self.msr_rules.config_changed()
        self.msr_rules.after_set_cpuid(entries)

    # -- KVM_RUN --
    def run(self, timeout: float | None = None) -> Exit:
        """Enter the guest: interpret its code until an exit. ``immediate_exit`` returns before entering; with
        ``timeout`` (seconds) a guest that has not exited by then returns :class:`InterruptedExit`."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        self._ran_long = False
        try:
            return self._enter(deadline)
        except KvmscopeError:
            if self._closed:  # closed by another thread mid-run (its memory went with the VM: ENOSPC, a fault...)
                raise ClosedError("this vCPU is closed") from None
            raise
        finally:
            if not self._closed:  # whatever the outcome (6.12.118 x86.c:11202-11205)
                self._post_run_save()
                # PVM (live): a run that took host interrupts marks SSE in use, from 10 ms on always (kvm_run.py)
                self.fpu_after_run(sse_in_use=self._ran_long and self.profile.vendor == "pvm"
                                   and (timeout is None or timeout >= LONG_RUN))

    def _enter(self, deadline: float | None) -> Exit:
        if self.lapic is None:  # "re-sync apic's tpr" from kvm_run, before immediate_exit (x86.c:11157-11163)
            if self._run_cr8 >> 4:
                raise KvmError(errno.EINVAL, "KVM_RUN", f"kvm_run.cr8 {self._run_cr8:#x} beyond CR8's 4 bits")
            self.sregs.cr8 = self._run_cr8
        self._complete_pio()
        if self._immediate_exit:
            return InterruptedExit()
        if self._shutdown_pending and self.mp_state == uapi.KVM_MP_STATE_RUNNABLE:
            self._shutdown_pending = False
            return ShutdownExit()
        if not self.vm.regions and self.profile.run_without_memory_errno:
            raise KvmError(self.profile.run_without_memory_errno, "KVM_RUN")
        if self.may_block or self.vm.may_block:  # one flag each: the full check only when something is queued
            blocked = self.injection_pending() or self.vm.run_limitation()
            if blocked:
                raise self.limitation(f"KVM_RUN: {blocked}")
        if self.sregs.cs.unusable and not self.sregs.cs.l:  # the emulator refuses it: the guest would fault
            raise self.limitation("KVM_RUN: CS is unusable outside 64-bit mode (the guest's first fetch faults)")
        self.has_run = True
        msrs = self.msr_rules
        if self.rules.freeze and not msrs.frozen:
            msrs.freeze()
        if self.irq_window_requested() and self.profile.vendor != "pvm":  # the window exit comes before any instruction
            if self.profile.vendor == "svm" and self.sregs.cr8 == 15:  # V_TPR 15 masks KVM's V_IRQ of priority 15
                raise self.limitation("KVM_RUN: SVM's window request with CR8 15 (AMD APM 15.21.4: the virtual "
                                      "interrupt KVM asks for is not taken, so no window exit; not confirmed on hardware)")
            program = self._program
            if program is not None and (program.pending is not None or self.events.interrupt.shadow):
                raise self.limitation("KVM_RUN: the window would open inside the program's code (the model runs "
                                      "programs by operation)")
            if self.regs.rflags & X86_EFLAGS_IF and not self.events.interrupt.shadow and self.accepts_extint():
                return IrqWindowOpenExit()
        if self._program is not None:
            self.events.interrupt.shadow = 0  # the program's first instruction ends it
            exit_ = run_guest_program(self, self._program, deadline)
        else:
            exit_ = interpret(self, deadline)
        return exit_ if self.lapic is None else self.halted_in_kernel(exit_)
