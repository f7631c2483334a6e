"""Process pools whose workers never outlive the command that started them.

A killed parent (SIGKILL, OOM) cannot stop its pool: orphaned workers compute on, write their files into
folders a next run may already be using, or block forever on a pipe nobody reads. Every pool of ours
(osteo-prepare, osteo-synth, osteo-predict's images, osteo-evidence) is made here, so on Linux the kernel
kills each worker with its parent (``prctl(PR_SET_PDEATHSIG)``); the parent-pid check covers a parent
that died before that was armed.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset``, cgroup cpusets), not the machine's count."""
    return len(os.sched_getaffinity(0))


def die_with_parent(parent: int) -> None:
    """Pool initializer: SIGKILL this worker when ``parent`` dies; exit at once if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def worker_pool(workers: int, start: str | None = None) -> ProcessPoolExecutor:
    """``workers`` processes (``start``: the multiprocessing start method, None for the platform's) that die
    with this one."""
    ctx = multiprocessing.get_context(start) if start else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                               initargs=(os.getpid(),))
