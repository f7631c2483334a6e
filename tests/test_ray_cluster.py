"""`osteo-sim` on an existing Ray cluster (``federation.simulation.ray_address``): the simulated sites run as
actors of that cluster, the run starts no Ray of its own, and it still produces its report. Also how the
option is read: unset keeps a run on a private Ray instance even while a cluster runs on the machine."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from federation_helpers import make_caches, small_overrides
from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import runtime
from osteofl.keeper import descendants
from osteofl.simulation.sim import federation_config, ray_address, simulate
from test_processes import alive

SITES = {"site_a": "hologic", "site_b": "ge_lunar"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_naming(text: str) -> list[int]:
    """Running processes whose command line holds ``text`` (the cluster's own temp dir: only its processes)."""
    return alive([int(p) for p in os.listdir("/proc") if p.isdigit() and text in _cmdline(int(p))])


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster (``ray start --head --block``) on a free loopback port with its own temp dir;
    yields (address, temp dir). It runs below our process keeper, and teardown stops exactly that tree: not
    ``ray stop``, which kills every Ray process on the machine by name, other people's runs included."""
    pytest.importorskip("ray", reason="ray is not importable: install flwr[simulation] to attach to a cluster")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short (<108 chars)
    port = _free_port()
    env = {**runtime.flower_env(temp / "flwr_home"), "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = temp / "ray_start.log"
    fixed = ("--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port")  # free, not defaults
    with open(log_path, "ab") as log:
        head = runtime.start(["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                              "127.0.0.1", "--temp-dir", str(temp), "--num-cpus", "2", "--include-dashboard",
                              "false", "--disable-usage-stats",
                              *[a for opt in fixed for a in (opt, str(_free_port()))]], env, log)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        runtime.stop(head, grace=15)
        left = _processes_naming(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], [_cmdline(p) for p in left]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_osteo_sim_runs_on_an_existing_ray_cluster(tmp_path: Path, ray_cluster: tuple[str, Path]) -> None:
    address, temp = ray_cluster
    make_caches(tmp_path, {**SITES, "site_ext": "hologic"})
    overrides = small_overrides(tmp_path, **{
        "federation.sites": f"[{','.join(SITES)}]", "synth.external_site": "site_ext", "federation.ssl_rounds": 0,
        "federation.task_rounds": 1, "federation.onboard_labeled_patients": 3, "federation.onboard_epochs": 1,
        "federation.round_timeout": 600, "federation.simulation.ray_address": address})
    spawned: dict[int, str] = {}
    done = threading.Event()

    def watch() -> None:  # what the run itself spawned, sampled while it runs
        while not done.wait(0.3):
            for pid in descendants(os.getpid()):
                spawned.setdefault(pid, _cmdline(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines: list[str] = []
    try:
        report = simulate(overrides, log=lines.append, baselines=False, prepare=False)
    finally:
        done.set()
        watcher.join()
    assert any(f"on the Ray cluster at {address}" in line for line in lines), lines
    own = " ".join(cmd for cmd in spawned.values() if str(temp) not in cmd)  # not the cluster's processes
    assert "flwr-simulation" in own, own  # the simulation process was the run's own ...
    assert "gcs_server" not in own and "raylet" not in own, own  # ... but it started no Ray of its own
    logs = temp / "session_latest" / "logs"  # the cluster's own: its workers ran the sites' ClientApps
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs.glob("worker-*")), sorted(logs.iterdir())
    assert set(report["results"]["osteofl"]) == set(SITES)
    assert all(0.0 <= m["mae_bmd"] < 1.0 for m in report["results"]["osteofl"].values())
    history = json.loads((tmp_path / "outputs" / "sim" / "osteofl" / "history.json").read_text())
    assert [r["round"] for r in history] == [1] and set(history[0]["site_train"]) == set(SITES)
    assert (tmp_path / "outputs" / "sim" / "report.json").is_file()


def test_ray_address_defaults_to_a_private_instance(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}"])
    assert ray_address(cfg) == "local"  # Ray's own default would join any cluster `ray start` left here
    cfg = compose([f"paths.root={tmp_path}", "federation.simulation.ray_address=auto"])
    assert ray_address(cfg) == "auto"


def test_ray_address_refuses_what_it_cannot_reach(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", "federation.simulation.ray_address=headnode"])
    with pytest.raises(ConfigError, match="expected null, auto or HOST:PORT"):
        ray_address(cfg)
    port = _free_port()  # nothing listens there
    cfg = compose([f"paths.root={tmp_path}", f"federation.simulation.ray_address=127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match=f"ray_address=127.0.0.1:{port}: no Ray cluster answers"):
        ray_address(cfg)


def test_osteo_sim_refuses_an_unreachable_cluster_before_any_work(tmp_path: Path) -> None:
    overrides = [f"paths.root={tmp_path}", f"federation.simulation.ray_address=127.0.0.1:{_free_port()}"]
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        simulate(overrides, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no synthetic site generated, nothing prepared, no outputs


def test_federation_config_carries_the_resources_per_site(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", "federation.simulation.client_cpus=2",
                   "federation.simulation.client_gpus=0.25"])
    assert federation_config(cfg, 16) == ("num-supernodes=16 client-resources-num-cpus=2 "
                                          "client-resources-num-gpus=0.25")
    cfg = compose([f"paths.root={tmp_path}", "federation.simulation.client_cpus=0.5"])
    with pytest.raises(ConfigError, match="client_cpus=0.5: expected a whole number"):
        federation_config(cfg, 16)
