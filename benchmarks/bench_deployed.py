"""A deployed round against a simulated one (issue 11 §3: "a deployed round costs six simulated ones").

The same 3 sites (random-content caches of the default crop size), the same default model and the same
rounds and local steps run three ways on this machine:
- simulated: ``osteo-sim``'s path (Flower's simulation engine, ``simulation/sim.py``);
- deployed: ``flower-server`` and three ``osteo-client`` processes over TLS with node authentication on
  loopback, as a hospital runs it: each site with its warm worker (client/worker.py), its fork server
  for Flower's per-message ClientApp process (client/fork_server.py) and its SuperNode polling every
  ``site.poll_s`` (client/supernode_launch.py);
- deployed ``--no-worker``: every message pays its imports in Flower's fresh ClientApp process (before;
  ``site.poll_s`` still applies).
Each site gets one CPU thread in every mode (Ray's default for a simulated site; OMP_NUM_THREADS=1 for
the deployed processes). Round times come from each run's history.json (round 1 also pays the start-up and is left out). The
per-message overhead at a site is the deployed round's excess over the simulated one, divided by the two
messages (train, evaluate) a site answers per round: everything deployment adds (Flower's per-message
process, TLS, the relay to the worker) is counted in it. Goals: deployed <= 1.5 x simulated, <= 1 s per message.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.bench_federation import SITES, _random_cache
from benchmarks.bench_processes import _free_port
from osteo_model.config import compose

BIN = Path(sys.executable).parent
ROUNDS = ["federation.ssl_rounds=1", "federation.task_rounds=3", "federation.local_steps=5"]  # the demo's


def _round_seconds(run_dir: Path) -> float:
    history = json.loads((run_dir / "history.json").read_text())
    return float(np.mean(np.diff([r["seconds"] for r in history])))  # cumulative; round 1 pays the start


def _deployed(root: Path, overrides: list[str], worker: bool) -> float:
    port = _free_port()
    mode = "worker" if worker else "plain"
    # a SuperLink database of its own: the previous mode's SuperNodes count as online for ~60 s after their
    # SuperLink went away (Flower's heartbeat patience), and a new SuperLink on that database refuses them
    run = [*overrides, f"federation.superlink.port={port}", f"federation.superlink.address=127.0.0.1:{port}",
           f"federation.run_name=deployed-{mode}", f"paths.outputs={root / ('outputs-' + mode)}"]
    # one CPU thread per site, as Flower's simulation engine gives each simulated site one CPU
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as out:
            procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:], *run], stdout=out,
                                          stderr=subprocess.STDOUT, env=env))
        return procs[-1]

    try:
        server = start(["flower-server"], f"server-{port}")
        deadline = time.monotonic() + 300
        while "sites registered" not in (logs / f"server-{port}.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((logs / f"server-{port}.log").read_text()[-3000:])
            time.sleep(0.5)
        for site in SITES:
            start(["osteo-client", "--site", site, "--local-port", str(_free_port()), *([] if worker else ["--no-worker"])],
                  f"{site}-{port}")
        if server.wait(timeout=1800) != 0:
            raise RuntimeError((logs / f"server-{port}.log").read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return _round_seconds(root / f"outputs-{mode}" / f"deployed-{mode}")


def _import_seconds(modules: str) -> float:
    """Wall time of a fresh interpreter importing ``modules`` (best of 3): what each message's process pays."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def run() -> Iterator[tuple[str, float, str]]:
    from osteofl.simulation.sim import run_federated

    root = Path(tempfile.mkdtemp(prefix="bench-deployed-"))
    try:
        overrides = [f"paths.root={root}", *ROUNDS, "federation.final_eval_split=null",
                     f"federation.sites=[{','.join(SITES)}]", "federation.min_available_nodes=3",
                     "site.policy.min_cohort=5"]
        size = int(compose(overrides).crop.size)
        for site, manufacturer in SITES.items():
            _random_cache(root / "data" / "cache" / site, site, manufacturer, size, n_patients=34)
        subprocess.run([str(BIN / "osteo-provision"), "--generate-site-keys", *overrides], check=True,
                       capture_output=True)
        run_federated([*overrides, "federation.run_name=simulated"], len(SITES), "benchmark", log=lambda m: None)
        simulated = _round_seconds(root / "outputs" / "simulated")
        warm = _deployed(root, overrides, worker=True)
        plain = _deployed(root, overrides, worker=False)
    except BaseException:
        print(f"bench_deployed failed: its logs and outputs are kept in {root}", flush=True)
        raise
    shutil.rmtree(root)
    flower = "flwr.supernode.runtime.run_clientapp"
    yield "fresh ClientApp process imports: Flower + relay (what the fork server saves)", _import_seconds(f"{flower}, osteofl.client.client_app"), "s"
    yield "fresh ClientApp process imports: Flower + handlers (--no-worker)", _import_seconds(f"{flower}, osteofl.client.handlers"), "s"
    yield "simulated round (osteo-sim)", simulated, "s"
    yield "deployed round, TLS, warm site workers + fork server", warm, "s"
    yield "deployed round, TLS, --no-worker", plain, "s"
    yield "deployed (warm) / simulated (goal <= 1.5)", warm / simulated, "x"
    yield "per-message overhead, warm (goal <= 1 s)", (warm - simulated) / 2, "s"
    yield "per-message overhead, --no-worker", (plain - simulated) / 2, "s"
