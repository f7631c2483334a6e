"""The hospital side of the federation: a Flower ClientApp on the Message API (query, train, evaluate).

Flower starts a fresh ClientApp process for every message of a deployment, so this module stays light
(Flower and the protocol's keys; no torch, no science library): when the node config names a site worker
(``osteo-client`` starts one, client/worker.py), the message is relayed to it over a private local
socket and its answer sent back. Without one (Flower's simulation engine, whose workers live for the
whole run, and tests) the same handlers run in this process. Either way the reply is made and vetted by
``client/handlers.py``: the site's policy and audit log apply to every message.
"""
from __future__ import annotations

from typing import Callable, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from osteofl.client import worker_wire
from osteofl.protocol import NODE_WORKER

KINDS = ("query", "train", "evaluate")


def _handler(kind: str, extra: Sequence[str]) -> Callable[[Message, Context], Message]:
    def handle(message: Message, context: Context) -> Message:
        socket_path = context.node_config.get(NODE_WORKER)
        if socket_path:
            return worker_wire.forward(str(socket_path), kind, message, context)
        from osteofl.client import handlers  # torch and the site's data: only where no worker holds them

        return handlers.answer(kind, message, context, extra)

    return handle


def make_client_app(extra_overrides: Sequence[str] = ()) -> ClientApp:
    """A ClientApp whose handlers compose the config with ``extra_overrides`` (simulation and tests use this;
    a site worker answers with its own configuration instead)."""
    client_app = ClientApp()
    extra = tuple(extra_overrides)
    registrars = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}
    for kind in KINDS:
        registrars[kind]()(_handler(kind, extra))
    return client_app


app = make_client_app()
