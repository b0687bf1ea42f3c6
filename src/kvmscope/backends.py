"""Which KVM to open: the one chooser behind ``kvmscope.open()``, the CLI's ``--backend`` and ``kvmscope check``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidValueError, KvmscopeError, KvmUnavailableError

if TYPE_CHECKING:
    from .api import System
    from .kernel.profile import Profile

CHOICES = ("auto", "linux", "model")


def check_kernel(version: str) -> None:
    """Refuse a kernel version the model has no ruleset for (typed error), before anything is opened."""
    from .kernel import proposal, rulesets

    if proposal.is_proposal(version):
        proposal.load(version)
    else:
        rulesets.resolve(version)


def choose(backend: str = "auto", *, kernel: str | None = None, profile: str | Path | Profile | None = None,
           path: str | None = None, note: Callable[[str], None] | None = None) -> tuple[System, str | None]:
    """Open ``backend``; returns the system and, when ``auto`` fell back to the model, why (else None). ``note``
    hears warnings worth telling a user (a kernel newer than the newest ruleset).

    ``auto``: the live kernel (``/dev/kvm``, or ``path``) when it is usable, else the model; a ``kernel`` ruleset or a
    host ``profile`` can only mean the model. ``model``: the model under ``kernel`` with ``profile`` (defaults: the
    profile's own kernel, the shipped ``pvm-6.18``).
    """
    if backend not in CHOICES:
        raise InvalidValueError(f"unknown backend {backend!r}: choose one of {', '.join(CHOICES)}")
    if kernel is not None and not isinstance(kernel, str):
        raise InvalidValueError(f"kernel version {str(kernel)[:40]!r} is not like 6.18 or 6.18.44")
    modelled = kernel is not None or profile is not None
    if backend == "auto" and modelled:
        backend = "model"
    if backend == "model":
        if path is not None:
            raise InvalidValueError("path names a /dev/kvm: the model backend takes kernel and profile")
        from .model import open_model

        model = open_model(kernel=kernel, profile=profile)
        if model.warning and note is not None:
            note(model.warning)
        return model, None
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


def cache_dir() -> Path:
    """Where this host's captured profile is kept: ``$KVMSCOPE_CACHE``, else ``$XDG_CACHE_HOME/kvmscope``, else
    ``~/.cache/kvmscope``."""
    if os.environ.get("KVMSCOPE_CACHE"):
        return Path(os.environ["KVMSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmscope"


def default_profile(live: System | None = None) -> tuple[str | Profile, str]:
    """The host profile the model uses when none is given, and a sentence saying which and why.

    With a usable /dev/kvm (``live``, or opened here): this host's profile, captured once and cached under
    :func:`cache_dir` (keyed by kernel release, vendor module, module parameters, kvmscope's version and the ruleset
    label of the kernel, so a new kernel, module option or known backport captures again); without one: the shipped
    ``pvm-6.18``.
    """
    # hashlib and json are imported here, not at the top: every import of kvmscope would otherwise map their C
    # libraries (libcrypto, _hashlib, _blake2, _json: 20 mappings), and KVM_CREATE_VM's cost grows with the mappings.
    import hashlib
    import json

    from . import __version__
    from .kernel import rulesets
    from .kernel.profile import CAPTURE_FORMAT, DEFAULT_PROFILE, load, shipped

    system = live
    if system is None:
        try:
            system, _ = choose("linux")
        except KvmUnavailableError as e:
            return DEFAULT_PROFILE, (f"no usable /dev/kvm ({e}): the model uses the shipped profile {DEFAULT_PROFILE}; "
                                     f"choose another with --profile ({', '.join(shipped())}, or a FILE from "
                                     "`kvmscope probe --save FILE`)")
    try:
        info = system.host_info()
        # the ruleset label a capture records for this kernel is part of the key: a stable backport the rules learn
        # (a new label for the same kernel, such as 6.18.17 for 6.18.44) captures again
        try:
            label = rulesets.resolve(str(info.get("kernel_release") or "")).version
        except KvmscopeError:
            label = None
        key = json.dumps([__version__, CAPTURE_FORMAT, info.get("kernel_release"), info.get("vendor_module"),
                          info.get("module_parameters"), label], sort_keys=True, default=str)
        path = cache_dir() / f"host-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            try:
                return load(path), f"the model uses this host's profile, captured from /dev/kvm earlier ({path})"
            except KvmscopeError:
                pass  # an unreadable cache is captured again
        from .capture import capture

        profile = capture(system)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            profile.save(tmp)
            os.replace(tmp, path)
            where = f"cached in {path}"
        except OSError as e:
            where = f"not cached: {path.parent}: {e.strerror}"
        return profile, f"the model uses this host's profile, captured from /dev/kvm now ({where})"
    finally:
        if live is None:
            system.close()


def live_with_explainer(profile: str | Path | Profile | None = None) -> tuple[System, System | None]:
    """The live kernel, and the model of this host (``profile``; default: this host's captured profile) to replay
    alongside it and explain its refusals (the kernel does not say why): None when the profile is of another vendor
    module, whose rules would explain nothing. A given profile is read before /dev/kvm is opened."""
    model = choose("model", profile=profile)[0] if profile is not None else None
    try:
        system, _ = choose("linux")
    except BaseException:
        if model is not None:
            model.close()
        raise
    if model is None:
        try:
            model, _ = choose("model", profile=default_profile(system)[0])
        except BaseException:
            system.close()
            raise
    if model.host_info().get("vendor") != system.host_info().get("vendor"):
        model.close()
        return system, None
    return system, model
