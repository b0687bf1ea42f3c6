"""Kicking a vCPU out of KVM_RUN at a deadline (``run(timeout=...)``), from any thread, with no signal handler.

A guest spinning on ``jmp $`` never exits to userspace: only a pending signal makes KVM_RUN return (EINTR), and
``immediate_exit`` is read only on entry. So a watchdog thread sets ``immediate_exit`` (for a kick that lands before the
entry) and sends :data:`KICK_SIGNAL` to the running thread (for a kick inside the guest).

No handler is needed, so none is installed (Python installs handlers only from the main thread): the running thread
blocks the signal around the run, and KVM_SET_SIGNAL_MASK gives KVM_RUN a mask without it. KVM swaps that mask in for
the run only (virt/kvm/kvm_main.c:3702-3723 in 6.12, ``kvm_sigset_activate``/``deactivate``), so the kick interrupts
KVM_RUN and is still blocked, never delivered, when the ioctl returns; ``sigtimedwait`` then takes it off the thread.
SIGURG is ignored by default, and the kernel does not drop a signal that is blocked, or that is in the mask KVM saved
(``sig_ignored`` checks ``real_blocked``), so neither a handler nor a default action ever sees the kick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

KICK_SIGNAL = signal.SIGURG


def sigset_bytes(signals: set[signal.Signals] | set[int], size: int) -> bytes:
    """A kernel ``sigset_t`` of ``size`` bytes: bit ``n - 1`` for signal ``n``."""
    bits = 0
    for s in signals:
        if 0 < int(s) <= 8 * size:
            bits |= 1 << (int(s) - 1)
    return bits.to_bytes(size, "little")


_INFINITY = float("inf")  # not math.inf: see api.check_timeout


class Watchdog:
    """One daemon thread for every timed run in the process: at each deadline it calls the run's kick function."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a child has no watchdog thread, and maybe a held lock

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._waiting_until = _INFINITY  # the deadline the thread sleeps to: a later one needs no wake-up

    def arm(self, deadline: float, kick: Callable[[], None]) -> int:
        """Call ``kick`` at ``deadline`` (time.monotonic) unless disarmed first; returns the token for :meth:`disarm`."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kvmscope-run-timeout", daemon=True)
                self._thread.start()
            self._next += 1
            self._armed[self._next] = (deadline, kick)
            if deadline < self._waiting_until:  # back-to-back runs with one timeout wake the thread only at times
                self._cond.notify()
            return self._next

    def disarm(self, token: int) -> bool:
        """Cancel the kick; True if it has already been made. After this returns, ``kick`` is not called."""
        with self._cond:  # kicks are made holding the lock: none can be half-made here
            return self._armed.pop(token, None) is None

    def _loop(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._waiting_until = _INFINITY
                    self._cond.wait()
                    continue
                token, (deadline, kick) = min(self._armed.items(), key=lambda item: item[1][0])
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._waiting_until = deadline
                    self._cond.wait(wait)
                    continue
                del self._armed[token]
                with contextlib.suppress(Exception):  # a kick must not end the watchdog (the run ends anyway)
                    kick()


WATCHDOG = Watchdog()
