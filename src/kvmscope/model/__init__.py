"""Backend ``model``: a software KVM that applies the kernel's vCPU-model rules for a kernel version and host profile."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidTypeError
from ..kernel import proposal, rulesets
from ..kernel.profile import Profile, load
from .system import ModelSystem
from .vcpu import ModelLimitation, ModelVcpu
from .vm import ModelVm


def open_model(kernel: str | None = None, profile: str | Path | Profile | None = None) -> ModelSystem:
    """The model for ``profile`` (a shipped name, a JSON path, or a Profile; default: this project's PVM host) under
    the ruleset of ``kernel`` (default: the profile's kernel)."""
    if kernel is not None and not isinstance(kernel, str):
        raise InvalidTypeError(f"open_model: kernel must be a version such as '6.18' (a str) or None, not "
                               f"{type(kernel).__name__} {kernel!r:.60}", argument="kernel", expected="a str or None",
                               given=kernel)
    prof = profile if isinstance(profile, Profile) else load(profile)
    if kernel is not None and proposal.is_proposal(kernel):  # a proposed rule (TOML) stands in for a version
        proposed = proposal.load(kernel)
        system = ModelSystem(prof, proposed)
        system.warning = proposed.warning  # a base newer than the newest ruleset is noted as --kernel is
        return system
    version = kernel or prof.ruleset
    system = ModelSystem(prof, rulesets.resolve(version))
    system.warning = rulesets.newer_than_known(version)
    return system


__all__ = ["ModelLimitation", "ModelSystem", "ModelVcpu", "ModelVm", "Profile", "open_model"]
