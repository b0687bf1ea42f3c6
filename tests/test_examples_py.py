"""The Python examples run as documented."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from kvmscope.linux import LinuxSystem

EXAMPLE = Path(__file__).parent.parent / "examples" / "guest_arch_caps.py"


def test_guest_arch_caps_on_live_kernel(live: LinuxSystem, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE))["main"]("linux")
    assert "raised #GP" in capsys.readouterr().out


def test_guest_arch_caps_on_intel_model(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "model", "intel-spr"])
    runpy.run_path(str(EXAMPLE))["main"]("model", "intel-spr")
    out = capsys.readouterr().out
    assert "guest read IA32_ARCH_CAPABILITIES = 0x400000000c08e0eb" in out and "  RDCL_NO" in out, out


SAVE_RESTORE = Path(__file__).parent.parent / "examples" / "save_restore.py"


def test_save_restore_same_on_both_backends(live: LinuxSystem, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for backend in ("linux", "model"):
        assert runpy.run_path(str(SAVE_RESTORE))["main"](backend) == 0, f"{backend}: restored state differs"
        outputs.append(capsys.readouterr().out.splitlines()[1:])  # after the backend's description
    assert outputs[0] == outputs[1], f"live and model differ:\n{outputs[0]}\n{outputs[1]}"
    assert "restored state reads back: all of it" in outputs[0]
    assert outputs[0][-2:] == ["restored VM writes: [4, 5]", "memory[0x2000] = 5"], outputs[0]
