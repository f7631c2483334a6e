"""One live holder per folder (``<folder>/run.lock``): one server per run, one osteo-evidence per store,
one osteo-client per site state folder.

Two ServerApps on one checkpoint folder train every site twice per round and interleave their records, so
a second ``flower-server`` (``--resume`` or not) of the same run must refuse to start; likewise two
osteo-evidence runs regenerating the same store's sites under each other, and two osteo-clients of one
site, which would each add their DP spending to the same loaded epsilon and save over each other (epsilon
undercounted). The lock is an ``flock`` on the file, which the kernel drops when the last holder dies: no
stale lock survives a crash and no pid can be mistaken for a recycled one. The commands pass the
descriptor to their process keepers, so the lock is held until the last child process is gone, not just
until the command itself dies. The file's text (pid, what, start time) only names the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from osteo_model.errors import ConfigError


def acquire(run_dir: Path, what: str, holder: str = "flower-server") -> int:
    """Lock ``run_dir`` for this process (``what`` it holds and ``holder``, the command, are named to
    whoever finds it locked); the open descriptor (keep it open for the run's lifetime)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read(fd)
        os.close(fd)
        raise ConfigError(path, f"{what} is still in use by {holder} pid {owner.get('pid', '?')} "
                                f"(since {owner.get('started', '?')}) or its worker processes; stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
    return fd


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
