"""The warm site worker (client/worker.py, issue 11 §3): the ClientApp process relays each message over a
private local socket to the worker ``osteo-client`` started; the worker answers with the same handlers,
policy and audit as in process, keeps its own configuration against what a relayed request claims, survives
a malformed request, and a dead worker gives a clean Error reply instead of a hang."""
from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from federation_helpers import SITES, LocalGrid, make_caches, small_overrides
from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import protocol
from osteofl.client.client_app import make_client_app
from osteofl.client.worker import READY
from osteofl.client.worker_wire import listen
from osteofl.server.server_app import Federation

pytestmark = pytest.mark.usefixtures("task_identity")


class Worker:
    """One site's worker process, started the way osteo-client starts it."""

    def __init__(self, root: Path, site: str, overrides: list[str]) -> None:
        self.site = site
        self.socket = root / "run" / f"{site}.sock"
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        node = {"site": site, "cache-dir": str(root / "data" / "cache" / site),
                "state-dir": str(root / "data" / "state" / site), "overrides": shlex.join(overrides)}
        self.log = root / f"{site}-worker.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "osteofl.client.worker", "--socket", str(self.socket),
                                          "--node-config", json.dumps(node)], stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while READY not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.2)

    def answered(self, kind: str) -> int:
        return self.log.read_text().count(f"site worker: {kind} answered")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[dict[str, Worker]]:
    make_caches(tmp_path)
    started = {site: Worker(tmp_path, site, small_overrides(tmp_path)) for site in SITES}
    try:
        for w in started.values():
            w.wait_ready()
        yield started
    finally:
        for w in started.values():
            w.proc.kill()
            w.proc.wait()


def _grid(workers: dict[str, Worker], run: list[str], node_overrides: dict[str, str] | None = None):
    """The Grid delivers to the plain deployed ClientApp (no overrides of its own) with a worker per site."""
    return LocalGrid(make_client_app(), SITES, run_config={"overrides": shlex.join(run)}, node_overrides=node_overrides,
                     node_config={s: {protocol.NODE_WORKER: str(w.socket)} for s, w in workers.items()})


@pytest.mark.slow
def test_a_federation_runs_through_the_site_workers(tmp_path: Path, workers: dict[str, Worker]) -> None:
    overrides = small_overrides(tmp_path)
    pids = {s: w.proc.pid for s, w in workers.items()}
    grid = _grid(workers, overrides)
    history = Federation(grid, compose(overrides)).run()

    assert [(r["round"], r["phase"]) for r in history.records] == [(1, "ssl"), (2, "task")]
    assert all(set(r["site_train"]) == set(SITES) and set(r["site_eval"]) == set(SITES) for r in history.records)
    for site, w in workers.items():  # every message was answered by the one warm process of its site
        assert w.proc.poll() is None and w.proc.pid == pids[site]
        assert (w.answered("query"), w.answered("train")) == (1, 2), w.log.read_text()[-2000:]
        assert w.answered("evaluate") >= 2
        audit = [json.loads(line) for line in (tmp_path / "data" / "state" / site / "audit.jsonl").read_text().splitlines()]
        assert [a["kind"] for a in audit].count("train") == 2
        # the site's own minimum cohort (5, from its own overrides) let its aggregates out: evaluated, not withheld
        assert not any(protocol.withheld_reason(m) for m in grid.sent)
    assert stat.S_IMODE(workers["site_a"].socket.stat().st_mode) == 0o600
    # a worker restarted mid-federation starts on the site's trained state, whatever model the run uses
    workers["site_a"].proc.kill()
    workers["site_a"].proc.wait()
    workers["site_a"] = again = Worker(tmp_path, "site_a", small_overrides(tmp_path)[:1])
    again.wait_ready()


@pytest.mark.slow
def test_the_worker_keeps_its_own_policy_against_a_relayed_node_config(tmp_path: Path,
                                                                       workers: dict[str, Worker]) -> None:
    """The coordinator asks for the whole model, and the relayed request claims the hospital opted in: the
    worker answers with the configuration osteo-client started it with, so every site refuses."""
    overrides = small_overrides(tmp_path)
    run = [*overrides, "federation.share_all=true"]
    grid = _grid(workers, run, node_overrides={s: "site.policy.allow_share_all=true" for s in SITES})
    with pytest.raises(ConfigError, match="only 0 sites answered"):
        Federation(grid, compose(run)).handshake()
    assert len(grid.sent) == len(SITES)
    assert all(m.has_error() and m.error.code == protocol.ERROR_POLICY_REFUSED for m in grid.sent)


@pytest.mark.slow
def test_a_bad_request_is_dropped_and_a_dead_worker_is_a_clean_error(tmp_path: Path,
                                                                     workers: dict[str, Worker]) -> None:
    overrides = small_overrides(tmp_path)
    with socket.socket(socket.AF_UNIX) as s:  # garbage that is not a frame: dropped, the worker goes on
        s.connect(str(workers["site_a"].socket))
        s.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00{oops")
    workers["site_c"].proc.kill()
    workers["site_c"].proc.wait()
    grid = _grid(workers, overrides)
    fed = Federation(grid, compose(overrides))
    _, answered = fed.handshake()
    assert set(answered) == {"site_a", "site_b"}
    errors = [m for m in grid.sent if m.has_error()]
    assert len(errors) == 1 and errors[0].error.code == protocol.ERROR_SITE_FAILED
    assert "site worker did not answer" in errors[0].error.reason and str(tmp_path) not in errors[0].error.reason
    assert "dropped a request" in workers["site_a"].log.read_text() and workers["site_a"].proc.poll() is None


def test_the_worker_socket_is_private_to_the_user(tmp_path: Path) -> None:
    with listen(tmp_path / "w.sock") as sock:
        assert stat.S_IMODE(os.stat(sock.getsockname()).st_mode) == 0o600


def test_the_clientapp_module_imports_neither_torch_nor_the_science_library() -> None:
    """Flower starts a process per message and imports the ClientApp module in it: with a site worker,
    that must not cost torch's and osteo_model's imports (issue 11: ~3 s and ~400 MB per message)."""
    code = "import sys, osteofl.client.client_app; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "sklearn", "monai", "scipy", "SimpleITK", "radiomics")
             or (m.startswith("osteo_model.") and m != "osteo_model.errors")]
    assert "osteofl.client.worker_wire" in loaded and heavy == []
