"""Facts about the host a live system runs on: kernel release, KVM vendor module, module parameters.

Read from ``os.uname()`` and ``/sys/module``; kvmscope never reads or writes the host's own MSRs (``/dev/cpu/*/msr``).
"""

from __future__ import annotations

import os
from pathlib import Path

VENDOR_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm", "kvm_pvm": "pvm"}
_INTERESTING = {
    "kvm": ("enable_pmu", "ignore_msrs", "report_ignored_msrs", "force_emulation_prefix"),
    "kvm_intel": ("nested", "ept", "unrestricted_guest", "enable_shadow_vmcs", "vpid", "enable_apicv"),
    "kvm_amd": ("nested", "npt", "avic", "lbrv", "vls"),
    "kvm_pvm": (),
}


def _read_param(module: str, name: str, sys_module: Path) -> str | None:
    try:
        return (sys_module / module / "parameters" / name).read_text().strip()
    except OSError:
        return None


def vendor_module(sys_module: Path = Path("/sys/module")) -> str | None:
    """The loaded KVM vendor module's name (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``), or None."""
    for module in VENDOR_MODULES:
        if (sys_module / module).is_dir():
            return module
    return None


def host_info(sys_module: Path = Path("/sys/module")) -> dict[str, object]:
    """Kernel release, vendor module and the module parameters that shape the vCPU model."""
    module = vendor_module(sys_module)
    params: dict[str, str] = {}
    for mod in ("kvm", module or ""):
        names = _INTERESTING.get(mod)
        if names is None:
            continue
        if mod == module and not names:
            pdir = sys_module / mod / "parameters"
            names = tuple(sorted(p.name for p in pdir.iterdir())) if pdir.is_dir() else ()
        for name in names:
            value = _read_param(mod, name, sys_module)
            if value is not None:
                params[f"{mod}.{name}"] = value
    return {
        "kernel_release": os.uname().release,
        "vendor_module": module,
        "vendor": VENDOR_MODULES.get(module or ""),
        "module_parameters": params,
    }
