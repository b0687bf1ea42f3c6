"""The MSR catalogue: lookups, errors and field decoders (no /dev/kvm needed)."""

from __future__ import annotations

import pytest

from kvmscope import msrs
from kvmscope.api import MsrBatch
from kvmscope.errors import InvalidValueError, MsrLookupError


@pytest.mark.parametrize(
    "spec,index",
    [("MSR_PLATFORM_INFO", 0xCE), ("platform_info", 0xCE), ("IA32_ARCH_CAPABILITIES", 0x10A), ("ARCH_CAP", 0x10A),
     ("perf_cap", 0x345), ("UCODE_REV", 0x8B), ("DE_CFG", 0xC0011029), ("MSR_F10H_DECFG", 0xC0011029),
     ("VMX_BASIC", 0x480), ("VMX_VMFUNC", 0x491), ("0xce", 0xCE), ("206", 0xCE), (0x8B, 0x8B)],
)
def test_lookup_by_name_alias_or_index(spec: int | str, index: int) -> None:
    assert msrs.index_of(spec) == index, f"{spec!r} should resolve to {index:#x}"


def test_unknown_name_is_a_clear_error_with_suggestions() -> None:
    with pytest.raises(MsrLookupError, match=r"unknown MSR name 'PLATFORM_INFOO'.*PLATFORM_INFO"):
        msrs.index_of("PLATFORM_INFOO")


@pytest.mark.parametrize("bad", [-1, 1 << 32, True, 1.5])
def test_index_out_of_range_or_wrong_type(bad: object) -> None:
    with pytest.raises(InvalidValueError):
        msrs.index_of(bad)  # type: ignore[arg-type]


def test_unnamed_index_gets_a_synthetic_name() -> None:
    assert msrs.lookup(0x12345).name == "MSR_0x12345"


def test_every_feature_msr_is_named_and_the_vmx_range_has_18() -> None:
    assert len(msrs.VMX_RANGE) == 18
    for index in (*msrs.GENERIC_FEATURE_MSRS, *msrs.VMX_RANGE):
        assert index in msrs.BY_INDEX, f"feature MSR {index:#x} has no catalogue entry"
        assert msrs.BY_INDEX[index].feature


def test_this_hosts_index_list_is_named() -> None:
    host_list = [0x174, 0x175, 0x176, 0xC0000081, 0xC0000083, 0xC0000102, 0xC0000084, 0xC0000082, 0x10, 0x277,
                 0xC0010117, 0x1D9, 0x1DB, 0x1DC, 0x1DD, 0x1DE, 0x12, 0x11, 0x4B564D01, 0x4B564D00, 0x4B564D02,
                 0x4B564D03, 0x4B564D04, 0x4B564D06, 0x4B564D07, 0x3B, 0x6E0, 0x10A, 0x345, 0x1A0, 0x17A, 0x17B,
                 0x34, 0xCE, 0x140, 0xC001011F, 0x1FC, 0x8B, 0xC0010015, 0x4B564D05]
    unnamed = [hex(i) for i in host_list if i not in msrs.BY_INDEX]
    assert not unnamed, f"MSRs in this host's KVM_GET_MSR_INDEX_LIST without a name: {unnamed}"


def test_decode_arch_capabilities_of_this_host() -> None:
    fields = msrs.decode_arch_capabilities(0x400000000C000069)
    on = {k for k, v in fields.items() if v is True}
    assert on == {"RDCL_NO", "SKIP_VMENTRY_L1DFLUSH", "MDS_NO", "PSCHANGE_MC_NO", "GDS_NO", "RFDS_NO", "ITS_NO"}, on
    assert "other_bits" not in fields


def test_decode_perf_capabilities_fields() -> None:
    f = msrs.decode_perf_capabilities(0x4000 | 0x2000 | 0x400 | 0x5)
    assert (f["LBR_FMT"], f["PEBS_FMT"], f["FW_WRITES"], f["PEBS_BASELINE"]) == (5, 4, True, True), f


def test_decode_platform_info_and_vmx_basic() -> None:
    assert msrs.decode_platform_info(0x80000000)["CPUID_FAULT"] is True
    b = msrs.decode_vmx_basic(0x03DA050000000013)
    assert (b["REVISION_ID"], b["VMCS_SIZE"], b["MEMORY_TYPE"], b["INOUT"], b["TRUE_CTLS"]) == (0x13, 0x500, 6, True,
                                                                                                 True), b


def test_batch_refuses_bad_values_and_changes_nothing() -> None:
    with pytest.raises(InvalidValueError, match="64 bits"):
        MsrBatch([(0xCE, 1 << 64)])
    with pytest.raises(InvalidValueError):
        MsrBatch([(0xCE, -1)])
    with pytest.raises(MsrLookupError):
        MsrBatch(["NO_SUCH_MSR"])
    b = MsrBatch({"PLATFORM_INFO": 5, 0x8B: 7})
    assert list(b) == [(0xCE, 5), (0x8B, 7)]
    with pytest.raises(InvalidValueError):
        b.set_value(0, 1 << 64)
    assert b[0] == (0xCE, 5), "a refused set_value must leave the entry as it was"


@pytest.mark.parametrize(("index", "name"), [(0xFE, "MSR_MTRRcap"), (0x2FF, "MSR_MTRRdefType"),
                                             (0x200, "MSR_MTRRphysBase0"), (0x213, "MSR_MTRRphysMask9"),
                                             (0x250, "MSR_MTRRfix64K_00000"), (0x259, "MSR_MTRRfix16K_A0000"),
                                             (0x26F, "MSR_MTRRfix4K_F8000")])
def test_the_mtrrs_have_their_names(index: int, name: str) -> None:
    # Firecracker's boot MSRs include MTRRdefType: reports named it MSR_0x2ff.
    assert msrs.name_of(index) == name and msrs.lookup(name).index == index, (
        f"{index:#x}: expected {name}, saw {msrs.name_of(index)}")
