"""Argument checks for every public method of System, Vm and Vcpu, the same on both backends.

An argument is checked against the C type that carries it to the kernel (a field of a ``uapi`` struct, or the ioctl's
own ``int`` argument) before any ioctl or model rule runs: a wrong type raises :class:`InvalidTypeError` (also a
``TypeError``), a value the carrier cannot hold raises :class:`InvalidValueError`. Each names the method, the argument,
what it takes and what it got. :func:`install` wraps a backend class's methods with them (``api.py`` calls it for every
subclass of System, Vm and Vcpu); the hot paths (``run``, ``run_raw``, ``get_msrs``, ``set_msrs``) are not wrapped: they
check on their cold paths (``MsrBatch`` construction, the except branch of a failed call).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from . import uapi
from .errors import InvalidTypeError, InvalidValueError

Check = Callable[[str, str, Any], None]  # (method, argument, value): raise, or return if the value is fine

def _given(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def type_error(where: str, name: str, expected: str, value: object) -> InvalidTypeError:
    return InvalidTypeError(f"{where}: {name} must be {expected}, not {_given(value)}", argument=name,
                            expected=expected, given=value)


def value_error(where: str, name: str, expected: str, value: object) -> InvalidValueError:
    return InvalidValueError(f"{where}: {name} must be {expected}, not {_given(value)}", argument=name,
                             expected=expected, given=value)


def int_range(lo: int, hi: int, carrier: str) -> Check:
    """An int in ``lo..hi`` (``carrier``: the C type that holds it, for the message). bool is refused: ``True`` as a
    vCPU id or a size is a mistake, not a 1."""
    expected = f"an int in {lo:#x}..{hi:#x} ({carrier})" if hi > 0xFFFF else f"an int in {lo}..{hi} ({carrier})"

    def check(where: str, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise type_error(where, name, expected, value)
        if not lo <= value <= hi:
            raise value_error(where, name, expected, value)

    return check


def ctype_range(ctype: Any) -> tuple[int, int]:
    """The values a ctypes integer type holds: ``c_uint32`` gives ``(0, 2**32 - 1)``, ``c_int32`` the signed range."""
    bits = 8 * ctypes.sizeof(ctype)
    if ctype(-1).value > 0:  # unsigned: -1 wraps to the largest value
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def field(cls: type[ctypes.Structure], name: str) -> Check:
    """An int that fits ``cls.name`` (for an array field, one element), derived from the uapi struct itself."""
    ctype = dict(cls._fields_)[name]  # type: ignore[arg-type]
    ctype = getattr(ctype, "_type_", ctype) if issubclass(ctype, ctypes.Array) else ctype
    lo, hi = ctype_range(ctype)
    kind = f"{'u' if lo == 0 else 's'}{8 * ctypes.sizeof(ctype)}"
    return int_range(lo, hi, f"{cls.__name__}.{name}, {kind}")


# fcntl.ioctl carries an integer argument as a C int: a KVM_CAP_* number, a vCPU id, a TSC frequency. None of them is
# negative (the kernel reads them as unsigned long or u32), so the domain is 0..INT_MAX.
IOCTL_INT = int_range(0, ctype_range(ctypes.c_int)[1], "the ioctl's int argument")
# struct kvm_vcpu.vcpu_id is an int (include/linux/kvm_host.h): no vCPU id above INT_MAX can exist.
VCPU_ID = int_range(0, ctype_range(ctypes.c_int)[1], "struct kvm_vcpu.vcpu_id, int")
# An unsigned long (KVM_SET_TSS_ADDR's argument) on x86-64.
ULONG = int_range(*ctype_range(ctypes.c_ulong), "unsigned long")
# A guest-physical address or a length in guest memory: the u64 of struct kvm_userspace_memory_region.
GPA = field(uapi.kvm_userspace_memory_region, "guest_phys_addr")
LENGTH = field(uapi.kvm_userspace_memory_region, "memory_size")


def optional(inner: Check) -> Check:
    def check(where: str, name: str, value: Any) -> None:
        if value is not None:
            inner(where, name, value)

    return check


def struct(cls: type[ctypes.Structure]) -> Check:
    """An instance of the ctypes struct ``cls`` (the ioctl copies exactly its bytes)."""

    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, cls):
            raise type_error(where, name, f"a kvmscope.uapi.{cls.__name__}", value)

    return check


def byteslike(where: str, name: str, value: Any) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise type_error(where, name, "bytes (or bytearray, memoryview)", value)


def flag(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return
    raise type_error(where, name, "a bool", value)


def sequence(element: Check, expected: str, max_len: int | None = None) -> Check:
    """A list or tuple (not a str, bytes or a lone value) of at most ``max_len`` elements, each passing ``element``."""

    def check(where: str, name: str, value: Any) -> None:
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            raise type_error(where, name, f"a list of {expected}", value)
        if max_len is not None and len(value) > max_len:
            raise value_error(where, name, f"a list of at most {max_len} {expected}", f"{len(value)} of them")
        for i, item in enumerate(value):
            element(where, f"{name}[{i}]", item)

    return check


def instance(cls: type | tuple[type, ...], expected: str) -> Check:
    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, cls):
            raise type_error(where, name, expected, value)

    return check


_FILTER_FLAGS = field(uapi.kvm_msr_filter_range, "flags")
_FILTER_BASE = field(uapi.kvm_msr_filter_range, "base")
_FILTER_NMSRS = field(uapi.kvm_msr_filter_range, "nmsrs")


def filter_range(where: str, name: str, value: Any) -> None:
    """One ``(flags, base, nmsrs, bitmap)`` of KVM_X86_SET_MSR_FILTER, each part fitting struct kvm_msr_filter_range."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise type_error(where, name, "a (flags, base, nmsrs, bitmap) tuple", value)
    for part, check, item in zip(("flags", "base", "nmsrs"), (_FILTER_FLAGS, _FILTER_BASE, _FILTER_NMSRS), value[:3],
                                 strict=True):
        check(where, f"{name}.{part}", item)
    byteslike(where, f"{name}.bitmap", value[3])
    # The kernel copies BITS_TO_LONGS(nmsrs) longs of bitmap when that is at most KVM_MSR_FILTER_MAX_BITMAP_SIZE
    # (kvm_add_msr_filter, x86.c:6373-6378 in 6.12): the bitmap given must cover the nmsrs it claims.
    nmsrs, bitmap = value[2], value[3]
    if 0 < nmsrs <= 8 * uapi.KVM_MSR_FILTER_MAX_BITMAP_SIZE and len(bitmap) * 8 < nmsrs:
        raise value_error(where, f"{name}.bitmap", f"at least {(nmsrs + 7) // 8} bytes (one bit per MSR of nmsrs "
                          f"{nmsrs})", f"{len(bitmap)} bytes")


# The value types of api.py (CpuidEntry, MsrBatch), given by api.py itself: this module sits below it.
TYPES: dict[str, type] = {}


def _checks() -> dict[str, dict[str, Check]]:
    """Each public method's checks by argument name (``*args`` is the name of a var-positional argument)."""
    CpuidEntry, MsrBatch = TYPES["CpuidEntry"], TYPES["MsrBatch"]  # noqa: N806
    u = uapi
    xsave_or_bytes = instance((u.kvm_xsave, bytes, bytearray, memoryview), "a kvmscope.uapi.kvm_xsave or bytes")
    return {
        # System
        "check_extension": {"cap": IOCTL_INT},
        "msr_list_raw": {"request": int_range(0, ctype_range(ctypes.c_ulong)[1], "an ioctl number"),
                         "nmsrs": int_range(0, (1 << 16), "kvm_msr_list.nmsrs, kvmscope's buffer of 64 Ki entries")},
        "get_feature_msrs": {"batch": instance(MsrBatch, "a kvmscope.api.MsrBatch")},
        "create_vm": {"vm_type": IOCTL_INT},
        # Vm
        "create_vcpu": {"vcpu_id": VCPU_ID},
        "add_memory": {"guest_phys_addr": GPA, "size": LENGTH,
                       "slot": optional(field(u.kvm_userspace_memory_region, "slot")),
                       "flags": field(u.kvm_userspace_memory_region, "flags")},
        "set_user_memory_region": {  # the live backend's raw KVM_SET_USER_MEMORY_REGION: ctypes would truncate
            "slot": field(u.kvm_userspace_memory_region, "slot"), "flags": field(u.kvm_userspace_memory_region, "flags"),
            "guest_phys_addr": GPA, "size": LENGTH, "host_addr": field(u.kvm_userspace_memory_region, "userspace_addr")},
        "has_memory": {"guest_phys_addr": optional(GPA), "length": LENGTH},
        "memory": {"guest_phys_addr": GPA, "length": LENGTH},
        "read_memory": {"guest_phys_addr": GPA, "length": LENGTH},
        "write_memory": {"guest_phys_addr": GPA, "data": byteslike},
        "enable_cap": {"cap": field(u.kvm_enable_cap, "cap"), "*args": field(u.kvm_enable_cap, "args"),
                       "flags": field(u.kvm_enable_cap, "flags")},
        "set_msr_filter": {"flags": field(u.kvm_msr_filter, "flags"),
                           "ranges": sequence(filter_range, "(flags, base, nmsrs, bitmap) tuples",
                                              u.KVM_MSR_FILTER_MAX_RANGES)},
        "set_tss_addr": {"addr": ULONG},
        "set_identity_map_addr": {"addr": int_range(*ctype_range(ctypes.c_uint64), "u64")},
        "get_irqchip": {"chip_id": field(u.kvm_irqchip, "chip_id")},
        "set_irqchip": {"chip": struct(u.kvm_irqchip)},
        "irq_line": {"irq": field(u.kvm_irq_level, "irq"), "level": field(u.kvm_irq_level, "level")},
        "irq_line_status": {"irq": field(u.kvm_irq_level, "irq"), "level": field(u.kvm_irq_level, "level")},
        "create_pit2": {"flags": field(u.kvm_pit_config, "flags")},
        "set_pit2": {"state": struct(u.kvm_pit_state2)},
        "signal_msi": {"address": int_range(*ctype_range(ctypes.c_uint64), "kvm_msi.address_hi:address_lo, u64"),
                       "data": field(u.kvm_msi, "data"), "flags": field(u.kvm_msi, "flags"),
                       "devid": field(u.kvm_msi, "devid")},
        "set_gsi_routing": {"entries": sequence(struct(u.kvm_irq_routing_entry), "kvm_irq_routing_entry")},
        "irqfd": {"fd": field(u.kvm_irqfd, "fd"), "gsi": field(u.kvm_irqfd, "gsi"),
                  "flags": field(u.kvm_irqfd, "flags"), "resamplefd": field(u.kvm_irqfd, "resamplefd")},
        "ioeventfd": {"fd": field(u.kvm_ioeventfd, "fd"), "addr": field(u.kvm_ioeventfd, "addr"),
                      "length": field(u.kvm_ioeventfd, "len"), "datamatch": field(u.kvm_ioeventfd, "datamatch"),
                      "flags": field(u.kvm_ioeventfd, "flags")},
        "get_dirty_log": {"slot": field(u.kvm_dirty_log, "slot")},
        "set_clock": {"data": struct(u.kvm_clock_data)},
        "register_coalesced_mmio": {"addr": field(u.kvm_coalesced_mmio_zone, "addr"),
                                    "size": field(u.kvm_coalesced_mmio_zone, "size"), "pio": flag},
        "unregister_coalesced_mmio": {"addr": field(u.kvm_coalesced_mmio_zone, "addr"),
                                      "size": field(u.kvm_coalesced_mmio_zone, "size"), "pio": flag},
        "set_tsc_khz": {"khz": IOCTL_INT},
        # Vcpu
        "set_regs": {"regs": struct(u.kvm_regs)},
        "set_sregs": {"sregs": struct(u.kvm_sregs)},
        "get_cpuid": {"max_entries": field(u.kvm_cpuid2, "nent")},
        "set_cpuid": {"entries": sequence(instance(CpuidEntry, "a kvmscope.api.CpuidEntry"), "CpuidEntry")},
        "set_fpu": {"fpu": struct(u.kvm_fpu)},
        "set_lapic": {"lapic": struct(u.kvm_lapic_state)},
        "set_xsave": {"xsave": xsave_or_bytes},
        # The kernel writes KVM_CAP_XSAVE2's size (an XSAVE area: at most a few dozen KiB) whatever ``size`` is; the
        # method returns ``size`` bytes, so it is bounded where a buffer still makes sense.
        "get_xsave2": {"size": int_range(ctypes.sizeof(u.kvm_xsave), 1 << 20, "an XSAVE area of 4 KiB..1 MiB")},
        "set_xcrs": {"xcrs": struct(u.kvm_xcrs)},
        "set_debugregs": {"debugregs": struct(u.kvm_debugregs)},
        "set_vcpu_events": {"events": struct(u.kvm_vcpu_events)},
        "set_mp_state": {"mp_state": field(u.kvm_mp_state, "mp_state")},
        "setup_mce": {"mcg_cap": int_range(*ctype_range(ctypes.c_uint64), "KVM_X86_SETUP_MCE's u64")},
        "get_nested_state": {"size": int_range(ctypes.sizeof(u.kvm_nested_state), 1 << 20,
                                               "kvm_nested_state.size: 128 bytes..1 MiB")},
        "set_nested_state": {"state": byteslike},
        "set_guest_debug": {"control": field(u.kvm_guest_debug, "control"),
                            "debugreg": sequence(field(u.kvm_guest_debug_arch, "debugreg"), "u64 values", 8)},
        "translate": {"linear_address": field(u.kvm_translation, "linear_address")},
        "interrupt": {"irq": field(u.kvm_interrupt, "irq")},
        "set_signal_mask": {"sigset": optional(byteslike)},
    }


_CHECKS: dict[str, dict[str, Check]] | None = None


def checks() -> dict[str, dict[str, Check]]:
    global _CHECKS
    if _CHECKS is None:
        _CHECKS = _checks()
    return _CHECKS


def checked(func: Callable[..., Any], where: str, spec: Mapping[str, Check]) -> Callable[..., Any]:
    """``func`` with its arguments checked first. The wrapper is generated with ``func``'s own parameters (defaults
    included), so that a call costs one extra frame and one call per checked argument, not a loop over ``*args``."""
    import inspect

    params = list(inspect.signature(func).parameters.values())[1:]
    namespace: dict[str, Any] = {"_func": func, "_where": where}
    head, call, lines = [], [], []
    star = False
    for p in params:
        if p.default is not p.empty:
            namespace[f"_d_{p.name}"] = p.default
        default = f"=_d_{p.name}" if p.default is not p.empty else ""
        if p.kind is p.VAR_POSITIONAL:
            head.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
            if "*args" in spec:
                namespace["_c_args"] = spec["*args"]
                lines.append(f"    for _i, _v in enumerate({p.name}):\n        _c_args(_where, f'args[{{_i}}]', _v)")
            continue
        if p.kind is p.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            head.append("*")
            star = True
        head.append(f"{p.name}{default}")
        call.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
        if p.name in spec:
            namespace[f"_c_{p.name}"] = spec[p.name]
            lines.append(f"    _c_{p.name}(_where, {p.name!r}, {p.name})")
    source = (f"def wrapper(self, {', '.join(head)}):\n" + "\n".join(lines)
              + f"\n    return _func(self, {', '.join(call)})\n")
    exec(source, namespace)  # noqa: S102 - code built above from the signature's parameter names only
    wrapper: Any = functools.wraps(func)(namespace["wrapper"])
    wrapper.__kvmscope_checked__ = True
    return cast(Callable[..., Any], wrapper)


def install(cls: type, kind: str) -> None:
    """Wrap every method of ``cls`` that has checks (once: a subclass of a wrapped class wraps only its overrides)."""
    for name, spec in checks().items():
        func = getattr(cls, name, None)
        if func is None or not callable(func) or getattr(func, "__kvmscope_checked__", False):
            continue
        if getattr(func, "__isabstractmethod__", False):
            continue
        setattr(cls, name, checked(func, f"{kind}.{name}", spec))
