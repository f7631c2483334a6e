"""`flower-server [--insecure] [--resume] [--serve] [hydra overrides]`: the coordinating site's command.

Starts Flower's SuperLink with TLS and SuperNode authentication (unless ``--insecure``), bound to
127.0.0.1 unless ``federation.superlink.host`` says otherwise, registers the provisioned sites' public
keys, submits the OsteoFL run with ``flwr run`` and streams its progress; when the run ends the SuperLink
is stopped (``--serve`` keeps it up). Everything Flower writes goes under ``<outputs>/superlink``.

The SuperLink's Control API (used by ``flwr``) shares the port with the Fleet API and is not
authenticated in open-source Flower: hospitals get the Fleet API alone through the proxy that
``--proxy-config`` writes (server/proxy.py). Every Flower process runs below a keeper (osteofl/keeper.py)
and the run is locked (osteo_model/run_lock.py): nothing outlives this command, and no second server of a
live run starts.
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from omegaconf import DictConfig

from osteo_model import run_lock
from osteo_model.cli._common import run_cli
from osteo_model.config import compose
from osteo_model.errors import ConfigError, OsteoError
from osteofl import runtime
from osteofl.server import provision, proxy
from osteofl.server.checkpoint import load_latest

APP_DIR = Path(__file__).parent / "flwr_app"
CONNECTION = "osteofl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-server", description=__doc__.splitlines()[0])
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    p.add_argument("--resume", action="store_true", help="carry on from the last checkpoint of this run")
    p.add_argument("--serve", action="store_true", help="keep the SuperLink running after the run ends")
    p.add_argument("--telemetry", action="store_true", help="allow Flower's usage telemetry (off by default)")
    p.add_argument("--proxy-config", metavar="HOST:PORT",
                   help="only write the nginx config that serves hospitals the Fleet API alone on HOST:PORT "
                        "(server/deploy/nginx.conf; the SuperLink stays on loopback) and exit")
    return p


def absolute_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides with ``paths.root`` made absolute (the ServerApp runs in Flower's cwd)."""
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("paths.root=")), ".")
    return [o for o in overrides if not o.startswith("paths.root=")] + [f"paths.root={Path(root).resolve()}"]


def write_connection(flwr_home: Path, cfg: DictConfig, insecure: bool) -> None:
    """``$FLWR_HOME/config.toml`` with our one SuperLink connection."""
    dial = f"{dial_host(cfg)}:{cfg.federation.superlink.port}"
    security = "insecure = true" if insecure else f'root-certificates = "{Path(cfg.paths.pki).resolve() / "ca.pem"}"'
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{dial}"\n{security}\n')


def superlink_command(cfg: DictConfig, insecure: bool, database: Path) -> list[str]:
    sl = cfg.federation.superlink
    cmd = ["flower-superlink", "--host", str(sl.host), "--port", str(sl.port), "--database", str(database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        return cmd + ["--insecure"]
    pki = Path(cfg.paths.pki)
    return cmd + ["--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
                  "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth"]


def run_command(overrides: list[str], resume: bool) -> list[str]:
    run_config = f"overrides={_toml_string(shlex.join(overrides))} resume={'true' if resume else 'false'}"
    return ["flwr", "run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--stream"]


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dial_host(cfg: DictConfig) -> str:
    """Where our own tools reach the SuperLink: loopback when it binds every interface."""
    host = str(cfg.federation.superlink.host)
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Lock the run, start the SuperLink, register the sites, submit the run and follow it to its end."""
    cfg = compose(overrides)
    if args.proxy_config:
        conf = proxy.write(cfg, args.proxy_config, Path(cfg.paths.outputs) / "superlink" / "proxy")
        print(f"flower-server: wrote {conf}: nginx listens on {args.proxy_config} and passes on the Fleet API "
              f"only; hospitals set federation.superlink.address=<this host's name>:{args.proxy_config.rpartition(':')[2]} "
              f"(a name in federation.superlink.san); run: nginx -p {conf.parent} -c {conf}", flush=True)
        return 0
    sites = [str(s) for s in cfg.federation.sites]
    if not args.insecure:
        provision.provision(cfg.paths.pki, sites, cfg.federation.superlink.san)
    run_dir = Path(cfg.paths.outputs) / str(cfg.federation.run_name)
    lock = run_lock.acquire(run_dir, f"run {cfg.federation.run_name}")  # released by the kernel when all of us are gone
    owned: list[runtime.Owned] = []
    try:
        home = Path(cfg.paths.outputs) / "superlink"
        sl = cfg.federation.superlink
        if runtime.port_in_use(str(sl.host), int(sl.port)):
            raise ConfigError(None, f"port {sl.host}:{sl.port} is already in use (another SuperLink?): "
                                    f"stop it or set federation.superlink.port")
        flwr_home = home / "flwr_home"
        env = runtime.flower_env(flwr_home, telemetry=args.telemetry)
        write_connection(flwr_home, cfg, args.insecure)
        database = home / "state.db"
        print(f"flower-server: SuperLink on {sl.host}:{sl.port} "
              f"({'INSECURE' if args.insecure else 'TLS + SuperNode authentication'}); {runtime.say_telemetry(args.telemetry)}",
              flush=True)
        runtime.exit_on_sigterm()
        with open(home / "superlink.log", "ab") as log:
            owned.append(runtime.start(superlink_command(cfg, args.insecure, database), env, log, keep_fds=[lock]))
        if not runtime.wait_for_port(dial_host(cfg), int(sl.port), 60, owned[0]):
            raise OsteoError(home / "superlink.log", "the SuperLink did not start")
        if not args.insecure:
            ids = provision.register_sites(cfg.paths.pki, sites, CONNECTION, env, str(database.resolve()))
            print(f"flower-server: sites registered: {', '.join(ids)}", flush=True)
        print(f"flower-server: waiting for {cfg.federation.min_available_nodes} of {len(sites)} sites; "
              f"start `osteo-client --site X` at each hospital", flush=True)
        owned.append(runtime.start(run_command(overrides, args.resume), env, keep_fds=[lock]))
        rc = owned[1].wait()
        last = load_latest(run_dir / "checkpoints")
        total = int(cfg.federation.ssl_rounds) + int(cfg.federation.task_rounds)
        done = 0 if last is None else last.round
        print(f"flower-server: run ended after round {done}/{total} (flwr run exit {rc}); history and "
              f"checkpoints in {run_dir}", flush=True)
        if rc == 0 and done < total:  # `flwr run --stream` can end cleanly although the ServerApp failed
            raise OsteoError(run_dir, f"the run stopped at round {done} of {total}; see the log above and "
                                      f"{home / 'superlink.log'}; `flower-server --resume` carries on")
        if args.serve:
            print("flower-server: --serve: SuperLink keeps running; Ctrl-C to stop", flush=True)
            owned[0].wait()
        return rc
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop every tree, then leave without a slow teardown
        runtime.stop(*reversed(owned))
        runtime.exit_now(130)
    finally:
        runtime.stop(*reversed(owned))
        os.close(lock)


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    # without node keys a site can only be the name its replies give (duplicates refused: server/identity.py)
    insecure = ["federation.identity=declared"] if args.insecure else []
    return run_cli(lambda: serve(args, absolute_overrides(overrides) + insecure))


if __name__ == "__main__":
    raise SystemExit(main())
