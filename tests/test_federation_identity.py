"""Site identity is bound to the authenticated key, not to the name a reply declares: the real ServerApp
round loop against the real ClientApp (in-process LocalGrid playing Flower's node registry), attacked by a
node that lies about its name and by nodes that share one."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from federation_helpers import SITES, LocalGrid, make_caches, small_overrides
from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import keys
from osteofl.client.client_app import make_client_app
from osteofl.protocol import N_SITES, RUN_ID, SITE
from osteofl.server import provision
from osteofl.server.identity import Identities
from osteofl.server.server_app import Federation

pytestmark = pytest.mark.usefixtures("task_identity")


def _hospital_key(root: Path, site: str) -> bytes:
    """A key pair made at the hospital; returns the PEM public key Flower's registry would hold."""
    _, pub = keys.make_site_key(root / "hospitals" / site, site)
    return keys.load_public_key(pub).public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def _registered(root: Path) -> dict[str, bytes]:
    """Every site's key made at its hospital, its public half registered by the coordinator."""
    out = {}
    for site in SITES:
        out[site] = _hospital_key(root, site)
        provision.register_public_key(root / "data" / "pki", site, root / "hospitals" / site / f"{site}_key.pub")
    return out


def _aggregated_nodes(fed: Federation) -> list[set[int]]:
    """Spy on the strategy: which nodes' updates reach aggregation each round."""
    seen: list[set[int]] = []
    original = fed.strategy.aggregate_train

    def spy(rnd, replies):
        replies = list(replies)
        seen.append({m.metadata.src_node_id for m in replies})
        return original(rnd, replies)

    fed.strategy.aggregate_train = spy
    return seen


def test_a_node_lying_about_its_name_is_refused_and_named_by_its_key(tmp_path: Path) -> None:
    root = make_caches(tmp_path)
    pem = _registered(root)
    overrides = small_overrides(root, **{"federation.identity": "key"})
    # node 4 runs site_c's data with a key the coordinator never registered, under Flower name "site_c"
    grid = LocalGrid(make_client_app(overrides), [*SITES, "site_c"])
    grid.registered = {1: ("site_a", pem["site_a"]), 2: ("site_b", pem["site_b"]), 3: ("site_c", pem["site_c"]),
                       4: ("site_c", _hospital_key(root, "rogue"))}

    def impersonate(site: str, reply) -> None:  # node 2 holds site_b's key but says it is site_a
        if reply.metadata.src_node_id == 2:
            reply.content[SITE]["name"] = "site_a"

    grid.tamper = impersonate
    configs = _record_configs(grid)
    fed = Federation(grid, compose(overrides), run_id=77)
    aggregated = _aggregated_nodes(fed)
    history = fed.run()

    assert fed.identity == {1: "site_a", 2: "site_b", 3: "site_c"} and fed.name_of(4) == "node-4"
    assert aggregated == [{1, 3}, {1, 3}]  # neither the impostor's nor the rogue's update is ever averaged
    for record in history.records:
        assert set(record["site_train"]) == set(record["site_eval"]) == {"site_a", "site_c"}
        assert record["identity"] == {"site_a": "key", "site_c": "key"}
        assert not record["rejected"]  # refused at the handshake: never asked again (below)
    run = root / "outputs" / "federated"
    final = json.loads((run / "final_metrics.json").read_text())
    assert set(final["sites"]) == {"site_a", "site_c"} and final["identity"] == {"site_a": "key", "site_c": "key"}
    refused = final["refused_at_handshake"]  # named by key: the impostor as the site it is, the rogue by its node
    assert set(refused) == {"site_b", "node-4"} and "declares site 'site_a'" in refused["site_b"]
    assert "not a site key the coordinator registered" in refused["node-4"]
    with open(run / "history.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["site"] != "ALL"]
    assert {(r["site"], r["identity"]) for r in rows} == {("site_a", "key"), ("site_c", "key")}
    # train/evaluate messages go to the 2 admitted nodes only: the impostor and the rogue node never receive
    # the global model, the run id or the site count (before, all 4 nodes did: 2 * 2 * 4 + 4 messages)
    assert len(configs) == 2 * 2 * 2 + 2  # 2 rounds x (train + evaluate) x 2 nodes + the final evaluation
    assert {node for node, _ in configs} == {1, 3}
    # every train/evaluate message carries the Flower run id and the number of admitted sites
    assert all(c[RUN_ID] == "77" and c[N_SITES] == 2 for _, c in configs)


def _record_configs(grid: LocalGrid) -> list:
    """(node, CONFIG record) of every train/evaluate message the server sends."""
    out: list = []
    send = grid.send_and_receive

    def recording(messages, timeout=None):
        messages = list(messages)
        out.extend((m.metadata.dst_node_id, m.content["config"]) for m in messages
                   if m.metadata.message_type in ("train", "evaluate"))
        return send(messages, timeout=timeout)

    grid.send_and_receive = recording
    return out


def test_two_nodes_with_one_name_are_both_refused(tmp_path: Path) -> None:
    root = make_caches(tmp_path)
    overrides = small_overrides(root, **{"federation.task_rounds": 0})  # no keys: names as declared
    grid = LocalGrid(make_client_app(overrides), [*SITES, "site_c"])  # nodes 3 and 4 both say site_c
    fed = Federation(grid, compose(overrides))
    aggregated = _aggregated_nodes(fed)
    (record,) = fed.run().records
    assert aggregated == [{1, 2}]
    assert set(record["site_train"]) == {"site_a", "site_b"}
    assert record["identity"] == {"site_a": "declared", "site_b": "declared"}
    reasons = fed.refused_at_handshake  # both left out of the run at the handshake, never asked again
    assert set(reasons) == {"node-3", "node-4"} and all("as 2 nodes do at once" in r for r in reasons.values())
    assert not record["rejected"]


def test_flower_name_disagreeing_with_the_key_and_an_empty_registry_are_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    with pytest.raises(ConfigError, match="no site has a registered public key"):
        Identities(LocalGrid(None, []), "key", pki)
    _, pub = keys.make_site_key(tmp_path / "hospital", "site_a")
    provision.register_public_key(pki, "site_a", pub)
    grid = LocalGrid(None, ["site_a"])
    pem = keys.load_public_key(pub).public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    grid.registered = {1: ("site_b", pem)}  # registered with Flower under another name than its key's
    ids = Identities(grid, "key", pki)
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type=MessageType.QUERY)
    reply = Message(RecordDict({SITE: ConfigRecord({"name": "site_a"})}), reply_to=query)
    refused = ids.check([reply])
    assert ids.identity == {} and "registered with Flower as 'site_b'" in refused[1]
    with pytest.raises(ConfigError, match="expected 'key' or 'declared'"):
        Identities(grid, "name", pki)
    copy = pki / "sites" / "site_b" / "site_b_key.pub"  # one key copied by hand to name a second site
    copy.parent.mkdir(parents=True)
    copy.write_bytes(pub.read_bytes())
    with pytest.raises(ConfigError, match="sites site_a and site_b have the same public key"):
        Identities(grid, "key", pki)


@pytest.mark.parametrize("name", ["site_b\n[INFO] round 9: all sites agree", "../../etc", "s" * 200, ""])
def test_a_declared_name_that_is_not_a_site_name_is_refused(tmp_path: Path, name: str) -> None:
    """Without keys (simulation, --insecure) a node names itself: a name with a newline, path separators or
    200 characters is refused at the handshake, shown cut and quoted; the honest sites train."""
    root = make_caches(tmp_path)
    overrides = small_overrides(root, **{"federation.task_rounds": 0})
    grid = LocalGrid(make_client_app(overrides), SITES)

    def rename(site: str, reply) -> None:
        if reply.metadata.src_node_id == 2 and SITE in reply.content:
            reply.content[SITE]["name"] = name

    grid.tamper = rename
    fed = Federation(grid, compose(overrides))
    (record,) = fed.run().records
    assert set(record["site_train"]) == {"site_a", "site_c"} and fed.identity == {1: "site_a", 3: "site_c"}
    (reason,) = fed.refused_at_handshake.values()
    assert "not a site name" in reason and "\n" not in reason and len(reason) < 150
