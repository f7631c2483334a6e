"""End to end on loopback with Flower's real processes: each hospital makes its key (osteo-keygen), the
coordinator registers the public halves (osteo-provision --site-key), flower-server (SuperLink with TLS and
SuperNode authentication), three osteo-client SuperNodes, two short rounds in which every site is named by
its registered key (read from Flower's node registry); an unregistered site's SuperNode is refused."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from federation_helpers import SITES, allow_small_cohorts, make_caches, small_overrides
from osteofl.keys import make_site_key
from osteofl.protocol import site_key_dir

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not seen; flower-server said:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tls_authenticated_federation_on_loopback(tmp_path: Path) -> None:
    make_caches(tmp_path, {**SITES, "intruder": "hologic"})
    allow_small_cohorts(tmp_path, [*SITES, "intruder"])
    with open(tmp_path / "data" / "sites" / "site_b" / "site.yaml", "a") as own:  # site_b's hardware is small
        own.write("  compute:\n    max_batch_size: 6\n")  # not below its min_cohort (5): it would train no batch
    with open(tmp_path / "data" / "sites" / "site_a" / "site.yaml", "a") as own:  # site_a's own DP floor
        own.write("  privacy: {enabled: true, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-5, "
                  "epsilon_budget: 100}\n")
    port = _free_port()
    overrides = small_overrides(
        tmp_path, **{"federation.superlink.port": port, "federation.superlink.address": f"127.0.0.1:{port}",
                     "federation.min_available_nodes": 3, "federation.min_train_replies": 3,
                     "federation.final_eval_split": "null", "federation.identity": "key",
                     "federation.round_timeout": 300})  # one ClientApp process per message: slow on a busy CI box
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    fingerprints, sent = {}, []
    for site in SITES:  # at each hospital: its own key pair, only the public half is sent
        gen = subprocess.run([str(BIN / "osteo-keygen"), "--site", site, *overrides], capture_output=True,
                             text=True, env=env)
        assert gen.returncode == 0, gen.stderr
        fingerprints[site] = gen.stdout.split("fingerprint: ")[1].split()[0]
        sent += ["--site-key", f"{site}={site_key_dir(tmp_path / 'data' / 'state' / site) / f'{site}_key.pub'}"]
    prov = subprocess.run([str(BIN / "osteo-provision"), *sent, *overrides], capture_output=True, text=True, env=env)
    assert prov.returncode == 0, prov.stderr
    assert all(f"{s}: registered public key {fingerprints[s]}" in prov.stdout for s in SITES)
    pki = tmp_path / "data" / "pki"
    assert (pki / "server.pem").exists()
    assert {p.name for p in (pki / "sites").rglob("*") if p.is_file()} == {f"{s}_key.pub" for s in SITES}
    # a well-formed key, where osteo-client looks for it, that the SuperLink was never told about
    make_site_key(site_key_dir(tmp_path / "data" / "state" / "intruder"), "intruder")

    procs: list[subprocess.Popen] = []
    server_log = tmp_path / "server.log"
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen([str(BIN / "flower-server"), *overrides], stdout=log,
                                      stderr=subprocess.STDOUT, env=env)
        procs.append(server)
        _wait_for_line(server, server_log, "sites registered", 120)

        def client(site: str, local_port: int, log_name: str, *flags: str) -> subprocess.Popen:
            with open(tmp_path / log_name, "w") as out:
                p = subprocess.Popen([str(BIN / "osteo-client"), "--site", site, "--local-port", str(local_port),
                                      *flags, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            return p

        # without retrying: the SuperLink cannot tell it from a site whose previous session it still counts
        intruder = client("intruder", _free_port(), "intruder.log", "--activation-wait", "0")
        assert intruder.wait(timeout=120) == 1, "an unregistered SuperNode must be refused"
        for i, site in enumerate(SITES):  # one hospital runs without the warm worker: both paths in one run
            client(site, _free_port(), f"{site}.log", *(["--no-worker"] if i == 2 else []))
        assert server.wait(timeout=780) == 0, server_log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    run = tmp_path / "outputs" / "federated"
    history = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    assert [r["phase"] for r in history] == ["ssl", "task"]
    assert all(set(r["site_train"]) == set(SITES) and not r["rejected"] for r in history)
    # every site was named by the key it authenticated with (Flower's node registry), not by its reply
    assert all(r["identity"] == {s: "key" for s in SITES} for r in history)
    ckpt = sorted((run / "checkpoints").glob("round-*.npz"))
    assert [p.name for p in ckpt] == ["round-0001.npz", "round-0002.npz"]
    with np.load(ckpt[-1]) as data:
        assert any(k.startswith("arrays/encoder.") for k in data.files)
        assert not any(k.startswith(("arrays/local_expert.", "arrays/calibration.")) for k in data.files)
    for site in SITES:
        assert (tmp_path / "data" / "state" / site / "site_state.pt").stat().st_size > 0
    intruder_log = (tmp_path / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in intruder_log and "refused to activate site intruder" in intruder_log
    for i, site in enumerate(SITES):  # two sites answered from their warm workers, the third in process
        assert ("site worker: train answered" in (tmp_path / f"{site}.log").read_text()) == (i != 2)
    # site_b's own site.yaml capped its batches: its worker said so at start, the coordinator's log names the cut
    assert "compute caps: max_batch_size 6" in (tmp_path / "site_b.log").read_text()
    # site_a's DP floor, which the run did not ask for: stated at start, spent in both rounds, the others none
    assert re.search(r"DP floor: noise 1.0, clip 1.0, delta 1e-05; epsilon 0.00 spent of 100.0; a round alone at "
                     r"batch \d+ costs \d+\.\d\d per ssl round", (tmp_path / "site_a.log").read_text())
    eps = [r["site_train"]["site_a"]["epsilon"] for r in history]
    assert 0 < eps[0] < eps[1] and all(r["site_train"][s]["epsilon"] == 0 for r in history for s in ("site_b", "site_c"))
    assert "site site_b's policy caps train.batch_size at 6 (this run asks 8)" in server_log.read_text()
