"""Shared pieces of the federation tests: tiny site caches, small-model overrides, and an in-process Grid
that delivers the ServerApp's messages to the real ClientApp handlers (no Ray, no network), with hooks
to drop a site or tamper with its reply."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable
from unittest import mock

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.node_pb2 import NodeInfo

from cache_factory import make_site_cache

SITES = {"site_a": "hologic", "site_b": "ge_lunar", "site_c": "norland"}
TEST_SHUFFLE_SALT = "5a17" * 8
"""The shuffle salt of every site a LocalGrid plays: a hospital's is random (client/site_session.py), which
would make each test run train on other batches."""


def make_caches(root: Path, sites: dict[str, str] = SITES, n_patients: int = 34) -> Path:
    """Fake prepared caches under ``root/data/cache/<site>`` (the default paths.cache_root) with their truth
    under ``root/data/ground_truth``. 34 patients give every split at least 5 (the hard minimum cohort,
    client/policy.py), so metrics are not withheld."""
    for i, (site, manufacturer) in enumerate(sites.items()):
        make_site_cache(root / "data" / "cache" / site, site=site, n_patients=n_patients, size=12,
                        manufacturer=manufacturer, device_bias=0.02 * i, seed=i, truth_dir=root / "data" / "ground_truth")
    return root


def allow_small_cohorts(root: Path, sites: Iterable[str] = SITES) -> None:
    """Each test hospital's own site.yaml lets its tiny splits' aggregates out (the policy's hard floor, 5)."""
    for site in sites:
        (root / "data" / "sites" / site).mkdir(parents=True, exist_ok=True)
        (root / "data" / "sites" / site / "site.yaml").write_text("policy:\n  min_cohort: 5\n")


def small_overrides(root: Path, **extra: object) -> list[str]:
    """A model and federation small enough for a unit test on CPU. In-process grids hold no node keys, so
    sites are named by their first reply (``federation.identity=declared``) unless a test says ``key``."""
    out = [
        f"paths.root={root}", "federation.identity=declared",
        "model.channels=[4,8]", "model.embed_dim=16", "model.expert_hidden=8", "model.num_shared_experts=2",
        "train.batch_size=8", "federation.ssl_rounds=1", "federation.task_rounds=1",
        "federation.local_steps=2", "federation.round_timeout=60",
        f"federation.sites=[{','.join(SITES)}]", "site.policy.min_cohort=5",
    ]
    return out + [f"{k}={v}" for k, v in extra.items()]


class LocalGrid:
    """A Grid that runs the ClientApp in-process for node ids 1..N (site i for node i). ``registered``
    plays Flower's node registry (``Grid.get_nodes``): node id -> (registered name, PEM public key).
    Each grid is one Flower run: its own ``run_id`` (a resumed federation on a new grid is a new Flower run,
    as under `flower-server --resume`)."""

    _runs = itertools.count(1)

    def __init__(self, client_app: ClientApp, sites: Iterable[str], run_config: dict | None = None,
                 node_overrides: dict[str, str] | None = None, node_config: dict[str, dict] | None = None) -> None:
        self.app = client_app
        self.nodes = {i + 1: site for i, site in enumerate(sites)}
        self.run_config = dict(run_config or {})                # the coordinator's (run config "overrides")
        self.node_overrides = dict(node_overrides or {})        # site -> its own `osteo-client` overrides
        self.node_config = dict(node_config or {})              # site -> further node config (its worker)
        self.drop: set[str] = set()                        # sites whose process "dies" mid-round
        self.tamper: Callable[[str, Message], None] | None = None  # edits a train reply in place
        self.sent: list[Message] = []                      # every reply that left a site
        self.registered: dict[int, tuple[str, bytes]] = {}
        self.run_id = next(LocalGrid._runs)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, name=self.registered.get(n, ("", b""))[0],
                         public_key=self.registered.get(n, ("", b""))[1]) for n in self.nodes]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            site = self.nodes[msg.metadata.dst_node_id]
            if site in self.drop:
                continue  # no reply at all: the round goes on without it
            node_config = {"site": site, **({"overrides": self.node_overrides[site]} if site in self.node_overrides else {}),
                           **self.node_config.get(site, {})}
            ctx = Context(run_id=self.run_id, node_id=msg.metadata.dst_node_id, node_config=node_config,
                          state=RecordDict(), run_config=self.run_config)
            try:
                with mock.patch("osteofl.client.site_session.new_shuffle_salt", lambda: TEST_SHUFFLE_SALT):
                    reply = self.app(msg, ctx)
            except Exception as exc:  # what Flower's runtime does: an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None and not reply.has_error():
                self.tamper(site, reply)
            self.sent.append(reply)
            replies.append(reply)
        return replies
