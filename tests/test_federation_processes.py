"""Killed commands leave nothing behind, and a resumed run continues where the killed one stopped, with
Flower's real processes on loopback (``--insecure``: keys are tested in test_federation_loopback.py).

flower-server + three osteo-clients run round 1; a second flower-server of the same run is refused while
the first lives; every command is SIGKILLed and no process of theirs (SuperLink, SuperExec, ServerApp,
flwr run, SuperNodes, ClientApps) survives; a fresh run started at once, on the killed SuperLink's
database, finishes with the sites' new sessions; ``flower-server --resume``, started right after those
sites stopped, then runs round 2 only, and SIGTERMed clients stop with their trees."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation_helpers import SITES, allow_small_cohorts, make_caches, small_overrides
from osteofl.client.state_store import StateStore
from osteofl.keeper import descendants
from test_processes import alive, wait_gone

BIN = Path(sys.executable).parent


def _text(path: Path) -> str:
    """A log as text whatever the locale: Flower's messages carry non-ASCII (an em dash)."""
    return path.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen; logs:\n" + "\n".join(_text(p)[-2000:] for p in logs if p.exists()))


def _marked(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker`` (our tmp path or port)."""
    found = []
    for pid in alive([int(p) for p in os.listdir("/proc") if p.isdigit()]):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and pid != os.getpid():
            found.append(cmd)
    return found


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigkill_leaves_no_process_and_resume_continues_at_round_2(tmp_path: Path) -> None:
    make_caches(tmp_path)
    allow_small_cohorts(tmp_path)
    port = _free_port()
    overrides = small_overrides(
        tmp_path, **{"federation.superlink.port": port, "federation.superlink.address": f"127.0.0.1:{port}",
                     "federation.min_available_nodes": 3, "federation.min_train_replies": 3,
                     "federation.final_eval_split": "null", "federation.round_timeout": 600})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "outputs" / "federated"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            p = subprocess.Popen([str(BIN / args[0]), *args[1:], *overrides], stdout=out,
                                 stderr=subprocess.STDOUT, env=env)
        procs.append(p)
        return p

    def clients(tag: str, *extra: str) -> list[subprocess.Popen]:
        return [start(["osteo-client", "--insecure", "--site", s, "--local-port", str(_free_port()), *extra],
                      tmp_path / f"{s}-{tag}.log") for s in SITES]

    def stop(group: list[subprocess.Popen]) -> None:
        trees = [pid for c in group for pid in descendants(c.pid)]
        for c in group:
            c.send_signal(signal.SIGTERM)
        assert all(c.wait(timeout=30) is not None for c in group)
        assert wait_gone(trees, 10) == []

    try:
        log1 = tmp_path / "server1.log"
        server = start(["flower-server", "--insecure"], log1)
        _wait_for(lambda: "waiting for 3 of 3 sites" in _text(log1), "server start", 300, [log1])
        second = subprocess.run([str(BIN / "flower-server"), "--insecure", "--resume", *overrides],
                                capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 1 and "run.lock" in second.stderr and f"pid {server.pid}" in second.stderr
        assert second.stderr.strip().count("\n") == 0, second.stderr
        first_clients = clients("1")
        ckpt1 = run / "checkpoints" / "round-0001.npz"
        _wait_for(ckpt1.exists, "round 1 checkpoint", 900, [log1, *tmp_path.glob("site_*-1.log")])

        trees = {p.pid: descendants(p.pid) for p in [server, *first_clients]}
        assert len(trees[server.pid]) >= 6, trees  # keepers, flower-superlink, flower-superexec, serverapp, flwr
        assert all(len(trees[c.pid]) >= 2 for c in first_clients), trees  # keeper + flower-supernode
        for p in [*first_clients, server]:
            p.send_signal(signal.SIGKILL)
            p.wait()
        survivors = wait_gone([pid for tree in trees.values() for pid in tree], 30)
        assert survivors == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in alive(survivors)]
        assert _marked(f"127.0.0.1:{port}") == [] and _marked(str(tmp_path)) == []

        # A fresh run started at once, on the killed SuperLink's database: it may still list some killed
        # SuperNodes as connected (Flower: until two heartbeats, 60 s, after their last sign of life; how
        # many depends on timing, so the handshake's retry is tested in-process, test_federation_rounds).
        # The sites' new sessions connect after the ServerApp started (own state folders: the resumed run
        # below counts its rounds), and the run must go on with them
        log_fresh = tmp_path / "server-fresh.log"
        fresh = start(["flower-server", "--insecure", "federation.run_name=fresh"], log_fresh)
        _wait_for(lambda: "flwr-serverapp" in _text(log_fresh), "fresh ServerApp start", 300, [log_fresh])
        time.sleep(5)
        fresh_clients = clients("fresh", f"paths.state_root={tmp_path / 'fresh_state'}")
        assert fresh.wait(timeout=600) == 0, _text(log_fresh)[-3000:]
        assert "site node-1 " not in _text(log_fresh)  # a stale session is named by its own node id
        assert [r["round"] for r in json.loads(_text(tmp_path / "outputs" / "fresh" / "history.json"))] == [1, 2]
        stop(fresh_clients)

        # resumed at once: like a fresh run, its handshake waits out whatever sessions are still listed
        log2 = tmp_path / "server2.log"
        resumed = start(["flower-server", "--insecure", "--resume"], log2)
        _wait_for(lambda: "waiting for 3 of 3 sites" in _text(log2), "resumed server start", 300, [log2])
        second_clients = clients("2")
        assert resumed.wait(timeout=900) == 0, _text(log2)[-3000:]
        stop(second_clients)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert "resuming after round 1" in _text(log2)
    history = json.loads(_text(run / "history.json"))
    assert [r["round"] for r in history] == [1, 2]
    assert [p.name for p in sorted((run / "checkpoints").glob("round-*.npz"))] == ["round-0001.npz", "round-0002.npz"]
    for site in SITES:  # each site trained once per round: no orphan ServerApp ran a round of its own
        assert StateStore(tmp_path / "data" / "state" / site, site).load().rounds_trained == 2
