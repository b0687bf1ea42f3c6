"""Backend ``model``: a software KVM that applies the kernel's vCPU-model rules for a kernel version and host profile."""

from __future__ import annotations

from pathlib import Path

from ..kernel import proposal, rulesets
from ..kernel.profile import Profile, load
from .system import ModelSystem
from .vcpu import ModelLimitation, ModelVcpu
from .vm import ModelVm


def open_model(kernel: str | None = None, profile: str | Path | Profile | None = None) -> ModelSystem:
    """The model for ``profile`` (a shipped name, a JSON path, or a Profile; default: this project's PVM host) under
    the ruleset of ``kernel`` (default: the profile's kernel)."""
    prof = profile if isinstance(profile, Profile) else load(profile)
    if kernel is not None and proposal.is_proposal(kernel):  # a proposed rule (TOML) stands in for a version
        return ModelSystem(prof, proposal.load(kernel))
    version = kernel or prof.ruleset
    system = ModelSystem(prof, rulesets.resolve(version))
    system.warning = rulesets.newer_than_known(version)
    return system


__all__ = ["ModelLimitation", "ModelSystem", "ModelVcpu", "ModelVm", "Profile", "open_model"]
