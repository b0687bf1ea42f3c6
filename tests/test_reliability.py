"""Faults, concurrency and resources on the live kernel: nothing crashes, nothing leaks, nothing is lost."""

from __future__ import annotations

import errno
import os
import resource
import signal
import threading
import time

import pytest

from kvmscope import guest, uapi
from kvmscope.api import CpuidEntry, HltExit, InterruptedExit, IoExit
from kvmscope.errors import ClosedError, InvalidValueError, KvmError
from kvmscope.linux import LinuxSystem

# out 0x10, al; jmp $-2 : a guest that exits forever
PIO_LOOP = bytes([0xE6, 0x10, 0xEB, 0xFC])
# jmp $ : a guest that never exits on its own
SPIN = bytes([0xEB, 0xFE])


@pytest.fixture
def kick_signal() -> object:
    previous = signal.signal(signal.SIGUSR1, lambda *a: None)
    yield signal.SIGUSR1
    signal.signal(signal.SIGUSR1, previous)


def test_threads_run_vcpus_concurrently_while_another_kicks_them(live: LinuxSystem, kick_signal: object) -> None:
    """One thread per vCPU, each taking thousands of exits, while a third thread kicks them with a signal."""
    n_vcpus, exits_each = 2, 5000
    with live.create_vm() as vm:
        guest.ensure_memory(vm)
        vm.write_memory(guest.DEFAULT_ENTRY, PIO_LOOP)
        vcpus = [vm.create_vcpu(i) for i in range(n_vcpus)]
        for v in vcpus:
            guest.setup_real_mode(v)
        counts = [{"io": 0, "interrupted": 0, "other": 0} for _ in vcpus]
        tids: list[int] = [0] * n_vcpus
        errors: list[BaseException] = []
        started = threading.Barrier(n_vcpus + 1)

        def worker(i: int) -> None:
            tids[i] = threading.get_ident()
            started.wait()
            try:
                while counts[i]["io"] < exits_each:
                    e = vcpus[i].run()
                    key = "io" if isinstance(e, IoExit) and e.port == 0x10 else \
                        "interrupted" if isinstance(e, InterruptedExit) else "other"
                    counts[i][key] += 1
            except BaseException as e:  # reported below, with the vCPU
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_vcpus)]
        for t in threads:
            t.start()
        started.wait()
        kicks = 0
        while any(t.is_alive() for t in threads):
            for i, t in enumerate(threads):
                if t.is_alive():
                    signal.pthread_kill(tids[i], signal.SIGUSR1)
                    kicks += 1
            time.sleep(0.002)
        for t in threads:
            t.join()
    assert not errors, f"vCPU threads raised: {errors!r}"
    for i, c in enumerate(counts):
        assert c["io"] == exits_each and c["other"] == 0, f"vCPU {i}: expected {exits_each} IO exits only, saw {c}"
    assert kicks > 0
    assert sum(c["interrupted"] for c in counts) > 0, f"no kick interrupted a run ({kicks} kicks sent): {counts}"


def test_kick_a_spinning_vcpu_from_another_thread(live: LinuxSystem, kick_signal: object) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        guest.load_real_mode(vm, vcpu, SPIN)
        me = threading.get_ident()
        timer = threading.Timer(0.05, signal.pthread_kill, (me, signal.SIGUSR1))
        timer.start()
        assert isinstance(vcpu.run(), InterruptedExit), "a kicked KVM_RUN returns an interrupted exit"
        timer.join()
        # The vCPU keeps working: it entered the guest, so its model is frozen (live: counted as a run).
        assert vcpu.set_msrs({0xCE: 0}) == 0, "a signal that arrives inside the guest still counts as a run"
        guest.load_real_mode(vm, vcpu, guest.HLT)
        assert isinstance(vcpu.run(), HltExit)


def test_errnos_are_typed_and_name_the_ioctl(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.efer = 1 << 10  # LMA without LME and paging
        with pytest.raises(KvmError) as info:
            vcpu.set_sregs(sregs)
        assert (info.value.errno, info.value.ioctl) == (errno.EINVAL, "KVM_SET_SREGS")
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0, 0, 0x1000, 0x1001)  # unaligned host address
        assert (info.value.errno, info.value.ioctl) == (errno.EINVAL, "KVM_SET_USER_MEMORY_REGION")
        with pytest.raises(KvmError) as info:
            vm.enable_cap(0x7FFF)
        assert (info.value.errno, info.value.ioctl) == (errno.EINVAL, "KVM_ENABLE_CAP")
        vcpu.set_cpuid([CpuidEntry(0)])
        with pytest.raises(KvmError) as info:
            vcpu.get_cpuid(max_entries=0)
        assert (info.value.errno, info.value.ioctl) == (errno.E2BIG, "KVM_GET_CPUID2")


def test_refused_memory_regions_change_nothing(live: LinuxSystem) -> None:
    with live.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        before = list(vm.regions)
        for args in ((0x8000, 0x10000), (0x20001, 0x1000), (0x30000, 0), (0x40000, 0x1001), (-0x1000, 0x1000)):
            with pytest.raises(InvalidValueError):
                vm.add_memory(*args)
        assert vm.regions == before, "a refused region must not be added"
        vm.write_memory(0x100, b"ok")
        assert vm.read_memory(0x100, 2) == b"ok"


def test_vm_closed_under_live_vcpu_and_use_after_close(live: LinuxSystem) -> None:
    vm = live.create_vm()
    vcpu = vm.create_vcpu(0)
    guest.load_real_mode(vm, vcpu, guest.HLT)
    vm.close()
    for call in (vcpu.run, vcpu.get_regs, lambda: vcpu.set_msrs({0x8B: 1}), lambda: vm.read_memory(0, 1),
                 lambda: vm.create_vcpu(1), lambda: vcpu.get_cpuid()):
        with pytest.raises(ClosedError):
            call()


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_create_run_close_cycles_keep_fds_and_memory_flat(live: LinuxSystem) -> None:
    """1000 cycles here; `python benchmarks/soak.py 10000` runs the full count (figures in docs/reliability.md)."""

    def cycle() -> None:
        with live.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            assert isinstance(guest.run_to_hlt(vm, vcpu), HltExit)

    for _ in range(200):  # warm-up: allocator pools, caches
        cycle()
    fds, rss = len(os.listdir("/proc/self/fd")), _rss_kb()
    for _ in range(1000):
        cycle()
    assert len(os.listdir("/proc/self/fd")) == fds, "file descriptors leaked over 1000 VM cycles"
    grown = _rss_kb() - rss
    assert grown < 2048, f"resident memory grew by {grown} KiB over 1000 VM cycles"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_unprivileged_user_gets_the_permission_message() -> None:
    """Runs the binding as uid 65534 (nobody); the core is stdlib only, so the system Python is enough."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    python, setpriv = Path("/usr/bin/python3"), shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to switch to an unprivileged user")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("needs /dev/kvm (the message under test is about permission, not absence)")
    src = Path(__file__).parent.parent / "src"
    tmp = Path(tempfile.mkdtemp(prefix="kvmscope-nobody-"))  # pytest's tmp_path is private to root
    dest = tmp / "src"
    shutil.copytree(src, dest)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kvmscope.linux as L\n"
            "try:\n    L.open_system()\nexcept Exception as e:\n    print(type(e).__name__, e.reason, e)\n")
    out = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c", code,
                          str(dest)], capture_output=True, text=True, cwd="/", check=True).stdout
    shutil.rmtree(tmp)
    if "permission" not in out and os.stat("/dev/kvm").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/kvm is world read-write here")
    assert out.startswith("KvmUnavailableError permission /dev/kvm exists but this user (uid 65534)"), out


# Run in a child under a lowered RLIMIT_NOFILE: create vCPUs until the fd limit, then free two fds and retry the id.
_FD_LIMIT_CHILD = r"""
import errno, json, os, resource
from kvmscope.errors import FdLimitError
from kvmscope.linux import open_system

def nfds():
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd

system = open_system()
vm = system.create_vm()
base = nfds()
probe = [vm.create_vcpu(i) for i in range(4)]
per_vcpu = (nfds() - base) / 4
for v in probe:
    v.close()  # ids 0-3 stay taken; the fds go
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (nfds() + 24, hard))
vcpus, error = [], None
while error is None and len(vcpus) < 200:
    try:
        vcpus.append(vm.create_vcpu(4 + len(vcpus)))
    except FdLimitError as e:
        error = e
refused = 4 + len(vcpus)
out = {"made": len(vcpus), "fds_per_vcpu": per_vcpu, "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
       "error": None if error is None else [type(error).__name__, error.errno, error.ioctl, str(error)]}
again = None
try:
    vm.create_vcpu(refused)
except FdLimitError as e:
    again = e.errno
out["still_refused"] = again == errno.EMFILE
vcpus.pop().close()
vcpus.pop().close()
retry = vm.create_vcpu(refused)  # the kernel undid the refused vCPU: its id is free
out["retry"] = [refused, retry.id, retry.get_regs().rip]
del vcpus, retry
vm.close()
system.close()
print(json.dumps(out))
"""


def test_fd_limit_is_a_typed_error_one_fd_per_vcpu_and_the_id_is_not_burnt(live: LinuxSystem) -> None:
    """At ``ulimit -n`` KVM_CREATE_VCPU fails with EMFILE before the vCPU is made (kvm_main.c:4352-4354, 4373-4389 in
    6.12): FdLimitError, nothing printed at teardown, and the same id works once two fds are closed."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FD_LIMIT_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the child failed: {proc.stderr}"
    assert proc.stderr == "", f"expected nothing on stderr (no __del__ noise), saw {proc.stderr!r}"
    out = json.loads(proc.stdout)
    assert out["fds_per_vcpu"] == 1, f"expected one fd per vCPU, saw {out}"
    assert out["made"] == 24, f"expected 24 vCPUs under a limit 24 fds above the baseline, saw {out['made']}"
    name, err, ioctl, text = out["error"]
    assert (name, err, ioctl) == ("FdLimitError", errno.EMFILE, "KVM_CREATE_VCPU"), f"saw {out['error']}"
    assert f"limit of {out['limit']} open files" in text, f"expected the message to give the limit, saw {text!r}"
    assert out["still_refused"], "expected the same id refused again at the limit (EMFILE, not EEXIST)"
    refused, made_id, rip = out["retry"]
    assert made_id == refused and rip == 0xFFF0, f"expected vCPU {refused} made after the close, saw {out['retry']}"


def test_dropped_vms_and_vcpus_close_their_fds_without_the_garbage_collector(live: LinuxSystem) -> None:
    """No reference cycle between a VM and its vCPUs: dropping them closes their fds at once, with gc disabled."""
    import gc

    fds = len(os.listdir("/proc/self/fd"))
    gc.disable()
    try:
        for _ in range(50):
            vm = live.create_vm()
            vcpus = [vm.create_vcpu(i) for i in range(2)]
            del vm  # the vCPUs keep it
            assert len(os.listdir("/proc/self/fd")) == fds + 3, "expected the VM and 2 vCPU fds open"
            del vcpus
            assert len(os.listdir("/proc/self/fd")) == fds, "expected every fd closed once the vCPUs are dropped"
    finally:
        gc.enable()


def test_a_vcpu_dropped_unclosed_keeps_its_fd_until_its_vm_closes(live: LinuxSystem) -> None:
    """KVM keeps a vCPU as long as its VM: a vCPU object dropped without close() leaves its fd open with the VM (a
    caller may use it by number), and the VM closes it."""
    import fcntl

    vm = live.create_vm()
    vcpu = vm.create_vcpu(0)
    fd = vcpu.fd
    del vcpu
    regs = uapi.kvm_regs()
    fcntl.ioctl(fd, uapi.KVM_GET_REGS, regs, True)  # raises if the fd were closed (or another file's)
    assert regs.rip == 0xFFF0, f"expected the dropped vCPU's RIP at reset, saw 0x{regs.rip:x}"
    vm.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF, f"expected the fd closed with the VM, saw {info.value}"



def test_fd_limit_errnos_are_fd_limit_errors() -> None:
    """EMFILE and ENFILE from any fd-making ioctl are FdLimitError (a KvmError) saying which limit; others are not."""
    from kvmscope.errors import FdLimitError, kvm_error

    emfile, enfile, other = (kvm_error(e, "KVM_CREATE_VM") for e in (errno.EMFILE, errno.ENFILE, errno.ENOMEM))
    assert type(emfile) is FdLimitError and "ulimit -n" in str(emfile), f"saw {emfile!r}"
    assert type(enfile) is FdLimitError and "the system is out of open files" in str(enfile), f"saw {enfile!r}"
    assert type(other) is KvmError and other.errno == errno.ENOMEM, f"saw {other!r}"
