"""Starting Flower's own processes the way both our commands need them.

- Environment: ``FLWR_HOME`` in a folder of ours (never the user's home), telemetry off unless the user
  opts in (a hospital deployment must not phone home by default), no runtime dependency installation
  (it would try to download packages), no update check.
- Child processes run in their own process group, so stopping one of our commands also stops the
  helpers Flower spawns (SuperExec, ClientApp/ServerApp processes), and nothing else.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence


def flower_env(flwr_home: str | Path, telemetry: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "1" if telemetry else "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    bin_dir = str(Path(sys.executable).parent)  # the venv's flower-* scripts, even when PATH lacks them
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def say_telemetry(telemetry: bool) -> str:
    return ("Flower telemetry: ON (--telemetry)" if telemetry
            else "Flower telemetry: off (FLWR_TELEMETRY_ENABLED=0; --telemetry to opt in)")


def start(cmd: Sequence[str], env: dict[str, str], log: IO | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new process group; output to ``log`` (or inherited)."""
    return subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the process group we started, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # Flower's children (SuperExec, app processes) may outlive it
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """True once ``host:port`` accepts TCP connections; False on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.3)
    return False
