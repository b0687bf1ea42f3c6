"""``/dev/kvm``: the system ioctls."""

from __future__ import annotations

import errno
import os
import struct
from typing import ClassVar

from .. import uapi
from ..api import CpuidEntry, MsrBatch, System
from ..errors import InvalidValueError, KvmError, KvmUnavailableError
from ._cpuid import decode_cpuid, encode_cpuid
from ._ioctl import ioctl_buf, ioctl_int
from .vm import LinuxVm

DEFAULT_PATH = "/dev/kvm"


def open_system(path: str = DEFAULT_PATH) -> LinuxSystem:
    """Open ``/dev/kvm``; raise :class:`KvmUnavailableError` saying whether it is missing or not permitted."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailableError(
            path,
            "missing",
            f"{path} does not exist: this kernel has no KVM, or its module is not loaded "
            "(load kvm_intel, kvm_amd or your vendor module, or run where hardware virtualization is exposed)",
        ) from None
    except PermissionError:
        raise KvmUnavailableError(path, "permission", _permission_message(path)) from None
    except OSError as e:
        raise KvmUnavailableError(path, "error", f"cannot open {path}: {e.strerror}") from None
    return LinuxSystem(fd, path)


def _permission_message(path: str) -> str:
    import grp
    import pwd
    import stat

    try:
        st = os.stat(path)
        owner = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
        where = f" (mode {stat.filemode(st.st_mode)}, owner {owner}:{group})"
    except (OSError, KeyError):
        group, where = "kvm", ""
    who = f"uid {os.getuid()}"
    if group != "root":
        fix = f"add the user to group '{group}' (sudo usermod -aG {group} $USER, then log in again) or run as root"
    else:
        fix = "run as root, or have the administrator give /dev/kvm to a 'kvm' group with mode 0660 (udev rule)"
    return f"{path} exists but this user ({who}) may not open it read-write{where}: {fix}"


class LinuxSystem(System):
    """The ``/dev/kvm`` file descriptor."""

    backend: ClassVar[str] = "linux"

    def __init__(self, fd: int, path: str = DEFAULT_PATH) -> None:
        self._fd = fd
        self.path = path
        # Answers that hold as long as this fd is open (it pins the module): asked once, for every VM made here.
        self._run_size: int | None = None
        self.memslot_limits: dict[int, tuple[int, int]] = {}  # by VM type (LinuxVm._memslot_limits)

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def describe(self) -> str:
        return f"linux backend on {self.path} (kernel {os.uname().release})"

    def host_info(self) -> dict[str, object]:
        from ..host import host_info

        return host_info()

    def api_version(self) -> int:
        """KVM_GET_API_VERSION (12 on every kernel since 2.6.22)."""
        return ioctl_int(self.fd, uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific positive value."""
        return ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (``struct kvm_run`` and the pages after it)."""
        return ioctl_int(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)

    def _index_list(self, request: int) -> list[int]:
        # The kernel always writes its count back and fails with E2BIG when ours is smaller: ask with 0, then again
        # with exactly that many (looping in case the list grew in between, e.g. a module reload).
        n = 0
        while True:
            buf = bytearray(4 + 4 * n)
            struct.pack_into("<I", buf, 0, n)
            try:
                ioctl_buf(self.fd, request, buf)
            except KvmError as e:
                if e.errno != errno.E2BIG:
                    raise
                n = struct.unpack_from("<I", buf)[0]
                continue
            got = struct.unpack_from("<I", buf)[0]
            return list(struct.unpack_from(f"<{got}I", buf, 4))

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs a VMM saves and restores (msrs_to_save, then emulated_msrs)."""
        return self._index_list(uapi.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs this host's KVM offers."""
        return self._index_list(uapi.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def msr_list_raw(self, request: int, nmsrs: int) -> tuple[int, list[int]]:
        """Call an index-list ioctl with a caller-chosen ``nmsrs``: return the count the kernel wrote back and the
        indices (raises :class:`KvmError` E2BIG when ``nmsrs`` is too small; the count is in ``e.detail``)."""
        if request not in (uapi.KVM_GET_MSR_INDEX_LIST, uapi.KVM_GET_MSR_FEATURE_INDEX_LIST):
            raise InvalidValueError(f"System.msr_list_raw: request must be KVM_GET_MSR_INDEX_LIST or "
                                    f"KVM_GET_MSR_FEATURE_INDEX_LIST, not {request:#x}", argument="request")
        buf = bytearray(4 + 4 * nmsrs)
        struct.pack_into("<I", buf, 0, nmsrs)
        try:
            ioctl_buf(self.fd, request, buf)
        except KvmError as e:
            count = struct.unpack_from("<I", buf)[0]
            raise KvmError(e.errno or 0, e.ioctl, f"kernel count {count}") from None
        count = struct.unpack_from("<I", buf)[0]
        return count, list(struct.unpack_from(f"<{count}I", buf, 4))

    def get_feature_msrs(self, batch: MsrBatch) -> int:
        """System-level KVM_GET_MSRS: read feature MSRs into ``batch``; returns the number read."""
        return ioctl_buf(self.fd, uapi.KVM_GET_MSRS, batch.buffer)

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID (grows its buffer on E2BIG)."""
        return self._cpuid_list(uapi.KVM_GET_SUPPORTED_CPUID)

    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID (grows its buffer on E2BIG)."""
        return self._cpuid_list(uapi.KVM_GET_EMULATED_CPUID)

    def _cpuid_list(self, request: int) -> list[CpuidEntry]:
        n = uapi.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = encode_cpuid([], capacity=n)
            try:
                ioctl_buf(self.fd, request, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return decode_cpuid(buf, struct.unpack_from("<I", buf)[0])

    def run_size(self) -> int:
        """:meth:`vcpu_mmap_size`, asked once."""
        if self._run_size is None:
            self._run_size = self.vcpu_mmap_size()
        return self._run_size

    def create_vm(self, vm_type: int = 0) -> LinuxVm:
        """KVM_CREATE_VM."""
        fd = ioctl_int(self.fd, uapi.KVM_CREATE_VM, vm_type)
        return LinuxVm(fd, self, vm_type)

