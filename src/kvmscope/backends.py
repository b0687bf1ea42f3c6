"""Which KVM to open: the one chooser behind ``kvmscope.open()``, the CLI's ``--backend`` and ``kvmscope check``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidValueError, KvmUnavailableError

if TYPE_CHECKING:
    from .api import System
    from .kernel.profile import Profile

CHOICES = ("auto", "linux", "model")


def choose(backend: str = "auto", *, kernel: str | None = None, profile: str | Path | Profile | None = None,
           path: str | None = None) -> tuple[System, str | None]:
    """Open ``backend``; returns the system and, when ``auto`` fell back to the model, why (else None).

    ``auto``: the live kernel (``/dev/kvm``, or ``path``) when it is usable, else the model; a ``kernel`` ruleset or a
    host ``profile`` can only mean the model. ``model``: the model under ``kernel`` with ``profile`` (defaults: the
    profile's own kernel, the shipped ``pvm-6.18``).
    """
    if backend not in CHOICES:
        raise InvalidValueError(f"unknown backend {backend!r}: choose one of {', '.join(CHOICES)}")
    if kernel is not None and (not isinstance(kernel, str) or len(kernel) > 32):  # "6." and 5,000 nines, say
        raise InvalidValueError(f"kernel version {str(kernel)[:40]!r} is not like 6.18 or 6.18.44")
    modelled = kernel is not None or profile is not None
    if backend == "auto" and modelled:
        backend = "model"
    if backend == "model":
        if path is not None:
            raise InvalidValueError("path names a /dev/kvm: the model backend takes kernel and profile")
        from .model import open_model

        return open_model(kernel=kernel, profile=profile), None
    if modelled:
        raise InvalidValueError("a kernel ruleset or host profile chooses the model; the linux backend takes neither")
    from .linux import open_system  # looked up at each call: tests replace it

    options = {} if path is None else {"path": path}
    if backend == "linux":
        return open_system(**options), None
    try:
        return open_system(**options), None
    except KvmUnavailableError as e:
        from .model import open_model

        return open_model(), str(e)


def live_with_explainer(profile: str | Path | None = None) -> tuple[System, System | None]:
    """The live kernel, and the model of this host (``profile``) to replay alongside it and explain its refusals (the
    kernel does not say why): None when the profile is of another vendor module, whose rules would explain nothing."""
    model, _ = choose("model", profile=profile)  # a bad profile is refused before /dev/kvm is opened
    try:
        system, _ = choose("linux")
    except BaseException:
        model.close()
        raise
    if model.host_info().get("vendor") != system.host_info().get("vendor"):
        model.close()
        return system, None
    return system, model
