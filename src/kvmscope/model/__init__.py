"""Backend ``model``: a software KVM that applies the kernel's vCPU-model rules for a kernel version and host profile."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidTypeError, KvmscopeError
from ..kernel import proposal, rulesets
from ..kernel.profile import Profile, load
from .system import ModelSystem
from .vcpu import ModelLimitation, ModelVcpu
from .vm import ModelVm


def open_model(kernel: str | None = None, profile: str | Path | Profile | None = None,
               as_captured: bool = False) -> ModelSystem:
    """The model for ``profile`` (a shipped name, a JSON path, or a Profile; default: this project's PVM host) under
    the ruleset of ``kernel`` (default: the profile's kernel); ``as_captured`` (without ``kernel``): the profile's
    values as they are, not as the mainline release of its kernel would report them (ModelSystem)."""
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
    system = ModelSystem(prof, rulesets.resolve(version), as_captured=as_captured and kernel is None)
    system.warning = rulesets.newer_than_known(version) or (None if kernel else stale_label(prof))
    return system


def stale_label(prof: Profile) -> str | None:
    """A note when a profile records a ruleset other than the one its kernel release resolves to now: a capture
    made before kvmscope learnt a backport of that kernel (``"6.18"`` for a 6.18.44 host, now 6.18.17)."""
    try:
        now, recorded = rulesets.resolve(prof.kernel_release).version, rulesets.resolve(prof.ruleset).version
    except KvmscopeError:
        return None  # a kernel release that names no version (a derived profile's, say): the ruleset stands
    if now == recorded:
        return None
    return (f"profile {prof.name} records the {recorded} rules for kernel {prof.kernel_release}, which kvmscope now "
            f"models with the {now} rules: using {recorded}; capture it again (kvmscope probe --save) or pass "
            f"--kernel {prof.kernel_release.split('-')[0]}")


__all__ = ["ModelLimitation", "ModelSystem", "ModelVcpu", "ModelVm", "Profile", "open_model"]
