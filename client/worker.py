"""`python -m osteofl.client.worker`: a site's warm worker, started and owned by ``osteo-client``.

Flower starts a fresh ClientApp process for every message and keeps it short-lived by design. Paying
torch's and the science library's imports and the config composition in each (~3.5 s and ~400 MB per
message on 2 cores, issue 11) made a deployed round cost about six simulated ones. The worker pays them
once; the ClientApp process only relays each message over a private local socket
(client/worker_wire.py) and sends back what the worker answered. Everything else is as in process: the
same handlers, the site's policy and audit log (client/handlers.py ``answer``), and the site's state on
disk after every message, so a worker that is stopped or restarted loses nothing.

The worker answers with the node config it was started with (the hospital's folders and its own
overrides), never with the one a relayed request carries: the site's policy comes from the hospital's
own command, not from the code of the app a coordinator submitted.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.supercore import log

from osteo_model.cli._common import run_cli
from osteo_model.dataset import load_site_data
from osteofl.client import dp, handlers, policy, worker_wire
from osteofl.client.site_session import site_config
from osteofl.client.state_store import StateStore

READY = "osteo-worker ready"
"""Printed (and flushed) once the socket listens (osteo-client waits for the socket itself)."""


def relayed(kind: str, message: Message, context: Context, node_config: dict[str, Any]) -> Message:
    """Answer a relayed message as this site: the request's run config and ids, the worker's own node config."""
    own = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(node_config),
                  state=context.state, run_config=context.run_config)
    if kind not in handlers.HANDLERS:
        raise worker_wire.WireError(f"unknown message kind {kind!r}")
    return handlers.answer(kind, message, own)


def serve_connection(conn: socket.socket, node_config: dict[str, Any]) -> None:
    """One request, one reply. A malformed request is dropped (the ClientApp reports the worker as not
    answering); a handler's failure is already an Error reply made by ``handlers.answer``."""
    try:
        kind, message, context = worker_wire.decode_request(*worker_wire.receive(conn))
        start = time.perf_counter()
        reply = relayed(kind, message, context, node_config)
        worker_wire.send(conn, *worker_wire.encode_reply(reply))
        log(INFO, "site worker: %s answered in %.2f s%s", kind, time.perf_counter() - start,
            f" (error {reply.error.code})" if reply.has_error() else "")
    except Exception as exc:  # noqa: BLE001 - one bad request must not stop the site
        log(WARNING, "site worker: dropped a request: %s: %s", type(exc).__name__, exc)


def warm_up(node_config: dict[str, Any]) -> str:
    """Compose the site's own config, check its policy and open its prepared data once, so a broken site
    fails here, at start, in one line (a mistyped setting, an incomplete DP floor, a bad compute cap). The
    model is not built: its settings come with each run's request."""
    context = Context(run_id=0, node_id=0, node_config=dict(node_config), state=RecordDict(), run_config={})
    site, cfg = site_config(context)
    own = policy.effective_config(cfg, cfg)  # what each run's request meets: the site's policy against itself
    data = load_site_data(cfg.site.cache_dir, cfg)
    caps = ", ".join(f"{name} {cap}" for name, cap in policy.compute_caps(cfg.site.policy).items())
    spent = StateStore(cfg.site.state_dir, site).load().epsilon  # an unreadable state file stops the site here
    return (f"site {site}: {len(data.cache)} vertebrae; compute caps: {caps or 'none'}; "
            f"{dp.describe(own, data, spent)}")


def serve(path: Path, node_config: dict[str, Any]) -> None:
    """Answer relayed messages one at a time (a site trains one message at a time) until stopped."""
    summary = warm_up(node_config)
    with worker_wire.listen(path) as sock:
        print(f"{READY}: {summary}", flush=True)
        while True:
            conn, _ = sock.accept()
            with conn:
                serve_connection(conn, node_config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, type=Path, help="where to listen (a file in a private folder)")
    p.add_argument("--node-config", required=True, help="the SuperNode's node config as JSON (osteo-client)")
    args = p.parse_args(argv)
    return run_cli(lambda: serve(args.socket, json.loads(args.node_config)))


if __name__ == "__main__":
    sys.exit(main())
