"""Starting Flower's own processes the way both our commands need them.

- Environment: ``FLWR_HOME`` in a folder of ours (never the user's home), telemetry off unless the user
  opts in (a hospital deployment must not phone home by default), no runtime dependency installation
  (it would try to download packages), no update check.
- Every Flower process runs below a keeper (``osteofl.keeper``) that stops it and everything it spawned
  (SuperExec, ServerApp/ClientApp processes, detached or not) when our command exits in ANY way,
  SIGKILL included, and within seconds when it is stopped: nothing of a run survives its command.
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


class Owned:
    """A Flower command running below its keeper; ``wait``/``poll`` give the command's exit code."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: IO | None = None,
                 keep_fds: Sequence[int] = ()) -> None:
        read, self._lifeline = os.pipe()  # we hold the only write end: our death is the keeper's EOF
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "osteofl.keeper", str(read), "--", *cmd], env=env, stdout=log,
                stderr=subprocess.STDOUT if log else None, pass_fds=(read, *keep_fds), start_new_session=True)
        finally:
            os.close(read)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> None:
        """Ask the keeper to stop the whole tree (returns at once; ``stop`` waits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1


def start(cmd: Sequence[str], env: dict[str, str], log: IO | None = None, keep_fds: Sequence[int] = ()) -> Owned:
    """Start ``cmd`` below a keeper; output to ``log`` (or inherited); ``keep_fds`` stay open in the keeper
    (a lock that must be held until the last process of the tree is gone)."""
    return Owned(cmd, env, log, keep_fds)


def stop(*owned: Owned, grace: float = 5.0) -> list[int | None]:
    """Stop all ``owned`` trees at once (the keepers SIGTERM, then SIGKILL after 2 s); their exit codes."""
    for o in owned:
        o.terminate()
    codes: list[int | None] = []
    for o in owned:
        try:
            codes.append(o.wait(timeout=grace))
        except subprocess.TimeoutExpired:  # a keeper that hangs: the lifeline's EOF still reaches it
            o.proc.kill()
            codes.append(None)
        o.close()
    return codes


def exit_now(code: int) -> None:
    """Leave at once once the children are stopped: the interpreter's teardown (torch and friends) costs
    seconds on a busy machine, and a stopped command promises to be gone within 5 s."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks stop the children) instead of killing us outright."""
    def _raise(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def port_in_use(host: str, port: int) -> bool:
    """True if ``host:port`` cannot be bound (as the SuperLink would bind it: with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float, proc: Owned | None = None) -> bool:
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
