"""How fast `osteo-client` and `flower-server` stop on SIGTERM, and what survives their SIGKILL (issue: commands
left SuperLink/SuperExec/ServerApp/flwr run/SuperNode behind; osteo-client took ~24 s to stop).

Each command runs for real on loopback (``--insecure``) until its Flower processes are up (the client's
SuperNode; the server's ServerApp waiting for sites), then gets the signal; the stop time is until the
command and every process below it are gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from benchmarks.bench_federation import _random_cache
from osteofl.keeper import descendants

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


def _trial(root: Path, kind: str, sig: int) -> tuple[float, int]:
    """(seconds until the command and its tree are gone, processes of its tree alive 10 s after SIGKILL)."""
    port = _free_port()
    overrides = [f"paths.root={root}", f"federation.superlink.port={port}",
                 f"federation.superlink.address=127.0.0.1:{port}", "federation.sites=[site_a]"]
    log = root / f"{kind}-{sig}.log"
    if kind == "server":
        cmd = [str(BIN / "flower-server"), "--insecure", *overrides]
        ready: Callable[[int], bool] = lambda pid: any("flwr-serverapp" in _cmdline(q) for q in descendants(pid))
    else:
        cmd = [str(BIN / "osteo-client"), "--insecure", "--site", "site_a", "--local-port", str(_free_port()), *overrides]
        ready = lambda pid: any("flower-supernode" in _cmdline(q) for q in descendants(pid))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ready(proc.pid):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{kind} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    time.sleep(3)
    tree = descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
        while _alive(tree) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        time.sleep(max(0.0, 10 - seconds))
        return seconds, len(_alive(tree))
    finally:
        for pid in _alive([proc.pid, *tree]):
            os.kill(pid, signal.SIGKILL)


def run() -> Iterator[tuple[str, float, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _random_cache(root / "data" / "cache" / "site_a", "site_a", "hologic", 8)
        for kind in ("client", "server"):
            seconds, _ = _trial(root, kind, signal.SIGTERM)
            yield f"{kind} SIGTERM to all stopped", seconds, "s"
            _, survivors = _trial(root, kind, signal.SIGKILL)
            yield f"{kind} SIGKILL survivors", float(survivors), "processes"
