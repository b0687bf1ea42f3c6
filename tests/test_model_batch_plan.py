"""The model's batched ``set_msrs`` (ruled entries first, store-only entries in one update) against the kernel's
entry-by-entry order, run on a twin vCPU: same counts, same stored state, same refusals, step after step."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmscope import guest
from kvmscope.api import CpuidEntry, MsrBatch
from kvmscope.errors import ClosedError, KvmError
from kvmscope.kernel import rulesets as R
from kvmscope.kernel.profile import MsrBehaviour, load, shipped
from kvmscope.model import open_model
from kvmscope.model.msr_family import Family
from kvmscope.model.msr_rules import FAMILY_MSRS
from kvmscope.model.msr_setter_checks import setter_check, setter_refusal
from kvmscope.model.vcpu import ModelVcpu

U64 = (1 << 64) - 1
# Rules and their neighbours: feature MSRs, UCODE_REV, MISC_FEATURES_ENABLES (read by PLATFORM_INFO's rule),
# FEAT_CTL, the kvmclock aliases, VMX MSRs, an unknown MSR.
RULED = [0x10A, 0x345, 0xCE, 0x8B, 0x140, 0x3A, 0xC0011029, 0x11, 0x12, 0x4B564D00, 0x4B564D01, 0x480, 0x482, 0x48B,
         0x491, 0x12345678]
# None stands for the value the MSR holds: frozen MSRs take only that.
VALUES = st.one_of(st.sampled_from([0, 1, 0x80000000, 1 << 31 | 1, U64]), st.integers(0, U64), st.none())


def entry_by_entry(vcpu: ModelVcpu, batch: MsrBatch) -> int:
    """KVM_SET_MSRS as the kernel runs it: one entry after another, stopping at the first refused one."""
    for i, (index, data) in enumerate(batch):
        if vcpu.msr_rules.do_set(index, data):
            return i
    return len(batch)


def read_entry_by_entry(vcpu: ModelVcpu, indices: list[int]) -> tuple[int, MsrBatch]:
    """KVM_GET_MSRS as the kernel runs it (``access_get`` one entry after another): the count, and the buffer with
    the values read, the refused entry zeroed (before 6.12 only when refused as unsupported: REFUSED_READ_ZEROED)
    and later entries left as passed (0xAA)."""
    want, count = MsrBatch([(i, 0xAA) for i in indices]), len(indices)
    zeroed = vcpu.rules.has(R.REFUSED_READ_ZEROED)
    for pos, (index, _) in enumerate(want):
        code, value = vcpu.msr_rules.access_get(index)
        if code in (0, 2) or zeroed:  # OK, UNSUPPORTED
            want.set_value(pos, value if code == 0 else 0)
        if code:
            return pos, want
    return count, want


def assert_read_matches(fast: ModelVcpu, ref: ModelVcpu, indices: list[int], what: str) -> None:
    """``fast.get_msrs`` of ``indices`` against ``access_get`` entry by entry on its twin: the same count, buffer and
    state."""
    got = MsrBatch([(i, 0xAA) for i in indices])
    n_got = fast.get_msrs(got)
    n_want, want = read_entry_by_entry(ref, indices)
    assert n_got == n_want, f"{what}: get_msrs of {got} read {n_got} entries, entry by entry {n_want}"
    assert bytes(got.buffer) == bytes(want.buffer), f"{what}: buffers differ: {got} vs {want}"
    assert state(fast) == state(ref), f"{what}: {got}: state differs from the entry-by-entry reference"


def state(vcpu: ModelVcpu) -> dict[str, Any]:
    msrs, sregs = vcpu.msr_rules, vcpu.sregs
    stored = dict(msrs.stored)
    for key in msrs.constant_keys:  # the constants batch reads take (``msr_reads.constant_key``): not MSRs
        del stored[key]
    return {"msr": stored, "vm": dict(vcpu.vm.msrs), "vmx": dict(msrs.vmx), "refusals": dict(msrs.refusals),
            "sregs": (sregs.efer, sregs.apic_base, sregs.fs.base, sregs.gs.base)}


def every_msr(vcpu: ModelVcpu) -> list[int]:
    """The whole space a batch may name: the rules' neighbours, the profile's MSRs, the index lists and every MSR
    an emulated family owns (``FAMILY_MSRS``)."""
    system = vcpu.vm.system
    return sorted(set(RULED) | set(vcpu.profile.msr_behaviour) | set(system.get_msr_index_list())
                  | set(system.get_msr_feature_index_list()) | FAMILY_MSRS)


def twin(profile: str, kernel: str) -> ModelVcpu:
    system = open_model(kernel=kernel, profile=load(profile))
    vcpu = system.create_vm().create_vcpu(0)
    assert isinstance(vcpu, ModelVcpu)
    return vcpu


step = st.one_of(
    st.just(("run",)),
    st.just(("cpuid",)),
    st.tuples(st.just("mce"), st.integers(1, 32), st.booleans()),  # KVM_X86_SETUP_MCE: banks, MCG_CTL_P
    # "setters": only MSRs with setters and store-only ones, the batches set_msrs stores whole; "index": the index
    # list, what a VMM saves and restores (a value of None writes back what a read gives).
    st.tuples(st.just("write"), st.sampled_from(["any", "setters", "index", "index"]),
              st.lists(st.tuples(st.integers(0, 1 << 16), VALUES), min_size=1, max_size=40)),
)


@settings(max_examples=int(os.environ.get("KVMSCOPE_PLAN_EXAMPLES", "300")), deadline=None)
@given(profile=st.sampled_from(shipped()),
       kernel=st.sampled_from(["5.10", "6.1", "6.3", "6.4", "6.10", "6.12", "6.13", "6.18"]),
       steps=st.lists(step, min_size=1, max_size=8))
def test_batched_set_msrs_matches_entry_by_entry(profile: str, kernel: str, steps: list[Any]) -> None:
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    pools = {"any": every_msr(fast),
             "setters": sorted(set(fast.msr_rules.setters) | fast.msr_rules.store_only),
             "index": sorted(fast.vm.system.get_msr_index_list())}
    for n, s in enumerate(steps):
        if s[0] == "run":
            for v in (fast, ref):
                guest.run_to_hlt(v.vm, v)
        elif s[0] == "cpuid":
            cpuid: list[CpuidEntry] = fast.vm.system.get_supported_cpuid()
            for v in (fast, ref):
                if not v.has_run:
                    v.set_cpuid(cpuid)
        elif s[0] == "mce":
            for v in (fast, ref):
                v.setup_mce(s[1] | (1 << 8 if s[2] else 0))
        else:
            pool = pools[s[1]]
            entries = []
            for i, value in s[2]:
                index = pool[i % len(pool)]
                if value is None:  # read on both twins: a read may record a refusal
                    value = ref.msr_rules.access_get(index)[1]
                    fast.msr_rules.access_get(index)
                entries.append((index, value))
            batch = MsrBatch(entries)
            got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
            assert got == want, f"step {n}: batch {batch}: set_msrs wrote {got} entries, entry by entry wrote {want}"
        assert state(fast) == state(ref), f"step {n} ({s[0]}): state differs from the entry-by-entry reference"


def test_store_only_excludes_what_rules_read_or_write() -> None:
    """No MSR with a rule (a setter), none a rule reads (MISC_FEATURES_ENABLES), no alias and no immutable MSR is
    store-only."""
    for profile in shipped():
        vcpu = twin(profile, "6.18")
        ruled = {0x10A, 0x345, 0xCE, 0xC0011029, 0x3A, 0x140, 0x11, 0x12, 0x4B564D00, 0x4B564D01}
        ruled |= set(range(0x480, 0x492))
        overlap = vcpu.msr_rules.store_only & ruled
        assert not overlap, f"{profile}: store-only MSRs include ruled ones: {sorted(hex(i) for i in overlap)}"
        assert 0x174 in vcpu.msr_rules.store_only, f"{profile}: SYSENTER_CS is expected store-only (any value, no rule)"
        assert 0x8B not in vcpu.msr_rules.plain, f"{profile}: UCODE_REV has a setter, so it is expected ruled"


def test_write_taken_without_storing_keeps_the_held_value() -> None:
    """6.13+: ARCH_CAPABILITIES without its CPUID bit is unsupported, and a write of 0 is forgiven (advertised MSR)
    without storing anything; the rest of the batch is stored as usual."""
    fast, ref = twin("intel-spr", "6.18"), twin("intel-spr", "6.18")
    stored = fast.msr_rules.stored
    held = stored[0x10A]
    assert held, "the intel-spr profile is expected to stuff a nonzero ARCH_CAPABILITIES"
    batch = MsrBatch([(0x10A, 0), (0x8B, 0x1234)])
    assert fast.set_msrs(batch) == entry_by_entry(ref, batch) == 2, "both entries are expected to be taken"
    assert stored[0x10A] == held, f"ARCH_CAPABILITIES changed from {held:#x} to {stored[0x10A]:#x}"
    assert state(fast) == state(ref), "state differs from the entry-by-entry reference"


@pytest.mark.parametrize(("profile", "kernel", "index"), [
    ("intel-spr", "6.4", 0x10A), ("intel-spr", "6.18", 0x10A), ("pvm-6.18", "6.18", 0xCE), ("amd-epyc", "6.18", 0xC0011029)])
def test_frozen_msr_given_its_own_value(profile: str, kernel: str, index: int) -> None:
    """After a run, a frozen MSR given the value it holds is taken (without a real write before 6.10, with one
    after); a different value stops the batch there, and the store-only entry before it took effect."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    for v in (fast, ref):
        v.set_cpuid(v.vm.system.get_supported_cpuid())
        guest.run_to_hlt(v.vm, v)
    assert index in fast.msr_rules.frozen, f"{profile} {kernel}: {index:#x} is expected frozen after a run"
    stored = fast.msr_rules.stored
    held = stored[index]
    same = MsrBatch([(0x8B, 1), (index, held), (0x174, 2)])
    assert fast.set_msrs(same) == entry_by_entry(ref, same) == 3, f"{index:#x}: a same-value batch is taken whole"
    other = MsrBatch([(0x8B, 3), (index, held ^ 1), (0x174, 4)])
    assert fast.set_msrs(other) == entry_by_entry(ref, other) == 1, f"{index:#x}: expected a stop at the frozen MSR"
    assert stored[0x8B] == 3 and stored[0x174] == 2, f"entries around the refusal: {stored}"
    rule = fast.refusal_rule(index)
    assert rule is not None and rule.key in ("freeze", "platform_info_immutable"), f"expected the freeze rule, got {rule}"
    assert state(fast) == state(ref), "state differs from the entry-by-entry reference"


def test_buffer_edited_in_place_is_seen_and_cannot_be_replaced() -> None:
    """A batch's buffer may be edited in place (the plan follows the new indices); replacing it is refused, since
    the backends keep views of it."""
    fast, ref = twin("intel-spr", "6.18"), twin("intel-spr", "6.18")
    batch = MsrBatch([(0x174, 1), (0x12345678, 2)])
    assert fast.set_msrs(batch) == entry_by_entry(ref, batch) == 1, "the unknown MSR is expected to stop the batch"
    struct.pack_into("<IIQ", batch.buffer, 8 + 16, 0x175, 0, 7)
    assert fast.set_msrs(batch) == entry_by_entry(ref, batch) == 2, f"after the in-place edit: {batch}"
    assert fast.msr_rules.stored[0x175] == 7 and state(fast) == state(ref), "the edited entry is expected stored"
    with pytest.raises(AttributeError):
        batch.buffer = bytearray(len(batch.buffer))  # type: ignore[misc]


@settings(max_examples=int(os.environ.get("KVMSCOPE_PLAN_EXAMPLES", "300")), deadline=None)
@given(profile=st.sampled_from(shipped()), kernel=st.sampled_from(["5.10", "6.1", "6.3", "6.10", "6.12", "6.18"]),
       writes=st.lists(st.tuples(st.integers(0, 1 << 16), VALUES), max_size=20),
       reads=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=40), cpuid=st.booleans(), run=st.booleans(),
       banks=st.one_of(st.none(), st.integers(1, 32)))
def test_batched_get_msrs_matches_entry_by_entry(profile: str, kernel: str, writes: list[Any], reads: list[int],
                                                 cpuid: bool, run: bool, banks: int | None) -> None:
    """The planned get_msrs (plain MSRs in one pass) against ``access_get`` entry by entry: same count, same buffer
    (values read, the refused entry zeroed, later entries left as passed), same refusals."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    pool = every_msr(fast)
    for v in (fast, ref):
        if banks is not None:
            v.setup_mce(banks)
        if cpuid:
            v.set_cpuid(v.vm.system.get_supported_cpuid())
        if run:
            guest.run_to_hlt(v.vm, v)
        for i, value in writes:  # the same writes on both, entry by entry: the reads see varied state
            index = pool[i % len(pool)]
            v.msr_rules.do_set(index, 0 if value is None else value)
    indices = [pool[i % len(pool)] for i in reads]
    got = MsrBatch([(i, 0xAA) for i in indices])
    n_got = fast.get_msrs(got)
    n_want, want = read_entry_by_entry(ref, indices)
    assert n_got == n_want, f"batch {indices}: get_msrs read {n_got} entries, entry by entry read {n_want}"
    assert bytes(got.buffer) == bytes(want.buffer), f"buffers differ: {got} vs {want}"
    assert state(fast) == state(ref), "state differs from the entry-by-entry reference"


@pytest.mark.parametrize("profile", ["pvm-6.18", "intel-spr"])
def test_frozen_gated_msr_after_a_refused_entry(profile: str) -> None:
    """6.13+ after a run, without CPUID set: ARCH_CAPABILITIES reads as 0 (unsupported, forgiven) and its freeze
    check's read records a refusal. A batch refused before it must leave no trace of that read; one taken whole
    records what the kernel's order records."""
    fast, ref = twin(profile, "6.18"), twin(profile, "6.18")
    for v in (fast, ref):
        guest.run_to_hlt(v.vm, v)
    assert 0x10A in fast.msr_rules.frozen, f"{profile}: ARCH_CAPABILITIES is expected frozen after a run"
    for entries in ([(0x17B, 5), (0x10A, 0), (0x174, 1)], [(0x174, 2), (0x10A, 0), (0x175, 3)],
                    [(0x174, 3), (0x10A, 5), (0x175, 4)], [(0x345, 1), (0x174, 5)]):
        batch = MsrBatch(entries)
        got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
        assert got == want, f"{profile} {batch}: set_msrs wrote {got} entries, entry by entry wrote {want}"
        assert state(fast) == state(ref), f"{profile} {batch}: state differs from the entry-by-entry reference"


# Values at the edges of the grouped and checked writes: canonical at 48 and 57 bits, MCi_CTL's all-ones with bits 0
# and 10 free, memory types in every byte, reserved physical-address bits, the PV MSRs' reserved bits and enable bit
# (with an address in guest memory and one outside it), PERF_CAPABILITIES' LBR and PEBS formats.
EDGE_VALUES = [0, 1, U64, U64 ^ 1, U64 ^ (1 << 10), U64 ^ 0x401, U64 ^ 2, (1 << 47) - 1, 1 << 47,
                         U64 - (1 << 47) + 1, U64 - (1 << 47), (1 << 56) - 1, 1 << 56, U64 - (1 << 56) + 1,
                         0x0606060606060606, 0x0706060606060606, 0x0606060606060602, 0x06, 0x806, 0xF06,
                         1 << 35 | 6, 1 << 51 | 6, 0x800, 0xFFF, 1 << 36 | 0x800, 2, 3, 0x10, 0x30, 0x40, 0x3E,
                         0x1000, 0x1001, 0x1003, 0x100001, 0x3F, 0x1F, 0x1F00, 0x2000, 0x4000 | 0x1F,
                         0xC06, 0xC07, 0xCFF, 0x1C06, 0x406]
EDGES = st.sampled_from(EDGE_VALUES)


def checked(vcpu: ModelVcpu) -> list[int]:
    """The MSRs a batch checks without their handler under the vCPU's configuration now (``write_check``,
    ``setter_check``), and those whose write a setter refuses as unsupported (``setter_refusal``)."""
    rules = vcpu.msr_rules
    return sorted({index for index, family in rules.families.items() if family.write_check(index) is not None}
                  | {index for index in rules.setters
                     if setter_check(rules, index) is not None or setter_refusal(rules, index) is not None})


def grouped(vcpu: ModelVcpu) -> dict[str, list[int]]:
    """The MSRs whose writes a batch checks group by group (``MsrFamily.bulk_kind``), by group, and all of them with
    their neighbours under "all"."""
    families = vcpu.msr_rules.families
    groups: dict[str, list[int]] = {"all": [0x179, 0x17B, 0x2FF, 0x277]}
    for index, family in sorted(families.items()):
        kind = family.bulk_kind(index)
        if kind is not None:
            groups.setdefault(kind, []).append(index)
            groups["all"].append(index)
    return groups


@settings(max_examples=int(os.environ.get("KVMSCOPE_PLAN_EXAMPLES", "300")), deadline=None)
@given(profile=st.sampled_from(shipped()), kernel=st.sampled_from(["5.10", "6.1", "6.3", "6.12", "6.18"]),
       batches=st.lists(st.tuples(st.integers(0, 99), st.lists(st.tuples(st.integers(0, 1 << 16), st.one_of(
           EDGES, EDGES, st.integers(0, U64))), min_size=1, max_size=12)), min_size=1, max_size=4),
       banks=st.one_of(st.none(), st.integers(1, 32)), cr4_la57=st.booleans(), cpuid=st.booleans())
def test_grouped_writes_match_entry_by_entry(profile: str, kernel: str, batches: list[Any], banks: int | None,
                                             cr4_la57: bool, cpuid: bool) -> None:
    """Batches of the grouped MSRs (MCi banks, MTRRs, canonical-address MSRs) and the checked ones (PV MSRs, MCG_CTL,
    TSC_ADJUST, the feature MSRs with setters...), each mostly of one group (so that its check decides the batch) with
    values at the edges of each group's check: the same counts, state and refusals as entry by entry."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    for v in (fast, ref):
        v.vm.add_memory(0, 0x10000)  # PV EOI's address: 0x1000 is in guest memory, 0x100000 is not
        if cpuid:
            v.set_cpuid(v.vm.system.get_supported_cpuid())
        if banks is not None:
            v.setup_mce(banks)
        if cr4_la57:  # where the host and the guest have LA57: elsewhere KVM_SET_SREGS refuses it (model/cr4.py)
            sregs = v.get_sregs()
            sregs.cr4 |= 1 << 12
            try:
                v.set_sregs(sregs)
            except KvmError as e:
                assert e.errno == errno.EINVAL, f"CR4.LA57: expected success or EINVAL, saw {e}"
    groups = grouped(fast)
    groups["checked"] = checked(fast)
    groups["all"] += groups["checked"]
    kinds = sorted(groups)
    for n, (which, entries) in enumerate(batches):
        pool = groups[kinds[which % len(kinds)]]
        batch = MsrBatch([(pool[i % len(pool)], value) for i, value in entries])
        got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
        assert got == want, f"batch {n} {batch}: set_msrs wrote {got} entries, entry by entry wrote {want}"
        assert state(fast) == state(ref), f"batch {n} {batch}: state differs from the entry-by-entry reference"


def check_values(vcpu: ModelVcpu, index: int) -> list[int]:
    """Values that probe a checked write from every side: each single bit, none, all, the edges above, and the
    profile's own value of the MSR with each of its low bits flipped."""
    own = vcpu.msr_rules.stored.get(index, 0)
    return sorted({0, U64, *(1 << bit for bit in range(64)), *EDGE_VALUES, own, *(own ^ (1 << bit) for bit in range(12))})


def read_only(vcpu: ModelVcpu) -> list[int]:
    """MSRs whose host write is always refused as unsupported (a family's read-only MSRs, setters refused under the
    CPUID now): a batch records their refusal without a call."""
    rules = vcpu.msr_rules
    return sorted({index for index, family in rules.families.items()
                   if isinstance(family, Family) and family.write_kind(index) == "read_only"}
                  | {index for index in rules.setters if setter_refusal(rules, index) is not None})


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.3", "6.18"])
@pytest.mark.parametrize("profile", shipped())
def test_each_checked_write_matches_entry_by_entry(profile: str, kernel: str) -> None:
    """Every MSR a batch checks without its handler, with every value of ``check_values``,
    under each configuration the checks depend on (MCG_CAP with MCG_CTL_P and then without, no CPUID and then the
    supported one), alone, between two plain entries, and beside a read-only entry and a VM-wide one (kvmclock's
    WALL_CLOCK): the same count, state and
    refusals as entry by entry. Each batch's plan is made before a change of configuration and used after it."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    for v in (fast, ref):
        v.vm.add_memory(0, 0x10000)
    for config in ("none", "mce-ctl", "cpuid", "mce"):
        for v in (fast, ref):
            if config == "cpuid":
                v.set_cpuid(v.vm.system.get_supported_cpuid())
            elif config.startswith("mce"):
                v.setup_mce(10 | (1 << 8 if config == "mce-ctl" else 0))
        pool = checked(fast)
        kept = read_only(fast) or [0x12345678]
        for n, index in enumerate(pool):
            for value in check_values(ref, index):
                for entries in ([(index, value)], [(0x174, value & 0xFFFF), (index, value), (0x175, 0)],
                                [(0x11, value & 0xFFFF), (index, value), (kept[n % len(kept)], 0)]):
                    batch = MsrBatch(entries)
                    got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
                    assert got == want, f"{config}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
                    assert state(fast) == state(ref), f"{config}: {batch}: state differs from entry by entry"


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.3", "6.12", "6.18"])
@pytest.mark.parametrize("profile", shipped())
def test_reads_follow_config_changes(profile: str, kernel: str) -> None:
    """Reads of the feature MSRs with setters (decided by the plan under the CPUID now: ``read_decided``), with a
    plan made before KVM_SET_CPUID2 and used after it, and after a run: the same buffer, count and refusals as
    ``access_get`` entry by entry."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    for step, indices in (("none", [0x174, 0x10A, 0x345, 0xCE, 0x8B, 0xC0011029, 0x175]), ("none", [0x174, 0x10A]),
                          ("none", [0x345, 0x8B]), ("cpuid", [0x174, 0x10A]), ("cpuid", [0x345, 0x8B]),
                          ("cpuid", [0x174, 0x10A, 0x345, 0xCE, 0x8B, 0xC0011029, 0x175]), ("run", [0x174, 0x10A])):
        for v in (fast, ref):
            if step == "cpuid" and v.cpuid == []:
                v.set_cpuid(v.vm.system.get_supported_cpuid())
            elif step == "run" and not v.has_run:
                guest.run_to_hlt(v.vm, v)
        for v in (fast, ref):  # the refusals a read records are what is compared
            v.msr_rules.refusals.clear()
        assert_read_matches(fast, ref, indices, step)


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.3", "6.18"])
@pytest.mark.parametrize("profile", shipped())
def test_each_read_matches_entry_by_entry(profile: str, kernel: str) -> None:
    """Every MSR a batch may name, read alone and between two plain MSRs after each of three writes (a value of its
    own, one shaped like a page address, a memory type), without CPUID and with the supported one: the same buffer,
    count and refusals as ``access_get`` entry by entry. The read plans are made at the first read and used after
    the later writes, so a plan that reads the wrong key or a stale value shows."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    pool = every_msr(fast)
    for config in ("none", "cpuid"):
        for v in (fast, ref):
            if config == "cpuid":
                v.set_cpuid(v.vm.system.get_supported_cpuid())
        for index in pool:
            for value in ((index * 0x9E3779B97F4A7C15) & U64, (index & 0xFFF) << 12, 6):
                for v in (fast, ref):
                    v.msr_rules.do_set(index, value)
                    v.msr_rules.refusals.clear()
                for indices in ([index], [0x174, index, 0x8B]):
                    assert_read_matches(fast, ref, indices, f"{config}, after {value:#x}")


def test_direct_checks_carry_into_the_next_index_only() -> None:
    """The direct path adds each check's offset to its value, and a carry out of bit 63 must be dropped, as the
    kernel's u64 sum drops it (the one-integer pass before ``msr_compiled`` carried it into the next entry's index).
    Canonical values that carry (the high half), next to an entry whose value fails by one, and batches whose next
    index is the largest: the same as entry by entry."""
    for profile in shipped():
        fast, ref = twin(profile, "6.18"), twin(profile, "6.18")
        canonical = [i for i in checked(fast) if i in (0x175, 0x176, 0xC0000082, 0xC0000083, 0xC0000102)]
        assert canonical, f"{profile}: expected the canonical-address MSRs among the checked ones"
        high = U64 - (1 << 46)  # canonical at 48 and 57 bits: adding the offset carries out of bit 63
        for index in canonical:
            for nxt, value in ((0x4B564D03, 0x40), (0x4B564D03, 0), (0x175, 1 << 47), (0xFFFFFFFF, 0), (0x174, 5)):
                batch = MsrBatch([(index, high), (nxt, value)])
                got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
                assert got == want, f"{profile}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
                assert state(fast) == state(ref), f"{profile}: {batch}: state differs from entry by entry"


def test_mcg_cap_written_by_a_batch() -> None:
    """A profile whose vendor module takes MCG_CAP writes (``vendor_msrs``) lets a batch change what MCG_CTL's and
    the MCi banks' rules read: in the same batch, and in a later one whose plan was made before (found by review)."""
    def vcpu() -> ModelVcpu:
        p = load("intel-spr")
        p = dataclasses.replace(p, vendor_msrs={**p.vendor_msrs, 0x179: MsrBehaviour("store")})
        v = open_model(kernel="6.18", profile=p).create_vm().create_vcpu(0)
        assert isinstance(v, ModelVcpu)
        v.setup_mce(0x10A)  # 10 banks, MCG_CTL_P
        return v
    for batches in ([[(0x179, 10), (0x17B, U64)]], [[(0x17B, 0)], [(0x179, 10)], [(0x17B, U64)]],
                    [[(0x179, 2), (0x409, 5)]], [[(0x409, 1), (0x17B, 0)], [(0x179, 2)], [(0x409, 5), (0x17B, 0)]]):
        fast, ref = vcpu(), vcpu()
        for entries in batches:
            batch = MsrBatch(entries)
            got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
            assert got == want, f"{batches}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
            assert state(fast) == state(ref), f"{batches}: {batch}: state differs from entry by entry"


@pytest.mark.parametrize(("index", "vendor"), [(0x4B564D02, True), (0x4B564D06, True), (0x6E0, True), (0x6E0, False)])
def test_irqchip_rules_over_a_vendor_msr(index: int, vendor: bool) -> None:
    """With an in-kernel LAPIC, ASYNC_PF_EN/INT follow it even where the profile's vendor module lists them
    (``vendor_msrs``), and TSC_DEADLINE keeps what is written only in the LVT timer's TSC-deadline mode (a vendor entry
    for it wins in every mode): whichever rule applies, a batch runs it as entry by entry does, also after the timer's
    mode switched (found by review)."""
    def vcpu() -> ModelVcpu:
        p = load("intel-spr")
        if vendor:
            p = dataclasses.replace(p, vendor_msrs={**p.vendor_msrs, index: MsrBehaviour("store")})
        vm = open_model(kernel="6.18", profile=p).create_vm()
        vm.create_irqchip()
        v = vm.create_vcpu(0)
        assert isinstance(v, ModelVcpu)
        return v
    fast, ref = vcpu(), vcpu()
    for lvtt in (None, 0x40000, 0):  # the LVT timer's mode: as reset, TSC deadline (TSC_DEADLINE keeps writes), one-shot
        if lvtt is not None:
            for v in (fast, ref):
                v.set_cpuid(v.vm.system.get_supported_cpuid())
                lapic = v.get_lapic()
                struct.pack_into("<I", lapic.regs, 0x320, lvtt)
                v.set_lapic(lapic)
        for entries in ([(index, 0x1234)], [(0x174, 5), (index, 0x1234)], [(index, 0)], [(index, 0x1234), (0x174, 6)]):
            batch = MsrBatch(entries)
            got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
            assert got == want, f"{index:#x} LVTT {lvtt}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
            assert state(fast) == state(ref), f"{index:#x} LVTT {lvtt}: {batch}: state differs from entry by entry"
            assert_read_matches(fast, ref, [0x174, index], f"{index:#x} LVTT {lvtt} after {batch}")


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.3", "6.18"])
@pytest.mark.parametrize("profile", shipped())
def test_each_grouped_write_matches_entry_by_entry(profile: str, kernel: str) -> None:
    """Every MSR a batch checks as a group (MTRRs, MCi banks: the first, the last within MCG_CAP, the first beyond
    it and the last of all), with every edge value, alone and in a run of its group (so that the group's check decides
    the batch), with 10 banks and with 32: the same count, state and refusals as entry by entry."""
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    for banks in (10 | 1 << 8, 32):
        for v in (fast, ref):
            v.setup_mce(banks)
        pool = [i for i in grouped(fast)["all"]
                if not (0x400 <= i < 0x480 or 0x280 <= i < 0x2A0) or (i - 0x400) // 4 in (0, 9, 10, 31)
                or i - 0x280 in (0, 9, 10, 31)]
        for index in pool:
            run = [i for i in pool if i != index and fast.msr_rules.families.get(i) is fast.msr_rules.families.get(index)]
            for value in EDGE_VALUES:
                for entries in ([(index, value)], [(index, value), *((i, 0) for i in run[:3])]):
                    batch = MsrBatch(entries)
                    got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
                    assert got == want, f"{banks:#x}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
                    assert state(fast) == state(ref), f"{banks:#x}: {batch}: state differs from entry by entry"


@pytest.mark.parametrize("profile", shipped())
def test_a_vmms_save_and_restore_takes_the_compiled_paths(profile: str) -> None:
    """What a VMM saves and restores (the first 32 index-list MSRs the vCPU reads and takes back, as
    ``benchmarks/common.py`` picks them) on a vCPU given the supported CPUID: the write takes its plan's compiled
    direct path and the read its compiled read (on amd-epyc after the SYSENTER MSRs' group check: SVM masks them by
    the guest's vendor at the read), the second time by the last plan alone (no key made), with the result of the
    general path. A compiled path that declined every batch would leave the results right and the model slow; this
    fails instead."""
    vcpu = twin(profile, "6.18")
    vcpu.set_cpuid(vcpu.vm.system.get_supported_cpuid())
    indices = []
    for index in vcpu.vm.system.get_msr_index_list():
        one = MsrBatch([index])
        if vcpu.get_msrs(one) == 1 and vcpu.set_msrs(MsrBatch([(index, one[0][1])])) == 1:
            indices.append(index)
    batch = MsrBatch(indices[:32])
    assert vcpu.get_msrs(batch, strict=True) == len(batch)
    msrs = vcpu.msr_rules
    key = batch.indices32.tobytes()
    read, ruled = msrs.read_plans[key][7], {index for _, index, _ in msrs.read_plans[key][3]}
    assert vcpu.set_msrs(batch, strict=True) == len(batch)
    direct = msrs.plans[key][9]
    assert direct is not None, f"{profile}: the write plan of {batch} has no compiled direct path"
    before = state(vcpu)
    assert direct[0](batch.raw, batch.words64, msrs.refusals) is True, f"{profile}: the direct path declined {batch}"
    assert state(vcpu) == before, f"{profile}: writing back what was read changed the state"
    assert msrs.last_plan[1] is msrs.plans[key] and msrs.last_read_plan[1] is msrs.read_plans[key], (
        f"{profile}: the last plans are not the batch's")
    assert read is not None, f"{profile}: the read plan of {batch} has no compiled read (ruled: {ruled})"
    out = MsrBatch([(index, 0xAA) for index in indices[:32]])
    assert read(out.words64, msrs.refusals) is True, f"{profile}: the compiled read declined {out}"
    assert bytes(out.buffer) == bytes(batch.buffer), f"{profile}: the compiled read gave {out}, not {batch}"


def check_of(vcpu: ModelVcpu, index: int) -> object:
    """The check a batch makes of ``index`` without its handler (offset, mask, guest address), or a refusal."""
    rules = vcpu.msr_rules
    family = rules.families.get(index)
    check = family.write_check(index) if family is not None else None
    return check or setter_check(rules, index) or setter_refusal(rules, index)


@pytest.mark.parametrize("profile", shipped())
def test_checks_of_every_kind_in_one_batch(profile: str) -> None:
    """The direct path merges the checks that share an offset and a mask: two checked MSRs of different kinds in one
    batch (one MSR of each kind of check, every pair, the second given every value of ``check_values``), with and
    without the supported CPUID: the same count and state as entry by entry."""
    fast, ref = twin(profile, "6.18"), twin(profile, "6.18")
    for config in ("none", "cpuid"):
        if config == "cpuid":
            for v in (fast, ref):
                v.set_cpuid(v.vm.system.get_supported_cpuid())
        kinds: dict[str, int] = {}
        for index in checked(fast):
            kinds.setdefault(repr(check_of(fast, index)), index)
        assert len(kinds) > 2, f"{profile}: expected several kinds of check, got {kinds}"
        for first in kinds.values():
            for second in kinds.values():
                for value in check_values(ref, second):
                    batch = MsrBatch([(first, 0), (0x174, 1), (second, value)])
                    got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
                    assert got == want, f"{config}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
                    assert state(fast) == state(ref), f"{config}: {batch}: state differs from entry by entry"


@pytest.mark.parametrize("profile", shipped())
def test_the_last_plan_is_forgotten_at_each_change(profile: str) -> None:
    """Both batch ioctls know a batch naming the last batch's MSRs by its indices alone. The same batch before and
    after each change its plan depends on (KVM_SET_CPUID2, KVM_X86_SETUP_MCE, the first run's freeze), written with
    other values and read back: the same count, buffer and state as entry by entry. After close, it raises."""
    fast, ref = twin(profile, "6.18"), twin(profile, "6.18")
    indices = [0x10A, 0x345, 0x174, 0xC0000082, 0x17B, 0x4B564D02]
    features = {0x10A: fast.profile.feature_msrs.get(0x10A, 0), 0x345: fast.msr_rules.stored.get(0x345, 0)}
    for step, values in (("none", [0, 0, 1, 0, 0, 0]), ("cpuid", [features[0x10A], features[0x345], 2, 1 << 47, U64, 0]),
                         ("mce", [features[0x10A], features[0x345], 3, 0, U64, 0]),
                         ("run", [features[0x10A] ^ 1, features[0x345] ^ 1, 4, 0, 0, 0x3E])):
        for v in (fast, ref):
            if step == "cpuid":
                v.set_cpuid(v.vm.system.get_supported_cpuid())
            elif step == "mce":
                v.setup_mce(10)
            elif step == "run":
                guest.run_to_hlt(v.vm, v)
        for v in (fast, ref):
            v.msr_rules.refusals.clear()
        batch = MsrBatch(list(zip(indices, values, strict=True)))
        got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
        assert got == want, f"after {step}: {batch}: set_msrs wrote {got} entries, entry by entry {want}"
        assert state(fast) == state(ref), f"after {step}: {batch}: state differs from entry by entry"
        assert_read_matches(fast, ref, indices, f"after {step}")
        assert fast.msr_rules.last_plan[0] == batch.indices32, f"after {step}: the last plan is not {batch}'s"
    fast.close()
    for call in (fast.set_msrs, fast.get_msrs):
        with pytest.raises(ClosedError):
            call(MsrBatch(indices))


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "6.18"])
def test_svm_sysenter_read_in_bulk_only_as_the_getter_reads_it(kernel: str) -> None:
    """SVM drops SYSENTER's high half at the read for a guest that is not Intel(-compatible), and a batch reads the
    MSRs in bulk only while their stored high half is 0 (``bulk_read_ok``). Written under a GenuineIntel CPUID (the
    high half kept), read under the AMD one, in a batch with plain entries: the same buffer, count and state as entry
    by entry."""
    fast, ref = twin("amd-epyc", kernel), twin("amd-epyc", kernel)
    supported = fast.vm.system.get_supported_cpuid()
    intel = [dataclasses.replace(e, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E) if e.function == 0 else e
             for e in supported]
    indices = [0x174, 0x175, 0x176, 0xC0000081]
    for cpuid in (intel, supported, intel):
        for v in (fast, ref):
            v.set_cpuid(cpuid)
        batch = MsrBatch([(0x174, 1), (0x175, 0xFFFFFE0000001000), (0x176, 0x2000), (0xC0000081, 0)])
        assert fast.set_msrs(batch) == entry_by_entry(ref, batch), f"{kernel}: {batch}: counts differ"
        for v in (fast, ref):
            v.set_cpuid(supported if cpuid is intel else intel)
        assert_read_matches(fast, ref, indices, f"{kernel}: written under one vendor, read under the other")
