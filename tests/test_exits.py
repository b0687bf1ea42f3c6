"""The exit records: tuples underneath (built with one C-level call in the run loop), with the API of the dataclasses
they replaced: named read-only fields, keyword construction, equality between exits of one class only, repr, pattern
matching, copy, reply hooks."""

from __future__ import annotations

import copy
import pickle

import pytest

from kvmscope import uapi
from kvmscope.api import (
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    OtherExit,
    RdmsrExit,
    ShutdownExit,
    SystemEventExit,
    WrmsrExit,
)
from kvmscope.errors import InvalidValueError

OUT = uapi.KVM_EXIT_IO_OUT


def test_fields_by_name_position_and_keyword() -> None:
    e = IoExit(direction=OUT, size=2, port=0x10, count=3, data=b"abcdef")
    assert (e.direction, e.size, e.port, e.count, e.data) == (OUT, 2, 0x10, 3, b"abcdef"), f"fields of {e!r}"
    assert e == IoExit(OUT, 2, 0x10, 3, b"abcdef"), "positional and keyword construction give equal exits"
    assert e.is_out and e.name == "IoExit" and e.reason == uapi.KVM_EXIT_IO, f"properties of {e!r}"
    assert IoExit.__match_args__ == ("direction", "size", "port", "count", "data"), IoExit.__match_args__
    assert RdmsrExit.__match_args__ == ("index", "data", "msr_reason"), "a subclass keeps its parent's fields"
    assert OtherExit(99).name == "Exit(99)" and SystemEventExit(1, (2, 3)).type == 1


def test_equality_is_per_class_and_ignores_the_reply_hook() -> None:
    def hook(data: bytes) -> None:
        raise AssertionError("not called")

    assert IoExit(0, 1, 0x20, 1, b"", hook) == IoExit(0, 1, 0x20, 1, b""), "the reply hook is not compared"
    assert IoExit(OUT, 1, 0x10, 1, b"\0") != IoExit(OUT, 1, 0x11, 1, b"\0"), "a different port differs"
    assert IoExit(OUT, 1, 0x10, 1, b"\0") != (OUT, 1, 0x10, 1, b"\0", None), "never equal to a plain tuple"
    plain = (OUT, 1, 0x10, 1, b"\0", None)
    assert plain != IoExit(OUT, 1, 0x10, 1, b"\0"), "not from the tuple's side either"
    assert RdmsrExit(0x10, 0, 1) != WrmsrExit(0x10, 0, 1), "exits of different classes differ"
    assert HltExit() == HltExit() and HltExit() != ShutdownExit() and HltExit() != InterruptedExit()


def test_records_are_true_read_only_and_unhashable() -> None:
    for e in (HltExit(), ShutdownExit(), InterruptedExit(), FailEntryExit(1, 0), InternalErrorExit(1, ())):
        assert bool(e) and isinstance(e, Exit), f"{e!r} must be a true Exit (an empty tuple would be false)"
    e = MmioExit(0x1000, b"\1", 1, True)
    with pytest.raises(AttributeError):
        e.phys_addr = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(e)


def test_repr_copy_pickle_and_match() -> None:
    e = IoExit(OUT, 1, 0x10, 1, b"\x42")
    assert repr(e) == "IoExit(direction=1, size=1, port=16, count=1, data=b'B')", repr(e)
    assert repr(HltExit()) == "HltExit()", repr(HltExit())
    for twin in (copy.copy(e), copy.deepcopy(e), pickle.loads(pickle.dumps(e))):
        assert type(twin) is IoExit and twin == e, f"expected a copy of {e!r}, saw {twin!r}"
    match e:
        case IoExit(direction, size, port=0x10):
            seen = (direction, size)
        case _:
            seen = None
    assert seen == (OUT, 1), f"class pattern on IoExit: expected (OUT, 1), saw {seen}"


def test_reply_hooks() -> None:
    got: list[object] = []
    in_exit = IoExit(uapi.KVM_EXIT_IO_IN, 2, 0x20, 1, b"", got.append)
    in_exit.reply(b"xy")
    assert got == [b"xy"], f"the IN reply reaches the hook: {got}"
    with pytest.raises(InvalidValueError):
        in_exit.reply(b"x")
    with pytest.raises(InvalidValueError):
        IoExit(OUT, 1, 0x10, 1, b"\0").reply(b"\0")
    msr = RdmsrExit(0x10, 0, 1, lambda error, value: got.append((error, value)))
    msr.reply(7)
    msr.inject_gp()
    assert got[1:] == [(0, 7), (1, 0)], f"RDMSR reply then #GP: {got[1:]}"
    with pytest.raises(InvalidValueError):
        WrmsrExit(0x10, 1, 1).reply()
