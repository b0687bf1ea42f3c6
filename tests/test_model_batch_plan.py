"""The model's batched ``set_msrs`` (ruled entries first, store-only entries in one update) against the kernel's
entry-by-entry order, run on a twin vCPU: same counts, same stored state, same refusals, step after step."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import guest
from pykvm.api import CpuidEntry, MsrBatch
from pykvm.model import open_model
from pykvm.model.profile import load, shipped
from pykvm.model.vcpu import ModelVcpu

U64 = (1 << 64) - 1
# Rules and their neighbours: feature MSRs, UCODE_REV, MISC_FEATURES_ENABLES (read by PLATFORM_INFO's rule),
# FEAT_CTL, the kvmclock aliases, VMX MSRs, an unknown MSR.
RULED = [0x10A, 0x345, 0xCE, 0x8B, 0x140, 0x3A, 0xC0011029, 0x11, 0x12, 0x4B564D00, 0x4B564D01, 0x480, 0x482, 0x48B,
         0x491, 0x12345678]
VALUES = st.one_of(st.sampled_from([0, 1, 0x80000000, 1 << 31 | 1, U64]), st.integers(0, U64))


def entry_by_entry(vcpu: ModelVcpu, batch: MsrBatch) -> int:
    """KVM_SET_MSRS as the kernel runs it: one entry after another, stopping at the first refused one."""
    for i, (index, data) in enumerate(batch):
        if vcpu._do_set(index, data):
            return i
    return len(batch)


def state(vcpu: ModelVcpu) -> dict[str, Any]:
    return {"msr": dict(vcpu._msr), "vm": dict(vcpu.vm.msrs), "vmx": dict(vcpu._vmx),
            "refusals": dict(vcpu._refusals)}


def twin(profile: str, kernel: str) -> ModelVcpu:
    system = open_model(kernel=kernel, profile=load(profile))
    vcpu = system.create_vm().create_vcpu(0)
    assert isinstance(vcpu, ModelVcpu)
    return vcpu


step = st.one_of(
    st.just(("run",)),
    st.just(("cpuid",)),
    st.tuples(st.just("write"), st.lists(st.tuples(st.integers(0, 1 << 16), VALUES), min_size=1, max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(profile=st.sampled_from(shipped()), kernel=st.sampled_from(["6.3", "6.4", "6.10", "6.12", "6.13", "6.18"]),
       steps=st.lists(step, min_size=1, max_size=8))
def test_batched_set_msrs_matches_entry_by_entry(profile: str, kernel: str, steps: list[Any]) -> None:
    fast, ref = twin(profile, kernel), twin(profile, kernel)
    pool = sorted(set(RULED) | set(fast.profile.msr_behaviour))
    for n, s in enumerate(steps):
        if s[0] == "run":
            for v in (fast, ref):
                guest.run_to_hlt(v.vm, v)
        elif s[0] == "cpuid":
            cpuid: list[CpuidEntry] = fast.vm.system.get_supported_cpuid()
            for v in (fast, ref):
                if not v.has_run:
                    v.set_cpuid(cpuid)
        else:
            entries = [(pool[i % len(pool)], value) for i, value in s[1]]
            batch = MsrBatch(entries)
            got, want = fast.set_msrs(batch), entry_by_entry(ref, batch)
            assert got == want, f"step {n}: batch {batch}: set_msrs wrote {got} entries, entry by entry wrote {want}"
        assert state(fast) == state(ref), f"step {n} ({s[0]}): state differs from the entry-by-entry reference"


def test_store_only_excludes_what_rules_read_or_write() -> None:
    """No MSR with a rule, none a rule reads (MISC_FEATURES_ENABLES), no alias and no immutable MSR is store-only."""
    for profile in shipped():
        vcpu = twin(profile, "6.18")
        ruled = {0x10A, 0x345, 0xCE, 0xC0011029, 0x3A, 0x140, 0x11, 0x12, 0x4B564D00, 0x4B564D01}
        ruled |= set(range(0x480, 0x492))
        overlap = vcpu._store_only & ruled
        assert not overlap, f"{profile}: store-only MSRs include ruled ones: {sorted(hex(i) for i in overlap)}"
        assert 0x8B in vcpu._store_only, f"{profile}: UCODE_REV is expected store-only (any value, no rule)"
