"""Firecracker's custom CPU template format, written from its description (docs/cpu_templates/cpu-templates.md and
schema.json): bitmaps, numbers, capabilities, unknown fields, round trips, and errors that name line, field and
character."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmscope.template import (
    Bitmap,
    Capability,
    CpuidModifier,
    LeafModifier,
    MsrModifier,
    Template,
    TemplateError,
    load,
    parse,
    parse_bitmap,
    parse_number,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "templates").glob("*.json"))


def test_bitmap_reads_right_to_left_with_implied_x() -> None:
    b = parse_bitmap("0b10x", 32)
    assert (b.mask, b.value) == (0b110, 0b100), f"expected mask 0b110 value 0b100, got {b}"
    assert parse_bitmap("10x", 32) == b, "the 0b prefix is optional"
    assert parse_bitmap("0b1_0_x", 32) == b, "'_' separates and is skipped"
    assert b.apply(0xFFFF_FFFF) == 0xFFFF_FFFD, f"(old & ~filter) | value: got 0x{b.apply(0xFFFFFFFF):x}"
    assert b.apply(0) == 0b100, f"(0 & ~filter) | value: got {b.apply(0):#b}"


def test_bitmap_firecracker_doc_example() -> None:
    # The leaf 0x1 eax example of cpu-templates.md: which bits are cleared, set and left intact.
    b = parse_bitmap("0bxxxx000000000011xx00011011110010", 32)
    assert b.mask & ~b.value == 0b00001111111111000011100100001101, f"cleared bits: {b.mask & ~b.value:#034b}"
    assert b.value == 0b00000000000000110000011011110010, f"set bits: {b.value:#034b}"
    assert ~b.mask & 0xFFFFFFFF == 0b11110000000000001100000000000000, f"intact bits: {~b.mask & 0xFFFFFFFF:#034b}"


def test_bitmap_full_width_and_too_long() -> None:
    assert parse_bitmap("1" * 64, 64).mask == (1 << 64) - 1
    with pytest.raises(ValueError, match=r"too long: character 1 \('1'\)"):
        parse_bitmap("1" * 65, 64)
    with pytest.raises(ValueError, match=r"too long: character 3 \('_'\)"):
        parse_bitmap("0b_" + "0" * 32, 32)  # Firecracker counts a '_' beyond the width as too long too
    assert parse_bitmap("0b" + "0" * 32 + "", 32).mask == 0xFFFFFFFF
    with pytest.raises(ValueError, match=r"character 4 \('2'\) is not 0, 1, x or _"):
        parse_bitmap("0b12", 32)
    with pytest.raises(ValueError, match=r"character 1 \('X'\)"):
        parse_bitmap("X", 32)


def test_numbers_need_a_prefix() -> None:
    assert parse_number("0x10a") == 0x10A and parse_number("0b101") == 5 and parse_number("0xFF") == 255
    assert parse_number("0x+1") == 1, "Rust's from_str_radix takes one leading '+'"
    for bad, why in (("10a", "must start with 0x"), ("0X1", "must start with 0x"), ("0x", "not a hexadecimal"),
                     ("0b102", "character 5"), ("0x1_0", "character 4"), ("0x100000000", "does not fit 32 bits")):
        with pytest.raises(ValueError, match=why):
            parse_number(bad)


def error_of(text: str) -> str:
    with pytest.raises(TemplateError) as e:
        parse(text, "t.json")
    return str(e.value)


def test_errors_name_file_line_field_and_character() -> None:
    text = '{\n "msr_modifiers": [\n  {"addr": "0x10a",\n   "bitmap": "0b1z"}\n ]\n}'
    assert error_of(text) == "t.json:4: field msr_modifiers[0].bitmap: character 4 ('z') is not 0, 1, x or _"
    assert error_of('{"cpu_template": []}').startswith("t.json:1: field cpu_template: unknown field; expected one")
    msg = error_of('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0}]}')
    assert msg == "t.json:1: field cpuid_modifiers[0].modifiers: missing (required)", msg
    msg = error_of('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": '
                   '[{"register": "ekx", "bitmap": "0b1"}]}]}')
    assert "modifiers[0].register: 'ekx' is not one of eax, ebx, ecx, edx" in msg, msg
    msg = error_of('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": true, "modifiers": []}]}')
    assert "field cpuid_modifiers[0].flags: expected an integer" in msg, msg
    msg = error_of('{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1", "value": 1}]}')
    assert "field msr_modifiers[0].value: unknown field" in msg, msg
    assert error_of('{"kvm_capabilities": [56]}').startswith("t.json:1: field kvm_capabilities[0]: expected a string")
    assert "not a capability" in error_of('{"kvm_capabilities": ["!x"]}')
    assert error_of('{"a": 1,\n "a": 2}') == "t.json:2: duplicate key 'a'"
    assert error_of('{"msr_modifiers": [],}').startswith("t.json:1: not valid JSON")
    assert error_of("[]") == "t.json:1: field (top level): expected an object, got a list"
    assert error_of("  ") == "t.json:1: the file is empty"


def test_capabilities() -> None:
    t = parse('{"kvm_capabilities": ["56", "!25", "+3"]}')
    assert t.kvm_capabilities == (Capability(56), Capability(25, True), Capability(3)), t.kvm_capabilities
    assert t.to_json()["kvm_capabilities"] == ["56", "!25", "3"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip(path: Path) -> None:
    t = load(path)
    again = parse(t.dumps(), "again.json")
    assert again == t, f"{path.name}: reading what kvmscope wrote gave a different template"
    assert again.dumps() == t.dumps(), "writing is stable"


def test_writes_firecracker_form() -> None:
    t = parse('{"msr_modifiers": [{"addr": "0b1010", "bitmap": "1"}], "cpuid_modifiers": [{"leaf": "0x1", '
              '"subleaf": "0x0", "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0_1"}]}]}')
    out = t.to_json()
    assert list(out) == ["kvm_capabilities", "cpuid_modifiers", "msr_modifiers"], list(out)
    assert out["msr_modifiers"] == [{"addr": "0xa", "bitmap": "0b" + "x" * 63 + "1"}], out["msr_modifiers"]
    assert out["cpuid_modifiers"][0]["modifiers"][0]["bitmap"] == "0b" + "x" * 30 + "01"


bitmaps32 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
    lambda mv: Bitmap(32, mv[0], mv[1] & mv[0]))
bitmaps64 = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(
    lambda mv: Bitmap(64, mv[0], mv[1] & mv[0]))
templates = st.builds(
    Template,
    st.lists(st.builds(Capability, st.integers(0, 2**32 - 1), st.booleans()), max_size=3).map(tuple),
    st.lists(st.builds(LeafModifier, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                       st.lists(st.builds(CpuidModifier, st.sampled_from(["eax", "ebx", "ecx", "edx"]), bitmaps32),
                                max_size=4).map(tuple)), max_size=4).map(tuple),
    st.lists(st.builds(MsrModifier, st.integers(0, 2**32 - 1), bitmaps64), max_size=4).map(tuple),
)


@given(templates)
def test_any_template_round_trips(t: Template) -> None:
    assert parse(t.dumps()) == t


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_apply_fixes_exactly_the_masked_bits(mask: int, value: int, old: int) -> None:
    b = Bitmap(64, mask, value & mask)
    new = b.apply(old)
    assert b.matches(new), "every fixed bit holds after apply"
    assert (new ^ old) & ~mask == 0, "no unfixed bit changes"
    assert parse_bitmap(b.text(), 64) == b


def test_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(TemplateError, match="not a regular file"):
        load(fifo)
    with pytest.raises(TemplateError, match="cannot read"):
        load(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_text(" " * (4 << 20) + "{}")
    with pytest.raises(TemplateError, match="larger than"):
        load(big)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"\xff": 1}')
    with pytest.raises(TemplateError, match="not UTF-8"):
        load(bad)
