"""Our commands own what they start and say what is wrong in one line: the process keeper (a tree with a
detached, SIGTERM-deaf grandchild dies with its SIGKILLed owner), the run lock, the TLS probe of the
SuperLink's port, and every entry point's answer to a malformed override."""
from __future__ import annotations

import importlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from osteo_model import run_lock
from osteo_model.errors import ConfigError
from osteofl import runtime
from osteofl.client import cli as client_cli
from osteofl.client.probe import superlink_mismatch
from osteofl.keeper import descendants
from osteofl.server import provision

ROOT = Path(__file__).resolve().parents[1]
# bash -> sleep (same group), a setsid'ed sleep (own session, as Flower detaches its SuperExec) and a
# python that ignores SIGTERM (it needs the SIGKILL)
TREE = ("sleep 600 & setsid sleep 600 & "
        "python3 -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)' & wait")


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie awaiting its reaper does not run)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def wait_tree(pid: int, n: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(tree := descendants(pid)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return tree


def test_sigkilled_owner_takes_its_whole_tree_along(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\nfrom osteofl import runtime\n"
        f"runtime.start(['bash', '-c', {TREE!r}], dict(os.environ))\ntime.sleep(600)\n")])
    try:
        tree = wait_tree(owner.pid, 6)  # keeper, bash, 3 grandchildren (+ the keeper's own python)
        assert len(alive(tree)) >= 5, tree
        owner.kill()
        owner.wait()
        assert wait_gone(tree, 30) == [], "processes outlived the SIGKILLed command"
    finally:
        for pid in alive(descendants(owner.pid)):
            os.kill(pid, signal.SIGKILL)


def test_stop_ends_a_tree_that_ignores_sigterm() -> None:
    owned = runtime.start(["bash", "-c", TREE], dict(os.environ))
    tree = wait_tree(owned.proc.pid, 4)
    assert runtime.stop(owned) == [143]  # bash ended by SIGTERM, as a shell reports it
    assert alive(tree) == []


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "federated"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom osteo_model import run_lock\n"
        f"run_lock.acquire(Path({str(run)!r}), 'run federated'); print('locked', flush=True); time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"run federated is still in use by flower-server pid {holder.pid}"):
            run_lock.acquire(run, "run federated")
    finally:
        holder.kill()
        holder.wait()
    fd = run_lock.acquire(run, "run federated")  # the holder died: its lock is stale and taken over
    try:
        assert f'"pid": {os.getpid()}' in (run / "run.lock").read_text()
    finally:
        os.close(fd)


def _serve(tls: ssl.SSLContext | None) -> tuple[str, socket.socket]:
    """A one-port server on loopback that completes TLS handshakes (``tls``) or answers like plain HTTP."""
    srv = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    if tls is not None:
                        tls.wrap_socket(conn, server_side=True).close()
                    else:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except (OSError, ssl.SSLError):
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}", srv


def test_probe_tells_tls_plain_and_untrusted_apart(tmp_path: Path) -> None:
    ours, other = tmp_path / "pki", tmp_path / "other"
    provision.make_ca(ours)
    provision.make_server_cert(ours, ["127.0.0.1"])
    provision.make_ca(other)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ours / "server.pem", ours / "server.key")
    tls_addr, tls_srv = _serve(tls)
    plain_addr, plain_srv = _serve(None)
    with tls_srv, plain_srv:
        assert superlink_mismatch(tls_addr, ours / "ca.pem") is None
        assert "speaks TLS: drop --insecure" in superlink_mismatch(tls_addr, None)
        assert "not trusted by" in superlink_mismatch(tls_addr, other / "ca.pem")
        assert "does not speak TLS" in superlink_mismatch(plain_addr, ours / "ca.pem")
        assert superlink_mismatch(plain_addr, None) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{s.getsockname()[1]}"
    assert superlink_mismatch(silent, ours / "ca.pem") is None  # nobody listens (yet): not an error


def test_insecure_client_against_tls_server_says_so_and_exits(tmp_path: Path, capsys) -> None:
    from federation_helpers import make_caches

    make_caches(tmp_path, {"site_a": "hologic"}, n_patients=6)
    pki = tmp_path / "pki"
    provision.make_ca(pki)
    provision.make_server_cert(pki, ["127.0.0.1"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    addr, srv = _serve(tls)
    with srv:
        rc = client_cli.main(["--site", "site_a", "--insecure", "--superlink", addr, f"paths.root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "speaks TLS" in err and "\n" not in err


def _entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


REQUIRED = {name: ["--site", "site_a"] for name in ("osteo-client", "osteo-keygen", "osteo-audit")}  # required flags


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_every_command_answers_a_malformed_override_in_one_line(name: str, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module, func = _entry_points()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    rc = main([*REQUIRED.get(name, []), f"paths.root={tmp_path}", "model.channels=[4,"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, err)
    assert err.startswith("error: config:") and "\n" not in err and "Traceback" not in err, (name, err)


@pytest.mark.parametrize("name", ["osteo-train", "osteo-client"])
def test_a_mistyped_setting_or_option_is_named_with_what_exists(name: str, tmp_path: Path, capsys) -> None:
    """Hydra's own first line says only that it "could not override" a key, or hides the options on later
    lines: a hospital's typo in its policy must say that the setting does not exist."""
    module, func = _entry_points()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    for override, want in (("site.policy.min_cohrt=30", "error: config: Could not override 'site.policy.min_cohrt': "
                                                        "no such setting (a typo?)"),
                           ("privacy=nodp", "error: config: In 'config': Could not find 'privacy/nodp' (options: dp, none)")):
        assert main([*REQUIRED.get(name, []), f"paths.root={tmp_path}", override]) == 2
        assert capsys.readouterr().err.strip() == want


def test_osteo_client_retries_a_refused_activation_then_says_why(tmp_path: Path, capsys, monkeypatch) -> None:
    """A SuperLink refuses to activate a site whose previous session it still counts as connected (Flower
    keeps a node online ~60 s after its last heartbeat) exactly as it refuses an unregistered key, and the
    SuperNode exits 1 as for any error: the client reads its output, retries for --activation-wait seconds,
    then names both causes in one line. The stand-in SuperNode (below the real keeper) is refused twice."""
    from federation_helpers import make_caches

    make_caches(tmp_path, {"site_a": "hologic"}, n_patients=6)
    tries = tmp_path / "tries"
    script = (f"import pathlib, sys; p = pathlib.Path({str(tries)!r}); n = len(p.read_text()) if p.exists() else 0; "
              "p.write_text('x' * (n + 1)); refused = n < int(sys.argv[1]); "
              "print('[code: 2004] Failed to activate SuperNode.' if refused else 'connected', flush=True); "
              "sys.exit(1 if refused else 0)")
    refusals = {"n": "2"}
    monkeypatch.setattr(client_cli, "supernode_command", lambda args, cfg, overrides=(), worker=None: [
        sys.executable, "-c", script, refusals["n"], "--superlink", "127.0.0.1:1"])
    monkeypatch.setattr(client_cli, "RETRY_S", 0.0)
    argv = ["--site", "site_a", "--insecure", "--no-worker", f"paths.root={tmp_path}"]

    assert client_cli.main([*argv, "--activation-wait", "60"]) == 0
    out = capsys.readouterr().out
    assert out.count("did not activate site site_a; retrying") == 2 and len(tries.read_text()) == 3

    tries.unlink()
    refusals["n"] = "9"
    assert client_cli.main([*argv, "--activation-wait", "0"]) == 1 and len(tries.read_text()) == 1
    err = capsys.readouterr().err.strip()
    assert "refused to activate site site_a" in err and "not registered" in err and "\n" not in err


def test_a_second_osteo_client_of_a_site_refuses_to_start(tmp_path: Path, capsys) -> None:
    """Two osteo-clients of one site would each add their DP spending to the same loaded epsilon and save
    over each other (epsilon undercounted). The first holds the site's state folder while any of its
    processes lives (here its real SuperNode, waiting for a SuperLink nobody runs); the second says who."""
    from federation_helpers import make_caches

    make_caches(tmp_path, {"site_a": "hologic"}, n_patients=6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    argv = ["--site", "site_a", "--insecure", "--no-worker", "--superlink", nobody, f"paths.root={tmp_path}"]
    first = subprocess.Popen([sys.executable, "-c", "import sys; from osteofl.client.cli import main; sys.exit(main())",
                              *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "osteo-client: site site_a" in first.stdout.readline()  # printed with the lock held
        assert client_cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert f"site site_a's state folder is still in use by osteo-client pid {first.pid}" in err and "\n" not in err
    finally:
        first.terminate()
        first.wait(timeout=60)
    os.close(run_lock.acquire(tmp_path / "data" / "state" / "site_a", "a check"))  # gone with its last process


POOL_OWNER = """
import os, sys, time
from osteo_model.pools import worker_pool

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    pool = worker_pool(2, sys.argv[2])
    for i in range(2):
        pool.submit(work, f"{sys.argv[1]}.{i}")
    time.sleep(600)
"""


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_pool_workers_die_with_their_sigkilled_command(tmp_path: Path, start: str) -> None:
    """osteo-evidence, osteo-prepare, osteo-synth and osteo-predict's pools (osteo_model.pools): a command
    killed outright takes its workers along, so none goes on writing into a store a next run may use."""
    script = tmp_path / "owner.py"
    script.write_text(POOL_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pid"), start])
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"pid.{i}").is_file() and (tmp_path / f"pid.{i}").read_text() for i in range(2)):
            assert owner.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        workers = [int((tmp_path / f"pid.{i}").read_text()) for i in range(2)]
        assert alive(workers) == workers
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert wait_gone(workers, 10) == [], "pool workers outlived their SIGKILLed command"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
