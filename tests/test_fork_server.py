"""The warm ClientApp processes of a deployed site (issue 11 §3): osteo-client's stand-in ``flwr-clientapp``
hands each message's arguments, folder and streams to the fork server (client/fork_server.py), whose
forked child runs the entry point in the stand-in's place and whose exit code the stand-in returns; a
malformed request is dropped without stopping the server; without a server the stand-in runs Flower's own
program. The real Flower entry point runs in every deployed federation test (test_federation_*)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from osteofl.client import cli as client_cli
from osteofl.client.fork_server import READY

FAKE_ENTRY = """
import os, sys
from pathlib import Path
from osteofl.client import fork_server

def fake():
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
                      "mark": os.environ.get("OSTEO_MARK"), "server_only": os.environ.get("OSTEO_SERVER_ONLY")}), flush=True)
    print("a line on stderr", file=sys.stderr, flush=True)
    if sys.argv[-1] == "boom":
        raise RuntimeError("the ClientApp failed")
    sys.exit(int(sys.argv[-1]))

import json
fork_server.serve(Path(sys.argv[1]), entry=fake)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    sock = private / "fork.sock"
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAKE_ENTRY, str(sock)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OSTEO_SERVER_ONLY": "1", "OSTEO_MARK": "the server's"})
    deadline = time.monotonic() + 120
    while READY not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    try:
        yield proc, sock
    finally:
        proc.kill()
        proc.wait()


def _stand_in(tmp_path: Path, sock: Path) -> Path:
    real = tmp_path / "real-flwr-clientapp"
    real.write_text(f"#!{sys.executable}\nimport sys\nprint('flower itself', sys.argv[1:])\nsys.exit(3)\n")
    real.chmod(0o700)
    return client_cli.write_clientapp_shim(tmp_path / "run" / "bin", sock, real)


def test_stand_in_runs_the_forked_entry_with_its_arguments_streams_and_folder(tmp_path: Path, server) -> None:
    proc, sock = server
    shim = _stand_in(tmp_path, sock)
    assert shim.name == "flwr-clientapp" and (shim.stat().st_mode & 0o077) == 0
    where = tmp_path / "cwd"
    where.mkdir()
    done = subprocess.run([str(shim), "--token", "abc def", "7"], cwd=where, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OSTEO_MARK": "the stand-in's"})
    assert done.returncode == 7, done.stderr
    seen = json.loads(done.stdout.splitlines()[0])
    assert seen["argv"] == ["--token", "abc def", "7"] and seen["cwd"] == str(where)
    assert seen["mark"] == "the stand-in's" and seen["server_only"] is None  # the environment Flower gave it
    assert seen["ppid"] == proc.pid and seen["pid"] != proc.pid  # a child of the warm server, not a fresh program
    assert "a line on stderr" in done.stderr and "flower itself" not in done.stdout
    ok = subprocess.run([str(shim), "0"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["pid"] != seen["pid"]  # one child per message
    failed = subprocess.run([str(shim), "boom"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "RuntimeError: the ClientApp failed" in failed.stderr
    assert proc.poll() is None


def test_a_malformed_request_is_dropped_and_the_server_keeps_serving(tmp_path: Path, server) -> None:
    proc, sock = server
    for garbage in (b"not json\n", json.dumps({"argv": ["x"], "cwd": "/"}).encode() + b"\n"):  # 2nd: no fds
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            s.sendall(garbage)
            assert s.recv(64) == b""  # closed, no child started
    done = subprocess.run([str(_stand_in(tmp_path, sock)), "5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 5 and proc.poll() is None


def test_without_a_server_the_stand_in_runs_flowers_own_program(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    shim = _stand_in(tmp_path, tmp_path / "run" / "fork.sock")  # nothing listens there
    done = subprocess.run([str(shim), "--token", "t"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "flower itself ['--token', 't']" in done.stdout


def test_supernode_env_puts_the_stand_in_first_and_polls_the_superexec_as_often(tmp_path: Path) -> None:
    from osteo_model.config import compose

    cfg = compose([f"paths.root={tmp_path}", "site.poll_s=0.25"])
    env = client_cli.supernode_env({"PATH": "/usr/bin"}, cfg, tmp_path / "bin")
    assert env["PATH"].split(os.pathsep)[:2] == [str(tmp_path / "bin"), "/usr/bin"]
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.25"
    stock = client_cli.supernode_env({"PATH": "/usr/bin"}, compose([f"paths.root={tmp_path}", "site.poll_s=null"]), None)
    assert stock == {"PATH": "/usr/bin"}  # --no-worker and Flower's own waits: nothing changed
