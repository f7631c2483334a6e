"""`python -m osteofl.keeper FD -- CMD...`: run CMD so that nothing it spawns outlives the command that asked.

Flower's processes spawn their own (SuperLink -> SuperExec -> ServerApp, SuperNode -> ClientApp), some of
them detached in a new session, so neither a process group nor a parent-death signal on CMD reaches them
all. The keeper sits between our command and CMD as a child *subreaper*: every descendant of CMD, detached
or orphaned, stays below it, so it can find them all in /proc. It stops the whole tree when

- our command dies in any way, SIGKILL included: FD is the read end of a pipe whose only writer is our
  command, so the kernel closes it and the keeper reads EOF;
- it gets SIGTERM/SIGINT (our command stopping cleanly);
- CMD exits (leftovers such as a SuperExec are not kept alive).

Stopping is SIGTERM to every descendant, ``GRACE`` seconds, then SIGKILL; the keeper exits with CMD's code.
Linux only (prctl, /proc), like Flower's deployment.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time

GRACE = 2.0  # seconds between SIGTERM and SIGKILL: our commands promise to stop within 5 s
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def descendants(root: int) -> list[int]:
    """Pids below ``root`` (children first), from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def _reap(main: int, status: dict[int, int]) -> None:
    """Collect every exited child (orphans adopted by us included); remember ``main``'s exit code."""
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == main:
            code = os.waitstatus_to_exitcode(code)
            status[main] = code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + n


def _signal_all(sig: int) -> list[int]:
    pids = descendants(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def stop_tree(main: int, status: dict[int, int]) -> None:
    """SIGTERM everything below us, wait up to GRACE, SIGKILL the rest, reap."""
    deadline = time.monotonic() + GRACE
    if _signal_all(signal.SIGTERM):
        while time.monotonic() < deadline:
            _reap(main, status)
            if not descendants(os.getpid()):
                break
            time.sleep(0.05)
    while _signal_all(signal.SIGKILL):
        time.sleep(0.05)
        _reap(main, status)
    _reap(main, status)


def main(argv: list[str]) -> int:
    fd, cmd = int(argv[0]), argv[2:]
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # a second line of defence beside the pipe
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.append(True))
    if os.getppid() == 1:  # our command died before the death signal was armed
        return 143
    child = subprocess.Popen(cmd)
    status: dict[int, int] = {}
    while not stopping and child.pid not in status:
        try:
            ready, _, _ = select.select([fd], [], [], 0.2)
        except InterruptedError:
            continue
        if ready and not os.read(fd, 1024):  # EOF: our command is gone
            break
        _reap(child.pid, status)
    stop_tree(child.pid, status)
    return status.get(child.pid, 143)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
