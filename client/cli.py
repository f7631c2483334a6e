"""`osteo-client --site X [hydra overrides]`: run hospital X's SuperNode.

It dials out to the SuperLink (TLS with the federation's root certificate, authenticated by the site's
private key); the hospital opens no inbound port (the SuperNode's own runtime API listens on loopback
only, ``--local-port``). Beside it runs the site's warm worker (client/worker.py), which holds the
imports and config the handlers need, so the ClientApp process Flower starts for each message only
relays it, and a fork server (client/fork_server.py) hands Flower that ClientApp process with Flower's
imports already paid. The SuperNode asks for work every ``site.poll_s`` seconds
(client/supernode_launch.py). The site's prepared cache stays at the site, and its local expert,
calibration head, optimiser and privacy accountant stay in its state folder. All run below keepers
(osteofl/keeper.py): when one ends, or osteo-client is stopped or killed, all are gone. They hold the
site's state folder locked (osteo_model/run_lock.py), so a second osteo-client of the site refuses to start.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from osteo_model import run_lock
from osteo_model.cache import SiteCache
from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site
from osteo_model.errors import OsteoError
from osteofl import runtime
from osteofl.client.probe import superlink_mismatch
from osteofl.protocol import (
    NODE_CACHE_DIR, NODE_SITE, NODE_SITE_DIR, NODE_STATE_DIR, NODE_WORKER, OVERRIDES, site_key_dir, site_key_paths,
)

WORKER_START_S = 180.0  # imports and the first config on a busy 2-core machine take ~10 s; a broken site fails fast
NOT_ACTIVATED = b"Failed to activate SuperNode"  # what flower-supernode prints then (it exits 1, as for any error)
RETRY_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="this hospital's site name (its keys and folders)")
    p.add_argument("--superlink", help="host:port of the SuperLink (default federation.superlink.address)")
    p.add_argument("--root-certificates", help="the federation's CA certificate (default <pki>/ca.pem)")
    p.add_argument("--auth-key", help="this site's private key (default <site.state_dir>/keys/<site>_key, osteo-keygen)")
    p.add_argument("--local-port", type=int, default=9094,
                   help="loopback port of the SuperNode's local runtime API (distinct per SuperNode on one host)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (testing only)")
    p.add_argument("--telemetry", action="store_true", help="allow Flower's usage telemetry (off by default)")
    p.add_argument("--activation-wait", type=float, default=90.0, metavar="S",
                   help="keep retrying for S seconds when the SuperLink refuses to activate this site: it still "
                        "counts a session that ended less than ~60 s ago (Flower's heartbeat patience)")
    p.add_argument("--no-worker", action="store_true",
                   help="no warm site worker and no fork server: every message pays the imports in its own "
                        "process (slower; for comparison)")
    return p


def node_config(args: argparse.Namespace, cfg, overrides: Sequence[str] = ()) -> dict[str, str]:
    """What the site's handlers read: its name and folders, and the hospital's own overrides, from which the
    site's policy and privacy floor are composed (client/policy.py), never from the run config."""
    config = {NODE_SITE: args.site, NODE_CACHE_DIR: str(Path(cfg.site.cache_dir).resolve()),
              NODE_STATE_DIR: str(Path(cfg.site.state_dir).resolve()), NODE_SITE_DIR: str(Path(cfg.site.dir).resolve())}
    if overrides:
        config[OVERRIDES] = shlex.join(overrides)
    return config


def _toml(config: dict[str, str]) -> str:
    """Flower's ``--node-config`` string."""
    bad = [k for k, v in config.items() if '"' in v or "\\" in v]
    if bad:
        raise OsteoError(None, f"{bad} hold a double quote or a backslash; put such settings in site.yaml instead")
    return " ".join(f'{k}="{v}"' for k, v in config.items())


def poll_s(cfg) -> float | None:
    """``site.poll_s``, checked: how often this site's Flower processes look for work (None: Flower's waits)."""
    poll = cfg.site.get("poll_s")
    if poll is not None and not float(poll) > 0:
        raise OsteoError(None, f"site.poll_s must be a number of seconds > 0, or null for Flower's own waits; got {poll}")
    return None if poll is None else float(poll)


def supernode_command(args: argparse.Namespace, cfg, overrides: Sequence[str] = (), worker: Path | None = None) -> list[str]:
    pki = Path(cfg.paths.pki)
    config = node_config(args, cfg, overrides)
    if worker is not None:
        config[NODE_WORKER] = str(worker)
    poll = poll_s(cfg)
    launcher = ["flower-supernode"] if poll is None else [sys.executable, "-m", "osteofl.client.supernode_launch",
                                                          f"{poll:g}", "--"]
    cmd = [*launcher, "--superlink", args.superlink or str(cfg.federation.superlink.address),
           "--port", str(args.local_port), "--host", "127.0.0.1", "--node-config", _toml(config)]
    if args.insecure:
        return cmd + ["--insecure"]
    key = Path(args.auth_key) if args.auth_key else site_key_paths(site_key_dir(cfg.site.state_dir), args.site)[0]
    ca = Path(args.root_certificates) if args.root_certificates else pki / "ca.pem"
    for path, what in ((ca, "root certificate missing: copy it from the coordinator (osteo-provision)"),
                       (key, f"site key missing: run `osteo-keygen --site {args.site}` here and send the .pub "
                             "to the coordinator")):
        if not path.is_file():
            raise OsteoError(path, what)
    return cmd + ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def worker_command(config: dict[str, str], socket_path: Path) -> list[str]:
    return [sys.executable, "-m", "osteofl.client.worker", "--socket", str(socket_path), "--node-config", json.dumps(config)]


def fork_server_command(socket_path: Path, cfg) -> list[str]:
    poll = poll_s(cfg)
    return [sys.executable, "-m", "osteofl.client.fork_server", "--socket", str(socket_path),
            *([] if poll is None else ["--first-retry", f"{poll:g}"])]


def write_clientapp_shim(bin_dir: Path, fork_socket: Path, real: Path | None = None) -> Path:
    """``bin_dir/flwr-clientapp``: the stand-in that hands each message's ClientApp to the fork server
    (Flower's own program ``real`` if the server is not there). ``bin_dir`` goes first on the SuperNode's PATH."""
    from osteofl.client import clientapp_shim

    bin_dir.mkdir(mode=0o700, exist_ok=True)
    real = real or Path(sys.executable).parent / "flwr-clientapp"
    shim = bin_dir / "flwr-clientapp"
    shim.write_text("#!/bin/sh\n" + shlex.join(["exec", sys.executable, "-S", "-E", clientapp_shim.__file__,
                                                 str(fork_socket), str(real)]) + ' "$@"\n')
    shim.chmod(0o700)
    return shim


def supernode_env(env: dict[str, str], cfg, bin_dir: Path | None) -> dict[str, str]:
    """The SuperNode's environment: the stand-in first on PATH, and its SuperExec asking for tasks as often
    as the SuperNode asks the SuperLink (``site.poll_s``; Flower's default is every 1 s)."""
    env = dict(env)
    if bin_dir is not None:
        env["PATH"] = str(bin_dir) + os.pathsep + env["PATH"]
    if (poll := poll_s(cfg)) is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{min(max(poll, 0.01), 60.0):g}"
    return env


def _wait_ready(proc: runtime.Owned, socket_path: Path, what: str) -> None:
    """Until ``proc`` listens (it binds once warmed up); its own one-line error is already printed if not."""
    deadline = time.monotonic() + WORKER_START_S
    while not socket_path.exists():
        if proc.poll() is not None:
            raise OsteoError(None, f"the {what} stopped while starting (exit {proc.poll()}; its error is above)")
        if time.monotonic() > deadline:
            raise OsteoError(None, f"the {what} was not ready after {WORKER_START_S:.0f} s")
        time.sleep(0.2)


def _supervise(supernode: runtime.Owned, worker: runtime.Owned | None) -> int:
    """The SuperNode's exit code; if the worker dies first, every later message would fail: stop instead."""
    while (code := supernode.poll()) is None:
        if worker is not None and worker.poll() is not None:
            print(f"osteo-client: the site worker stopped (exit {worker.poll()}); stopping the SuperNode", flush=True)
            return 1
        time.sleep(0.5)
    return code


def start_supernode(cmd: list[str], env: dict[str, str],
                    keep_fds: Sequence[int] = ()) -> tuple[runtime.Owned, Callable[[], bool]]:
    """The SuperNode below its keeper, its output passed through to ours, and a question to ask once it has
    ended: did it say that the SuperLink refused to activate it? (Its exit code cannot tell: Flower exits 1
    for every error.)"""
    refused = threading.Event()
    owned = runtime.start(cmd, env, log=subprocess.PIPE, keep_fds=keep_fds)

    def echo() -> None:
        for line in owned.proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if NOT_ACTIVATED in line:
                refused.set()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()

    def was_refused() -> bool:
        reader.join(timeout=2.0)  # its last lines, until the pipe closes
        return refused.is_set()

    return owned, was_refused


def serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check the site and the SuperLink's transport, start the site worker, then run the SuperNode until
    either ends or we are stopped."""
    cfg = compose_site([*overrides, f"site.name={args.site}"])
    cache = SiteCache.open(cfg.site.cache_dir)  # fail early, in one line, if the site is not prepared
    private = None if args.no_worker else Path(tempfile.mkdtemp(prefix="osteo-worker-"))  # 0700
    socket_path = None if private is None else private / "site.sock"
    cmd = supernode_command(args, cfg, overrides, socket_path)
    address = cmd[cmd.index("--superlink") + 1]
    ca = None if args.insecure else Path(cmd[cmd.index("--root-certificates") + 1])
    owned: list[runtime.Owned] = []
    lock: int | None = None  # the site's state folder: one osteo-client at a time (run_lock)

    def stop_all() -> None:
        nonlocal lock
        runtime.stop(*owned)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        if lock is not None:
            os.close(lock)
            lock = None

    try:
        if mismatch := superlink_mismatch(address, ca):
            raise OsteoError(None, mismatch)
        lock = run_lock.acquire(Path(cfg.site.state_dir), f"site {args.site}'s state folder", holder="osteo-client")
        env = runtime.flower_env(Path(cfg.site.state_dir) / "flwr_home", telemetry=args.telemetry)
        print(f"osteo-client: site {args.site} ({len(cache)} vertebrae) -> {address}; "
              f"{'INSECURE' if args.insecure else 'TLS + node authentication'}; "
              f"{'no site worker' if private is None else 'warm site worker'}; {runtime.say_telemetry(args.telemetry)}",
              flush=True)
        runtime.exit_on_sigterm()
        worker, bin_dir = None, None
        if private is not None:
            worker = runtime.start(worker_command(node_config(args, cfg, overrides), socket_path), env, keep_fds=[lock])
            forks = runtime.start(fork_server_command(private / "fork.sock", cfg), env, keep_fds=[lock])
            owned += [worker, forks]
            _wait_ready(worker, socket_path, "site worker")
            _wait_ready(forks, private / "fork.sock", "fork server")
            bin_dir = write_clientapp_shim(private / "bin", private / "fork.sock").parent
        node_env = supernode_env(env, cfg, bin_dir)
        deadline = time.monotonic() + args.activation_wait
        while True:
            supernode, was_refused = start_supernode(cmd, node_env, keep_fds=[lock])
            owned.append(supernode)
            code = _supervise(supernode, worker)
            refused = code != 0 and was_refused()
            if not refused or time.monotonic() + RETRY_S > deadline:
                break
            owned.pop()
            print(f"osteo-client: the SuperLink did not activate site {args.site}; retrying in {RETRY_S:.0f} s "
                  f"(for up to {args.activation_wait:.0f} s in all)", flush=True)
            time.sleep(RETRY_S)
        if refused:
            raise OsteoError(None, f"the SuperLink refused to activate site {args.site}: either its public key is not "
                                   "registered with the coordinator (osteo-provision --site-key), or the SuperLink "
                                   "still counts this site's previous session as connected (Flower releases it "
                                   "~60 s after its last heartbeat; --activation-wait)")
        return code
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the children, then leave without a slow teardown
        stop_all()
        runtime.exit_now(130)
    finally:
        stop_all()


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    return run_cli(lambda: serve(args, overrides))


if __name__ == "__main__":
    raise SystemExit(main())
