"""Where polling loop threads run: the CPUs this process may use, the one a thread runs on, and
the CPU a polling loop with none chosen stays on (perf's queue threads; several controllers'
pollers, nvmevfio/perf_many.py). Pure bookkeeping over sched_getaffinity(2) and sched_getcpu(3);
the pinning itself is the caller's (os.sched_setaffinity on its own thread)."""

from __future__ import annotations

import ctypes
import os
import threading


def cpus_allowed() -> set[int]:
    """The CPUs this process may run on (its affinity mask, sched_getaffinity(2))."""
    return os.sched_getaffinity(0)


_LIBC = ctypes.CDLL(None, use_errno=True)
_held_cpus: set[int] = set()  # CPUs a polling loop thread of this process stays on (stay_cpu)
_held_lock = threading.Lock()


def current_cpu() -> int:
    """The CPU the calling thread runs on now (sched_getcpu(3))."""
    cpu = int(_LIBC.sched_getcpu())
    if cpu < 0:
        raise OSError(ctypes.get_errno(), "sched_getcpu")
    return cpu


def stay_cpu(now: int, allowed: set[int]) -> int | None:
    """The CPU a polling loop thread with no --cpu is pinned to: ``now``, the one the scheduler
    started it on, unless another polling loop of this process holds it; then the lowest free one
    of ``allowed``; None when all are held (it stays unpinned). A spinning thread that migrates
    starts over on another CPU's caches (under TCG, another vCPU's software TLB), and a thread
    that runs a loop's doorbells from two CPUs in turn spreads them: pinned where it started, the
    loop ran QD128 at 104-109k IOPS in every round where unpinned it ran 89-110k
    (docs/benchmarks.md, "QD128 on its own"). Release it with :func:`release_cpu`."""
    with _held_lock:
        free = sorted(allowed - _held_cpus)
        cpu = now if now in allowed and now not in _held_cpus else (free[0] if free else None)
        if cpu is not None:
            _held_cpus.add(cpu)
        return cpu


def release_cpu(cpu: int) -> None:
    """A CPU taken with :func:`stay_cpu` given back."""
    with _held_lock:
        _held_cpus.discard(cpu)
