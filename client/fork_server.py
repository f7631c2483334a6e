"""`python -m osteofl.client.fork_server --socket PATH`: Flower's per-message ClientApp process, forked warm.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` for every message. Its imports alone take ~1.3 s
on an idle core and 3-4 s when a host's sites start theirs together, most of what a deployed message
cost beyond the work (issue 11 §3). ``osteo-client`` therefore puts a stand-in ``flwr-clientapp`` first
on its SuperNode's PATH (client/clientapp_shim.py). The stand-in hands its arguments, working folder,
environment and standard streams to this server, which has Flower and our ClientApp module imported
already and forks a child that runs Flower's own ``flwr-clientapp`` entry point with them. The child is
the process Flower would have started, minus the imports: same code, environment and arguments, its own
pid. The stand-in waits for it and exits with its code.

Only the hospital's own user can reach the socket (a 0700 folder, a 0600 socket), and all it can ask
for is Flower's ``flwr-clientapp`` with other arguments, which that user can run anyway. The server
stays single-threaded, so no lock is held by another thread when it forks.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import traceback
from logging import WARNING
from pathlib import Path
from typing import Callable, Sequence

from flwr.supercore import log
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

import osteofl.client.client_app  # noqa: F401  imported once here, not in every message's process
from osteofl.client.worker_wire import listen
from osteofl.flower_waits import cap_pull_backoff

READY = "osteo-fork-server ready"
STREAMS = 3  # stdin, stdout, stderr of the stand-in
MAX_REQUEST = 1 << 20  # a JSON line of arguments, folder and environment

Entry = Callable[[], None]


def read_request(conn: socket.socket) -> tuple[list[str], str, dict[str, str], list[int]]:
    """(argv, working folder, environment, the stand-in's stream fds) from one connection: a JSON line sent
    with the fds."""
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, STREAMS)
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        more = conn.recv(MAX_REQUEST)
        if not more:
            break
        data += more
    try:
        request = json.loads(data)
        argv, cwd = [str(a) for a in request["argv"]], str(request["cwd"])
        env = {str(k): str(v) for k, v in request["env"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"malformed request ({type(exc).__name__})") from None
    if len(fds) != STREAMS:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected {STREAMS} stream fds, got {len(fds)}")
    return argv, cwd, env, fds


def _run_child(entry: Entry, argv: Sequence[str], cwd: str, env: dict[str, str], fds: Sequence[int]) -> int:
    """In the forked child: become the stand-in's process (its streams, folder, environment and arguments),
    run ``entry``."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()  # what the SuperNode gave the stand-in, not what the fork server started with
    os.environ.update(env)
    sys.argv = ["flwr-clientapp", *argv]
    code = 0
    try:
        entry()
    except SystemExit as exc:  # Flower's flwr_exit ends every run this way
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - reported on the stand-in's stderr, as a fresh process would
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def serve(path: Path, entry: Entry = flwr_clientapp) -> None:
    """Fork a child per request until stopped; tell each stand-in its child's exit code."""
    waiting: dict[int, socket.socket] = {}  # child pid -> its stand-in's connection
    with listen(path) as sock:
        print(READY, flush=True)
        while True:
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready:
                conn, _ = sock.accept()
                try:
                    argv, cwd, env, fds = read_request(conn)
                except (OSError, ValueError) as exc:
                    log(WARNING, "fork server: dropped a request: %s", exc)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    conn.close()
                    os._exit(_run_child(entry, argv, cwd, env, fds))
                for fd in fds:
                    os.close(fd)
                waiting[pid] = conn
            while waiting:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if (conn := waiting.pop(pid, None)) is not None:
                    try:
                        conn.sendall(str(_exit_code(status)).encode())
                    except OSError:
                        pass  # the stand-in is gone: nobody waits for the code
                    conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-fork-server", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, type=Path, help="where to listen (a file in a private folder)")
    p.add_argument("--first-retry", type=float, metavar="S",
                   help="retry a message object the SuperNode has not pulled yet after S s, not Flower's 1 s (site.poll_s)")
    args = p.parse_args(argv)
    if args.first_retry is not None:
        cap_pull_backoff(args.first_retry)  # before any fork: every child inherits it
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
