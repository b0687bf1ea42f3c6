"""Templates applied in Firecracker's order give the same report on the live kernel and on the model of this host."""

from __future__ import annotations

from pathlib import Path

from kvmscope.api import System
from kvmscope.fleet import baseline, settle
from kvmscope.kernel.profile import load as load_profile
from kvmscope.template import load, parse
from kvmscope.template_apply import BOOT_MSRS, apply, dump, state_of, verify

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "templates"


def diffs(report: object) -> list[tuple[int, str, str, list[int]]]:
    return [(v.vcpu, d.where, d.kind, d.bits) for v in report.vcpus for d in v.diffs]  # type: ignore[attr-defined]


def test_t2s_like_template_is_refused_here(kvm: System) -> None:
    """ARCH_CAPABILITIES fixed to a value with bits this host lacks: KVM_SET_MSRS stops at it on every vCPU, and the
    CPUID bits the template clears in leaf 7 are put back by this host's KVM_SET_CPUID2."""
    rep = apply(kvm, load(EXAMPLES / "t2s-like.json"), 2, boot=())
    assert rep.failures == [
        "KVM_SET_MSRS on vCPU 0 returned 0 of 1: refused MSR_IA32_ARCH_CAPABILITIES (0x10a)",
        "KVM_SET_MSRS on vCPU 1 returned 0 of 1: refused MSR_IA32_ARCH_CAPABILITIES (0x10a)",
    ], rep.failures
    ebx = [16, 17, 18, 19, 21, 23, 24, 28, 29, 30, 31]
    arch = [2, 3, 6, 10, 11, 17, 19, 26, 27]
    expected = [(v, w, k, b) for v in (0, 1) for w, k, b in (
        ("CPUID 0x7.0 ebx", "changed", ebx), ("CPUID 0x7.0 edx", "changed", [4]),
        ("MSR_IA32_ARCH_CAPABILITIES (0x10a)", "refused", arch))]
    assert diffs(rep) == expected, f"expected {expected}, saw {diffs(rep)}"
    assert not rep.ok


def test_pass_through_template_is_taken(kvm: System) -> None:
    rep = apply(kvm, load(EXAMPLES / "arch-cap-passthrough.json"), 2, boot=())
    assert rep.ok, f"expected the template taken, saw {rep.failures} {diffs(rep)}"
    assert rep.notes == ["KVM capability 56 (KVM_CAP_XCRS) is removed from Firecracker's checks"], rep.notes


def test_missing_leaf_and_unreadable_msr_stop_firecracker(kvm: System) -> None:
    t = parse('{"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0, "modifiers": []}],'
              ' "msr_modifiers": [{"addr": "0x12345678", "bitmap": "0b1"}]}')
    rep = apply(kvm, t, 1, boot=())
    assert rep.failures == [
        "the template changes CPUID leaf 0x4fffffff subleaf 0x0, which KVM_GET_SUPPORTED_CPUID does not list",
        "the template changes MSR_0x12345678 (0x12345678), which KVM_GET_MSRS on vCPU 0 refuses",
    ], rep.failures


def test_fleet_baseline_is_taken_here(kvm: System) -> None:
    profiles = [load_profile(n) for n in ("intel-spr", "amd-epyc", "pvm-6.18")]
    rep = apply(kvm, settle(baseline(profiles), profiles).template, 2, boot=())
    assert rep.ok, f"expected the baseline taken, saw {rep.failures} {diffs(rep)}"


def test_firecracker_boot_msrs(kvm: System) -> None:
    """Firecracker's boot MSRs in one KVM_SET_MSRS are taken, MTRRdefType (0x2ff) included, on both backends."""
    rep = apply(kvm, parse("{}"), 1, boot=BOOT_MSRS)
    assert rep.ok, f"{rep.failures} {diffs(rep)}"
    assert rep.notes == [], rep.notes
    assert rep.vcpus[0].msrs_written == len(BOOT_MSRS), rep.vcpus[0]


def test_dump_verifies_against_itself(kvm: System) -> None:
    d = dump(kvm)
    assert d.template.msr_modifiers and d.template.cpuid_modifiers, "a dump holds CPUID and MSRs"
    assert 0x10 in d.left_out, "the TSC is never dumped"
    assert verify(d.template, *state_of(d.template)) == []
    cpuid, msrs = state_of(d.template)
    index = d.template.msr_modifiers[0].addr
    msrs[index] ^= 1 << 5
    mismatch = verify(d.template, cpuid, msrs)
    assert [(m.where.endswith(f"(0x{index:x})"), m.bits) for m in mismatch] == [(True, [5])], mismatch


def test_pass_through_template_after_the_first_run(kvm: System) -> None:
    """Writing back the value a vCPU already holds is taken even after it ran (same-value writes are allowed)."""
    rep = apply(kvm, load(EXAMPLES / "arch-cap-passthrough.json"), 1, boot=(), after_run=True)
    assert rep.ok and rep.notes[-1] == "vCPU 0 ran before the MSRs were written: IoExit", (rep.failures, rep.notes)


def test_snapshot_restored_on_the_same_host(kvm: System) -> None:
    """Boot with a pass-through template, snapshot, restore on a fresh VM of the same host: taken, with the same
    MSRs saved on both backends, TSC_DEADLINE and KVM_ASYNC_PF_INT among them (both VMs have Firecracker's irqchip)."""
    from kvmscope.template_restore import restore

    rep = restore(kvm, kvm, load(EXAMPLES / "arch-cap-passthrough.json"), 2, boot=())
    assert rep.ok, f"{rep.failures} {diffs(rep)}"
    assert [v.msrs_total for v in rep.vcpus] == [33, 33], [v.msrs_total for v in rep.vcpus]


def test_a_hosts_own_dump_restores_on_it(kvm: System) -> None:
    # A dump holds KVM_ASYNC_PF_INT, which needs a local APIC: the snapshot's VMs have Firecracker's irqchip, so the
    # dump boots, snapshots and restores as Firecracker would (it was NOT TAKEN at that MSR).
    from kvmscope.template_restore import restore

    rep = restore(kvm, kvm, dump(kvm).template, 1)
    assert rep.ok, f"this host's dump restored on it: expected taken, saw {rep.failures} {diffs(rep)}"


def test_msrs_needing_a_local_apic_are_judged_with_firecrackers_irqchip(kvm: System) -> None:
    """Firecracker creates an in-kernel irqchip before its vCPUs, so KVM_ASYNC_PF_INT (which kvm_pv_enable_async_pf_int
    refuses without a local APIC) takes 0, and a dump of this host applied back is taken."""
    rep = apply(kvm, parse('{"msr_modifiers": [{"addr": "0x4b564d06", "bitmap": "0b0"}]}', "apf.json"), 1)
    assert rep.ok, f"expected ASYNC_PF_INT 0 taken with an irqchip, saw {rep.failures} {diffs(rep)}"
    out = rep.vcpus[0]
    assert out.msrs_written == out.msrs_total, f"KVM_SET_MSRS wrote {out.msrs_written} of {out.msrs_total}"
    dumped = dump(kvm).template
    assert any(m.addr == 0x4B564D06 for m in dumped.msr_modifiers), "the dump holds KVM_ASYNC_PF_INT"
    back = apply(kvm, dumped, 1)
    assert back.ok, f"this host's dump applied back: expected taken, saw {back.failures} {diffs(back)}"


def test_a_boot_tsc_overrides_the_templates_tsc_bits_the_same_way_every_time(kvm: System) -> None:
    # Firecracker writes TSC 0 over the template's TSC: the bits it overrides are those of 0, not of the TSC read back
    # (which moves on, so the live report listed different bits from run to run).
    template = parse('{"msr_modifiers": [{"addr": "0x10", "bitmap": "0b1000000000000"}]}', "tsc.json")
    for _ in range(2):
        rep = apply(kvm, template, 1)
        got = [(d.kind, d.bits) for v in rep.vcpus for d in v.diffs]
        assert got == [("overridden", [12])], f"expected bit 12 overridden by the boot TSC 0, saw {got}"
