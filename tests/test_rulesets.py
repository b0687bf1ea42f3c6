"""Rulesets are computed from each rule's own versions: resolution, stable backports, typed refusals."""

from __future__ import annotations

import dataclasses

import pytest

from kvmscope import open as kvm_open
from kvmscope.errors import InvalidValueError, MsrWriteError
from kvmscope.kernel import rulesets as R


@pytest.mark.parametrize(("version", "label"), [("6.3.5", "6.3"), ("6.10.3", "6.10"), ("6.16", "6.15"), ("6.12.5", "6.12"),
                                                ("6.18.44-fc", "6.18.17"), ("7.2", "6.18"), ("5.10.262", "5.10.240"),
                                                ("5.15.0", "5.15"), ("6.6.50", "6.6.29"), ("6.6.28", "6.6.22"),
                                                ("6.12.111", "6.12.78"), ("6.12.118", "6.12.112")])
def test_resolve_labels_with_the_newest_change(version: str, label: str) -> None:
    assert R.resolve(version).version == label, f"kernel {version}: expected the {label} rules"


@pytest.mark.parametrize("bad", ["6", "six.four", "6.18foo", "", "5.4", "4.19.300"])
def test_resolve_refuses_what_is_not_a_known_version(bad: str) -> None:
    with pytest.raises(InvalidValueError):
        R.resolve(bad)


def test_each_switch_follows_its_rule() -> None:
    """The switches the model reads come from the rules in force, not a table: spot-check each rule's edge."""
    for rule in R.RULES.values():
        if rule.start is not None:
            before = (rule.start[0], rule.start[1] - 1, 0)
            if before >= R.OLDEST:
                assert not rule.in_force(before), f"{rule.key} should not be in force on {before}"
            assert rule.in_force(rule.start), f"{rule.key} should be in force from {rule.since}"
        if rule.until is not None:
            assert not rule.in_force(R.parse_version(rule.until)), f"{rule.key} should be gone in {rule.until}"
    assert R.resolve("6.12").perf_cap_pebs_mask == 0x4FC0 and R.resolve("6.18").perf_cap_pebs_mask == 0x24FC0
    assert R.resolve("6.12").platform_info_order_check and not R.resolve("6.13").platform_info_order_check


def test_a_stable_backport_is_one_line() -> None:
    """A rule given a stable release applies from that release in its series only, and mainline from ``since``."""
    backported = dataclasses.replace(R.STUFF_QUIRK, stable=("6.12.77",))
    assert not backported.in_force((6, 12, 76)), "before the backport"
    assert backported.in_force((6, 12, 77)) and backported.in_force((6, 12, 118)), "from the backport on"
    assert not backported.in_force((6, 11, 99)), "another series does not get it"
    assert backported.in_force((6, 13, 0)), "mainline from since"
    removed = dataclasses.replace(R.DE_CFG_GUEST_SAME_ONLY, stable_until=("6.12.9",))
    assert removed.in_force((6, 12, 8)) and not removed.in_force((6, 12, 9)), "a stable removal ends it in 6.12.9"


def test_unknown_rule_key_is_an_error() -> None:
    with pytest.raises(InvalidValueError, match="no rule named 'nope'"):
        R.rule("nope")
    assert R.rule("freeze") is R.FREEZE


def test_refusals_carry_the_rule_object() -> None:
    with kvm_open("model", profile="intel-spr", kernel="6.18") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.write_msr("UCODE_REV", 5)
        assert vcpu.set_msrs({"PERF_CAP": 1 << 63}) == 0
        rule = vcpu.refusal_rule(0x345)
        assert isinstance(rule, R.Rule), f"refusal_rule gives a Rule, saw {rule!r}"
        with pytest.raises(MsrWriteError) as info:
            vcpu.write_msr("PERF_CAP", 1 << 63)
        assert info.value.rule is rule, f"the strict error carries the same Rule, saw {info.value.rule!r}"
        assert str(rule) == rule.cite() and rule.commit in str(info.value)


def test_a_profile_recording_an_older_label_for_its_kernel_is_noted() -> None:
    """A capture made before kvmscope learnt a backport of its kernel (pvm-6.18 said 6.18 for 6.18.44, which is now
    6.18.17) keeps its recorded rules, with a note saying so and how to move on; a current label, a derived profile
    and an explicit --kernel get none."""
    from dataclasses import replace

    from kvmscope.kernel import profile
    from kvmscope.model import open_model

    shipped = profile.load("pvm-6.18")
    with open_model(profile=replace(shipped, ruleset="6.18")) as old:
        assert old.rules.version == "6.18", "the recorded ruleset is used"
        assert old.warning is not None and "6.18.17" in old.warning and "--kernel 6.18.44" in old.warning, old.warning
    with open_model(profile=replace(shipped, ruleset="6.18"), kernel="6.18") as chosen:
        assert chosen.warning is None, f"an explicit kernel is the user's choice: {chosen.warning}"
    for name in ("pvm-6.18", "intel-spr", "amd-epyc"):
        with open_model(profile=name) as current:
            assert current.warning is None, f"{name}: {current.warning}"


def test_a_kernel_after_the_newest_names_the_unpinned_changes() -> None:
    warning = R.newer_than_known("7.2")
    assert warning is not None and "x2apic_suppress_eoi_flags" in warning and "(6.18)" in warning, warning
    assert R.newer_than_known("6.18.44") is None and R.NEWEST == "6.18"


def test_cpuid_gates_name_the_catalogue_msrs() -> None:
    from kvmscope import msrs

    got = {rule.key: msr for rule, (msr, _, _) in R.CPUID_GATES.items()}
    want = {"arch_cap_needs_cpuid": msrs.MSR_IA32_ARCH_CAPABILITIES, "perf_cap_needs_pdcm": msrs.MSR_IA32_PERF_CAPABILITIES}
    assert got == want, f"expected {want}, saw {got}"
